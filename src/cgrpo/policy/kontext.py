"""FLUX.1 Kontext [dev] as a reference-conditioned policy (``flux-kontext``).

Kontext conditions on the reference exactly like UNO -- the VAE-encoded, 2x2-packed reference tokens are
appended after the noisy image tokens and only the first N outputs are the velocity -- but places the
reference with different rotary ids. Following diffusers' ``FluxKontextPipeline.prepare_latents``, the
reference's ids are the plain row-major grid ``(1, row, col)``: the same spatial positions as the target
with the first id axis set to 1 (the target has 0). No diagonal offset.

Several references (not supported by the pipeline): each gets first id 1 and its columns continue after the
previous reference's, i.e. the references sit side by side as one wide context image -- our choice.

Defaults (``FluxKontextPipeline``): guidance 2.5 (the pipeline's documented example; its argument default is
3.5), 28 steps, FLUX's resolution-dependent time shift at the target's token count. Kontext is trained at
~1 MP; we default to 512 x 512 like UNO for RL cost (``image_size=1024`` for the native resolution), and
resize references to the target size (the pipeline resizes them to its preferred Kontext resolution).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cgrpo.policy.base import register
from cgrpo.policy.flux import ReferenceFluxPolicy, flux_image_ids
from cgrpo.policy.flux_backbone import FluxBackbonePolicy, load_backbone_policy

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


class KontextPolicy(FluxBackbonePolicy):
    """FLUX.1 Kontext: UNO-style sequence concatenation with Kontext's reference ids."""

    default_num_steps = KONTEXT_NUM_STEPS
    pipeline_class_name = "FluxKontextPipeline"

    def preprocess_references(self, references: torch.Tensor) -> torch.Tensor:
        """References resized to ``reference_size`` (default: the target size), bicubic with antialiasing."""
        size = self.reference_size or self.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(references.shape[-2:]) == size:
            return references
        lead = references.shape[:-3]
        x = references.reshape(-1, *references.shape[-3:]).float()
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)
        return x.reshape(*lead, *x.shape[-3:])

    @torch.no_grad()
    def encode_references(self, references: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` or ``[B, K, 3, H, W]`` in [0, 1] -> tokens ``[B, R, C]``, Kontext ids."""
        if references is None:
            return super().encode_references(None)
        references = self.preprocess_references(references)
        # The packing of ReferenceFluxPolicy, then Kontext's ids in place of UnoPE's.
        tokens, _ = ReferenceFluxPolicy.encode_references(self, references)
        count = 1 if references.ndim == 4 else references.shape[1]
        ids = kontext_reference_ids([self.codec.grid(*references.shape[-2:])] * count)
        return tokens, ids.to(self.device)


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
