"""The closed-form backend of the engine for bias-free softmax regression (the convex case; ``backend="closed_form"``).

The model is multinomial logistic regression without bias, :func:`helpers.models.logistic_regression`:
logits z_i = W x_i with W ``[c, d]`` (its parameter ``linear.weight``), and the objective of
:mod:`helpers.objective`

    R(W) = Σ_i w_i ℓ_i(W) + (λ/2)‖W‖²,      ℓ_i = logsumexp(W x_i) − (W x_i)_{y_i},      w_i = 1/n by default.

Everything the generic modules compute by autodiff has a closed form here, which is what makes the exact
check affordable at d = 784 × 10 (mnist5k):

* per-sample gradient  ∇ℓ_i = (p_i − e_{y_i}) ⊗ x_i       (p_i = softmax(W x_i));
* Hessian              H = Σ_i w_i (diag p_i − p_i p_iᵀ) ⊗ x_i x_iᵀ + λI,

flattened as ``W.reshape(-1)`` (class-major, row-major — the order of
:class:`helpers.curvature.CurvatureOperator` for ``{"linear.weight": W}``). Block (a, b) of H is
Xᵀ diag(w ⊙ A_ab) X with A_ab = p_a (δ_ab − p_b): 55 GEMMs for ten classes instead of 7,840 Hessian-vector
products. Features that are zero in every (weighted) training row — MNIST's border pixels — decouple: their
rows of H are exactly λI, so only the active block is assembled and factored.

This module is a *backend*: the engine's calls run it when :func:`helpers.models.is_softmax_regression` holds,
and a reader rarely calls it directly.

* :func:`objective_parts` — R, ∇R and H(W) in closed form: :func:`helpers.train.fit_to_tolerance` (L-BFGS, then
  Newton–CG to ‖∇R‖ < tol, recording the first iterate below each gradient-norm threshold — the early-stopping
  knob) runs on it for a bias-free softmax regression (:func:`model_at`).
* :func:`factorize` → :class:`HessianFactor` — H + δI assembled and Cholesky-factored once.
* :func:`solve_exact` — (H(θ) + δI) X = B: a direct solve when the factor is of this very matrix (or of the same
  point with another diagonal), else preconditioned CG with the factor, finished by CG, to a residual of 1e-12.
* :func:`softmax_regression_operator` — H as a :class:`~helpers.curvature.CurvatureOperator` with closed-form
  products, for every method of :func:`helpers.solvers.solve` (CG, LiSSA, Arnoldi, pinv).
* :func:`removal_estimate` — Δ_pred ``[n_test, n_train]`` in the book's convention, with any solver: what
  :func:`helpers.influence.predict_removal` runs for a bias-free softmax regression.
* :func:`leave_one_out` — the ground truth for many removals at once by the chord (simplified Newton)
  method, returned as a :class:`helpers.retrain.GroundTruth`: what :func:`helpers.retrain.warm_start` runs with a
  Newton recipe for a bias-free softmax regression. Cached.

Chapter 1's protocol on top of it (θ̂, estimates, leave-one-out over the extremes and a uniform sample, the
agreement table) is :mod:`helpers.experiments.convex`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from helpers.cache import memoize
from helpers.curvature import CurvatureOperator
from helpers.influence import InfluenceResult
from helpers.models import LogisticRegression
from helpers.objective import LooObjective, removal_weights
from helpers.retrain import GroundTruth
from helpers.solvers import Method, SolveResult, relative_residual, solve

__all__ = [
    "HessianFactor",
    "SoftmaxRegressionOperator",
    "factorize",
    "leave_one_out",
    "losses",
    "objective_and_grad",
    "loss_grads",
    "model_at",
    "objective_parts",
    "removal_effects",
    "removal_estimate",
    "softmax_regression_hessian",
    "softmax_regression_operator",
    "solve_exact",
]

PARAM_NAME = "linear.weight"  # the parameter of helpers.models.logistic_regression (bias-free)
#: members per batched gradient evaluation: bounds the [n, members, c] logits to about 256 MB
MEMBER_BYTES = 2**28


# ----------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------


def _check_xy(x: Tensor, y: Tensor | None, what: str = "train") -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{what} x must be a [n, d] tensor (flatten images first), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype != torch.float64:
        raise TypeError(f"{what} x is {x.dtype}: the convex tools work in float64 only — use x.double()")
    if x.shape[0] == 0:
        raise ValueError(f"{what} x has no rows")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} x holds non-finite values: clean the data")
    if y is not None:
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.int64:
            raise ValueError(f"{what} y must be [n] = [{x.shape[0]}] int64 class labels, got {y.dtype} "
                             f"{tuple(y.shape)}: use y.long()")


def _check_theta(theta: Tensor, d: int) -> None:
    if not isinstance(theta, Tensor) or theta.dim() != 2 or theta.shape[1] != d:
        got = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ValueError(f"theta must be the weight matrix [n_classes, d] = [c, {d}] of the linear model, got {got}")
    if theta.dtype != torch.float64:
        raise TypeError(f"theta is {theta.dtype}: use float64 (theta.double())")
    if not torch.isfinite(theta).all():
        raise ValueError("theta holds non-finite values: the fit diverged")


def _check_labels(y: Tensor, c: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"labels must lie in [0, {c}) for a {c}-class model, got range "
                         f"[{int(y.min())}, {int(y.max())}]")


def _weights(weights: Tensor | None, n: int, like: Tensor) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(weights).to(like)
    if w.shape != (n,):
        raise ValueError(f"weights must be [n] = [{n}], got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights hold non-finite values")
    return w


def _check_l2(l2: float, name: str = "l2") -> float:
    l2 = float(l2)
    if not (l2 >= 0 and math.isfinite(l2)):
        raise ValueError(f"{name} must be a finite number >= 0, got {l2}")
    return l2


# ----------------------------------------------------------------------------------------------------------
# objective, gradients, losses
# ----------------------------------------------------------------------------------------------------------


def _member_chunk(n: int, c: int) -> int:
    return max(1, MEMBER_BYTES // (8 * n * c))


def objective_and_grad(x: Tensor, y: Tensor, theta: Tensor, *, weights: Tensor | None = None, l2: float
                       ) -> tuple[Tensor, Tensor]:
    """R(W) and ∇R(W) for one weight matrix or for k of them at once.

    Args:
        x: ``[n, d]`` float64 inputs; y: ``[n]`` int64 labels.
        theta: ``[c, d]`` or stacked ``[k, c, d]`` weight matrices.
        weights: ``[n]`` (shared) or ``[k, n]`` (one row per member, e.g. :func:`helpers.objective.removal_weights`);
            ``None`` = 1/n.
        l2: λ.

    Returns:
        ``(value, grad)``: ``[]`` and ``[c, d]`` for one matrix, ``[k]`` and ``[k, c, d]`` for a stack (loss units;
        the gradient of the whole objective, L2 term included).

    Cost: two GEMMs of n·d·(k·c) multiply-adds, in member chunks bounding the logits to ~256 MB.
    """
    _check_xy(x, y)
    single = theta.dim() == 2
    th = theta[None] if single else theta
    if th.dim() != 3 or th.shape[2] != x.shape[1]:
        raise ValueError(f"theta must be [c, d] or [k, c, d] with d = {x.shape[1]}, got {tuple(theta.shape)}")
    k, c, d = th.shape
    _check_labels(y, c)
    n = x.shape[0]
    if weights is None or weights.dim() == 1:
        w = _weights(weights, n, x)[None].expand(k, n)
    else:
        w = torch.as_tensor(weights).to(x)
        if w.shape != (k, n):
            raise ValueError(f"weights must be [n] or [k, n] = [{k}, {n}], got {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError("weights hold non-finite values")
    values, grads = _value_grad(x, y, th, w, _check_l2(l2))
    return (values[0], grads[0]) if single else (values, grads)


def _lse(z: Tensor) -> Tensor:
    """logsumexp over the last axis, keepdim. Written out: ``torch.logsumexp`` over a short last axis was
    measured 50× slower than this on two threads."""
    top = z.amax(dim=-1, keepdim=True)
    return top + torch.exp(z - top).sum(dim=-1, keepdim=True).log()


def _value_grad(x: Tensor, y: Tensor, th: Tensor, w: Tensor, l2: float, need_grad: bool = True
                ) -> tuple[Tensor, Tensor | None]:
    """Unchecked batched objective: th ``[k, c, d]``, w ``[k, n]`` → values ``[k]``, grads ``[k, c, d]``."""
    k, c, d = th.shape
    n = x.shape[0]
    values = torch.empty(k, dtype=x.dtype, device=x.device)
    grads = torch.empty_like(th) if need_grad else None
    step = _member_chunk(n, c)
    rows = torch.arange(n, device=x.device)
    for s in range(0, k, step):
        t = th[s:s + step]
        m = t.shape[0]
        z = (x @ t.reshape(m * c, d).T).view(n, m, c)  # one GEMM for all members of the chunk
        lse = _lse(z)  # [n, m, 1]
        wt = w[s:s + step].T  # [n, m]
        values[s:s + step] = (wt * (lse[..., 0] - z[rows, :, y])).sum(0) + 0.5 * l2 * (t * t).sum((1, 2))
        if need_grad:
            err = torch.exp(z - lse)  # softmax; minus the one-hot target below
            err[rows, :, y] -= 1.0
            err *= wt[..., None]
            grads[s:s + step] = (err.reshape(n, m * c).T @ x).view(m, c, d) + l2 * t
    return values, grads


def losses(x: Tensor, y: Tensor, theta: Tensor) -> Tensor:
    """Per-sample cross-entropy ℓ(z_i, W) (nats): ``[n]`` for one ``[c, d]`` matrix, ``[k, n]`` for ``[k, c, d]``.

    Cost: one GEMM of n·d·(k·c).
    """
    _check_xy(x, y, "test")
    single = theta.dim() == 2
    th = theta[None] if single else theta
    k, c, d = th.shape
    _check_labels(y, c)
    n = x.shape[0]
    z = (x @ th.reshape(k * c, d).T).view(n, k, c)
    out = (_lse(z)[..., 0] - z[torch.arange(n, device=x.device), :, y]).T
    return out[0] if single else out


def loss_grads(x: Tensor, y: Tensor, theta: Tensor) -> Tensor:
    """∇ℓ(z_i, W) = (p_i − e_{y_i}) ⊗ x_i for every row, flattened like ``W.reshape(-1)``: ``[n, c·d]``.

    The loss gradient only (no L2 term, no weight), as :func:`helpers.influence.per_sample_grads`. Memory n·c·d
    numbers — the chapter's influence computation never forms it (see :func:`removal_estimate`). Cost O(n·c·d).
    """
    _check_xy(x, y)
    _check_theta(theta, x.shape[1])
    _check_labels(y, theta.shape[0])
    err = torch.softmax(x @ theta.T, dim=1) - torch.nn.functional.one_hot(y, theta.shape[0]).to(x)
    return (err[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------------------------------------
# the Hessian: closed form, operator, factor
# ----------------------------------------------------------------------------------------------------------


def _active_features(x: Tensor, w: Tensor) -> Tensor:
    """``[d]`` bool: features nonzero in some row of nonzero weight (the others have H = λI exactly)."""
    return (x[w != 0] != 0).any(dim=0)


def _active_block(x: Tensor, theta: Tensor, w: Tensor, active: Tensor) -> Tensor:
    """The data term of H on the active features, ``[c·d_a, c·d_a]`` (class-major), symmetric, without λ."""
    c = theta.shape[0]
    xa = x[:, active]
    da = xa.shape[1]
    p = torch.softmax(x @ theta.T, dim=1)  # [n, c]
    out = torch.empty(c, da, c, da, dtype=x.dtype, device=x.device)
    for a in range(c):  # a loop over class pairs (55 GEMMs for ten classes), never over samples
        for b in range(a, c):
            coef = w * p[:, a] * ((1.0 if a == b else 0.0) - p[:, b])  # w_i (diag p − p pᵀ)_ab
            blk = xa.T @ (xa * coef[:, None])
            if a == b:
                blk = 0.5 * (blk + blk.T)  # the GEMM is symmetric only to rounding; Cholesky reads one triangle
                out[a, :, a, :] = blk
            else:
                out[a, :, b, :] = blk
                out[b, :, a, :] = blk.T
    return out.view(c * da, c * da)


def softmax_regression_hessian(x: Tensor, theta: Tensor, *, weights: Tensor | None = None, l2: float) -> Tensor:
    """The exact Hessian of R at W, in closed form: ``[c·d, c·d]`` float64.

        H = Σ_i w_i (diag p_i − p_i p_iᵀ) ⊗ x_i x_iᵀ + λI,     p_i = softmax(W x_i),

    flattened like ``W.reshape(-1)`` — the order of :class:`helpers.curvature.CurvatureOperator` for
    ``{"linear.weight": W}``, so it equals ``hessian_operator(model, params, x, y, l2=λ).dense()``. Labels do
    not enter (the softmax cross-entropy Hessian does not depend on them).

    Cost: c(c+1)/2 GEMMs of n·d_a² (d_a = features not zero in every row), (c·d)² numbers of memory
    (490 MB in float64 for 784 × 10). For solving, prefer :func:`factorize`, which never forms the full matrix.
    """
    _check_xy(x, None)
    _check_theta(theta, x.shape[1])
    l2 = _check_l2(l2)
    c, d = theta.shape
    w = _weights(weights, x.shape[0], x)
    active = _active_features(x, w)
    idx = torch.nonzero(active).reshape(-1)
    full = torch.zeros(c, d, c, d, dtype=x.dtype, device=x.device)
    block = _active_block(x, theta, w, active).view(c, idx.numel(), c, idx.numel())
    full[:, idx[:, None], :, idx[None, :]] = block.permute(1, 3, 0, 2)  # advanced dims come first
    full = full.view(c * d, c * d)
    full.diagonal().add_(l2)
    return full


class SoftmaxRegressionOperator(CurvatureOperator):
    """H (or H without λ) of softmax regression at W as a :class:`~helpers.curvature.CurvatureOperator`.

    Products in closed form — Hv = vec(Σ_i w_i [(diag p_i − p_i p_iᵀ) V x_i] x_iᵀ) + λ v — cost two GEMMs of
    n·d·(k·c) for k vectors (about one gradient evaluation each, the same as a dense matrix-vector product for
    784 × 10 but reading 25 MB instead of 490 MB). :meth:`dense` assembles H in closed form
    (:func:`softmax_regression_hessian`), so ``method="exact"`` / ``"pinv"`` of :func:`helpers.solvers.solve`
    cost 55 GEMMs, not c·d products. ``applications`` counts products as for every operator.
    """

    def __init__(self, x: Tensor, theta: Tensor, weights: Tensor, l2: float) -> None:
        self._x, self._theta, self._w, self._l2 = x, theta, weights, l2
        self._p = torch.softmax(x @ theta.T, dim=1)
        # Products touch only the features with data (the rest of H is λI), and the second GEMM reads a
        # contiguous transpose: together about a third faster per product than the plain formula.
        self._active = _active_features(x, weights)
        self._xa = x[:, self._active].contiguous()
        self._xa_t = self._xa.T.contiguous()
        super().__init__(self._product_one, {PARAM_NAME: theta}, kind="hessian")

    def _products(self, V: Tensor) -> Tensor:
        """``V [c·d, k]`` → ``H V [c·d, k]``."""
        c, d = self._theta.shape
        k = V.shape[1]
        n, da = self._xa.shape
        vm = V.T.reshape(k, c, d)
        va = vm[:, :, self._active].reshape(k * c, da)
        u = (self._xa @ va.T).view(n, k, c)  # (V_j x_i) for every vector j and sample i
        p = self._p[:, None, :]
        au = (p * u - p * (p * u).sum(-1, keepdim=True)) * self._w[:, None, None]
        data = (self._xa_t @ au.view(n, k * c)).view(da, k, c).permute(1, 2, 0)  # [k, c, d_a]
        out = self._l2 * vm if self._l2 else torch.zeros_like(vm)
        out[:, :, self._active] += data
        return out.reshape(k, c * d).T

    def _product_one(self, v: Tensor) -> Tensor:
        return self._products(v[:, None])[:, 0]

    def matmat(self, V: Tensor, chunk_size: int | None = None) -> Tensor:
        """H V for ``V [c·d, k]`` in one batched closed-form product (k counted as k applications)."""
        self._check_vec(V, 2)
        self.applications += V.shape[1]
        if V.shape[1] == 0:
            return V.clone()
        return self._finite(self._products(V))

    def dense(self, chunk_size: int | None = None) -> Tensor:
        """The full ``[c·d, c·d]`` matrix by :func:`softmax_regression_hessian` (not counted as products)."""
        return softmax_regression_hessian(self._x, self._theta, weights=self._w, l2=self._l2)


def softmax_regression_operator(x: Tensor, theta: Tensor, *, weights: Tensor | None = None, l2: float
                                ) -> SoftmaxRegressionOperator:
    """H of R at W as a closed-form :class:`SoftmaxRegressionOperator` (``l2=0``: the data term alone, singular
    along W → W + 1vᵀ). Construction: one GEMM for the probabilities."""
    _check_xy(x, None)
    _check_theta(theta, x.shape[1])
    return SoftmaxRegressionOperator(x, theta.detach(), _weights(weights, x.shape[0], x), _check_l2(l2))


@dataclass
class HessianFactor:
    """H(W₀) + (λ + δ)I, assembled in closed form and Cholesky-factored on its active block.

    Attributes:
        theta: ``[c, d]`` the point W₀ the Hessian was built at; l2: λ; damping: δ.
        active: ``[d]`` bool, the features with data (the others' rows of H are (λ + δ)I exactly).
        cholesky: lower Cholesky factor of the active block, ``[c·d_a, c·d_a]``.
        weights: the per-sample weights used (``None`` = 1/n).
        block: the data term of the active block (no λ, no δ), kept only with ``keep_block=True`` so that
            :meth:`shifted` can refactor H + sI for another shift s without reassembling.
        seconds: wall time of assembly and factorisation.
    """

    theta: Tensor
    l2: float
    damping: float
    active: Tensor
    cholesky: Tensor
    weights: Tensor | None = None
    block: Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.theta.numel())

    def shifted(self, l2: float, damping: float = 0.0) -> "HessianFactor":
        """The factor of H_data(W₀) + (l2 + damping)I at the same point (e.g. the L2 term left out, damping added).

        Needs the stored data block (``factorize(..., keep_block=True)``). Cost: one Cholesky of size c·d_a.
        """
        if self.block is None:
            raise ValueError("this factor kept no data block: build it with factorize(..., keep_block=True)")
        l2, damping = _check_l2(l2), _check_l2(damping, "damping")
        t0 = time.perf_counter()
        L = _cholesky(self.block, l2 + damping, l2, damping)
        return HessianFactor(theta=self.theta, l2=l2, damping=damping, active=self.active, cholesky=L,
                             weights=self.weights, block=self.block, seconds={"cholesky": time.perf_counter() - t0})

    def apply_inverse(self, B: Tensor) -> Tensor:
        """(H(W₀) + (λ + δ)I)⁻¹ B for ``B [c·d]`` or ``[c·d, k]``. Cost: two triangular solves on the active block."""
        vector = B.dim() == 1
        B2 = B[:, None] if vector else B
        ba, out = self._split(B2)
        out[:, self.active, :] = torch.cholesky_solve(ba, self.cholesky).view(self.theta.shape[0], -1, B2.shape[1])
        out = out.reshape(B2.shape)
        return out[:, 0] if vector else out

    def _split(self, B: Tensor) -> tuple[Tensor, Tensor]:
        """Active rows of ``B [c·d, k]`` as ``[c·d_a, k]``, and ``[c, d, k]`` output with the inactive rows solved
        (there H + δI = (λ + δ)I exactly)."""
        c, d = self.theta.shape
        if B.dim() != 2 or B.shape[0] != c * d:
            raise ValueError(f"B must have {c * d} rows (c·d), got {tuple(B.shape)}")
        k = B.shape[1]
        b4 = B.reshape(c, d, k)
        out = torch.empty_like(b4)
        if not bool(self.active.all()):
            shift = self.l2 + self.damping
            if shift == 0:
                raise ValueError("the Hessian is singular on features that are zero in every training row and "
                                 "neither an L2 term nor damping is set: add damping > 0")
            out[:, ~self.active, :] = b4[:, ~self.active, :] / shift
        return b4[:, self.active, :].reshape(-1, k), out


def _cholesky(block: Tensor, shift: float, l2: float, damping: float, copy: bool = True) -> Tensor:
    """Lower Cholesky factor of ``block + shift·I`` (in a copy, or in place of ``block``), or a clear error if the
    matrix is not positive definite."""
    A = block.clone() if copy else block
    A.diagonal().add_(shift)
    L, info = torch.linalg.cholesky_ex(A, out=(A, torch.empty((), dtype=torch.int32)))
    if int(info) != 0:
        raise ValueError(
            f"H + damping·I is not positive definite (Cholesky failed at pivot {int(info)}) with l2={l2}, "
            f"damping={damping}: without an L2 term the softmax Hessian is singular along W → W + 1vᵀ — add "
            "damping > 0 or keep the L2 term"
        )
    return L


def factorize(x: Tensor, theta: Tensor, *, weights: Tensor | None = None, l2: float, damping: float = 0.0,
              keep_block: bool = False) -> HessianFactor:
    """Assemble H(W) + δI in closed form and factor it (Cholesky) — the "exact Hessian, exact solve" of chapter 1.

    Args:
        x: ``[n, d]`` float64 training inputs; theta: ``[c, d]`` the point W; weights: ``[n]`` or None (1/n).
        l2: λ in H; damping: δ. keep_block: also keep the data block for :meth:`HessianFactor.shifted`.

    Raises:
        ValueError naming λ and δ when H + δI is not positive definite (without λ the softmax Hessian is singular
        along W → W + 1vᵀ: add damping).

    Cost: c(c+1)/2 GEMMs of n·d_a² plus a Cholesky of size c·d_a (mnist5k, 4,000 × 784 → d_a = 659: about 6 s
    and 3 s on one core); memory (c·d_a)² numbers (350 MB), twice with ``keep_block``.
    """
    _check_xy(x, None)
    _check_theta(theta, x.shape[1])
    l2, damping = _check_l2(l2), _check_l2(damping, "damping")
    w = _weights(weights, x.shape[0], x)
    active = _active_features(x, w)
    t0 = time.perf_counter()
    block = _active_block(x, theta.detach(), w, active)
    t1 = time.perf_counter()
    # without keep_block the factor overwrites the block: one (c·d_a)² buffer instead of two
    L = _cholesky(block, l2 + damping, l2, damping, copy=keep_block)
    if not keep_block:
        block = None
    t2 = time.perf_counter()
    return HessianFactor(theta=theta.detach().clone(), l2=l2, damping=damping, active=active, cholesky=L,
                         weights=None if weights is None else w.clone(), block=block,
                         seconds={"assemble": t1 - t0, "cholesky": t2 - t1})


def _same_point(factor: HessianFactor, theta: Tensor, w: Tensor | None, n: int) -> bool:
    """Is ``factor``'s data term exactly H_data(theta; w)?"""
    if not torch.equal(factor.theta, theta):
        return False
    ones = torch.full((n,), 1.0 / n, dtype=theta.dtype, device=theta.device)
    fw = ones if factor.weights is None else factor.weights
    return torch.equal(fw, ones if w is None else w)


#: PCG steps with a factor of another point before plain CG takes over (each PCG step reads the whole factor)
PCG_STEPS = 8


def solve_exact(x: Tensor, theta: Tensor, B: Tensor, *, weights: Tensor | None = None, l2: float,
                damping: float = 0.0, factor: HessianFactor | None = None, rtol: float = 1e-12,
                maxiter: int | None = None) -> SolveResult:
    """Solve (H(W) + δI) X = B exactly (to a relative residual ≤ ``rtol`` measured with the true H(W)).

    With ``factor`` of this very matrix (same W, λ + δ, weights): one direct Cholesky solve; of the same W with
    another diagonal and a kept block (``keep_block=True``): one new Cholesky, then a direct solve. With a factor
    of another point W₀: preconditioned conjugate gradients with that factor (H(W₀)⁻¹H(W) is close to I when W is
    close to W₀, so a few steps reach round-off); if :data:`PCG_STEPS` steps do not suffice or a step shrinks the
    residual less than 4-fold (W far from W₀), plain conjugate gradients (:func:`helpers.solvers.solve`) continue
    from there — a PCG step reads the whole factor, a CG step only the data. Without ``factor``:
    :func:`factorize` first.

    Args:
        x: ``[n, d]`` training inputs; theta: ``[c, d]``; B: ``[c·d]`` or ``[c·d, k]``.
        l2: λ of H (0 leaves the L2 term out: then pass damping > 0). damping: δ.
        rtol: target relative residual of the iterative paths; maxiter: their CG budget (default 10·c·d).

    Returns:
        :class:`helpers.solvers.SolveResult` (method ``"exact"``, ``"pcg"`` or ``"pcg+cg"``, ``iterations`` = all
        iterative steps, ``info["hvps"]`` closed-form products, ``relative_residual`` recomputed with the true H).

    Raises:
        RuntimeError if the iterative path ends above 10·``rtol`` (names the residual reached).
    """
    _check_xy(x, None)
    _check_theta(theta, x.shape[1])
    l2, damping = _check_l2(l2), _check_l2(damping, "damping")
    w = None if weights is None else _weights(weights, x.shape[0], x)
    op = softmax_regression_operator(x, theta, weights=w, l2=l2)
    if not isinstance(B, Tensor) or B.dim() not in (1, 2) or B.shape[0] != op.dim:
        raise ValueError(f"B must be [{op.dim}] or [{op.dim}, k], got "
                         f"{tuple(B.shape) if isinstance(B, Tensor) else type(B).__name__}")
    if not torch.isfinite(B).all():
        raise ValueError("B holds non-finite values: check the gradients that built it")
    vector = B.dim() == 1
    B2 = (B[:, None] if vector else B).to(x)
    if factor is None:
        factor = factorize(x, theta, weights=w, l2=l2, damping=damping)
    same_point = _same_point(factor, theta, w, x.shape[0])
    if same_point and factor.l2 + factor.damping != l2 + damping and factor.block is not None:
        factor = factor.shifted(l2, damping)  # same data term, another diagonal: refactor, still direct
    if same_point and factor.l2 + factor.damping == l2 + damping:
        X = factor.apply_inverse(B2)
        method, iterations = "exact", 0
    else:
        # preconditioned CG with the factor, starting from the factor's own answer (already close); it gives up as
        # soon as a step shrinks the residual less than 4-fold (the factor is of a point too far away)
        first = solve(op, B2, method="cg", damping=damping, rtol=rtol, maxiter=PCG_STEPS,
                      x0=factor.apply_inverse(B2), preconditioner=factor.apply_inverse, stall=4.0)
        X, iterations, method = first.x, first.iterations, "pcg"
        done = bool(first.info["converged"].all())
        if not done:
            more = solve(op, B2, method="cg", damping=damping, rtol=rtol, x0=X, maxiter=maxiter)
            X, iterations, method = more.x, iterations + more.iterations, "pcg+cg"
    hvps = op.applications
    rel = relative_residual(op, X, B2, damping)
    if method != "exact" and float(rel.max()) > 10 * rtol:
        raise RuntimeError(f"the iterative solve stopped at relative residual {float(rel.max()):.2e} > 10·rtol "
                           f"({rtol:.0e}) after {iterations} steps: raise maxiter or factorize at this point")
    return SolveResult(x=X[:, 0] if vector else X, relative_residual=rel[0] if vector else rel, method=method,
                       iterations=iterations, damping=damping,
                       info={"hvps": hvps, "factor_at_same_point": method == "exact", "rtol": rtol})


# ----------------------------------------------------------------------------------------------------------
# training to a gradient-norm tolerance
# ----------------------------------------------------------------------------------------------------------


def objective_parts(x: Tensor, y: Tensor, *, n_classes: int, weights: Tensor | None = None, l2: float
                    ) -> tuple[Callable[[Tensor], tuple[float, Tensor, float]], Callable[[Tensor], CurvatureOperator]]:
    """The closed-form backend of :func:`helpers.train.fit_to_tolerance` for softmax regression.

    Returns ``evaluate(W) -> (R(W), ∇R(W) [c, d], ‖∇R(W)‖₂)`` and ``operator(W)`` → the
    :class:`SoftmaxRegressionOperator` of H(W), both for the objective with ``weights`` (default 1/n) and λ.
    """
    _check_xy(x, y)
    _check_labels(y, int(n_classes))
    l2 = _check_l2(l2)
    w = None if weights is None else _weights(weights, x.shape[0], x)
    wv = _weights(w, x.shape[0], x)[None]

    def evaluate(theta: Tensor) -> tuple[float, Tensor, float]:
        val, g = _value_grad(x, y, theta[None], wv, l2)
        return float(val[0]), g[0], float(torch.linalg.vector_norm(g[0]))

    def operator(theta: Tensor) -> CurvatureOperator:
        return softmax_regression_operator(x, theta, weights=w, l2=l2)

    return evaluate, operator


# ----------------------------------------------------------------------------------------------------------
# influence estimates
# ----------------------------------------------------------------------------------------------------------


def model_at(theta: Tensor) -> LogisticRegression:
    """The bias-free :class:`helpers.models.LogisticRegression` whose ``linear.weight`` is ``theta`` ``[c, d]`` (a
    copy, in theta's dtype): what the engine's functions take (:func:`helpers.influence.predict_removal` runs
    this module's closed forms on it, :func:`removal_estimate`)."""
    if theta.dim() != 2:
        raise ValueError(f"theta must be [n_classes, n_features], got shape {tuple(theta.shape)}")
    model = LogisticRegression(theta.shape[1], theta.shape[0], bias=False, dtype=theta.dtype).to(theta.device)
    with torch.no_grad():
        model.linear.weight.copy_(theta)
    return model


def removal_estimate(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, theta: Tensor, *,
                     l2: float, weights: Tensor | None = None, damping: float = 0.0,
                     include_l2_in_hessian: bool = True, method: Method = "exact",
                     factor: HessianFactor | None = None, **solver_options: Any) -> InfluenceResult:
    """Δ_pred ``[n_test, n_train]`` for softmax regression at W: the predicted change of each test loss when each
    training point is removed (loss units; positive = the point helped), the book's convention (STUDY.md §1):

        Δ_pred[t, i] = w_i ∇ℓ(z_test_t, W)ᵀ (H + δI)⁻¹ ∇ℓ(z_i, W),     H = ∇²R(W) (λI included unless asked not to).

    The closed-form backend of :func:`helpers.influence.predict_removal`, which calls it for a bias-free
    :class:`helpers.models.LogisticRegression` (:func:`model_at`): call that. Computed without autodiff and without
    forming the ``[n_train, c·d]`` training gradients: with V_t = (H + δI)⁻¹ ∇ℓ_test_t as a ``[c, d]`` matrix,
    ∇ℓ_iᵀ V_t = (p_i − e_{y_i})ᵀ V_t x_i.

    Args:
        method: ``"exact"`` — :func:`solve_exact` (direct with ``factor`` of this matrix, else preconditioned CG
            to a relative residual of 1e-13; without ``factor`` one is built); any other
            :data:`helpers.solvers.Method` (``"cg"``, ``"lissa"``, ``"arnoldi"``, ``"pinv"``) runs
            :func:`helpers.solvers.solve` on the closed-form :class:`SoftmaxRegressionOperator` with
            ``**solver_options`` (e.g. ``maxiter``, ``depth``, ``scale``, ``rank``).
        include_l2_in_hessian: ``False`` solves with the data term alone (singular: give damping > 0, or
            ``method="pinv"``).
        factor: a :class:`HessianFactor` (:func:`factorize`): only makes the solve faster (direct or
            preconditioned), never changes its answer beyond the solver's tolerance.

    Returns:
        :class:`helpers.influence.InfluenceResult` (``solve.relative_residual`` per test point, ``solve.info["hvps"]``
        the operator products spent).

    Cost: one solve with n_test right-hand sides and two GEMMs of n_train·d·(n_test·c).
    """
    _check_xy(x_train, y_train)
    _check_xy(x_test, y_test, "test")
    _check_theta(theta, x_train.shape[1])
    if x_test.shape[1] != x_train.shape[1]:
        raise ValueError(f"x_test has {x_test.shape[1]} features, x_train {x_train.shape[1]}")
    c, d = theta.shape
    n = x_train.shape[0]
    w = _weights(weights, n, x_train)
    l2_h = _check_l2(l2) if include_l2_in_hessian else 0.0
    g_test = loss_grads(x_test, y_test, theta)  # [T, c·d], T small
    if method == "exact":
        result = solve_exact(x_train, theta, g_test.T.contiguous(), weights=weights, l2=l2_h, damping=damping,
                             factor=factor, **solver_options)
    else:
        op = softmax_regression_operator(x_train, theta, weights=weights, l2=l2_h)
        result = solve(op, g_test.T.contiguous(), method=method, damping=damping, **solver_options)
    values = removal_effects(x_train, y_train, theta, result.x.reshape(c * d, -1), weights=w)
    return InfluenceResult(values=values, solve=result, param_names=[PARAM_NAME], damping=float(damping),
                           hessian="hessian", l2_in_hessian=l2_h)


def removal_effects(x_train: Tensor, y_train: Tensor, theta: Tensor, solution: Tensor, *,
                    weights: Tensor | None = None) -> Tensor:
    """Δ_pred ``[T, n_train]`` from solved test directions: values[t, i] = w_i ∇ℓ(z_i, W)ᵀ v_t.

    Args:
        solution: ``[c·d, T]`` (or ``[c·d]``) the vectors v_t = (H + δI)⁻¹ ∇ℓ(z_test_t, W) from any solver (e.g.
            the ``x`` of a :class:`helpers.solvers.SolveResult`). weights: w_i (default 1/n).

    Cost: two GEMMs of n·d·(T·c); the ``[n, c·d]`` training gradients are never formed
    (∇ℓ_iᵀ v = (p_i − e_{y_i})ᵀ V x_i).
    """
    _check_xy(x_train, y_train)
    _check_theta(theta, x_train.shape[1])
    c, d = theta.shape
    n = x_train.shape[0]
    sol = solution[:, None] if solution.dim() == 1 else solution
    if sol.dim() != 2 or sol.shape[0] != c * d:
        raise ValueError(f"solution must be [c·d] or [c·d, T] with c·d = {c * d}, got {tuple(solution.shape)}")
    w = _weights(weights, n, x_train)
    T = sol.shape[1]
    v = sol.T.reshape(T, c, d)
    m = (x_train @ v.reshape(T * c, d).T).view(n, T, c)  # (V_t x_i)
    err = torch.softmax(x_train @ theta.T, dim=1) - torch.nn.functional.one_hot(y_train, c).to(x_train)
    return (err[:, None, :] * m).sum(-1).T * w[None, :]


# ----------------------------------------------------------------------------------------------------------
# leave-one-out ground truth: the chord method, all members at once
# ----------------------------------------------------------------------------------------------------------


def leave_one_out(x: Tensor, y: Tensor, test: tuple[Tensor, Tensor], theta_hat: Tensor, removed: Sequence[int], *,
                  l2: float, tol: float = 1e-10, loo: LooObjective = "drop", factor: HessianFactor | None = None,
                  max_iter: int = 100, keep_params: bool = False, cache: bool = True) -> GroundTruth:
    """Exact leave-one-out retraining of softmax regression for every index in ``removed``, plus a drift member.

    Member j minimises R_j(W) = Σ_i w_ji ℓ_i(W) + (λ/2)‖W‖² with w_j a row of
    :func:`helpers.objective.removal_weights` (``loo="drop"``: the others keep 1/n; ``"reaverage"``: 1/(n−1));
    the last member removes nothing (the drift run). All members start at θ̂ (warm start) and iterate the
    chord (simplified Newton) method with a fixed, member-specific preconditioner

        W_j ← W_j − P_j⁻¹ ∇R_j(W_j),      P_j = H₀ − (1/n)(diag p_i − p_i p_iᵀ) ⊗ x_i x_iᵀ  at θ̂,

    H₀ = H(θ̂) (or ``factor``'s matrix) factored once and P_j applied through a rank-c Woodbury update of that
    factor — P_j is member j's own Hessian at θ̂ for ``"drop"`` — in one batched step for all members, until
    every member's *own* ‖∇R_j‖₂ < ``tol``. The preconditioner only sets the speed; the stopping test on the
    true gradient makes the answer exact. The first step is the one-step Newton estimate from θ̂, recorded as
    ``settings["one_step_delta"]``. A member whose gradient norm shrinks by less than 10 % in a step (or whose
    objective rises) is switched to full Newton steps with its own closed-form Hessian and Armijo backtracking.

    Args:
        x, y: ``[n, d]`` float64, ``[n]`` int64 training data; test: ``(x_test, y_test)``.
        theta_hat: ``[c, d]`` θ̂ (the full-data fit). removed: training indices. l2: λ. tol: on ‖∇R_j‖₂.
        factor: a :class:`HessianFactor` at (or near) θ̂ to reuse; default: built at θ̂.
        keep_params: also return the members' weights ``{"linear.weight": [members, c, d]}``.
        cache: memoise on disk (:mod:`helpers.cache`); the factor is not part of the key (it changes only speed).

    Returns:
        :class:`helpers.retrain.GroundTruth` with protocol ``"convex_chord"``: ``delta [n_test, n_removed]`` =
        ℓ(z_test, θ̂₋ᵢ) − ℓ(z_test, θ̂), ``drift [n_test]``, ``grad_norm [n_removed + 1]`` (drift member last),
        ``settings`` with ``iterations``, ``newton_fallbacks``, ``one_step_delta [n_test, n_removed]`` (test-loss
        change after the first step, the one-step Newton estimate) and ``seconds``.

    Raises:
        RuntimeError naming the member and gradient norm if ``max_iter`` steps do not reach ``tol``.

    Cost: one triangular solve with k·c right-hand sides for the Woodbury factors, then per step two GEMMs of
    n·d·(k·c) for k members and one triangular solve pair with k right-hand sides; typically 4–8 steps to 1e-10
    (mnist5k, λ = 0.01), more for smaller λ.
    """
    _check_xy(x, y)
    xt, yt = test
    _check_xy(xt, yt, "test")
    _check_theta(theta_hat, x.shape[1])
    c = theta_hat.shape[0]
    _check_labels(y, c)
    _check_labels(yt, c)
    l2 = _check_l2(l2)
    n = x.shape[0]
    r = [int(i) for i in np.asarray(removed).reshape(-1)]
    bad = [i for i in r if not 0 <= i < n]
    if bad:
        raise ValueError(f"removed indices {bad} are outside the training set [0, {n}); the drift member is added "
                         "by leave_one_out itself")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")

    def compute() -> GroundTruth:
        return _leave_one_out(x, y, xt, yt, theta_hat.detach(), r, l2, float(tol), loo, factor, max_iter,
                              keep_params)

    if not cache:
        return compute()
    key = {"x": x, "y": y, "test": [xt, yt], "theta_hat": theta_hat, "removed": r, "l2": l2, "tol": float(tol),
           "loo": loo, "max_iter": max_iter, "keep_params": keep_params}
    return memoize("convex_leave_one_out", key, compute)


def _leave_one_out(x: Tensor, y: Tensor, xt: Tensor, yt: Tensor, theta_hat: Tensor, r: list[int], l2: float,
                   tol: float, loo: LooObjective, factor: HessianFactor | None, max_iter: int, keep_params: bool
                   ) -> GroundTruth:
    t0 = time.perf_counter()
    c, d = theta_hat.shape
    n = x.shape[0]
    if factor is None:
        factor = factorize(x, theta_hat, l2=l2)
    all_removed = r + [-1]  # the drift member last
    W = removal_weights(n, all_removed, loo, dtype=x.dtype).to(x.device)  # [m, n]
    m = W.shape[0]
    da = int(factor.active.sum())
    # members per chunk: bounds the Woodbury factors [c·d_a, members·c] to about 256 MB
    step = max(1, MEMBER_BYTES // (8 * c * c * max(da, 1)))
    parts = [_loo_chunk(x, y, theta_hat, W[s:s + step], all_removed[s:s + step], l2, tol, factor, max_iter)
             for s in range(0, m, step)]
    theta = torch.cat([p[0] for p in parts])
    gn = torch.cat([p[1] for p in parts])
    iters = torch.cat([p[2] for p in parts])
    newton = torch.cat([p[3] for p in parts])
    first = torch.cat([p[4] for p in parts])
    if bool((gn >= tol).any()):
        j = int(torch.argmax(gn))
        raise RuntimeError(f"leave-one-out member {j} (removed index {all_removed[j]}) stopped at ‖∇R‖ = "
                           f"{float(gn[j]):.2e} > tol {tol:.0e} after {max_iter} steps: loosen tol or raise max_iter")
    out = losses(xt, yt, torch.cat([theta, first, theta_hat[None]]))  # one kernel, reference included
    ref = out[-1]
    members = out[:m]
    one_step = out[m:2 * m]
    np_ = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return GroundTruth(
        protocol="convex_chord", delta=np_(members[:-1] - ref).T, drift=np_(members[-1] - ref),
        removed=np.asarray(r, dtype=np.int64),
        recipe={"optimizer": "chord_newton", "tol": tol, "weight_decay": l2, "max_iter": max_iter,
                "dtype": "float64", "loss": "cross_entropy", "start": "theta_hat"},
        test_losses=np_(members), ref_loss=np_(ref), grad_norm=np_(gn),
        settings={"params": "all", "loo": loo, "iterations": np_(iters), "newton_fallbacks": int(newton.sum()),
                  "one_step_delta": np_(one_step[:-1] - ref).T, "seconds": time.perf_counter() - t0},
        params={PARAM_NAME: theta} if keep_params else None)


def _loo_chunk(x: Tensor, y: Tensor, theta_hat: Tensor, W: Tensor, removed: list[int], l2: float, tol: float,
               factor: HessianFactor, max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chord iteration for one chunk of members; returns (theta, grad norms, iterations, fell back to
    Newton, first iterate).

    Preconditioner of member j (removing point i): the member's own Hessian at θ̂ for "drop",
    H₀ − w_i (diag p_i − p_i p_iᵀ) ⊗ x_i x_iᵀ = L (I − V_j C_j V_jᵀ) Lᵀ with V_j = L⁻¹(I_c ⊗ x_i) and
    C_j = w_i (diag p_i − p_i p_iᵀ), applied by the Woodbury identity
    (I − V C Vᵀ)⁻¹ = I + V C (I − VᵀV C)⁻¹ Vᵀ — a rank-c correction per member. Taking the removed point's own
    curvature out makes the iteration contract at second order (its first step is the exact one-step Newton
    from θ̂); without it the contraction factor is the point's leverage, which is large for small n or λ.
    """
    c, d = theta_hat.shape
    n = x.shape[0]
    k = W.shape[0]
    act = factor.active
    da = int(act.sum())
    L = factor.cholesky
    idx = torch.as_tensor(removed, dtype=torch.long, device=x.device)
    real = idx >= 0
    xi = torch.zeros(k, da, dtype=x.dtype, device=x.device)
    xi[real] = x[idx[real]][:, act]
    p = torch.softmax(x[idx.clamp_min(0)] @ theta_hat.T, dim=1)  # [k, c] p_i at θ̂
    wi = torch.where(real, 1.0 / n, 0.0).to(x)  # the removed weight (the drift member removes nothing)
    C = wi[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])  # [k, c, c]
    U = torch.zeros(c, da, k, c, dtype=x.dtype, device=x.device)
    for a in range(c):  # column (j, a) of U is e_a ⊗ x_i: class a's block holds x_i
        U[a, :, :, a] = xi.T
    V = torch.linalg.solve_triangular(L, U.view(c * da, k * c), upper=False).view(c * da, k, c)
    K = torch.einsum("dka,dkb->kab", V, V)  # VᵀV per member
    eye = torch.eye(c, dtype=x.dtype, device=x.device)
    inner = eye - K @ C  # (I − K C), invertible because the member's Hessian at θ̂ is positive definite

    def precondition(G: Tensor, ids: Tensor) -> Tensor:
        """Apply member-wise (H₀ − U C Uᵀ)⁻¹ to gradients ``G [k', c, d]``."""
        B = G.reshape(-1, c * d).T
        qa, out = factor._split(B)
        q = torch.linalg.solve_triangular(L, qa, upper=False)  # [c·d_a, k']
        Vs = V[:, ids, :]
        t = torch.einsum("dkc,dk->kc", Vs, q)
        v = (C[ids] @ torch.linalg.solve(inner[ids], t[..., None]))[..., 0]
        q = q + torch.einsum("dkc,kc->dk", Vs, v)
        out[:, act, :] = torch.linalg.solve_triangular(L.T, q, upper=True).view(c, da, -1)
        return out.reshape(c * d, -1).T.reshape(-1, c, d)

    theta = theta_hat[None].expand(k, c, d).clone()
    vals, G = _value_grad(x, y, theta, W, l2)
    gn = torch.linalg.vector_norm(G.reshape(k, -1), dim=1)
    iters = torch.zeros(k, dtype=torch.long)
    newton = torch.zeros(k, dtype=torch.bool)
    first = theta.clone()
    eps = torch.finfo(x.dtype).eps
    for it in range(1, max_iter + 1):
        active = gn >= tol
        if not bool(active.any()):
            break
        ids = torch.nonzero(active & ~newton).reshape(-1)
        if ids.numel():
            cand = theta[ids] - precondition(G[ids], ids)
            v_new, g_new = _value_grad(x, y, cand, W[ids], l2)
            gn_new = torch.linalg.vector_norm(g_new.reshape(ids.numel(), -1), dim=1)
            rose = v_new > vals[ids] + 8 * eps * vals[ids].abs()
            slow = (gn_new > 0.9 * gn[ids]) & (gn_new >= tol)  # (nearly) no contraction: chord is failing
            keep = ~rose  # a step that raised the objective is undone; that member continues with Newton
            kept = ids[keep]
            theta[kept], vals[kept], G[kept], gn[kept] = cand[keep], v_new[keep], g_new[keep], gn_new[keep]
            iters[ids] += 1
            newton[ids[rose | slow]] = True
        for j in torch.nonzero(active & newton).reshape(-1).tolist():
            theta[j], vals[j], G[j], gn[j] = _newton_step(x, y, theta[j], W[j], l2, vals[j], G[j], j)
            iters[j] += 1
        if it == 1:
            first = theta.clone()  # after one step: the one-step Newton estimate from θ̂
    return theta, gn, iters, newton, first


def _newton_step(x: Tensor, y: Tensor, theta: Tensor, w: Tensor, l2: float, val: Tensor, g: Tensor, member: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One full Newton step for one member with its own Hessian, backtracked until R decreases (Armijo)."""
    c, d = theta.shape
    step = factorize(x, theta, weights=w, l2=l2).apply_inverse(g.reshape(-1)).view(c, d)
    slope = -float((g * step).sum())
    t = 1.0
    for _ in range(60):
        cand = theta - t * step
        v_new, g_new = _value_grad(x, y, cand[None], w[None], l2)
        if float(v_new[0]) <= float(val) + 1e-4 * t * slope + 8 * torch.finfo(x.dtype).eps * abs(float(val)):
            return cand, v_new[0], g_new[0], torch.linalg.vector_norm(g_new[0])
        t *= 0.5
    raise RuntimeError(f"leave-one-out member {member}: Newton found no decrease at ‖∇R‖ = "
                       f"{float(torch.linalg.vector_norm(g)):.2e}; is l2 > 0?")
