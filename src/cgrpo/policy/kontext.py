"""FLUX.1 Kontext [dev] as a reference-conditioned policy (``flux-kontext``).

Kontext conditions on the reference exactly like UNO -- the VAE-encoded, 2x2-packed reference tokens are
appended after the noisy image tokens and only the first N outputs are the velocity -- but places the
reference with different rotary ids. Following diffusers' ``FluxKontextPipeline.prepare_latents``, the
reference's ids are the plain row-major grid ``(1, row, col)``: the same spatial positions as the target
with the first id axis set to 1 (the target has 0). No diagonal offset.

Several references (not supported by the pipeline): each gets first id 1 and its columns continue after the
previous reference's, i.e. the references sit side by side as one wide context image -- our choice. Each keeps
its own size and token count.

Defaults (``FluxKontextPipeline``): guidance 2.5 (the pipeline's documented example; its argument default is
3.5), 28 steps, FLUX's resolution-dependent time shift at the target's token count. Kontext is trained at
~1 MP; we default to 512 x 512 like UNO for RL cost (``image_size=1024`` for the native resolution).
References are preprocessed as the pipeline does (:meth:`KontextPolicy.prepare_references`): resized to the
preferred Kontext resolution (~1 MP) closest to their aspect ratio; ``reference_size=N`` instead keeps the
aspect ratio at long side N (UNO's rule), e.g. 512 for cheaper RL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from cgrpo.imaging import pil_to_tensor
from cgrpo.policy.base import register
from cgrpo.policy.flux import flux_image_ids
from cgrpo.policy.flux_backbone import (
    FluxBackbonePolicy,
    as_pil,
    load_backbone_policy,
    resize_references,
    uno_style_references,
)

KONTEXT_IMAGE_SIZE = 512
KONTEXT_NUM_STEPS = 28
KONTEXT_GUIDANCE = 2.5


def kontext_reference_ids(reference_grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[sum(h_k * w_k), 3]`` ids ``(1, row, col + c_k)`` with ``c_k`` the widths of earlier references."""
    chunks, col_offset = [], 0
    for height, width in reference_grids:
        ids = flux_image_ids(height, width)
        ids[:, 0] = 1.0
        ids[:, 2] += col_offset
        chunks.append(ids)
        col_offset += width
    return torch.cat(chunks) if chunks else torch.zeros(0, 3)


def kontext_reference_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """``(width, height)`` FluxKontextPipeline resizes a ``width x height`` reference to (``_auto_resize``):
    the preferred Kontext resolution closest in aspect ratio, sides floored to multiples of ``multiple``."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    aspect = width / height
    _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return width // multiple * multiple, height // multiple * multiple


class KontextPolicy(FluxBackbonePolicy):
    """FLUX.1 Kontext: UNO-style sequence concatenation with Kontext's reference ids."""

    default_num_steps = KONTEXT_NUM_STEPS
    pipeline_class_name = "FluxKontextPipeline"

    def reference_ids(self, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        return kontext_reference_ids(grids)

    def prepare_references(self, images: Sequence[Image.Image | torch.Tensor]) -> list[torch.Tensor]:
        """FluxKontextPipeline's preprocessing of each reference: the preferred Kontext resolution closest in
        aspect ratio (:func:`kontext_reference_size`), resized by the pipeline's image processor (LANCZOS).
        With ``reference_size``: UNO's rule at that long side instead (cheaper references for RL)."""
        multiple = self.codec.token_size
        if self.reference_size is not None:
            return uno_style_references(images, self.reference_size, multiple)
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(vae_scale_factor=multiple)
        prepared = []
        for image in images:
            image = as_pil(image)
            width, height = kontext_reference_size(*image.size, multiple)
            resized = processor.resize(image, height, width)
            prepared.append(pil_to_tensor(resized))
        return prepared

    def preprocess_references(self, references: list[torch.Tensor]) -> list[torch.Tensor]:
        """The same sizes on tensors that did not come through :meth:`prepare_references` (bicubic with
        antialiasing); a no-op on prepared references."""
        multiple = self.codec.token_size
        resized = []
        for reference in references:
            height, width = reference.shape[-2:]
            if self.reference_size is not None:
                reference = resize_references(reference, self.reference_size, multiple)
            else:
                new_w, new_h = kontext_reference_size(width, height, multiple)
                if (new_h, new_w) != (height, width):
                    reference = F.interpolate(
                        reference.float(), size=(new_h, new_w), mode="bicubic", antialias=True
                    ).clamp(0.0, 1.0)
            resized.append(reference)
        return resized


def load_kontext(
    flux_path: str | Path,
    *,
    image_size: int | Sequence[int] = KONTEXT_IMAGE_SIZE,
    guidance: float = KONTEXT_GUIDANCE,
    **options: Any,
) -> KontextPolicy:
    """Build the ``flux-kontext`` policy from a diffusers FLUX.1 Kontext folder (same layout as FLUX.1);
    ``options`` as :func:`~cgrpo.policy.flux_backbone.load_backbone_policy`."""
    policy = load_backbone_policy(
        KontextPolicy, "flux-kontext", flux_path, image_size=image_size, guidance=guidance, **options
    )
    return policy.eval()


@register("flux-kontext", help="FLUX.1 Kontext dev from a local diffusers folder (flux_path=...), 512 px")
def flux_kontext(**options: Any) -> KontextPolicy:
    if "flux_path" not in options:
        raise TypeError("the flux-kontext policy needs flux_path=<diffusers FLUX.1 Kontext folder>")
    return load_kontext(**options)
