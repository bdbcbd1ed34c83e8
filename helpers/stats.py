"""Tests across settings and intervals over repetitions: thin wrappers over :mod:`scipy.stats` (chapter 2).

* :func:`mean_ci` — the mean of a sample of per-run values (e.g. 50 Spearman correlations) with a bootstrap
  confidence interval (``scipy.stats.bootstrap``), the error bar of every bar in the book's figures.
* :func:`one_way` — one-way ANOVA (``scipy.stats.f_oneway``) and Kruskal–Wallis (``scipy.stats.kruskal``)
  across groups, with their effect sizes η² and ε².
* :func:`one_way_table` — :func:`one_way` for every slice of a tidy table (e.g. across depths, per regime).

Effect sizes (both in [0, 1], the share of variation explained by the grouping):

    η²  = SS_between / SS_total                                       (ANOVA)
    ε²  = H / ((N² − 1) / (N + 1)) = H / (N − 1)                     (Kruskal–Wallis; Tomczak & Tomczak 2014)

with N the total number of observations and H the Kruskal–Wallis statistic.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.stats as st

__all__ = ["OneWay", "mean_ci", "hierarchical_mean_ci", "sign_flip_test", "paired_differences", "against_reference",
           "one_way", "one_way_table", "holm"]


def _values(values: Any, name: str = "values") -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds NaN or infinity ({int((~np.isfinite(a)).sum())} of {a.size}): drop the "
                         "undefined runs first and report how many were dropped")
    return a


def mean_ci(values: Any, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
            method: str = "percentile") -> tuple[float, float, float]:
    """``(mean, low, high)``: the sample mean and its bootstrap confidence interval.

    Args:
        values: 1-D per-run values (numpy, torch or a sequence), finite.
        confidence: two-sided level (0.95 gives the 95 % intervals the paper's figures show).
        n_resamples: bootstrap resamples (``scipy.stats.bootstrap``).
        seed: seeds the resampling, so an interval is reproducible.
        method: ``"percentile"`` (default: the paper's "95 % bootstrap CI"), ``"BCa"`` or ``"basic"``.

    A single value gives a zero-width interval; identical values too (every resample has the same mean).
    Cost: ``n_resamples`` means of the sample, vectorised.
    """
    a = _values(values)
    if a.size == 0:
        raise ValueError("mean_ci got no values: there is nothing to average")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    mean = float(a.mean())
    if a.size == 1 or np.ptp(a) == 0:
        return mean, mean, mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples are handled below, never silently
        res = st.bootstrap((a,), np.mean, confidence_level=confidence, n_resamples=int(n_resamples),
                           method=method, rng=np.random.default_rng(seed), vectorized=True)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"the bootstrap interval of the mean is undefined for these {a.size} values: use "
                         "method='percentile' or more repetitions")
    return mean, low, high


def hierarchical_mean_ci(values: Any, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
                         ) -> tuple[float, float, float]:
    """``(mean, low, high)`` of a two-level sample — e.g. ``[n_seeds, n_test_points]`` correlations, one per
    trained model (seed) and test point — with a two-stage percentile bootstrap interval.

    Each resample draws the outer units (seeds) with replacement, then within every drawn unit its inner units
    (test points) with replacement, and averages. Both sources of variation enter the interval: the test points
    of one model are not independent replications of the model (Davison & Hinkley 1997, §3.8; Field & Welsh
    2007). With one outer unit the interval covers the test points of that model only — say so when quoting it.

    Args:
        values: 2-D ``[outer, inner]``, finite (numpy, torch or nested sequences). A 1-D input is one unit per
            row (no inner level): the ordinary bootstrap of the mean.
    Cost: ``n_resamples · outer · inner`` draws, vectorised.
    """
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"values must be 2-D [outer units, inner units], got shape {a.shape}")
    _values(a)  # finite, or a clear error
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    mean = float(a.mean())
    s, t = a.shape
    if a.size == 1 or np.ptp(a) == 0:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    outer = rng.integers(0, s, size=(int(n_resamples), s))
    inner = rng.integers(0, t, size=(int(n_resamples), s, t))
    means = a[outer[:, :, None], inner].mean(axis=(1, 2))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return mean, float(low), float(high)


def sign_flip_test(differences: Any, *, n_resamples: int = 2 ** 16, seed: int = 0) -> tuple[float, float]:
    """``(mean, p)``: the one-sided paired permutation test that the mean of ``differences`` (one per unit, e.g.
    estimator A's correlation minus estimator B's on the same trained model and test point) is above 0.

    Under the null each difference is symmetric about 0, so every pattern of signs is equally likely; p is the
    share of sign patterns whose mean reaches the observed one. Exact — all 2ⁿ patterns, enumerated as one matrix
    product — when 2ⁿ ≤ ``n_resamples`` (n ≤ 16 by default); beyond that ``scipy.stats.permutation_test`` with
    that many random patterns. Valid for any number of units, which a bootstrap p-value is not: with n units the
    smallest p is 2⁻ⁿ, so a family of m comparisons at level α (:func:`holm`) needs 2ⁿ > m / α — six units cannot
    pass nine comparisons at 0.05.
    """
    d = _values(differences, "differences")
    if d.size < 1:
        raise ValueError("differences must hold at least one unit")
    mean = float(d.mean())
    if np.ptp(d) == 0 and mean == 0:
        return mean, 1.0
    if 2 ** d.size <= n_resamples:
        signs = 1.0 - 2.0 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
        means = signs @ d / d.size
        # the observed pattern (all +) is one of them; a relative tolerance keeps ties with it in the count
        return mean, float(np.mean(means >= mean - 1e-12 * max(1.0, abs(mean))))
    result = st.permutation_test((d,), np.mean, permutation_type="samples", alternative="greater",
                                 n_resamples=int(n_resamples), vectorized=True, random_state=seed)
    return mean, float(result.pvalue)


def paired_differences(frame: pd.DataFrame, *, value: str, between: str, a: Any, b: Any, unit: str,
                       by: Sequence[str] = (), confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
                       ) -> pd.DataFrame:
    """Mean of ``value`` at ``between == a`` minus at ``between == b``, paired on ``unit`` (e.g. the test point),
    with its bootstrap interval (:func:`mean_ci`), for every group of ``by`` (e.g. each k of a curve).

    Returns one row per group: the ``by`` columns, ``diff``, ``low``, ``high``, ``n`` (paired units) and
    ``verdict``: ``"a higher"`` / ``"b higher"`` when the interval excludes 0, else ``"no difference resolved"``.
    Raises ValueError when a unit lacks either side (the comparison would not be paired).
    """
    rows = []
    groups = frame.groupby(list(by), sort=False) if by else [((), frame)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        va = g[g[between] == a].set_index(unit)[value]
        vb = g[g[between] == b].set_index(unit)[value]
        if va.index.has_duplicates or vb.index.has_duplicates:
            raise ValueError(f"{unit} must identify one row per side within each group of {list(by)}")
        if set(va.index) != set(vb.index) or va.empty:
            raise ValueError(f"group {dict(zip(by, key))}: {between}={a!r} and {between}={b!r} are not measured on "
                             f"the same {unit} values")
        d = (va - vb.reindex(va.index)).to_numpy()
        mean, low, high = mean_ci(d, confidence=confidence, n_resamples=n_resamples, seed=seed)
        verdict = "a higher" if low > 0 else "b higher" if high < 0 else "no difference resolved"
        rows.append(dict(zip(by, key)) | {"diff": mean, "low": low, "high": high, "n": int(d.size), "verdict": verdict})
    return pd.DataFrame(rows)


def against_reference(frame: pd.DataFrame, *, value: str, unit: str, by: str, reference: Any,
                      relative: bool = False, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
                      ) -> pd.DataFrame:
    """Along a curve (one row per ``by`` value and ``unit``), each point against a per-unit reference: the mean
    over units of ``value − reference`` (or, with ``relative``, of ``value / reference``) with its bootstrap
    interval (:func:`mean_ci`). Use it to say where a curve departs from its limit by more than a stated margin:
    an interval inside ``±margin`` is equivalence, one outside it is a departure, one across it is unresolved.

    Args:
        reference: ``{unit: reference value}`` (a mapping or a Series indexed by unit), e.g. each test point's
            error at convergence.
    Returns:
        One row per ``by`` value (sorted): ``by``, ``mean``, ``low``, ``high``, ``n``.
    """
    ref = pd.Series(reference)
    missing = set(frame[unit]) - set(ref.index)
    if missing:
        raise ValueError(f"reference has no value for {unit} {sorted(missing)[:5]}")
    rows = []
    for key, g in frame.groupby(by, sort=True):
        r = ref.reindex(g[unit]).to_numpy(float)
        v = g[value].to_numpy(float)
        d = v / r if relative else v - r
        mean, low, high = mean_ci(d, confidence=confidence, n_resamples=n_resamples, seed=seed)
        rows.append({by: key, "mean": mean, "low": low, "high": high, "n": int(d.size)})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class OneWay:
    """A one-way comparison of k groups.

    Attributes:
        k, n: number of groups and of observations.
        anova_f, anova_p, eta_sq: ANOVA F statistic, p-value and η² (share of the sum of squares between groups).
        kruskal_h, kruskal_p, epsilon_sq: Kruskal–Wallis H, p-value and ε² (rank-based effect size).
    """

    k: int
    n: int
    anova_f: float
    anova_p: float
    eta_sq: float
    kruskal_h: float
    kruskal_p: float
    epsilon_sq: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def one_way(groups: Sequence[Any]) -> OneWay:
    """ANOVA and Kruskal–Wallis across ``groups`` (each a 1-D array of per-run values), with effect sizes.

    Raises ValueError for fewer than two groups, a group with fewer than two values, non-finite values, or
    data that are constant overall (both tests are undefined then). Cost: O(N log N) for the ranks.
    """
    arrays = [_values(g, f"group {i}") for i, g in enumerate(groups)]
    if len(arrays) < 2:
        raise ValueError(f"one_way needs at least two groups, got {len(arrays)}")
    small = [i for i, a in enumerate(arrays) if a.size < 2]
    if small:
        raise ValueError(f"groups {small} have fewer than two values: ANOVA needs a within-group variance")
    pooled = np.concatenate(arrays)
    if np.ptp(pooled) == 0:
        raise ValueError("every value is the same: there is no variation to test")
    n = pooled.size
    f = st.f_oneway(*arrays)
    grand = pooled.mean()
    ss_between = sum(a.size * (a.mean() - grand) ** 2 for a in arrays)
    ss_total = float(((pooled - grand) ** 2).sum())
    h = st.kruskal(*arrays)
    return OneWay(k=len(arrays), n=n, anova_f=float(f.statistic), anova_p=float(f.pvalue),
                  eta_sq=float(ss_between / ss_total), kruskal_h=float(h.statistic), kruskal_p=float(h.pvalue),
                  epsilon_sq=float(h.statistic / (n - 1)))


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of m p-values (family-wise error rate): the i-th smallest becomes
    max over j ≤ i of min(1, (m − j + 1)·p_(j)). NaN entries stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def one_way_table(frame: pd.DataFrame, value: str, group: str, by: Sequence[str]) -> pd.DataFrame:
    """:func:`one_way` of ``frame[value]`` across the levels of ``group``, for every combination of ``by``.

    Example: ``one_way_table(runs, "abs_spearman", "value", ["sweep", "regime"])`` tests the depth (and width)
    effect separately per regime. Rows with NaN in ``value`` are dropped (and counted in ``n_dropped``); a slice
    with fewer than two groups has nothing to compare and is left out of the table.
    Returns one row per slice: the ``by`` columns, ``value`` (the tested column's name) and the
    :class:`OneWay` fields.
    """
    missing = [c for c in [value, group, *by] if c not in frame.columns]
    if missing:
        raise KeyError(f"frame lacks columns {missing}; it has {list(frame.columns)}")
    rows = []
    for key, part in frame.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        clean = part.dropna(subset=[value])
        arrays = [g[value].to_numpy() for _, g in clean.groupby(group, sort=True)]
        if len(arrays) < 2:
            continue
        result = one_way(arrays)
        rows.append({**dict(zip(by, key)), "value": value, "n_dropped": int(len(part) - len(clean)),
                     **result.as_dict()})
    return pd.DataFrame(rows)
