"""Held-out evaluation during training: deterministic ODE samples scored with both rewards.

Image k of an example starts from the noise of ``item_seed(seed, subject_id, prompt, k)``, the seed
``cgrpo eval`` gives the same image: the base policy and a trained policy are compared on identical inputs,
and the trainer's held-out images are the ones ``cgrpo eval`` generates (batching and micro-batch aside).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cgrpo.data.base import Example
from cgrpo.policy.base import Policy
from cgrpo.rewards.base import Reward
from cgrpo.train.sampling import item_seed, seeded_images


@dataclass
class HeldoutResult:
    """``images``: ``[E * K, 3, H, W]`` (K images per example, example-major); rewards ``[E * K]``."""

    images: torch.Tensor
    identity: torch.Tensor
    prompt: torch.Tensor
    kinds: list[str]

    def summary(self) -> dict[str, float]:
        """Mean rewards, overall and per prompt kind (``"<kind>/id"``), and the half-widths of their 95%
        normal intervals over images (``id_ci95``, ``prompt_ci95``)."""
        out = {
            "id": _nanmean(self.identity),
            "prompt": _nanmean(self.prompt),
            "id_ci95": ci95(self.identity),
            "prompt_ci95": ci95(self.prompt),
        }
        groups: dict[str, list[int]] = defaultdict(list)
        for index, kind in enumerate(self.kinds):
            groups[kind].append(index)
        for kind, indices in sorted(groups.items()):
            if kind:
                out[f"{kind}/id"] = _nanmean(self.identity[indices])
                out[f"{kind}/prompt"] = _nanmean(self.prompt[indices])
        return out


# What a run's summary says when its dataset has no held-out examples (a JSONL dataset without eval_path).
NO_HELDOUT = "no held-out data (set data.options.eval_path to a held-out dataset): no base or trained rewards"


def base_trained_summary(base: dict[str, float] | None, trained: dict[str, float] | None) -> dict[str, Any]:
    """A run's ``summary.json``: ``{"base": ..., "trained": ...}`` held-out metrics; without held-out data
    (``None`` or empty) both are empty and ``"heldout"`` says why."""
    if not base or not trained:
        return {"base": {}, "trained": {}, "heldout": NO_HELDOUT}
    return {"base": base, "trained": trained}


def ci95(values: torch.Tensor) -> float:
    """Half-width of the 95% normal interval of the mean of the finite ``values`` (NaN below 2)."""
    finite = values[torch.isfinite(values)].double()
    if len(finite) < 2:
        return float("nan")
    return float(1.96 * finite.std() / len(finite) ** 0.5)


def _nanmean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


@torch.no_grad()
def evaluate_heldout(
    policy: Policy,
    examples: Sequence[Example],
    identity_reward: Reward,
    prompt_reward: Reward,
    sigmas: torch.Tensor,
    seed: int,
    images_per_prompt: int = 1,
    micro_batch: int = 0,
) -> HeldoutResult:
    """ODE samples of every example (``images_per_prompt`` each, seeded per image as the module docstring
    says), scored with both rewards."""
    prompts = [e.prompt for e in examples for _ in range(images_per_prompt)]
    subjects = [e.subject_class for e in examples for _ in range(images_per_prompt)]
    references = torch.stack([e.reference for e in examples]).repeat_interleave(images_per_prompt, dim=0)
    kinds = [e.kind for e in examples for _ in range(images_per_prompt)]
    was_training = policy.training
    policy.eval()  # before conditioning: a text encoder with dropout must not encode in train mode
    cond = policy.condition([e.prompt for e in examples], torch.stack([e.reference for e in examples]))
    cond = cond.repeat_interleave(images_per_prompt)
    seeds = [item_seed(seed, e.subject_id, e.prompt, k) for e in examples for k in range(images_per_prompt)]
    images = seeded_images(policy, cond, seeds, sigmas, micro_batch=micro_batch)
    policy.train(was_training)
    identity = torch.as_tensor(identity_reward(images, references, prompts, subjects)).float().cpu()
    prompt = torch.as_tensor(prompt_reward(images, references, prompts, subjects)).float().cpu()
    return HeldoutResult(images.cpu(), identity, prompt, kinds)
