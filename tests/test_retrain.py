"""helpers.retrain: ground-truth protocols against separately computed fits and closed forms (float64)."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers
from helpers import retrain
from helpers.objective import per_sample_losses, removal_weights
from helpers.retrain import GroundTruth, cold_start, pbrf, warm_start
from helpers.train import Recipe, fit
from tiny_models import LogReg, MLP





def make_data(n: int, d: int = 3, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, c, generator=g, dtype=torch.float64)
    y = (2 * x @ w + 0.7 * torch.randn(n, c, generator=g, dtype=torch.float64)).argmax(1)
    return x, y


NEWTON = Recipe(optimizer="newton", weight_decay=1e-2, tol=1e-12, max_iter=50)
REMOVED = [0, 5, 17, 33]


@pytest.fixture(scope="module")
def convex():
    """L2 logistic regression on 40 points × 3 features × 3 classes, θ̂ by Newton well below the tolerance."""
    torch.manual_seed(0)
    model = LogReg().double()
    train, test = make_data(40, seed=1), make_data(6, seed=2)
    theta = fit(NEWTON.replace(tol=1e-14), model, *train, progress=False)
    assert theta.grad_norm < 1e-13
    return model, theta.params, train, test


def loo_test_losses(model, theta, train, test, recipe, i, loo="drop", params="all"):
    """One leave-one-out fit by itself, and its test losses."""
    w = removal_weights(train[0].shape[0], [i], loo)[0]
    res = fit(recipe, model, *train, weights=w, init=theta, params=params, progress=False)
    work = helpers.train.model_with(model, theta)
    return per_sample_losses(work, res.params, *test).detach()


@pytest.mark.parametrize("loo", ["drop", "reaverage"])
def test_warm_start_newton_matches_separate_leave_one_out_fits(convex, loo):
    model, theta, train, test = convex
    gt = warm_start(model, theta, train, test, REMOVED, NEWTON, loo=loo, progress=False, cache=False)
    assert isinstance(gt, GroundTruth) and gt.protocol == "warm_start"
    assert gt.delta.shape == (6, 4) and gt.drift.shape == (6,) and gt.test_losses.shape == (5, 6)
    assert np.abs(gt.drift).max() < 1e-12  # θ̂ is the minimum: nothing removed, nothing moves
    assert (gt.grad_norm < 1e-12).all()
    ref = per_sample_losses(model, theta, *test)
    np.testing.assert_allclose(gt.ref_loss, ref.numpy(), rtol=1e-13)
    for j, i in enumerate(REMOVED):
        expected = (loo_test_losses(model, theta, train, test, NEWTON, i, loo) - ref).numpy()
        np.testing.assert_allclose(gt.delta[:, j], expected, rtol=1e-9, atol=1e-12)
    assert np.abs(gt.delta).max() > 1e-4  # removals matter, so the comparison has teeth
    assert gt.recipe == NEWTON.to_dict() and list(gt.removed) == REMOVED


def test_warm_start_last_layer_only_matches_separate_fits():
    torch.manual_seed(1)
    model = MLP(width=4).double()
    train, test = make_data(30, seed=3), make_data(4, seed=4)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}  # any θ̂: the head problem is convex
    recipe = NEWTON
    gt = warm_start(model, theta, train, test, [2, 11], recipe, params="last", keep_params=True,
                    progress=False, cache=False)
    assert set(gt.params) == {"net.2.weight", "net.2.bias"}
    ref = per_sample_losses(model, theta, *test).detach()
    for j, i in enumerate([2, 11]):
        expected = loo_test_losses(model, theta, train, test, recipe, i, params="last") - ref
        np.testing.assert_allclose(gt.delta[:, j], expected.numpy(), rtol=1e-9, atol=1e-12)
    # θ̂ was not a minimum of the head problem: the drift member moves, and the drift says so
    assert np.abs(gt.drift).max() > 1e-3


def test_cold_start_shapes_and_convex_agreement_with_warm_start(convex):
    model, theta, train, test = convex
    seeds = [0, 1, 2]
    gt = cold_start(model, train, test, REMOVED, NEWTON, seeds, theta_hat=theta, progress=False, cache=False)
    assert gt.protocol == "cold_start"
    assert gt.delta.shape == (6, 4) and gt.delta_per_seed.shape == (3, 6, 4) and gt.noise.shape == (6, 4)
    assert gt.drift.shape == (3, 6) and gt.test_losses.shape == (3, 5, 6) and gt.grad_norm.shape == (3, 5)
    # a unique minimum: every seed lands on it, so there is no seed noise and cold start = warm start
    warm = warm_start(model, theta, train, test, REMOVED, NEWTON, progress=False, cache=False)
    np.testing.assert_allclose(gt.delta, warm.delta, rtol=1e-8, atol=1e-11)
    assert np.abs(gt.noise).max() < 1e-11 and np.abs(gt.drift).max() < 1e-11
    np.testing.assert_allclose(gt.delta, gt.delta_per_seed.mean(0))


def test_cold_start_nonconvex_has_seed_noise():
    torch.manual_seed(2)
    model = MLP(width=4).double()
    train, test = make_data(30, seed=5), make_data(4, seed=6)
    recipe = Recipe(optimizer="adam", lr=0.05, epochs=60)
    gt = cold_start(model, train, test, [1, 2, 3], recipe, [0, 1], progress=False, cache=False)
    assert gt.delta_per_seed.shape == (2, 4, 3) and gt.noise.shape == (4, 3) and gt.drift.shape == (2, 4)
    np.testing.assert_allclose(gt.noise, gt.delta_per_seed.std(0, ddof=1))
    assert (gt.noise > 0).all()
    # Δ is paired by seed: the full-data fit of each seed is its own reference
    np.testing.assert_allclose(gt.delta_per_seed[1], (gt.test_losses[1, :3] - gt.test_losses[1, 3]).T)
    one = cold_start(model, train, test, [1], recipe, [0], progress=False, cache=False)
    assert np.isnan(one.noise).all()  # one seed cannot measure seed noise


def linear_design(x: torch.Tensor, c: int) -> torch.Tensor:
    """A_j with h(θ, x_j) = A_j θ for θ = [vec(W) row-major, b] of nn.Linear(d, c): [n, c, c·d + c]."""
    n, d = x.shape
    eye = torch.eye(c, dtype=x.dtype)
    return torch.cat([torch.einsum("ab,nd->nabd", eye, x).reshape(n, c, c * d), eye.expand(n, c, c)], dim=2)


def test_pbrf_mse_linear_model_equals_closed_form():
    """For h = A_j θ and ℓ = ½‖h − y‖² the PBRF objective is exactly quadratic. With u = θ − θˢ,

        ½ uᵀG u − (1/n)[ℓ_i(θˢ) + g_iᵀu + ½ uᵀH_i u] + ((λ+δ)/2)‖u‖²,   G = (1/n)Σ_j A_jᵀA_j, H_i = A_iᵀA_i,

    so θ_PBRF = θˢ + (G + (λ+δ)I − H_i/n)⁻¹ (1/n) g_i, g_i = A_iᵀ(A_iθˢ − y_i): the influence formula
    (G + (λ+δ)I)⁻¹ (1/n) g_i plus the exact curvature of the point's own (quadratic) loss."""
    g = torch.Generator().manual_seed(0)
    n, d, c = 20, 3, 2
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, c, generator=g, dtype=torch.float64)
    xt, yt = torch.randn(5, d, generator=g, dtype=torch.float64), torch.randn(5, c, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(d, c).double()
    theta_s = {k: v.detach().clone() for k, v in model.named_parameters()}  # PBRF needs no minimum
    lam, delta = 0.1, 0.05
    recipe = Recipe(optimizer="newton", weight_decay=lam, tol=1e-13, loss="mse")
    removed = [0, 4, 13]
    gt = pbrf(model, theta_s, (x, y), (xt, yt), removed, recipe, delta, keep_params=True, progress=False,
              cache=False)
    A = linear_design(x, c)
    G = torch.einsum("nca,ncb->ab", A, A) / n
    t_s = torch.cat([theta_s["weight"].reshape(-1), theta_s["bias"]])
    p = t_s.numel()
    for j, i in enumerate(removed):
        Ai = A[i]
        gi = Ai.T @ (Ai @ t_s - y[i])
        u = torch.linalg.solve(G + (lam + delta) * torch.eye(p, dtype=torch.float64) - Ai.T @ Ai / n, gi / n)
        t = t_s + u
        torch.testing.assert_close(gt.params["weight"][j], t[:c * d].reshape(c, d), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(gt.params["bias"][j], t[c * d:], rtol=1e-10, atol=1e-13)
        pred = xt @ t[:c * d].reshape(c, d).T + t[c * d:]
        pred_s = xt @ theta_s["weight"].T + theta_s["bias"]
        expected = 0.5 * ((pred - yt) ** 2).sum(1) - 0.5 * ((pred_s - yt) ** 2).sum(1)
        np.testing.assert_allclose(gt.delta[:, j], expected.numpy(), rtol=1e-9, atol=1e-13)
    assert all(torch.equal(gt.params[k][-1], theta_s[k]) for k in theta_s)
    assert (gt.drift == 0).all()


def test_pbrf_adam_drift_member_stays_exactly_at_theta_s():
    torch.manual_seed(3)
    model = MLP(width=4).double()
    train, test = make_data(25, seed=7), make_data(4, seed=8)
    theta_s = {k: v.detach().clone() for k, v in model.named_parameters()}
    recipe = Recipe(optimizer="adam", lr=0.01, epochs=40, weight_decay=1e-3)
    gt = pbrf(model, theta_s, train, test, [3, 9], recipe, damping=1e-2, keep_params=True, progress=False,
              cache=False)
    for k, v in theta_s.items():
        assert torch.equal(gt.params[k][-1], v), k  # bit for bit: its gradient is exactly zero
        assert not torch.equal(gt.params[k][0], v)  # the removal members do move
    assert (gt.drift == 0).all()
    assert gt.delta.shape == (4, 2) and np.abs(gt.delta).max() > 0


def test_pbrf_cross_entropy_newton_is_stationary_for_an_independent_kl_objective():
    torch.manual_seed(4)
    model = LogReg().double()
    train, test = make_data(30, seed=9), make_data(3, seed=10)
    x, y = train
    theta_s = {k: v.detach().clone() for k, v in model.named_parameters()}
    lam, delta, i = 1e-2, 1e-3, 7
    recipe = Recipe(optimizer="newton", weight_decay=lam, tol=1e-12)
    gt = pbrf(model, theta_s, train, test, [i], recipe, delta, keep_params=True, progress=False, cache=False)
    n = x.shape[0]
    p_s = F.softmax(model(x), dim=1).detach()
    theta = {k: v[0].clone().requires_grad_(True) for k, v in gt.params.items()}
    logits = torch.func.functional_call(model, theta, (x,))
    kl = F.kl_div(F.log_softmax(logits, 1), p_s, reduction="sum") / n  # Σ_j KL(p_s,j ‖ q_j) / n
    obj = (kl - F.cross_entropy(logits[i:i + 1], y[i:i + 1], reduction="sum") / n
           + 0.5 * (lam + delta) * sum(((theta[k] - theta_s[k]) ** 2).sum() for k in theta))
    grads = torch.autograd.grad(obj, list(theta.values()))
    assert float(torch.sqrt(sum((g * g).sum() for g in grads))) < 1e-11
    assert float((gt.params["linear.weight"][0] - theta_s["linear.weight"]).abs().max()) > 1e-4


def test_protocol_runs_go_through_the_cache_hook(convex, monkeypatch):
    model, theta, train, test = convex
    calls = []

    def memoize(name, key, compute):
        calls.append((name, key))
        return compute()

    monkeypatch.setattr(helpers.retrain, "memoize", memoize)
    a = warm_start(model, theta, train, test, [1], NEWTON, progress=False)
    pbrf(model, theta, train, test, [1], NEWTON, 1e-3, progress=False)
    warm_start(model, theta, train, test, [1], NEWTON, progress=False, cache=False)  # bypasses the hook
    assert [c[0] for c in calls] == ["warm_start", "pbrf"]
    assert calls[0][1]["recipe"] == NEWTON.to_dict() and calls[0][1]["removed"] == [1]
    assert a.removed.tolist() == [1]


def test_a_repeated_protocol_run_is_a_cache_hit(convex, monkeypatch, tmp_path):
    cache = pytest.importorskip("helpers.cache")
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BOOK_CACHE", raising=False)
    model, theta, train, test = convex
    first = warm_start(model, theta, train, test, [1, 2], NEWTON, progress=False)
    again = warm_start(model, theta, train, test, [1, 2], NEWTON, progress=False)
    other = warm_start(model, theta, train, test, [1, 3], NEWTON, progress=False)
    events = [e["event"] for e in cache.read_log(tmp_path)]
    assert events == ["miss", "hit", "miss"]
    np.testing.assert_array_equal(first.delta, again.delta)
    assert not np.array_equal(first.delta, other.delta)


def test_bad_removal_index_is_named(convex):
    model, theta, train, test = convex
    with pytest.raises(ValueError, match=r"outside the training set \[0, 40\)"):
        warm_start(model, theta, train, test, [40], NEWTON, progress=False, cache=False)
    with pytest.raises(ValueError, match="outside"):
        warm_start(model, theta, train, test, [-1], NEWTON, progress=False, cache=False)
    assert retrain._check_removed(np.array([3, 4]), 5) == [3, 4]


def test_warm_start_newton_on_softmax_regression_runs_the_convex_chord_backend():
    """A Newton warm start on a bias-free LogisticRegression is closed_form.leave_one_out (protocol "convex_chord");
    the batched Newton ensemble (autodiff) reaches the same leave-one-out truths to the tolerance."""
    from helpers import closed_form
    from helpers.train import Recipe, fit_to_tolerance

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (30,), generator=gen)
    model = closed_form.model_at(torch.zeros(3, 4, dtype=torch.float64))
    theta = fit_to_tolerance(model, x, y, l2=0.05, tol=1e-12, cache=False).theta
    fitted = closed_form.model_at(theta)
    recipe = Recipe(optimizer="newton", tol=1e-11, max_iter=50, weight_decay=0.05)
    test = (x[:3] + 0.1, y[:3])
    closed = retrain.warm_start(fitted, None, (x, y), test, [0, 4, 7], recipe, cache=False)
    direct = closed_form.leave_one_out(x, y, test, theta, [0, 4, 7], l2=0.05, tol=1e-11, max_iter=50, cache=False)
    auto = retrain.warm_start(fitted, None, (x, y), test, [0, 4, 7], recipe, cache=False, backend="autodiff",
                              progress=False)
    assert closed.protocol == "convex_chord" and auto.protocol == "warm_start"
    assert np.array_equal(closed.delta, direct.delta)
    np.testing.assert_allclose(auto.delta, closed.delta, rtol=0, atol=1e-10)
    with pytest.raises(TypeError, match="factor"):
        retrain.warm_start(fitted, None, (x, y), test, [0], recipe.replace(optimizer="lbfgs"), cache=False,
                           factor=closed_form.factorize(x, theta, l2=0.05))
