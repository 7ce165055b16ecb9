"""Small helpers shared by the rewards that wrap transformers models (clip, dino, dino_seg, hpsv3).

Kept free of any model family so that each family stays in its own file.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from cgrpo.rewards.base import BatchReward, ImageBatch, RewardBatch, to_pil

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> cuda when available, else cpu; anything else goes to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, auto: torch.dtype = torch.float32):
    """A dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"``) or a ``torch.dtype``.

    ``"auto"`` (or ``None``) gives ``auto`` on an accelerator and float32 on the CPU, where half precision is
    slow and inaccurate.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return auto if device.type != "cpu" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; expected one of {sorted(set(_DTYPES))} or 'auto'")
    return _DTYPES[dtype]


def require_dir(path: str | os.PathLike | None, reward: str, option: str, what: str) -> Path:
    """Check that ``path`` is a local directory; errors name the reward, the option and what belongs there."""
    if path is None:
        raise ValueError(f"{reward}: option '{option}' is required: the local directory of {what}")
    resolved = Path(path).expanduser()
    if not resolved.is_dir():
        raise FileNotFoundError(
            f"{reward}: {option}='{path}' is not a directory; expected a local directory of {what} "
            "(model weights are never downloaded at run time)"
        )
    return resolved


def batches(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, size), [size, 2 size), ...`` covering ``range(n)``."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def to_model(inputs: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    """Move processor outputs to the model's device; floating tensors also take the model's dtype."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


def pooled(output) -> torch.Tensor:
    """``get_*_features`` return a tensor in transformers 4 and a ModelOutput (``pooler_output``) in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def unit_embeddings(
    n: int, batch_size: int, dim: int, embed: Callable[[slice], torch.Tensor]
) -> torch.Tensor:
    """``[n, dim]`` unit-norm float32 embeddings on the CPU; ``embed(chunk)`` computes the rows of ``chunk``
    (a slice of ``range(n)``, ``batch_size`` long at most). ``n == 0`` gives ``[0, dim]``."""
    out = [torch.zeros(0, dim)]
    for chunk in batches(n, batch_size):
        out.append(embed(chunk).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


class LocalEmbedder:
    """Base of the embedders of one transformers model loaded from a local directory (``clip``, ``dino``).

    Checks ``path`` (errors name ``reward`` and ``what`` belongs there) and resolves ``device`` and ``dtype``;
    the subclass then loads ``self.processor`` and ``self.model`` from ``self.directory``.
    """

    processor: Callable[..., Mapping[str, torch.Tensor]]

    def __init__(
        self,
        path: str | os.PathLike | None,
        reward: str,
        what: str,
        device: str | torch.device,
        dtype: str | torch.dtype,
        batch_size: int,
    ) -> None:
        self.directory = require_dir(path, reward, "path", what)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size

    def embed_images(
        self, images: ImageBatch, dim: int, features: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Images -> ``[N, dim]`` unit-norm float32 embeddings on the CPU: the processor's ``pixel_values``,
        moved to the model, go through ``features`` ``batch_size`` images at a time."""
        pil = to_pil(images)

        def embed(chunk: slice) -> torch.Tensor:
            inputs = to_model(self.processor(images=pil[chunk], return_tensors="pt"), self.device, self.dtype)
            return features(inputs["pixel_values"])

        return unit_embeddings(len(pil), self.batch_size, dim, embed)


class CosineReward(BatchReward):
    """Base of the rewards that score the cosine of unit-norm embeddings, ``[N]`` in [-1, 1]: each generated
    image's (``_images``) with its target's (``_targets``: its reference's or its prompt's)."""

    def _images(self, images: ImageBatch) -> torch.Tensor:
        raise NotImplementedError

    def _targets(self, references: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def score_batch(self, batch: RewardBatch) -> torch.Tensor:
        return (self._images(batch.images) * self._targets(batch.references, batch.prompts)).sum(-1)


def image_hash(image: Image.Image, extra: str = "") -> str:
    """A content hash of an RGB image (pixels and size) plus ``extra`` (e.g. the subject), for caches."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"{image.size}|{extra}|".encode())
    digest.update(image.convert("RGB").tobytes())
    return digest.hexdigest()


class LRUCache:
    """A bounded mapping that forgets the least recently used entries (reference embeddings repeat)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
