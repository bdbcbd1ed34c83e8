"""Agreement between predicted and actual effects: thin wrappers over :mod:`scipy.stats`.

Every metric takes two 1-D arrays (numpy or torch, any float dtype; converted to float64 numpy) of the same
length — typically one row of ``Δ_pred`` and of ``Δ_true`` over the same training points — and returns a float.
Bad input raises :class:`ValueError` naming the argument and the fix: different shapes, fewer than 3 points,
NaN or infinity, and, for the correlations, a constant input (its correlation is undefined; scipy would return
NaN with a warning).

* :func:`pearson`, :func:`spearman`, :func:`kendall` (τ-b): ``scipy.stats.pearsonr / spearmanr / kendalltau``.
* :func:`sign_agreement`, :func:`top_k_overlap`, :func:`relative_error`: elementary, defined below;
  :func:`slope`: the fitted slope of estimate on truth (``scipy.stats.linregress``).
* :func:`rank_resolution`: how far apart neighbouring values are, against :func:`pointwise_error`: how wrong an
  estimate is per point — when the second exceeds the first, a rank correlation must fall short of 1.
* :func:`bootstrap_ci`: paired bootstrap intervals (BCa by default) from ``scipy.stats.bootstrap``.
* :func:`summarize`: all of them with intervals, as one flat dict (a row of a results table);
  :func:`agreement` adds |ρ| and the ratio of scales, :func:`agreement_table` makes the long table of many
  (estimate, ground truth) pairs — the book's one agreement table.
* :func:`noise_ceiling`: the best correlation any estimator can reach against a seed-noisy ground truth.
* :func:`mean_abs_vs_signed`: how averaging ``|ρ|`` (as the paper's figures do) inflates agreement.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import scipy.stats as st

ArrayLike = Any  # numpy array, torch tensor, or sequence of floats
Metric = Callable[[np.ndarray, np.ndarray], float]

CORRELATIONS: tuple[str, ...] = ("pearson", "spearman", "kendall")


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    """float64 numpy copy of a 1-D numpy / torch / sequence input, rejecting NaN and infinity."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}: pass one row (e.g. one test point) at a time")
    if not np.all(np.isfinite(a)):
        bad = np.flatnonzero(~np.isfinite(a))
        raise ValueError(f"{name} has {bad.size} non-finite values (first at index {bad[0]}): drop or fix them")
    return a


def _pair(
    a: ArrayLike, b: ArrayLike, names: tuple[str, str] = ("a", "b"), min_n: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_1d(a, names[0]), _as_1d(b, names[1])
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {x.shape} and {y.shape}")
    if x.size < min_n:
        raise ValueError(f"need at least {min_n} paired values, got {x.size}")
    return x, y


def _non_constant(*arrays: tuple[np.ndarray, str]) -> None:
    for a, name in arrays:
        if np.all(a == a[0]):
            raise ValueError(f"{name} is constant ({a[0]!r} everywhere): its correlation is undefined")


def pearson(a: ArrayLike, b: ArrayLike) -> float:
    """Pearson's r between ``a`` and ``b`` (``scipy.stats.pearsonr``). O(n)."""
    x, y = _pair(a, b)
    _non_constant((x, "a"), (y, "b"))
    return float(st.pearsonr(x, y).statistic)


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman's ρ (Pearson of average ranks; ``scipy.stats.spearmanr``). O(n log n)."""
    x, y = _pair(a, b)
    _non_constant((x, "a"), (y, "b"))
    return float(st.spearmanr(x, y).statistic)


def kendall(a: ArrayLike, b: ArrayLike) -> float:
    """Kendall's τ-b (ties accounted for; ``scipy.stats.kendalltau``). O(n log n)."""
    x, y = _pair(a, b)
    _non_constant((x, "a"), (y, "b"))
    return float(st.kendalltau(x, y).statistic)


def sign_agreement(a: ArrayLike, b: ArrayLike) -> float:
    """Fraction of positions i where ``sign(a_i) == sign(b_i)``, in [0, 1]. Zero matches only zero. O(n)."""
    x, y = _pair(a, b, min_n=1)
    return float(np.mean(np.sign(x) == np.sign(y)))


def top_k_overlap(a: ArrayLike, b: ArrayLike, k: int) -> float:
    """``|top_k(|a|) ∩ top_k(|b|)| / k`` in [0, 1]: do the two agree on which k points matter most?

    Ties in ``|value|`` are broken by position (a stable sort), so the result is deterministic. O(n log n).
    """
    x, y = _pair(a, b, min_n=1)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= x.size:
        raise ValueError(f"k must be an int in [1, {x.size}], got {k!r}")
    top_a = np.argsort(-np.abs(x), kind="stable")[:k]
    top_b = np.argsort(-np.abs(y), kind="stable")[:k]
    return float(np.intersect1d(top_a, top_b).size / k)


def relative_error(pred: ArrayLike, true: ArrayLike) -> float:
    """``‖pred − true‖₂ / ‖true‖₂`` (unitless; 0 is perfect, 1 is as bad as predicting zero). O(n)."""
    x, y = _pair(pred, true, ("pred", "true"), min_n=1)
    norm = np.linalg.norm(y)
    if norm == 0:
        raise ValueError("true is all zeros: the relative error is undefined; report the absolute error instead")
    return float(np.linalg.norm(x - y) / norm)


def slope(pred: ArrayLike, true: ArrayLike) -> float:
    """The least-squares slope of ``pred`` on ``true`` (``scipy.stats.linregress(true, pred).slope``, intercept
    fitted): 1 when the estimate has the truth's scale, 2.5 for an estimate 2.5 times too large — the value measure a
    rank correlation cannot see. Raises ValueError for a constant ``true``. O(n)."""
    x, y = _pair(pred, true, ("pred", "true"))
    _non_constant((y, "true"))
    return float(st.linregress(y, x).slope)


def pointwise_error(pred: ArrayLike, true: ArrayLike) -> float:
    """Median over points of ``|pred_i − true_i| / |true_i|`` (points with ``true_i = 0`` skipped). O(n)."""
    x, y = _pair(pred, true, ("pred", "true"), min_n=1)
    keep = y != 0
    if not keep.any():
        raise ValueError("true is all zeros: the pointwise relative error is undefined")
    return float(np.median(np.abs(x[keep] - y[keep]) / np.abs(y[keep])))


def rank_resolution(values: ArrayLike) -> float:
    """Median relative gap between neighbours in rank order: ``|v₍ₖ₊₁₎ − v₍ₖ₎| / max(|v₍ₖ₎|, |v₍ₖ₊₁₎|)``. O(n log n).

    The precision an estimate needs to rank ``values`` right: an estimate whose :func:`pointwise_error` is larger
    than this swaps neighbours, and Spearman's correlation falls short of 1 even when the values agree well.
    """
    v = np.sort(_as_1d(values, "values"))
    if v.size < 2:
        raise ValueError(f"values has {v.size} entries: a rank resolution needs at least 2")
    top = np.maximum(np.abs(v[1:]), np.abs(v[:-1]))
    gaps = np.divide(np.diff(v), top, out=np.zeros_like(top), where=top > 0)
    return float(np.median(gaps))


# Vectorised statistics for scipy.stats.bootstrap: rows of resamples along the last axis. They call scipy the
# same way the public metrics do (Spearman = Pearson of average ranks, which is how spearmanr defines it).
def _pearson_v(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return st.pearsonr(x, y, axis=axis).statistic


def _spearman_v(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return st.pearsonr(st.rankdata(x, axis=axis), st.rankdata(y, axis=axis), axis=axis).statistic


def _kendall_v(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return st.kendalltau(x, y, axis=axis).statistic


def _sign_v(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(np.sign(x) == np.sign(y), axis=axis)


def _relerr_v(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.linalg.norm(x - y, axis=axis) / np.linalg.norm(y, axis=axis)


_METRICS: dict[str, tuple[Callable[..., float], Callable[..., np.ndarray] | None]] = {
    "pearson": (pearson, _pearson_v),
    "spearman": (spearman, _spearman_v),
    "kendall": (kendall, _kendall_v),
    "sign_agreement": (sign_agreement, _sign_v),
    "relative_error": (relative_error, _relerr_v),
}
METRICS: tuple[str, ...] = tuple(_METRICS)


def bootstrap_ci(
    metric: str | Metric,
    a: ArrayLike,
    b: ArrayLike,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "BCa",
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the metric on the data and its paired bootstrap confidence interval.

    Pairs ``(a_i, b_i)`` are resampled together (``scipy.stats.bootstrap(..., paired=True)``), so the interval
    reflects which points happened to be chosen, not seed noise in ``b`` (see :func:`noise_ceiling` for that).

    Args:
        metric: a name in :data:`METRICS` (vectorised, fast) or any callable ``f(a, b) -> float``
            (e.g. ``lambda a, b: top_k_overlap(a, b, 10)``; evaluated once per resample).
        n_resamples: bootstrap resamples; 1000–2000 for reported intervals.
        confidence: two-sided confidence level.
        seed: seeds the resampling (``numpy.random.default_rng``).
        method: ``"BCa"`` (default, bias-corrected and accelerated), ``"percentile"`` or ``"basic"``.

    Raises:
        ValueError: the metric's own input errors, or an interval scipy could not compute (degenerate
            resamples, e.g. too few points or many ties) — never a silent NaN.

    Cost: ``n_resamples`` (+ n for BCa's jackknife) evaluations of the metric.
    """
    x, y = _pair(a, b)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if isinstance(metric, str):
        if metric not in _METRICS:
            raise ValueError(f"unknown metric {metric!r}: use one of {METRICS} or pass a callable")
        scalar, vectorised = _METRICS[metric]
        label = metric
    else:
        scalar, vectorised, label = metric, None, getattr(metric, "__name__", "metric")
    estimate = float(scalar(x, y))  # also validates the input (constant, zero norm, ...)
    with warnings.catch_warnings():
        # Degenerate resamples make scipy warn and return NaN; we check the result and raise instead.
        warnings.simplefilter("ignore")
        res = st.bootstrap(
            (x, y),
            vectorised if vectorised is not None else (lambda u, v: float(scalar(u, v))),
            paired=True,
            vectorized=vectorised is not None,
            n_resamples=int(n_resamples),
            confidence_level=confidence,
            method=method,
            rng=np.random.default_rng(seed),
        )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        # BCa is undefined when every resample gives the same value (e.g. a sign agreement of exactly 1):
        # then the honest interval has zero width. Otherwise fall back to percentiles if few resamples failed.
        dist = np.asarray(res.bootstrap_distribution, dtype=float)
        finite = dist[np.isfinite(dist)]
        if finite.size == dist.size and np.ptp(finite) == 0:
            return estimate, float(finite[0]), float(finite[0])
        if finite.size >= 0.99 * dist.size:
            alpha = (1 - confidence) / 2
            return estimate, float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))
        raise ValueError(
            f"the bootstrap interval of {label} is undefined (degenerate resamples: n={x.size}, many ties or "
            "constant resamples): use more points, method='percentile', or report the estimate without an interval"
        )
    return estimate, low, high


def summarize(
    pred: ArrayLike,
    true: ArrayLike,
    *,
    k: int | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Every metric with its paired bootstrap interval, as one flat dict (a row of a results table).

    Keys: ``n``; for each of ``pearson, spearman, kendall, sign_agreement, top_k_overlap, relative_error``
    the estimate under its name and the interval as ``<name>_low`` / ``<name>_high``; and ``k``.
    ``k`` defaults to ``max(1, n // 10)``. Correlations need non-constant inputs (ValueError otherwise).

    Cost: six bootstraps of ``n_resamples`` each; the top-k one calls Python per resample.
    """
    x, y = _pair(pred, true, ("pred", "true"))
    k = max(1, x.size // 10) if k is None else k
    out: dict[str, float] = {"n": float(x.size), "k": float(k)}
    metrics: list[tuple[str, str | Metric]] = [(m, m) for m in METRICS]
    metrics.insert(4, ("top_k_overlap", lambda u, v: top_k_overlap(u, v, k)))
    for name, metric in metrics:
        est, low, high = bootstrap_ci(metric, x, y, n_resamples=n_resamples, confidence=confidence, seed=seed)
        out[name], out[f"{name}_low"], out[f"{name}_high"] = est, low, high
    return out


#: the metrics of an agreement table (:func:`agreement_table`), each with its paired bootstrap interval
AGREEMENT_METRICS: tuple[str, ...] = ("pearson", "spearman", "kendall", "sign_agreement", "top_k_overlap",
                                      "relative_error")


def agreement(pred: Any, true: Any, *, k: int | None = None, n_resamples: int = 1000, seed: int = 0
              ) -> dict[str, float]:
    """Every metric of estimate against ground truth, with paired bootstrap intervals, in one flat dict.

    :func:`summarize` (Pearson, Spearman, Kendall, sign agreement, top-k overlap, relative error
    with ``_low`` / ``_high``) plus ``abs_pearson`` / ``abs_spearman`` (what a paper reporting |ρ| would show)
    and ``scale_ratio`` = median |pred| / median |true| (1 when the values agree in size; the paper's Fig. 4).

    Args:
        pred, true: ``[n]`` predicted and actual changes of one test loss over the same candidates.
        k: top-k size (default n // 10, at least 1).
    """
    out = summarize(pred, true, k=k, n_resamples=n_resamples, seed=seed)
    p, t = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    out["abs_pearson"], out["abs_spearman"] = abs(out["pearson"]), abs(out["spearman"])
    mt = float(np.median(np.abs(t)))
    out["scale_ratio"] = float(np.median(np.abs(p)) / mt) if mt > 0 else float("inf")
    return out


def agreement_table(pred: dict[str, Any], truths: dict[str, Any], *, k: int | None = None,
                    n_resamples: int = 1000, seed: int = 0,
                    extra: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """Long-form table of :func:`agreement` for every (estimate, ground truth) pair.

    Args:
        pred: ``{estimate name: [n] values}``; truths: ``{ground-truth name: [n] values}`` over the same points.
        extra: per ground truth, columns to attach to its rows (e.g. ``{"cold": {"ceiling": 0.4}}``).

    Returns:
        Rows ``estimate, ground_truth, metric, value, low, high`` (+ the ``extra`` columns), one per metric of
        :data:`AGREEMENT_METRICS` (``low`` / ``high`` = the 95 % bootstrap interval).
    """
    rows = []
    for en, p in pred.items():
        for gn, t in truths.items():
            a = agreement(p, t, k=k, n_resamples=n_resamples, seed=seed)
            for m in AGREEMENT_METRICS:
                rows.append({"estimate": en, "ground_truth": gn, "metric": m, "value": a[m],
                             "low": a[f"{m}_low"], "high": a[f"{m}_high"], "n": int(a["n"])}
                            | dict((extra or {}).get(gn, {})))
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class NoiseCeiling:
    """Reliability of a seed-averaged ground truth and the correlation ceiling it implies.

    Attributes:
        reliability: r_k, share of the seed-mean's variance across points that is signal (ICC(C,k) by default).
        ceiling: √r_k (0 if r_k ≤ 0), the largest expected Pearson correlation any estimator can reach against
            the seed-mean of k seeds.
        reliability_single, ceiling_single: the same for a ground truth from one seed (ICC(C,1) by default).
        signal_var: variance across points of the noise-free Δ_true (can come out negative: no detectable signal).
        noise_var: variance across seeds at a fixed point (pooled over points).
        n_seeds, n_points: the shape of the input.
    """

    reliability: float
    ceiling: float
    reliability_single: float
    ceiling_single: float
    signal_var: float
    noise_var: float
    n_seeds: int
    n_points: int


def noise_ceiling(delta_true: ArrayLike, form: str = "consistency") -> NoiseCeiling:
    """The reliability ceiling implied by seed-to-seed variance of Δ_true.

    Model: Δ_true[s, i] = T_i + b_s + e_si: signal T_i varying over points, an offset b_s per seed (a seed whose
    reference model lands higher or lower moves every point's Δ alike) and noise e_si (variance σ²_e).

    ``form="consistency"`` (default; two-way model, McGraw & Wong 1996, ICC(C,·)): the seed offsets are not
    noise for a correlation — Pearson and Spearman ignore a constant added to every point, and the seed-mean
    carries only the mean offset, a constant — so they are removed with the seed means::

        MS_points = k · variance over points of the seed-means (ddof 1)                → k σ²_T + σ²_e
        MS_error  = Σ (Δ_si − Δ̄_s· − Δ̄_·i + Δ̄)² / ((k − 1)(n − 1))                   → σ²_e
        r_k = (MS_points − MS_error) / MS_points         = σ²_T / (σ²_T + σ²_e / k)
        r_1 = (MS_points − MS_error) / (MS_points + (k − 1) MS_error)

    ``form="agreement"`` (one-way model, Shrout & Fleiss 1979, ICC(1,·)) pools the offsets with the noise
    (MS_within = mean over points of the across-seed variance): right for a metric that sees absolute values
    (e.g. the relative error), too low a ceiling for a correlation when seeds differ by offsets.

    r_k and r_1 are linked by the Spearman–Brown prophecy formula r_k = k r_1 / (1 + (k − 1) r_1) (Spearman 1910;
    Brown 1910). By Spearman's (1904) correction for attenuation, the correlation of any estimator P with the
    measured seed-mean is at most √r_k (reached when P is the signal itself); reported correlations should be read
    against this ceiling, not against 1.

    Args:
        delta_true: ``[n_seeds, n_points]`` Δ_true of the same points under ``n_seeds ≥ 2`` retraining seeds
            (numpy or torch).
        form: ``"consistency"`` or ``"agreement"`` (above).

    Returns:
        :class:`NoiseCeiling`. Reliabilities are unclipped estimates (negative when noise swamps signal);
        ceilings use them clipped to [0, 1].

    Cost: O(n_seeds · n_points).
    """
    if form not in ("consistency", "agreement"):
        raise ValueError(f"form must be 'consistency' (correlations) or 'agreement' (absolute values), got {form!r}")
    if hasattr(delta_true, "detach"):
        delta_true = delta_true.detach().cpu().numpy()
    d = np.asarray(delta_true, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 2:
        raise ValueError(f"delta_true must be [n_seeds >= 2, n_points >= 2], got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("delta_true has non-finite values: drop or fix the failed runs")
    k, n = d.shape
    ms_between = float(k * np.var(d.mean(axis=0), ddof=1))
    if form == "agreement":
        ms_within = float(np.mean(np.var(d, axis=0, ddof=1)))
    else:
        resid = d - d.mean(axis=1, keepdims=True) - d.mean(axis=0, keepdims=True) + d.mean()
        ms_within = float((resid ** 2).sum() / ((k - 1) * (n - 1)))
    if ms_between == 0:
        raise ValueError("the seed-mean of delta_true is constant over points: there is no signal to correlate with")
    r_k = (ms_between - ms_within) / ms_between
    r_1 = (ms_between - ms_within) / (ms_between + (k - 1) * ms_within)
    return NoiseCeiling(
        reliability=r_k,
        ceiling=float(np.sqrt(np.clip(r_k, 0.0, 1.0))),
        reliability_single=r_1,
        ceiling_single=float(np.sqrt(np.clip(r_1, 0.0, 1.0))),
        signal_var=(ms_between - ms_within) / k,
        noise_var=ms_within,
        n_seeds=k,
        n_points=n,
    )


def mean_abs_vs_signed(rhos: ArrayLike) -> dict[str, float]:
    """How averaging ``|ρ|`` over repetitions (the paper's figures) inflates agreement.

    Returns ``{"mean_signed", "mean_abs", "inflation" (= mean_abs − mean_signed ≥ 0), "fraction_negative",
    "n"}``. With correlations scattered around zero, mean ``|ρ|`` is clearly positive while the signed mean is ~0:
    e.g. ρ ∈ {0.5, −0.5} gives mean ``|ρ|`` = 0.5, mean ρ = 0.
    """
    r = _as_1d(rhos, "rhos")
    if r.size == 0:
        raise ValueError("rhos is empty: pass at least one correlation")
    if np.any(np.abs(r) > 1):
        raise ValueError(f"rhos must be correlations in [-1, 1], got values up to {np.max(np.abs(r))}")
    signed, absolute = float(np.mean(r)), float(np.mean(np.abs(r)))
    return {"mean_signed": signed, "mean_abs": absolute, "inflation": absolute - signed,
            "fraction_negative": float(np.mean(r < 0)), "n": float(r.size)}


# ----------------------------------------------------------------------------------------------------------
# the linear datamodeling score (Park et al. 2023)
# ----------------------------------------------------------------------------------------------------------


def random_subsets(n: int, alpha: float, m: int, seed: int = 0) -> np.ndarray:
    """``[m, n]`` bool: m subsets of exactly round(α·n) training points each, drawn without replacement."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    size = int(round(alpha * n))
    if not 1 <= size < n or m < 3:
        raise ValueError(f"need 1 <= round(alpha·n) < n and m >= 3 subsets, got size {size} of n = {n}, m = {m}")
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n), dtype=bool)
    for j in range(m):  # m is small (tens to hundreds): one permutation per subset
        masks[j, rng.choice(n, size, replace=False)] = True
    return masks


def lds(values: ArrayLike, masks: ArrayLike, losses: ArrayLike) -> np.ndarray:
    """The linear datamodeling score per test point, ``[n_test]``.

    ``values`` ``[n_test, n_train]`` in the book's convention (Δ_pred: the change of test loss when a point is
    removed), ``masks`` ``[m, n_train]`` the subsets, ``losses`` ``[m, n_test]`` the test losses of the models
    trained on them. The linear datamodel predicts ℓ_S(t) ≈ ℓ_full(t) + Σ_{i∉S} Δ[t, i] = const − Σ_{i∈S} Δ[t, i];
    the score is Spearman's ρ over the m subsets between that prediction and the actual loss, for each test point
    (averaging over test points is the caller's choice; :func:`bootstrap_ci` gives its interval)."""
    v = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    M = np.asarray(masks, dtype=np.float64)
    L = np.asarray(losses.detach().cpu() if hasattr(losses, "detach") else losses, dtype=np.float64)
    if v.ndim != 2 or M.ndim != 2 or L.ndim != 2 or M.shape[1] != v.shape[1] or L.shape != (M.shape[0], v.shape[0]):
        raise ValueError(f"shapes must be values [n_test, n_train], masks [m, n_train], losses [m, n_test]; got "
                         f"{v.shape}, {M.shape}, {L.shape}")
    if not (np.isfinite(v).all() and np.isfinite(L).all()):
        raise ValueError("values and losses must be finite")
    if M.shape[0] < 3:
        raise ValueError(f"the LDS needs at least 3 subsets, got {M.shape[0]}")
    predicted = -M @ v.T  # [m, n_test]
    return np.asarray(_spearman_v(predicted, L, axis=0), dtype=np.float64)
