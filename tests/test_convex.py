"""helpers.closed_form against the generic autodiff modules, on small float64 problems."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import cache, closed_form, influence, models, retrain, solvers, train
from helpers.experiments import convex
from helpers.curvature import hessian_operator
from helpers.objective import model_params, objective, removal_weights
from helpers.solvers import solve

L2 = 0.05


def _problem(n: int = 40, d: int = 5, c: int = 3, seed: int = 0, dead: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if dead:
        x[:, 2] = 0.0  # a feature with no data (MNIST's border pixels): H is exactly λI there
    y = torch.randint(0, c, (n,), generator=g)
    theta = 0.5 * torch.randn(c, d, generator=g, dtype=torch.float64)
    return x, y, theta


def _model(theta: torch.Tensor) -> torch.nn.Module:
    c, d = theta.shape
    model = models.build("logreg", d_in=d, n_classes=c, seed=0, dtype=torch.float64)
    with torch.no_grad():
        model.linear.weight.copy_(theta)
    return model


def _fit(x, y, **options):
    """Softmax regression from W = 0 by the engine's tolerance fit (its closed-form backend)."""
    zeros = torch.zeros(int(y.max()) + 1, x.shape[1], dtype=x.dtype)
    return train.fit_to_tolerance(closed_form.model_at(zeros), x, y, **options)


@pytest.fixture(scope="module")
def fitted():
    x, y, _ = _problem(n=60, d=6, c=3, seed=1)
    xt, yt, _ = _problem(n=4, d=6, c=3, seed=2, dead=False)
    f = _fit(x, y, l2=L2, tol=1e-12, cache=False, snapshots=[1e-1, 1e-3, 1e-6])
    return x, y, xt, yt, f


def test_hessian_equals_autodiff_dense():
    x, y, theta = _problem()
    w = torch.rand(x.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for weights in (None, w):
        H = closed_form.softmax_regression_hessian(x, theta, weights=weights, l2=L2)
        model = _model(theta)
        ref = hessian_operator(model, model_params(model), x, y, weights=weights, l2=L2).dense()
        assert torch.linalg.norm(H - ref) <= 1e-12 * torch.linalg.norm(ref)
        assert torch.equal(H, H.T)


def test_operator_products_and_dense():
    x, y, theta = _problem()
    op = closed_form.softmax_regression_operator(x, theta, l2=L2)
    H = closed_form.softmax_regression_hessian(x, theta, l2=L2)
    V = torch.randn(op.dim, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(op.matmat(V), H @ V, rtol=0, atol=1e-13)
    assert torch.allclose(op.matvec(V[:, 0]), H @ V[:, 0], rtol=0, atol=1e-13)
    assert op.applications == 5
    assert torch.equal(op.dense(), H)


def test_gradients_and_objective_match_autodiff():
    x, y, theta = _problem()
    model = _model(theta)
    ref = influence.per_sample_grads(model, model_params(model), x, y)
    assert torch.allclose(closed_form.loss_grads(x, y, theta), ref, rtol=0, atol=1e-14)
    w = removal_weights(x.shape[0], [3, -1])
    thetas = torch.stack([theta, 2 * theta])
    values, grads = closed_form.objective_and_grad(x, y, thetas, weights=w, l2=L2)
    for j in range(2):
        p = {"linear.weight": thetas[j].clone().requires_grad_(True)}
        r = objective(model, p, x, y, weights=w[j], l2=L2)
        (g,) = torch.autograd.grad(r, p["linear.weight"])
        assert torch.allclose(values[j], r.detach(), rtol=1e-14, atol=0)
        assert torch.allclose(grads[j], g, rtol=0, atol=1e-14)
    losses = closed_form.losses(x, y, thetas)
    assert losses.shape == (2, x.shape[0])
    assert torch.allclose(losses[0], torch.nn.functional.cross_entropy(x @ theta.T, y, reduction="none"))


def test_fit_reaches_tolerance_and_matches_newton(fitted):
    x, y, _, _, f = fitted
    assert f.converged and f.grad_norm < 1e-12
    _, g = closed_form.objective_and_grad(x, y, f.theta, l2=L2)
    assert float(g.norm()) < 1e-12
    model = models.build("logreg", d_in=x.shape[1], n_classes=3, seed=0, dtype=torch.float64)
    with torch.no_grad():
        model.linear.weight.zero_()
    ref = train.fit(train.Recipe(optimizer="newton", weight_decay=L2, tol=1e-12, max_iter=100), model, x, y,
                    progress=False)
    assert torch.allclose(f.theta, ref.params["linear.weight"], rtol=0, atol=1e-10)
    # snapshots: the first iterate under each threshold, in training order
    assert sorted(f.snapshots, reverse=True) == [1e-1, 1e-3, 1e-6]
    for tau, (theta, gn, _, _) in f.snapshots.items():
        assert gn < tau
        _, g = closed_form.objective_and_grad(x, y, theta, l2=L2)
        assert abs(float(g.norm()) - gn) <= 1e-12 * max(gn, 1.0)


def test_fit_without_l2_on_separable_data_only_grows():
    # no minimiser: the gradient vanishes only as ‖W‖ → ∞, so every tighter tolerance means larger weights
    x = torch.tensor([[1.0, 0.0], [2.0, 0.5], [-1.0, 0.2], [-2.0, -0.3]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    f = _fit(x, y, l2=0.0, tol=1e-8, snapshots=[1e-2, 1e-4, 1e-6], cache=False)
    norms = [float(f.snapshots[t][0].norm()) for t in (1e-2, 1e-4, 1e-6)]
    assert norms[0] < norms[1] < norms[2] and norms[2] > 2 * norms[0]


def test_fit_that_cannot_reach_tol_raises():
    x, y, _ = _problem()
    with pytest.raises(RuntimeError, match="did not reach"):
        _fit(x, y, l2=L2, tol=1e-30, lbfgs_max_iter=5, newton_max_iter=2, cache=False)


def test_factor_solves_exactly_and_refactors(monkeypatch):
    x, y, theta = _problem()
    H = closed_form.softmax_regression_hessian(x, theta, l2=L2)
    B = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fac = closed_form.factorize(x, theta, l2=L2, keep_block=True)
    ref = torch.linalg.solve(H, B)
    assert torch.allclose(fac.apply_inverse(B), ref, rtol=0, atol=1e-12)
    direct = closed_form.solve_exact(x, theta, B, l2=L2, factor=fac)
    assert direct.method == "exact" and direct.max_relative_residual < 1e-13
    # same point, L2 left out and damping instead: refactored from the kept block, still direct
    shifted = closed_form.solve_exact(x, theta, B, l2=0.0, damping=1e-3, factor=fac)
    H0 = closed_form.softmax_regression_hessian(x, theta, l2=0.0) + 1e-3 * torch.eye(H.shape[0], dtype=torch.float64)
    assert shifted.method == "exact"
    assert torch.allclose(shifted.x, torch.linalg.solve(H0, B), rtol=1e-10, atol=1e-10)
    # another point: preconditioned CG with the old factor, to round-off
    theta2 = theta + 0.05
    pcg = closed_form.solve_exact(x, theta2, B, l2=L2, factor=fac)
    H2 = closed_form.softmax_regression_hessian(x, theta2, l2=L2)
    assert pcg.method == "pcg" and pcg.max_relative_residual < 1e-11
    assert torch.allclose(pcg.x, torch.linalg.solve(H2, B), rtol=0, atol=1e-10)
    # a far point: PCG gives up after its few steps (one here) and plain CG finishes, to the same tolerance
    monkeypatch.setattr(closed_form, "PCG_STEPS", 1)
    theta3 = 3.0 * theta
    far = closed_form.solve_exact(x, theta3, B, l2=L2, factor=fac)
    H3 = closed_form.softmax_regression_hessian(x, theta3, l2=L2)
    assert far.method == "pcg+cg" and far.max_relative_residual < 1e-11
    assert torch.allclose(far.x, torch.linalg.solve(H3, B), rtol=0, atol=1e-9)


def test_singular_hessian_is_refused_with_a_fix():
    x, y, theta = _problem()
    with pytest.raises(ValueError, match="add damping"):
        closed_form.factorize(x, theta, l2=0.0)


def test_bad_inputs_raise_clear_errors():
    x, y, theta = _problem()
    with pytest.raises(TypeError, match="float64"):
        closed_form.softmax_regression_hessian(x.float(), theta, l2=L2)
    with pytest.raises(ValueError, match=r"\[n_classes, d\]"):
        closed_form.softmax_regression_hessian(x, theta[:, :3], l2=L2)
    with pytest.raises(ValueError, match="labels must lie"):
        closed_form.objective_and_grad(x, y + 5, theta, l2=L2)
    with pytest.raises(ValueError, match="outside the training set"):
        closed_form.leave_one_out(x, y, (x[:2], y[:2]), theta, [x.shape[0]], l2=L2, cache=False)


@pytest.mark.parametrize("options", [
    {"method": "exact"},
    {"method": "cg", "rtol": 1e-13},
    {"method": "exact", "damping": 0.02},
    {"method": "exact", "include_l2_in_hessian": False, "damping": 0.01},
])
def test_predict_removal_matches_generic_influence(fitted, options):
    x, y, xt, yt, f = fitted
    model = _model(f.theta)
    ours = closed_form.removal_estimate(x, y, xt, yt, f.theta, l2=L2, **options)
    ref = influence.predict_removal(model, (x, y), (xt, yt), l2=L2, backend="autodiff", **options)
    assert ours.values.shape == (xt.shape[0], x.shape[0])
    assert torch.allclose(ours.values, ref.values, rtol=0, atol=1e-12 * float(ref.values.abs().max()))
    assert ours.l2_in_hessian == ref.l2_in_hessian


@pytest.mark.parametrize("loo", ["drop", "reaverage"])
def test_leave_one_out_matches_warm_start_newton(fitted, loo):
    x, y, xt, yt, f = fitted
    model = _model(f.theta)
    removed = [0, 5, 17, 33, 59]
    ours = closed_form.leave_one_out(x, y, (xt, yt), f.theta, removed, l2=L2, tol=1e-12, loo=loo, keep_params=True,
                                cache=False)
    recipe = train.Recipe(optimizer="newton", weight_decay=L2, tol=1e-12, max_iter=100)
    ref = retrain.warm_start(model, {"linear.weight": f.theta}, (x, y), (xt, yt), removed, recipe, loo=loo,
                             progress=False, cache=False)
    assert ours.delta.shape == (xt.shape[0], len(removed))
    np.testing.assert_allclose(ours.delta, ref.delta, rtol=0, atol=1e-10)
    assert np.all(ours.grad_norm < 1e-12)
    assert np.abs(ours.drift).max() < 1e-14  # θ̂ already meets the tolerance: nothing removed, nothing moves
    # every member is a minimiser of its own leave-one-out objective
    w = removal_weights(x.shape[0], removed + [-1], loo)
    _, g = closed_form.objective_and_grad(x, y, ours.params["linear.weight"], weights=w, l2=L2)
    assert float(g.flatten(1).norm(dim=1).max()) < 1e-12
    # the first chord step is a one-step Newton estimate: much closer to the truth than the influence estimate
    pred = closed_form.removal_estimate(x, y, xt, yt, f.theta, l2=L2).values[:, removed].numpy()
    one = ours.settings["one_step_delta"]
    assert np.linalg.norm(one - ours.delta) < np.linalg.norm(pred - ours.delta)


def test_leave_one_out_is_cached(tmp_path, monkeypatch, fitted):
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BOOK_CACHE", raising=False)
    x, y, xt, yt, f = fitted
    a = closed_form.leave_one_out(x, y, (xt, yt), f.theta, [1, 2], l2=L2)
    b = closed_form.leave_one_out(x, y, (xt, yt), f.theta, [1, 2], l2=L2)
    np.testing.assert_array_equal(a.delta, b.delta)
    assert list((tmp_path / "convex_leave_one_out").glob("*.pt"))


def test_solvers_run_on_the_closed_form_operator(fitted):
    x, y, xt, yt, f = fitted
    op = closed_form.softmax_regression_operator(x, f.theta, l2=L2)
    b = closed_form.loss_grads(xt, yt, f.theta).T.contiguous()
    exact = solve(op, b, method="exact")
    for method, opts in (("lissa", {"depth": 3000}), ("arnoldi", {"rank": op.dim})):
        res = solve(op, b, method=method, **opts)
        assert torch.allclose(res.x, exact.x, rtol=0, atol=1e-8 * float(exact.x.abs().max())), method


def test_lissa_path_equals_separate_runs(fitted):
    x, y, xt, yt, f = fitted
    op = closed_form.softmax_regression_operator(x, f.theta, l2=L2)
    b = closed_form.loss_grads(xt, yt, f.theta).T.contiguous()
    path = solvers.lissa_path(op, b, [3, 10, 25], scale=2.0, damping=0.01)
    for depth, res in path.items():
        ref = solve(op, b, method="lissa", depth=depth, scale=2.0, damping=0.01)
        assert torch.equal(res.x, ref.x), depth
        assert torch.allclose(res.relative_residual, ref.relative_residual, rtol=1e-12, atol=0)
        assert res.info["hvps"] == depth * b.shape[1]


def test_engine_runs_the_closed_form_backend_for_softmax_regression(fitted):
    """influence.predict_removal on a bias-free LogisticRegression is closed_form.removal_estimate, bit for bit; a model
    with a bias, a parameter subset it does not cover, or damping="auto" takes the autodiff path."""
    x, y, xt, yt, f = fitted
    model = closed_form.model_at(f.theta)
    assert torch.equal(model.linear.weight, f.theta) and model.linear.bias is None
    engine = influence.predict_removal(model, (x, y), (xt, yt), l2=L2, damping=0.05, method="cg", rtol=1e-12)
    backend = closed_form.removal_estimate(x, y, xt, yt, f.theta, l2=L2, damping=0.05, method="cg", rtol=1e-12)
    assert torch.equal(engine.values, backend.values)
    autodiff = influence.predict_removal(model, (x, y), (xt, yt), l2=L2, damping=0.05, method="cg", rtol=1e-12,
                                         backend="autodiff")
    assert not torch.equal(autodiff.values, engine.values)  # another computation: equal only to round-off
    assert torch.allclose(autodiff.values, engine.values, rtol=0, atol=1e-10 * float(engine.values.abs().max()))
    assert models.is_softmax_regression(model) and not models.is_softmax_regression(model, loss="mse")
    with_bias = models.logistic_regression(x.shape[1], f.theta.shape[0], bias=True, dtype=torch.float64)
    assert not models.is_softmax_regression(with_bias)
    auto = influence.predict_removal(model, (x, y), (xt, yt), l2=L2, damping="auto")  # a rule, not a number:
    ref = influence.predict_removal(model, (x, y), (xt, yt), l2=L2, damping="auto", backend="autodiff")  # autodiff
    assert torch.equal(auto.values, ref.values)
    with pytest.raises(ValueError, match="closed_form"):
        influence.predict_removal(with_bias, (x, y), (xt, yt), l2=L2, backend="closed_form")
    with pytest.raises(TypeError, match="factor"):
        influence.predict_removal(with_bias, (x, y), (xt, yt), l2=L2, factor=closed_form.factorize(x, f.theta, l2=L2))


def test_predict_removal_cache_ignores_the_factor(fitted, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path))
    x, y, xt, yt, f = fitted
    model = closed_form.model_at(f.theta)
    plain = closed_form.removal_estimate(x, y, xt, yt, f.theta, l2=L2, damping=0.1)
    factor = closed_form.factorize(x, f.theta, l2=L2, damping=0.1)
    first = influence.predict_removal(model, (x, y), (xt, yt), l2=L2, damping=0.1, factor=factor, cache=True)
    again = influence.predict_removal(model, (x, y), (xt, yt), l2=L2, damping=0.1, cache=True)
    assert torch.allclose(first.values, plain.values, rtol=1e-10, atol=1e-14)
    assert torch.equal(again.values, first.values)
    other = influence.predict_removal(model, (x, y), (xt, yt), l2=L2, damping=0.2, cache=True)
    assert not torch.allclose(other.values, first.values)
    assert [e["event"] for e in cache.read_log(tmp_path)] == ["miss", "hit", "miss"]


def test_solver_budgets_are_the_solvers_runs_and_cached(fitted, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path))
    x, y, xt, yt, f = fitted
    kwargs = dict(l2=L2, cg_iterations=[1, 50], lissa_depths=[5, 20], lissa_scales=[0.0, 4.0], arnoldi_ranks=[3])
    lam_max, runs = convex.solver_budgets(x, y, f.theta, xt[:1], yt[:1], **kwargs)
    dense = closed_form.softmax_regression_hessian(x, f.theta, l2=L2)
    assert lam_max == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-8)
    assert [(r.solver, r.knob) for r in runs] == [("cg", 1), ("cg", 50), ("lissa, s = λmax", 5), ("lissa, s = λmax", 20),
                                                   ("lissa, s = 4", 5), ("lissa, s = 4", 20), ("arnoldi", 3)]
    g = closed_form.loss_grads(xt[:1], yt[:1], f.theta)[0]
    exact = torch.linalg.solve(dense, g)
    assert torch.allclose(runs[1].x, exact, rtol=1e-8, atol=1e-10)  # 50 CG steps on 18 unknowns: exact
    assert (runs[0].x - exact).norm() > 1e-3 * exact.norm()  # one step is not
    ref = solve(closed_form.softmax_regression_operator(x, f.theta, l2=L2), g[:, None], method="lissa", depth=20,
                scale=4.0)
    assert torch.equal(runs[5].x, ref.x[:, 0]) and runs[5].hvps == 20
    again = convex.solver_budgets(x, y, f.theta, xt[:1], yt[:1], **kwargs)
    assert torch.equal(again[1][3].x, runs[3].x)
    assert [e["event"] for e in cache.read_log(tmp_path)] == ["miss", "hit"]
    with pytest.raises(ValueError, match="one test point"):
        convex.solver_budgets(x, y, f.theta, xt, yt, **kwargs)


def test_verify_and_compare(fitted):
    x, y, xt, yt, f = fitted
    v = convex.verify(x, y, xt, yt, l2=L2, tol=1e-12, n_high=2, n_random=1, n_extremes=8, n_uniform=10,
                      cache=False)
    losses = closed_form.losses(xt, yt, v.fit.theta).numpy()
    assert list(v.test_points[:2]) == list(np.argsort(-losses)[:2]) and len(set(v.test_points)) == 3
    assert v.extremes.shape == (3, 8) and v.uniform.shape == (10,)
    top = np.abs(v.predicted[np.arange(3)[:, None], v.extremes])
    assert np.all(np.diff(top, axis=1) <= 0)  # descending |estimate|
    table = convex.compare(v.predicted, v.truth, v.points(), n_bootstrap=200)
    assert len(table) == 6 and set(table["set"]) == {"extremes", "uniform"}
    assert (table["pearson"] > 0.99).all()
    assert (table["pearson_low"] <= table["pearson"]).all() and (table["pearson"] <= table["pearson_high"]).all()
    # the shared uniform set: same columns for every test point
    true = convex.truth_at(v.truth, v.uniform)
    assert true.shape == (3, 10)
    with pytest.raises(KeyError, match="not retrained"):
        convex.truth_at(v.truth, [int(np.setdiff1d(np.arange(x.shape[0]), v.truth.removed)[0])])


def test_compare_accepts_ragged_point_sets(fitted):
    x, y, xt, yt, f = fitted
    v = convex.verify(x, y, xt, yt, l2=L2, tol=1e-12, n_high=2, n_random=0, n_extremes=5, n_uniform=6,
                      cache=False)
    union = v.union()
    table = convex.compare(v.predicted, v.truth, {"union": union})
    assert list(table["n"]) == [len(u) for u in union]
    for t, u in enumerate(union):
        true = v.truth.delta[t, np.searchsorted(v.truth.removed, u)]
        expected = np.linalg.norm(v.predicted[t, u] - true) / np.linalg.norm(true)
        assert table.loc[t, "relative_error"] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="one per test point"):
        convex.compare(v.predicted, v.truth, {"bad": [union[0]]})


def test_compare_rows_selects_test_points(fitted):
    x, y, xt, yt, f = fitted
    v = convex.verify(x, y, xt, yt, l2=L2, tol=1e-12, n_high=3, n_random=0, n_extremes=5, n_uniform=6,
                      cache=False)
    full = convex.compare(v.predicted, v.truth, {"uniform": v.uniform})
    one = convex.compare(v.predicted[2:3], v.truth, {"uniform": v.uniform}, rows=[2])
    assert one.loc[0, "test"] == 2
    assert one.loc[0, "pearson"] == full.loc[2, "pearson"]


def test_fast_paths_of_the_benchmark_match_the_exact_answer(fitted):
    """The settings `make bench` times on P1: block CG with float32 refinement on the closed-form operator
    reaches the exact answer to its tolerance, and Arnoldi on a fixed Krylov space agrees with the autodiff path."""
    x, y, xt, yt, f = fitted
    exact = closed_form.removal_estimate(x, y, xt, yt, f.theta, l2=L2, method="exact")
    fast = closed_form.removal_estimate(x, y, xt, yt, f.theta, l2=L2, method="cg", rtol=1e-10, block=True,
                                   low_precision=torch.float32)
    assert fast.solve.method == "cg+refine" and fast.solve.max_relative_residual <= 1e-10
    assert torch.allclose(fast.values, exact.values, rtol=0, atol=1e-8 * float(exact.values.abs().max()))
    ours = closed_form.removal_estimate(x, y, xt, yt, f.theta, l2=L2, method="arnoldi", rank=5, krylov_dim=10)
    ref = influence.predict_removal(_model(f.theta), (x, y), (xt, yt), l2=L2, method="arnoldi", rank=5,
                                    krylov_dim=10, backend="autodiff")
    assert ours.solve.iterations == ref.solve.iterations == 10
    assert torch.allclose(ours.values, ref.values, rtol=0, atol=1e-8 * float(ref.values.abs().max()))


# ---------------------------------------------------------------------- the chapter's section functions


def test_section_functions_record_what_the_prose_quotes(fitted, tmp_path, monkeypatch):
    """The functions the chapter's cells call: each records its numbers (as computed from the frames it returns),
    writes its figure data and returns a Figure with the chapter's labels."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("BOOK_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path / "cache"))
    x, y, xt, yt, _ = fitted
    main = convex.verify(x, y, xt, yt, l2=L2, tol=1e-12, n_high=2, n_random=1, n_extremes=8, n_uniform=10,
                         snapshots=[1e-1, 1e-3, 1e-6], cache=False)
    table = convex.compare(main.predicted, main.truth, main.points(), n_bootstrap=50)
    convex.record_verification(main, table)
    records = lambda: json.loads((tmp_path / "out" / "records.json").read_text())  # noqa: E731
    rec = records()
    assert rec["n_test_points"] == 3 and rec["n_cases"] == 6 and rec["n_retrained"] == len(main.truth.removed)
    assert rec["min_pearson_uniform"] == table[table.set == "uniform"].pearson.min()
    assert rec["pearson_extremes"] == table[table.set == "extremes"].pearson.tolist()

    scatter, fig = convex.scatter_by_test_point(main, torch.arange(x.shape[0]) + 100, n_high=2)
    assert len(scatter) == 3 * (8 + 10) and set(scatter.kind) == {"highest loss", "random"}
    assert scatter.train_index.min() >= 100 and fig.axes[3].get_xlabel() == "actual change (nats)"
    plt.close(fig)
    assert list(convex.agreement_styler(table).data.columns)[:3] == ["test point", "points", "n"]
    resolution = convex.rank_swaps(main)
    assert len(resolution) == 6 and records()["worst_case"].startswith("test point ")

    union = {"union": main.union()}
    data, top = (x, y), (xt[main.test_points], yt[main.test_points])
    exact_score = convex.compare(main.predicted, main.truth, union)
    stopping, stopped, fig = convex.early_stopping(main, data, top, exact_score, l2=L2, seed=0)
    assert sorted(stopped) == sorted(main.fit.snapshots) and len(stopping) == 3 * len(stopped)
    assert fig.axes[0].get_xlabel() == "gradient norm where training stopped"
    plt.close(fig)
    nol2, fig = convex.l2_out_of_hessian(main, data, top, exact_score, l2=L2, dampings=[1e-4, 1e-2])
    assert records()["nol2_smallest_damping"] == 1e-4
    plt.close(fig)
    damped, fig = convex.damping_sweep(main, data, top, exact_score, l2=L2, dampings=[1e-3, 1.0], seed=0)
    assert records()["damping_largest_error"] == damped[damped.damping == 1.0].relative_error.median()
    plt.close(fig)
    budget, fig = convex.solver_budget_scores(main, data, top, exact_score, l2=L2, cg_iterations=[1, 50],
                                              lissa_depths=[5], lissa_scales=[0.0, 25.0], arnoldi_ranks=[3])
    rec = records()
    assert {"cg_best_error", "lissa_best_error", "lissa_kl_best_error", "arnoldi_best_error"} <= set(rec)
    assert rec["cg_enough"] == 50  # 50 CG steps on 18 unknowns: the exact solve
    plt.close(fig)
    selection, fig = convex.selection_curves(main, data, top, stopped, l2=L2, n_extremes=8, n_uniform=10)
    assert sorted(selection.k.unique()) == [5] and records()["selection_broken"] == "cg, 5 iterations"
    plt.close(fig)
    free = convex.without_l2(main, x, y, n_classes=3, tol=1e-12, steps=20)
    rec = records()
    assert rec["free_converged"] == bool(free.converged)
    assert rec["free_weight_norms"].keys() <= {"0.01", "0.001", "0.0001"}
    assert f"{int(free.history[-1, 1])} " in rec["free_summary"] and "with a weight norm of" in rec["free_summary"]
    written = {p.stem for p in (tmp_path / "out" / "data").glob("*.csv")}
    assert written == {"convex_scatter", "convex_rank_resolution", "convex_early_stopping",
                       "convex_early_stopping_vs_converged", "convex_l2_hessian", "convex_damping", "convex_solvers",
                       "convex_selection", "convex_selection_diff"}


def test_selection_verdict_names_every_k():
    diffs = pd.DataFrame({"k": [5, 10, 20], "diff": [0.1, 0.0, -0.2], "low": [0.05, -0.1, -0.3],
                          "high": [0.2, 0.1, -0.1], "verdict": ["a higher", "no difference resolved", "b higher"]})
    sentence, at = convex._verdict(diffs)
    assert at == {"a higher": [5], "b higher": [20], "no difference resolved": [10]}
    assert sentence.startswith("the extremes score higher at k = 5; lower at k = 20; no difference is resolved at "
                               "k = 10 (paired over test points")
    assert "k = 20: -0.20 [-0.30, -0.10])" in sentence
