"""helpers.stats against scipy and closed forms; the paper's published depth effect (STUDY.md §3 item 4)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from helpers import paper_data, stats


def test_mean_ci_matches_scipy_bootstrap_and_covers_the_mean() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 0.2, size=40)
    m, lo, hi = stats.mean_ci(x, n_resamples=3000, seed=5)
    ref = st.bootstrap((x,), np.mean, n_resamples=3000, method="percentile", rng=np.random.default_rng(5))
    assert m == pytest.approx(x.mean(), abs=1e-15)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=1e-12)
    assert lo < m < hi
    # the half width shrinks like 1/sqrt(n): compare with the normal approximation
    assert (hi - lo) / 2 == pytest.approx(1.96 * x.std(ddof=1) / np.sqrt(x.size), rel=0.25)


def test_mean_ci_degenerate_and_bad_input() -> None:
    assert stats.mean_ci([0.5]) == (0.5, 0.5, 0.5)
    assert stats.mean_ci([0.25, 0.25, 0.25]) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="NaN"):
        stats.mean_ci([0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="no values"):
        stats.mean_ci([])


def test_hierarchical_mean_ci_has_the_two_stage_bootstrap_variance() -> None:
    # outer units (seeds) with large offsets, inner units (test points) scattered around them
    rng = np.random.default_rng(3)
    s, t = 6, 4
    x = rng.normal(0.0, 1.0, size=(s, 1)) + rng.normal(0.0, 0.3, size=(s, t))
    m, lo, hi = stats.hierarchical_mean_ci(x, n_resamples=40000, seed=1)
    assert m == pytest.approx(x.mean(), abs=1e-15) and lo < m < hi
    # closed form: Var* = (var0(unit means) + mean(var0 within unit) / t) / s, each draw independent
    var = (np.var(x.mean(1)) + np.mean(np.var(x, axis=1)) / t) / s
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(var), rel=0.08)
    # treating the 24 values as independent would understate the uncertainty of the seeds
    _, flo, fhi = stats.mean_ci(x.ravel(), n_resamples=4000, seed=1)
    assert (fhi - flo) < 0.7 * (hi - lo)
    # one inner unit: the ordinary bootstrap of the outer values (same width up to resampling noise)
    _, a, b = stats.hierarchical_mean_ci(x[:, 0], n_resamples=40000, seed=2)
    assert (b - a) / 2 == pytest.approx(1.96 * np.sqrt(np.var(x[:, 0]) / s), rel=0.08)


def test_hierarchical_mean_ci_degenerate_and_bad_input() -> None:
    assert stats.hierarchical_mean_ci([[0.5]]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        stats.hierarchical_mean_ci([[0.1, float("nan")], [0.2, 0.3]])
    with pytest.raises(ValueError, match="2-D"):
        stats.hierarchical_mean_ci(np.zeros((2, 2, 2)))


def test_sign_flip_test_is_the_exact_paired_permutation_test() -> None:
    """p = the share of all 2ⁿ sign patterns whose mean reaches the observed one (enumerated here by hand), the
    smallest p is 2⁻ⁿ, and a constant zero is no evidence."""
    import itertools

    rng = np.random.default_rng(5)
    for shift in (-0.3, 0.0, 0.4, 1.0):
        d = shift + rng.normal(size=8)
        patterns = np.array(list(itertools.product([1.0, -1.0], repeat=d.size)))
        expected = np.mean((patterns * d).mean(axis=1) >= d.mean() - 1e-12)
        mean, p = stats.sign_flip_test(d)
        assert mean == pytest.approx(d.mean()) and p == pytest.approx(expected, abs=1e-12)
    assert stats.sign_flip_test(np.full(6, 0.2))[1] == pytest.approx(2.0 ** -6)
    assert stats.sign_flip_test(np.full(6, -0.2))[1] == pytest.approx(1.0)
    assert stats.sign_flip_test(np.zeros(4)) == (0.0, 1.0)
    # more units than the exact enumeration allows: random sign patterns, close to the exact answer
    d = 0.2 + rng.normal(size=12)
    assert abs(stats.sign_flip_test(d, n_resamples=2000)[1] - stats.sign_flip_test(d)[1]) < 0.03
    with pytest.raises(ValueError, match="differences holds NaN"):
        stats.sign_flip_test([0.1, float("nan")])


def test_paired_differences_pair_units_and_call_verdicts_from_intervals() -> None:
    rng = np.random.default_rng(4)
    t = np.arange(30)
    base = rng.normal(0, 1.0, size=t.size)  # a large shared per-unit effect: only a paired test sees small shifts
    rows = []
    for k, shift in ((5, 0.3), (10, 0.0), (20, -0.3)):
        noise = rng.normal(0, 0.05, size=t.size)
        rows += [{"k": k, "set": "A", "t": i, "v": base[i] + shift + noise[i]} for i in t]
        rows += [{"k": k, "set": "B", "t": i, "v": base[i]} for i in t]
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # order must not matter: pairs are by unit
    out = stats.paired_differences(frame, value="v", between="set", a="A", b="B", unit="t", by=["k"]).set_index("k")
    assert out.loc[5, "verdict"] == "a higher" and out.loc[20, "verdict"] == "b higher"
    assert out.loc[10, "verdict"] == "no difference resolved" and out.loc[10, "low"] < 0 < out.loc[10, "high"]
    assert out.loc[5, "diff"] == pytest.approx(0.3, abs=0.03) and (out.n == 30).all()
    with pytest.raises(ValueError, match="same t"):
        stats.paired_differences(frame[~((frame.set == "B") & (frame.t == 3))], value="v", between="set", a="A",
                                 b="B", unit="t", by=["k"])


def test_against_reference_measures_a_curve_against_each_units_limit() -> None:
    rng = np.random.default_rng(5)
    units = np.arange(12)
    limit = rng.uniform(1.0, 3.0, units.size)  # each unit's own converged value
    rows = [{"tau": tau, "t": t, "err": limit[t] * (1 + tau) + rng.normal(0, 1e-4)} for tau in (0.0, 0.5, 2.0)
            for t in units]
    frame = pd.DataFrame(rows)
    out = stats.against_reference(frame, value="err", unit="t", by="tau", reference=dict(enumerate(limit)),
                                  relative=True).set_index("tau")
    assert out.loc[0.0, "mean"] == pytest.approx(1.0, abs=1e-3) and out.loc[2.0, "low"] > 2.9
    assert out.loc[0.5, "low"] <= 1.5 <= out.loc[0.5, "high"] + 1e-3 and (out.n == 12).all()
    diff = stats.against_reference(frame, value="err", unit="t", by="tau", reference=pd.Series(limit))
    assert diff.set_index("tau").loc[0.0, "high"] < 1e-3
    with pytest.raises(ValueError, match="no value"):
        stats.against_reference(frame, value="err", unit="t", by="tau", reference={0: 1.0})


def test_one_way_effect_sizes_and_p_values() -> None:
    rng = np.random.default_rng(0)
    groups = [rng.normal(mu, 1.0, size=n) for mu, n in ((0.0, 12), (0.5, 15), (1.5, 9))]
    r = stats.one_way(groups)
    pooled = np.concatenate(groups)
    ss_b = sum(g.size * (g.mean() - pooled.mean()) ** 2 for g in groups)
    ss_t = ((pooled - pooled.mean()) ** 2).sum()
    assert r.eta_sq == pytest.approx(ss_b / ss_t, rel=1e-12)
    assert r.anova_p == pytest.approx(st.f_oneway(*groups).pvalue, rel=1e-12)
    h = st.kruskal(*groups).statistic
    assert r.kruskal_h == pytest.approx(h, rel=1e-12)
    assert r.epsilon_sq == pytest.approx(h * (pooled.size + 1) / (pooled.size ** 2 - 1), rel=1e-12)
    assert (r.k, r.n) == (3, pooled.size)
    # no effect: identical distributions give small effect sizes
    same = stats.one_way([rng.normal(0, 1, 200) for _ in range(4)])
    assert same.eta_sq < 0.05 and same.epsilon_sq < 0.05


def test_one_way_refuses_undefined_tests() -> None:
    with pytest.raises(ValueError, match="two groups"):
        stats.one_way([[1.0, 2.0]])
    with pytest.raises(ValueError, match="fewer than two"):
        stats.one_way([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="same"):
        stats.one_way([[1.0, 1.0], [1.0, 1.0]])


def test_one_way_table_slices_and_drops_nan() -> None:
    frame = pd.DataFrame({"regime": ["a"] * 6 + ["b"] * 6, "value": [1, 1, 1, 2, 2, 2] * 2,
                          "rho": [0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 0.5, 0.4, float("nan"), 0.5, 0.6, 0.4]})
    t = stats.one_way_table(frame, "rho", "value", ["regime"])
    assert list(t["regime"]) == ["a", "b"]
    assert t.loc[0, "eta_sq"] > 0.9 and t.loc[1, "n_dropped"] == 1 and t.loc[1, "n"] == 5


def test_paper_anova_across_depths_reproduces_the_published_arrays() -> None:
    """STUDY.md §3 item 4: a one-way ANOVA of |ρ| across depths in the L2 regime gives p ≈ 2e-9."""
    runs = paper_data.iris_runs()
    t = stats.one_way_table(runs[runs["sweep"] == "depth"], "abs_spearman", "value", ["regime"])
    p = float(t.loc[t["regime"] == "l2", "anova_p"].iloc[0])
    assert 1e-9 < p < 3e-9
