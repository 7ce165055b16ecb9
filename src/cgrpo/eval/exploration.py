"""Where GRPO's learning signal comes from: what the rollouts of a policy explore, per held-out prompt kind.

GRPO can only reinforce what its groups sample. For a policy and a GRPO config this rolls out G images per
held-out (reference, prompt) with the config's own rollout sampler (SDE steps, noise level, formulation) and
reports, per prompt kind:

- the mean rewards of the rollouts and of the deterministic ODE samples (how far rollout and held-out
  evaluation drift apart);
- the within-group standard deviation of each reward, and the share of groups whose spread is below
  ``flat_std`` (their normalised advantages are mostly noise);
- on the mini world's property prompts ("a red …", "a striped …", "… upside down"): the share of rollouts
  that draw the asked property (its attribute score above ``hit_threshold``) and the share of groups that
  contain no such rollout at all: what the base never samples, GRPO cannot reinforce;
- how many held-out images a decision needs (a power analysis from the per-image spread).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from cgrpo.advantage import group_stats
from cgrpo.data.base import Example
from cgrpo.policy.base import Policy
from cgrpo.rewards.base import Reward
from cgrpo.train.sampling import rollout, sample_images

PROPERTY_ATTRIBUTES = ("color", "pattern", "upside_down")


def asked_property_score(breakdown: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N]``: the lowest score among the property attributes a prompt asks for; NaN when it asks none.

    ``breakdown``: :func:`cgrpo.rewards.mini.reward_breakdown` (NaN marks attributes not asked)."""
    stacked = torch.stack([breakdown[k] for k in PROPERTY_ATTRIBUTES], dim=1)  # [N, 3]
    asked = ~stacked.isnan()
    lowest = stacked.nan_to_num(float("inf")).min(dim=1).values
    return torch.where(asked.any(dim=1), lowest, torch.full_like(lowest, float("nan")))


def images_for_interval(std: float, half_width: float = 0.01, z: float = 1.96) -> int:
    """Images whose mean has a 95% interval of ``± half_width`` given a per-image standard deviation."""
    return math.ceil((z * std / half_width) ** 2)


@torch.no_grad()
def explore(
    policy: Policy,
    examples: Sequence[Example],
    identity_reward: Reward,
    prompt_reward: Reward,
    sigmas: torch.Tensor,
    sde_steps: torch.Tensor,
    group_size: int = 8,
    noise_level: float = 0.7,
    formulation: str = "cps",
    seed: int = 0,
    hit_threshold: float = 0.6,
    flat_std: float = 0.01,
    breakdown=None,
) -> dict[str, Any]:
    """Statistics of ``group_size`` rollouts per example (see the module docstring), overall and per kind.

    ``sde_steps``: ``[T]`` bool, as in training. ``breakdown``: ``(images, references, prompts) -> dict``
    of per-attribute scores (the mini world's :func:`~cgrpo.rewards.mini.reward_breakdown`); without it
    the property statistics are left out."""
    G = group_size
    policy.eval()
    prompts = [e.prompt for e in examples for _ in range(G)]
    subjects = [e.subject_class for e in examples for _ in range(G)]
    references = torch.stack([e.reference for e in examples])
    group_refs = references.repeat_interleave(G, dim=0)
    cond = policy.condition([e.prompt for e in examples], references)
    generator = torch.Generator().manual_seed(seed)
    trajectory = rollout(
        policy,
        cond.repeat_interleave(G),
        sigmas,
        sde_steps,
        generator,
        noise_level=noise_level,
        formulation=formulation,
    )
    images = policy.decode(trajectory.final).cpu()
    r_id = torch.as_tensor(identity_reward(images, group_refs, prompts, subjects)).float()
    r_prompt = torch.as_tensor(prompt_reward(images, group_refs, prompts, subjects)).float()
    noise = policy.initial_noise(len(examples), torch.Generator().manual_seed(seed))
    ode_images = sample_images(policy, cond, sigmas, noise).cpu()
    e_prompts = [e.prompt for e in examples]
    e_subjects = [e.subject_class for e in examples]
    ode_id = torch.as_tensor(identity_reward(ode_images, references, e_prompts, e_subjects)).float()
    ode_prompt = torch.as_tensor(prompt_reward(ode_images, references, e_prompts, e_subjects)).float()
    hits = asked = None
    if breakdown is not None:
        property_score = asked_property_score(breakdown(images, group_refs, prompts))
        hits, asked = property_score > hit_threshold, property_score.isfinite()
    id_std = group_stats(r_id, G).std
    prompt_std = group_stats(r_prompt, G).std

    kinds: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        kinds[example.kind or "all"].append(index)

    def block(indices: list[int]) -> dict[str, Any]:
        rows = torch.tensor([i * G + j for i in indices for j in range(G)])
        index = torch.tensor(indices)
        out: dict[str, Any] = {
            "groups": len(indices),
            "rollout_id": float(r_id[rows].nanmean()),
            "rollout_prompt": float(r_prompt[rows].nanmean()),
            "ode_id": float(ode_id[index].nanmean()),
            "ode_prompt": float(ode_prompt[index].nanmean()),
            "group_std_id": float(id_std[index].nanmean()),
            "group_std_prompt": float(prompt_std[index].nanmean()),
            "flat_groups_id": float((id_std[index] < flat_std).float().mean()),
            "flat_groups_prompt": float((prompt_std[index] < flat_std).float().mean()),
            "image_std_id": float(ode_id[index].std()) if len(indices) > 1 else float("nan"),
            "image_std_prompt": float(ode_prompt[index].std()) if len(indices) > 1 else float("nan"),
        }
        if hits is not None and asked is not None:
            property_rows = rows[asked[rows]]
            if len(property_rows):
                group_hits = hits[property_rows].view(-1, G)
                out["property_groups"] = len(group_hits)
                out["property_hit_rate"] = float(group_hits.float().mean())
                out["property_groups_without_hit"] = float((~group_hits.any(dim=1)).float().mean())
        return out

    result = {
        "all": block(list(range(len(examples)))),
        "kinds": {k: block(v) for k, v in sorted(kinds.items())},
    }
    overall = result["all"]
    result["images_needed_for_0.01"] = {
        "id": images_for_interval(overall["image_std_id"]),
        "prompt": images_for_interval(overall["image_std_prompt"]),
    }
    result["settings"] = {
        "group_size": G,
        "noise_level": noise_level,
        "formulation": formulation,
        "sde_steps": int(sde_steps.sum()),
        "num_steps": len(sigmas) - 1,
        "hit_threshold": hit_threshold,
        "flat_std": flat_std,
        "seed": seed,
    }
    return result
