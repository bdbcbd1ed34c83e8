"""helpers.paper_data: the paper's per-run arrays, re-analysed; checked against the paper's own summaries and scipy."""

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from helpers import paper_data


@pytest.fixture(scope="module")
def deep_summary() -> pd.DataFrame:
    return paper_data.deep_run_summary(paper_data.deep_runs())


def test_unknown_reference_and_missing_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown reference table"):
        paper_data.read_reference("cifar")
    with pytest.raises(FileNotFoundError, match="helpers/published"):
        paper_data.read_reference("iris_runs", folder=tmp_path)


def test_iris_runs_recompute_the_papers_figure_bars():
    """Mean |Spearman| over the 50 repetitions reproduces every bar of Figs. 1 and 3 (2 decimals)."""
    runs = paper_data.iris_runs()
    bars = paper_data.read_reference("iris")
    assert (runs.groupby(["sweep", "regime", "value"]).size() == 50).all()
    ours = runs.groupby(["sweep", "regime", "value"]).spearman.apply(lambda s: s.abs().mean()).reset_index()
    merged = bars.merge(ours, on=["sweep", "regime", "value"])
    assert len(merged) == len(ours)  # every setting with runs has a bar
    np.testing.assert_allclose(merged.spearman, merged.mean_abs_spearman, atol=0.006)


def test_deep_summary_recomputes_fig2_drift_and_spread(deep_summary):
    """Mean |ρ| over the first 40 candidates, drift and spread: the numbers of epifano2023_deep.csv."""
    ref = paper_data.read_reference("deep")
    mx = deep_summary[deep_summary.test_point == "max"]
    for _, row in ref.iterrows():
        g = mx[(mx.dataset == row.dataset) & (mx.model == row.model)]
        assert len(g) == row.reps
        assert abs(g.spearman.abs().mean() - row.mean_abs_spearman) < 6e-4, row.model
        if pd.notna(row.drift):
            assert abs(g.drift.mean() - row.drift) < 6e-3
            assert abs(g.spread.mean() - row.spread) < 6e-4
    # STUDY.md §3 item 2: LeNet drift +0.27 / +0.61 against a spread of 0.03
    lenet = mx[mx.model == "lenet"].groupby("dataset")[["drift", "spread"]].mean()
    assert lenet.loc["mnist", "drift"] == pytest.approx(0.272, abs=0.005)
    assert lenet.loc["cifar10", "drift"] == pytest.approx(0.613, abs=0.005)
    assert lenet.spread.max() < 0.035


def test_orientation_makes_agreement_positive(deep_summary):
    fc = deep_summary[deep_summary.model == "fc128"]
    assert fc.spearman.mean() > 0.7 and fc.pearson.mean() > 0.7
    raw = paper_data.deep_run_summary(paper_data.deep_runs(), orientation=1.0)
    np.testing.assert_allclose(raw.spearman, -deep_summary.spearman)
    # Fig. 4: similar ranks, values far apart in scale
    assert fc.scale_ratio.median() > 50


def test_deep_run_summary_rejects_a_frame_without_the_columns():
    with pytest.raises(ValueError, match="lacks columns"):
        paper_data.deep_run_summary(pd.DataFrame({"rep": [0]}))


def test_abs_inflation_folds_negative_correlations():
    df = pd.DataFrame({"g": ["a", "a", "b", "b"], "spearman": [0.5, -0.5, 0.2, 0.4]})
    out = paper_data.abs_inflation(df, ["g"]).set_index("g")
    assert out.loc["a", "mean_signed"] == pytest.approx(0.0)
    assert out.loc["a", "mean_abs"] == pytest.approx(0.5)
    assert out.loc["a", "inflation"] == pytest.approx(0.5)
    assert out.loc["a", "fraction_negative"] == pytest.approx(0.5)
    assert out.loc["b", "inflation"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no column"):
        paper_data.abs_inflation(df, ["g"], rho="pearson")


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_null_mean_abs_rho_matches_the_normal_approximation(method):
    out = paper_data.null_mean_abs_rho(25, n_sim=20000, seed=1, method=method)
    assert abs(out["mean_abs"] - out["approx"]) < 4 * out["se"] + 0.004
    assert 0.15 < out["mean_abs"] < 0.18 and out["q95"] > out["mean_abs"]
    with pytest.raises(ValueError):
        paper_data.null_mean_abs_rho(2)


def test_group_test_against_scipy_and_by_hand():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"g": np.repeat([1, 2, 3], 20), "v": rng.normal(size=60) + np.repeat([0.0, 0.5, 1.0], 20)})
    out = paper_data.group_test(df, "v", "g")
    samples = [df.v[df.g == i].to_numpy() for i in (1, 2, 3)]
    assert out["F"] == pytest.approx(st.f_oneway(*samples).statistic)
    assert out["p_kruskal"] == pytest.approx(st.kruskal(*samples).pvalue)
    grand = df.v.mean()
    ssb = sum(20 * (s.mean() - grand) ** 2 for s in samples)
    assert out["eta2"] == pytest.approx(ssb / ((df.v - grand) ** 2).sum())
    assert out["epsilon2"] == pytest.approx(out["H"] / 59)
    # two groups: F is the square of the equal-variance t statistic
    two = df[df.g < 3]
    assert paper_data.group_test(two, "v", "g")["F"] == pytest.approx(
        st.ttest_ind(samples[0], samples[1]).statistic ** 2)
    with pytest.raises(ValueError, match="at least two"):
        paper_data.group_test(df[df.g == 1], "v", "g")
    with pytest.raises(ValueError, match="non-finite"):
        paper_data.group_test(df.assign(v=np.where(df.index == 3, np.nan, df.v)), "v", "g")


def test_depth_effect_in_the_papers_l2_runs_is_significant():
    """STUDY.md §3 item 4: one-way ANOVA on the published L2 arrays across depths gives p ≈ 2e-9."""
    tests = paper_data.depth_tests(paper_data.iris_runs())
    row = tests[(tests.regime == "l2") & (tests.scale == "abs")].iloc[0]
    assert 1e-9 < row.p_anova < 3e-9 and row.groups == 8 and row.n == 400
    # the one run with an undefined ρ is left out and counted, not propagated as NaN
    swa = tests[(tests.regime == "nol2_swa")]
    assert (swa.dropped == 1).all() and (swa.n == 399).all()
