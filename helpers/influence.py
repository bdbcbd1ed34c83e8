"""Influence estimates in the book's one convention (STUDY.md §1).

    Δ_pred[t, i] = w_i · ∇ℓ(z_test_t, θ̂)ᵀ (H + δI)⁻¹ ∇ℓ(z_i, θ̂),     w_i = 1/n by default,

the predicted change of test loss t when training point i is removed (loss units, shape ``[n_test, n_train]``;
positive: the point helped that test point). H is the curvature of the training objective
:func:`helpers.objective.objective` at the model's current weights θ̂ with respect to the chosen parameter
subset, the L2 term included by default; δ is an explicit damping.

Removing point i is the weight change w_i → 0, and one Newton step from θ̂ with H in place of the leave-one-out
Hessian moves the parameters by Δθ_i = w_i (H + δI)⁻¹ ∇ℓ(z_i, θ̂) (:func:`predict_param_change`); the test loss
then changes by ∇ℓ(z_test, θ̂)ᵀ Δθ_i.

Backends. :func:`predict_removal` is one interface; for a bias-free :class:`helpers.models.LogisticRegression`
(the convex case) it runs the closed forms of :mod:`helpers.closed_form` (:func:`helpers.closed_form.removal_estimate`:
assembled Hessian blocks, no autodiff, no ``[n_train, d]`` gradients) — the same numbers to round-off, at a
fraction of the cost — and autodiff Hessian-vector products for every other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap
from torch.utils.data import DataLoader, Dataset, TensorDataset

from helpers import memory
from helpers.cache import memoize
from helpers.curvature import CurvatureKind, check_problem, hessian_operator
from helpers.kronecker import KINDS as KRONECKER_KINDS, kronecker_factors
from helpers.layered import layered_directional
from helpers.models import is_softmax_regression
from helpers.objective import BACKENDS, LossName, Params, model_params, param_names, per_sample_losses
from helpers.solvers import Method, SolveResult, solve

#: ``predict_removal``'s backends: the objective's (auto, autodiff, closed_form) and the layer-wise MLP products
INFLUENCE_BACKENDS: tuple[str, ...] = (*BACKENDS, "layers")

__all__ = ["IndexedDataset", "InfluenceResult", "LoaderInfluence", "directional_derivatives", "loader_influence",
           "per_sample_grads", "predict_param_change", "predict_removal"]


def per_sample_grads(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss: LossName = "cross_entropy",
    chunk_size: int | None = None,
) -> Tensor:
    """∇_θ ℓ(z_i, θ) for every row, flattened in ``params``-dict order: ``[n, d]``.

    The loss gradient only — no L2 term and no weight w_i (those belong to the objective and its Hessian).
    Computed as ``vmap(grad(ℓ))`` over the rows, never a Python loop. Cost: about one batched backward pass;
    memory 2·n·d numbers (the result and its per-tensor parts) plus vmap's per-sample activations for
    ``chunk_size`` rows at a time — by default as many rows as fit in :func:`helpers.memory.budget` next to the
    result (activations measured by :func:`helpers.memory.model_row_bytes`).

    Raises:
        ValueError / TypeError for bad inputs (see :func:`helpers.curvature.check_problem`), and ValueError naming
        the first row whose loss or gradient is non-finite.
    """
    check_problem(model, params, x, y, loss=loss, what="data")
    params = {k: v.detach() for k, v in params.items()}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        # a batch of one, so that the model sees the [batch, ...] shapes it was written for
        return per_sample_losses(model, p, xi.unsqueeze(0), yi.unsqueeze(0), loss)[0]

    if chunk_size is None:
        chunk_size = _row_chunk(model, params, x, y, loss, memory.GRAD_FACTOR,
                                reserve=2 * x.shape[0] * sum(p.numel() for p in params.values()) * x.element_size())
    with torch.no_grad():  # grad still differentiates in `params`; the module's own tensors stay untracked
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x, y)
    flat = torch.cat([grads[name].reshape(x.shape[0], -1) for name in params], dim=1)
    # a row sum is non-finite iff the row holds a NaN/inf (or overflows, equally unusable); one read of [n, d]
    # instead of materialising an [n, d] isfinite mask, which costs more than the gradients themselves
    finite = torch.isfinite(flat.sum(dim=1))
    if not bool(finite.all()):
        i = int(torch.nonzero(~finite)[0])
        with torch.no_grad():
            li = per_sample_losses(model, params, x[i : i + 1], y[i : i + 1], loss)[0].item()
        raise ValueError(
            f"{int((~finite).sum())} per-sample gradients are non-finite (first: row {i}, loss {li}): check that "
            "row's features and label and the model's weights"
        )
    return flat


def directional_derivatives(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    V: Tensor,
    loss: LossName = "cross_entropy",
    chunk_size: int | None = None,
) -> Tensor:
    """∇ℓ(z_i, θ)ᵀ v_j for every row i and every column v_j of ``V``: ``[k, n]`` — i.e. (G Vᵀ)ᵀ without forming G.

    ``V`` is ``[d, k]`` in the flat ``params``-dict order (as :func:`per_sample_grads`' columns). Computed as k
    forward-mode derivatives of the per-sample losses along v_j (``vmap`` of ``jvp``; for a multilayer perceptron
    the layer-wise formula of :func:`helpers.layered.layered_directional`): cost about k forward passes
    with tangents over the n rows, memory k·n plus the activations of ``chunk_size`` columns at a time — by default
    as many as fit in :func:`helpers.memory.budget` (and, where one column over all n rows would not, the rows in
    blocks that do) — never the [n, d] gradient matrix, which for an MLP on a few thousand points is gigabytes.

    Raises:
        ValueError naming the first row whose derivative is non-finite (as :func:`per_sample_grads` does).
    """
    check_problem(model, params, x, y, loss=loss, what="data")
    params = {k: v.detach() for k, v in params.items()}
    names = list(params)
    sizes = [p.numel() for p in params.values()]
    d = sum(sizes)
    if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[0] != d:
        raise ValueError(f"V must be [d, k] = [{d}, k] in the params' flat order, got "
                         f"{tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__}")
    first = next(iter(params.values()))
    if V.dtype != first.dtype or V.device != first.device:
        raise TypeError(f"V is {V.dtype} on {V.device} but params are {first.dtype} on {first.device}: cast V")

    # a multilayer perceptron: the layer-wise formula (helpers.layered), one primal pass and one matrix product
    # per layer instead of k forward-mode passes (measured 0.05 s instead of 0.29 s for P2's MLP, k = 10)
    with torch.no_grad():
        out = layered_directional(model, params, x, y, V, loss, max_bytes=memory.budget() / 4)
    if out is not None:
        return _checked_finite(out)

    def unflat(flat: Tensor) -> dict[str, Tensor]:
        return {n: t.view(params[n].shape) for n, t in zip(names, torch.split(flat, sizes))}

    theta = torch.cat([p.reshape(-1) for p in params.values()])

    n = x.shape[0]
    rows, auto_chunk = n, None
    if chunk_size is None:
        per_row = memory.JVP_FACTOR * _measured_row_bytes(model, params, x, y, loss)
        if per_row * n > memory.budget():
            rows = max(1, int(memory.budget() // per_row))
        auto_chunk = memory.chunk(V.shape[1], per_row * rows)
        auto_chunk = None if auto_chunk >= V.shape[1] else auto_chunk

    def along_rows(xb: Tensor, yb: Tensor) -> Callable[[Tensor], Tensor]:
        def losses(flat: Tensor) -> Tensor:
            return per_sample_losses(model, unflat(flat), xb, yb, loss)

        return lambda v: jvp(losses, (theta,), (v,))[1]

    with torch.no_grad():  # jvp differentiates in θ only; the module's own tensors stay untracked
        out = torch.cat([vmap(along_rows(x[s : s + rows], y[s : s + rows]), in_dims=1,
                              chunk_size=chunk_size if chunk_size is not None else auto_chunk)(V)
                         for s in range(0, n, rows)], dim=1)  # [k, n]
    return _checked_finite(out)


def _checked_finite(out: Tensor) -> Tensor:
    """``out`` [k, n] of directional derivatives, or a ValueError naming its first non-finite row."""
    finite = torch.isfinite(out.sum(dim=0))
    if not bool(finite.all()):
        i = int(torch.nonzero(~finite)[0])
        raise ValueError(
            f"{int((~finite).sum())} per-sample directional derivatives are non-finite (first: row {i}): check that "
            "row's features and label and the model's weights"
        )
    return out


def _measured_row_bytes(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss: LossName) -> float:
    """Activation bytes per row (:func:`helpers.memory.model_row_bytes`), 0 (no chunking) if it cannot be measured."""
    try:
        return memory.model_row_bytes(model, params, x, y, loss)
    except Exception:  # noqa: BLE001 - the measurement is an optimisation only
        return 0.0


def _row_chunk(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss: LossName, factor: float,
               reserve: float = 0.0) -> int | None:
    """Rows per vmapped call so that ``factor`` × their activations fit in the budget next to ``reserve`` bytes;
    None (one call, vmap's unchunked path) when all rows fit."""
    per_row = factor * _measured_row_bytes(model, params, x, y, loss)
    rows = memory.chunk(x.shape[0], per_row, reserve=reserve)
    return None if rows >= x.shape[0] else rows


@dataclass
class InfluenceResult:
    """The output of :func:`predict_removal`.

    Attributes:
        values: ``[n_test, n_train]`` predicted change in test loss when each training point is removed
            (loss units; positive = the point helped).
        solve: the :class:`~helpers.solvers.SolveResult` of (H + δI) X = G_testᵀ; its ``relative_residual``
            (one per test point) measures the solver's error.
        param_names: the parameters differentiated, in flat order.
        damping: δ; hessian: ``"hessian"`` or ``"gauss_newton"``; l2_in_hessian: λ used in H (0 if excluded).
    """

    values: Tensor
    solve: SolveResult
    param_names: list[str]
    damping: float
    hessian: str
    l2_in_hessian: float

    def summary(self) -> dict[str, Any]:
        """Flat, printable record of how the values were made (for tables and captions)."""
        return {
            "method": self.solve.method,
            "damping": self.damping,
            "hessian": self.hessian,
            "l2_in_hessian": self.l2_in_hessian,
            "n_params": int(self.solve.x.shape[0]),
            "max_relative_residual": self.solve.max_relative_residual,
            "iterations": self.solve.iterations,
        }


def _setup(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    params: str | list[str],
    weights: Tensor | None,
    l2: float,
    loss: LossName,
    hessian: CurvatureKind,
    include_l2_in_hessian: bool,
    backend: str = "auto",
) -> tuple[dict[str, Tensor], Any, Tensor, float]:
    """Parameters, curvature operator and per-point weights shared by both public functions (``backend``
    ``"layers"`` / ``"autodiff"`` insist on that product, :func:`helpers.curvature.hessian_operator`)."""
    if not isinstance(train, (tuple, list)) or len(train) != 2:
        raise TypeError("train must be a pair (x_train, y_train)")
    names = param_names(model, params)
    P = model_params(model, names)
    x_tr, y_tr = train
    check_problem(model, P, x_tr, y_tr, weights=weights, loss=loss, what="train")
    l2_h = float(l2) if include_l2_in_hessian else 0.0
    product = backend if backend in ("layers", "autodiff") else "auto"
    op = hessian_operator(model, P, x_tr, y_tr, weights=weights, l2=l2_h, loss=loss, kind=hessian, product=product)
    n = x_tr.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=x_tr.dtype, device=x_tr.device) if weights is None else weights.to(x_tr)
    return P, op, w, l2_h


def predict_removal(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    params: str | list[str] = "all",
    l2: float = 0.0,
    weights: Tensor | None = None,
    loss: LossName = "cross_entropy",
    method: Method = "exact",
    damping: float | str = 0.0,
    hessian: CurvatureKind | str = "hessian",
    include_l2_in_hessian: bool = True,
    cache: bool = False,
    backend: str = "auto",
    **solver_options: Any,
) -> InfluenceResult:
    """Predicted change of each test loss when each training point is removed: ``[n_test, n_train]``.

    values[t, i] = w_i · g_testₜᵀ (H + δI)⁻¹ g_i with g = per-sample loss gradients at the model's current
    weights θ̂ (no L2 term), H the curvature of R(θ) = Σ w_i ℓ_i + (λ/2)‖θ‖² over ``params`` (``"all"``,
    ``"last"`` = ``model.last_layer``, or a list of names), w_i = 1/n unless ``weights`` are given.

    Args:
        train, test: ``(x, y)`` pairs. l2: λ of the training objective. loss: ``"cross_entropy"`` | ``"mse"``.
        method, damping, solver_options: passed to :func:`helpers.solvers.solve` (``damping="auto"``: δ from the
            spectrum of H, :func:`helpers.solvers.auto_damping`; the δ used is ``InfluenceResult.damping``).
        hessian: ``"hessian"`` (exact), ``"gauss_newton"``, or ``"kfac"`` / ``"ekfac"``: the Kronecker-factored
            approximation of the Gauss–Newton matrix (:func:`helpers.kronecker.kronecker_factors`, type-2, the L2
            term added exactly), inverted exactly with ``method="exact"`` — K-FAC / EK-FAC influence.
        include_l2_in_hessian: ``False`` reproduces the seed paper's last-layer Hessian without λI
            (STUDY.md §3 item 5: exactly singular — pair it with ``method="pinv"``).
        cache: memoize the result on disk (:func:`helpers.cache.memoize`) under the model (architecture and
            values), the data and every option.
        backend: ``"auto"``: a bias-free :class:`~helpers.models.LogisticRegression` with cross-entropy, all of its
            weights and a numeric damping runs :func:`helpers.closed_form.removal_estimate` (closed forms; its
            Gauss–Newton matrix is its Hessian, the model being linear); a multilayer perceptron with all of its
            parameters gets the layer-wise products of :mod:`helpers.layered`; every other case autodiff
            (:func:`helpers.curvature.hessian_operator`'s ``product="auto"``); ``"autodiff"`` /
            ``"closed_form"`` / ``"layers"`` insist (the tests compare them).
        solver_options: also ``factor=`` (a :class:`helpers.closed_form.HessianFactor`) for the closed-form backend;
            ``preconditioner="kfac"`` or ``"ekfac"`` (with ``method="cg"`` and a numeric damping) preconditions CG on
            the exact H + δI with (K + (λ + δ)I)⁻¹ built from the same model and data (autodiff backend).

    Cost: n_test per-sample gradients, one solve with only n_test right-hand sides (H is symmetric, so
    g_testᵀ H⁻¹ g_i = (H⁻¹ g_test)ᵀ g_i: solving for the few test gradients instead of the many training
    gradients), then g_iᵀ v_t for every training point as n_test forward-mode directional derivatives of the
    per-sample training losses (:func:`directional_derivatives`) — about n_test forward passes over the training
    set, never the [n_train, d] matrix of training gradients. Memory: n_test·d plus activations.
    """
    if not isinstance(test, (tuple, list)) or len(test) != 2:
        raise TypeError("test must be a pair (x_test, y_test)")
    if backend not in INFLUENCE_BACKENDS:
        raise ValueError(f"backend must be one of {INFLUENCE_BACKENDS}, got {backend!r}")
    options = dict(params=params, l2=l2, weights=weights, loss=loss, method=method, damping=damping, hessian=hessian,
                   include_l2_in_hessian=include_l2_in_hessian, backend=backend, **solver_options)
    if cache:
        key = {"model": model, "train": list(train), "test": list(test)} | {
            k: v for k, v in options.items() if k != "factor"}  # a factor only speeds the solve up
        return memoize("predict_removal", key, lambda: predict_removal(model, train, test, **options))
    kronecker_pre = isinstance(solver_options.get("preconditioner"), str)
    closed = (is_softmax_regression(model, params, loss) and not isinstance(damping, str)
              and hessian in ("hessian", "gauss_newton") and not kronecker_pre)
    if backend == "closed_form" and not closed:
        raise ValueError("backend='closed_form' needs a bias-free LogisticRegression (helpers.closed_form.model_at), "
                         "loss='cross_entropy', all of its parameters and a numeric damping: use backend='auto'")
    if closed and backend in ("auto", "closed_form"):
        from helpers.closed_form import removal_estimate  # the backend imports this module: load it on demand

        est = removal_estimate(train[0].flatten(1), train[1], test[0].flatten(1), test[1],
                               model.linear.weight.detach(), l2=l2, weights=weights, damping=float(damping),
                               include_l2_in_hessian=include_l2_in_hessian, method=method, **solver_options)
        est.hessian = hessian
        return est
    if "factor" in solver_options:
        raise TypeError("factor= serves only the closed-form backend (a bias-free LogisticRegression with "
                        "cross-entropy, all parameters and a numeric damping): drop it for this model")
    if hessian in KRONECKER_KINDS:
        P, w, l2_h = _kronecker_setup(model, train, params, weights, l2, include_l2_in_hessian, method, damping)
        check_problem(model, P, test[0], test[1], loss=loss, what="test")
        g_test = per_sample_grads(model, P, test[0], test[1], loss)  # [n_test, d]
        result = _kronecker_solve(kronecker_factors(model, P, train[0], train[1], weights=weights, l2=l2_h,
                                                    loss=loss, kind=hessian), g_test.T.contiguous(), float(damping))
    else:
        P, op, w, l2_h = _setup(model, train, params, weights, l2, loss, hessian, include_l2_in_hessian, backend)
        check_problem(model, P, test[0], test[1], loss=loss, what="test")
        g_test = per_sample_grads(model, P, test[0], test[1], loss)  # [n_test, d]
        if kronecker_pre:
            solver_options = dict(solver_options, preconditioner=_kronecker_preconditioner(
                model, P, train, weights, l2_h, loss, solver_options["preconditioner"], damping))
        result = solve(op, g_test.T.contiguous(), method=method, damping=damping, **solver_options)  # x: [d, n_test]
    values = directional_derivatives(model, P, train[0], train[1], result.x, loss) * w[None, :]
    return InfluenceResult(
        values=values,
        solve=result,
        param_names=list(P),
        damping=float(result.damping),
        hessian=hessian,
        l2_in_hessian=l2_h,
    )


def _kronecker_setup(model: nn.Module, train: tuple[Tensor, Tensor], params: str | list[str], weights: Tensor | None,
                     l2: float, include_l2_in_hessian: bool, method: str, damping: float | str
                     ) -> tuple[dict[str, Tensor], Tensor, float]:
    """Parameters, weights and λ of K-FAC / EK-FAC influence, after refusing what it cannot do."""
    if method != "exact":
        raise ValueError(f"hessian='kfac'/'ekfac' is inverted exactly (eigenbases): use method='exact', not {method!r}")
    if isinstance(damping, str):
        raise ValueError("hessian='kfac'/'ekfac' needs a numeric damping (the factors' spectrum is known: pick δ > 0)")
    if not isinstance(train, (tuple, list)) or len(train) != 2:
        raise TypeError("train must be a pair (x_train, y_train)")
    P = model_params(model, param_names(model, params))
    n = train[0].shape[0]
    w = torch.full((n,), 1.0 / n, dtype=train[0].dtype, device=train[0].device) if weights is None else weights.to(
        train[0])
    return P, w, float(l2) if include_l2_in_hessian else 0.0


def _kronecker_solve(curvature: Any, B: Tensor, damping: float) -> SolveResult:
    """(K + (λ + δ)I)⁻¹ B exactly, as a :class:`SolveResult` (residual against K itself: round-off)."""
    X = curvature.inverse(B, damping)
    R = curvature.matmat(X) + damping * X - B
    bnorm = torch.linalg.vector_norm(B, dim=0)
    rel = torch.linalg.vector_norm(R, dim=0) / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    return SolveResult(x=X, relative_residual=rel, method=curvature.kind, iterations=0, damping=damping,
                       info={"hvps": 0, "curvature": repr(curvature)})


def _kronecker_preconditioner(model: nn.Module, P: dict[str, Tensor], train: tuple[Tensor, Tensor],
                              weights: Tensor | None, l2: float, loss: LossName, kind: str, damping: float | str
                              ) -> Callable[[Tensor], Tensor]:
    if kind not in KRONECKER_KINDS:
        raise ValueError(f"preconditioner={kind!r}: a named preconditioner is one of {KRONECKER_KINDS} (or pass a "
                         "callable)")
    if isinstance(damping, str):
        raise ValueError(f"preconditioner={kind!r} needs a numeric damping (it is built before the solve)")
    factors = kronecker_factors(model, P, train[0], train[1], weights=weights, l2=l2, loss=loss, kind=kind)
    return factors.preconditioner(float(damping))


def predict_param_change(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    *,
    params: str | list[str] = "all",
    l2: float = 0.0,
    weights: Tensor | None = None,
    loss: LossName = "cross_entropy",
    method: Method = "exact",
    damping: float | str = 0.0,
    hessian: CurvatureKind = "hessian",
    include_l2_in_hessian: bool = True,
    return_solve: bool = False,
    **solver_options: Any,
) -> Tensor | tuple[Tensor, SolveResult]:
    """Predicted parameter change when each training point is removed: ``[n_train, d]``, row i = w_i (H + δI)⁻¹ g_i.

    The sign is θ̂₋ᵢ − θ̂ (new minus old), in the flat order of ``params``; arguments as in
    :func:`predict_removal`. For a quadratic objective (ridge regression) it differs from the exact
    leave-one-out change only by the Sherman–Morrison leverage factor: θ̂₋ᵢ − θ̂ = Δθ_i / (1 − h_i).
    Cost: n_train per-sample gradients and one solve with n_train right-hand sides (use for small n·d).
    With ``return_solve=True`` also returns the :class:`~helpers.solvers.SolveResult` (its residuals).
    """
    P, op, w, _ = _setup(model, train, params, weights, l2, loss, hessian, include_l2_in_hessian)
    g_train = per_sample_grads(model, P, train[0], train[1], loss)  # [n_train, d]
    result = solve(op, g_train.T.contiguous(), method=method, damping=damping, **solver_options)
    change = result.x.T * w[:, None]
    return (change, result) if return_solve else change


# --------------------------------------------------------------------------- through a shuffled DataLoader


class IndexedDataset(Dataset):
    """A dataset of ``(x_i, y_i, i)``: each sample carries its dataset index through any loader and shuffle —
    the fix for the shuffled-index pitfall (STUDY.md §3 problem 1)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.x[i], self.y[i], i


@dataclass
class LoaderInfluence:
    """Influence values in the order a ``DataLoader`` produced them.

    Attributes:
        values: ``[n]`` Δ_pred in loader order.
        index: ``[n]`` what the pipeline believes is each value's dataset index: the carried index
            (:class:`IndexedDataset`), or — the pitfall — the position in the loader's output.
        carried: whether ``index`` was carried with the samples.
    """

    values: np.ndarray
    index: np.ndarray
    carried: bool

    def by_dataset_index(self) -> np.ndarray:
        """``[n]`` the values placed at the dataset indices the pipeline believes in (wrong if not carried)."""
        out = np.empty_like(self.values)
        out[self.index] = self.values
        return out


def loader_influence(model: nn.Module, train: tuple[Tensor, Tensor], direction: Tensor, *, params: str | list[str] = "all",
                     batch_size: int = 64, seed: int = 0, carry_index: bool = True,
                     loss: str = "cross_entropy") -> LoaderInfluence:
    """Per-sample influence computed batch by batch from a *shuffled* ``DataLoader`` over the training set.

    value_i = (1/n) ∇ℓ(z_i, θ̂)ᵀ v with v = (H + δI)⁻¹ ∇ℓ(z_test, θ̂) (``direction``, flat in ``params`` order;
    e.g. ``predict_removal(...).solve.x[:, 0]``), so the values equal :func:`helpers.influence.predict_removal`'s
    — only their order differs. With ``carry_index=False`` the loader yields ``(x, y)`` and the position in its
    output is all the pipeline has: using it as the dataset index is the seed paper's bug. With
    ``carry_index=True`` the loader yields ``(x, y, i)`` (:class:`IndexedDataset`) and the index travels along.

    Cost: n per-sample gradients (one vmapped pass per batch).
    """
    x, y = train
    n = x.shape[0]
    names = param_names(model, params)
    P = {k: v.detach() for k, v in model.named_parameters() if k in names}
    P = {k: P[k] for k in names}
    d = sum(v.numel() for v in P.values())
    if direction.shape != (d,):
        raise ValueError(f"direction must be [{d}] (the flat parameters of {params!r}), got {tuple(direction.shape)}")
    ds = IndexedDataset(x, y) if carry_index else TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    values, index = [], []
    for batch in loader:
        xb, yb = batch[0], batch[1]
        g = per_sample_grads(model, P, xb, yb, loss)  # [b, d]
        values.append((g @ direction.to(g)) / n)
        if carry_index:
            index.append(torch.as_tensor(batch[2]))
    vals = torch.cat(values).detach().double().cpu().numpy()
    idx = torch.cat(index).numpy() if carry_index else np.arange(n)
    return LoaderInfluence(values=vals, index=idx.astype(np.int64), carried=carry_index)
