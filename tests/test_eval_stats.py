"""Statistics behind the evaluation tables and analyses: bootstrap intervals, correlations, Pareto fronts."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from cgrpo.eval.stats import bootstrap_mean, correlation, pareto_front, win_rate


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        values = rng.normal(0.8, 0.1, size=n)
        interval = bootstrap_mean(values, n_resamples=1000, seed=0)
        assert interval.low <= interval.value <= interval.high
        assert interval.value == pytest.approx(values.mean())
        assert interval.n == n
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2]
    # The width follows the standard error: ~2 * 1.96 * sigma / sqrt(n).
    assert widths[2] == pytest.approx(2 * 1.96 * 0.1 / math.sqrt(2000), rel=0.2)


def test_bootstrap_is_seeded_and_skips_nan():
    values = [0.1, 0.5, float("nan"), 0.7, 0.9, 0.2]
    a, b = bootstrap_mean(values, seed=3), bootstrap_mean(values, seed=3)
    assert (a.low, a.high) == (b.low, b.high)
    assert a.n == 5 and a.value == pytest.approx(np.mean([0.1, 0.5, 0.7, 0.9, 0.2]))


def test_bootstrap_degenerate_samples():
    constant = bootstrap_mean([0.5] * 10)
    assert constant.low == constant.value == constant.high == 0.5
    single = bootstrap_mean([0.3])
    assert single.value == 0.3 and math.isnan(single.low)
    assert math.isnan(bootstrap_mean([]).value)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=2, max_size=40))
def test_bootstrap_interval_always_brackets_the_mean(values):
    interval = bootstrap_mean(values, n_resamples=200, seed=1)
    assert interval.low <= interval.value + 1e-9
    assert interval.value <= interval.high + 1e-9


def test_correlation_equals_scipy_on_synthetic_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=150)
    y = 0.6 * x + rng.normal(scale=0.8, size=150) + 0.2 * x**3
    pearson = correlation(x, y, "pearson", n_resamples=500, seed=0)
    spearman = correlation(x, y, "spearman", n_resamples=500, seed=0)
    assert pearson.value == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman.value == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    for interval in (pearson, spearman):
        assert interval.low < interval.value < interval.high
        assert interval.n == 150


def test_correlation_drops_nonfinite_pairs_and_handles_constants():
    x = [1.0, 2.0, 3.0, float("nan"), 5.0]
    y = [2.0, 4.1, 5.9, 1.0, 10.2]
    result = correlation(x, y, "pearson", n_resamples=100)
    assert result.n == 4
    assert result.value == pytest.approx(stats.pearsonr([1, 2, 3, 5], [2.0, 4.1, 5.9, 10.2]).statistic)
    assert math.isnan(correlation([1, 1, 1, 1], [1, 2, 3, 4]).value)
    with pytest.raises(ValueError, match="method"):
        correlation([1, 2, 3], [1, 2, 3], "kendall")


def test_pareto_front_on_a_known_set():
    points = [
        (0.76, 7.87),  # 0 base: dominated by 3
        (0.85, 4.47),  # 1 RPO: front (high identity)
        (0.86, 4.12),  # 2 naive 1:1: front (highest identity)
        (0.81, 8.32),  # 3 ours: front (highest prompt)
        (0.80, 7.56),  # 4 naive 1:1.5: dominated by 3
        (0.81, 8.32),  # 5 a duplicate of a front point: kept
        (float("nan"), 9.0),  # 6 undefined: never on the front
    ]
    assert pareto_front(points) == [3, 5, 1, 2]
    assert pareto_front([(1, 1)]) == [0]
    assert pareto_front([]) == []


def test_win_rate_counts_ties_half():
    assert win_rate(3, 1, 2) == pytest.approx(4 / 6)
    assert math.isnan(win_rate(0, 0, 0))


def test_resampled_coefficients_match_scipy_row_by_row():
    from cgrpo.eval.stats import _rowwise_coefficient

    rng = np.random.default_rng(2)
    x = rng.integers(0, 5, size=(6, 30)).astype(float)  # ties, as in ratings
    y = x + rng.normal(size=(6, 30))
    for method, scipy_fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        expected = [scipy_fn(a, b).statistic for a, b in zip(x, y, strict=True)]
        np.testing.assert_allclose(_rowwise_coefficient(x, y, method), expected, atol=1e-12)
