"""Statistics of a pairwise study: win/tie/loss shares with bootstrap intervals, and agreement.

Pure functions on plain data. Choices are ``"a"`` (method A better), ``"tie"`` and ``"b"``; a "win" is
always from method A's point of view.

- Shares are pooled over all votes of a criterion. Their interval is a percentile bootstrap that
  resamples *pairs* (with all of a pair's votes), because votes of several annotators on one pair are
  not independent.
- Agreement is measured on the pairs judged by at least two annotators, from per-pair category counts
  ``[n_items, 3]``: raw pairwise percent agreement, Fleiss' kappa (the variable-raters form, where
  each item's agreement is averaged over its own raters) and Krippendorff's alpha for nominal data
  (which handles a different number of raters per item by construction).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

CATEGORIES = ("a", "tie", "b")


def counts_by_item(votes: Iterable[tuple[str, str]]) -> dict[str, np.ndarray]:
    """``(item, choice)`` pairs -> per-item counts ``[3]`` in the order of ``CATEGORIES``."""
    counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(CATEGORIES), dtype=np.int64))
    for item, choice in votes:
        counts[item][CATEGORIES.index(choice)] += 1
    return dict(counts)


def shares_with_ci(
    item_counts: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, object]:
    """Win/tie/loss shares of ``item_counts [n_items, 3]`` with a pair-level percentile bootstrap CI.

    Returns ``{"n_votes", "n_pairs", "counts": {a, tie, b}, "win", "tie", "loss", "win_ci", "tie_ci",
    "loss_ci"}``; shares and intervals are None when there is no vote.
    """
    item_counts = np.asarray(item_counts, dtype=np.float64).reshape(-1, len(CATEGORIES))
    totals = item_counts.sum(axis=0)
    n_votes = int(totals.sum())
    result: dict[str, object] = {
        "n_votes": n_votes,
        "n_pairs": int(item_counts.shape[0]),
        "counts": {name: int(count) for name, count in zip(CATEGORIES, totals, strict=True)},
    }
    names = ("win", "tie", "loss")  # same order as CATEGORIES: a, tie, b
    if n_votes == 0:
        result.update({name: None for name in names} | {f"{name}_ci": None for name in names})
        return result
    shares = totals / n_votes
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, item_counts.shape[0], size=(n_boot, item_counts.shape[0]))  # [B, n_items]
    boot_totals = item_counts[picks].sum(axis=1)  # [B, 3]
    boot_shares = boot_totals / boot_totals.sum(axis=1, keepdims=True)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot_shares, [tail, 100 - tail], axis=0)
    for index, name in enumerate(names):
        result[name] = float(shares[index])
        result[f"{name}_ci"] = [float(low[index]), float(high[index])]
    return result


def percent_agreement(item_counts: np.ndarray) -> float | None:
    """Share of agreeing annotator pairs, pooled over items with at least two ratings."""
    counts = _multi_rated(item_counts)
    raters = counts.sum(axis=1)
    pairs = float((raters * (raters - 1)).sum())
    return None if pairs == 0 else float((counts * (counts - 1)).sum() / pairs)


def fleiss_kappa(item_counts: np.ndarray) -> float | None:
    """Fleiss' kappa of ``item_counts [n_items, n_categories]`` (items with fewer than two ratings dropped).

    None when undefined: no item with two ratings, or every rating in one category (chance agreement 1).
    """
    counts = _multi_rated(item_counts)
    if counts.shape[0] == 0:
        return None
    raters = counts.sum(axis=1)
    per_item = ((counts * (counts - 1)).sum(axis=1)) / (raters * (raters - 1))
    observed = per_item.mean()
    category_shares = counts.sum(axis=0) / raters.sum()
    chance = float((category_shares**2).sum())
    return None if chance >= 1.0 else float((observed - chance) / (1.0 - chance))


def krippendorff_alpha_nominal(item_counts: np.ndarray) -> float | None:
    """Krippendorff's alpha (nominal) from per-item category counts; None when undefined.

    ``alpha = 1 - (n - 1) * sum_u (m_u^2 - sum_c n_uc^2) / (m_u - 1) / (n^2 - sum_c n_c^2)`` over the
    pairable items u (m_u >= 2 ratings), with n the number of pairable ratings and n_c their category totals.
    """
    counts = _multi_rated(item_counts)
    if counts.shape[0] == 0:
        return None
    raters = counts.sum(axis=1)
    n = raters.sum()
    disagreement = ((raters**2 - (counts**2).sum(axis=1)) / (raters - 1)).sum()
    expected = n**2 - (counts.sum(axis=0) ** 2).sum()
    return None if expected == 0 else float(1.0 - (n - 1) * disagreement / expected)


def _multi_rated(item_counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(item_counts, dtype=np.float64)
    counts = counts.reshape(-1, counts.shape[-1]) if counts.size else np.zeros((0, len(CATEGORIES)))
    return counts[counts.sum(axis=1) >= 2]


def agreement(item_counts: np.ndarray) -> dict[str, object]:
    counts = _multi_rated(item_counts)
    return {
        "n_items": int(counts.shape[0]),
        "n_ratings": int(counts.sum()),
        "percent_agreement": percent_agreement(counts),
        "fleiss_kappa": fleiss_kappa(counts),
        "krippendorff_alpha": krippendorff_alpha_nominal(counts),
    }


def summarise(
    votes: Sequence[tuple[str, str, str]],
    criteria: Sequence[str],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, object]]:
    """``(pair_id, criterion, choice)`` votes of one comparison -> per criterion shares and agreement."""
    result: dict[str, dict[str, object]] = {}
    for offset, criterion in enumerate(criteria):
        by_item = counts_by_item((pair, choice) for pair, crit, choice in votes if crit == criterion)
        matrix = np.array(list(by_item.values())).reshape(-1, len(CATEGORIES))
        # A distinct stream per criterion keeps each interval reproducible on its own.
        result[criterion] = {
            "shares": shares_with_ci(matrix, n_boot=n_boot, seed=seed + offset),
            "agreement": agreement(matrix),
        }
    return result
