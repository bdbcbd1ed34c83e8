"""helpers.solvers against a direct solve, float64, tiny problems."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.curvature import CurvatureOperator, hessian_operator, minibatch_hvp
from helpers.influence import per_sample_grads
from helpers.objective import model_params, param_names
from helpers.solvers import (
    IndefiniteHessianError,
    NotPositiveDefiniteError,
    SingularHessianError,
    relative_residual,
    solve,
)
from tiny_models import TinyMLP

DT = torch.float64


def logistic_problem(seed: int = 0, n: int = 40, l2: float = 0.05):
    """Multinomial logistic regression (4 features, 3 classes, bias): H ≻ 0 thanks to the L2 term. d = 15."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).to(DT)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(3, (n,), generator=g)
    P = model_params(model)
    return model, P, x, y, hessian_operator(model, P, x, y, l2=l2)


def dense(op) -> torch.Tensor:
    H = op.dense()
    return 0.5 * (H + H.T)


def independent_residual(H: torch.Tensor, damping: float, X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    A = H + damping * torch.eye(H.shape[0], dtype=DT)
    return torch.linalg.norm(A @ X - B, dim=0) / torch.linalg.norm(B, dim=0)


def rhs(d: int, k: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=DT)


def rel_err(X: torch.Tensor, X_ref: torch.Tensor) -> torch.Tensor:
    return torch.linalg.norm(X - X_ref, dim=0) / torch.linalg.norm(X_ref, dim=0)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_every_solver_reaches_the_direct_answer(damping):
    _, _, _, _, op = logistic_problem()
    H = dense(op)
    A = H + damping * torch.eye(op.dim, dtype=DT)
    evals = torch.linalg.eigvalsh(A)
    cond = float(evals[-1] / evals[0])
    B = rhs(op.dim)
    X_ref = torch.linalg.solve(A, B)

    cases = {
        # method: (options, stated tolerance on the relative error of the solution)
        "exact": ({}, 1e-12 * cond),
        "pinv": ({}, 1e-12 * cond),
        "cg": ({"rtol": 1e-10}, 1e-10 * cond),  # CG's rtol bounds the residual; error ≤ κ · residual
        "lissa": ({"depth": 600}, None),  # bound computed below from the contraction factor
        "arnoldi": ({"rank": op.dim}, 1e-12 * cond),  # full rank: exact
    }
    for method, (options, tol) in cases.items():
        res = solve(op, B, method=method, damping=damping, **options)
        assert res.x.shape == B.shape and res.relative_residual.shape == (B.shape[1],)
        err = rel_err(res.x, X_ref)
        if method == "lissa":
            rho = 1.0 - float(evals[0]) / res.info["scale"]  # per-step contraction of the slowest mode
            tol = rho ** (options["depth"] + 1) * cond + 1e-12 * cond
        assert float(err.max()) <= tol, (method, err, tol)
        # the residual the solver reports is the true one
        indep = independent_residual(H, damping, res.x, B)
        assert torch.allclose(res.relative_residual, indep, rtol=1e-6, atol=1e-14), (method, indep)
        if method == "cg":
            assert float(res.relative_residual.max()) <= 1e-10 * 1.01
            assert all(res.info["converged"].tolist()) and res.iterations <= 10 * op.dim


def test_vector_rhs_keeps_its_shape():
    _, _, _, _, op = logistic_problem()
    b = rhs(op.dim)[:, 0]
    for method, options in [("exact", {}), ("cg", {}), ("lissa", {"depth": 10}), ("arnoldi", {"rank": 3})]:
        res = solve(op, b, method=method, **options)
        assert res.x.shape == (op.dim,) and res.relative_residual.shape == ()


def test_lissa_is_exactly_the_truncated_neumann_series():
    _, _, _, _, op = logistic_problem(seed=2)
    H = dense(op)
    B = rhs(op.dim, 2)
    damping, scale, depth = 0.02, 3.0, 37
    A = H + damping * torch.eye(op.dim, dtype=DT)
    M = torch.eye(op.dim, dtype=DT) - A / scale
    series = sum(torch.linalg.matrix_power(M, j) for j in range(depth + 1)) @ B / scale
    res = solve(op, B, method="lissa", damping=damping, scale=scale, depth=depth)
    assert float(rel_err(res.x, series).max()) < 1e-12
    assert res.iterations == depth and res.info["hvps"] == depth * 2


def test_lissa_stochastic_is_seeded_and_truthful():
    model, P, x, y, op = logistic_problem(seed=3)
    hvp = minibatch_hvp(model, P, x, y, batch_size=10, l2=0.05)
    B = rhs(op.dim, 2)
    kw = dict(method="lissa", damping=0.5, scale=5.0, depth=50, repeats=2, hvp=hvp)
    a = solve(op, B, seed=11, **kw)
    b = solve(op, B, seed=11, **kw)
    c = solve(op, B, seed=12, **kw)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.info["stochastic"] and a.info["minibatch_products"] == 50 * 2 * 2
    indep = independent_residual(dense(op), 0.5, a.x, B)
    assert torch.allclose(a.relative_residual, indep, rtol=1e-6)
    assert float(a.relative_residual.max()) < 0.5  # a noisy but useful answer


def test_lissa_with_too_small_scale_raises():
    _, _, _, _, op = logistic_problem()
    top = float(torch.linalg.eigvalsh(dense(op))[-1])
    with pytest.raises(FloatingPointError, match="scale"):
        solve(op, rhs(op.dim), method="lissa", scale=top / 10, depth=2000)


def test_arnoldi_low_rank_is_the_truncated_eigen_solve():
    _, _, _, _, op = logistic_problem(seed=4)
    H = dense(op)
    B = rhs(op.dim)
    rank, damping = 6, 0.05
    vals, V = torch.linalg.eigh(H)
    Vr, lr = V[:, -rank:], vals[-rank:]  # H ≻ 0: largest magnitude = largest
    X_ref = Vr @ ((Vr.T @ B) / (lr + damping)[:, None])
    res = solve(op, B, method="arnoldi", rank=rank, damping=damping)
    assert float(rel_err(res.x, X_ref).max()) < 1e-8
    assert torch.allclose(res.info["eigenvalues"], lr, rtol=1e-10)
    indep = independent_residual(H, damping, res.x, B)
    assert torch.allclose(res.relative_residual, indep, rtol=1e-6)
    assert float(res.relative_residual.min()) > 1e-3  # truncation shows up in the residual
    assert res.iterations == res.info["hvps"] > 0


def test_cg_with_too_few_iterations_reports_its_true_residual():
    _, _, _, _, op = logistic_problem(seed=5)
    B = rhs(op.dim)
    res = solve(op, B, method="cg", maxiter=2)
    assert res.iterations == 2 and not any(res.info["converged"].tolist())
    indep = independent_residual(dense(op), 0.0, res.x, B)
    assert torch.allclose(res.relative_residual, indep, rtol=1e-10)
    assert float(res.relative_residual.min()) > 1e-4


def indefinite_mlp():
    torch.manual_seed(0)
    model = TinyMLP().to(DT)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g, dtype=DT)
    y = torch.randint(3, (24,), generator=g)
    return hessian_operator(model, model_params(model), x, y, l2=0.01)


def test_exact_raises_clear_error_on_indefinite_hessian():
    op = indefinite_mlp()
    evals = torch.linalg.eigvalsh(dense(op))
    lam_min = float(evals[0])
    assert lam_min < -1e-3  # the test's premise: a random MLP is far from a minimum
    with pytest.raises(IndefiniteHessianError) as info:
        solve(op, rhs(op.dim), method="exact")
    err = info.value
    assert abs(err.smallest_eigenvalue - lam_min) < 1e-10
    msg = str(err)
    assert f"{lam_min:.3e}" in msg and f"damping >= {abs(lam_min):.3e}" in msg and "pinv" in msg
    # enough damping makes it positive definite, and the exact solver then works
    res = solve(op, rhs(op.dim), method="exact", damping=abs(lam_min) + 0.1)
    assert res.method == "exact" and float(res.relative_residual.max()) < 1e-12


def test_exact_error_message_on_a_known_matrix():
    A = torch.diag(torch.tensor([-3.1e-4, 1.0, 2.0], dtype=DT))
    with pytest.raises(IndefiniteHessianError, match=r"smallest eigenvalue of H -3\.100e-04.*damping >= 3\.100e-04"):
        solve(A, torch.ones(3, dtype=DT))
    with pytest.raises(NotPositiveDefiniteError):  # the common base class catches both kinds
        solve(torch.diag(torch.tensor([0.0, 1.0], dtype=DT)), torch.ones(2, dtype=DT))


def test_exact_eig_fallback_solves_indefinite_systems_and_counts_negative_curvature():
    op = indefinite_mlp()
    H = dense(op)
    B = rhs(op.dim)
    evals = torch.linalg.eigvalsh(H)
    res = solve(op, B, method="exact", fallback="eig")
    assert res.method == "exact+eig"
    assert res.info["n_negative"] == int((evals < 0).sum()) > 0
    assert float(rel_err(res.x, torch.linalg.solve(H, B)).max()) < 1e-10
    assert float(res.relative_residual.max()) < 1e-10


def singular_last_layer():
    """Softmax last layer without bias and without L2: the Hessian has a width-dimensional null space."""
    torch.manual_seed(1)
    width, c = 5, 3
    model = TinyMLP(width=width, c=c, bias=False).to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randint(c, (30,), generator=g)
    P = model_params(model, param_names(model, "last"))
    op = hessian_operator(model, P, x, y, l2=0.0)
    # null space: add the same vector u to every class's weight row — the softmax does not change
    null = torch.stack([torch.ones(c, 1, dtype=DT) * torch.eye(width, dtype=DT)[j] for j in range(width)])
    null = null.reshape(width, -1).T  # [d, width], flat order of last_layer.weight ([c, width] row-major)
    return model, P, x, y, op, null


def test_pinv_gives_min_norm_solution_on_exactly_singular_last_layer():
    model, P, x, y, op, null = singular_last_layer()
    H = dense(op)
    assert float(torch.linalg.norm(H @ null)) < 1e-12 * float(torch.linalg.norm(H))  # premise: truly null
    with pytest.raises(SingularHessianError, match="pinv"):
        solve(op, rhs(op.dim), method="exact")
    # right-hand sides in the range: per-sample gradients (they sum to zero over classes)
    B = per_sample_grads(model, P, x[:4], y[:4]).T.contiguous()
    assert float(torch.linalg.norm(null.T @ B)) < 1e-12
    res = solve(op, B, method="pinv")
    assert res.info["n_zero"] == null.shape[1]
    assert float(res.relative_residual.max()) < 1e-10  # it solves H x = b ...
    Q, _ = torch.linalg.qr(null)
    assert float(torch.linalg.norm(Q.T @ res.x) / torch.linalg.norm(res.x)) < 1e-10  # ... with x ⟂ null space
    X_ref = torch.linalg.lstsq(H, B, rcond=1e-10).solution  # minimum-norm least squares (gelsd, SVD)
    assert float(rel_err(res.x, X_ref).max()) < 1e-8


def test_solve_rejects_bad_arguments():
    _, _, _, _, op = logistic_problem()
    B = rhs(op.dim)
    with pytest.raises(ValueError, match="method"):
        solve(op, B, method="newton")
    with pytest.raises(TypeError, match="rtol"):
        solve(op, B, method="exact", rtol=1e-3)
    with pytest.raises(TypeError, match="rank"):
        solve(op, B, method="arnoldi")
    with pytest.raises(ValueError, match="damping"):
        solve(op, B, damping=-1.0)
    with pytest.raises(ValueError, match="shape"):
        solve(op, B[:-1])
    with pytest.raises(TypeError, match="float32"):
        solve(op, B.float())
    bad = B.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        solve(op, bad)


def test_dense_matrix_input_is_accepted():
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=DT)
    b = torch.tensor([1.0, 2.0], dtype=DT)
    res = solve(A, b, method="cg")
    assert torch.allclose(res.x, torch.linalg.solve(A, b), rtol=1e-10)
    assert isinstance(CurvatureOperator.from_matrix(A), CurvatureOperator)


# ---------------------------------------------------------------------------------------------------------------
# block CG, preconditioning, mixed-precision refinement (issue 7: speed at unchanged accuracy)
# ---------------------------------------------------------------------------------------------------------------


def spread_spectrum(d: int = 60, seed: int = 0) -> torch.Tensor:
    """SPD matrix with eigenvalues 1e-2 … 1e2 spread log-uniformly: plain CG needs many steps."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    return (Q * torch.logspace(-2, 2, d, dtype=DT)) @ Q.T


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_block_cg_reaches_the_direct_answer_in_fewer_steps(damping):
    A = spread_spectrum()
    B = rhs(A.shape[0], k=6)
    X_ref = torch.linalg.solve(A + damping * torch.eye(A.shape[0], dtype=DT), B)
    cond = float(torch.linalg.cond(A + damping * torch.eye(A.shape[0], dtype=DT)))
    plain = solve(A, B, method="cg", damping=damping, rtol=1e-10)
    block = solve(A, B, method="cg", damping=damping, rtol=1e-10, block=True)
    assert block.method == "block-cg" and all(block.info["converged"].tolist())
    assert block.max_relative_residual <= 1e-10 * 1.01  # the true residual, recomputed by solve
    assert float(rel_err(block.x, X_ref).max()) <= 1e-10 * cond
    # the k columns share one Krylov space: fewer steps than column-wise CG (and never more than d / k + slack)
    assert block.iterations < plain.iterations
    assert sum(block.info["block_sizes"]) == block.info["hvps"]


def test_block_cg_with_dependent_columns_drops_them_instead_of_breaking_down():
    A = spread_spectrum(d=30)
    b = rhs(30, k=2)
    B = torch.cat([b, b[:, :1] * 3.0, b.sum(1, keepdim=True)], dim=1)  # rank 2, four columns
    res = solve(A, B, method="cg", rtol=1e-11, block=True)
    assert res.info["block_sizes"][0] == 2  # the dependent directions never enter the search block
    torch.testing.assert_close(res.x, torch.linalg.solve(A, B), rtol=1e-8, atol=1e-12)
    zero = solve(A, torch.zeros(30, 3, dtype=DT), method="cg", block=True)  # nothing to solve: X = 0, no products
    assert zero.iterations == 0 and float(zero.x.abs().max()) == 0.0


@pytest.mark.parametrize("block", [False, True])
def test_preconditioned_cg_is_exact_and_an_exact_preconditioner_converges_at_once(block):
    A = spread_spectrum()
    B = rhs(A.shape[0], k=3)
    X_ref = torch.linalg.solve(A, B)
    jacobi = torch.diagonal(A)
    res = solve(A, B, method="cg", rtol=1e-10, block=block, preconditioner=lambda R: R / jacobi[:, None])
    assert res.max_relative_residual <= 1e-10 * 1.01
    assert res.info["preconditioned"] and float(rel_err(res.x, X_ref).max()) < 1e-7
    Ainv = torch.linalg.inv(A)
    once = solve(A, B, method="cg", rtol=1e-9, block=block, preconditioner=lambda R: Ainv @ R)
    assert once.iterations == 1 and once.max_relative_residual < 1e-9
    with pytest.raises(ValueError, match="preconditioner must map"):
        solve(A, B, method="cg", block=block, preconditioner=lambda R: R[:, :1])


@pytest.mark.parametrize("block", [False, True])
def test_mixed_precision_refinement_reaches_the_float64_tolerance(block):
    _, _, _, _, op = logistic_problem(seed=3, n=60)
    B = rhs(op.dim, k=3)
    damping = 0.01
    H = dense(op)
    X_ref = torch.linalg.solve(H + damping * torch.eye(op.dim, dtype=DT), B)
    res = solve(op, B, method="cg", damping=damping, rtol=1e-12, block=block, low_precision=torch.float32)
    assert res.method == "cg+refine" and res.x.dtype == DT
    # float32 products could never give 1e-12 on their own: the float64 residuals of the refinement do
    assert res.max_relative_residual <= 1e-12
    assert float(rel_err(res.x, X_ref).max()) < 1e-10
    assert res.info["refinements"] >= 2 and res.info["low_precision_products"] > res.info["hvps"]
    assert res.info["low_precision_dtype"] == "torch.float32"
    # the same with an operator given explicitly (the same matrix in float32)
    op32 = CurvatureOperator.from_matrix(H.float())
    res2 = solve(op, B, method="cg", damping=damping, rtol=1e-12, low_precision=op32, inner_rtol=1e-3)
    assert res2.max_relative_residual <= 1e-12


def test_mixed_precision_refuses_what_float32_cannot_resolve():
    d = 40
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(4), dtype=DT))
    A = (Q * torch.logspace(-9, 0, d, dtype=DT)) @ Q.T  # κ = 1e9 ≫ 1 / float32 eps
    with pytest.raises(FloatingPointError, match="too ill-conditioned for torch.float32"):
        solve(A, rhs(d, k=2), method="cg", rtol=1e-12, low_precision=torch.float32, maxiter=400)
    with pytest.raises(ValueError, match="inner_rtol"):
        solve(A, rhs(d, k=2), method="cg", low_precision=torch.float32, inner_rtol=2.0)
    with pytest.raises(ValueError, match="low_precision must be"):
        solve(A, rhs(d, k=2), method="cg", low_precision=CurvatureOperator.from_matrix(A[:5, :5].float()))


def test_arnoldi_with_a_fixed_krylov_space_is_the_rayleigh_ritz_answer():
    """krylov_dim=m: exactly m products, and the answer is the top Ritz pairs of that Krylov space — the peers'
    Arnoldi — which on the whole space (m = d) is the exact truncated eigen-solve."""
    _, _, _, _, op = logistic_problem(seed=4)
    H = dense(op)
    B = rhs(op.dim)
    rank, damping, m = 4, 0.05, 8
    res = solve(op, B, method="arnoldi", rank=rank, krylov_dim=m, damping=damping, seed=3)
    assert res.iterations == res.info["hvps"] == m and res.info["krylov_dim"] == m
    # the same Krylov space built independently: K = span(q, Hq, …, H^{m−1}q) from the same start vector
    q = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=DT)
    K = torch.stack([torch.linalg.matrix_power(H, j) @ q for j in range(m)], dim=1)
    Qk, _ = torch.linalg.qr(K)
    theta, S = torch.linalg.eigh(Qk.T @ H @ Qk)
    Vr, lr = Qk @ S[:, -rank:], theta[-rank:]
    assert torch.allclose(res.info["eigenvalues"], lr, rtol=1e-8)
    X_ref = Vr @ ((Vr.T @ B) / (lr + damping)[:, None])
    assert float(rel_err(res.x, X_ref).max()) < 1e-7
    # the whole space: the exact eigenpairs
    full = solve(op, B, method="arnoldi", rank=rank, krylov_dim=op.dim, damping=damping)
    vals, V = torch.linalg.eigh(H)
    X_top = V[:, -rank:] @ ((V[:, -rank:].T @ B) / (vals[-rank:] + damping)[:, None])
    assert float(rel_err(full.x, X_top).max()) < 1e-8
    with pytest.raises(ValueError, match="raise krylov_dim"):
        solve(op, B, method="arnoldi", rank=5, krylov_dim=3)


def test_refinement_hands_over_its_final_residual_without_more_products():
    """The mixed-precision refinement ends by computing B − (H + δI)X with the operator: solve reports exactly
    that residual (an independent dense check agrees) instead of spending k more products on it."""
    _, _, _, _, op = logistic_problem(seed=3, n=60)
    B = rhs(op.dim, k=3)
    before = op.applications
    res = solve(op, B, method="cg", damping=0.01, rtol=1e-10, block=True, low_precision=torch.float32)
    assert op.applications - before == res.info["hvps"]  # no product after the solver's own
    assert "final_residual" not in res.info
    assert torch.equal(res.relative_residual, relative_residual(op, res.x, B, 0.01))  # the very same numbers
    indep = independent_residual(dense(op), 0.01, res.x, B)
    assert float(res.relative_residual.max()) <= 1e-10 and float(indep.max()) <= 1e-10


def test_auto_damping_rule_on_known_spectra():
    """The rule of damping="auto": 0 when H is positive definite within the margin, the least shift to a condition
    number of 10⁶ when it is nearly singular, 2|λ_min| + margin when it has negative curvature."""
    from helpers.solvers import AUTO_RCOND, auto_damping

    assert AUTO_RCOND == 1e-6
    assert auto_damping(0.004, 0.45) == 0.0  # the template's example: λ_min above the margin, no damping
    assert auto_damping(0.0, 2.0) == pytest.approx(2e-6, rel=1e-12)
    assert auto_damping(1e-7, 2.0) == pytest.approx(2e-6 - 1e-7, rel=1e-12)
    assert auto_damping(-0.5, 4.0) == pytest.approx(1.0 + 4e-6, rel=1e-12)
    assert auto_damping(-3.0, -1.0) == pytest.approx(6.0 + 3e-6, rel=1e-12)  # scale: the largest |λ|
    for bad in [(1.0, 0.5), (float("nan"), 1.0), (0.0, 0.0)]:
        with pytest.raises(ValueError):
            auto_damping(*bad)


@pytest.mark.parametrize("method", ["exact", "pinv", "cg"])
@pytest.mark.parametrize("spectrum, delta", [((0.3, 1.0, 2.0, 4.0), 0.0), ((-0.5, 1.0, 2.0, 4.0), 1.0 + 4e-6),
                                             ((0.0, 1.0, 2.0, 4.0), 4e-6)])
def test_solve_with_auto_damping_equals_the_direct_solve_with_that_damping(method, spectrum, delta):
    """A symmetric matrix with a known spectrum (a rotated diagonal): the δ chosen, reported in the result with the
    eigenvalues it came from (dense eigvalsh, or the Ritz values of Lanczos — exact here, d < AUTO_KRYLOV), and the
    answer (H + δI)⁻¹ B."""
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))
    H = Q @ torch.diag(torch.tensor(spectrum, dtype=DT)) @ Q.T
    H = 0.5 * (H + H.T)
    B = rhs(4, 2)
    res = solve(CurvatureOperator.from_matrix(H), B, method=method, damping="auto")
    assert res.damping == pytest.approx(delta, rel=1e-9, abs=1e-15)
    assert res.info["damping_rule"] == "auto"
    assert res.info["eigenvalue_min"] == pytest.approx(spectrum[0], abs=1e-12)
    assert res.info["eigenvalue_max"] == pytest.approx(spectrum[-1], rel=1e-12)
    X = torch.linalg.solve(H + res.damping * torch.eye(4, dtype=DT), B)
    assert float(rel_err(res.x, X).max()) < 1e-7
    with pytest.raises(ValueError, match="'auto'"):
        solve(H, B, method=method, damping="automatic")


def test_dense_methods_respect_the_memory_budget(monkeypatch):
    """Where the dense H would not fit BOOK_MEMORY_GB, "exact" solves by CG (to its tolerance) and says so, "pinv"
    refuses with the sizes; an explicit matrix, already in memory, is solved as before."""
    from helpers.solvers import dense_bytes, dense_fits

    model, P, x, y, op = logistic_problem()
    B = rhs(op.dim, 3)
    direct = solve(op, B, method="exact", damping=0.01)
    assert dense_bytes(15) == 5 * 15 * 15 * 8 and dense_fits(15)
    monkeypatch.setenv("BOOK_MEMORY_GB", str(dense_bytes(15) / 2 / 2**30))
    assert not dense_fits(15)
    fallback = solve(op, B, method="exact", damping=0.01)
    assert fallback.method == "cg" and "exact → cg" in fallback.info["fallback"]
    assert "BOOK_MEMORY_GB" in fallback.info["fallback"] and fallback.max_relative_residual < 1e-9
    assert float(rel_err(fallback.x, direct.x).max()) < 1e-8
    with pytest.raises(MemoryError, match="method='pinv' needs the dense H over d = 15"):
        solve(op, B, method="pinv")
    assert solve(dense(op), B, method="exact", damping=0.01).method == "exact"


def test_cg_gives_up_on_a_poor_preconditioner_when_asked():
    """stall=4: stop once a step shrinks the residual less than 4-fold (info["stalled"]); a perfect
    preconditioner converges in one step and never stalls."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=gen))
    A = Q @ torch.diag(torch.logspace(0, 4, 40, dtype=torch.float64)) @ Q.T
    B = torch.randn(40, 3, dtype=torch.float64, generator=gen)
    exact = torch.linalg.inv(A)
    good = solve(A, B, method="cg", rtol=1e-12, preconditioner=lambda R: exact @ R, stall=4.0)
    assert good.iterations <= 2 and not good.info["stalled"] and float(good.relative_residual.max()) < 1e-10
    poor = solve(A, B, method="cg", rtol=1e-12, preconditioner=lambda R: R.clone(), stall=4.0)
    plain = solve(A, B, method="cg", rtol=1e-12)
    assert poor.info["stalled"] and poor.iterations < plain.iterations
    assert not plain.info["stalled"] and float(plain.relative_residual.max()) < 1e-10
