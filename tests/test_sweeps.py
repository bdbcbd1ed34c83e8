"""helpers.experiments.nonconvex: the stacked ensembles against the real models trained one by one, the batched influence and
spectra against helpers.influence / the per-model Hessian, the paper's tables, and both protocols end to end
at tiny sizes (float64 wherever results must match)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import models, paper_data, plots, retrain, stacked
from helpers.experiments import nonconvex
from helpers.influence import predict_removal
from helpers.models import init_params
from helpers.train import Recipe, fit, model_with

F64 = torch.float64


@pytest.fixture(scope="module")
def iris() -> nonconvex.IrisData:
    return nonconvex.iris_data(83)


def _members(rows: list[tuple[int, int, float, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["depth", "width", "l2", "seed"])


# ------------------------------------------------------------------------------------------ data and tables


def test_iris_data_is_the_papers_split(iris: nonconvex.IrisData) -> None:
    assert iris.x_train.shape == (149, 4) and iris.x_test.shape == (1, 4)
    assert 83 not in iris.idx_train.tolist() and iris.y_test.item() == 1  # index 83 is a versicolor
    torch.testing.assert_close(iris.x_train.mean(0), torch.zeros(4, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(iris.x_train.std(0, correction=0), torch.ones(4, dtype=F64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="test_index"):
        nonconvex.iris_data(150)


def test_reference_tables_recompute_the_papers_bars() -> None:
    # the paper's data are read by one module (helpers.paper_data), with one rule for sign, spread and NaN
    bars = paper_data.read_reference("iris")
    runs = paper_data.iris_runs()
    mine = runs.groupby(["sweep", "regime", "value"])["abs_spearman"].mean().reset_index()
    both = bars.merge(mine, on=["sweep", "regime", "value"])
    assert len(both) == len(bars) == 78  # 6 depth regimes × 8 + 5 width regimes × 6
    assert np.abs(both["mean_abs_spearman"] - both["abs_spearman"]).max() < 0.006  # printed to 2 decimals
    deep = paper_data.deep_run_summary(paper_data.deep_runs())
    deep = deep[deep.test_point == "max"]
    fc = deep[(deep.dataset == "mnist") & (deep.model == "fc128")]
    assert len(fc) == 49 and fc["abs_spearman"].mean() == pytest.approx(0.808, abs=5e-4)
    lenet = deep[(deep.dataset == "mnist") & (deep.model == "lenet")]
    assert lenet["drift"].mean() == pytest.approx(0.272, abs=5e-4)  # the drift column of epifano2023_deep.csv
    assert not hasattr(nonconvex, "read_reference") and not hasattr(nonconvex, "paper_deep_runs")


# ------------------------------------------------------------------------------------------ stacked networks


@pytest.mark.parametrize("bayesian", [False, True])
def test_stack_embeds_a_real_model_exactly(iris: nonconvex.IrisData, bayesian: bool) -> None:
    stack = stacked.Stack(4, 3, max_depth=3, max_width=6, bayesian=bayesian)
    real = stack.build(2, 4)
    p = init_params(real, 7)
    real = model_with(real, p)
    theta = stack.embed(p, 2, 4)
    dm, um, am = stack.masks(2, 4, F64)
    x, y = iris.train
    got = stack.forward(theta, x, dm, um)
    if bayesian:
        want = real(x, moments=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=0)
        kl = stack.kl(theta, am)
        torch.testing.assert_close(kl, models.bayesian_kl(real), atol=1e-12, rtol=0)
    else:
        torch.testing.assert_close(got, real(x), atol=1e-13, rtol=0)
    back = stack.extract(theta, 2, 4)
    assert set(back) == {n for n, _ in real.named_parameters()}
    for name, v in real.named_parameters():
        torch.testing.assert_close(back[name], v.detach(), atol=0, rtol=0)
    assert int(am.sum()) == sum(v.numel() for v in real.parameters())
    with pytest.raises(ValueError, match="does not fit"):
        stack.masks(4, 4)


def test_bayesian_stack_objective_is_the_models_loss(iris: nonconvex.IrisData) -> None:
    stack = stacked.Stack(4, 3, 2, 5, bayesian=True)
    real = stack.build(1, 3)
    p = init_params(real, 3)
    real = model_with(real, p)
    x, y = iris.train
    lw = models.balanced_loss_weights(real, x, y)
    dm, um, am = stack.masks(1, 3, F64)
    w = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=F64)
    aux = (w, torch.tensor(0.0, dtype=F64), dm, um, am, torch.tensor([lw["fit_weight"], lw["logdet_weight"],
                                                                       lw["kl_weight"]], dtype=F64))
    f = stacked.stack_objective(stack)
    got = f({"theta": stack.embed(p, 1, 3)}, aux, x, y, None, 1.0)
    want = models.bayesian_loss(real, x, y, **lw)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_stack_ensemble_trains_like_the_real_models_one_by_one(iris: nonconvex.IrisData) -> None:
    """Members of different depth, width and λ in one ensemble follow torch.optim's trajectory for each model."""
    x, y = iris.train
    stack = stacked.Stack(4, 3, 3, 6)
    members = _members([(1, 6, 0.0, 0), (3, 4, 0.005, 1), (2, 6, 0.01, 2)])
    recipe = Recipe(optimizer="adam", lr=1e-2, epochs=40, schedule="plateau", patience=5, swa_start=0.5,
                    dtype="float64")
    res = stacked.fit_stack(stack, members, x, y, recipe)
    for j, (d, w, lam, seed) in enumerate(members.itertuples(index=False)):
        real = stack.build(d, w)
        one = fit(recipe.replace(weight_decay=lam), real, x, y, init=init_params(real, seed), progress=False)
        got = stack.extract(res.theta[j], d, w)
        for name, v in one.params.items():
            torch.testing.assert_close(got[name], v, atol=1e-10, rtol=0)
        assert res.loss[j] == pytest.approx(one.loss, abs=1e-12)


def test_retrain_stack_is_helpers_warm_start(iris: nonconvex.IrisData) -> None:
    x, y = iris.train
    stack = stacked.Stack(4, 3, 2, 5)
    members = _members([(2, 5, 0.005, 0), (1, 5, 0.0, 1)])
    train_recipe = Recipe(optimizer="adam", lr=1e-2, epochs=60, schedule="plateau", dtype="float64")
    fitted = stacked.fit_stack(stack, members, x, y, train_recipe)
    removed = np.array([[3, 10, 40], [0, 5, 148]])
    re = Recipe(optimizer="adam", lr=1e-3, epochs=15, schedule="plateau", dtype="float64")
    got = stacked.retrain_stack(fitted, x, y, iris.test, removed, re, loo="reaverage")
    for j, (d, w, lam, _) in enumerate(members.itertuples(index=False)):
        real = stack.build(d, w)
        theta = stack.extract(fitted.theta[j], d, w)
        want = retrain.warm_start(real, theta, (x, y), iris.test, removed[j].tolist(), re.replace(weight_decay=lam),
                                  loo="reaverage", cache=False, progress=False)
        np.testing.assert_allclose(got.delta[j], want.delta[0], atol=1e-10, rtol=0)
        assert got.drift[j] == pytest.approx(want.drift[0], abs=1e-10)
        assert got.drift[j] != 0  # a fresh optimizer moves a model that is not at a minimum
        # the engine's one result type, one row per member: its test losses are the warm start's own
        np.testing.assert_allclose(got.test_losses[:, j], want.test_losses[:, 0], atol=1e-10, rtol=0)
    assert isinstance(got, retrain.GroundTruth) and got.protocol == "all_layers"
    np.testing.assert_array_equal(got.removed, removed)
    np.testing.assert_allclose(got.delta_minus_drift, got.delta - got.drift[:, None])
    assert got.floor_epoch.shape == got.grad_norm.shape == (2, 4)


def test_retrain_last_layer_is_warm_start_on_the_features(iris: nonconvex.IrisData) -> None:
    x, y = iris.train
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, x.shape[0], 4, generator=gen, dtype=F64)
    test_f = torch.randn(2, 4, generator=gen, dtype=F64)
    W, b = 0.5 * torch.randn(2, 3, 4, generator=gen, dtype=F64), 0.1 * torch.randn(2, 3, generator=gen, dtype=F64)
    removed = np.array([[1, 2, 3], [7, 8, 9]])
    lam = [0.01, 0.0]
    for re in (Recipe(optimizer="adam", lr=1e-2, epochs=20, schedule="plateau", dtype="float64"),
               Recipe(optimizer="adam", lr=1e-2, epochs=4, batch_size=40, seed=3, dtype="float64")):
        _check_last_layer(feats, y, W, b, lam, test_f, removed, re)
    with pytest.raises(ValueError, match="weight_decay"):
        stacked.retrain_last_layer(feats, y, W, b, lam, test_f, torch.tensor([1, 2]), removed,
                                  Recipe(weight_decay=0.1))


def _check_last_layer(feats, y, W, b, lam, test_f, removed, re) -> None:
    got = stacked.retrain_last_layer(feats, y, W, b, lam, test_f, torch.tensor([1, 2]), removed, re, loo="drop",
                                    max_elements=1)  # one model per ensemble: the chunking path too
    for j in range(2):
        lr_model = models.logistic_regression(4, 3, bias=True, dtype=F64)
        want = retrain.warm_start(lr_model, {"linear.weight": W[j], "linear.bias": b[j]}, (feats[j], y),
                                  (test_f[j:j + 1], torch.tensor([1 + j])), removed[j].tolist(),
                                  re.replace(weight_decay=lam[j]), loo="drop", cache=False, progress=False)
        np.testing.assert_allclose(got.delta[j], want.delta[0], atol=1e-11, rtol=0)
        assert got.drift[j] == pytest.approx(want.drift[0], abs=1e-11)


# ------------------------------------------------------------------------------------------ influence and curvature


def _trained_mlp(iris: nonconvex.IrisData, width: int = 5) -> torch.nn.Module:
    real = models.build("mlp", d_in=4, n_classes=3, depth=1, width=width, seed=0, dtype=F64)
    r = fit(Recipe(optimizer="adam", lr=1e-2, epochs=150, weight_decay=0.005, dtype="float64"), real, *iris.train,
            progress=False)
    return model_with(real, r.params)


def test_last_layer_influence_from_features_is_the_networks_last_layer_influence(iris: nonconvex.IrisData) -> None:
    real = _trained_mlp(iris)
    x, y = iris.train
    want = predict_removal(real, (x, y), iris.test, params="last", l2=0.005, method="exact").values
    body = real.net[:-1]
    with torch.no_grad():
        phi, phi_t = body(x), body(iris.x_test)
    last = real.last_layer
    got, info = stacked.last_layer_influence(phi, y, phi_t, iris.y_test, last.weight, last.bias, l2=0.005,
                                            method="exact")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)


def test_batched_last_layer_influence_matches_predict_removal(iris: nonconvex.IrisData) -> None:
    gen = torch.Generator().manual_seed(1)
    k, n, f = 3, iris.x_train.shape[0], 5
    feats = torch.randn(k, n, f, generator=gen, dtype=F64)
    tfeats = torch.randn(k, 2, f, generator=gen, dtype=F64)
    W, b = torch.randn(k, 3, f, generator=gen, dtype=F64), torch.randn(k, 3, generator=gen, dtype=F64)
    ty = torch.tensor([0, 2])
    lam = [0.0, 0.005, 0.1]
    for kw, expected_zero in ((dict(include_bias=False, include_l2=False), [f, f, f]),
                              (dict(include_bias=True, include_l2=True), [f + 1, 0, 0])):
        got, info = stacked.batched_last_layer_influence(feats, iris.y_train, tfeats, ty, W, b, lam, **kw)
        # the paper's Hessian (W only, no L2) has an exactly f-dimensional null space: W -> W + 1 vᵀ
        assert info["n_zero"].tolist() == expected_zero
        for j in range(k):
            want, _ = stacked.last_layer_influence(feats[j], iris.y_train, tfeats[j], ty, W[j], b[j], l2=lam[j],
                                                  method="pinv", **kw)
            torch.testing.assert_close(got[j], want, atol=1e-12, rtol=1e-8)


def test_stack_hessian_spectra_match_the_per_model_spectrum(iris: nonconvex.IrisData) -> None:
    x, y = iris.train
    for bayesian in (False, True):
        stack = stacked.Stack(4, 3, 2, 4, bayesian=bayesian)
        members = _members([(2, 4, 0.005, 0), (1, 3, 0.0, 1), (2, 4, 0.005, 2)])
        theta = torch.stack([stack.embed(init_params(stack.build(d, w), s), d, w)
                             for d, w, _, s in members.itertuples(index=False)])
        got = stacked.stack_hessian_spectra(stack, theta, x, y, members)
        for j, (d, w, lam, _) in enumerate(members.itertuples(index=False)):
            real = model_with(stack.build(d, w), stack.extract(theta[j], d, w))
            want = stacked.hessian_spectrum(real, x, y, l2=0.0 if bayesian else lam, bayesian=bayesian)
            for key in ("top", "bottom", "top_no_l2", "neg_share", "dim"):
                assert got.loc[j, key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (bayesian, key)
    # and the dense spectrum agrees with Lanczos
    real = _trained_mlp(iris)
    dense = stacked.hessian_spectrum(real, x, y, l2=0.005)
    lz = stacked.lanczos_check(real, x, y, l2=0.005)
    assert lz["top"] == pytest.approx(dense["top"], rel=1e-8)
    assert lz["bottom"] == pytest.approx(dense["bottom"], rel=1e-6, abs=1e-9)
    assert dense["top_no_l2"] == pytest.approx(dense["top"] - 0.005, abs=1e-14)


def test_bnn_influence_uses_the_likelihood_hessian_with_damping(iris: nonconvex.IrisData) -> None:
    x, y = iris.train
    real = models.build("bayesian_mlp", d_in=4, n_classes=3, depth=1, width=3, seed=0, dtype=F64)
    got, info = stacked.bnn_last_layer_influence(real, x, y, iris.x_test, iris.y_test, damping=1e-3)
    assert got.shape == (1, x.shape[0]) and torch.isfinite(got).all()
    # brute force: dense Hessian of the mean NLL in the flat last-layer mean weights, by double autograd
    w = real.layers[-1].mean.weight.detach().clone().requires_grad_(True)

    def nll(xb, yb):
        return models.bayesian_per_sample_nll(real, {"layers.1.mean.weight": w}, xb, yb)

    g = torch.stack([torch.autograd.grad(nll(x[i:i + 1], y[i:i + 1])[0], w)[0].reshape(-1) for i in range(5)])
    gt = torch.autograd.grad(nll(iris.x_test, iris.y_test)[0], w)[0].reshape(-1)
    gm = torch.autograd.grad(nll(x, y).mean(), w, create_graph=True)[0].reshape(-1)
    H = torch.stack([torch.autograd.grad(gm[i], w, retain_graph=True)[0].reshape(-1) for i in range(gm.numel())])
    want = g @ torch.linalg.solve(0.5 * (H + H.T) + 1e-3 * torch.eye(9, dtype=F64), gt) / x.shape[0]
    torch.testing.assert_close(got[0, :5], want, atol=1e-10, rtol=1e-7)


# ------------------------------------------------------------------------------------------ end to end


def test_iris_loo_losses_one_ensemble() -> None:
    t = nonconvex.iris_loo_losses([0], epochs=5, cache=False)
    assert len(t) == 150 and set(t["index"]) == set(range(150)) and np.isfinite(t["loss"]).all()


def test_run_iris_group_tiny_end_to_end() -> None:
    cfg = nonconvex.IrisSweepConfig(depths=(1, 2), widths=(8,), depth_regimes=("nol2", "l2"), width_regimes=("bnn",),
                                 last_layer_regimes=("l2",), reps=2, epochs=30, retrain_epochs=5, n_candidates=5,
                                 dtype="float64")
    r = nonconvex.run_iris_sweeps(cfg, cache=False)
    combos = r.runs.groupby(["sweep", "regime", "protocol", "estimator"]).size()
    assert combos[("depth", "l2", "all_layers", "paper")] == 4 and combos[("depth", "l2", "last_layer", "objective")] == 4
    assert ("depth", "nol2", "last_layer", "paper") not in combos and combos[("width", "bnn", "all_layers", "bnn")] == 2
    assert np.isfinite(r.runs[["drift", "delta_sd"]].to_numpy()).all()
    assert r.runs["spearman"].between(-1, 1).all()
    assert len(r.models) == 10 and (r.models["dim"] > 0).all() and len(r.points) == 5 * (4 + 4 + 4 + 2)
    assert set(r.history["sweep"]) == {"depth", "width"} and len(r.lanczos) == 1
    summary = nonconvex.summarize_runs(r.runs, ["sweep", "regime", "value", "protocol", "estimator"], n_resamples=200)
    assert (summary["abs_spearman_low"] <= summary["abs_spearman"]).all()
    assert (summary["abs_spearman"] <= summary["abs_spearman_high"] + 1e-12).all()
    with pytest.raises(ValueError, match="unknown regimes"):
        nonconvex.IrisSweepConfig(depth_regimes=("l3",))


def test_summarize_runs_shows_few_runs_as_runs_and_many_with_a_bootstrap_interval() -> None:
    rng = np.random.default_rng(0)
    few = pd.DataFrame({"g": "few", "spearman": [0.2, 0.5, 0.9], "pearson": [0.1, 0.4, 0.8]})
    many = pd.DataFrame({"g": "many", "spearman": rng.uniform(0.3, 0.7, 40), "pearson": rng.uniform(0.3, 0.7, 40)})
    s = nonconvex.summarize_runs(pd.concat([few, many]), ["g"], extra=(), n_resamples=500).set_index("g")
    # three runs: the whisker is their range and the runs are listed, never a bootstrap over 10 distinct resamples
    assert (s.loc["few", "spearman_low"], s.loc["few", "spearman_high"]) == (0.2, 0.9)
    assert [float(v) for v in s.loc["few", "spearman_runs"].split(";")] == [0.2, 0.5, 0.9]
    assert s.loc["few", "spearman_interval"] == "runs" and s.loc["many", "spearman_interval"] == "bootstrap 95%"
    assert s.loc["many", "spearman_high"] - s.loc["many", "spearman_low"] < 0.2 and pd.isna(s.loc["many", "spearman_runs"])
    fig, ax = plt.subplots()
    plots.paired_bars(ax, s.reset_index(), "g", [("book", "spearman", "C0")])
    assert len(ax.collections) >= 2  # the whiskers and the dots of the three runs
    plt.close(fig)


def test_compare_bars_flags_separate_intervals() -> None:
    paper = pd.DataFrame({"v": [1, 2], "n": [50, 50], "abs_spearman": [0.7, 0.5], "abs_spearman_low": [0.65, 0.45],
                          "abs_spearman_high": [0.75, 0.55]})
    book = pd.DataFrame({"v": [1, 2], "n": [10, 10], "abs_spearman": [0.72, 0.2], "abs_spearman_low": [0.6, 0.1],
                         "abs_spearman_high": [0.8, 0.3]})
    c = nonconvex.compare_bars(book, paper, ["v"], columns=("abs_spearman",))
    assert c["separate_abs_spearman"].tolist() == [False, True]
    assert c["diff_abs_spearman"].tolist() == pytest.approx([0.02, -0.3])


def test_run_deep_on_a_tiny_torchvision_folder(tmp_path) -> None:
    """The paper-profile path: a local torchvision MNIST folder, a convolutional net, LiSSA, all-parameter CG."""
    from helpers.data import write_fake_torchvision_mnist

    write_fake_torchvision_mnist(tmp_path, n_train=40, n_test=10)
    cfg = nonconvex.DeepConfig(dataset="mnist", model="vgg_tiny", n_train=30, n_test=10, reps=2, epochs=3,
                            finetune_epochs=3, n_top=6, lissa_depth=20, all_params=True, all_params_epochs=2,
                            cg_maxiter=5, root=str(tmp_path))
    r = nonconvex.run_deep(cfg, cache=False)
    assert set(r.runs["estimator"]) == {"exact", "lissa", "all_params_cg"}
    assert len(r.runs) == 6 and len(r.points) == 2 * 6 * 2
    assert np.isfinite(r.runs["drift"]).all() and (r.models["test_loss"] > 0).all()
    assert r.history.shape == (2, 3)
    # VGG13 needs 32 pixels: MNIST's 28 are padded (the paper profile's setting)
    vgg = nonconvex._deep_model(nonconvex.DeepConfig(model="vgg13"), (1, 32, 32), 10)
    split = nonconvex._deep_data(nonconvex.DeepConfig(dataset="mnist", model="vgg13", pad_to=32, n_train=4, n_test=2,
                                                root=str(tmp_path)))
    assert split.x_train.shape[1:] == (1, 32, 32)
    with torch.no_grad():
        assert vgg(split.x_train[:2]).shape == (2, 10)
    with pytest.raises(FileNotFoundError):
        nonconvex.run_deep(nonconvex.DeepConfig(dataset="cifar10", model="vgg13", root=str(tmp_path / "none")), cache=False)


def test_paper_inverse_reproduces_the_singular_float32_inverse(iris: nonconvex.IrisData) -> None:
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(2, iris.x_train.shape[0], 4, generator=gen, dtype=F64)
    W, b = torch.randn(2, 3, 4, generator=gen, dtype=F64), torch.randn(2, 3, generator=gen, dtype=F64)
    feats[1] = 0.0  # zero features: H = 0, an exactly zero pivot, reported as NaN rather than returned
    vals, lu = stacked.paper_inverse_influence(feats, iris.y_train, feats[:, :1], iris.y_train[:1], W, b)
    assert vals.shape == (2, 1, iris.x_train.shape[0]) and vals.dtype == F64
    assert lu[1] != 0 and torch.isnan(vals[1]).all() and torch.isfinite(vals[0]).all()
    # the float32 inverse of the singular Hessian is not the pseudo-inverse: it blows up the null space
    pinv, info = stacked.batched_last_layer_influence(feats[:1], iris.y_train, feats[:1, :1], iris.y_train[:1],
                                                     W[:1], b[:1], [0.0], include_bias=False, include_l2=False)
    assert info["n_zero"].item() == 4
    assert not torch.allclose(vals[0], pinv[0], rtol=1e-3, atol=0)


def test_paired_bars_draws_every_available_bar() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame({"v": [1, 2, 3], "a": [0.5, 0.6, float("nan")], "a_low": [0.4, 0.5, float("nan")],
                          "a_high": [0.6, 0.7, float("nan")], "b": [0.1, 0.2, 0.3], "b_low": [0.0, 0.1, 0.2],
                          "b_high": [0.2, 0.3, 0.4]})
    fig, ax = plt.subplots()
    plots.paired_bars(ax, frame, "v", [("A", "a", "C0"), ("B", "b", "C1")])
    assert len(ax.patches) == 5  # the missing bar leaves a gap
    with pytest.raises(KeyError, match="lacks"):
        plots.paired_bars(ax, frame, "v", [("C", "c", "C2")])
    plt.close(fig)


def test_deep_models_use_a_gpu_when_one_is_there(monkeypatch) -> None:
    """`device="auto"` (the default, so the paper profile's image models) picks CUDA whenever torch sees it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert nonconvex.DeepConfig(dataset="mnist5k", model="fc16").torch_device == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert nonconvex.DeepConfig(dataset="mnist5k", model="fc16").torch_device == torch.device("cpu")
    assert nonconvex.DeepConfig(dataset="mnist5k", model="fc16", device="cpu").torch_device.type == "cpu"


# ------------------------------------------------------------------------------------------ dispatch of the sweeps

TINY = dict(depths=(1, 2), widths=(8,), depth_regimes=("nol2", "l2", "l2_swa"), width_regimes=("l2",),
            last_layer_regimes=("l2",), reps=2, epochs=40, retrain_epochs=8, n_candidates=4, dtype="float64")


def test_iris_sweeps_on_a_two_worker_local_cluster_equal_the_serial_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweeps' own entry point, chunked by repetition, gives the same tables serially and on Dask."""
    from helpers import dispatch

    distributed = pytest.importorskip("dask.distributed", reason="install the dev extra (dask[distributed])")
    monkeypatch.delenv(dispatch.SCHEDULER_ENV, raising=False)
    cfg = nonconvex.IrisSweepConfig(**TINY)
    assert len(cfg.chunks(1)) == 3 * 2  # (depth plain 1, 2 with their SWA twins, width plain 8) × 2 blocks of one rep
    seen: list[dict] = []
    serial = nonconvex.run_iris_sweeps(cfg, block=1, cache=False, on_result=lambda t, r: seen.append(t))
    assert sorted(map(str, seen)) == sorted(map(str, cfg.chunks(1)))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        on_cluster = nonconvex.run_iris_sweeps(cfg, block=1, cache=False, scheduler=c.scheduler_address)
    for name in ("runs", "models", "points"):
        pd.testing.assert_frame_equal(getattr(serial, name), getattr(on_cluster, name))
    # the chunking does not change a member's numbers either (the stack is the config's in every chunk)
    whole = nonconvex.run_iris_sweeps(cfg, block=2, cache=False)
    keys = ["sweep", "regime", "value", "rep", "protocol", "estimator"]
    a, b = (r.runs.sort_values(keys).reset_index(drop=True) for r in (serial, whole))
    np.testing.assert_allclose(a["delta_mean"], b["delta_mean"], rtol=1e-9, atol=1e-12)
    skipped = nonconvex.run_iris_sweeps(cfg, block=1, cache=False, skip=lambda t: t["sweep"] == "depth")
    assert set(skipped.runs["sweep"]) == {"width"}


def test_floor_stop_records_floor_epochs_and_bounds() -> None:
    """Every model and retraining records when its lr reached the floor, and the bound on what was skipped."""
    cfg = nonconvex.IrisSweepConfig(**{**TINY, "epochs": 1500, "retrain_epochs": 600, "reps": 1, "lr": 0.05,
                                    "patience": 5, "depth_regimes": ("l2",), "width_regimes": ()})
    r = nonconvex.run_iris_sweeps(cfg, cache=False)
    m = r.models
    assert (m["floor_epoch"] > 0).all() and (m["epochs_run"] == m["floor_epoch"]).all()
    assert (m["epochs_run"] < 1500).all() and np.isclose(m["final_lr"], 0.05e-7).all()
    assert (m["floor_bound_param"] > 0).all() and (m["floor_bound_nats"] > 0).all()
    assert (r.runs["retrain_epochs_run_max"] <= 600).all() and "retrain_floor_median" in r.runs


def test_swa_twins_share_their_trajectory_and_equal_a_separate_run() -> None:
    """An SWA regime trained beside its plain twin (one shared trajectory, the average tracked) gives the same
    numbers as the SWA regime run on its own; with the floor before averaging begins, SWA changes nothing."""
    base = {**TINY, "epochs": 1500, "retrain_epochs": 600, "reps": 1, "lr": 0.05, "patience": 5, "depths": (1,),
            "width_regimes": (), "last_layer_regimes": ()}
    both = nonconvex.run_iris_sweeps(nonconvex.IrisSweepConfig(**{**base, "depth_regimes": ("l2", "l2_swa")}), cache=False)
    alone = nonconvex.run_iris_sweeps(nonconvex.IrisSweepConfig(**{**base, "depth_regimes": ("l2_swa",)}), cache=False)
    a = both.runs[both.runs.regime == "l2_swa"].reset_index(drop=True)
    b = alone.runs.reset_index(drop=True)
    for col in ("spearman", "delta_mean", "drift", "retrain_floor_max"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-10, atol=1e-14)
    plain = both.runs[both.runs.regime == "l2"].reset_index(drop=True)
    assert (both.models["floor_epoch"] < 0.75 * 1500).all()  # the floor came before the average began
    np.testing.assert_allclose(plain["delta_mean"], a["delta_mean"], rtol=1e-12)


def test_floor_table_and_full_length_check() -> None:
    """The floor, measured per setting, and floor termination against the full run: the truths barely move."""
    cfg = nonconvex.IrisSweepConfig(**{**TINY, "epochs": 1500, "retrain_epochs": 600, "reps": 1, "lr": 0.05,
                                    "patience": 5, "depth_regimes": ("nol2", "l2"), "width_regimes": ()})
    result = nonconvex.run_iris_sweeps(cfg, cache=False, full_check={"sweep": "depth", "values": [1], "regimes": ["l2"]})
    table = nonconvex.floor_table(result)
    l2 = table[table.regime == "l2"]
    assert len(table) == 4 and (l2["train_floor_median"] > 0).all() and (l2["train_no_floor"] == 0).all()
    assert (table["train_floor_median"].isna() == (table["train_no_floor"] == table["n"])).all()
    assert {"all_layers_floor_median", "last_layer_floor_max", "bound_nats_max"} <= set(table.columns)
    check = nonconvex.full_length_check(cfg, "depth", [1], ["l2"], cache=False)
    pd.testing.assert_frame_equal(check, result.full_check)  # dispatched with the chunks or on its own: the same
    assert set(check["protocol"]) == {"all_layers", "last_layer"} and (check["floor_epoch"] < 1500).all()
    # the floor-stopped θ̂ is within its first-order bound of the full run's, and the truths agree closely
    assert (check["test_loss_diff"].abs() <= check["floor_bound_nats"]).all()
    assert (check["delta_max_abs_diff"] < 1e-3).all() and (check["spearman_diff"].abs() < 0.5).all()
    curve = nonconvex.member_retraining_curve(cfg, 1, "l2", 0, [5, 50], cache=False)
    assert len(curve) == 2 * 4 and set(curve["epochs"]) == {5, 50} and np.isfinite(curve["est_paper"]).all()


def test_regime_gap_counts_disjoint_settings_and_says_which_side():
    df = pd.DataFrame({"sweep": ["depth", "depth", "width"], "regime": ["bnn", "bnn", "l2"], "value": [1, 2, 8],
                       "book_abs_spearman": [0.16, 0.5, 0.9], "book_abs_spearman_low": [0.1, 0.4, 0.85],
                       "book_abs_spearman_high": [0.2, 0.6, 0.95], "paper_abs_spearman": [0.76, 0.55, 0.7],
                       "paper_abs_spearman_low": [0.7, 0.5, 0.6], "paper_abs_spearman_high": [0.8, 0.6, 0.8]})
    df["separate_abs_spearman"] = [True, False, True]
    gap = nonconvex.regime_gap(df, "bnn")
    assert (gap["n"], gap["n_separate"], gap["n_below"]) == (2, 1, 1)
    assert gap["text"].startswith("depth 1: 0.16 (0.10–0.20) against 0.76 (0.70–0.80); depth 2: 0.50")
    assert nonconvex.regime_gap(df, "l2")["n_below"] == 0  # disjoint, but the book above
    assert nonconvex.regime_gap(df, "nol2")["n"] == 0
    with pytest.raises(ValueError, match="compare_bars"):
        nonconvex.regime_gap(df.drop(columns="separate_abs_spearman"), "bnn")


# ---------------------------------------------------------------- the chapter's section functions (book/nonconvex.ipynb)


def _paper_runs_as_book_runs(paper_runs: pd.DataFrame) -> pd.DataFrame:
    """The paper's published Iris runs dressed as the book's: all-layer runs with the paper's estimator, and its
    ``l2_toplayer`` runs as the last-layer protocol of ``l2`` (no drift: the paper did not measure it)."""
    main = paper_runs[paper_runs.regime != "l2_toplayer"].assign(protocol="all_layers", estimator="paper")
    top = paper_runs[paper_runs.regime == "l2_toplayer"].assign(regime="l2", protocol="last_layer", estimator="paper")
    return pd.concat([main, top], ignore_index=True).assign(drift=0.0, drift_ratio=0.0)


def _records(folder) -> dict:
    import json

    return json.loads((folder / "records.json").read_text())


def test_fig1_section_of_the_papers_own_runs_matches_the_paper_everywhere(tmp_path, monkeypatch) -> None:
    """Fed the paper's runs as the book's, the Fig. 1 section finds every bar equal to the paper's (no disjoint
    interval, same shares of negative ρ), rebuilds ``l2_toplayer`` from the last-layer protocol and draws both
    figures; its records say the same."""
    from types import SimpleNamespace

    monkeypatch.setenv("BOOK_OUTPUT_DIR", str(tmp_path))
    paper_runs = paper_data.iris_runs()
    runs = _paper_runs_as_book_runs(paper_runs)
    stored = SimpleNamespace(runs=pd.DataFrame(), models=pd.DataFrame())
    out = nonconvex.fig1_section(runs, stored, depths=[1, 8], widths=[8, 50], n_bootstrap=50, seed=0)
    comparison = out["comparison"]
    assert "l2_toplayer" in set(comparison.regime) and len(comparison) == len(paper_runs.groupby(["sweep", "regime",
                                                                                                   "value"]))
    assert np.allclose(comparison["diff_abs_spearman"], 0) and not comparison["separate_abs_spearman"].any()
    for name in ("fig1_abs_fig", "fig1_signed_fig"):
        assert isinstance(out[name], plt.Figure)
        plt.close(out[name])
    nonconvex.fig1_records(comparison, runs, out["paper_runs"], depths=[1, 8])
    rec = _records(tmp_path)
    assert rec["n_separate_abs"] == 0 and rec["n_compared"] == len(comparison)
    assert rec["l2_shallow_abs"] == pytest.approx(rec["paper_l2_shallow_abs"])
    assert rec["l2_deep_signed_low"] == pytest.approx(rec["paper_l2_deep_signed_low"])
    assert (tmp_path / "data" / "fig1_bars.csv").exists() and (tmp_path / "data" / "fig1_comparison.csv").exists()


def test_anova_section_gives_the_same_tests_for_the_same_runs(tmp_path, monkeypatch) -> None:
    """The book's and the paper's one-way tests come from one function: the same runs on both sides give the same
    p-values and effect sizes, and the table holds every (source, sweep, regime, column)."""
    monkeypatch.setenv("BOOK_OUTPUT_DIR", str(tmp_path))
    paper_runs = paper_data.iris_runs()
    table = nonconvex.anova_section(paper_runs.assign(protocol="all_layers", estimator="paper"), paper_runs)
    n_cases = len(paper_runs.groupby(["sweep", "regime"]))
    assert len(table) == 2 * 2 * n_cases and set(table.source) == {"paper", "book"}
    rec = _records(tmp_path)
    for name in ("anova_p", "eta", "kw_p", "eps"):
        assert rec[f"book_{name}"] == pytest.approx(rec[f"paper_{name}"])
    assert rec["paper_n_tests"] == 2 * n_cases and 0 <= rec["paper_signed_sig"] <= rec["paper_signed_cases"]


def test_drift_and_pearson_sections_record_shares_and_draw(tmp_path, monkeypatch) -> None:
    """The drift section's share of runs whose drift exceeds the spread is the plain share (a family without
    runs is recorded as not run), and the Pearson section's gap is Spearman minus Pearson; both return figures."""
    from helpers import book

    monkeypatch.setenv("BOOK_OUTPUT_DIR", str(tmp_path))
    rng = np.random.default_rng(0)
    rows = [{"sweep": "depth", "regime": reg, "value": v, "rep": r, "protocol": proto, "estimator": "paper"}
            for reg in ("l2", "nol2") for v in (1, 2) for r in range(6) for proto in ("all_layers", "last_layer")]
    runs = pd.DataFrame(rows).assign(spearman=rng.uniform(-1, 1, len(rows)), pearson=rng.uniform(-1, 1, len(rows)),
                                     drift=rng.normal(size=len(rows)), delta_sd=rng.uniform(0.5, 1.5, len(rows)))
    runs["drift_ratio"] = runs["drift"].abs() / runs["delta_sd"]
    fig = nonconvex.drift_section(runs, n_bootstrap=50, seed=0)
    assert fig.axes[0].get_yscale() == "log"
    plt.close(fig)
    rec = _records(tmp_path)
    alll = runs[runs.protocol == "all_layers"]
    assert rec["drift_exceeds_all"] == pytest.approx((alll["drift"].abs() > alll["delta_sd"]).mean())
    assert rec["drift_ratio_all_median"] == pytest.approx(alll["drift_ratio"].median())
    assert rec["drift_exceeds_all_bnn"] == book.NOT_RUN
    fig = nonconvex.pearson_section(runs, paper_data.iris_runs(), n_bootstrap=50, seed=0)
    plt.close(fig)
    rec = _records(tmp_path)
    book_all = alll.dropna()
    assert rec["book_gap"] == pytest.approx((book_all["spearman"] - book_all["pearson"]).mean())
