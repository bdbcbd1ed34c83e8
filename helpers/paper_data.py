"""The seed paper's per-run results (Epifano et al. 2023), read and re-analysed (chapter 3, STUDY.md §3).

The authors published every repetition behind their Figures 1–3 with their code (MIT licence); the package
ships them as package data, ``helpers/published/`` (comment lines start with ``#``), read through
:mod:`importlib.resources` so that an installed ``helpers`` (``pip install .``) finds them too:

* ``epifano2023_iris_runs.csv`` — one row per Iris repetition: signed Spearman and Pearson over the 25
  candidates, top Hessian eigenvalue, training accuracy; ``sweep`` (depth / width), ``regime``, ``value``.
* ``epifano2023_deep_runs.csv`` — one row per (repetition, candidate) of the MNIST / CIFAR-10 runs behind
  Figure 2: the estimated and the "true" test-loss difference, in the authors' conventions.

What this module computes from them:

* :func:`deep_run_summary` — per repetition: the signed Spearman / Pearson in the book's orientation, the
  within-repetition mean of the "true" differences (a common offset: drift) against their spread, and how far
  the estimated values are from the true ones in scale (the paper's Fig. 4, "similar Spearman, mismatched values").
* :func:`abs_inflation` — what averaging |ρ| (the paper's figures) does to each setting, against the signed mean.
* :func:`null_mean_abs_rho` — the mean |ρ| two *unrelated* rankings of n points produce: the floor that |ρ|
  never goes below even when there is nothing to find.
* :func:`group_test` / :func:`depth_tests` — one-way ANOVA and Kruskal–Wallis across depths with effect sizes
  (η², ε²), the tests behind "no significant depth effect" (the paper reports ANOVA p > 0.5).

Orientation. The authors' estimate is Koh & Liang's I_up,loss, which is −n·Δ_pred in the book's convention
(STUDY.md §1), so their raw correlation of ``estimated`` with ``true`` is negative when the estimate is right.
:func:`deep_run_summary` multiplies it by ``orientation = -1``: in its output a positive ρ means agreement, as in
every other table of the book. The Iris files already store correlations with that orientation.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.stats as st

from helpers.metrics import mean_abs_vs_signed

#: the package-data folder that holds the paper's CSV files (inside the installed package)
PUBLISHED = "published"

FILES: dict[str, str] = {
    "iris": "epifano2023_iris.csv",
    "deep": "epifano2023_deep.csv",
    "iris_runs": "epifano2023_iris_runs.csv",
    "deep_runs": "epifano2023_deep_runs.csv",
}

#: candidates per repetition behind the paper's Figure 2 summaries (the first 40 by |estimate|) and Iris (25)
DEEP_CANDIDATES = 40
IRIS_CANDIDATES = 25


def read_reference(name: str, folder: str | Path | None = None) -> pd.DataFrame:
    """One of the paper's CSV files (:data:`FILES`) as a DataFrame; ``#`` lines are comments.

    Args:
        folder: read from this folder instead of the package data (``helpers/published/``).

    Raises:
        ValueError: an unknown name (lists the valid ones). FileNotFoundError: the file is missing (names the
            folder; the package ships them as package data in ``helpers/published/``).
    """
    if name not in FILES:
        raise ValueError(f"unknown reference table {name!r}: use one of {sorted(FILES)}")
    if folder is None:
        resource = resources.files("helpers") / PUBLISHED / FILES[name]
        if not resource.is_file():
            raise FileNotFoundError(f"{FILES[name]} is missing from the installed package's {PUBLISHED}/ folder: "
                                    "reinstall it (pip install .), whose package data ship helpers/published/*.csv")
        with resource.open("r") as fh:
            return pd.read_csv(fh, comment="#")
    path = Path(folder) / FILES[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pass folder=None to read the copy the package ships in "
                                f"helpers/{PUBLISHED}/")
    return pd.read_csv(path, comment="#")


def iris_runs(folder: str | Path | None = None) -> pd.DataFrame:
    """Every Iris repetition (``sweep, regime, value, rep, spearman, pearson, top_eig, train_acc``), with
    ``abs_spearman`` / ``abs_pearson`` added (what the paper's figures average). The correlations are stored in
    the book's orientation (positive = agreement); a NaN is a repetition whose ρ is undefined (constant estimates)."""
    runs = read_reference("iris_runs", folder)
    runs["abs_spearman"] = runs["spearman"].abs()
    runs["abs_pearson"] = runs["pearson"].abs()
    return runs


def deep_runs(folder: str | Path | None = None, max_rank: int = DEEP_CANDIDATES) -> pd.DataFrame:
    """The MNIST / CIFAR-10 candidates of every repetition with ``rank < max_rank`` (the paper used 40)."""
    df = read_reference("deep_runs", folder)
    if max_rank < 3:
        raise ValueError(f"max_rank must be >= 3 (a correlation needs 3 points), got {max_rank}")
    return df[df["rank"] < max_rank].reset_index(drop=True)


def deep_run_summary(runs: pd.DataFrame, orientation: float = -1.0) -> pd.DataFrame:
    """Per repetition of the deep runs: correlations, drift and scale, one row each.

    Args:
        runs: rows of :func:`deep_runs` (columns ``dataset, model, test_point, rep, rank, estimated, true``).
        orientation: multiplies the correlations so that positive = agreement (−1 for the authors' I_up,loss
            estimates; see the module docstring).

    Returns:
        DataFrame with ``dataset, model, test_point, rep, n`` and
        ``spearman, pearson`` (oriented), ``drift`` (mean of ``true`` within the repetition: a common offset the
        retraining adds to every candidate), ``spread`` (its standard deviation across candidates, ddof 1),
        ``drift_to_spread`` (|drift| / spread), ``scale_ratio`` (median |estimated| / median |true − drift|: 1 when
        the values match in size, the paper's Fig. 4), ``abs_spearman`` / ``abs_pearson`` (the paper's bars).
        A repetition whose estimates or truths are constant has no correlation and is left out.

    Cost: one scipy call per repetition (a few hundred in all).
    """
    need = {"dataset", "model", "test_point", "rep", "estimated", "true"}
    if not need <= set(runs.columns):
        raise ValueError(f"runs lacks columns {sorted(need - set(runs.columns))}: pass deep_runs()'s frame")
    keys = ["dataset", "model", "test_point", "rep"]
    rows = []
    for key, g in runs.groupby(keys, sort=True):
        est, true = g["estimated"].to_numpy(float), g["true"].to_numpy(float)
        if est.size < 3 or np.ptp(est) == 0 or np.ptp(true) == 0:
            continue  # a constant column has no correlation; such repetitions are left out, not NaN
        drift, spread = float(true.mean()), float(true.std(ddof=1))
        centred = np.abs(true - drift)
        rows.append(dict(zip(keys, key)) | {
            "n": int(est.size),
            "spearman": orientation * float(st.spearmanr(est, true).statistic),
            "pearson": orientation * float(st.pearsonr(est, true).statistic),
            "drift": drift, "spread": spread,
            "drift_to_spread": abs(drift) / spread if spread > 0 else np.inf,
            "scale_ratio": float(np.median(np.abs(est)) / np.median(centred)) if np.median(centred) > 0 else np.inf,
        })
    out = pd.DataFrame(rows)
    out["abs_spearman"] = out["spearman"].abs()
    out["abs_pearson"] = out["pearson"].abs()
    return out


def abs_inflation(df: pd.DataFrame, by: Sequence[str], rho: str = "spearman") -> pd.DataFrame:
    """For each group of repetitions: mean signed ρ, mean |ρ|, their difference and the share of negative ρ.

    Wraps :func:`helpers.metrics.mean_abs_vs_signed`. Returns one row per group with the ``by`` columns and
    ``mean_signed, mean_abs, inflation, fraction_negative, n``.
    """
    if rho not in df.columns:
        raise ValueError(f"no column {rho!r} in the frame; it has {list(df.columns)}")
    rows = []
    for key, g in df.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rows.append(dict(zip(by, key)) | mean_abs_vs_signed(g[rho].to_numpy(float)))
    return pd.DataFrame(rows)


def null_mean_abs_rho(n: int, n_sim: int = 20000, seed: int = 0, method: str = "spearman") -> dict[str, float]:
    """Mean |ρ| of two *independent* rankings of ``n`` points (no relation at all), by simulation.

    Under independence Spearman's ρ has mean 0 and variance 1/(n − 1), so for moderate n the mean |ρ| is close to
    √(2/π)/√(n − 1) (the normal approximation, returned as ``approx``): about 0.16 for n = 25 and 0.13 for n = 40.
    A mean |ρ| near this value is what |ρ| reports when the estimate carries no information.

    Returns:
        ``{"n", "mean_abs", "se" (Monte-Carlo standard error), "approx", "q95" (95th percentile of |ρ|)}``.

    Cost: ``n_sim`` rank correlations, vectorised (``n_sim × n`` floats).
    """
    if n < 3:
        raise ValueError(f"n must be >= 3, got {n}")
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_sim, n))
    b = rng.standard_normal((n_sim, n))
    if method == "spearman":
        a, b = st.rankdata(a, axis=1), st.rankdata(b, axis=1)
    r = np.abs(st.pearsonr(a, b, axis=1).statistic)
    return {"n": float(n), "mean_abs": float(r.mean()), "se": float(r.std(ddof=1) / np.sqrt(n_sim)),
            "approx": float(np.sqrt(2 / np.pi) / np.sqrt(n - 1)), "q95": float(np.quantile(r, 0.95))}


def group_test(df: pd.DataFrame, value: str, group: str) -> dict[str, float]:
    """Does ``value`` differ between the levels of ``group``? One-way ANOVA and Kruskal–Wallis, with effect sizes.

    * ANOVA (``scipy.stats.f_oneway``): F, p, and η² = SS_between / SS_total (share of variance explained by the
      group).
    * Kruskal–Wallis (``scipy.stats.kruskal``, on ranks: no normality assumed): H, p, and
      ε² = H / (N − 1) (Tomczak & Tomczak 2014), the rank analogue of η².

    Returns:
        ``{"groups", "n", "F", "p_anova", "eta2", "H", "p_kruskal", "epsilon2"}``.

    Raises:
        ValueError: fewer than two groups, a group with fewer than two values, or non-finite values.
    """
    for col in (value, group):
        if col not in df.columns:
            raise ValueError(f"no column {col!r} in the frame; it has {list(df.columns)}")
    samples = [g[value].to_numpy(float) for _, g in df.groupby(group, sort=True)]
    if len(samples) < 2:
        raise ValueError(f"{group!r} has {len(samples)} level(s): a group test needs at least two")
    if min(s.size for s in samples) < 2:
        raise ValueError(f"every level of {group!r} needs at least two values of {value!r}")
    allv = np.concatenate(samples)
    if not np.all(np.isfinite(allv)):
        raise ValueError(f"{value!r} has non-finite values: drop the failed runs first")
    f = st.f_oneway(*samples)
    h = st.kruskal(*samples)
    grand = allv.mean()
    ss_between = sum(s.size * (s.mean() - grand) ** 2 for s in samples)
    ss_total = float(((allv - grand) ** 2).sum())
    return {"groups": float(len(samples)), "n": float(allv.size), "F": float(f.statistic),
            "p_anova": float(f.pvalue), "eta2": float(ss_between / ss_total) if ss_total > 0 else 0.0,
            "H": float(h.statistic), "p_kruskal": float(h.pvalue), "epsilon2": float(h.statistic / (allv.size - 1))}


def depth_tests(runs: pd.DataFrame, sweep: str = "depth", group: str = "value",
                rho: str = "spearman") -> pd.DataFrame:
    """:func:`group_test` across the levels of a sweep, per regime, on signed ρ and on |ρ|.

    Args:
        runs: per-run rows with columns ``sweep, regime, <group>, <rho>`` (e.g. :func:`iris_runs`).

    Returns:
        One row per (regime, scale ∈ {"signed", "abs"}) with the :func:`group_test` fields and ``dropped``, the
        number of runs left out because their ρ is undefined (NaN in the published arrays: one Iris run whose
        estimates were constant).
    """
    sel = runs[runs["sweep"] == sweep] if "sweep" in runs.columns else runs
    if sel.empty:
        raise ValueError(f"no runs of sweep {sweep!r}")
    rows = []
    for regime, g in sel.groupby("regime", sort=False):
        ok = g[np.isfinite(g[rho].to_numpy(float))]
        for scale in ("signed", "abs"):
            h = ok.assign(_v=ok[rho].abs() if scale == "abs" else ok[rho])
            rows.append({"regime": regime, "scale": scale} | group_test(h, "_v", group)
                        | {"dropped": float(len(g) - len(ok))})
    return pd.DataFrame(rows)
