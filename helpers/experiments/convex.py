"""Chapter 1, "Convex verification" (``book/convex.ipynb``): Koh & Liang's check where its assumptions hold.

Orchestration only: it composes the engine's calls — :func:`helpers.train.fit_to_tolerance` for θ̂,
:func:`helpers.influence.predict_removal` for the estimates, :func:`helpers.retrain.warm_start` for the exact
leave-one-out (all three run the closed-form backend :mod:`helpers.closed_form` on a bias-free softmax regression)
and the solvers of :mod:`helpers.solvers` — and returns tidy results and frames.

* :func:`verify` → :class:`Verification` — the chapter's protocol: θ̂, estimates, leave-one-out over the extremes
  and a uniform sample.
* :func:`compare` / :func:`truth_at` — its agreement table (Pearson, Spearman, relative error, bootstrap intervals).
* :func:`solver_budgets` — approximate solvers (CG, LiSSA, Arnoldi) at increasing budgets, against the exact solve.

One function per section of the chapter composes these, records the numbers its prose quotes
(:func:`helpers.book.record`), writes its figure data and returns its frame and Figure (the notebook glues it):
:func:`record_verification`, :func:`scatter_by_test_point`, :func:`agreement_styler`, :func:`rank_swaps`,
:func:`other_objective`, :func:`verify_iris` / :func:`iris_figure`, :func:`early_stopping`, :func:`l2_sweep`,
:func:`without_l2`, :func:`l2_out_of_hessian`, :func:`damping_sweep`, :func:`solver_budget_scores`,
:func:`selection_curves`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from helpers import book, metrics, plots, stats
from helpers.cache import memoize
from helpers.closed_form import (HessianFactor, factorize, loss_grads, losses, model_at, removal_effects,
                                 removal_estimate, softmax_regression_operator)
from helpers.curvature import extreme_eigenvalues
from helpers.influence import InfluenceResult, predict_removal
from helpers.objective import LooObjective
from helpers.retrain import GroundTruth, warm_start
from helpers.solvers import lissa_path
from helpers.train import Recipe, ToleranceFit, fit_to_tolerance

__all__ = ["BudgetRun", "Verification", "agreement_styler", "choose_test_points", "compare", "damping_sweep",
           "early_stopping", "iris_figure", "l2_out_of_hessian", "l2_sweep", "other_objective", "rank_swaps",
           "record_verification", "scatter_by_test_point", "selection_curves", "solver_budget_scores", "solver_budgets",
           "truth_at", "verify", "verify_iris", "without_l2"]


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


# ----------------------------------------------------------------------------------------------------------
# the chapter's sections: records, figure data and figures (what the notebook's cells call)
# ----------------------------------------------------------------------------------------------------------

_METRIC_LABELS = ("relative error of the estimate", "pearson correlation")


def record_verification(main: Verification, table: pd.DataFrame) -> None:
    """Record the main check's numbers for the prose of "The exact setting": convergence of θ̂ and of every
    leave-one-out model, the solve's residual, and per point set the agreement of ``table`` (:func:`compare` of
    ``main``'s estimates over :meth:`Verification.points`) — minimum and per-test-point Pearson / Spearman, median
    relative error, effect sizes, drift and how many cases clear 0.99 on both correlations."""
    truth = main.truth
    book.record("grad_norm", main.fit.grad_norm, fmt="{:.1e}")
    book.record("loo_max_grad_norm", float(truth.grad_norm.max()), fmt="{:.1e}")
    book.record("solver_residual", main.influence.solve.max_relative_residual, fmt="{:.1e}")
    book.record("n_test_points", len(main.test_points))
    book.record("n_retrained", len(truth.removed))
    book.record("test_losses", [float(v) for v in main.test_loss])
    book.record("loo_iterations_max", int(truth.settings["iterations"].max()))
    book.record("newton_fallbacks", truth.settings["newton_fallbacks"])
    for name in ("extremes", "uniform"):
        part = table[table["set"] == name]
        for metric in ("pearson", "spearman"):
            book.record(f"min_{metric}_{name}", float(part[metric].min()), fmt="{:.4f}")
            book.record(f"{metric}_{name}", part[metric].tolist())
        book.record(f"median_relative_error_{name}", float(part["relative_error"].median()), fmt="{:.3f}")
    median_extremes = table[table["set"] == "extremes"]["median_abs_true"].to_numpy()
    book.record("median_abs_delta_extremes", float(median_extremes.min()), fmt="{:.1e}")
    median_uniform = table[table["set"] == "uniform"]["median_abs_true"].to_numpy()
    book.record("effect_ratio", float(np.median(median_extremes / median_uniform)), fmt="{:.0f}")
    book.record("drift_max", float(np.abs(truth.drift).max()), fmt="{:.1e}")
    book.record("drift_ratio", float(np.max(np.abs(truth.drift) / median_extremes)), fmt="{:.1e}")
    n_pass = int(((table["pearson"] >= 0.99) & (table["spearman"] >= 0.99)).sum())
    book.record("n_cases", len(table))
    book.record("n_cases_pass", n_pass)


def _kind(t: int, n_high: int, T: int) -> str:
    """How test point ``t`` was chosen: the first ``min(n_high, T)`` are the highest-loss ones."""
    return "highest loss" if t < min(n_high, T) else "random"


def scatter_by_test_point(main: Verification, idx_train: Any, *, n_high: int) -> tuple[pd.DataFrame, Any]:
    """Predicted against actual change per test point (columns) and point set (rows: extremes, uniform).

    Writes the figure data ``convex_scatter`` (columns ``test, kind, set, train_index, predicted, actual``;
    ``train_index`` maps the training rows through ``idx_train``, the split's indices) and returns it with the
    Figure (2 × T panels)."""
    truth, pred = main.truth, main.predicted
    T = len(main.test_points)
    rows = []
    for t in range(T):
        kind = _kind(t, n_high, T)
        for name, points in (("extremes", main.extremes[t]), ("uniform", main.uniform)):
            actual = truth_at(truth, points)[t]
            rows.append(pd.DataFrame({"test": t, "kind": kind, "set": name,
                                      "train_index": idx_train[points].numpy(), "predicted": pred[t, points],
                                      "actual": actual}))
    scatter = book.figure_data("convex_scatter", pd.concat(rows, ignore_index=True))

    fig, axes = plt.subplots(2, T, figsize=(2.6 * T, 5.4), squeeze=False)
    for t in range(T):
        for row, name in enumerate(("extremes", "uniform")):
            ax = axes[row, t]
            part = scatter[(scatter["test"] == t) & (scatter["set"] == name)]
            plots.predicted_vs_actual(ax, part.actual, part.predicted, color=f"C{row}")
            ax.set(xlabel="actual change (nats)" if row == 1 else "",
                   ylabel=f"predicted change, {name}" if t == 0 else "")
            plots.small_ticks(ax)
            ax.text(0.04, 0.96, f"test point {t + 1}\n{_kind(t, n_high, T)}, {name}", transform=ax.transAxes,
                    va="top", fontsize=7)
    return scatter, fig


def agreement_styler(table: pd.DataFrame) -> Any:
    """The agreement table for display: test point (from 1), point set, n, Pearson / Spearman / relative error
    each as ``value [95 % CI]`` and the median |actual| in nats; a pandas Styler without the index."""
    shown = table.copy()
    shown.insert(0, "test point", shown.pop("test") + 1)
    return pd.DataFrame({
        "test point": shown["test point"], "points": shown["set"], "n": shown["n"],
        "Pearson [95% CI]": book.ci_column(shown, "pearson"), "Spearman [95% CI]": book.ci_column(shown, "spearman"),
        "relative error [95% CI]": book.ci_column(shown, "relative_error"),
        "median |actual| (nats)": [f"{v:.1e}" for v in shown["median_abs_true"]]}).style.hide(axis="index")


def rank_swaps(main: Verification) -> pd.DataFrame:
    """Why ranks swap: per test point and point set, Spearman's correlation, the median gap between neighbouring
    true effects (:func:`helpers.metrics.rank_resolution`) and the median per-point error of the estimate
    (:func:`helpers.metrics.pointwise_error`). Writes the figure data ``convex_rank_resolution``, records the
    ranges over the extremes and the worst case, and returns the frame."""
    truth, pred = main.truth, main.predicted
    resolution = []
    for t in range(len(main.test_points)):
        for name, points in (("extremes", main.extremes[t]), ("uniform", main.uniform)):
            actual, estimate = truth_at(truth, points)[t], pred[t, points]
            resolution.append({"test": t, "set": name, "spearman": metrics.spearman(estimate, actual),
                               "neighbour_gap": metrics.rank_resolution(actual),
                               "pointwise_error": metrics.pointwise_error(estimate, actual)})
    resolution = book.figure_data("convex_rank_resolution", pd.DataFrame(resolution))
    ext = resolution[resolution.set == "extremes"]
    worst = resolution.loc[resolution.spearman.idxmin()]
    book.record("extremes_gap_range", f"{ext.neighbour_gap.min():.1%}–{ext.neighbour_gap.max():.1%}")
    book.record("extremes_error_range", f"{ext.pointwise_error.min():.1%}–{ext.pointwise_error.max():.1%}")
    book.record("worst_case", f"test point {int(worst.test) + 1}, {worst.set}")
    book.record("worst_gap", f"{worst.neighbour_gap:.1%}")
    book.record("worst_error", f"{worst.pointwise_error:.1%}")
    return resolution


def other_objective(main: Verification, train_data: tuple[Tensor, Tensor], test_data: tuple[Tensor, Tensor], *,
                    l2: float, tol: float, loo: LooObjective) -> tuple[GroundTruth, pd.DataFrame]:
    """The ground truth under the other leave-one-out objective ("reaverage" if ``loo`` is "drop", else "drop"),
    for the highest-loss test point over its extremes and the uniform sample: warm-started Newton from θ̂ to
    ‖∇R‖ < ``tol``. Records the objective, the minimum Pearson correlation against the main estimate and the mean
    and spread of the offset between the two ground truths; returns (ground truth, agreement table)."""
    X, y = train_data
    X_test, y_test = test_data
    truth, pred = main.truth, main.predicted
    other = "reaverage" if loo == "drop" else "drop"
    top = [int(main.test_points[0])]
    points_top = np.unique(np.concatenate([main.extremes[0], main.uniform]))
    newton = Recipe(optimizer="newton", weight_decay=l2, tol=tol)  # warm start from θ̂ to ‖∇R‖ < tol
    truth_other = warm_start(model_at(main.fit.theta), None, (X, y), (X_test[top], y_test[top]),
                             points_top.tolist(), newton, loo=other, factor=main.factor)
    top_sets = {"extremes": main.extremes[:1], "uniform": main.uniform}
    other_table = compare(pred[:1], truth_other, top_sets)
    offset = truth_other.delta[0] - truth_at(truth, points_top)[0]
    book.record("other_loo", other)
    book.record("other_min_pearson", float(other_table["pearson"].min()), fmt="{:.4f}")
    book.record("other_offset_mean", float(offset.mean()), fmt="{:.1e}")
    book.record("other_offset_spread", float(offset.std()), fmt="{:.1e}")
    return truth_other, other_table


def verify_iris(iris: Any, *, l2: float, tol: float, n_high: int, n_bootstrap: int, seed: int
                ) -> tuple[Verification, pd.DataFrame]:
    """The check on Iris (a :class:`helpers.data` split) with every training point retrained: :func:`verify` for
    the ``min(n_high, 3)`` highest-loss test points, scored with bootstrap intervals over all training points.
    Records the size, the minimum correlations, the largest relative error and the drift; returns
    (verification, agreement table)."""
    check = verify(*iris.train, *iris.test, l2=l2, tol=tol, n_high=min(n_high, 3), n_random=0,
                   n_extremes=0, n_uniform=iris.n_train, seed=seed)
    iris_table = compare(check.predicted, check.truth, {"all": check.uniform}, n_bootstrap=n_bootstrap, seed=seed)
    book.record("iris_n_train", iris.n_train)
    book.record("iris_pearson", float(iris_table["pearson"].min()), fmt="{:.4f}")
    book.record("iris_spearman", float(iris_table["spearman"].min()), fmt="{:.4f}")
    book.record("iris_relative_error", float(iris_table["relative_error"].max()), fmt="{:.3f}")
    book.record("iris_drift", float(np.abs(check.truth.drift).max()), fmt="{:.1e}")
    return check, iris_table


def iris_figure(iris: Any, check: Verification) -> tuple[pd.DataFrame, Any]:
    """Predicted against actual change for every Iris training point, one panel per test point. Writes the figure
    data ``convex_iris`` (``test, train_index, predicted, actual``) and returns it with the Figure."""
    T = len(check.test_points)
    iris_frame = book.figure_data("convex_iris", pd.concat([pd.DataFrame({
        "test": t, "train_index": iris.idx_train.numpy(), "predicted": check.predicted[t],
        "actual": truth_at(check.truth, check.uniform)[t]}) for t in range(T)]))
    fig, axes = plt.subplots(1, T, figsize=(2.9 * T, 3.0), squeeze=False)
    for t, ax in enumerate(axes[0]):
        part = iris_frame[iris_frame["test"] == t]
        plots.predicted_vs_actual(ax, part.actual, part.predicted, color="C2")
        ax.set(xlabel="actual change (nats)", ylabel="predicted change (nats)" if t == 0 else "")
        plots.small_ticks(ax)
        ax.text(0.04, 0.96, f"test point {t + 1}", transform=ax.transAxes, va="top", fontsize=7)
    return iris_frame, fig


def _per_test_panels(frame: pd.DataFrame, x: str, xlabel: str, reference: float, reference_label: str) -> Any:
    """Two log-x panels, one line per test point of ``frame``: relative error (log y; dashed: ``reference``) and
    Pearson's correlation against column ``x``. Returns (Figure, axes)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for t, part in frame.groupby("test"):
        label = f"test point {t + 1}"
        axes[0].plot(part[x], part.relative_error, marker="o", ms=3, lw=1, label=label)
        axes[1].plot(part[x], part.pearson, marker="o", ms=3, lw=1, label=label)
    axes[0].axhline(reference, color="0.4", ls="--", lw=1, label=reference_label)
    for ax, ylabel in zip(axes, _METRIC_LABELS):
        ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel)
    return fig, axes


def early_stopping(main: Verification, train_data: tuple[Tensor, Tensor], test_data: tuple[Tensor, Tensor],
                   exact_score: pd.DataFrame, *, l2: float, seed: int, margin: float = 0.01
                   ) -> tuple[pd.DataFrame, dict[float, np.ndarray], Any]:
    """The exact estimate at each early-stopped iterate θ_τ of the fit (gradients and Hessian at θ_τ, solved to a
    relative residual of 1e-10), scored over the union of each test point's point sets against the converged
    ground truth. ``exact_score``: :func:`compare` of the converged estimate over the same union.

    Writes the figure data ``convex_early_stopping`` and ``convex_early_stopping_vs_converged`` (error(τ) /
    error(converged), paired over the test points, with 95 % intervals), records the loosest threshold's error,
    the converged error and the gradient norm from which the interval lies within ±``margin`` of 1. Returns
    (scores per threshold, ``{τ: [T, n_train] estimate}``, Figure)."""
    X, y = train_data
    x_top, y_top = test_data
    union = {"union": main.union()}
    rows, stopped = [], {}
    for tau, (theta_tau, grad_norm, phase, iteration) in sorted(main.fit.snapshots.items(), reverse=True):
        estimate = predict_removal(model_at(theta_tau), (X, y), (x_top, y_top), l2=l2, factor=main.factor,
                                   rtol=1e-10, cache=True)
        stopped[tau] = estimate.values.numpy()
        rows.append(compare(estimate.values, main.truth, union).assign(
            threshold=tau, grad_norm=grad_norm, iteration=iteration, optimizer=["lbfgs", "newton"][phase]))
    stopping = book.figure_data("convex_early_stopping", pd.concat(rows, ignore_index=True))
    by_stop = stopping.groupby("grad_norm")["relative_error"].median()
    converged_error = float(exact_score.relative_error.median())
    book.record("stop_loosest_grad_norm", float(by_stop.index.max()), fmt="{:.1e}")
    book.record("stop_loosest_error", float(by_stop.iloc[-1]), fmt="{:.2f}")
    book.record("stop_converged_error", converged_error, fmt="{:.3f}")
    # each threshold against the converged estimate, paired over the test points: error(τ) / error(converged),
    # with its 95 % interval; "as good as converged" = the whole interval within the stated margin
    ref = exact_score.groupby("test").relative_error.median()
    vs_conv = book.figure_data("convex_early_stopping_vs_converged", stats.against_reference(
        stopping.groupby(["grad_norm", "test"], as_index=False).relative_error.median(), value="relative_error",
        unit="test", by="grad_norm", reference=ref, relative=True, seed=seed))
    inside = (vs_conv.low >= 1 - margin) & (vs_conv.high <= 1 + margin)  # ascending gradient norm
    first_out = vs_conv.grad_norm[~inside].min() if (~inside).any() else np.inf
    ok = vs_conv.grad_norm[vs_conv.grad_norm < first_out]
    book.record("stop_ok_grad_norm", float(ok.max()) if len(ok) else float(main.fit.grad_norm), fmt="{:.0e}")
    book.record("stop_margin", margin, fmt="{:.0%}")

    fig, axes = _per_test_panels(stopping, "grad_norm", "gradient norm where training stopped", converged_error,
                                 "converged (median)")
    for ax in axes:
        ax.invert_xaxis()
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, frameon=False)
    return stopping, stopped, fig


def l2_sweep(main: Verification, table: pd.DataFrame, train_data: tuple[Tensor, Tensor],
             test_data: tuple[Tensor, Tensor], *, l2: float, l2_grid: Sequence[float], tol: float,
             n_extremes: int, n_uniform: int, loo: LooObjective, seed: int) -> tuple[pd.DataFrame, Any]:
    """Less (or more) L2: the whole check (:func:`verify`) rerun at each λ of ``l2_grid`` for the highest-loss test
    point of ``main``; at the chapter's ``l2`` the main check and the first test point's rows of its agreement
    ``table`` are reused. Writes the figure data ``convex_l2_train``, records error and Pearson at the smallest
    and largest λ, and returns (the sweep, Figure with error and Pearson against λ per point set)."""
    X, y = train_data
    X_test, y_test = test_data
    top = [int(main.test_points[0])]
    sweep = []
    for lam in sorted(set(l2_grid) | {l2}):
        if lam == l2:
            check, tab = main, table.loc[table.test == 0, ["test", "set", "n", "pearson", "spearman",
                                                           "relative_error", "median_abs_true"]]
        else:
            check = verify(X, y, X_test, y_test, l2=lam, tol=tol, test_points=top, n_extremes=n_extremes,
                           n_uniform=n_uniform, loo=loo, seed=seed)
            tab = compare(check.predicted, check.truth, check.points())
        sweep.append(tab.assign(l2=lam, weight_norm=float(check.fit.theta.norm()),
                                loo_iterations=int(check.truth.settings["iterations"].max())))
    frame = book.figure_data("convex_l2_train", pd.concat(sweep, ignore_index=True))
    small, large = frame[frame.l2 == frame.l2.min()], frame[frame.l2 == frame.l2.max()]
    book.record("l2_small", float(small.l2.iloc[0]), fmt="{:g}")
    book.record("l2_large", float(large.l2.iloc[0]), fmt="{:g}")
    book.record("l2_small_pearson", float(small.pearson.min()), fmt="{:.3f}")
    book.record("l2_large_pearson", float(large.pearson.min()), fmt="{:.4f}")
    book.record("l2_small_error", float(small.relative_error.max()), fmt="{:.2f}")
    book.record("l2_large_error", float(large.relative_error.max()), fmt="{:.3f}")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for (name, part), marker in zip(frame.groupby("set"), ("o", "s")):
        axes[0].plot(part.l2, part.relative_error, marker=marker, label=name)
        axes[1].plot(part.l2, part.pearson, marker=marker, label=name)
    for ax, ylabel in zip(axes, _METRIC_LABELS):
        ax.set(xscale="log", xlabel="l2 coefficient λ (training and hessian)", ylabel=ylabel)
        ax.axvline(l2, color="0.6", lw=1, ls=":")
    axes[0].set_yscale("log")
    axes[1].legend(frameon=False)
    return frame, fig


def without_l2(main: Verification, x: Tensor, y: Tensor, *, n_classes: int, tol: float, steps: int
               ) -> ToleranceFit:
    """No L2 term at all: on separable data there is no minimiser, only weights that grow without bound. Fits from
    zero with λ = 0 (L-BFGS only, at most ``steps`` steps, snapshots at ‖∇R‖ < 1e-2, 1e-3, 1e-4), records the
    weight norms on the way, whether the tolerance was met, ``main``'s weight norm and a one-sentence summary
    (``free_summary``); returns the fit."""
    free = fit_to_tolerance(model_at(torch.zeros(n_classes, x.shape[1], dtype=x.dtype)), x, y, l2=0.0, tol=tol,
                            lbfgs_max_iter=steps, newton_max_iter=0, strict=False, snapshots=[1e-2, 1e-3, 1e-4])
    n_steps = int(free.history[-1, 1])
    norms = {tau: float(snap[0].norm()) for tau, snap in sorted(free.snapshots.items(), reverse=True)}
    book.record("free_weight_norms", {f"{tau:g}": v for tau, v in norms.items()})
    book.record("free_converged", bool(free.converged))
    book.record("l2_weight_norm", float(main.fit.theta.norm()), fmt="{:.1f}")
    growth = ", ".join(f"{v:.0f} at ‖∇R‖ < {tau:g}" for tau, v in norms.items())
    outcome = (f"L-BFGS meets the tolerance after {n_steps} steps only by driving the training loss to "
               f"{free.loss:.1e}" if free.converged else
               f"after {n_steps} L-BFGS steps the training loss is {free.loss:.1e} and the gradient norm "
               f"{free.grad_norm:.1e}")
    book.record("free_summary", f"{outcome}, with a weight norm of {float(free.theta.norm()):.0f}"
                + (f" (on the way: {growth})" if growth else ""))
    return free


def l2_out_of_hessian(main: Verification, train_data: tuple[Tensor, Tensor], test_data: tuple[Tensor, Tensor],
                      exact_score: pd.DataFrame, *, l2: float, dampings: Sequence[float]
                      ) -> tuple[pd.DataFrame, Any]:
    """The L2 term kept in training but left out of the Hessian, replaced by damping δ (each of ``dampings``):
    the estimate from (H − λI + δI)⁻¹, scored over the union of each test point's point sets. Writes the figure
    data ``convex_l2_hessian``, records the smallest damping's error and Pearson, and returns (scores, Figure;
    dashed: ``exact_score``'s median relative error, dotted: δ = λ)."""
    X, y = train_data
    x_top, y_top = test_data
    union = {"union": main.union()}
    rows = []
    for delta in dampings:
        estimate = predict_removal(model_at(main.fit.theta), (X, y), (x_top, y_top), l2=l2,
                                   include_l2_in_hessian=False, damping=delta, factor=main.factor, cache=True)
        rows.append(compare(estimate.values, main.truth, union).assign(damping=delta))
    nol2 = book.figure_data("convex_l2_hessian", pd.concat(rows, ignore_index=True))
    worst = nol2[nol2.damping == nol2.damping.min()]
    book.record("nol2_smallest_damping", float(worst.damping.iloc[0]), fmt="{:g}")
    book.record("nol2_smallest_error", float(worst.relative_error.median()), fmt="{:.1f}")
    book.record("nol2_smallest_pearson", float(worst.pearson.min()), fmt="{:.3f}")

    fig, axes = _per_test_panels(nol2, "damping", "damping δ replacing the l2 term in the hessian",
                                 float(exact_score.relative_error.median()), "exact hessian")
    for ax in axes:
        ax.axvline(l2, color="0.6", lw=1, ls=":")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, frameon=False)
    return nol2, fig


def damping_sweep(main: Verification, train_data: tuple[Tensor, Tensor], test_data: tuple[Tensor, Tensor],
                  exact_score: pd.DataFrame, *, l2: float, dampings: Sequence[float], seed: int
                  ) -> tuple[pd.DataFrame, Any]:
    """Damping δ added to the exact Hessian: (H + δI)⁻¹ by conjugate gradients to a relative residual of 1e-10,
    scored over the union of each test point's point sets. Writes the figure data ``convex_damping``, records the
    largest δ's error and Pearson, the largest residual, and — paired over the test points, from 95 % intervals —
    the smallest δ at which the error has doubled and at which Pearson falls below 0.99. Returns (scores, Figure;
    dashed: ``exact_score``'s median relative error)."""
    X, y = train_data
    x_top, y_top = test_data
    union = {"union": main.union()}
    rows = []
    for delta in dampings:
        estimate = predict_removal(model_at(main.fit.theta), (X, y), (x_top, y_top), l2=l2, damping=delta,
                                   method="cg", rtol=1e-10, cache=True)
        rows.append(compare(estimate.values, main.truth, union).assign(
            damping=delta, residual=estimate.solve.max_relative_residual))
    damped = book.figure_data("convex_damping", pd.concat(rows, ignore_index=True))
    most = damped[damped.damping == damped.damping.max()]
    book.record("damping_largest", float(most.damping.iloc[0]), fmt="{:g}")
    book.record("damping_largest_error", float(most.relative_error.median()), fmt="{:.2f}")
    book.record("damping_largest_pearson", float(most.pearson.min()), fmt="{:.3f}")
    book.record("damping_max_residual", float(damped.residual.max()), fmt="{:.0e}")
    # paired over the test points: error(δ) / error(0) and Pearson(δ), each with its 95 % interval
    ratio = stats.against_reference(damped, value="relative_error", unit="test", by="damping",
                                    reference=exact_score.groupby("test").relative_error.median(), relative=True,
                                    seed=seed)
    pears = stats.against_reference(damped, value="pearson", unit="test", by="damping",
                                    reference={t: 0.0 for t in damped.test.unique()}, seed=seed)
    doubled = ratio.set_index("damping")[lambda d: d.low >= 2]       # the whole interval at twice the error or more
    dropped = pears.set_index("damping")[lambda d: d.high < 0.99]    # the whole interval below 0.99
    book.record("damping_error_doubles", f"{doubled.index.min():g}" if len(doubled) else "never (in this grid)")
    book.record("damping_pearson_drops", f"{dropped.index.min():g}" if len(dropped) else "never (in this grid)")

    fig, axes = _per_test_panels(damped, "damping", "damping δ added to the exact hessian",
                                 float(exact_score.relative_error.median()), "no damping")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, frameon=False)
    return damped, fig


def solver_budget_scores(main: Verification, train_data: tuple[Tensor, Tensor], test_data: tuple[Tensor, Tensor],
                         exact_score: pd.DataFrame, *, l2: float, cg_iterations: Sequence[int],
                         lissa_depths: Sequence[int], lissa_scales: Sequence[float],
                         arnoldi_ranks: Sequence[int]) -> tuple[pd.DataFrame, Any]:
    """Budgeted solvers (:func:`solver_budgets`) on the highest-loss test point, each run's estimate scored over
    that point's union of extremes and uniform sample. Writes the figure data ``convex_solvers``, records λ_max(H),
    per solver the best and worst error and the largest budget (keys ``cg``, ``lissa``, ``lissa_kl`` for
    Koh & Liang's scale, ``arnoldi``), the exact solve's error and the CG iterations that reach it (within 1 %).
    Returns (scores, Figure of error and Pearson against Hessian-vector products)."""
    X, y = train_data
    x_top, y_top = test_data
    lam_max, runs = solver_budgets(X, y, main.fit.theta, x_top[:1], y_top[:1], l2=l2, cg_iterations=cg_iterations,
                                   lissa_depths=lissa_depths, lissa_scales=lissa_scales, arnoldi_ranks=arnoldi_ranks)
    book.record("lambda_max", lam_max, fmt="{:.2f}")
    first = {"union": [main.union()[0]]}
    rows = [compare(removal_effects(X, y, main.fit.theta, run.x), main.truth, first, rows=[0]).assign(
        solver=run.solver, knob=run.knob, hvps=run.hvps) for run in runs]
    budget = book.figure_data("convex_solvers", pd.concat(rows, ignore_index=True))
    exact_top = float(exact_score.relative_error.iloc[0])
    for solver, part in budget.groupby("solver"):
        # "lissa, s = λmax" -> lissa; "lissa, s = <Koh & Liang's scale>" -> lissa_kl
        key = solver.split(",")[0] + ("_kl" if solver.startswith("lissa, s =") and "λmax" not in solver else "")
        book.record(f"{key}_best_error", float(part.relative_error.iloc[-1]), fmt="{:.3f}")
        book.record(f"{key}_worst_error", float(part.relative_error.iloc[0]), fmt="{:.2f}")
        book.record(f"{key}_max_knob", int(part.knob.iloc[-1]))
    book.record("exact_top_error", exact_top, fmt="{:.3f}")
    cg_ok = budget[(budget.solver == "cg") & (budget.relative_error <= 1.01 * exact_top)]
    book.record("cg_enough", int(cg_ok.knob.min()) if len(cg_ok) else -1)

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for (solver, part), marker in zip(budget.groupby("solver", sort=False), "osD^"):
        axes[0].plot(part.hvps, part.relative_error, marker=marker, ms=4, label=solver)
        axes[1].plot(part.hvps, part.pearson, marker=marker, ms=4, label=solver)
    axes[0].axhline(exact_top, color="0.4", ls="--", lw=1, label="exact solve")
    for ax, ylabel in zip(axes, _METRIC_LABELS):
        ax.set(xscale="log", xlabel="hessian-vector products", ylabel=ylabel)
    axes[0].set_yscale("log")
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, frameon=False, loc="lower right")
    return budget, fig


def _verdict(diffs: pd.DataFrame) -> tuple[str, dict[str, list[int]]]:
    """One sentence from :func:`helpers.stats.paired_differences` over k (a = extremes, b = uniform): at which k
    the extremes score higher, lower, or no difference is resolved, then every k's difference and interval.
    Returns (sentence, ``{verdict: [k, ...]}``)."""
    verdicts = ("a higher", "b higher", "no difference resolved")
    at = {v: [int(k) for k in diffs[diffs.verdict == v].k] for v in verdicts}
    parts = [f"the extremes score higher at k = {', '.join(map(str, at['a higher']))}" if at["a higher"] else "",
             f"lower at k = {', '.join(map(str, at['b higher']))}" if at["b higher"] else "",
             f"no difference is resolved at k = {', '.join(map(str, at['no difference resolved']))}"
             if at["no difference resolved"] else ""]
    sentence = ("; ".join(p for p in parts if p) + " (paired over test points, 95 % intervals of the difference: "
                + ", ".join(f"k = {int(r.k)}: {r.diff:+.2f} [{r.low:+.2f}, {r.high:+.2f}]"
                            for r in diffs.itertuples()) + ")")
    return sentence, at


def selection_curves(main: Verification, train_data: tuple[Tensor, Tensor], test_data: tuple[Tensor, Tensor],
                     stopped: dict[float, np.ndarray], *, l2: float, n_extremes: int, n_uniform: int
                     ) -> tuple[pd.DataFrame, Any]:
    """Extremes against a uniform sample: Pearson's correlation over the top-k extremes and over k uniform points
    (k up to ``min(n_extremes, n_uniform)``) for the exact estimate, the estimate stopped at the loosest threshold
    (``stopped``, from :func:`early_stopping`) and 5 iterations of conjugate gradients. Writes the figure data
    ``convex_selection`` and ``convex_selection_diff`` (paired difference extremes − uniform over the test points,
    for the CG estimate), records the correlations at the largest k and the verdict at every k. Returns
    (scores, Figure: mean Pearson against k, one panel per estimator)."""
    X, y = train_data
    x_top, y_top = test_data
    loosest = max(main.fit.snapshots)
    estimators = {
        "exact": main.predicted,
        f"stopped at ‖∇R‖ < {loosest:g}": stopped[loosest],
        "cg, 5 iterations": predict_removal(
            model_at(main.fit.theta), (X, y), (x_top, y_top), l2=l2, method="cg", maxiter=5,
            rtol=0.0).values.numpy(),
    }
    ks = [k for k in (5, 10, 20, 30, 50, 100) if k <= min(n_extremes, n_uniform)]
    rows = []
    for name, values in estimators.items():
        for k in ks:
            tab = compare(values, main.truth, {"extremes": main.extremes[:, :k], "uniform": main.uniform[:k]})
            rows.append(tab.assign(estimator=name, k=k))
    selection = book.figure_data("convex_selection", pd.concat(rows, ignore_index=True))
    mean = selection.groupby(["estimator", "set", "k"], sort=False)["pearson"].mean().reset_index()
    full = mean[mean.k == max(ks)].set_index(["estimator", "set"])["pearson"]
    broken = list(estimators)[2]
    book.record("selection_k", max(ks))
    book.record("selection_broken", broken)
    book.record("selection_broken_extremes", float(full[(broken, "extremes")]), fmt="{:.3f}")
    book.record("selection_broken_uniform", float(full[(broken, "uniform")]), fmt="{:.3f}")
    book.record("selection_exact_uniform", float(full[("exact", "uniform")]), fmt="{:.4f}")
    # the verdict at every k, from the paired difference over test points (extremes − uniform) and its interval
    diffs = book.figure_data("convex_selection_diff", stats.paired_differences(
        selection[selection.estimator == broken], value="pearson", between="set", a="extremes", b="uniform",
        unit="test", by=["k"], seed=0))
    sentence, at = _verdict(diffs)
    book.record("selection_verdict", sentence)
    book.record("selection_k_flattered", at["a higher"])

    fig, axes = plt.subplots(1, len(estimators), figsize=(3.3 * len(estimators), 3.2), sharey=True)
    for ax, (name, part) in zip(axes, mean.groupby("estimator", sort=False)):
        for (set_name, sub), marker in zip(part.groupby("set"), "os"):
            ax.plot(sub.k, sub.pearson, marker=marker, label=set_name)
        ax.set(xlabel="points scored, k")
        ax.text(0.04, 0.04, name, transform=ax.transAxes, fontsize=8)
    axes[0].set_ylabel("pearson correlation (mean over test points)")
    axes[0].legend(frameon=False, loc="center left")
    return selection, fig
