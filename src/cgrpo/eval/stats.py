"""Small pure statistics for evaluation tables and analyses: bootstrap intervals, correlations, Pareto fronts,
pairwise-vote summaries. Every random quantity takes an explicit seed, so tables are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval (NaN bounds when it is undefined)."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self, name: str = "mean") -> dict[str, float | int]:
        return {name: self.value, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """``[N]`` -> the finite entries as float64 (failed scores are NaN and left out, as the trainer does)."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    return array[np.isfinite(array)]


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Mean of ``values [N]`` with a percentile-bootstrap interval over i.i.d. resamples of the values.

    The percentile method (not scipy's default BCa) because BCa is undefined for constant samples, which
    happen with saturated rewards. With fewer than two finite values the bounds are NaN.
    """
    data = finite(values)
    if len(data) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    mean = float(data.mean())
    if len(data) < 2:
        return Interval(mean, float("nan"), float("nan"), 1)
    result = stats.bootstrap(
        (data,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    # Percentiles of resampled means can sit a rounding error off a constant sample's mean.
    return Interval(mean, float(min(low, mean)), float(max(high, mean)), len(data))


def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"correlation needs paired samples, got {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _coefficient(x: np.ndarray, y: np.ndarray, method: str) -> float:
    # A constant input has no correlation; scipy warns and returns NaN, which is what we report.
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    if method == "pearson":
        return float(stats.pearsonr(x, y).statistic)
    if method == "spearman":
        return float(stats.spearmanr(x, y).statistic)
    raise ValueError(f"correlation method must be 'pearson' or 'spearman', got {method!r}")


def _rowwise_coefficient(x: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """Coefficient of each row of ``x, y [R, N]`` at once (thousands of resamples in milliseconds):
    Pearson's formula, on average ranks for Spearman (what ``spearmanr`` computes). NaN for constant rows."""
    if method == "spearman":
        x, y = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (x * y).sum(axis=1) / denominator, np.nan)


def correlation(
    x: Sequence[float],
    y: Sequence[float],
    method: str = "pearson",
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Pearson or Spearman coefficient of paired ``x [N]``, ``y [N]`` (scipy's), with a paired percentile
    bootstrap interval (pairs resampled together). Pairs with a non-finite member are dropped."""
    x, y = _paired(x, y)
    n = len(x)
    value = _coefficient(x, y, method) if n >= 2 else float("nan")
    if n < 3 or not np.isfinite(value):
        return Interval(value, float("nan"), float("nan"), n)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    samples = _rowwise_coefficient(x[draws], y[draws], method)
    samples = samples[np.isfinite(samples)]  # resamples that happen to be constant
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return Interval(value, float(low), float(high), n)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are to be maximised, sorted by x.

    A point is dominated when another is at least as good on both axes and strictly better on one;
    duplicates of a front point are all kept. Points with a NaN coordinate are never on the front.
    """
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    front = []
    for i, (x, y) in enumerate(array):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        others = np.delete(array, i, axis=0)
        others = others[np.isfinite(others).all(axis=1)]
        dominated = (others[:, 0] >= x) & (others[:, 1] >= y) & ((others[:, 0] > x) | (others[:, 1] > y))
        if not dominated.any():
            front.append(i)
    return sorted(front, key=lambda i: (array[i, 0], -array[i, 1]))


def win_rate(wins: float, losses: float, ties: float) -> float:
    """Share of comparisons won, a tie counting half: ``(wins + ties / 2) / (wins + losses + ties)``."""
    total = wins + losses + ties
    return (wins + 0.5 * ties) / total if total else float("nan")
