"""helpers.plots: the figure types the chapters share draw what they are given, on the axes they are given."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from helpers import plots  # noqa: E402


def test_ci_points_draws_clipped_whiskers_both_ways() -> None:
    fig, (a, b) = plt.subplots(1, 2)
    # the second interval does not contain its estimate (BCa can do that): its short whisker is clipped to 0
    plots.ci_points(a, [0, 1], [0.5, 0.2], [0.4, 0.3], [0.7, 0.6], color="C0", label="pearson")
    (line, _, (bars,)) = a.containers[0].lines
    assert np.allclose(line.get_xdata(), [0.5, 0.2]) and np.allclose(line.get_ydata(), [0, 1])
    segs = bars.get_segments()
    assert np.allclose(segs[0][:, 0], [0.4, 0.7]) and np.allclose(segs[1][:, 0], [0.2, 0.6])
    plots.ci_points(b, 2.0, 0.5, 0.25, 0.75, horizontal=False)  # one point, vertical
    (line, _, (bars,)) = b.containers[0].lines
    assert np.allclose(line.get_xdata(), [2.0]) and np.allclose(bars.get_segments()[0][:, 1], [0.25, 0.75])
    plt.close(fig)


def test_ceiling_mark_spans_its_row_at_the_ceiling() -> None:
    fig, ax = plt.subplots()
    plots.ceiling_mark(ax, 3, 0.8, label="ceiling")
    (mark,) = ax.lines
    assert np.allclose(mark.get_xdata(), [0.8, 0.8]) and np.allclose(mark.get_ydata(), [2.6, 3.4])
    assert mark.get_label() == "ceiling"
    plt.close(fig)
