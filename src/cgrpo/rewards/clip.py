"""CLIP-I and CLIP-T (CLIP ViT-B/32 in the paper's evaluation), as DreamBooth defines them.

- ``clip_i``: cosine between the CLIP image embeddings of the generated image and of its reference image.
- ``clip_t``: cosine between the CLIP image embedding of the generated image and the text embedding of its
  prompt.

Embeddings are CLIP's projected features (``get_image_features``/``get_text_features``), L2-normalised; the
score is the plain cosine in [-1, 1] -- no x100 and no clamp, so values are on the scale the paper reports
(CLIP-T ~0.30, CLIP-I ~0.86). torchmetrics' ``CLIPScore`` is ``100 * max(cos, 0)`` of the same cosine (and its
module form clamps the *mean* over samples), so for positive cosines ``CLIPScore == 100 * clip_t`` (or
``100 * clip_i`` with image-image input). Preprocessing is the model's own ``CLIPProcessor`` (resize shortest
side, centre crop, CLIP normalisation; texts padded and truncated to the model's 77 positions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from cgrpo.rewards._hf import CosineReward, LocalEmbedder, pooled, to_model, unit_embeddings
from cgrpo.rewards.base import ImageBatch, register


class CLIPEmbedder(LocalEmbedder):
    """A ``CLIPModel`` + ``CLIPProcessor`` loaded from a local directory; returns unit-norm embeddings.

    Build one and hand it to both rewards (``CLIPImageReward(embedder=e)``, ``CLIPTextReward(embedder=e)``) to
    load the model once.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoProcessor, CLIPModel

        what = "a CLIP model (e.g. openai/clip-vit-base-patch32)"
        super().__init__(path, "clip", what, device, dtype, batch_size)
        self.processor = AutoProcessor.from_pretrained(self.directory)
        self.model = CLIPModel.from_pretrained(self.directory, dtype=self.dtype).to(self.device).eval()
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def images(self, images: ImageBatch) -> torch.Tensor:
        """Images -> ``[N, D]`` unit-norm float32 embeddings on the CPU."""
        return self.embed_images(images, self.model.config.projection_dim, self._image_features)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pooled(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> ``[N, D]`` unit-norm float32 embeddings on the CPU (truncated to the model's length)."""

        def embed(chunk: slice) -> torch.Tensor:
            tokens = self.processor(
                text=list(texts[chunk]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            tokens = to_model(tokens, self.device, self.dtype)
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            return pooled(features)

        return unit_embeddings(len(texts), self.batch_size, self.model.config.projection_dim, embed)


class _CLIPReward(CosineReward):
    """The options of ``clip_i`` and ``clip_t``; both embed the generated images with CLIP's image tower."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
        embedder: CLIPEmbedder | None = None,
    ) -> None:
        if embedder is None:
            embedder = CLIPEmbedder(path, device=device, dtype=dtype, batch_size=batch_size)
        self.embedder = embedder

    def _images(self, images: ImageBatch) -> torch.Tensor:
        return self.embedder.images(images)


@register("clip_i")
class CLIPImageReward(_CLIPReward):
    """CLIP-I: cosine between CLIP image embeddings of each generated image and its reference, in [-1, 1].

    Options: ``path`` (local CLIP directory), ``device``, ``dtype`` (default float32), ``batch_size``, or
    ``embedder`` (a :class:`CLIPEmbedder` to share with ``clip_t``).
    """

    name = "clip_i"

    def _targets(self, references: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        return self.embedder.images(references)


@register("clip_t")
class CLIPTextReward(_CLIPReward):
    """CLIP-T: cosine between the CLIP embeddings of each generated image and its prompt, in [-1, 1].

    Options as for ``clip_i``. References and subjects are ignored.
    """

    name = "clip_t"

    def _targets(self, references: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        return self.embedder.texts(prompts)
