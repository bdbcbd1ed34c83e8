"""helpers.experiments.validation: recorded trajectories vs retrain.warm_start, last-layer heads vs the full model, the
shuffled-index pitfall vs the direct estimate, noise summaries vs metrics, 1/n scaling on exact leave-one-out."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from helpers import influence, metrics, retrain
from helpers.experiments import validation as V
from helpers.influence import predict_removal
from helpers.objective import per_sample_losses
from helpers.retrain import GroundTruth
from helpers.models import init_params
from helpers.train import Recipe, fit, model_with
from tests.tiny_models import LogReg, MLP

L2 = 1e-2
ADAM = Recipe(optimizer="adam", lr=1e-3, epochs=30, weight_decay=L2)


def make_data(n: int, seed: int, d: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 3, generator=g, dtype=torch.float64)
    y = (2 * x @ w + 0.7 * torch.randn(n, 3, generator=g, dtype=torch.float64)).argmax(1)
    return x, y


@pytest.fixture(scope="module")
def mlp_problem():
    torch.manual_seed(0)
    model = MLP().double()
    train, test = make_data(30, 1), make_data(5, 2)
    theta = fit(Recipe(optimizer="adam", lr=3e-2, epochs=120, weight_decay=L2), model, *train, progress=False).params
    return model, theta, train, test


# ------------------------------------------------------------------------------------------ trajectories


@pytest.mark.parametrize("recipe", [
    ADAM,
    ADAM.replace(epochs=7, batch_size=8, amsgrad=True),
    Recipe(optimizer="sgd", lr=1e-2, epochs=9, momentum=0.9, weight_decay=L2, batch_size=7),
], ids=["adam-full", "amsgrad-batches", "sgd-momentum-batches"])
@pytest.mark.parametrize("params", ["all", "last"])
def test_trajectory_ends_where_warm_start_ends(mlp_problem, recipe, params):
    model, theta, train, test = mlp_problem
    removed = [0, 3, 7, 29]
    tr = retrain.warm_start(model, theta, train, test, removed, recipe, params=params, cache=False, progress=False,
                            record_every=5).trajectory
    gt = retrain.warm_start(model, theta, train, test, removed, recipe, params=params, cache=False, progress=False)
    assert tr.epochs[0] == 0 and tr.epochs[-1] == recipe.epochs
    np.testing.assert_allclose(tr.delta[-1], gt.delta, rtol=0, atol=1e-13)
    np.testing.assert_allclose(tr.drift[-1], gt.drift, rtol=0, atol=1e-13)
    np.testing.assert_allclose(tr.grad_norm, gt.grad_norm, rtol=1e-10, atol=1e-15)
    assert np.all(tr.delta[0] == 0) and np.all(tr.drift[0] == 0)  # epoch 0 is θ̂ itself, exactly
    assert np.abs(tr.delta[-1]).max() > 0


def test_trajectory_intermediate_epochs_are_shorter_warm_starts(mlp_problem):
    """Full batch, constant lr: the state after e epochs of a long run is the run of length e."""
    model, theta, train, test = mlp_problem
    tr = retrain.warm_start(model, theta, train, test, [1, 4], ADAM, record_epochs=[10, 20], cache=False,
                            progress=False).trajectory
    assert tr.epochs.tolist() == [0, 10, 20, 30]
    short = retrain.warm_start(model, theta, train, test, [1, 4], ADAM.replace(epochs=10), cache=False,
                               progress=False)
    g = tr.at(10)
    np.testing.assert_allclose(g.delta, short.delta, rtol=0, atol=1e-13)
    np.testing.assert_allclose(g.drift, short.drift, rtol=0, atol=1e-13)
    assert g.recipe["epochs"] == 10
    with pytest.raises(ValueError, match="not recorded"):
        tr.at(11)


def test_trajectory_refuses_recipes_it_cannot_record(mlp_problem):
    model, theta, train, test = mlp_problem
    def record(recipe, removed=(0,), **kw):
        return retrain.warm_start(model, theta, train, test, list(removed), recipe, cache=False, progress=False, **kw)

    with pytest.raises(ValueError, match="constant learning rate"):
        record(ADAM.replace(schedule="plateau"), record_every=5)
    with pytest.raises(ValueError, match="Adam or SGD"):
        record(Recipe(optimizer="newton"), record_every=5)
    with pytest.raises(ValueError, match=r"\[0, 30\]"):
        record(ADAM, record_epochs=[31])
    with pytest.raises(ValueError, match="removed"):
        record(ADAM, removed=[30], record_every=5)
    assert record(ADAM).trajectory is None  # nothing asked, nothing recorded


# ------------------------------------------------------------------------------------------ set-up


def test_head_reproduces_the_model_and_its_last_layer_influence(mlp_problem):
    model, theta, train, test = mlp_problem
    m = model_with(model, theta)
    head, htrain, htest = V.last_layer_problem(m, train, test)
    torch.testing.assert_close(head(htrain[0]), m(train[0]), rtol=0, atol=1e-14)
    full = predict_removal(m, train, test, params="last", l2=L2).values
    via_head = predict_removal(head, htrain, htest, l2=L2).values
    torch.testing.assert_close(via_head, full, rtol=1e-10, atol=1e-14)
    with pytest.raises(AttributeError, match="last_layer"):
        V.penultimate(nn.Linear(3, 3), train[0])


def test_pool_images_averages_blocks():
    x = torch.arange(2 * 16, dtype=torch.float64).reshape(2, 16)
    out = V.pool_images(x, 2)
    assert out.shape == (2, 1, 2, 2)
    assert out[0, 0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert V.pool_images(x, 1).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="divisible"):
        V.pool_images(x, 3)
    with pytest.raises(ValueError, match="square"):
        V.pool_images(torch.zeros(2, 15), 1)


def test_test_points_and_selection_rules():
    losses = np.array([0.3, 2.0, 0.1, 0.5, 0.2])
    picks = V.test_points(losses, seed=0)
    assert picks["max"] == 1 and picks["median"] == 0
    assert picks["random"] not in (picks["max"], picks["median"])
    est = np.array([0.1, -3.0, 2.0, 0.0, -0.5])
    assert V.select_candidates("estimate", 2, estimate=est).tolist() == [1, 2]
    assert V.select_candidates("loss", 2, train_loss=losses).tolist() == [1, 3]
    r = V.select_candidates("random", 3, n=5, seed=4)
    assert len(set(r.tolist())) == 3 and r.tolist() == V.select_candidates("random", 3, n=5, seed=4).tolist()
    with pytest.raises(ValueError, match="needs train_loss"):
        V.select_candidates("loss", 2, estimate=est)
    with pytest.raises(ValueError, match="k must lie"):
        V.select_candidates("estimate", 6, estimate=est)
    with pytest.raises(ValueError, match="unknown selection rule"):
        V.select_candidates("influence", 2, estimate=est)
    with pytest.raises(ValueError, match="no run without"):
        V.columns_of([4, 5], [5, 6])


# ------------------------------------------------------------------------------------------ agreement and noise


def test_agreement_wraps_summarize_and_adds_abs_and_scale():
    rng = np.random.default_rng(0)
    true = rng.normal(size=25)
    pred = -0.5 * true + 0.1 * rng.normal(size=25)
    a = metrics.agreement(pred, true, n_resamples=200)
    assert a["pearson"] == pytest.approx(metrics.pearson(pred, true))
    assert a["pearson"] < -0.9 and a["abs_pearson"] == pytest.approx(-a["pearson"])
    assert a["scale_ratio"] == pytest.approx(np.median(np.abs(pred)) / np.median(np.abs(true)))
    tab = metrics.agreement_table({"est": pred}, {"gt": true}, n_resamples=200, extra={"gt": {"ceiling": 0.5}})
    assert set(tab.metric) == set(metrics.AGREEMENT_METRICS) and (tab.ceiling == 0.5).all()
    assert (tab.low <= tab.high).all()


def test_noise_summary_of_cold_and_deterministic_ground_truths():
    rng = np.random.default_rng(1)
    signal = rng.normal(size=12)
    per = signal[None, None, :] + 0.5 * rng.normal(size=(4, 1, 12))  # [seeds, n_test, removed]
    cold = GroundTruth("cold_start", per.mean(0), rng.normal(size=(4, 1)) * 0.3, np.arange(12), {}, per, per[0, 0],
                       np.zeros((4, 13)), {"seeds": [0, 1, 2, 3]}, per, per.std(0, ddof=1))
    ns = V.noise_summary(cold)
    nc = metrics.noise_ceiling(per[:, 0, :])
    assert ns["ceiling"] == pytest.approx(nc.ceiling) and ns["ceiling_single"] == pytest.approx(nc.ceiling_single)
    assert ns["drift"] == pytest.approx(np.std(cold.drift[:, 0], ddof=1))
    assert ns["drift_ratio"] == pytest.approx(ns["drift"] / np.median(np.abs(per.mean(0)[0])))
    warm = GroundTruth("warm_start", per.mean(0), np.array([0.2]), np.arange(12), {}, per[0], np.zeros(1),
                       np.zeros(13))
    nw = V.noise_summary(warm)
    assert nw["ceiling"] == 1.0 and nw["drift"] == pytest.approx(0.2) and nw["seed_sd"] == 0.0


def test_loglog_slope_recovers_a_power_law():
    n = np.array([50, 100, 200, 400.0])
    out = V.loglog_slope(n, 3.0 / n)
    assert out["slope"] == pytest.approx(-1.0) and out["r2"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = V.loglog_slope(np.repeat(n, 5), np.repeat(3.0 / n, 5) * np.exp(0.1 * rng.normal(size=20)))
    assert noisy["low"] < -1.0 < noisy["high"]
    with pytest.raises(ValueError, match="positive"):
        V.loglog_slope([1, 2, 3], [1, 0, 2])


def test_single_point_effects_shrink_like_one_over_n():
    """Exact leave-one-out on a convex model: the estimate matches, and median |Δ| falls with slope ≈ −1."""
    df = V.single_point_scaling("iris", [30, 60, 120], k=10, seed=0, cache=False)
    assert df.groupby("n").size().tolist() == [10 * 30] * 3  # 10 removals × 30 test points each
    # nested sets: the same removed points at every n
    assert all(set(g.removed) == set(df[df.n == 30].removed) for _, g in df.groupby("n"))
    slopes = V.pair_slopes(df)
    assert slopes.size > 200 and -2.5 < np.median(slopes) < -0.7
    one = df[(df.removed == df.removed.min()) & (df.test == 0)].sort_values("n")  # the first pair, sorted
    assert slopes[0] == pytest.approx(V.loglog_slope(one.n, one.delta_true.abs())["slope"])
    # at n = 30 one removal is a large step (second-order effects); at n = 120 the estimate is nearly exact
    assert metrics.spearman(df.delta_pred, df.delta_true) > 0.98
    big = df[df.n == 120]
    assert metrics.pearson(big.delta_pred, big.delta_true) > 0.99
    with pytest.raises(ValueError, match="sizes must lie"):
        V.single_point_scaling("iris", [5, 60], k=10, cache=False)


# ------------------------------------------------------------------------------------------ the pitfall


def test_loader_influence_fixed_matches_the_estimate_and_broken_is_a_permutation(mlp_problem):
    model, theta, train, test = mlp_problem
    m = model_with(model, theta)
    est = predict_removal(m, train, (test[0][:1], test[1][:1]), l2=L2, damping=0.05)  # H has λ_min < 0
    direction = est.solve.x[:, 0]
    fixed = influence.loader_influence(m, train, direction, batch_size=8, seed=3, carry_index=True)
    broken = influence.loader_influence(m, train, direction, batch_size=8, seed=3, carry_index=False)
    truth = est.values[0].numpy()
    np.testing.assert_allclose(fixed.by_dataset_index(), truth, rtol=1e-12, atol=1e-15)
    assert not np.array_equal(fixed.index, np.arange(30))  # the loader did shuffle
    # the same loader order: the broken pipeline files the value of point index[p] under point p
    np.testing.assert_array_equal(broken.values, fixed.values)
    np.testing.assert_allclose(broken.by_dataset_index(), truth[fixed.index], rtol=1e-12, atol=1e-15)
    assert metrics.spearman(broken.by_dataset_index(), truth) < 0.9
    with pytest.raises(ValueError, match="direction"):
        influence.loader_influence(m, train, direction[:-1])


# ------------------------------------------------------------------------------------------ protocols


@pytest.fixture(scope="module")
def convex_problem():
    """L2 logistic regression trained by Newton: a problem whose ground truths must all agree."""
    torch.manual_seed(0)
    train, test = make_data(40, 5), make_data(12, 6)
    recipe = Recipe(optimizer="newton", weight_decay=L2, tol=1e-12, max_iter=50)
    return V.make_problem("logreg", LogReg().double(), recipe, train, test, params="all", gn_damping=1e-3,
                          cache=False)


def test_make_problem_picks_test_points_and_estimates(convex_problem):
    p = convex_problem
    assert p.test[0].shape == (3, 3) and p.test_names == list(V.TEST_RULES)
    assert p.estimate.shape == (3, 40) and p.estimate_gn.shape == (3, 40)
    assert p.info["grad_norm"] < 1e-12 and p.info["hessian_min_eig"] > L2 * 0.999
    losses = per_sample_losses(p.model, dict(p.model.named_parameters()), *p.test).detach()
    assert losses[0] == losses.max()  # the first test point is the max-loss one
    # logistic regression is linear in its parameters: Gauss-Newton = Hessian, only the damping differs
    direct = predict_removal(p.model, p.train, p.test, l2=L2, damping=1e-3, hessian="hessian").values.numpy()
    np.testing.assert_allclose(p.estimate_gn, direct, rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="params"):
        V.make_problem("x", LogReg().double(), Recipe(), make_data(10, 1), make_data(5, 2), params="first")


def test_protocols_side_by_side_on_a_convex_problem(convex_problem):
    p = convex_problem
    removed = V.select_candidates("estimate", 10, estimate=p.estimate[0])
    newton = Recipe(optimizer="newton", tol=1e-12, max_iter=50)
    prot = V.Protocols(warm=Recipe(optimizer="adam", lr=1e-2, epochs=200, weight_decay=L2),
                       head=Recipe(optimizer="adam", lr=1e-2, epochs=200, weight_decay=L2), pbrf=newton,
                       pbrf_damping=1e-3, seeds=(0, 1, 2), every=50, head_every=100, cold_k=6)
    pool = V.selection_pool(p, 5)
    truths = V.run_protocols(p, removed, prot, wide=pool, cache=False)
    assert truths["cold"].delta.shape == (3, 6)
    assert set(pool) <= set(truths["pbrf"].removed.tolist())
    assert truths["warm_all"].epochs.tolist() == [0, 50, 100, 150, 200]
    table = V.side_by_side(p, truths, removed, lengths=[50], n_resamples=200)
    assert {"cold (3 seeds)", "cold (1 seed)", "warm all", "warm all − drift", "warm all @ 50", "warm last",
            "PBRF"} == set(table.ground_truth)
    assert np.isfinite(table[["value", "low", "high", "ceiling", "drift_ratio"]].to_numpy()).all()

    def val(gt, est="H+δ", m="pearson"):
        return float(table[(table.ground_truth == gt) & (table.estimate == est) & (table.metric == m)].value.iloc[0])

    # convex and converged: cold start from any seed lands on the same minimum, so no seed noise, ceiling 1,
    # and every ground truth agrees with the estimate
    assert np.abs(truths["cold"].noise).max() < 1e-9
    assert table[table.ground_truth.str.startswith("cold")].ceiling.min() > 0.999
    for gt in ("cold (3 seeds)", "warm all", "PBRF"):
        assert val(gt) > 0.98, gt
    # the PBRF is what the damped Gauss-Newton estimate linearises (40 points: the rest is second order)
    assert val("PBRF", "GN+δ") > 0.98 and val("PBRF", "GN+δ") > val("PBRF", "H+δ")
    assert val("warm all") == pytest.approx(val("warm all − drift"))
    grid = V.selection_grid(p, truths["pbrf"].delta[:, V.columns_of(truths["pbrf"].removed, pool)], pool, 5,
                            n_resamples=200)
    assert set(grid.candidates) == set(V.CANDIDATE_RULES) and set(grid.test_point) == set(V.TEST_RULES)
    with pytest.raises(ValueError, match="no run without"):
        V.selection_grid(p, truths["pbrf"].delta[:, :3], truths["pbrf"].removed[:3], 5, n_resamples=200)


def test_depth_runs_match_a_separate_computation():
    train, test = make_data(30, 7), make_data(1, 8)
    fit_r = Recipe(optimizer="adam", lr=1e-2, epochs=60, weight_decay=L2)
    re_r = Recipe(optimizer="adam", lr=1e-3, epochs=20, weight_decay=L2)
    runs = V.depth_runs([1], 2, train, test, width=4, activation="tanh", train_recipe=fit_r, retrain_recipe=re_r,
                        n_candidates=6, seed=3, cache=False)
    assert runs.depth.tolist() == [1, 1] and runs.rep.tolist() == [0, 1]
    # rep 1 by hand: fit from init seed 4, last-layer estimate, top-6 training loss, warm start on all layers
    from helpers.models import mlp

    model = mlp(3, 3, 1, 4, "tanh", dtype=torch.float64)
    theta = fit(fit_r, model, *train, init=init_params(model, 4), progress=False).params
    m = model_with(model, theta)
    est = predict_removal(m, train, test, params="last", l2=L2).values[0].numpy()
    tl = per_sample_losses(m, dict(m.named_parameters()), *train).detach()
    cand = V.select_candidates("loss", 6, train_loss=tl)
    gt = retrain.warm_start(m, theta, train, test, cand, re_r, cache=False, progress=False)
    assert runs.spearman.iloc[1] == pytest.approx(metrics.spearman(est[cand], gt.delta[0]), abs=1e-9)
    assert runs.drift.iloc[1] == pytest.approx(float(gt.drift[0]), abs=1e-10)


# ------------------------------------------------------------------- the chapter's section functions


@pytest.fixture()
def book_out(tmp_path, monkeypatch):
    """Records and figure data of the section functions go to a temporary folder; returns a reader of the records."""
    import json

    monkeypatch.setenv("BOOK_OUTPUT_DIR", str(tmp_path))
    return lambda: json.loads((tmp_path / "records.json").read_text())


def test_summary_display_table_shows_intervals_in_the_summary_order():
    rows = [{"model": m, "ground_truth": gt, "estimate": "H+δ", "metric": met, "value": 0.5, "low": 0.25,
             "high": 0.75, "ceiling": 0.912, "drift_ratio": 1.26, "n_outer": 3, "n_inner": 3}
            for m in ("B model", "A model") for gt in ("warm all", "PBRF")
            for met in ("pearson", "spearman", "relative_error", "scale_ratio", "kendall")]
    table = V.summary_display_table(pd.DataFrame(rows))
    assert list(table.columns) == ["pearson", "spearman", "relative_error", "scale_ratio", "ceiling", "drift_ratio",
                                   "n_outer", "n_inner"]
    assert table.index.tolist() == [("B model", "warm all", "H+δ"), ("B model", "PBRF", "H+δ"),
                                    ("A model", "warm all", "H+δ"), ("A model", "PBRF", "H+δ")]  # not sorted
    assert table.iloc[0].pearson == "+0.50 [+0.25, +0.75]"
    assert table.iloc[0].ceiling == 0.91 and table.iloc[0].drift_ratio == pytest.approx(1.3)


def test_noise_floor_records_are_the_medians_of_its_frame(book_out):
    name = V.MODEL_NAMES["iris"]
    noise = pd.DataFrame({"model": name, "kind": ["cold-start drift, per seed"] * 3
                          + ["single-point effect |Δ_true| (cold, seed mean)"] * 2
                          + ["warm-all drift, per recorded length"] * 2, "value": [1, 2, 9, 4, 6, 0.5, 0.7]})
    V.record_noise_floor(noise, keys=["iris"])
    rec = book_out()
    assert rec["iris_cold_drift_median"] == 2 and rec["iris_cold_effect_median"] == 5
    assert rec["iris_warm_drift_max"] == pytest.approx(0.7)
    assert V.draw_noise_floor(noise).axes[0].get_xscale() == "log"


def test_scaling_records_a_slope_of_minus_one_for_effects_like_one_over_n(book_out):
    n = np.array([30, 60, 120])
    scaling = pd.DataFrame([{"n": m, "removed": i, "test": 0, "delta_true": (i + 1) / m, "delta_pred": 1.1 * (i + 1) / m}
                            for m in n for i in range(4)])
    V.record_scaling(scaling, dataset="toy", k=4)
    rec = book_out()
    assert rec["scaling_slope"] == pytest.approx(-1.0) and rec["scaling_pair_slope_median"] == pytest.approx(-1.0)
    assert rec["scaling_pair_slope_share_below"] == 1.0 and rec["scaling_pearson"] == pytest.approx(1.0)
    ax = V.draw_scaling(scaling).axes[0]
    assert ax.get_xlabel() == "training points n" and len(ax.get_lines()) == 3


def test_fig4_records_the_numbers_its_figure_prints(book_out):
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    true = rng.normal(size=12)
    scatter = pd.concat([pd.DataFrame({"panel": p, "estimate": s * true + 0.3 * rng.normal(size=12), "true": true})
                         for p, s in [("book: Iris MLP", 1.0), ("book: MNIST MLP", 2.0),
                                      ("paper: MNIST FC-128 (one run)", 50.0)]], ignore_index=True)
    truths = {"mnist": {"warm_last": SimpleNamespace(drift=np.array([[0.0], [0.25]]))}}
    deep = pd.DataFrame({"model": ["fc128", "fc128", "lenet"], "test_point": "max", "spearman": [0.5, 0.7, 0.0],
                         "scale_ratio": [10.0, 30.0, 1.0]})
    V.record_fig4(scatter, truths, deep)
    rec = book_out()
    iris = scatter[scatter.panel == "book: Iris MLP"]
    assert rec["fig4_iris_spearman"] == pytest.approx(metrics.spearman(iris.estimate, iris.true))
    assert rec["fig4_paper_ratio"] > 10 > rec["fig4_mnist_ratio"]
    assert rec["mnist_last_drift"] == 0.25 and rec["paper_fc128_spearman"] == pytest.approx(0.6)
    assert rec["paper_fc128_ratio"] == 20.0
    fig = V.draw_fig4(scatter)
    assert len(fig.axes) == 3
    assert f"Spearman {rec['fig4_iris_spearman']:+.2f}" in fig.axes[0].texts[0].get_text()
    assert len(fig.axes[2].get_lines()) == 0  # no diagonal where the scales differ by more than 10


def test_paper_sections_record_tests_and_offsets(book_out):
    from helpers import paper_data

    runs = paper_data.iris_runs()
    tests = V.paper_depth_tests(runs)
    assert (tests.p_holm >= tests.p_anova - 1e-15).all() and (tests.p_holm <= 1).all()
    V.record_paper_depth_tests(tests)
    deep = paper_data.deep_run_summary(paper_data.deep_runs())
    V.record_paper_lenet(deep)
    rec = book_out()
    assert rec["paper_regimes"] == runs[runs.sweep == "depth"].regime.nunique()
    assert rec["paper_regimes_significant"] == rec["paper_regimes_significant_abs"] <= rec["paper_regimes"]
    abs_l2 = tests[(tests.regime == "l2") & (tests.scale == "abs")].iloc[0]
    assert rec["paper_l2_abs_p"] == pytest.approx(abs_l2.p_anova)
    lo, hi = rec["paper_lenet_drift_to_spread"]
    assert 0 < lo <= hi
