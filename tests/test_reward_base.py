"""BatchReward: the one batch check, empty-batch answer and no-grad scoring that every reward inherits."""

from __future__ import annotations

import pytest
import torch

from cgrpo.rewards import base as rewards
from cgrpo.rewards.base import BatchReward, RewardBatch


class _Brightness(BatchReward):
    """Mean pixel value of each image; remembers the batches it was given."""

    name = "brightness"
    weight = torch.ones((), requires_grad=True)  # without no_grad the scores would carry a gradient

    def __init__(self) -> None:
        self.batches: list[RewardBatch] = []

    def score_batch(self, batch: RewardBatch) -> torch.Tensor:
        self.batches.append(batch)
        return batch.images.mean(dim=(1, 2, 3)) * self.weight


def test_scores_a_checked_batch_without_gradients():
    reward = _Brightness()
    images = torch.full((2, 3, 4, 4), 0.25)
    images[1] = 0.75
    scores = reward(images, torch.zeros(2, 3, 4, 4), ("a", "b"), ("dog", "cat"))
    torch.testing.assert_close(scores, torch.tensor([0.25, 0.75]))
    assert not scores.requires_grad
    (batch,) = reward.batches
    assert batch.prompts == ["a", "b"] and batch.subjects == ["dog", "cat"]
    assert isinstance(reward, rewards.Reward)


def test_an_empty_batch_is_answered_without_scoring():
    reward = _Brightness()
    scores = reward(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4), [])
    assert scores.shape == (0,) and reward.batches == []


@pytest.mark.parametrize(
    ("references", "prompts", "subjects", "message"),
    [
        (3, 2, None, "2 images, 3 references, 2 prompts"),
        (2, 1, None, "2 images, 2 references, 1 prompts"),
        (2, 2, ["dog"], "2 images but 1 subjects"),
    ],
)
def test_a_mismatched_batch_is_an_error(references, prompts, subjects, message):
    reward = _Brightness()
    with pytest.raises(ValueError, match=message):
        reward(torch.zeros(2, 3, 4, 4), torch.zeros(references, 3, 4, 4), ["p"] * prompts, subjects)
    assert reward.batches == []


@pytest.mark.parametrize("name", ["mini_id", "mini_prompt"])
def test_the_mini_rewards_check_subjects_like_every_reward(name):
    reward = rewards.build(name)
    assert isinstance(reward, BatchReward)
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="2 images but 3 subjects"):
        reward(images, images, ["a red cube", "a red cube"], ["cube"] * 3)
