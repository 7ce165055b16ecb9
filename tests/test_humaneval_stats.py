"""Win/tie/loss shares, bootstrap intervals and agreement statistics against published worked examples."""

import numpy as np
import pytest

from cgrpo.humaneval.stats import (
    agreement,
    counts_by_item,
    fleiss_kappa,
    krippendorff_alpha_nominal,
    percent_agreement,
    shares_with_ci,
    summarise,
)


def test_fleiss_kappa_matches_the_classic_worked_example():
    # Fleiss (1971) as reproduced on Wikipedia: 10 items, 14 raters, 5 categories, kappa = 0.210.
    counts = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )
    assert fleiss_kappa(counts) == pytest.approx(0.2099, abs=5e-4)


def test_krippendorff_alpha_matches_krippendorffs_nominal_example_with_missing_values():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers, 12 units with
    # missing values (unit 12 has one value and is not pairable); nominal alpha = 0.743.
    observers = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    counts = np.zeros((12, 5))
    for values in observers:
        for unit, value in enumerate(values):
            if value is not None:
                counts[unit, value - 1] += 1
    assert krippendorff_alpha_nominal(counts) == pytest.approx(0.743, abs=5e-4)


def test_percent_agreement_counts_agreeing_rater_pairs():
    # item 1: three "a": 3 of 3 rater pairs agree; item 2: a and b: 0 of 1; item 3: one rating, dropped.
    counts = np.array([[3, 0, 0], [1, 0, 1], [0, 1, 0]])
    assert percent_agreement(counts) == pytest.approx(3 / 4)
    result = agreement(counts)
    assert result["n_items"] == 2 and result["n_ratings"] == 5


def test_agreement_is_undefined_without_shared_items_or_variation():
    single_ratings = np.array([[1, 0, 0], [0, 0, 1]])
    assert fleiss_kappa(single_ratings) is None
    assert krippendorff_alpha_nominal(single_ratings) is None
    assert percent_agreement(single_ratings) is None
    everyone_says_a = np.array([[2, 0, 0], [3, 0, 0]])
    assert fleiss_kappa(everyone_says_a) is None
    assert krippendorff_alpha_nominal(everyone_says_a) is None
    assert percent_agreement(everyone_says_a) == 1.0


def test_perfect_and_systematic_disagreement():
    perfect = np.array([[2, 0, 0], [0, 2, 0], [0, 0, 2], [2, 0, 0]])
    assert fleiss_kappa(perfect) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal(perfect) == pytest.approx(1.0)
    opposed = np.array([[1, 0, 1]] * 6)
    assert fleiss_kappa(opposed) < 0
    assert krippendorff_alpha_nominal(opposed) < 0


def test_shares_and_bootstrap_interval():
    rng = np.random.default_rng(3)
    # 200 pairs x 3 annotators; A preferred with probability 0.5, tie 0.3, B 0.2
    choices = rng.choice(3, p=[0.5, 0.3, 0.2], size=(200, 3))
    counts = np.stack([(choices == k).sum(axis=1) for k in range(3)], axis=1)
    result = shares_with_ci(counts, n_boot=1000, seed=0)
    assert result["n_votes"] == 600 and result["n_pairs"] == 200
    assert result["win"] + result["tie"] + result["loss"] == pytest.approx(1.0)
    assert result["counts"] == {
        "a": int(counts[:, 0].sum()),
        "tie": int(counts[:, 1].sum()),
        "b": int(counts[:, 2].sum()),
    }
    for name in ("win", "tie", "loss"):
        low, high = result[f"{name}_ci"]
        assert low < result[name] < high
        assert 0.03 < high - low < 0.15  # ~ 2 x 1.96 x sqrt(p(1-p)/600)
    assert result == shares_with_ci(counts, n_boot=1000, seed=0)  # seeded: reproducible
    assert result["win_ci"] != shares_with_ci(counts, n_boot=1000, seed=1)["win_ci"]


def test_bootstrap_resamples_pairs_not_votes():
    # Every pair is unanimous (4 votes for one side): votes within a pair are perfectly correlated, so the
    # pair-level interval must be about twice as wide as a vote-level one would be.
    counts = np.array([[4, 0, 0]] * 25 + [[0, 0, 4]] * 25)
    result = shares_with_ci(counts, n_boot=2000, seed=0)
    low, high = result["win_ci"]
    vote_level_width = 2 * 1.96 * np.sqrt(0.25 / 200)
    assert high - low > 1.6 * vote_level_width


def test_no_votes_gives_empty_shares():
    result = shares_with_ci(np.zeros((0, 3)))
    assert result["n_votes"] == 0 and result["win"] is None and result["win_ci"] is None


def test_summarise_groups_votes_by_criterion_and_pair():
    votes = [
        ("p1", "identity", "a"),
        ("p1", "identity", "a"),
        ("p2", "identity", "b"),
        ("p1", "prompt", "tie"),
    ]
    assert {k: list(v) for k, v in counts_by_item([("p1", "a"), ("p1", "tie")]).items()} == {"p1": [1, 1, 0]}
    result = summarise(votes, ["identity", "prompt", "overall"], n_boot=200, seed=0)
    assert result["identity"]["shares"]["counts"] == {"a": 2, "tie": 0, "b": 1}
    assert result["identity"]["agreement"]["n_items"] == 1  # only p1 has two ratings
    assert result["prompt"]["shares"]["tie"] == 1.0
    assert result["overall"]["shares"]["n_votes"] == 0
