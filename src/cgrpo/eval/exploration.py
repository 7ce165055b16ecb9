"""Where GRPO's learning signal comes from: what the rollouts of a policy explore, per held-out prompt kind.

GRPO can only reinforce what its groups sample. For a policy and a GRPO config this rolls out G images per
held-out (reference, prompt) with the config's own rollout sampler (SDE steps, noise level, formulation) and
reports, per prompt kind:

- the mean rewards of the rollouts and of the deterministic ODE samples (how far rollout and held-out
  evaluation drift apart);
- the within-group standard deviation of each reward, and the share of groups whose spread is below
  ``flat_std`` (their normalised advantages are mostly noise);
- the conflict rate (the paper's Fig. 7): the share of rollouts whose two group-normalised advantages have
  opposite signs; where following the prompt costs identity by construction it is high;
- on the mini world's property prompts ("a red …", "a striped …", "… upside down"): the share of rollouts
  that draw the asked property (its attribute score above ``hit_threshold``) and the share of groups that
  contain no such rollout at all: what the base never samples, GRPO cannot reinforce (``property_*``);
  the same for everything a prompt asks — background, corner, size and the properties (``asked_*``);
- given the method's advantage (``advantage``: rewards -> shaped advantage per trained step), whether it
  favours the rollouts that draw what is asked: in groups that hold both, the mean advantage (over the
  trainable steps) of the rollouts that draw it and of those that do not, beside their rewards
  (``property_hit_advantage``, ``asked_hit_advantage``, ...), and the same per trainable step
  (``..._hit_advantage_by_step``). A hit advantage below the miss advantage means the method pushes away
  from following the prompt even when the group samples it;
- on recolour prompts, the share of rollouts that take the asked colour and the share that take another
  body colour (``recolor_*``): a base can edit the look without reading which colour word was asked;
- how many held-out images a decision needs (a power analysis from the per-image spread).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cgrpo.advantage import conflict_rate, group_normalize, group_stats
from cgrpo.data.base import Example
from cgrpo.policy.base import Policy
from cgrpo.rewards.base import Reward
from cgrpo.train.sampling import rollout, sample_images

PROPERTY_ATTRIBUTES = ("color", "pattern", "upside_down")
ASKED_ATTRIBUTES = ("background", "position", "size", *PROPERTY_ATTRIBUTES)


def asked_property_score(
    breakdown: dict[str, torch.Tensor], attributes: Sequence[str] = PROPERTY_ATTRIBUTES
) -> torch.Tensor:
    """``[N]``: the lowest score among the ``attributes`` a prompt asks for; NaN when it asks none of them.

    ``breakdown``: :func:`cgrpo.rewards.mini.reward_breakdown` (NaN marks attributes not asked)."""
    stacked = torch.stack([breakdown[k] for k in attributes], dim=1)  # [N, len(attributes)]
    asked = ~stacked.isnan()
    lowest = stacked.nan_to_num(float("inf")).min(dim=1).values
    return torch.where(asked.any(dim=1), lowest, torch.full_like(lowest, float("nan")))


def edit_advantages(
    hits: torch.Tensor,
    advantage: torch.Tensor,
    r_id: torch.Tensor,
    r_prompt: torch.Tensor,
    advantage_by_step: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Does the method favour the rollouts that draw what is asked? ``[groups, G]`` each: ``hits``
    (bool), the shaped ``advantage`` (mean over trained steps) and both rewards.

    Only groups with at least one hit and one miss carry a signal between the two; over those
    (``mixed_groups``) the mean advantage and rewards of the hits and of the misses (NaN without such groups).
    ``advantage_by_step`` (``[groups, G, K]``, the advantage on each of K trainable steps) adds the same two
    means per step (``hit_advantage_by_step``, ``miss_advantage_by_step``: K floats each, only with mixed
    groups): TDW can favour an edit on the early steps and push it away on the late ones.
    """
    mixed = hits.any(dim=1) & (~hits).any(dim=1)
    h, m = hits[mixed], ~hits[mixed]

    def mean(values: torch.Tensor, which: torch.Tensor) -> float:
        return float(values[mixed][which].mean()) if bool(which.any()) else float("nan")

    out: dict[str, Any] = {
        "mixed_groups": int(mixed.sum()),
        "hit_advantage": mean(advantage, h),
        "miss_advantage": mean(advantage, m),
        "hit_id": mean(r_id, h),
        "miss_id": mean(r_id, m),
        "hit_prompt": mean(r_prompt, h),
        "miss_prompt": mean(r_prompt, m),
    }
    if advantage_by_step is not None and bool(mixed.any()):
        steps = advantage_by_step[mixed]  # [mixed groups, G, K]
        out["hit_advantage_by_step"] = steps[h].mean(dim=0).tolist()
        out["miss_advantage_by_step"] = steps[m].mean(dim=0).tolist()
    return out


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
    advantage: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    recolors: Callable[..., dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Statistics of ``group_size`` rollouts per example (see the module docstring), overall and per kind.

    ``sde_steps``: ``[T]`` bool, as in training. ``breakdown``: ``(images, references, prompts) -> dict``
    of per-attribute scores (the mini world's :func:`~cgrpo.rewards.mini.reward_breakdown`); without it
    the property statistics are left out. ``advantage``: ``(r_id [N], r_prompt [N]) -> [N, K]``, the
    method's shaped advantage on each of the K trainable steps (groups of ``group_size`` consecutive
    rows); with it and ``breakdown``, blocks add :func:`edit_advantages` under each prefix. ``recolors``:
    ``(images, references, prompts) -> {"asked", "other"}`` scores of the asked colour and of the strongest
    other one (the mini world's :func:`~cgrpo.rewards.mini.recolor_scores`); with it, blocks holding recolour
    prompts give the share of their rollouts that take the asked colour and that take another one."""
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
    # per attribute set: (did the rollout draw every asked attribute, does its prompt ask any)
    drawn: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if breakdown is not None:
        scores = breakdown(images, group_refs, prompts)
        for prefix, attributes in (("property", PROPERTY_ATTRIBUTES), ("asked", ASKED_ATTRIBUTES)):
            score = asked_property_score(scores, attributes)
            drawn[prefix] = (score > hit_threshold, score.isfinite())
    recolored = recolors(images, group_refs, prompts) if recolors is not None else None
    # trained steps are drawn uniformly among the trainable ones: the mean over them is the expected weight
    by_step = advantage(r_id, r_prompt) if advantage is not None else None  # [N, K]
    shaped = by_step.mean(dim=1) if by_step is not None else None
    id_std = group_stats(r_id, G).std
    a_id, a_prompt = group_normalize(r_id, G), group_normalize(r_prompt, G)
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
            "conflict_rate": conflict_rate(a_id[rows], a_prompt[rows]),
            "image_std_id": float(ode_id[index].std()) if len(indices) > 1 else float("nan"),
            "image_std_prompt": float(ode_prompt[index].std()) if len(indices) > 1 else float("nan"),
        }
        for prefix, (hits, asked) in drawn.items():
            asked_rows = rows[asked[rows]]
            if not len(asked_rows):
                continue
            group_hits = hits[asked_rows].view(-1, G)
            out[f"{prefix}_groups"] = len(group_hits)
            out[f"{prefix}_hit_rate"] = float(group_hits.float().mean())
            out[f"{prefix}_groups_without_hit"] = float((~group_hits.any(dim=1)).float().mean())
            if shaped is not None:
                compared = edit_advantages(
                    group_hits,
                    shaped[asked_rows].view(-1, G),
                    r_id[asked_rows].view(-1, G),
                    r_prompt[asked_rows].view(-1, G),
                    by_step[asked_rows].view(-1, G, by_step.shape[1]),
                )
                if not compared["mixed_groups"]:  # nothing to compare: no NaN entries in the JSON
                    compared = {"mixed_groups": 0}
                out.update({f"{prefix}_{key}": value for key, value in compared.items()})
        if recolored is not None:
            asked_color = recolored["asked"][rows]
            asks = asked_color.isfinite()
            if asks.any():
                other_color = recolored["other"][rows][asks]
                out["recolor_rollouts"] = int(asks.sum())
                out["recolor_asked_rate"] = float((asked_color[asks] > hit_threshold).float().mean())
                out["recolor_other_rate"] = float((other_color > hit_threshold).float().mean())
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
