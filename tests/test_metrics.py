"""helpers.metrics: equal to scipy and to hand computations; bootstrap coverage; the noise ceiling."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

from helpers import metrics as M


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    return a, 0.7 * a + rng.normal(size=40)


def test_correlations_equal_scipy_for_numpy_and_torch(pair):
    a, b = pair
    assert M.pearson(a, b) == st.pearsonr(a, b).statistic
    assert M.spearman(a, b) == st.spearmanr(a, b).statistic
    assert M.kendall(a, b) == st.kendalltau(a, b).statistic
    assert M.pearson(torch.tensor(a), torch.tensor(b, dtype=torch.float32)) == pytest.approx(M.pearson(a, b), abs=1e-6)


def test_metrics_by_hand():
    a, b = [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]
    assert M.pearson(a, b) == pytest.approx(0.5, abs=1e-15)  # cov 1 / sqrt(2 · 2)
    assert M.spearman(a, b) == pytest.approx(0.5, abs=1e-15)
    assert M.kendall(a, [3.0, 1.0, 2.0]) == pytest.approx(-1 / 3, abs=1e-15)  # 1 concordant, 2 discordant pairs
    assert M.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == 1.0  # monotone
    assert M.sign_agreement([1, -1, 2, 0], [2, 1, 3, 0]) == 0.75
    assert M.top_k_overlap([5, -4, 3, 2, 1], [1, 2, 3, -4, 5], 2) == 0.0
    assert M.top_k_overlap([5, -4, 3, 2, 1], [1, 2, 3, -4, 5], 3) == pytest.approx(1 / 3)
    assert M.top_k_overlap([5, -4, 3], [-50, 4, 0.3], 2) == 1.0  # by magnitude, sign ignored
    assert M.relative_error([1.0, 1.0], [1.0, 0.0]) == 1.0
    assert M.relative_error([3.0, 4.0], [3.0, 4.0]) == 0.0


def test_bad_inputs_raise_named_errors():
    with pytest.raises(ValueError, match="same shape"):
        M.pearson([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="b has 1 non-finite"):
        M.spearman([1, 2, 3], [1, np.nan, 3])
    with pytest.raises(ValueError, match="a is constant"):
        M.kendall([2, 2, 2, 2], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="1-D"):
        M.pearson(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="true is all zeros"):
        M.relative_error([1, 2], [0, 0])
    with pytest.raises(ValueError, match="k must be"):
        M.top_k_overlap([1, 2, 3], [1, 2, 3], 4)
    with pytest.raises(ValueError, match="unknown metric"):
        M.bootstrap_ci("r2", [1, 2, 3], [1, 2, 4])


def test_bootstrap_ci_is_scipys_paired_bootstrap(pair):
    a, b = pair
    est, low, high = M.bootstrap_ci("spearman", a, b, n_resamples=300, seed=3)
    ref = st.bootstrap((a, b), lambda u, v: st.spearmanr(u, v).statistic, paired=True, vectorized=False,
                       n_resamples=300, rng=np.random.default_rng(3))
    assert est == M.spearman(a, b)
    assert low == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert high == pytest.approx(ref.confidence_interval.high, abs=1e-12)
    # a callable metric takes the non-vectorised path and gives the same interval
    _, low2, high2 = M.bootstrap_ci(M.spearman, a, b, n_resamples=300, seed=3)
    assert (low2, high2) == pytest.approx((low, high), abs=1e-12)
    assert low < est < high


def test_bootstrap_ci_covers_the_true_correlation():
    # 200 bivariate-normal datasets with known ρ: the 95 % interval should cover ρ in ~95 % of them.
    rho, n, sims = 0.5, 50, 200
    rng = np.random.default_rng(2024)
    cov = [[1.0, rho], [rho, 1.0]]
    covered = 0
    for s in range(sims):
        a, b = rng.multivariate_normal([0.0, 0.0], cov, size=n).T
        _, low, high = M.bootstrap_ci("pearson", a, b, n_resamples=400, seed=s)
        covered += low <= rho <= high
    # binomial(200, 0.95): sd 1.5 %; allow 3 sd below (bootstrap intervals run slightly narrow at n = 50)
    assert 0.95 - 3 * np.sqrt(0.95 * 0.05 / sims) <= covered / sims <= 1.0
    assert covered / sims < 0.995  # and they are not trivially wide


def test_summarize_collects_every_metric(pair):
    a, b = pair
    out = M.summarize(torch.tensor(a), b, k=5, n_resamples=200)
    assert out["n"] == 40 and out["k"] == 5
    for name, value in [("pearson", M.pearson(a, b)), ("spearman", M.spearman(a, b)), ("kendall", M.kendall(a, b)),
                        ("sign_agreement", M.sign_agreement(a, b)), ("top_k_overlap", M.top_k_overlap(a, b, 5)),
                        ("relative_error", M.relative_error(a, b))]:
        assert out[name] == value
        assert out[f"{name}_low"] <= out[f"{name}_high"]


def test_noise_ceiling_recovers_known_reliability():
    # Δ_true[s, i] = T_i + e_si with var(T) = 1, var(e) = 4, k = 5 seeds:
    # r_1 = 1 / (1 + 4) = 0.2, r_5 = 1 / (1 + 4/5) = 5/9.
    rng = np.random.default_rng(7)
    k, n = 5, 5000
    signal = rng.normal(size=n)
    delta = signal + 2.0 * rng.normal(size=(k, n))
    nc = M.noise_ceiling(torch.tensor(delta))
    assert nc.reliability == pytest.approx(5 / 9, abs=0.03)
    assert nc.reliability_single == pytest.approx(0.2, abs=0.02)
    assert nc.noise_var == pytest.approx(4.0, rel=0.03) and nc.signal_var == pytest.approx(1.0, rel=0.1)
    # Spearman–Brown links the two reliabilities exactly
    r1 = nc.reliability_single
    assert nc.reliability == pytest.approx(k * r1 / (1 + (k - 1) * r1), abs=1e-12)
    # the perfect estimator (the signal itself) reaches the ceiling, not 1
    assert M.pearson(signal, delta.mean(0)) == pytest.approx(nc.ceiling, abs=0.02)
    assert M.pearson(signal, delta[0]) == pytest.approx(nc.ceiling_single, abs=0.03)


def test_noise_ceiling_consistency_form_ignores_seed_offsets():
    # the same signal and noise as above, plus a large offset per seed (var 25): a correlation does not see it
    rng = np.random.default_rng(7)
    k, n = 5, 5000
    signal = rng.normal(size=n)
    noisy = signal + 2.0 * rng.normal(size=(k, n))
    shifted = noisy + 5.0 * rng.normal(size=(k, 1))
    c0, c1 = M.noise_ceiling(noisy), M.noise_ceiling(shifted)
    assert c1.reliability == pytest.approx(c0.reliability, abs=1e-9)  # offsets cancel exactly in MS_error
    assert c1.reliability == pytest.approx(5 / 9, abs=0.03)
    assert M.pearson(signal, shifted.mean(0)) == pytest.approx(c1.ceiling, abs=0.02)
    assert M.pearson(signal, shifted[0]) == pytest.approx(c1.ceiling_single, abs=0.03)
    # the one-way (agreement) form counts the offsets (variance 25) as noise within points, and no ceiling is left
    a1 = M.noise_ceiling(shifted, form="agreement")
    assert a1.noise_var > 2 * c1.noise_var and a1.ceiling < 0.5 * c1.ceiling
    with pytest.raises(ValueError, match="consistency"):
        M.noise_ceiling(noisy, form="icc")


def test_noise_ceiling_without_signal_and_bad_shapes():
    rng = np.random.default_rng(1)
    nc = M.noise_ceiling(rng.normal(size=(4, 3000)))  # pure noise
    assert abs(nc.reliability) < 0.15 and nc.ceiling < 0.4
    with pytest.raises(ValueError, match="n_seeds >= 2"):
        M.noise_ceiling(np.ones((1, 10)))
    with pytest.raises(ValueError, match="non-finite"):
        M.noise_ceiling(np.array([[1.0, np.inf], [1.0, 2.0]]))


def test_mean_abs_inflates_scattered_correlations():
    out = M.mean_abs_vs_signed([0.5, -0.5])
    assert out["mean_signed"] == 0.0 and out["mean_abs"] == 0.5 and out["fraction_negative"] == 0.5
    out = M.mean_abs_vs_signed(torch.tensor([0.3, 0.1, -0.2, 0.4]))
    assert out["mean_signed"] == pytest.approx(0.15) and out["mean_abs"] == pytest.approx(0.25)
    assert out["inflation"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        M.mean_abs_vs_signed([1.5])


def test_rank_resolution_and_pointwise_error_by_hand():
    # sorted 1, 1.1, 2, 4: gaps 0.1/1.1, 0.9/2, 2/4 -> median 0.45
    assert M.rank_resolution([4.0, 1.0, 2.0, 1.1]) == pytest.approx(0.45)
    assert M.rank_resolution(np.array([-2.0, 2.0])) == pytest.approx(2.0)  # a sign change is a full gap and more
    assert M.pointwise_error([1.1, 2.0, 5.0, 0.3], [1.0, 2.0, 4.0, 0.0]) == pytest.approx(0.1)  # 0 skipped
    with pytest.raises(ValueError, match="at least 2"):
        M.rank_resolution([1.0])
    with pytest.raises(ValueError, match="all zeros"):
        M.pointwise_error([1.0, 2.0], [0.0, 0.0])


def test_errors_above_the_rank_resolution_cost_spearman():
    rng = np.random.default_rng(0)
    true = np.sort(rng.uniform(1.0, 1.5, 50))  # tightly clustered values
    noisy = true * (1 + 0.05 * rng.standard_normal(50))
    assert M.pointwise_error(noisy, true) > M.rank_resolution(true)
    assert M.spearman(noisy, true) < 0.99 < M.pearson(np.r_[noisy, 10.0], np.r_[true, 10.0])


def test_holm_adjustment_by_hand() -> None:
    from helpers.stats import holm

    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06 (monotone), 0.5; NaN is left out of m
    got = holm([0.03, 0.01, np.nan, 0.5, 0.02])
    np.testing.assert_allclose(got, [0.06, 0.04, np.nan, 0.5, 0.06])
    assert holm([0.9, 0.8]).tolist() == [1.0, 1.0]


def test_slope_is_the_least_squares_slope_of_estimate_on_truth():
    """Against the closed form cov(pred, true) / var(true): 1 for the truth itself, 2.5 for it scaled, whatever the
    offset; undefined for a constant truth."""
    rng = np.random.default_rng(0)
    true = rng.normal(size=30)
    pred = 0.7 * true + 0.1 * rng.normal(size=30) + 3.0
    closed = np.cov(pred, true)[0, 1] / np.var(true, ddof=1)
    assert M.slope(pred, true) == pytest.approx(closed, rel=1e-12)
    assert M.slope(true, true) == pytest.approx(1.0, rel=1e-12)
    assert M.slope(2.5 * true - 1.0, true) == pytest.approx(2.5, rel=1e-12)
    assert M.slope(torch.as_tensor(pred), torch.as_tensor(true)) == pytest.approx(closed, rel=1e-12)
    with pytest.raises(ValueError, match="true is constant"):
        M.slope(pred, np.ones(30))
    est, low, high = M.bootstrap_ci(M.slope, pred, true, n_resamples=500)
    assert low < est < high and est == pytest.approx(closed, rel=1e-12)
