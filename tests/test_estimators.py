"""Every chapter-4 estimator converted to the book's convention, checked on convex cases against exact influence.

The convex case that makes the checks exact: linear least squares with one output (``loss="mse"``, ½(xᵀθ − y)²),
where the Hessian of the mean loss is XᵀX/n, the Gauss–Newton matrix equals it, and K-FAC's single Kronecker
factor is it. With an orthonormal design (XᵀX/n = I) and λ + δ = s, (H + δI)⁻¹ = I/(1 + s), so gradient
similarity and TracIn at θ̂ are exact influence up to that factor. TRAK with an invertible square projection and
λ = δ = 0 is exact influence for any design. A sign, 1/n or orientation slip fails each check by a factor of −1,
n or a transpose.
"""

from __future__ import annotations

import pytest
import torch

from helpers import estimators, models
from helpers.influence import predict_removal
from helpers.objective import model_params

F64 = torch.float64
N, D = 40, 6


def _regression(orthonormal: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=F64)
    if orthonormal:
        x = torch.linalg.qr(x).Q * N ** 0.5  # XᵀX/n = I
    model = models.build("logistic_regression", d_in=D, n_classes=1, dtype=F64)
    with torch.no_grad():
        model.linear.weight.copy_(torch.randn(1, D, generator=g, dtype=F64))
    y = x @ torch.randn(D, 1, generator=g, dtype=F64) + 0.3 * torch.randn(N, 1, generator=g, dtype=F64)
    xt = torch.randn(5, D, generator=g, dtype=F64)
    yt = torch.randn(5, 1, generator=g, dtype=F64)
    return model, (x, y), (xt, yt)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    assert a.shape == b.shape == (5, N)
    err = float((a - b).norm() / b.norm())
    assert err <= tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_gradient_similarity_and_tracin_are_exact_when_h_is_the_identity(shift):
    model, train, test = _regression(orthonormal=True)
    exact = predict_removal(model, train, test, l2=shift, loss="mse", backend="autodiff").values
    _close(estimators.gradient_similarity(model, train, test, loss="mse") / (1 + shift), exact)
    theta = model_params(model)
    _close(estimators.tracin(model, train, test, [theta], [1 / (1 + shift)], loss="mse"), exact)
    # two checkpoints at θ̂ with rates summing to the same total give the same answer
    _close(estimators.tracin(model, train, test, [theta, theta], [0.25 / (1 + shift), 0.75 / (1 + shift)],
                             loss="mse"), exact)


def test_trak_is_exact_influence_for_least_squares_with_a_square_projection():
    model, train, test = _regression(orthonormal=False)
    exact = predict_removal(model, train, test, l2=0.0, loss="mse", backend="autodiff").values
    for seed in (0, 1):
        _close(estimators.trak(model, train, test, proj_dim=D, seed=seed, loss="mse"), exact, 1e-8)
    # a projection to fewer dimensions is an approximation, not the same numbers
    low = estimators.trak(model, train, test, proj_dim=2, loss="mse")
    assert float((low - exact).norm() / exact.norm()) > 1e-3


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kfac_and_ekfac_are_exact_for_least_squares(kind):
    model, train, test = _regression(orthonormal=False)
    exact = predict_removal(model, train, test, l2=0.1, damping=0.05, loss="mse", backend="autodiff").values
    _close(predict_removal(model, train, test, l2=0.1, damping=0.05, loss="mse", hessian=kind).values, exact)


def test_lissa_and_arnoldi_converge_to_exact_influence():
    model, train, test = _regression(orthonormal=False)
    exact = predict_removal(model, train, test, l2=0.1, loss="mse", backend="autodiff").values
    _close(predict_removal(model, train, test, l2=0.1, loss="mse", method="arnoldi", rank=D, krylov_dim=D).values,
           exact, 1e-8)
    _close(predict_removal(model, train, test, l2=0.1, loss="mse", method="lissa", depth=3000).values, exact, 1e-6)


def test_trak_output_gradients_factor_the_loss_gradient_for_cross_entropy():
    """∇ℓ = Q ∇f exactly for the margin f = log p_y − log(1 − p_y) and Q = −(1 − p_y): TRAK's sign convention."""
    from helpers.influence import per_sample_grads

    model = models.build("mlp", d_in=4, n_classes=3, depth=1, width=5, activation="tanh", seed=0, dtype=F64)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, 4, generator=g, dtype=F64), torch.randint(0, 3, (9,), generator=g)
    P = model_params(model)
    G, Q = estimators.output_gradients(model, P, x, y)
    assert bool((Q < 0).all() and (Q > -1).all())
    assert torch.allclose(Q[:, None] * G, per_sample_grads(model, P, x, y), atol=1e-14)


def test_refusals():
    model, train, test = _regression(orthonormal=False)
    with pytest.raises(ValueError, match="one learning rate per checkpoint"):
        estimators.tracin(model, train, test, [model_params(model)], [0.1, 0.2], loss="mse")
    with pytest.raises(ValueError, match="proj_dim < n or damping > 0"):
        estimators.trak(model, train, test, proj_dim=N + 5, loss="mse")
    with pytest.raises(ValueError, match="positive integer"):
        estimators.trak(model, train, test, proj_dim=0, loss="mse")


def test_published_lds_comparison_maps_the_book_to_dattri() -> None:
    """Chapter 4's table of dattri's published MNIST-10 numbers beside the book's (book/data/published_lds.csv,
    transcribed from dattri's bar chart; provenance in published_lds.md)."""
    import pandas as pd

    from helpers.experiments import estimators as E

    pub = pd.read_csv(E.PUBLISHED_LDS)
    assert (E.PUBLISHED_LDS.parent / "published_lds.md").exists()
    assert set(pub.target) == {"LOO", "LDS"} and pub.value.between(0, 1).all()
    assert set(E.PUBLISHED_METHODS.values()) <= set(pub.method)
    rows = [dict(model=m, estimator=e, target=t, value=0.1 * i, low=0.1 * i - 0.05, high=0.1 * i + 0.05)
            for m in E.MODEL_NAMES.values() for i, e in enumerate(E.ESTIMATORS) for t in E.TARGETS]
    table, text = E.published_comparison(pd.DataFrame(rows), [0.5, 0.9])
    assert len(table) == 2 * len(E.PUBLISHED_METHODS)  # the convex control and the MLP; no CNN in dattri
    row = table.loc[("softmax regression (convex) / logistic regression", "exact (CG) / CG")]
    assert row["LDS: dattri"] == "0.80" and row["LOO: dattri"] == "0.88"
    assert row["LDS α = 0.5: book [95% CI]"] == "0.00 [-0.05, 0.05]"
    # the book's first among the methods in common: the highest value (grad. similarity is last in ESTIMATORS)
    assert "the book ranks grad. similarity first (0.90), dattri CG (0.80)" in text
    empty, none = E.published_comparison(pd.DataFrame(rows).query("model == 'small CNN'"), [0.5, 0.9])
    assert empty.empty and "none of the two models" in none


# ----------------------------------------------------------------------------------------------------------
# The chapter's own calls (helpers.experiments.estimators.estimator_calls), every estimator by name
# ----------------------------------------------------------------------------------------------------------

L2, DAMPING = 0.1, 0.05


def _fitted(orthonormal: bool, l2: float, lr: float = 1.0):
    """A least-squares θ̂ wrapped as the chapter's ``Fitted`` (recipe: mse, λ = ``l2``; one checkpoint at θ̂ with
    learning rate ``lr``)."""
    from helpers.experiments.estimators import Fitted
    from helpers.train import Recipe

    model, train, test = _regression(orthonormal=orthonormal)
    return Fitted(key="least_squares", seed=0, model=model, recipe=Recipe(loss="mse", weight_decay=l2), train=train,
                  test=test, checkpoints=[model_params(model)], checkpoint_lrs=[lr], grad_norm=float("nan"),
                  acc_test=float("nan"))


def _chapter_call(name: str, f, *, damping: float, proj_dim: int = 2) -> torch.Tensor:
    from helpers.experiments.estimators import estimator_calls

    calls = estimator_calls(f, damping=damping, lissa_depth=3000, arnoldi_rank=f.n_params,
                            trak_dims=[proj_dim, proj_dim], cg_rtol=1e-13)
    return torch.as_tensor(calls[name]())


def _exact(f, damping: float) -> torch.Tensor:
    return predict_removal(f.model, f.train, f.test, l2=f.recipe.weight_decay, damping=damping, loss="mse",
                           backend="autodiff").values


def _case_hessian_based(name: str):
    # exact by construction: the Hessian of least squares is its Gauss–Newton matrix and K-FAC's one factor
    f = _fitted(orthonormal=False, l2=L2)
    tol = {"LiSSA": 1e-6, "Arnoldi": 1e-8}.get(name, 1e-10)
    return _chapter_call(name, f, damping=DAMPING), _exact(f, DAMPING), tol


def _case_trak(name: str):
    # exact with an invertible square projection and no damping (module docstring)
    f = _fitted(orthonormal=False, l2=0.0)
    return _chapter_call(name, f, damping=0.0, proj_dim=f.n_params), _exact(f, 0.0), 1e-8


def _case_identity(name: str):
    # XᵀX/n = I: (H + (λ + δ)I)⁻¹ = I/(1 + λ + δ); TracIn's one checkpoint at θ̂ carries that factor as its rate,
    # gradient similarity (η = 1) is divided by it here
    scale = 1 + L2 + DAMPING
    f = _fitted(orthonormal=True, l2=L2, lr=1 / scale)
    got = _chapter_call(name, f, damping=DAMPING)
    return (got / scale if name == "grad. similarity" else got), _exact(f, DAMPING), 1e-10


CHAPTER_CASES = {"exact (CG)": _case_hessian_based, "exact, last layer": _case_hessian_based,
                 "EK-FAC": _case_hessian_based, "K-FAC": _case_hessian_based, "LiSSA": _case_hessian_based,
                 "Arnoldi": _case_hessian_based, "TRAK small": _case_trak, "TRAK large": _case_trak,
                 "TracIn": _case_identity, "grad. similarity": _case_identity}


def test_every_chapter_estimator_has_a_conversion_check():
    from helpers.experiments.estimators import ESTIMATORS

    assert set(CHAPTER_CASES) == set(ESTIMATORS)


@pytest.mark.parametrize("name", list(CHAPTER_CASES))
def test_the_chapter_calls_each_estimator_in_the_books_convention(name):
    """Each of chapter 4's estimators, called as the chapter calls it (its damping, λ and loss from the recipe),
    equals exact influence [n_test, n_train] on a convex case where it must."""
    got, exact, tol = CHAPTER_CASES[name](name)
    _close(got.to(exact.dtype), exact, tol)


@pytest.mark.parametrize("change, message", [({"alphas": [0.5]}, "two different subset sizes"),
                                             ({"alphas": [0.5, 0.5]}, "two different subset sizes"),
                                             ({"trak_dims": [64]}, "two projection dimensions"),
                                             ({"models_run": []}, "must not be empty")])
def test_the_chapter_refuses_settings_it_cannot_run(change, message):
    from helpers.experiments.estimators import run_chapter

    settings = dict(models_run=["logreg"], theta_seeds=[0], seed=0, n_train=20, n_test=10, pool=4, width=4,
                    cnn_width=2, lr=0.03, epochs=5, l2=1e-3, n_checkpoints=2, grad_tol=1e-5, max_iter=50,
                    damping=1e-3, lissa_depth=5, arnoldi_rank=2, trak_dims=[4, 8], cg_rtol=1e-6, k=3, cold_seeds=1,
                    pbrf_damping=1e-3, alphas=[0.5, 0.9], n_subsets=3, subset_seeds=1)
    with pytest.raises(ValueError, match=message):
        run_chapter(**{**settings, **change})


def test_beating_gradient_similarity_is_a_paired_test_with_holms_correction():
    """An estimator ahead of gradient similarity on every unit beats it; one that is ahead on average only because
    of one unit does not (exact sign-flip test: half the sign patterns reach its mean); the p-values are
    Holm-adjusted within the (model, target) family."""
    import numpy as np
    import pandas as pd

    from helpers.experiments.estimators import summary

    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1):
        for point in ("max", "median", "random"):
            base = rng.uniform(-0.5, 0.5)
            values = {"grad. similarity": base, "steady": base + 0.3 + 0.01 * rng.normal(),
                      "one lucky unit": base + (1.2 if (seed, point) == (0, "max") else -0.05)}
            rows += [{"model": "m", "theta_seed": seed, "target": "LOO cold", "estimator": e, "test_point": point,
                      "value": v, "ceiling": np.nan} for e, v in values.items()]
    out = summary(pd.DataFrame(rows), n_resamples=200).set_index("estimator")
    assert bool(out.loc["steady", "beats_similarity"])
    assert out.loc["steady", "p_holm"] == pytest.approx(2 * 2.0 ** -6)  # the smallest p of 6 units, times 2
    assert out.loc["one lucky unit", "diff_vs_similarity"] > 0
    assert out.loc["one lucky unit", "p_vs_similarity"] == pytest.approx(0.5)
    assert not bool(out.loc["one lucky unit", "beats_similarity"])
    assert not bool(out.loc["grad. similarity", "beats_similarity"])


def test_pick_test_points_keeps_max_median_and_draws_distinct_random_ones():
    from helpers.experiments.estimators import pick_test_points

    losses = torch.arange(20, dtype=F64).flip(0)  # position 0 has the largest loss
    picks = pick_test_points(losses, 3, 8)
    assert list(picks)[:3] == ["max", "median", "random"] and picks["max"] == 0 and picks["median"] == 10
    assert len(set(picks.values())) == 8 and list(picks)[3:] == [f"random {j}" for j in range(2, 7)]
    assert pick_test_points(losses, 3, 3) == {k: picks[k] for k in ("max", "median", "random")}
    with pytest.raises(ValueError, match=r"n_test_points must lie in \[3, 20\]"):
        pick_test_points(losses, 3, 21)


def test_every_theta_reads_the_subset_models_losses_at_its_own_test_points():
    """The LDS subset models are trained once per architecture and serve every θ̂; each θ̂'s LDS must use their
    losses at *its* test points (a second θ̂ with other test points scored against the first one's was a bug)."""
    import numpy as np

    from helpers import metrics, retrain
    from helpers.experiments import estimators as E

    settings = dict(models_run=["mlp"], theta_seeds=[0, 1], seed=0, n_train=40, n_test=30, pool=4, width=4,
                    cnn_width=2, lr=0.03, epochs=20, l2=1e-3, n_checkpoints=2, grad_tol=1e-5, max_iter=2000,
                    damping=1e-3, lissa_depth=5, arnoldi_rank=2, trak_dims=[4, 8], cg_rtol=1e-8, k=3, cold_seeds=1,
                    pbrf_damping=1e-3, alphas=[0.5, 0.9], n_subsets=4, subset_seeds=1, n_test_points=3)
    result = E.run_chapter(**settings)
    first, second = result["fits"]
    assert first.test_rows != second.test_rows  # otherwise this test could not tell
    units = result["units"]
    for f in (first, second):
        masks = result["masks"][0.5]
        direct = retrain.on_subsets(f.model, f.train, f.test, masks, f.recipe, [100], progress=False, cache=False)
        values = E.run_estimators(f, damping=1e-3, lissa_depth=5, arnoldi_rank=2, trak_dims=[4, 8],
                                  cg_rtol=1e-8)["exact (CG)"]["values"]
        expected = metrics.lds(values, masks, direct.mean_losses)
        got = units[(units.theta_seed == f.seed) & (units.target == "LDS α small") & (units.estimator == "exact (CG)")]
        assert list(got["test_point"]) == f.test_names
        np.testing.assert_allclose(got["value"].to_numpy(), expected, atol=1e-12)


def test_the_lds_check_sentence_follows_from_its_numbers(tmp_path, monkeypatch):
    """The check's conclusions are drawn from its intervals, not written in advance: the α trend is claimed only
    where the two intervals lie apart, the optimisation error dismissed only where the tighter models move no LDS,
    and the table's few subsets called noisy rather than low only where their mean lies inside the interval."""
    import numpy as np
    import pandas as pd

    from helpers.experiments import estimators as E

    monkeypatch.setenv("BOOK_OUTPUT_DIR", str(tmp_path))
    said: dict[str, str] = {}
    monkeypatch.setattr(E.book, "say", lambda name, text: said.__setitem__(name, text))

    def check(small: float, large: float, tight_shift: float, table_shift: float) -> pd.DataFrame:
        rows = []
        for a, level in ((0.5, small), (0.9, large)):
            for s in (0, 1):
                for t, name in enumerate(["max", "median", "random"]):
                    v = level + 0.01 * (t - 1) + 0.005 * s
                    rows.append({"alpha": a, "theta_seed": s, "test_point": name, "test_loss": 0.1 * (t + 1),
                                 "grad_norm_test": 10.0 ** -(t + 1), "lds_table": v + table_shift, "lds_all": v,
                                 "lds_tight": v + tight_shift, "worst_grad_norm": 9e-6,
                                 "worst_grad_norm_tight": 9e-8})
        return pd.DataFrame(rows)

    settings = dict(n_subsets=8, check_subsets=50, tight_tol=1e-7, grad_tol=1e-5, n_resamples=200)
    table = E.record_lds_check(check(0.6, 0.9, 0.0, 0.0), **settings)
    text = said["lds_check_text"]
    assert "higher at α = 0.9" in text and "not what keeps it below 1" in text and "noisier, not lower" in text
    assert table.shape[0] == 12 and np.isfinite(table.to_numpy(dtype=float)).all()
    E.record_lds_check(check(0.75, 0.76, 0.05, 0.2), **settings)
    text = said["lds_check_text"]
    assert "overlap" in text and "part of the shortfall" in text and "outside an interval" in text
    assert "higher at" not in text and "not what keeps" not in text
