"""The book's figure style, set once, and the few figure types the chapters share.

Conventions (QuantEcon style): no titles inside the plot (the caption says what it shows), lowercase axis
labels with units, the paper's numbers in grey beside the book's in colour.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def set_style() -> None:
    """The seaborn theme and figure defaults of the book (call once per chapter)."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "axes.titlesize": "medium",
                         "figure.constrained_layout.use": True})


def small_ticks(ax: Axes) -> Axes:
    """Few, small, plain tick labels for the grids of scatter panels (no offset text to collide with labels)."""
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(4, symmetric=True))
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.tick_params(labelsize=7)
    return ax


def predicted_vs_actual(ax: Axes, actual: np.ndarray, predicted: np.ndarray, *, label: str = "training point",
                        color: str | None = None, identity: bool = True) -> Axes:
    """Scatter predicted (y) against actual (x) change in test loss with the y = x line, on equal axes.

    Both arrays are in loss units (nats), one entry per removed training point.
    """
    actual = np.asarray(actual, dtype=float)
    predicted = np.asarray(predicted, dtype=float)
    if actual.shape != predicted.shape:
        raise ValueError(f"actual {actual.shape} and predicted {predicted.shape} must have the same shape")
    if not (np.isfinite(actual).all() and np.isfinite(predicted).all()):
        raise ValueError("predicted_vs_actual got non-finite values: check the solver residual and the retraining")
    lim = float(np.abs(np.r_[actual, predicted]).max()) * 1.08 or 1.0
    if identity:
        ax.plot([-lim, lim], [-lim, lim], color="0.6", lw=1, ls="--", label="y = x")
    ax.scatter(actual, predicted, s=14, alpha=0.8, label=label, color=color)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal",
           xlabel="actual change in test loss (retrained without the point)",
           ylabel="predicted change in test loss (influence)")
    return ax


def ci_points(ax: Axes, position: float | np.ndarray, value: float | np.ndarray, low: float | np.ndarray,
              high: float | np.ndarray, *, horizontal: bool = True, **style) -> Axes:
    """Points with their confidence intervals: the forest of the book's agreement figures.

    ``horizontal``: values along x at heights ``position`` (a forest plot); else along y at ``position``.
    Whisker lengths are clipped at 0: a BCa interval need not contain its estimate. ``style`` goes to
    ``ax.errorbar`` (default ``fmt="o"``, ``ms=4``). Returns ``ax``.
    """
    value, low, high = (np.asarray(v, dtype=float) for v in (value, low, high))
    err = np.clip(np.stack([np.atleast_1d(value - low), np.atleast_1d(high - value)]), 0, None)
    style = {"fmt": "o", "ms": 4, **style}
    if horizontal:
        ax.errorbar(value, position, xerr=err, **style)
    else:
        ax.errorbar(position, value, yerr=err, **style)
    return ax


def ceiling_mark(ax: Axes, at: float, ceiling: float, *, horizontal: bool = True, label: str | None = None) -> Axes:
    """A short bar across row ``at`` of a forest at ``ceiling``: the reliability ceiling a correlation with a noisy
    ground truth cannot exceed (STUDY.md §4). Returns ``ax``."""
    span = [at - 0.4, at + 0.4]
    ax.plot(*(([ceiling] * 2, span) if horizontal else (span, [ceiling] * 2)), color="0.3", lw=2, label=label)
    return ax


def strip_by_group(ax: Axes, frame: pd.DataFrame, column: str, by: list[str], *, seed: int = 0) -> Axes:
    """One column of jittered dots per group of ``by`` (e.g. sweep × regime), with the group's median as a bar.

    Values that are NaN (e.g. a run that never reached its learning-rate floor) are left out; the tick label
    counts them (``n/a: k``) so that nothing disappears silently. Returns ``ax``.
    """
    rng = np.random.default_rng(seed)
    groups = list(frame.groupby(by, sort=True))
    labels = []
    for i, (key, g) in enumerate(groups):
        v = g[column].to_numpy(float)
        ok = v[np.isfinite(v)]
        ax.scatter(i + rng.uniform(-0.25, 0.25, ok.size), ok, s=6, color="C0", alpha=0.6, lw=0)
        if ok.size:
            ax.hlines(np.median(ok), i - 0.3, i + 0.3, color="k", lw=1.2)
        name = " ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        labels.append(name + (f"\nn/a: {v.size - ok.size}" if ok.size < v.size else ""))
    ax.set_xticks(range(len(groups)), labels, rotation=90, fontsize="x-small")
    return ax


def paired_bars(ax: Axes, frame: pd.DataFrame, x: str, series: Sequence[tuple[str, str, str]], *,
                hatch: Sequence[str | None] | None = None) -> Axes:
    """Grouped bars with confidence-interval whiskers, one group per value of ``frame[x]``.

    ``series``: ``(label, column, color)`` triples; each bar is ``frame[column]`` with whiskers from
    ``frame[column + "_low"]`` to ``frame[column + "_high"]`` (e.g. the paper's and the book's mean |ρ| from
    :func:`helpers.experiments.nonconvex.summarize_runs`). Where ``frame[column + "_runs"]`` lists the runs of a bar (a group of at most
    :data:`helpers.experiments.nonconvex.SHOW_RUNS`), they are drawn as dots on it. Missing values (NaN: a setting one side did not run) leave a
    gap. Returns ``ax``.
    """
    missing = [c for _, col, _ in series for c in (col, f"{col}_low", f"{col}_high") if c not in frame.columns]
    if missing or x not in frame.columns:
        raise KeyError(f"frame lacks columns {missing or [x]}: pass the output of nonconvex.summarize_runs / compare_bars")
    xs = sorted(frame[x].unique())
    pos = {v: i for i, v in enumerate(xs)}
    width = 0.8 / max(1, len(series))
    for s_i, (label, col, color) in enumerate(series):
        part = frame.dropna(subset=[col])
        at = np.array([pos[v] for v in part[x]]) - 0.4 + width * (s_i + 0.5)
        mid = part[col].to_numpy(float)
        err = np.vstack([mid - part[f"{col}_low"].to_numpy(float), part[f"{col}_high"].to_numpy(float) - mid])
        ax.bar(at, mid, width=width, color=color, label=label, hatch=None if hatch is None else hatch[s_i],
               edgecolor="white", linewidth=0.5)
        ax.errorbar(at, mid, yerr=np.clip(err, 0, None), fmt="none", ecolor="0.2", elinewidth=0.8, capsize=1.5)
        if f"{col}_runs" in part.columns:
            for a, listed in zip(at, part[f"{col}_runs"]):
                if isinstance(listed, str) and listed:
                    vals = np.array([float(t) for t in listed.split(";")])
                    ax.scatter(np.full(vals.size, a), vals, s=5, color="0.1", zorder=3, lw=0)
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.axhline(0, color="0.5", lw=0.6)
    return ax


def sweep_bars_grid(bars: pd.DataFrame, regimes: Sequence[str], column: str, label: str,
                    sides: Sequence[tuple[str, str, str]], *, n_depths: int, n_widths: int,
                    ylim: tuple[float, float] = (0.0, 1.0)) -> Figure:
    """The paper's Fig. 1 layout: a row per regime, the depth sweep left and the width sweep right, each panel
    :func:`paired_bars` of ``column`` for every side.

    Args:
        bars: one row per ``sweep, regime, value`` with ``column + t + suffix`` for t in ``"", "_low", "_high"``
            (and optionally ``column + "_runs" + suffix``) for every side's suffix.
        sides: ``(legend label, column suffix, colour)``, e.g. ``("paper", "_paper", "0.65")``.
        n_depths, n_widths: the number of settings of each sweep (panel widths). ylim: the y range.

    Returns the figure (the caller glues and closes it).
    """
    fig, axes = plt.subplots(len(regimes), 2, figsize=(10, 1.9 * len(regimes)), sharey=True,
                             gridspec_kw={"width_ratios": [n_depths + 0.5, n_widths + 0.5]}, squeeze=False)
    for i, reg in enumerate(regimes):
        for j, sw in enumerate(["depth", "width"]):
            ax = axes[i][j]
            part = bars[(bars.sweep == sw) & (bars.regime == reg)]
            if part.empty:
                ax.set_axis_off()
                continue
            frame = pd.DataFrame({"value": part["value"]})
            series = []
            for k, (name, suffix, color) in enumerate(sides):
                tag = f"s{k}"
                for t in ("", "_low", "_high"):
                    frame[tag + t] = part[column + t + suffix].to_numpy(float)
                if column + "_runs" + suffix in part.columns:  # five runs or fewer: drawn as dots
                    frame[tag + "_runs"] = part[column + "_runs" + suffix].to_numpy(object)
                series.append((name, tag, color))
            paired_bars(ax, frame, "value", series)
            ax.set(ylim=ylim, ylabel=f"{reg}\n{label}" if j == 0 else "")
            if i == len(regimes) - 1:
                ax.set_xlabel("hidden layers (width 5)" if sw == "depth" else "units (one hidden layer)")
    axes[0][0].legend(frameon=False, fontsize="small", ncol=3, loc="upper right")
    return fig
