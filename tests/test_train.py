"""helpers.train: recipes as data, exact Newton, and the batched ensemble against one-by-one fits (float64)."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from helpers.objective import objective, removal_weights
from helpers.models import init_params
from helpers import train
from helpers.train import EnsembleResult, Recipe, fit, fit_ensemble
from tiny_models import LogReg, MLP


def make_data(n: int = 40, d: int = 3, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, c, generator=g, dtype=torch.float64)
    logits = 2 * x @ w + 0.5 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return x, logits.argmax(1)


def make_model(cls=MLP, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw).double()


def grad_norm(model, params, x, y, w, l2, loss="cross_entropy"):
    """‖∇R‖₂ recomputed independently with plain autograd."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    r = objective(model, leaves, x, y, weights=w, l2=l2, loss=loss)
    grads = torch.autograd.grad(r, list(leaves.values()))
    return float(torch.sqrt(sum((g * g).sum() for g in grads)))


def test_recipe_is_hashable_json_data():
    r = Recipe(optimizer="adam", lr=1e-3, epochs=10, schedule="plateau", swa_start=0.75, betas=[0.9, 0.99])
    assert r == Recipe(**json.loads(json.dumps(r.to_dict())))
    assert hash(r) == hash(Recipe(**r.to_dict()))
    assert r.replace(lr=1e-2).lr == 1e-2 and r.lr == 1e-3
    assert Recipe(dtype=torch.float32).dtype == "float32"
    with pytest.raises(ValueError, match="unknown optimizer"):
        Recipe(optimizer="adagrad")
    with pytest.raises(ValueError, match="swa_start"):
        Recipe(swa_start=1.5)
    with pytest.raises(ValueError, match="full batch"):
        Recipe(optimizer="newton", batch_size=8)


def test_newton_reaches_tight_gradient_norm_on_l2_logistic_regression():
    x, y = make_data()
    model = make_model(LogReg)
    res = fit(Recipe(optimizer="newton", weight_decay=1e-2, tol=1e-12, max_iter=50), model, x, y, progress=False)
    assert res.converged and res.grad_norm < 1e-10
    w = torch.full((40,), 1 / 40, dtype=torch.float64)
    assert grad_norm(model, res.params, x, y, w, 1e-2) < 1e-10
    assert np.all(np.diff(res.history) <= 1e-15)  # the line search never increases the objective
    assert len(res.history) < 15  # quadratic convergence: a handful of iterations


def test_lbfgs_reaches_newtons_minimum():
    x, y = make_data()
    model = make_model(LogReg)
    newton = fit(Recipe(optimizer="newton", weight_decay=1e-2, tol=1e-12), model, x, y, progress=False)
    lbfgs = fit(Recipe(optimizer="lbfgs", lr=1.0, weight_decay=1e-2, tol=1e-9, max_iter=300), model, x, y,
                progress=False)
    assert lbfgs.converged and lbfgs.grad_norm < 1e-9
    for k in newton.params:
        # ‖θ − θ*‖ ≤ ‖∇R‖/λ_min(H) with λ_min ≥ λ = 1e-2
        torch.testing.assert_close(lbfgs.params[k], newton.params[k], rtol=0, atol=1e-7)


CASES = {
    # chosen so that the relative threshold, the eps floor and per-member timing all change the outcome
    "adam+plateau+wd": (Recipe(optimizer="adam", lr=0.05, epochs=150, schedule="plateau", patience=3,
                               weight_decay=0.1), MLP, "all"),
    "amsgrad+swa+wd": (Recipe(optimizer="adam", lr=0.02, epochs=80, amsgrad=True, swa_start=0.5,
                              weight_decay=1e-2), MLP, "all"),
    "sgd+momentum+minibatch+step": (Recipe(optimizer="sgd", lr=0.1, epochs=30, momentum=0.9, batch_size=16,
                                           schedule="step", step_size=10, factor=2.0, seed=3), MLP, "all"),
    "sgd+cosine+last-layer": (Recipe(optimizer="sgd", lr=0.5, epochs=60, schedule="cosine", weight_decay=1e-3),
                              MLP, "last"),
    "adam+minibatch+plateau": (Recipe(optimizer="adam", lr=0.1, epochs=40, batch_size=7, schedule="plateau",
                                      patience=0, seed=1), MLP, "all"),
    "newton+wd": (Recipe(optimizer="newton", weight_decay=1e-2, tol=1e-12), LogReg, "all"),
    # members reach the lr floor at different epochs, leave the ensemble there, and SWA is completed
    "adam+plateau+floor-stop+swa": (Recipe(optimizer="adam", lr=0.05, epochs=300, schedule="plateau", patience=2,
                                           weight_decay=0.1, swa_start=0.3, stop_at_floor=True), MLP, "all"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_leave_one_out_ensemble_equals_fits_one_by_one(case):
    recipe, cls, which = CASES[case]
    x, y = make_data()
    model = make_model(cls)
    removed = [0, 7, 19, 33, -1]  # four leave-one-out fits and the drift member
    w = removal_weights(40, removed)
    ens = fit_ensemble(recipe, model, x, y, weights=w, params=which, progress=False)
    assert isinstance(ens, EnsembleResult) and len(ens) == len(removed)
    for j in range(len(removed)):
        one = fit(recipe, model, x, y, weights=w[j], params=which, progress=False)
        assert set(one.params) == set(ens.params)
        for k in one.params:
            torch.testing.assert_close(ens.params[k][j], one.params[k], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(ens.loss[j], one.loss, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(ens.grad_norm[j], one.grad_norm, rtol=1e-6, atol=1e-12)
        hist = ens.history[j][~np.isnan(ens.history[j])]
        np.testing.assert_allclose(hist, one.history, rtol=1e-8, atol=1e-12)
        assert ens.lr[j] == pytest.approx(one.lr, rel=1e-12)
    if recipe.schedule == "plateau":
        assert (ens.lr < recipe.lr).any(), "the test should exercise at least one plateau reduction"
    if case == "adam+plateau+wd":  # schedules are per member: their learning rates part ways
        assert len(set(ens.lr.tolist())) > 1
    if recipe.optimizer == "newton":
        assert ens.converged.all() and (ens.grad_norm < 1e-12).all()
    if recipe.stop_at_floor:
        for j in range(len(removed)):
            one = fit(recipe, model, x, y, weights=w[j], params=which, progress=False)
            assert (ens.floor_epoch[j], ens.epochs_run[j]) == (one.floor_epoch, one.epochs_run)
        assert (ens.epochs_run < recipe.epochs).sum() >= 2 and len(set(ens.floor_epoch.tolist())) > 1
    # the members really differ: removal changes the fit
    k0 = next(iter(ens.params))
    assert not torch.allclose(ens.params[k0][0], ens.params[k0][-1], rtol=0, atol=1e-12)


def test_seeded_ensemble_equals_separate_seeded_fits():
    x, y = make_data()
    model = make_model(MLP)
    recipe = Recipe(optimizer="adam", lr=0.05, epochs=50, weight_decay=1e-3)
    seeds = [0, 1, 5]
    ens = fit_ensemble(recipe, model, x, y, seeds=seeds, progress=False)
    for j, s in enumerate(seeds):
        one = fit(recipe, model, x, y, init=init_params(model, s), progress=False)
        for k in one.params:
            torch.testing.assert_close(ens.params[k][j], one.params[k], rtol=1e-8, atol=1e-10)
    assert not torch.allclose(ens.params["net.0.weight"][0], ens.params["net.0.weight"][1])


def test_init_params_is_reproducible_and_seed_dependent():
    model = make_model(MLP)
    a, b, c = init_params(model, 3), init_params(model, 3), init_params(model, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.0.weight"], c["net.0.weight"])
    assert list(init_params(model, 3, "last")) == ["net.2.weight", "net.2.bias"]


def test_fit_never_modifies_the_module_and_warm_starts_from_init():
    x, y = make_data()
    model = make_model(MLP)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = init_params(model, 9)
    res = fit(Recipe(optimizer="adam", lr=0.01, epochs=1), model, x, y, init=start, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # one Adam step moves every coordinate by about lr from the given init, not from the module's values
    for k in start:
        assert (res.params[k] - start[k]).abs().max() < 0.011


def test_non_finite_training_raises_naming_the_epoch():
    g = torch.Generator().manual_seed(0)
    x = 10 * torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 2).double()
    recipe = Recipe(optimizer="sgd", lr=1e3, epochs=200, loss="mse")
    with pytest.raises(FloatingPointError, match=r"epoch \d+.*lower the learning rate"):
        fit(recipe, model, x, y, progress=False)
    with pytest.raises(FloatingPointError, match=r"epoch \d+ \(ensemble member \d\)"):
        fit_ensemble(recipe, model, x, y, weights=removal_weights(30, [0, -1]), progress=False)


def test_newton_refuses_negative_curvature_with_a_clear_message():
    x, y = make_data()
    with pytest.raises(ValueError, match="not positive semi-definite.*smallest eigenvalue"):
        fit(Recipe(optimizer="newton", tol=1e-10), make_model(MLP), x, y, progress=False)


def test_bad_input_is_named():
    x, y = make_data()
    model = make_model(LogReg)
    with pytest.raises(ValueError, match=r"weights must be \[n\]"):
        fit(Recipe(epochs=1), model, x, y, weights=torch.ones(39), progress=False)
    with pytest.raises(ValueError, match="inconsistent ensemble sizes"):
        fit_ensemble(Recipe(epochs=1), model, x, y, weights=removal_weights(40, [1, 2]), seeds=[0, 1, 2],
                     progress=False)
    with pytest.raises(ValueError, match="integer class labels"):
        fit(Recipe(epochs=1), model, x, y.double(), progress=False)


def test_floor_stop_is_within_its_bound_of_the_full_run():
    """Stopping at the lr floor skips epochs that could move a coordinate by at most floor_bound; the full
    run (same recipe without the stop) must lie within that bound, and reach the floor at the same epoch."""
    from helpers.train import adam_step_bound, floor_bound

    x, y = make_data()
    model = make_model(MLP)
    w = removal_weights(40, [0, 7, -1])
    stop = Recipe(optimizer="adam", lr=0.05, epochs=400, schedule="plateau", patience=2, weight_decay=0.1,
                  stop_at_floor=True)
    short = fit_ensemble(stop, model, x, y, weights=w, progress=False)
    full = fit_ensemble(stop.replace(stop_at_floor=False), model, x, y, weights=w, progress=False)
    np.testing.assert_array_equal(short.floor_epoch, full.floor_epoch)
    assert (short.epochs_run < 400).all() and (full.floor_epoch > 0).all()
    bound = floor_bound(stop, short.epochs_run, short.lr)
    for j in range(3):
        moved = max(float((full.params[k][j] - short.params[k][j]).abs().max()) for k in full.params)
        assert 0 < moved <= bound[j]
    assert adam_step_bound() == pytest.approx(7.27, abs=0.01)
    with pytest.raises(ValueError, match="stop_at_floor needs schedule='plateau'"):
        Recipe(stop_at_floor=True)


@pytest.mark.parametrize("batch_size", [None, 16])
def test_ensemble_in_member_chunks_equals_the_whole_ensemble(batch_size, monkeypatch):
    """Memory bounded: under a budget that fits about two members at a time the ensemble is vmapped in chunks of
    members (member_chunk), and every member ends exactly where the whole ensemble takes it (members are
    independent; float64), including plateau schedules and stops at the floor."""
    from helpers.train import call_in_chunks, member_chunk, weighted_objective

    x, y = make_data()
    model = make_model(MLP)
    recipe = Recipe(optimizer="adam", lr=0.05, epochs=40, weight_decay=1e-2, schedule="plateau", patience=3,
                    batch_size=batch_size)
    w = removal_weights(40, [0, 7, 19, 33, -1])
    whole = fit_ensemble(recipe, model, x, y, weights=w, progress=False)
    start = {k: v.detach()[None].repeat(5, *[1] * v.dim()) for k, v in model.named_parameters()}
    member = weighted_objective(model, recipe)
    assert member_chunk(member, start, (w,), x, y) is None  # the default budget fits all five
    monkeypatch.setenv("BOOK_MEMORY_GB", "3e-7")  # ~320 bytes: about one member's activations on 16 rows
    chunk = member_chunk(member, start, (w,), x, y, batch_size)
    assert chunk is not None and 1 <= chunk < 5
    chunked = fit_ensemble(recipe, model, x, y, weights=w, progress=False)
    for k in whole.params:
        torch.testing.assert_close(chunked.params[k], whole.params[k], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(chunked.history, whole.history, rtol=1e-12)
    np.testing.assert_array_equal(chunked.lr, whole.lr)
    # call_in_chunks: one vmapped call's gradients and values, whatever the chunk
    vg = torch.func.vmap(torch.func.grad_and_value(member), in_dims=(0, 0, None, None, None, None))
    g1, v1 = vg(start, (w,), x, y, None, 1.0)
    for c in (1, 2, 3):
        g2, v2 = call_in_chunks(vg, start, (w,), x, y, None, 1.0, chunk=c)
        torch.testing.assert_close(v2, v1, rtol=1e-13, atol=0)
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-13, atol=1e-15)


def test_fit_to_tolerance_backends_agree_and_autodiff_serves_any_model():
    """The closed-form backend (softmax regression) and autodiff reach the same θ̂; an MLP trained the same way
    meets the tolerance with the objective's own gradient, checked independently by torch.autograd."""
    from helpers import closed_form, models

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    zero = closed_form.model_at(torch.zeros(3, 5, dtype=torch.float64))
    closed = train.fit_to_tolerance(zero, x, y, l2=0.1, tol=1e-11, snapshots=[1e-2], cache=False)
    auto = train.fit_to_tolerance(zero, x, y, l2=0.1, tol=1e-11, snapshots=[1e-2], cache=False, backend="autodiff")
    assert (closed.backend, auto.backend) == ("closed_form", "autodiff")
    assert auto.theta.shape == closed.theta.shape == (3, 5)  # one trained tensor: in its own shape
    assert torch.allclose(auto.theta, closed.theta, rtol=0, atol=1e-10)
    assert closed.snapshots[1e-2][1] < 1e-2 and closed.converged and auto.converged

    mlp = models.build("mlp", d_in=5, n_classes=3, depth=1, width=4, seed=0, dtype=torch.float64)
    fit = train.fit_to_tolerance(mlp, x, y, l2=0.5, tol=1e-9, cache=False)
    assert fit.backend == "autodiff" and fit.theta.dim() == 1 and set(fit.params) == {n for n, _ in mlp.named_parameters()}
    params = {n: v.clone().requires_grad_(True) for n, v in fit.params.items()}
    grads = torch.autograd.grad(objective(mlp, params, x, y, l2=0.5), list(params.values()))
    assert float(torch.cat([g.reshape(-1) for g in grads]).norm()) < 1e-9
    assert fit.grad_norm == pytest.approx(float(torch.cat([g.reshape(-1) for g in grads]).norm()), rel=1e-3, abs=1e-12)
    with pytest.raises(ValueError, match="closed_form"):
        train.fit_to_tolerance(mlp, x, y, l2=0.5, backend="closed_form", cache=False)
    with pytest.raises(RuntimeError, match="did not reach"):
        train.fit_to_tolerance(mlp, x, y, l2=0.5, tol=1e-30, lbfgs_max_iter=3, newton_max_iter=1, cache=False)
