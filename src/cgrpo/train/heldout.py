"""Held-out evaluation during training: deterministic ODE samples scored with both rewards.

Image k of an example starts from the noise of ``item_seed(seed, subject_id, prompt, k)``, the seed
``cgrpo eval`` gives the same image: the base policy and a trained policy are compared on identical inputs,
and the trainer's held-out images are the ones ``cgrpo eval`` generates (batching and micro-batch aside).

Examples with K > 1 subjects are conditioned on all K references and scored per subject
(:func:`cgrpo.rewards.base.score_subjects`); the summary adds each subject's identity, the weakest subject's
and, where the identity reward reports its assignment, how often a subject was missing or confused.
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
from cgrpo.train.subjects import classes_per_subject, condition_references, references_per_subject


@dataclass
class HeldoutResult:
    """``images``: ``[E * I, 3, H, W]`` (I images per example, example-major); rewards ``[E * I]``.

    Multi-subject examples (K > 1 subjects) also carry ``subject_identity`` ``[E * I, K]`` (``identity`` is
    its mean over the subjects) and, when the identity reward reports its assignment, per-image counts
    ``missing`` and ``confused`` ``[E * I]`` (subjects with no detection; subjects drawn twice)."""

    images: torch.Tensor
    identity: torch.Tensor
    prompt: torch.Tensor
    kinds: list[str]
    subject_identity: torch.Tensor | None = None
    missing: torch.Tensor | None = None
    confused: torch.Tensor | None = None

    def summary(self) -> dict[str, float]:
        """Mean rewards, overall and per prompt kind (``"<kind>/id"``), and the half-widths of their 95%
        normal intervals over images (``id_ci95``, ``prompt_ci95``). With K > 1 subjects also ``id_<k>``
        (subject k's identity), ``id_min`` (the mean over images of the weakest subject's identity) and
        ``missing_rate`` / ``confused_rate``: missing / confused subjects per subject drawn (count over
        images x K), when known."""
        out = {
            "id": _nanmean(self.identity),
            "prompt": _nanmean(self.prompt),
            "id_ci95": ci95(self.identity),
            "prompt_ci95": ci95(self.prompt),
        }
        if self.subject_identity is not None:
            out.update(self._subject_summary(self.subject_identity))
        groups: dict[str, list[int]] = defaultdict(list)
        for index, kind in enumerate(self.kinds):
            groups[kind].append(index)
        for kind, indices in sorted(groups.items()):
            if kind:
                out[f"{kind}/id"] = _nanmean(self.identity[indices])
                out[f"{kind}/prompt"] = _nanmean(self.prompt[indices])
        return out

    def _subject_summary(self, scores: torch.Tensor) -> dict[str, float]:
        out = {f"id_{k}": _nanmean(column) for k, column in enumerate(scores.T)}
        finite = torch.isfinite(scores).all(dim=1)
        out["id_min"] = _nanmean(scores[finite].amin(dim=1)) if finite.any() else float("nan")
        drawn = scores.numel()  # images x subjects
        for name, counts in (("missing", self.missing), ("confused", self.confused)):
            if counts is not None:
                out[f"{name}_rate"] = float(counts.double().sum() / drawn) if drawn else float("nan")
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
    says), scored with both rewards by :func:`score_heldout`."""
    was_training = policy.training
    policy.eval()  # before conditioning: a text encoder with dropout must not encode in train mode
    cond = policy.condition([e.prompt for e in examples], condition_references(examples))
    cond = cond.repeat_interleave(images_per_prompt)
    seeds = [item_seed(seed, e.subject_id, e.prompt, k) for e in examples for k in range(images_per_prompt)]
    images = seeded_images(policy, cond, seeds, sigmas, micro_batch=micro_batch)
    policy.train(was_training)
    return score_heldout(examples, images, identity_reward, prompt_reward, images_per_prompt)


@torch.no_grad()
def score_heldout(
    examples: Sequence[Example],
    images: torch.Tensor,
    identity_reward: Reward,
    prompt_reward: Reward,
    images_per_prompt: int = 1,
) -> HeldoutResult:
    """Both rewards of held-out ``images`` ``[E * I, 3, H, W]`` (``images_per_prompt`` I per example,
    example-major): per subject with K > 1 subjects (the prompt reward takes the first subject's reference
    and class, as in training)."""
    prompts = [e.prompt for e in examples for _ in range(images_per_prompt)]
    references = references_per_subject(examples, images_per_prompt)  # K x [E * I, 3, H_k, W_k]
    classes = classes_per_subject(examples, images_per_prompt)
    kinds = [e.kind for e in examples for _ in range(images_per_prompt)]
    if len(references) == 1:
        identity = torch.as_tensor(identity_reward(images, references[0], prompts, classes[0])).float().cpu()
        prompt = torch.as_tensor(prompt_reward(images, references[0], prompts, classes[0])).float().cpu()
        return HeldoutResult(images.cpu(), identity, prompt, kinds)
    from cgrpo.rewards.base import score_subjects

    scores = torch.as_tensor(score_subjects(identity_reward, images, references, prompts, classes))
    scores = scores.float().cpu()
    missing, confused = _assignment_counts(identity_reward, len(images))
    prompt = torch.as_tensor(prompt_reward(images, references[0], prompts, classes[0])).float().cpu()
    return HeldoutResult(
        images.cpu(), scores.mean(dim=1), prompt, kinds, scores, missing=missing, confused=confused
    )


def _assignment_counts(reward: Reward, num_images: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-image ``missing`` and ``confused`` counts of the reward's last joint scoring (its
    ``last_assignment()``), or ``(None, None)`` when it does not report them."""
    method = getattr(reward, "last_assignment", None)
    records = method() if callable(method) else None
    if not records or len(records) != num_images:
        return None, None
    missing = torch.tensor([int(r.get("missing", 0)) for r in records])
    confused = torch.tensor([int(r.get("confused", 0)) for r in records])
    return missing, confused
