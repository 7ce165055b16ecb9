"""The DINO score of DreamBooth's evaluation: DINO ViT-S/16 CLS-token cosine between generated and reference.

Loads a ``ViTModel`` in the ``facebook/dino-vits16`` layout (no pooler) with its own image processor. The
embedding is the CLS token of the last layer after the final LayerNorm (``last_hidden_state[:, 0]``), which is
what DreamBooth's metric uses; the score is the cosine in [-1, 1] (1.0 for identical images).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from cgrpo.rewards._hf import CosineReward, LocalEmbedder
from cgrpo.rewards.base import ImageBatch, register


class DinoEmbedder(LocalEmbedder):
    """DINO ViT CLS embeddings, unit-norm, ``[N, D]`` float32 on the CPU."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoImageProcessor, ViTModel

        super().__init__(path, "dino", "a DINO ViT (e.g. facebook/dino-vits16)", device, dtype, batch_size)
        self.processor = AutoImageProcessor.from_pretrained(self.directory)
        # The DINO checkpoints have no pooler; the CLS token is read directly.
        self.model = ViTModel.from_pretrained(self.directory, add_pooling_layer=False, dtype=self.dtype)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> torch.Tensor:
        return self.embed_images(images, self.model.config.hidden_size, self._cls_token)

    def _cls_token(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


@register("dino")
class DinoReward(CosineReward):
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

    def _images(self, images: ImageBatch) -> torch.Tensor:
        return self.embedder(images)

    def _targets(self, references: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        return self.embedder(references)
