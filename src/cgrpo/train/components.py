"""Builds the run's parts from a config: policy, datasets, rewards, the batch sampler."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from cgrpo import policy as policies
from cgrpo import rewards as reward_registry
from cgrpo.data.base import Example, SubjectDataset
from cgrpo.policy.base import Policy
from cgrpo.rewards.base import Reward
from cgrpo.train.config import DataConfig, GRPOConfig, PolicyConfig


def build_policy(config: PolicyConfig, device: str = "cpu") -> Policy:
    policy = policies.build(config.name, **config.options)
    policy.requires_grad_(False)
    if config.lora.enabled:
        policy.add_lora(config.lora.rank, config.lora.alpha, config.lora.dropout, config.lora.target_modules)
    else:
        policy.transformer.requires_grad_(True)
    if config.gradient_checkpointing and hasattr(policy, "enable_gradient_checkpointing"):
        policy.enable_gradient_checkpointing()
    return policy.to(device)


def build_datasets(config: DataConfig, seed: int) -> tuple[SubjectDataset, list[Example]]:
    """(training dataset, held-out evaluation examples)."""
    options = dict(config.options)
    if config.name == "mini":
        from cgrpo.data.miniworld import MiniWorld

        eval_options = options.pop("eval", {})
        train_options = options.pop("train", {})
        world = MiniWorld(**options)
        train = world.dataset("train", seed=seed, **train_options)
        heldout = list(world.eval_set(**eval_options))
        return train, heldout
    from cgrpo.data.registry import DATASETS

    eval_path = options.pop("eval_path", None)
    train = DATASETS.build(config.name, **options)
    heldout = list(DATASETS.build(config.name, **{**options, "path": eval_path})) if eval_path else []
    return train, heldout


def build_rewards(config: GRPOConfig) -> tuple[Reward, Reward]:
    identity = reward_registry.build(config.rewards.identity.name, **config.rewards.identity.options)
    prompt = reward_registry.build(config.rewards.prompt.name, **config.rewards.prompt.options)
    return identity, prompt


class RewardFailure(RuntimeError):
    """A reward kept failing after all retries; the trainer checkpoints and exits with this message."""


def score_with_retries(
    reward: Reward,
    images: torch.Tensor,
    references: torch.Tensor,
    prompts: Sequence[str],
    subjects: Sequence[str],
    max_retries: int,
    backoff_s: float,
) -> torch.Tensor:
    """Call ``reward``; on an exception retry with exponential backoff, then raise :class:`RewardFailure`."""
    for attempt in range(max_retries + 1):
        try:
            scores = reward(images, references, prompts, subjects)
            return torch.as_tensor(scores, dtype=torch.float32).reshape(-1).cpu()
        except Exception as error:  # a reward server may fail in any way; we retry all of them
            if attempt == max_retries:
                name = getattr(reward, "name", type(reward).__name__)
                raise RewardFailure(
                    f"reward '{name}' failed {max_retries + 1} times; "
                    f"last error: {type(error).__name__}: {error}"
                ) from error
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class BatchSampler:
    """Draws B example indices per iteration from seeded per-epoch permutations; its state resumes exactly."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size == 0:
            raise ValueError("the training dataset is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = 0, 0

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator)

    def next(self) -> list[int]:
        indices: list[int] = []
        while len(indices) < self.batch_size:
            order = self._permutation()
            take = order[self.position : self.position + self.batch_size - len(indices)].tolist()
            indices += take
            self.position += len(take)
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
