"""The book's figure style, set once, and the few figure types the chapters share.

Conventions (QuantEcon style): no titles inside the plot (the caption says what it shows), lowercase axis
labels with units, the paper's numbers in grey beside the book's in colour.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes


def set_style() -> None:
    """The seaborn theme and figure defaults of the book (call once per chapter)."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "axes.titlesize": "medium",
                         "figure.constrained_layout.use": True})


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
