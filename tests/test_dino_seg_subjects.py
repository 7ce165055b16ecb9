"""DINO-Seg with several subjects per image: optimal assignment of detections; K = 1 equals today."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cgrpo.rewards import build
from cgrpo.rewards.dino_seg import assign, box_mask, non_max_suppression


def random_images(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 3, height, width), dtype=np.uint8)
    return torch.from_numpy(pixels).float() / 255


# -- the pure assignment ----------------------------------------------------------------------------------


def brute_force_best(similarity: np.ndarray) -> float:
    """The best total similarity over every one-to-one matching of min(D, K) pairs."""
    d, k = similarity.shape
    if d == 0 or k == 0:
        return 0.0
    if d >= k:
        return max(
            sum(similarity[rows[j], j] for j in range(k)) for rows in itertools.permutations(range(d), k)
        )
    return max(sum(similarity[i, cols[i]] for i in range(d)) for cols in itertools.permutations(range(k), d))


def test_assignment_beats_greedy_and_never_reuses_a_detection():
    # Greedy (best pair first) gives detection 0 to subject 0 (0.9) and leaves subject 1 with 0.1;
    # the optimum swaps them: 0.85 + 0.8.
    similarity = np.array([[0.9, 0.8], [0.85, 0.1]])
    result = assign(similarity)
    assert result.detection.tolist() == [1, 0]
    np.testing.assert_allclose(result.scores, [0.85, 0.8])
    assert result.missing == 0 and result.confused == 1  # both detections look most like subject 0

    one = assign(np.array([[0.7, 0.6]]))  # one detection, two subjects: the weaker one is missing
    assert one.detection.tolist() == [0, -1] and one.scores.tolist() == [0.7, 0.0] and one.missing == 1
    nothing = assign(np.zeros((0, 3)))
    assert nothing.missing == 3 and nothing.scores.tolist() == [0, 0, 0] and nothing.confused == 0
    with pytest.raises(ValueError, match=r"\[D, K\]"):
        assign(np.zeros(3))


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 4).flatmap(
        lambda d: st.integers(1, 4).flatmap(
            lambda k: arrays(np.float64, (d, k), elements=st.floats(-1, 1, allow_nan=False))
        )
    )
)
def test_assignment_is_optimal_one_to_one_and_counts_match_their_definitions(similarity):
    d, k = similarity.shape
    result = assign(similarity)
    used = result.detection[result.detection >= 0]
    assert len(set(used.tolist())) == len(used) == min(d, k)  # each detection at most once
    assert result.missing == k - min(d, k)
    for j in range(k):
        expected = similarity[result.detection[j], j] if result.detection[j] >= 0 else 0.0
        assert result.scores[j] == expected
    assert result.scores.sum() == pytest.approx(brute_force_best(similarity), abs=1e-9)
    best = [int(np.argmax(row)) for row in similarity]
    assert result.confused == sum(best.count(j) >= 2 for j in range(k))


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=float)
    assert non_max_suppression(boxes, np.array([0.5, 0.9, 0.4]), 0.5) == [1, 2]
    assert non_max_suppression(boxes, np.array([0.5, 0.9, 0.4]), 0.95) == [1, 0, 2]


# -- the reward on tiny random models ---------------------------------------------------------------------


def test_one_subject_scores_equal_the_single_subject_reward_exactly(seg_models):
    images, references = random_images(5, 48, 64, seed=1), random_images(5, 40, 40, seed=2)
    prompts, classes = ["a dog"] * 5, ["dog", "cat", "dog", "backpack", "toy"]
    single = build("dino_seg", **seg_models, batch_size=3)(images, references, prompts, classes)
    reward = build("dino_seg", **seg_models, batch_size=3)
    joint = reward.score_subjects(images, [references], prompts, [classes])
    assert joint.shape == (5, 1)
    assert torch.equal(joint[:, 0], single)
    assert all(d["missing"] == 0 for d in reward.last_assignment())

    # Nothing detected: the whole image stands in, exactly as the single-subject fallback.
    strict = dict(seg_models, box_threshold=1.01)
    single = build("dino_seg", **strict)(images, references, prompts, classes)
    reward = build("dino_seg", **strict)
    assert torch.equal(reward.score_subjects(images, [references], prompts, [classes])[:, 0], single)
    assert all(d["fallback"] and d["missing"] == 0 for d in reward.last_assignment())
    assert reward.stats["fallbacks"] == reward.stats["images"] == 10  # 5 images, 5 references


def test_two_subjects_are_scored_by_one_to_one_assignment(seg_models, monkeypatch):
    reward = build("dino_seg", **seg_models, batch_size=4)
    images = random_images(3, 48, 64, seed=3)
    first, second = random_images(3, 32, 32, seed=4), random_images(3, 40, 24, seed=5)
    prompts = ["a dog and a cat"] * 3
    classes = [["dog"] * 3, ["cat", "dog", "cat"]]
    scores = reward.score_subjects(images, [first, second], prompts, classes)
    assert scores.shape == (3, 2) and torch.isfinite(scores).all() and (scores.abs() <= 1 + 1e-5).all()
    diagnostics = reward.last_assignment()
    assert len(diagnostics) == 3
    for row, d in zip(scores, diagnostics, strict=True):
        assigned = [i for i in d["detection"] if i >= 0]
        assert len(set(assigned)) == len(assigned)  # no detection used twice
        assert d["missing"] == sum(i < 0 for i in d["detection"])
        assert all(row[j] == 0 for j, i in enumerate(d["detection"]) if i < 0)

    # An image whose own pixels are the first reference, with one box found per query: that box goes to
    # the first subject with similarity 1, and the other subject, with no box left, is missing.
    whole = [0.0, 0.0, 64.0, 48.0]
    monkeypatch.setattr(reward, "detect_all", lambda imgs, queries, limit, iou: [[(whole, 0.9)]] * len(imgs))
    monkeypatch.setattr(reward, "segment", box_masks)
    monkeypatch.setattr(reward, "detect", lambda imgs, queries: [[0.0, 0.0, i.width, i.height] for i in imgs])
    scores = reward.score_subjects(images[:1], [images[:1], second[:1]], prompts[:1], [["dog"], ["cat"]])
    assert scores[0, 0].item() == pytest.approx(1.0, abs=1e-5) and scores[0, 1].item() == 0.0
    assert reward.last_assignment()[0]["missing"] == 1 and reward.last_assignment()[0]["detections"] == 1

    # Two copies of the first subject (two distinct boxes, both most like reference 0): one subject
    # confused, and the second subject gets the leftover detection.
    left, right = [0.0, 0.0, 32.0, 48.0], [32.0, 0.0, 64.0, 48.0]
    twin = torch.cat([images[:1, :, :, :32], images[:1, :, :, :32]], dim=-1)
    monkeypatch.setattr(
        reward, "detect_all", lambda imgs, queries, limit, iou: [[(left, 0.9), (right, 0.8)]] * len(imgs)
    )
    reference = twin[:, :, :, :32]
    reward.score_subjects(twin, [reference, second[:1]], prompts[:1], [["dog"], ["cat"]])
    (d,) = reward.last_assignment()
    assert d["confused"] == 1 and d["missing"] == 0 and sorted(d["detection"]) == [0, 1]


def box_masks(images, boxes):
    """A stand-in for SAM: the mask is the prompt box itself."""
    return [box_mask(box, image.height, image.width) for image, box in zip(images, boxes, strict=True)]


def test_bad_subject_batches_are_refused(seg_models):
    reward = build("dino_seg", **seg_models)
    images = random_images(2, 32, 32, seed=6)
    with pytest.raises(ValueError, match="subject 1"):
        reward.score_subjects(images, [images, images[:1]], ["a", "b"], [["dog"] * 2, ["cat"] * 2])
    with pytest.raises(ValueError, match="lists of classes"):
        reward.score_subjects(images, [images, images], ["a", "b"], [["dog"] * 2])
    assert reward.score_subjects(images[:0], [images[:0]] * 2, [], None).shape == (0, 2)
