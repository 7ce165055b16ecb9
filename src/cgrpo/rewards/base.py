"""The Reward protocol, image-batch conversions and the reward registry.

Every reward in the project is a callable ``(images, references, prompts, subjects=None) -> Tensor[N]``:

- ``images``: the N generated images, as a list of PIL images or a float tensor ``[N, 3, H, W]`` in [0, 1];
- ``references``: N reference images of the subject (same forms; one per generated image);
- ``prompts``: N prompt strings;
- ``subjects``: optional N subject class names (``"dog"``, ``"backpack"``), used e.g. as a detection query.

Higher is better. Scores are computed without gradients; non-finite scores are allowed (the trainer masks
them out and counts them) but a reward must never raise on a valid batch. The rewards of this package derive
from :class:`BatchReward`, which checks every batch the same way and leaves them only ``score_batch``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from cgrpo.registry import Registry

ImageBatch = torch.Tensor | Sequence[Image.Image]


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(
        self,
        images: ImageBatch,
        references: ImageBatch,
        prompts: Sequence[str],
        subjects: Sequence[str] | None = None,
    ) -> torch.Tensor: ...


REWARDS: Registry[Reward] = Registry("reward")


def register(name: str, help: str = ""):
    """Decorator: ``@register("mini_id")`` on a factory ``(**options) -> Reward``."""
    return REWARDS.register(name, help)


def build(name: str, **options) -> Reward:
    """Build a registered reward by name, e.g. ``build("dino_seg", dino_path=..., device="cuda")``."""
    _import_builtin_rewards()
    return REWARDS.build(name, **options)


def check(name: str, options: dict[str, Any] | None, key: str) -> None:
    """Raise :class:`~cgrpo.config.ConfigError` naming ``<key>.name`` or ``<key>.options.<option>`` (``key``
    e.g. ``rewards.prompt``) if no reward ``name`` is registered or it takes no such option; builds none."""
    _import_builtin_rewards()
    REWARDS.check(name, options, f"{key}.name", f"{key}.options")


def names() -> list[str]:
    _import_builtin_rewards()
    return REWARDS.names()


def describe() -> dict[str, str]:
    _import_builtin_rewards()
    return REWARDS.describe()


def _import_builtin_rewards() -> None:
    # Importing the modules registers their rewards; kept lazy so `import cgrpo` stays light.
    import importlib

    for module in ("mini", "real", "vlm_judge"):
        try:
            importlib.import_module(f"cgrpo.rewards.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"cgrpo.rewards.{module}":
                raise


def to_tensor(images: ImageBatch) -> torch.Tensor:
    """PIL images or a tensor -> float32 ``[N, 3, H, W]`` in [0, 1] (all PIL images must share a size)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
        return images.detach().float().clamp(0, 1)
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    if not arrays:
        return torch.zeros(0, 3, 1, 1)
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"images have different sizes {sorted(sizes)}; resize them first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_pil(images: ImageBatch) -> list[Image.Image]:
    """A tensor ``[N, 3, H, W]`` in [0, 1] or PIL images -> a list of RGB PIL images."""
    if not isinstance(images, torch.Tensor):
        return [image.convert("RGB") for image in images]
    array = (to_tensor(images).permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def check_batch(images: ImageBatch, references: ImageBatch, prompts: Sequence[str]) -> int:
    """Return N after checking that images, references and prompts have the same length."""
    n = len(images)
    if len(references) != n or len(prompts) != n:
        raise ValueError(
            f"reward batch mismatch: {n} images, {len(references)} references, {len(prompts)} prompts"
        )
    return n


def check_subjects(subjects: Sequence[str] | None, n: int) -> None:
    if subjects is not None and len(subjects) != n:
        raise ValueError(f"reward batch mismatch: {n} images but {len(subjects)} subjects")


def check_subject_batches(
    images: ImageBatch,
    references: Sequence[ImageBatch],
    prompts: Sequence[str],
    subject_classes: Sequence[Sequence[str] | None] | None,
) -> list[Sequence[str] | None]:
    """Check the arguments of a ``score_subjects`` call (K reference batches and K class lists or None, each
    of the N images' length); returns the K class lists (``None`` each when none are given)."""
    k = len(references)
    classes = list(subject_classes) if subject_classes is not None else [None] * k
    if k == 0 or len(classes) != k:
        raise ValueError(f"score_subjects: {k} subjects' references but {len(classes)} lists of classes")
    n = len(images)
    for j, (refs, names) in enumerate(zip(references, classes, strict=True)):
        sizes = (len(refs), len(prompts), n if names is None else len(names))
        if sizes != (n, n, n):
            raise ValueError(
                f"score_subjects: subject {j}: {n} images but {sizes[0]} references, {sizes[1]} prompts and "
                f"{sizes[2]} class names"
            )
    return classes


@dataclass(frozen=True)
class RewardBatch:
    """One checked, non-empty reward batch: N images, N references, N prompts and N subjects (or ``None``)."""

    images: ImageBatch
    references: ImageBatch
    prompts: list[str]
    subjects: list[str] | None


class BatchReward(ABC):
    """Base of the rewards of this package: ``__call__`` checks the batch (as many images as references,
    prompts and, when given, subjects), answers an empty batch with an empty ``[0]`` tensor and scores any
    other one with :meth:`score_batch`, without gradients. Subclasses set ``name`` and define ``score_batch``.
    """

    name: str

    @torch.no_grad()
    def __call__(
        self,
        images: ImageBatch,
        references: ImageBatch,
        prompts: Sequence[str],
        subjects: Sequence[str] | None = None,
    ) -> torch.Tensor:
        n = check_batch(images, references, prompts)
        check_subjects(subjects, n)
        if n == 0:
            return torch.zeros(0)
        subject_list = list(subjects) if subjects is not None else None
        return self.score_batch(RewardBatch(images, references, list(prompts), subject_list))

    @abstractmethod
    def score_batch(self, batch: RewardBatch) -> torch.Tensor:
        """``[N]`` scores of a checked, non-empty batch."""


def score_subjects(
    reward: Reward,
    images: ImageBatch,
    references: Sequence[ImageBatch] | torch.Tensor,
    prompts: Sequence[str],
    subject_classes: Sequence[Sequence[str] | None] | None = None,
) -> torch.Tensor:
    """``[N, K]``: the identity of each of the K subjects of every image.

    ``references``: K image batches, the k-th subject's reference per sample (``[N, 3, h_k, w_k]`` each,
    sizes may differ between subjects), or one tensor ``[N, K, 3, H, W]``; ``subject_classes``: K lists of
    N class names (or None). A reward with a ``score_subjects`` method scores jointly (e.g. assigning
    detections to subjects, a missing subject scoring 0); any other reward is called once per subject.
    """
    if isinstance(references, torch.Tensor):
        if references.ndim != 5:
            raise ValueError(
                "references of several subjects are a sequence of K batches [N, 3, h, w] or one tensor "
                f"[N, K, 3, H, W], got a tensor of shape {tuple(references.shape)}"
            )
        references = list(references.unbind(1))
    references = list(references)
    k = len(references)
    if k == 0:
        raise ValueError("score_subjects needs at least one subject's references")
    classes = check_subject_batches(images, references, prompts, subject_classes)
    n = len(images)
    joint = getattr(reward, "score_subjects", None)
    if callable(joint):
        scores = joint(images, references, prompts, classes)
    else:
        scores = torch.stack(
            [torch.as_tensor(reward(images, references[j], prompts, classes[j])) for j in range(k)], dim=1
        )
    if tuple(scores.shape) != (n, k):
        name = getattr(reward, "name", type(reward).__name__)
        raise ValueError(f"reward {name} scored subjects as {tuple(scores.shape)}, expected ({n}, {k})")
    return scores
