"""The DINO score of DreamBooth's evaluation: DINO ViT-S/16 CLS-token cosine between generated and reference.

Loads a ``ViTModel`` in the ``facebook/dino-vits16`` layout (no pooler) with its own image processor. The
embedding is the CLS token of the last layer after the final LayerNorm (``last_hidden_state[:, 0]``), which is
what DreamBooth's metric uses; the score is the cosine in [-1, 1] (1.0 for identical images).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from cgrpo.rewards._hf import batches, require_dir, resolve_device, resolve_dtype, to_model
from cgrpo.rewards.base import ImageBatch, check_batch, register, to_pil


class DinoEmbedder:
    """DINO ViT CLS embeddings, unit-norm, ``[N, D]`` float32 on the CPU."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoImageProcessor, ViTModel

        directory = require_dir(path, "dino", "path", "a DINO ViT (e.g. facebook/dino-vits16)")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.processor = AutoImageProcessor.from_pretrained(directory)
        # The DINO checkpoints have no pooler; the CLS token is read directly.
        self.model = ViTModel.from_pretrained(directory, add_pooling_layer=False, dtype=self.dtype)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> torch.Tensor:
        pil = to_pil(images)
        out = [torch.zeros(0, self.model.config.hidden_size)]
        for chunk in batches(len(pil), self.batch_size):
            inputs = to_model(self.processor(images=pil[chunk], return_tensors="pt"), self.device, self.dtype)
            out.append(self.model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0].float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@register("dino")
class DinoReward:
    """DINO score: DINO ViT-S/16 CLS cosine between each generated image and its reference, in [-1, 1].

    Options: ``path`` (local ``facebook/dino-vits16``-style directory), ``device``, ``dtype`` (default
    float32), ``batch_size``. Prompts and subjects are ignored.
    """

    name = "dino"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
    ) -> None:
        self.embedder = DinoEmbedder(path, device=device, dtype=dtype, batch_size=batch_size)

    def __call__(
        self,
        images: ImageBatch,
        references: ImageBatch,
        prompts: Sequence[str],
        subjects: Sequence[str] | None = None,
    ) -> torch.Tensor:
        check_batch(images, references, prompts)
        return (self.embedder(images) * self.embedder(references)).sum(-1)
