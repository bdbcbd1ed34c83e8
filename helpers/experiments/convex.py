"""Chapter 1, "Convex verification" (``book/convex.ipynb``): Koh & Liang's check where its assumptions hold.

Orchestration only: it composes the engine's calls — :func:`helpers.train.fit_to_tolerance` for θ̂,
:func:`helpers.influence.predict_removal` for the estimates, :func:`helpers.retrain.warm_start` for the exact
leave-one-out (all three run the closed-form backend :mod:`helpers.closed_form` on a bias-free softmax regression)
and the solvers of :mod:`helpers.solvers` — and returns tidy results and frames.

* :func:`verify` → :class:`Verification` — the chapter's protocol: θ̂, estimates, leave-one-out over the extremes
  and a uniform sample.
* :func:`compare` / :func:`truth_at` — its agreement table (Pearson, Spearman, relative error, bootstrap intervals).
* :func:`solver_budgets` — approximate solvers (CG, LiSSA, Arnoldi) at increasing budgets, against the exact solve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from helpers import metrics
from helpers.cache import memoize
from helpers.closed_form import (HessianFactor, factorize, loss_grads, losses, model_at, removal_estimate,
                                 softmax_regression_operator)
from helpers.curvature import extreme_eigenvalues
from helpers.influence import InfluenceResult, predict_removal
from helpers.objective import LooObjective
from helpers.retrain import GroundTruth, warm_start
from helpers.solvers import lissa_path
from helpers.train import Recipe, ToleranceFit, fit_to_tolerance

__all__ = ["BudgetRun", "Verification", "choose_test_points", "compare", "solver_budgets", "truth_at", "verify"]


@dataclass
class BudgetRun:
    """One solver at one budget (:func:`solver_budgets`): ``x`` the ``[c·d]`` solution, ``hvps`` its cost."""

    solver: str
    knob: int
    hvps: int
    x: Tensor


def solver_budgets(x: Tensor, y: Tensor, theta: Tensor, x_test: Tensor, y_test: Tensor, *, l2: float,
                   cg_iterations: Sequence[int], lissa_depths: Sequence[int], lissa_scales: Sequence[float],
                   arnoldi_ranks: Sequence[int]) -> tuple[float, list[BudgetRun]]:
    """H⁻¹∇ℓ(z_test) by budgeted solvers on the closed-form operator; cached (:func:`helpers.cache.memoize`).

    Conjugate gradients with ``maxiter`` = each of ``cg_iterations`` (no tolerance: the budget is the knob),
    deterministic LiSSA at each depth of ``lissa_depths`` (one run per scale: :func:`lissa_path`; a scale of 0
    means λ_max(H), found by Lanczos), and the Arnoldi low-rank inverse at each rank of ``arnoldi_ranks``.

    Args:
        x, y: training data; theta: ``[c, d]`` weights; x_test, y_test: ONE test point (``[1, d]``, ``[1]``).

    Returns:
        (λ_max(H), runs in the order above), ``solver`` labels ``"cg"``, ``"lissa, s = λmax"`` /
        ``"lissa, s = <scale>"``, ``"arnoldi"``.
    """
    if x_test.shape[0] != 1:
        raise ValueError(f"solver_budgets takes one test point, got {x_test.shape[0]}: pass x_test[:1], y_test[:1]")
    params = {"x": x, "y": y, "theta": theta, "x_test": x_test, "y_test": y_test, "l2": float(l2),
              "cg_iterations": [int(i) for i in cg_iterations], "lissa_depths": [int(i) for i in lissa_depths],
              "lissa_scales": [float(v) for v in lissa_scales], "arnoldi_ranks": [int(r) for r in arnoldi_ranks]}

    def compute() -> tuple[float, list[BudgetRun]]:
        op = softmax_regression_operator(x, theta, l2=l2)
        g = loss_grads(x_test, y_test, theta).T.contiguous()
        lam_max = float(extreme_eigenvalues(op, 1, "LA")[0])
        runs = []
        for iters in params["cg_iterations"]:
            res = removal_estimate(x, y, x_test, y_test, theta, l2=l2, method="cg", maxiter=iters, rtol=0.0)
            runs.append(BudgetRun("cg", iters, int(res.solve.info["hvps"]), res.solve.x[:, 0]))
        for scale in params["lissa_scales"]:
            label = "lissa, s = λmax" if scale == 0 else f"lissa, s = {scale:g}"
            for depth, res in lissa_path(op, g, params["lissa_depths"], scale=scale or lam_max).items():
                runs.append(BudgetRun(label, depth, int(res.info["hvps"]), res.x[:, 0]))
        for rank in params["arnoldi_ranks"]:
            res = removal_estimate(x, y, x_test, y_test, theta, l2=l2, method="arnoldi", rank=rank)
            runs.append(BudgetRun("arnoldi", rank, int(res.solve.info["hvps"]), res.solve.x[:, 0]))
        return lam_max, runs

    return memoize("convex_solver_budgets", params, compute)


# ----------------------------------------------------------------------------------------------------------
# the verification protocol of chapter 1, and its scores
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Verification:
    """Koh & Liang's check for one softmax-regression problem (chapter 1): estimate vs exact leave-one-out.

    Attributes:
        fit: the :class:`helpers.train.ToleranceFit` θ̂. factor: :class:`HessianFactor` at θ̂ (the exact Hessian, factored).
        influence: :class:`helpers.influence.InfluenceResult`, ``values [T, n_train]`` for the chosen test points.
        test_points: ``[T]`` indices into the test set; test_loss: ``[T]`` their losses at θ̂ (nats).
        extremes: ``[T, k]`` per test point the k training indices with the largest |Δ_pred| (descending).
        uniform: ``[u]`` training indices drawn uniformly without replacement (shared by all test points).
        truth: :class:`helpers.retrain.GroundTruth` of :func:`leave_one_out` over the union of both sets.
    """

    fit: ToleranceFit
    factor: HessianFactor
    influence: InfluenceResult
    test_points: np.ndarray
    test_loss: np.ndarray
    extremes: np.ndarray
    uniform: np.ndarray
    truth: GroundTruth

    @property
    def predicted(self) -> np.ndarray:
        """``[T, n_train]`` Δ_pred as numpy."""
        return self.influence.values.detach().cpu().numpy()

    def points(self) -> dict[str, Any]:
        """The two point sets in the form :func:`compare` takes."""
        return {"extremes": self.extremes, "uniform": self.uniform}

    def union(self) -> list[np.ndarray]:
        """Per test point, its extremes and the uniform sample together (sorted, without repeats)."""
        return [np.union1d(e, self.uniform) for e in self.extremes]


def choose_test_points(x_test: Tensor, y_test: Tensor, theta: Tensor, n_high: int, n_random: int, seed: int
                       ) -> np.ndarray:
    """``n_high`` highest-loss test points at W (descending loss), then ``n_random`` others drawn uniformly
    (``torch.Generator`` seeded by ``seed``): ``[n_high + n_random]`` indices into the test set."""
    test_loss = losses(x_test, y_test, theta)
    if n_high + n_random > test_loss.numel():
        raise ValueError(f"asked for {n_high} + {n_random} test points, the test set has {test_loss.numel()}")
    order = torch.argsort(test_loss, descending=True)
    rest = order[n_high:]
    pick = rest[torch.randperm(rest.numel(), generator=torch.Generator().manual_seed(int(seed)))[:n_random]]
    return torch.cat([order[:n_high], pick]).numpy()


def verify(x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, *, l2: float, tol: float = 1e-10,
           test_points: Sequence[int] | None = None, n_high: int = 3, n_random: int = 2, n_extremes: int = 50,
           n_uniform: int = 50, loo: LooObjective = "drop", seed: int = 0, snapshots: Sequence[float] = (),
           keep_block: bool = False, cache: bool = True) -> Verification:
    """Train θ̂, estimate every training point's effect on each chosen test point with the exact Hessian, and
    retrain without the ``n_extremes`` largest |estimates| of each test point and ``n_uniform`` uniformly drawn
    training points (all of them when ``n_uniform >= n_train``) — Koh & Liang's check, extended to a uniform
    sample (chapter 1).

    Args:
        x, y, x_test, y_test: float64 ``[n, d]`` inputs and int64 labels.
        l2: λ (also in H); tol: on ‖∇R‖ for θ̂ and for every retrained model.
        test_points: test-set indices; default :func:`choose_test_points` (``n_high``, ``n_random``, ``seed``).
        loo: leave-one-out objective of the ground truth. seed: also draws the uniform sample.
        snapshots: early-stopping thresholds recorded by :func:`helpers.train.fit_to_tolerance`. keep_block: see :func:`factorize`.
        cache: memoise the fit and the leave-one-out runs.

    Cost: one :func:`helpers.train.fit_to_tolerance`, one :func:`factorize`, one exact solve with T right-hand sides, and one
    :func:`leave_one_out` over at most T·n_extremes + n_uniform members.
    """
    f = fit_to_tolerance(model_at(torch.zeros(int(y.max()) + 1, x.shape[1], dtype=x.dtype)), x, y, l2=l2, tol=tol,
                         snapshots=snapshots, cache=cache)
    if test_points is None:
        test_points = choose_test_points(x_test, y_test, f.theta, n_high, n_random, seed)
    tp = np.asarray(test_points, dtype=np.int64).reshape(-1)
    xt, yt = x_test[tp], y_test[tp]
    factor = factorize(x, f.theta, l2=l2, keep_block=keep_block)
    est = predict_removal(model_at(f.theta), (x, y), (xt, yt), l2=l2, factor=factor)
    n = x.shape[0]
    k = min(int(n_extremes), n)
    extremes = torch.topk(est.values.abs(), k, dim=1).indices.numpy()
    gen = torch.Generator().manual_seed(int(seed))
    uniform = (torch.randperm(n, generator=gen)[:n_uniform] if n_uniform < n else torch.arange(n)).numpy()
    removed = np.unique(np.concatenate([extremes.reshape(-1), uniform]))
    newton = Recipe(optimizer="newton", weight_decay=l2, tol=tol)  # the engine's warm start: this module's chord
    truth = warm_start(model_at(f.theta), None, (x, y), (xt, yt), removed.tolist(), newton, loo=loo, factor=factor,
                       cache=cache)
    return Verification(fit=f, factor=factor, influence=est, test_points=tp,
                        test_loss=losses(xt, yt, f.theta).numpy(), extremes=extremes, uniform=uniform,
                        truth=truth)


def _point_sets(points: Any, T: int) -> list[np.ndarray]:
    """Per-test-point index arrays from a shared ``[k]`` list, a ``[T, k]`` array or T ragged lists."""
    if isinstance(points, np.ndarray) and points.ndim == 1 or (
            not isinstance(points, np.ndarray) and len(points) and np.ndim(points[0]) == 0):
        shared = np.asarray(points, dtype=np.int64)
        return [shared] * T
    sets = [np.asarray(p, dtype=np.int64).reshape(-1) for p in points]
    if len(sets) != T:
        raise ValueError(f"per-test-point index lists: expected {T} (one per test point), got {len(sets)}")
    return sets


def truth_at(truth: GroundTruth, points: Any, rows: Sequence[int] | None = None) -> np.ndarray | list[np.ndarray]:
    """Δ_true of ``truth`` at training indices ``points``, for the test points ``rows`` (default all, in order):
    ``[T, k]`` for a shared ``[k]`` list or a ``[T, k]`` array of per-test-point indices; a list of T arrays for
    ragged per-test-point lists. Raises KeyError naming the indices that were never retrained."""
    pos = {int(r): j for j, r in enumerate(truth.removed)}
    rows = list(range(truth.delta.shape[0])) if rows is None else [int(r) for r in rows]
    sets = _point_sets(points, len(rows))
    missing = sorted({int(i) for s_ in sets for i in s_} - set(pos))
    if missing:
        raise KeyError(f"training points {missing[:10]} were not retrained: add them to the leave-one-out run")
    out = [truth.delta[t, [pos[int(i)] for i in s_]] for t, s_ in zip(rows, sets)]
    if len({len(r) for r in out}) == 1:
        return np.stack(out)
    return out


def compare(predicted: Any, truth: GroundTruth, points: dict[str, Any], *, rows: Sequence[int] | None = None,
            n_bootstrap: int = 0, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Agreement of Δ_pred with Δ_true, one row per test point and point set.

    Args:
        predicted: ``[T, n_train]`` estimates (numpy or torch), rows in ``truth``'s test order — or, with
            ``rows``, row j belongs to the truth's test point ``rows[j]`` (e.g. ``rows=[0]`` for the first only).
        truth: the :class:`~helpers.retrain.GroundTruth`; its ``removed`` must cover every requested point.
        points: ``{set name: [k] shared indices, [T, k] per-test-point indices, or T ragged index lists}``.
        n_bootstrap: 0 for point estimates only; else paired bootstrap intervals (BCa) of
            :func:`helpers.metrics.bootstrap_ci` as ``<metric>_low`` / ``<metric>_high``.

    Returns:
        DataFrame with columns ``test`` (the truth's test row), ``set``, ``n``, ``pearson``, ``spearman``,
        ``relative_error`` (‖pred − true‖/‖true‖) and ``median_abs_true`` (nats), plus intervals if asked.

    Cost: O(T · sets · n_bootstrap · k).
    """
    pred = predicted.detach().cpu().numpy() if isinstance(predicted, Tensor) else np.asarray(predicted, dtype=float)
    rows = list(range(truth.delta.shape[0])) if rows is None else [int(r) for r in rows]
    T = len(rows)
    if pred.ndim != 2 or pred.shape[0] != T:
        raise ValueError(f"predicted must be [T, n_train] with T = {T} test points (the truth's, or `rows`), "
                         f"got {pred.shape}")
    table = []
    for name, pts in points.items():
        sets = _point_sets(pts, T)
        true = truth_at(truth, sets, rows)
        for j in range(T):
            idx = sets[j]
            p, a = pred[j, idx], true[j]
            row: dict[str, Any] = {"test": rows[j], "set": name, "n": len(idx),
                                   "median_abs_true": float(np.median(np.abs(a)))}
            for metric, fn in (("pearson", metrics.pearson), ("spearman", metrics.spearman),
                               ("relative_error", metrics.relative_error)):
                if n_bootstrap:
                    est, low, high = metrics.bootstrap_ci(metric, p, a, n_resamples=n_bootstrap,
                                                          confidence=confidence, seed=seed)
                    row.update({metric: est, f"{metric}_low": low, f"{metric}_high": high})
                else:
                    row[metric] = fn(p, a)
            table.append(row)
    return pd.DataFrame(table)
