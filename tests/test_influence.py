"""helpers.influence against closed forms and retraining, float64, tiny problems."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, hessian, vmap

from helpers.influence import directional_derivatives, per_sample_grads, predict_param_change, predict_removal
from helpers.objective import model_params, objective, param_names, per_sample_losses, removal_weights
from tiny_models import TinyMLP

DT = torch.float64


def data(n: int, seed: int, c: int = 3, loss: str = "cross_entropy"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(c, (n,), generator=g) if loss == "cross_entropy" else torch.randn(n, c, generator=g, dtype=DT)
    return x, y


def flat(P: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in P.values()])


def unflat(P: dict[str, torch.Tensor], vec: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, p in P.items():
        out[k] = vec[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def loop_grads(model, names, x, y, loss):
    """Reference: one torch.autograd.grad call per sample."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        li = per_sample_losses(model, dict(model.named_parameters()), x[i : i + 1], y[i : i + 1], loss)[0]
        named = dict(model.named_parameters())
        gs = torch.autograd.grad(li, [named[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


@pytest.mark.parametrize("which", ["all", "last"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_per_sample_grads_equal_a_loop_of_autograd(which, loss):
    torch.manual_seed(0)
    model = TinyMLP().to(DT)
    x, y = data(9, seed=1, loss=loss)
    names = param_names(model, which)
    G = per_sample_grads(model, model_params(model, names), x, y, loss=loss)
    ref = loop_grads(model, names, x, y, loss)
    assert G.shape == ref.shape == (9, sum(p.numel() for p in model_params(model, names).values()))
    assert not G.requires_grad
    assert torch.allclose(G, ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(per_sample_grads(model, model_params(model, names), x, y, loss, chunk_size=4), G, atol=1e-15)


def dense_reference(model, names, x_tr, y_tr, x_te, y_te, l2, weights, damping):
    """(w_i) g_testᵀ (H + δI)⁻¹ g_i with H from torch.func.hessian and gradients from an autograd loop."""
    P = model_params(model, names)
    theta = flat(P)
    H = hessian(lambda v: objective(model, unflat(P, v), x_tr, y_tr, weights=weights, l2=l2))(theta).detach()
    g_tr = loop_grads(model, names, x_tr, y_tr, "cross_entropy")
    g_te = loop_grads(model, names, x_te, y_te, "cross_entropy")
    n = x_tr.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=DT) if weights is None else weights
    A = H + damping * torch.eye(theta.numel(), dtype=DT)
    return (g_te @ torch.linalg.solve(A, g_tr.T)) * w[None, :]


@pytest.mark.parametrize("which", ["all", "last"])
@pytest.mark.parametrize("weighted", [False, True])
def test_predict_removal_equals_dense_formula(which, weighted):
    torch.manual_seed(2)
    model = TinyMLP().to(DT)
    x_tr, y_tr = data(20, seed=3)
    x_te, y_te = data(3, seed=4)
    weights = torch.rand(20, generator=torch.Generator().manual_seed(5), dtype=DT) / 20 if weighted else None
    damping = 0.7  # a random MLP's Hessian is indefinite: damping makes Cholesky applicable
    ref = dense_reference(model, param_names(model, which), x_tr, y_tr, x_te, y_te, 0.01, weights, damping)
    res = predict_removal(
        model, (x_tr, y_tr), (x_te, y_te), params=which, l2=0.01, weights=weights, damping=damping, fallback="eig"
    )
    assert res.values.shape == (3, 20)
    assert res.param_names == param_names(model, which)
    assert float(torch.linalg.norm(res.values - ref) / torch.linalg.norm(ref)) < 1e-10
    assert res.solve.relative_residual.shape == (3,) and float(res.solve.relative_residual.max()) < 1e-10
    # an iterative solver on the same problem agrees to its tolerance
    if which == "last":
        cg = predict_removal(
            model, (x_tr, y_tr), (x_te, y_te), params=which, l2=0.01, weights=weights, damping=damping, method="cg"
        )
        assert float(torch.linalg.norm(cg.values - ref) / torch.linalg.norm(ref)) < 1e-8


def test_l2_can_be_left_out_of_the_hessian():
    torch.manual_seed(6)
    model = TinyMLP().to(DT)
    x_tr, y_tr = data(20, seed=7)
    x_te, y_te = data(2, seed=8)
    names = param_names(model, "last")
    ref = dense_reference(model, names, x_tr, y_tr, x_te, y_te, l2=0.0, weights=None, damping=0.2)
    res = predict_removal(
        model, (x_tr, y_tr), (x_te, y_te), params="last", l2=0.5, include_l2_in_hessian=False, damping=0.2
    )
    assert res.l2_in_hessian == 0.0
    assert float(torch.linalg.norm(res.values - ref) / torch.linalg.norm(ref)) < 1e-10


def test_ridge_leave_one_out_newton_step_and_sherman_morrison():
    """Ridge regression: influence = exact LOO change × (1 − h_i), for every training point at once."""
    n, p, lam = 14, 3, 0.1
    g = torch.Generator().manual_seed(9)
    X = torch.randn(n, p, generator=g, dtype=DT)
    Y = (X @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT))[:, None]
    model = nn.Linear(p, 1, bias=False).to(DT)
    H = X.T @ X / n + lam * torch.eye(p, dtype=DT)  # Hessian of (1/n)Σ ½(θᵀx − y)² + (λ/2)‖θ‖²
    theta = torch.linalg.solve(H, X.T @ Y[:, 0] / n)
    with torch.no_grad():
        model.weight.copy_(theta[None, :])

    # exact leave-one-out ("drop": the others keep weight 1/n) from the normal equations without point i
    H_loo = H - X[:, :, None] * X[:, None, :] / n  # [n, p, p]
    rhs_loo = (X.T @ Y[:, 0])[None, :] / n - X * Y / n  # [n, p]
    theta_loo = torch.linalg.solve(H_loo, rhs_loo)  # [n, p]

    # one Newton step on each leave-one-out objective from θ̂, through the library's objective
    P = model_params(model)
    W = removal_weights(n, list(range(n)), "drop")

    def loo_objective(vec, w):
        return objective(model, unflat(P, vec), X, Y, weights=w, l2=lam, loss="mse")

    grads = vmap(grad(loo_objective), in_dims=(None, 0))(theta, W)
    hessians = vmap(hessian(loo_objective), in_dims=(None, 0))(theta, W)
    newton = theta[None, :] - torch.linalg.solve(hessians, grads)
    assert torch.allclose(newton, theta_loo, rtol=1e-10, atol=1e-12)

    change, result = predict_param_change(model, (X, Y), l2=lam, loss="mse", return_solve=True)
    assert change.shape == (n, p) and float(result.relative_residual.max()) < 1e-12
    leverage = torch.einsum("ip,pq,iq->i", X, torch.linalg.inv(H), X) / n
    true_change = theta_loo - theta[None, :]
    assert torch.allclose(change / (1 - leverage)[:, None], true_change, rtol=1e-10, atol=1e-13)
    assert torch.allclose(change, true_change * (1 - leverage)[:, None], rtol=1e-10, atol=1e-13)
    # and the test-loss prediction is the test gradient applied to that change
    x_te = torch.randn(2, p, generator=g, dtype=DT)
    y_te = torch.randn(2, 1, generator=g, dtype=DT)
    values = predict_removal(model, (X, Y), (x_te, y_te), l2=lam, loss="mse").values
    g_te = per_sample_grads(model, P, x_te, y_te, loss="mse")
    assert torch.allclose(values, g_te @ change.T, rtol=1e-10, atol=1e-15)


def softmax_regression_newton(x, y, l2, W, theta0, steps):
    """Newton's method on Σ_i w_i ℓ_i + (λ/2)‖θ‖² for nn.Linear(p, c) softmax regression, in closed form.

    Batched over the rows of the weight matrix ``W`` [m, n]; θ in nn.Linear's flat order (weight [c, p]
    row-major, then bias [c]). Independent of the library's autodiff: J_i = [I_c ⊗ x_iᵀ, I_c].
    """
    n, p = x.shape
    c = int(y.max()) + 1
    eye_c = torch.eye(c, dtype=DT)
    J = torch.cat([torch.einsum("ab,ij->iabj", eye_c, x).reshape(n, c, c * p), eye_c.expand(n, c, c)], dim=2)
    onehot = torch.nn.functional.one_hot(y, c).to(DT)
    theta = theta0.expand(W.shape[0], -1).clone()
    for _ in range(steps):
        probs = torch.softmax(torch.einsum("icd,md->mic", J, theta), dim=2)  # [m, n, c]
        g = torch.einsum("mi,icd,mic->md", W, J, probs - onehot) + l2 * theta
        H_out = torch.diag_embed(probs) - probs[..., :, None] * probs[..., None, :]
        H = torch.einsum("mi,icd,mice,ief->mdf", W, J, H_out, J) + l2 * torch.eye(J.shape[2], dtype=DT)
        theta = theta - torch.linalg.solve(H, g)
    return theta, g


def test_logistic_regression_matches_leave_one_out_retraining_for_every_point():
    n, l2 = 100, 0.05
    torch.manual_seed(10)
    model = nn.Linear(4, 3).to(DT)
    x_tr, y_tr = data(n, seed=11)
    x_te, y_te = data(4, seed=12)
    full = torch.full((1, n), 1.0 / n, dtype=DT)
    theta, g = softmax_regression_newton(x_tr, y_tr, l2, full, flat(model_params(model)), steps=30)
    assert float(g.norm()) < 1e-14
    with torch.no_grad():
        model.weight.copy_(theta[0, :12].reshape(3, 4))
        model.bias.copy_(theta[0, 12:])
    P = model_params(model)
    # exact retraining without each point ("drop" weights), all at once, warm-started at θ̂ (convex: unique)
    thetas, g_loo = softmax_regression_newton(x_tr, y_tr, l2, removal_weights(n, list(range(n)), "drop"), theta[0], 12)
    assert float(g_loo.norm(dim=1).max()) < 1e-14
    base = per_sample_losses(model, P, x_te, y_te)
    after = vmap(lambda v: per_sample_losses(model, unflat(P, v), x_te, y_te))(thetas)  # [n, n_test]
    delta_true = (after - base[None, :]).T  # [n_test, n_train]

    pred = predict_removal(model, (x_tr, y_tr), (x_te, y_te), l2=l2).values
    err = torch.linalg.norm(pred - delta_true) / torch.linalg.norm(delta_true)
    assert float(err) < 0.12  # the second-order remainder: ≈ 0.08 here, ≈ 0.23 at n = 30 — O(1/n) relative
    for t in range(4):
        r = torch.corrcoef(torch.stack([pred[t], delta_true[t]]))[0, 1]
        assert float(r) > 0.999


def test_bad_inputs_raise_clear_errors():
    torch.manual_seed(13)
    model = TinyMLP().to(DT)
    x_tr, y_tr = data(10, seed=14)
    x_te, y_te = data(2, seed=15)
    with pytest.raises(TypeError, match="test x is torch.float32 but params are torch.float64"):
        predict_removal(model, (x_tr, y_tr), (x_te.float(), y_te), damping=1.0)
    with pytest.raises(TypeError, match="train x is torch.float32"):
        predict_removal(model, (x_tr.float(), y_tr), (x_te, y_te), damping=1.0)
    with pytest.raises(TypeError, match="model tensor 'hidden.weight' is torch.float32"):
        mixed = TinyMLP()  # float32, with only the last layer cast to float64
        mixed.last_layer.to(DT)
        predict_removal(mixed, (x_tr, y_tr), (x_te, y_te), params="last")
    with pytest.raises(ValueError, match="same number of rows"):
        per_sample_grads(model, model_params(model), x_tr, y_tr[:-1])
    with pytest.raises(AttributeError, match="last_layer"):
        predict_removal(nn.Sequential(nn.Linear(4, 3)).to(DT), (x_tr, y_tr), (x_te, y_te), params="last")
    with torch.no_grad():
        model.last_layer.bias[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        predict_removal(model, (x_tr, y_tr), (x_te, y_te), damping=1.0)


class SqrtModel(nn.Module):
    """Finite loss, but d/da sqrt(a·x) = x / (2 sqrt(a·x)) is 0/0 on a zero row."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(1, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.a * x)


def test_non_finite_gradient_names_the_row():
    x = torch.rand(5, 3, generator=torch.Generator().manual_seed(16), dtype=DT) + 0.1
    x[3] = 0.0
    y = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="row 3"):
        per_sample_grads(SqrtModel(), model_params(SqrtModel()), x, y)


@pytest.mark.parametrize("which, loss", [("all", "cross_entropy"), ("last", "mse")])
def test_directional_derivatives_equal_gradients_times_vectors(which, loss):
    torch.manual_seed(17)
    model = TinyMLP().to(DT)
    x, y = data(15, seed=18)
    if loss == "mse":
        y = torch.randn(15, 3, generator=torch.Generator().manual_seed(19), dtype=DT)
    names = param_names(model, which)
    P = model_params(model, names)
    G = loop_grads(model, names, x, y, loss)  # [n, d], an independent autograd loop
    V = torch.randn(G.shape[1], 4, generator=torch.Generator().manual_seed(20), dtype=DT)
    out = directional_derivatives(model, P, x, y, V, loss)
    assert out.shape == (4, 15)
    torch.testing.assert_close(out, (G @ V).T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(directional_derivatives(model, P, x, y, V, loss, chunk_size=3), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="V must be"):
        directional_derivatives(model, P, x, y, V[:-1], loss)
    with pytest.raises(TypeError, match="cast V"):
        directional_derivatives(model, P, x, y, V.float(), loss)
    xz = torch.rand(5, 3, generator=torch.Generator().manual_seed(21), dtype=DT) + 0.1
    xz[2] = 0.0
    with pytest.raises(ValueError, match="row 2"):
        directional_derivatives(SqrtModel(), model_params(SqrtModel()), xz, torch.tensor([0, 1, 2, 0, 1]),
                                torch.ones(1, 1, dtype=DT))


def test_a_tiny_memory_budget_chunks_rows_and_columns_without_changing_the_answer(monkeypatch):
    """BOOK_MEMORY_GB far below one row's activations: per-sample gradients one row per vmapped call, directional
    derivatives one column over blocks of one row — the same numbers as the autograd loop; and predict_removal
    through all of it (the exact solve too: its 59² matrix no longer fits, so it runs as CG) equals the dense
    formula."""
    torch.manual_seed(3)
    model = TinyMLP().to(DT)
    x, y = data(11, seed=4)
    xt, yt = data(3, seed=5)
    names = param_names(model, "all")
    P = model_params(model, names)
    G = loop_grads(model, names, x, y, "cross_entropy")
    V = torch.randn(G.shape[1], 3, generator=torch.Generator().manual_seed(6), dtype=DT)
    ref = dense_reference(model, names, x, y, xt, yt, 0.05, None, 0.0)
    monkeypatch.setenv("BOOK_MEMORY_GB", "1e-9")
    torch.testing.assert_close(per_sample_grads(model, P, x, y), G, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(directional_derivatives(model, P, x, y, V), (G @ V).T, rtol=1e-12, atol=1e-14)
    est = predict_removal(model, (x, y), (xt, yt), l2=0.05)
    assert est.solve.method == "cg" and "memory budget" in est.solve.info["fallback"]
    torch.testing.assert_close(est.values, ref, rtol=1e-7, atol=1e-12)


def test_auto_damping_is_derived_from_the_spectrum_and_reported():
    """damping="auto": δ = 0 on an L2-regularised logistic regression (H positive definite), so the estimate is the
    undamped dense formula; the δ used and the eigenvalues behind it are in the result."""
    from helpers.solvers import auto_damping

    torch.manual_seed(8)
    model = nn.Linear(4, 3).to(DT)
    x, y = data(30, seed=9)
    xt, yt = data(2, seed=10)
    est = predict_removal(model, (x, y), (xt, yt), l2=0.1, damping="auto")
    info = est.solve.info
    assert info["eigenvalue_min"] > 0.1 - 1e-12 and est.damping == 0.0 == auto_damping(info["eigenvalue_min"],
                                                                                       info["eigenvalue_max"])
    ref = dense_reference(model, param_names(model, "all"), x, y, xt, yt, 0.1, None, 0.0)
    torch.testing.assert_close(est.values, ref, rtol=1e-9, atol=1e-13)
