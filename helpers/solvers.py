"""Solving (H + δI) X = B, one interface over many solvers (STUDY.md §4 ch. 1, DESIGN.md "solvers").

:func:`solve` takes a :class:`~helpers.curvature.CurvatureOperator` (or a dense symmetric matrix), right-hand
sides ``B`` of shape ``[d]`` or ``[d, k]`` and an explicit damping δ ≥ 0, and returns a :class:`SolveResult`
whose ``relative_residual`` is recomputed with the operator after the solve — never a solver's internal
estimate — so the error of every method is measurable the same way (a method whose stopping test already
computed B − (H + δI)X with the operator at the returned X, the mixed-precision refinement, passes that on).

Methods (``method=``):

* ``"exact"``: dense H from d HVPs, Cholesky; a matrix that is not positive definite raises
  :class:`IndefiniteHessianError` / :class:`SingularHessianError` naming the smallest eigenvalue, unless
  ``fallback="eig"``, which solves through the eigendecomposition instead and reports negative curvature. Where the
  dense matrix would not fit in the memory budget (:func:`dense_fits`, ``BOOK_MEMORY_GB``) it solves by CG instead
  and says so (``SolveResult.method == "cg"``, ``info["fallback"]``).
* ``"pinv"``: the pseudo-inverse of H + δI through its eigendecomposition, eigenvalues below a relative cutoff
  treated as zero — the minimum-norm solution for right-hand sides in the range (STUDY.md §3 item 5: the exactly
  singular last-layer Hessian).
* ``"cg"``: conjugate gradients on all k columns at once (one batched product per iteration); options make it
  block CG (one Krylov space shared by the k columns: fewer iterations when k > 1), preconditioned, or a
  mixed-precision iterative refinement (products in float32, residuals and answer in float64).
* ``"lissa"``: the truncated stochastic Neumann series of Agarwal et al. (2017) / Koh & Liang (2017).
* ``"arnoldi"``: low rank, after Schioppa et al. (2022): the top-``rank`` eigenpairs by Lanczos, then
  X = V diag(1/(λ + δ)) Vᵀ B.

Damping is explicit: a number δ ≥ 0, or ``damping="auto"``, which derives δ from the spectrum of H by the rule of
:func:`auto_damping` (zero when H is safely positive definite) and reports it (``SolveResult.damping``, with the
eigenvalues it was derived from in ``info``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from helpers import memory
from helpers.progress import progress_bar
from helpers.curvature import LINEARIZE_AFTER, CurvatureOperator, extreme_eigenvalues, lanczos_ritz

Method = Literal["exact", "pinv", "cg", "lissa", "arnoldi"]

__all__ = [
    "AUTO_RCOND",
    "IndefiniteHessianError",
    "NotPositiveDefiniteError",
    "SingularHessianError",
    "SolveResult",
    "auto_damping",
    "dense_bytes",
    "dense_fits",
    "lissa_path",
    "relative_residual",
    "solve",
]

#: ``damping="auto"``: the smallest eigenvalue of H + δI is lifted to at least this fraction of the largest, i.e. a
#: condition number of at most 10⁶ — far above float64 round-off (1e-16), far below anything that biases values.
AUTO_RCOND = 1e-6
#: ``damping="auto"`` when H is not assembled densely: the extremes are the Ritz values of this many Lanczos steps.
AUTO_KRYLOV = 40
#: d×d matrices alive at once in a dense solve: the assembled columns and the identity they are applied to, the
#: symmetrised copy, H + δI and its Cholesky factor (eigh's workspace counts as one more where it runs instead)
DENSE_COPIES = 5


def auto_damping(smallest: float, largest: float, rcond: float = AUTO_RCOND) -> float:
    """The damping δ that ``damping="auto"`` derives from the extreme eigenvalues λ_min ≤ λ_max of H.

    With s = max(|λ_max|, |λ_min|) (the spectrum's scale):

    * λ_min ≥ rcond · s — H is positive definite with a condition number of at most 1/rcond: **δ = 0**. The
      estimate inverts H itself, so damping adds no bias (the book's default damping of 0.01 used to exceed λ_min
      of small models trained with L2 = 0.01, which shrank every estimate);
    * 0 ≤ λ_min < rcond · s — H is singular or nearly so: δ = rcond · s − λ_min, the least damping that brings the
      condition number down to 1/rcond;
    * λ_min < 0 — θ̂ is not a minimum: δ = 2|λ_min| + rcond · s, which maps the most negative eigenvalue onto
      |λ_min| (+ the floor), as far from zero as it was; H + δI is positive definite and the directions of negative
      curvature are damped, not inverted. Those values are biased, and the caller should say so.

    Returns δ ≥ 0. Raises ValueError for non-finite or unordered eigenvalues.
    """
    lo, hi = float(smallest), float(largest)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"need finite eigenvalues smallest <= largest, got {lo} and {hi}")
    if not 0 < rcond < 1:
        raise ValueError(f"rcond must lie in (0, 1), got {rcond}")
    scale = max(abs(hi), abs(lo))
    if scale == 0:
        raise ValueError("H is zero: no damping makes (H + δI)⁻¹ an influence estimate; check the model and data")
    floor = rcond * scale
    if lo >= floor:
        return 0.0
    if lo >= 0:
        return floor - lo
    return 2.0 * abs(lo) + floor


def dense_bytes(d: int, dtype: torch.dtype = torch.float64) -> int:
    """Bytes a dense solve over d parameters holds at its peak (:data:`DENSE_COPIES` d×d matrices)."""
    return int(DENSE_COPIES * int(d) ** 2 * torch.finfo(dtype).bits // 8)


def dense_fits(d: int, dtype: torch.dtype = torch.float64) -> bool:
    """Whether the exact (dense) solve over d parameters fits in :func:`helpers.memory.budget`."""
    return dense_bytes(d, dtype) <= memory.budget()


class NotPositiveDefiniteError(ValueError):
    """H + δI is not (numerically) positive definite, so Cholesky cannot solve with it.

    Attributes: ``smallest_eigenvalue`` and ``largest_eigenvalue`` of H (without damping), ``damping`` δ.
    """

    def __init__(self, message: str, smallest_eigenvalue: float, largest_eigenvalue: float, damping: float) -> None:
        super().__init__(message)
        self.smallest_eigenvalue = smallest_eigenvalue
        self.largest_eigenvalue = largest_eigenvalue
        self.damping = damping


class IndefiniteHessianError(NotPositiveDefiniteError):
    """H + δI has a clearly negative eigenvalue (the point is not a minimum, or damping is too small)."""


class SingularHessianError(NotPositiveDefiniteError):
    """H + δI has an eigenvalue that is zero relative to the largest one (a flat direction)."""


@dataclass
class SolveResult:
    """The answer of :func:`solve`.

    Attributes:
        x: the solution, shaped like ``B`` (``[d]`` or ``[d, k]``).
        relative_residual: ‖(H + δI)x_j − b_j‖ / ‖b_j‖ per column (``[]`` for a vector B, ``[k]`` otherwise),
            recomputed with the operator after solving (k extra products); for b_j = 0 it is ‖(H + δI)x_j‖.
        method: the method used (``"exact+eig"`` when the exact solver fell back to the eigendecomposition).
        iterations: solver iterations (CG steps, LiSSA depth, operator products of Lanczos; 0 for direct).
        damping: δ.
        info: method-specific diagnostics (``hvps``: operator products spent, residual check excluded;
            ``n_negative``: eigenvalues of H + δI below zero, where the method knows them; ...).
    """

    x: Tensor
    relative_residual: Tensor
    method: str
    iterations: int
    damping: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_relative_residual(self) -> float:
        """The worst column's relative residual, as a float."""
        return float(self.relative_residual.max())


def relative_residual(op: CurvatureOperator, X: Tensor, B: Tensor, damping: float = 0.0) -> Tensor:
    """‖(H + δI)X_j − B_j‖ / ‖B_j‖ per column (``[k]``; ``[]`` for vectors). Columns with B_j = 0 divide by 1.

    Cost: k operator products.
    """
    vector = B.dim() == 1
    X2, B2 = (X[:, None], B[:, None]) if vector else (X, B)
    R = op.matmat(X2) + damping * X2 - B2
    bnorm = torch.linalg.vector_norm(B2, dim=0)
    rel = torch.linalg.vector_norm(R, dim=0) / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    return rel[0] if vector else rel


# ----------------------------------------------------------------------------------------------------------
# direct methods
# ----------------------------------------------------------------------------------------------------------


def _default_rcond(op: CurvatureOperator) -> float:
    # a few hundred roundings of a d-term dot product: above the noise of exactly-zero eigenvalues, far below
    # any eigenvalue that carries information in float64
    return 100.0 * op.dim * torch.finfo(op.dtype).eps


def _symmetric_dense(op: CurvatureOperator) -> Tensor:
    A = op.dense()
    return 0.5 * (A + A.T)  # autodiff gives H only to rounding; Cholesky and eigh read one triangle


def _eig_solve(H: Tensor, B: Tensor, damping: float, rcond: float) -> tuple[Tensor, dict[str, Any]]:
    """Pseudo-inverse of H + δI applied to B via eigh; |λ + δ| ≤ rcond·max|λ + δ| counts as zero."""
    vals, V = torch.linalg.eigh(H)
    shifted = vals + damping
    cutoff = rcond * float(shifted.abs().max())
    keep = shifted.abs() > cutoff
    Vk = V[:, keep]
    X = Vk @ ((Vk.T @ B) / shifted[keep, None])
    info = {
        "eigenvalues": vals,
        "n_negative": int((shifted < -cutoff).sum()),
        "n_zero": int((~keep).sum()),
        "cutoff": cutoff,
    }
    return X, info


def _raise_not_pd(vals: Tensor, damping: float, rcond: float) -> None:
    lo, hi = float(vals[0]), float(vals[-1])
    lo_shifted = lo + damping
    scale = max(abs(hi + damping), abs(lo_shifted))
    if lo_shifted < -rcond * scale:
        raise IndefiniteHessianError(
            f"H + damping·I is indefinite: smallest eigenvalue of H {lo:.3e} (largest {hi:.3e}, damping "
            f"{damping:.3e}): add damping >= {abs(lo):.3e} (strictly more), use method='pinv' or "
            "fallback='eig', or train closer to a minimum",
            lo,
            hi,
            damping,
        )
    raise SingularHessianError(
        f"H + damping·I is singular: smallest eigenvalue of H {lo:.3e} is zero relative to the largest {hi:.3e} "
        f"(damping {damping:.3e}): add damping > 0 (e.g. {max(abs(hi), 1.0) * 1e-6:.1e}), include the L2 term, "
        "or use method='pinv' (minimum-norm solution on the range)",
        lo,
        hi,
        damping,
    )


def _exact(
    op: CurvatureOperator,
    B: Tensor,
    damping: float,
    *,
    fallback: Literal["eig"] | None = None,
    rcond: float | None = None,
) -> tuple[Tensor, int, dict[str, Any], str]:
    """Cholesky of the dense H + δI (d HVPs + O(d³)); not positive definite → clear error or eig fallback."""
    if fallback not in (None, "eig"):
        raise ValueError(f"unknown fallback {fallback!r}: use None (raise) or 'eig'")
    rcond = _default_rcond(op) if rcond is None else float(rcond)
    H = _symmetric_dense(op)
    A = H + damping * torch.eye(op.dim, dtype=H.dtype, device=H.device)
    L, status = torch.linalg.cholesky_ex(A)
    ok = int(status) == 0
    if ok:
        # λ_min(A) ≤ every Cholesky pivot L_jj², so a tiny pivot flags near-singularity for free;
        # max diag(A) ≤ λ_max(A) gives the scale.
        pivots = torch.diagonal(L) ** 2
        ok = bool(pivots.min() > rcond * torch.diagonal(A).abs().max())
    if ok:
        return torch.cholesky_solve(B, L), 0, {"factorization": "cholesky"}, "exact"
    vals = torch.linalg.eigvalsh(H)
    lo_shifted = float(vals[0]) + damping
    if lo_shifted > rcond * float((vals + damping).abs().max()):
        # positive definite after all (Cholesky's pivots were merely small): eigh is accurate here
        X, info = _eig_solve(H, B, damping, rcond)
        return X, 0, {"factorization": "eigh", **info}, "exact+eig"
    if fallback != "eig":
        _raise_not_pd(vals, damping, rcond)
    X, info = _eig_solve(H, B, damping, rcond)
    return X, 0, {"factorization": "eigh", **info}, "exact+eig"


def _pinv(
    op: CurvatureOperator, B: Tensor, damping: float, *, rcond: float | None = None
) -> tuple[Tensor, int, dict[str, Any], str]:
    """Pseudo-inverse on the range of H + δI (d HVPs + one eigh, O(d³))."""
    rcond = _default_rcond(op) if rcond is None else float(rcond)
    X, info = _eig_solve(_symmetric_dense(op), B, damping, rcond)
    return X, 0, {"factorization": "eigh", **info}, "pinv"


# ----------------------------------------------------------------------------------------------------------
# iterative methods
# ----------------------------------------------------------------------------------------------------------


def _cg(
    op: CurvatureOperator,
    B: Tensor,
    damping: float,
    *,
    rtol: float = 1e-10,
    maxiter: int | None = None,
    x0: Tensor | None = None,
    block: bool = False,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
    low_precision: CurvatureOperator | torch.dtype | None = None,
    inner_rtol: float = 1e-4,
    max_refinements: int = 20,
    stall: float = 0.0,
    progress: bool = True,
) -> tuple[Tensor, int, dict[str, Any], str]:
    """Conjugate gradients on every column at once; a column stops when its recursive residual ≤ rtol·‖b‖.

    Cost: one batched product per iteration over the columns still running; at most ``maxiter`` (default 10·d)
    iterations. pᵀ(H + δI)p ≤ 0 (negative curvature) is recorded per column; the iteration continues unless
    it is exactly zero (breakdown), and the final residual tells whether the answer is any good.

    ``block=True`` runs block CG instead (:func:`_block_cg`), ``preconditioner`` makes either variant
    preconditioned, and ``low_precision`` wraps the chosen variant in mixed-precision iterative refinement
    (:func:`_refine`): all three change the speed, never the answer's tolerance.

    ``stall`` > 1 gives up early (``info["stalled"]``) once a step shrinks the largest relative residual of the
    running columns by less than that factor — for a preconditioner that may be poor, whose caller then continues
    otherwise (:func:`helpers.closed_form.solve_exact`). ``progress``: a bar over the iterations (:mod:`helpers.progress`).
    """
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    if low_precision is not None:
        if not rtol > 0:
            raise ValueError("mixed-precision refinement needs rtol > 0 (it stops on the true residual)")
        return _refine(op, B, damping, low_precision, rtol=rtol, maxiter=maxiter, x0=x0, block=block,
                       preconditioner=preconditioner, inner_rtol=inner_rtol, max_refinements=max_refinements)
    if block:
        return _block_cg(op, B, damping, rtol=rtol, maxiter=maxiter, x0=x0, preconditioner=preconditioner)
    return _pcg(op, B, damping, preconditioner, rtol=rtol, maxiter=maxiter, x0=x0, stall=stall, progress=progress)


def _start(op: CurvatureOperator, B: Tensor, damping: float, x0: Tensor | None) -> tuple[Tensor, Tensor]:
    """Initial iterate and residual (X₀ = 0 unless ``x0`` is given)."""
    if x0 is None:
        return torch.zeros_like(B), B.clone()
    X = x0.reshape(B.shape).to(B).clone()
    return X, B - (op.matmat(X) + damping * X)


def _apply_preconditioner(preconditioner: Callable[[Tensor], Tensor] | None, R: Tensor) -> Tensor:
    if preconditioner is None:
        return R
    Z = preconditioner(R)
    if not isinstance(Z, Tensor) or Z.shape != R.shape or Z.dtype != R.dtype:
        got = f"{Z.dtype} {tuple(Z.shape)}" if isinstance(Z, Tensor) else type(Z).__name__
        raise ValueError(f"preconditioner must map a [d, k] {R.dtype} tensor to one of the same shape and dtype, "
                         f"got {got}")
    return Z


def _pcg(
    op: CurvatureOperator,
    B: Tensor,
    damping: float,
    preconditioner: Callable[[Tensor], Tensor] | None,
    *,
    rtol: float,
    maxiter: int | None,
    x0: Tensor | None,
    stall: float = 0.0,
    progress: bool = True,
) -> tuple[Tensor, int, dict[str, Any], str]:
    """(Preconditioned) CG, column by column in one batch: ``preconditioner(R [d, k]) ≈ (H + δI)⁻¹ R``; the one CG
    loop of the package (``None``: the identity, i.e. plain CG, the same arithmetic step for step). ``stall``,
    ``progress``: see :func:`_cg`.

    The preconditioner must be symmetric positive definite (then the iteration is CG on M^½ A M^½).
    Cost per iteration: one batched product (and one preconditioner application) over the running columns.
    """
    d, k = B.shape
    maxiter = 10 * d if maxiter is None else int(maxiter)
    X, R = _start(op, B, damping, x0)
    target = rtol * torch.linalg.vector_norm(B, dim=0)
    Z = _apply_preconditioner(preconditioner, R)
    P = Z.clone()
    rz = (R * Z).sum(dim=0)
    active = torch.linalg.vector_norm(R, dim=0) > target
    negative = torch.zeros(k, dtype=torch.bool, device=B.device)
    breakdown = torch.zeros(k, dtype=torch.bool, device=B.device)
    iters = torch.zeros(k, dtype=torch.long, device=B.device)
    bnorm = torch.linalg.vector_norm(B, dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    previous, stalled = math.inf, False
    bar = progress_bar(maxiter, f"cg ×{k}", progress)
    step = 0
    while bool(active.any()) and step < maxiter:
        if stall > 1:  # contracting slowly: the preconditioner does not fit this matrix
            worst = float((torch.linalg.vector_norm(R[:, active], dim=0) / bnorm[active]).max())
            if worst > previous / stall:
                stalled = True
                break
            previous = worst
        idx = torch.nonzero(active).reshape(-1)
        Pa = P[:, idx]
        APa = op.matmat(Pa) + damping * Pa
        pAp = (Pa * APa).sum(dim=0)
        negative[idx] |= pAp <= 0
        broke = (pAp == 0) | (rz[idx] == 0)
        safe = torch.where(broke, torch.ones_like(pAp), pAp)
        alpha = torch.where(broke, torch.zeros_like(pAp), rz[idx] / safe)
        X[:, idx] += alpha * Pa
        R[:, idx] -= alpha * APa
        Za = _apply_preconditioner(preconditioner, R[:, idx])
        rz_new = (R[:, idx] * Za).sum(dim=0)
        beta = torch.where(broke, torch.zeros_like(rz_new), rz_new / torch.where(broke, torch.ones_like(pAp), rz[idx]))
        P[:, idx] = Za + beta * Pa
        rz[idx] = rz_new
        iters[idx] += 1
        breakdown[idx] |= broke
        active[idx] = (torch.linalg.vector_norm(R[:, idx], dim=0) > target[idx]) & ~broke
        step += 1
        bar.update(1)
        bar.set_postfix_str(f"{int(active.sum())} running", refresh=False)
    bar.close()
    info = {
        "converged": ~active & ~breakdown,
        "iterations_per_column": iters,
        "negative_curvature_columns": torch.nonzero(negative).reshape(-1).tolist(),
        "breakdown_columns": torch.nonzero(breakdown).reshape(-1).tolist(),
        "rtol": rtol,
        "maxiter": maxiter,
        "preconditioned": preconditioner is not None,
        "stalled": stalled,
    }
    return X, step, info, "cg" if preconditioner is None else "pcg"


def _orthonormal_basis(W: Tensor, rank_tol: float) -> Tensor:
    """Orthonormal columns spanning ``W [d, s]``, directions with σ ≤ rank_tol·σ_max dropped.

    Through the s×s Gram matrix (two GEMMs of d·s², measured 10× cheaper than a thin SVD of a tall matrix):
    eigh(WᵀW) = VΛVᵀ, keep λ > rank_tol²·λ_max, U = W V Λ^{-½}, then one Cholesky-QR pass on U restores the
    orthogonality the squared condition number cost (CholQR2). Valid while rank_tol ≫ √eps, which the caller's
    rank_tol = k·√eps guarantees (Gram eigenvalues are accurate to eps·λ_max).
    """
    if W.shape[1] == 0:
        return W
    G = W.T @ W
    lam, V = torch.linalg.eigh(0.5 * (G + G.T))
    top = lam[-1]
    if not bool(top > 0):
        return W[:, :0]
    keep = lam > (rank_tol**2) * top
    U = W @ (V[:, keep] / lam[keep].sqrt())
    L, status = torch.linalg.cholesky_ex(U.T @ U)
    if int(status) != 0:  # cannot happen for the kept directions; fall back to the SVD rather than fail
        Us, S, _ = torch.linalg.svd(W, full_matrices=False)
        return Us[:, S > rank_tol * S[0]]
    return torch.linalg.solve_triangular(L, U.T, upper=False).T


def _block_cg(
    op: CurvatureOperator,
    B: Tensor,
    damping: float,
    *,
    rtol: float,
    maxiter: int | None,
    x0: Tensor | None,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, int, dict[str, Any], str]:
    """Block (preconditioned) CG: all k columns share one Krylov space, which grows by up to k directions a step.

    The breakdown-free variant of Ji & Li (2017) (after O'Leary 1980 and Dubrulle 2001): the search block is
    re-orthonormalised every step and directions that have become linearly dependent (columns that converged,
    or right-hand sides sharing directions) are dropped instead of making the s×s systems singular.

        Q = A P,  α = (PᵀQ)⁻¹ PᵀR,  X += Pα,  R −= Qα,  Z = M R,  β = −(PᵀQ)⁻¹ QᵀZ,  P = orth(Z + Pβ)

    Each step costs one batched product with the s ≤ k columns of P (s is the block's rank), plus O(d k²). On a
    spectrum with a few hundred outlying eigenvalues the k columns deflate them together: measured 48 steps
    instead of 85 for mnist5k logistic regression with 10 right-hand sides (STUDY.md benchmark P1).
    ``iterations`` counts steps; ``info["block_sizes"]`` the width of each step.
    """
    d, k = B.shape
    maxiter = 10 * d if maxiter is None else int(maxiter)
    rank_tol = max(k, 1) * torch.finfo(B.dtype).eps ** 0.5  # below √eps a direction is noise in PᵀQ
    X, R = _start(op, B, damping, x0)
    target = rtol * torch.linalg.vector_norm(B, dim=0)
    res = torch.linalg.vector_norm(R, dim=0)
    P = _orthonormal_basis(_apply_preconditioner(preconditioner, R), rank_tol)
    negative = False
    widths: list[int] = []
    step = 0
    while bool((res > target).any()) and step < maxiter and P.shape[1] > 0:
        Q = op.matmat(P) + damping * P
        PQ = 0.5 * (P.T @ Q + Q.T @ P)  # symmetric to rounding; the solves below read it as symmetric
        L, status = torch.linalg.cholesky_ex(PQ)
        if int(status) != 0:  # PᵀAP not positive definite: negative curvature in the Krylov space
            negative = True
            alpha = torch.linalg.lstsq(PQ, P.T @ R).solution
        else:
            alpha = torch.cholesky_solve(P.T @ R, L)
        X += P @ alpha
        R -= Q @ alpha
        res = torch.linalg.vector_norm(R, dim=0)
        widths.append(P.shape[1])
        step += 1
        if not bool((res > target).any()):
            break
        Z = _apply_preconditioner(preconditioner, R)
        QZ = Q.T @ Z
        beta = -(torch.linalg.lstsq(PQ, QZ).solution if int(status) != 0 else torch.cholesky_solve(QZ, L))
        P = _orthonormal_basis(Z + P @ beta, rank_tol)
    info = {
        "converged": res <= target,
        "block_sizes": widths,
        "negative_curvature": negative,
        "rtol": rtol,
        "maxiter": maxiter,
        "preconditioned": preconditioner is not None,
    }
    return X, step, info, "block-cg"


def _refine(
    op: CurvatureOperator,
    B: Tensor,
    damping: float,
    low_precision: CurvatureOperator | torch.dtype,
    *,
    rtol: float,
    maxiter: int | None,
    x0: Tensor | None,
    block: bool,
    preconditioner: Callable[[Tensor], Tensor] | None,
    inner_rtol: float,
    max_refinements: int,
) -> tuple[Tensor, int, dict[str, Any], str]:
    """Mixed-precision iterative refinement: CG in low precision, residuals and the answer in ``op``'s precision.

        X ← x0 (or 0);  repeat:  R = B − (H + δI)X  (in op's dtype);  solve (H + δI)E = R with the low-precision
        operator to max(inner_rtol, ½·rtol·‖B‖/‖R‖) (no tighter than the last step needs);  X ← X + E;
        until every column has ‖R‖ ≤ rtol·‖B‖.

    Each refinement shrinks the residual by about max(inner_rtol, κ·u_low) (u_low: 6e-8 for float32), so the
    answer reaches the float64 tolerance ``rtol`` while nearly every product runs in float32 — about twice as
    fast on a CPU, whose float32 GEMMs run at twice the float64 rate. ``low_precision`` is the same matrix in the
    lower dtype (an operator, or a dtype for :meth:`CurvatureOperator.astype`). The stopping test uses the true
    residual, so the tolerance holds whatever the inner solver did; a refinement that fails to reduce the
    residual raises (κ·u_low ≥ 1: the low precision cannot resolve this matrix — use plain CG).
    Cost: per refinement one product in ``op``'s dtype per column plus the inner iterations.
    """
    if not 0 < inner_rtol < 1:
        raise ValueError(f"inner_rtol must lie in (0, 1), got {inner_rtol}")
    low = op.astype(low_precision) if isinstance(low_precision, torch.dtype) else low_precision
    if not isinstance(low, CurvatureOperator) or low.dim != op.dim:
        raise ValueError(f"low_precision must be a dtype or a CurvatureOperator of dimension {op.dim} (the same "
                         f"matrix in a lower precision), got {low!r}")
    if low.device != op.device:
        raise ValueError(f"low_precision operator is on {low.device}, the operator on {op.device}")
    if isinstance(low_precision, torch.dtype):
        # built for this solve, which takes at least two inner solves of many products: a product the operator
        # can trace (hessian_operator's) is traced now, not after LINEARIZE_AFTER calls (measured for the
        # 784-64-10 MLP on 4,000 points: 0.136 s instead of 0.174 s per 10-column float32 product, 0.7 s to trace)
        low.expect(LINEARIZE_AFTER)
    X, R = _start(op, B, damping, x0)
    bnorm = torch.linalg.vector_norm(B, dim=0)
    target = rtol * bnorm
    res = torch.linalg.vector_norm(R, dim=0)
    start_low = low.applications
    inner_steps: list[int] = []
    history = [float((res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))).max())]
    for _ in range(int(max_refinements)):
        todo = torch.nonzero(res > target).reshape(-1)
        if todo.numel() == 0:
            break
        # scale the columns to unit norm: float32 then never under- or overflows, whatever the units of B
        scale = res[todo]
        Rl = (R[:, todo] / scale).to(low.dtype)
        # solve no tighter than needed: the last refinement only has to close the gap to the target (with a
        # factor 2 to spare), never tighter than inner_rtol
        tol = max(inner_rtol, min(0.5, 0.5 * float((target[todo] / scale).min())))
        if block:
            E, steps, _, _ = _block_cg(low, Rl, damping, rtol=tol, maxiter=maxiter, x0=None,
                                       preconditioner=preconditioner)
        elif preconditioner is not None:
            E, steps, _, _ = _pcg(low, Rl, damping, preconditioner, rtol=tol, maxiter=maxiter, x0=None,
                                  progress=False)
        else:
            E, steps, _, _ = _cg(low, Rl, damping, rtol=tol, maxiter=maxiter)
        inner_steps.append(int(steps))
        X[:, todo] += E.to(B.dtype) * scale
        R = B - (op.matmat(X) + damping * X)
        new = torch.linalg.vector_norm(R, dim=0)
        if bool(((new[todo] > 0.5 * res[todo]) & (new[todo] > target[todo])).any()):
            raise FloatingPointError(
                f"mixed-precision refinement stalled at relative residual "
                f"{float((new / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))).max()):.1e} (target {rtol:.0e}):"
                f" the matrix is too ill-conditioned for {low.dtype} — solve without low_precision")
        res = new
        history.append(float((res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))).max()))
    info = {
        "final_residual": res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm)),  # R is B − (H + δI)X
        "converged": res <= target,
        "refinements": len(inner_steps),
        "inner_iterations": inner_steps,
        "low_precision_products": low.applications - start_low,
        "low_precision_dtype": str(low.dtype),
        "residual_history": history,
        "block": block,
        "preconditioned": preconditioner is not None,
        "rtol": rtol,
        "inner_rtol": inner_rtol,
    }
    return X, sum(inner_steps), info, "cg+refine"


def _lissa(
    op: CurvatureOperator,
    B: Tensor,
    damping: float,
    *,
    depth: int = 1000,
    scale: float | None = None,
    repeats: int = 1,
    hvp: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    seed: int = 0,
) -> tuple[Tensor, int, dict[str, Any], str]:
    """LiSSA: a truncated Neumann series for (H + δI)⁻¹, deterministic or stochastic.

    With A = H + δI, scale s and H̃_j a product with H (``hvp=None``: the full-batch operator, deterministic) or
    with a fresh minibatch Hessian (``hvp(V, generator)``, e.g. :func:`helpers.curvature.minibatch_hvp`):

        h_0 = b,    h_j = b + h_{j−1} − (H̃_j h_{j−1} + δ h_{j−1}) / s   (j = 1 … depth),    x = h_depth / s,

    averaged over ``repeats`` independent runs (stochastic only; a deterministic run is done once). Full batch,
    x = (1/s) Σ_{j=0}^{depth} (I − A/s)^j b, whose error is (I − A/s)^{depth+1} A⁻¹ b: it converges iff A is
    positive definite and s > λ_max(A)/2, at rate 1 − λ_min(A)/s per step. This is Koh & Liang's recursion
    ``h = b + (1 − δ_KL) h − H h / s`` with their damping δ_KL = δ / s, so δ here is on the same scale as in
    every other method. ``scale=None`` takes s = λ_max(A) from Lanczos (safe for full batch; give s explicitly,
    with margin, for minibatches, whose Hessians have larger extremes). Cost: depth × repeats products.
    """
    if depth < 1 or repeats < 1:
        raise ValueError(f"depth and repeats must be >= 1, got depth={depth}, repeats={repeats}")
    info: dict[str, Any] = {}
    if scale is None:
        top = extreme_eigenvalues(op, 1, "LA", method="dense" if op.dim <= 2 else "lanczos", seed=seed)
        scale = float(top[0]) + damping
        info["scale_from"] = "lanczos λ_max(H + δI)"
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"LiSSA scale must be > 0 (and > λ_max(H + δI)/2 to converge), got {scale}")
    generator = torch.Generator(device=B.device).manual_seed(seed)
    runs = repeats if hvp is not None else 1
    if hvp is None:
        op.expect(depth)  # a known, long run of products: trace the operator's product now if it has one
    total = torch.zeros_like(B)
    last_change = torch.zeros(B.shape[1], dtype=B.dtype, device=B.device)
    for _ in range(runs):
        h = B.clone()
        for j in range(1, depth + 1):
            diverged = FloatingPointError(
                f"LiSSA diverged at step {j} of {depth} (scale {scale:.3e}, damping {damping:.3e}): raise scale "
                "above λ_max(H + δI)/2 and make H + δI positive definite (more damping)"
            )
            try:
                Hh = op.matmat(h) if hvp is None else hvp(h, generator)
            except FloatingPointError as err:  # the iterate grew until the product overflowed
                raise diverged from err
            h_new = B + h - (Hh + damping * h) / scale
            if not torch.isfinite(h_new).all():
                raise diverged
            if j == depth:
                last_change = torch.linalg.vector_norm(h_new - h, dim=0) / torch.linalg.vector_norm(h_new, dim=0)
            h = h_new
        total += h / scale
    info.update(
        scale=scale,
        depth=depth,
        repeats=runs,
        stochastic=hvp is not None,
        minibatch_products=(depth * runs * B.shape[1]) if hvp is not None else 0,
        last_relative_change=last_change,
    )
    return total / runs, depth, info, "lissa"


def _arnoldi(
    op: CurvatureOperator,
    B: Tensor,
    damping: float,
    *,
    rank: int | None = None,
    which: Literal["LM", "LA"] = "LM",
    tol: float = 0.0,
    maxiter: int | None = None,
    seed: int = 0,
    rcond: float | None = None,
    krylov_dim: int | None = None,
) -> tuple[Tensor, int, dict[str, Any], str]:
    """Low-rank inverse on the top-``rank`` eigenpairs (largest magnitude by default, Schioppa et al. 2022).

    X = V diag(1/(λ + δ)) Vᵀ B with (λ, V) from Lanczos (``eigsh`` to ``tol``; dense ``eigh`` when rank = d);
    directions outside span(V) are dropped, so the residual measures exactly what the truncation loses. Pairs
    with |λ + δ| ≤ rcond·max|λ + δ| are dropped too. ``krylov_dim=m`` takes the pairs from one Krylov space of
    dimension m instead (:func:`helpers.curvature.lanczos_ritz`: exactly m products, no convergence test — the
    setting of captum's, dattri's and pyDVL's Arnoldi, so equal settings give equal answers). Cost: the Lanczos
    products (``iterations``) + O(d·rank·k).
    """
    if rank is None:
        raise TypeError("method='arnoldi' needs rank=<number of eigenpairs>, e.g. rank=20")
    rank = int(rank)
    if not 1 <= rank <= op.dim:
        raise ValueError(f"rank must lie in [1, d={op.dim}], got {rank}")
    start = op.applications
    vals, V = extreme_eigenvalues(op, rank, which, tol=tol, maxiter=maxiter, seed=seed, return_eigenvectors=True,
                                  krylov_dim=krylov_dim)
    steps = op.applications - start
    shifted = vals + damping
    rcond = _default_rcond(op) if rcond is None else float(rcond)
    keep = shifted.abs() > rcond * float(shifted.abs().max())
    Vk = V[:, keep]
    X = Vk @ ((Vk.T @ B) / shifted[keep, None])
    info = {
        "eigenvalues": vals,
        "rank": rank,
        "which": which,
        "n_negative": int((shifted[keep] < 0).sum()),
        "n_zero": int((~keep).sum()),
        "krylov_dim": krylov_dim,
    }
    return X, steps, info, "arnoldi"


_SOLVERS: dict[str, Callable[..., tuple[Tensor, int, dict[str, Any], str]]] = {
    "exact": _exact,
    "pinv": _pinv,
    "cg": _cg,
    "lissa": _lissa,
    "arnoldi": _arnoldi,
}


def _auto_damping(op: CurvatureOperator, method: str, seed: int) -> tuple[CurvatureOperator, float, dict[str, Any]]:
    """δ for ``damping="auto"`` (:func:`auto_damping`) and where its eigenvalues came from.

    Dense methods (``exact``, ``pinv``) take λ_min, λ_max from ``eigvalsh`` of the dense H they need anyway, and
    solve with that matrix (returned as an operator, so it is assembled once); the others from the Ritz values of
    :data:`AUTO_KRYLOV` Lanczos steps (:func:`helpers.curvature.lanczos_ritz`), which bound λ_max from below and
    λ_min from above — negative curvature the Krylov space misses goes undamped, and the residual will show it.
    """
    if method in ("exact", "pinv"):
        H = _symmetric_dense(op)
        vals = torch.linalg.eigvalsh(H)
        lo, hi = float(vals[0]), float(vals[-1])
        source, solve_op = "dense eigvalsh", CurvatureOperator.from_matrix(H)
    else:
        ritz, _ = lanczos_ritz(op, min(op.dim, AUTO_KRYLOV), seed=seed)
        lo, hi = float(ritz[0]), float(ritz[-1])
        source, solve_op = f"Ritz values of {min(op.dim, AUTO_KRYLOV)} Lanczos steps", op
    delta = auto_damping(lo, hi)
    info = {"damping_rule": "auto", "eigenvalue_min": lo, "eigenvalue_max": hi, "spectrum_from": source}
    return solve_op, delta, info


def _options_of(fn: Callable[..., Any]) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def solve(
    op: CurvatureOperator | Tensor,
    B: Tensor,
    *,
    method: Method = "exact",
    damping: float = 0.0,
    **options: Any,
) -> SolveResult:
    """Solve (H + δI) X = B for one or many right-hand sides.

    Args:
        op: a :class:`~helpers.curvature.CurvatureOperator` (e.g. from
            :func:`~helpers.curvature.hessian_operator`) or a dense symmetric ``[d, d]`` tensor.
        B: ``[d]`` or ``[d, k]``, same dtype/device as ``op``, finite.
        method: ``"exact"``, ``"pinv"``, ``"cg"``, ``"lissa"`` or ``"arnoldi"`` (module docstring).
        damping: δ ≥ 0, added as δI for every method (never folded into the L2 coefficient); or ``"auto"``: δ from
            the spectrum of H by :func:`auto_damping` (``SolveResult.damping`` is the δ used; ``info`` holds
            ``eigenvalue_min``, ``eigenvalue_max`` and ``spectrum_from``).
        **options: per method —
            exact: ``fallback=None|"eig"``, ``rcond`` (relative eigenvalue cutoff; default 100·d·eps);
            pinv: ``rcond``;
            cg: ``rtol=1e-10`` (on ‖r‖/‖b‖ per column), ``maxiter=10·d``, ``x0``, ``block=False`` (block CG: one
            Krylov space shared by the k columns), ``preconditioner=None`` (a callable ``M(R [d, k]) → [d, k]``,
            symmetric positive definite, ≈ (H + δI)⁻¹), ``low_precision=None`` (a dtype such as
            ``torch.float32``, or the same operator in that dtype: mixed-precision iterative refinement),
            ``inner_rtol=1e-4`` and ``max_refinements=20`` (its inner tolerance and outer cap);
            lissa: ``depth=1000``, ``scale=None`` (λ_max(H + δI)), ``repeats=1``, ``hvp=None`` (stochastic
            product ``hvp(V, generator)``), ``seed=0``;
            arnoldi: ``rank`` (required), ``which="LM"|"LA"``, ``tol``, ``maxiter``, ``seed``, ``rcond``,
            ``krylov_dim`` (one Krylov space of that dimension, no restarts: a fixed cost).

    Returns:
        :class:`SolveResult` with ``x`` shaped like ``B`` and the true relative residual per column. With
        ``method="exact"`` over more parameters than :func:`dense_fits` allows, the solve is CG
        (``rtol=1e-10``) and ``method`` / ``info["fallback"]`` say so.

    Raises:
        IndefiniteHessianError / SingularHessianError: ``method="exact"`` on a matrix that is not positive
            definite (the message names the smallest eigenvalue and the damping that would fix it).
        ValueError / TypeError: bad shapes, dtypes, damping or options; FloatingPointError: a non-finite answer.
        MemoryError: ``method="pinv"`` over more parameters than :func:`dense_fits` allows.
    """
    if isinstance(op, Tensor):
        op = CurvatureOperator.from_matrix(op)
    if method not in _SOLVERS:
        raise ValueError(f"unknown method {method!r}: use one of {list(_SOLVERS)}")
    fn = _SOLVERS[method]
    allowed = _options_of(fn)
    bad = [k for k in options if k not in allowed]
    if bad:
        raise TypeError(f"method={method!r} takes no option(s) {bad}; its options are {allowed}")
    auto = isinstance(damping, str)
    if auto and damping != "auto":
        raise ValueError(f"damping must be a number >= 0 or 'auto', got {damping!r}")
    if not auto:
        damping = float(damping)
        if not damping >= 0.0 or damping == float("inf"):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    if not isinstance(B, Tensor) or B.dim() not in (1, 2) or B.shape[0] != op.dim:
        got = tuple(B.shape) if isinstance(B, Tensor) else type(B).__name__
        raise ValueError(f"B must have shape [{op.dim}] or [{op.dim}, k], got {got}")
    if B.dtype != op.dtype or B.device != op.device:
        raise TypeError(f"B is {B.dtype} on {B.device} but the operator is {op.dtype} on {op.device}: cast B")
    if not torch.isfinite(B).all():
        raise ValueError("B holds non-finite values: check the gradients that built it")
    vector = B.dim() == 1
    B2 = B[:, None] if vector else B
    start = op.applications
    pre: dict[str, Any] = {}
    dense = op._matrix is not None or dense_fits(op.dim, op.dtype)
    if method == "exact" and not dense:
        # the d×d matrix would not fit: CG to the exact solver's precision, and the result says so
        pre["fallback"] = (f"exact → cg: the dense H over d = {op.dim:,} parameters would take "
                           f"{memory.gb(dense_bytes(op.dim, op.dtype))}, over the memory budget of "
                           f"{memory.gb(memory.budget())} ({memory.ENV})")
        method, fn, options = "cg", _cg, {}
    elif method == "pinv" and not dense:
        raise MemoryError(f"method='pinv' needs the dense H over d = {op.dim:,} parameters "
                          f"({memory.gb(dense_bytes(op.dim, op.dtype))}), over the memory budget of "
                          f"{memory.gb(memory.budget())}: raise {memory.ENV}, or use method='cg' with damping > 0")
    solve_op = op
    if auto:
        solve_op, damping, spectrum = _auto_damping(op, method, options.get("seed", 0))
        pre |= spectrum
    X, iterations, info, used = fn(solve_op, B2, damping, **options)
    info = pre | info
    info["hvps"] = op.applications - start
    # a method that ended by computing B − (H + δI)X with the operator at the X it returns (the mixed-precision
    # refinement's stopping test) hands that residual over: the same numbers, without k more products
    measured = info.pop("final_residual", None)
    if not torch.isfinite(X).all():
        raise FloatingPointError(f"method={method!r} returned non-finite values: {info}")
    rel = relative_residual(op, X, B2, damping) if measured is None else measured
    return SolveResult(
        x=X[:, 0] if vector else X,
        relative_residual=rel[0] if vector else rel,
        method=used,
        iterations=int(iterations),
        damping=damping,
        info=info,
    )


# ----------------------------------------------------------------------------------------------------------
# LiSSA at many depths from one run
# ----------------------------------------------------------------------------------------------------------


class _RecordingOperator(CurvatureOperator):
    """Wraps an operator and keeps a copy of the block of vectors it is applied to at chosen calls of matmat."""

    def __init__(self, inner: CurvatureOperator, record_calls: set[int]) -> None:
        like = {n: torch.empty(s, dtype=inner.dtype, device=inner.device) for n, s in zip(inner.names, inner.shapes)}
        super().__init__(inner.matvec, like, kind=inner.kind)
        self._inner = inner
        self._record_calls = record_calls
        self.calls = 0
        self.recorded: dict[int, Tensor] = {}

    def matmat(self, V: Tensor, chunk_size: int | None = None) -> Tensor:
        self.calls += 1
        if self.calls in self._record_calls:
            self.recorded[self.calls] = V.clone()
        self.applications += V.shape[1]
        return self._inner.matmat(V, chunk_size)


def lissa_path(op: CurvatureOperator, B: Tensor, depths: Sequence[int], *, scale: float | None = None,
               damping: float = 0.0) -> dict[int, SolveResult]:
    """Deterministic (full-batch) LiSSA of :func:`helpers.solvers.solve` at several depths, from one run.

    The recursion h_j = B + h_{j−1} − (H h_{j−1} + δ h_{j−1})/s gives x_D = h_D / s at depth D, and h_D is the
    block the (D+1)-th product is applied to — so one run of the largest depth, with its products recorded, yields
    every smaller depth exactly (the same numbers as separate ``solve(..., method="lissa", depth=D)`` calls, at
    the cost of the largest alone).

    Args:
        op: the curvature operator; B: ``[d]`` or ``[d, k]``; depths: positive ints.
        scale: s (default λ_max(H + δI) by Lanczos, as ``solve`` does); damping: δ.

    Returns:
        ``{depth: SolveResult}`` with ``method="lissa"``, ``iterations = depth``, ``info["hvps"] = depth · k``,
        ``info["scale"]``, and the true relative residual (one extra product per depth).
    """
    depths = sorted({int(D) for D in depths})
    if not depths or depths[0] < 1:
        raise ValueError(f"depths must be positive integers, got {depths}")
    vector = B.dim() == 1
    B2 = B[:, None] if vector else B
    if scale is None:
        scale = float(extreme_eigenvalues(op, 1, "LA", method="dense" if op.dim <= 2 else "lanczos")[0]) + damping
    top = depths[-1]
    recorder = _RecordingOperator(op, {D + 1 for D in depths[:-1]})
    last = solve(recorder, B2, method="lissa", depth=top, scale=scale, damping=damping)
    out: dict[int, SolveResult] = {}
    for D in depths:
        X = last.x if D == top else recorder.recorded[D + 1] / scale
        rel = relative_residual(op, X, B2, damping)
        out[D] = SolveResult(x=X[:, 0] if vector else X, relative_residual=rel[0] if vector else rel,
                             method="lissa", iterations=D, damping=float(damping),
                             info={"hvps": D * B2.shape[1], "scale": float(scale)})
    return out
