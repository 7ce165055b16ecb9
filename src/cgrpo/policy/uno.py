"""UNO on FLUX.1-dev: the paper's backbone, loaded from local checkpoints.

Inputs (nothing is downloaded):

- ``flux_path``: a diffusers-format FLUX.1-dev folder (``transformer/``, ``vae/``, ``text_encoder/`` CLIP-L,
  ``text_encoder_2/`` T5-XXL, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``), e.g. a local copy of
  ``black-forest-labs/FLUX.1-dev``;
- ``lora_path``: UNO's released DiT LoRA (``dit_lora.safetensors`` of ``bytedance-research/UNO``, rank 512),
  converted from UNO's BFL-layout keys by :mod:`cgrpo.policy.uno_lora` and merged into the transformer
  (exact; ``uno_lora_mode="adapter"`` keeps it as a frozen peft adapter instead).

Conditioning is UNO's: the VAE-encoded reference images are packed into 2x2 tokens, appended after the noisy
image tokens, and placed with UnoPE (row and column ids shifted diagonally past the target and the previous
references) -- :class:`~cgrpo.policy.flux.ReferenceFluxPolicy` implements it and
:mod:`cgrpo.policy.flux_backbone` loads FLUX.1 with prompt caching and text-encoder offload; this module adds
UNO's sampling defaults, reference preprocessing and LoRA.

UNO's inference defaults (``inference.py`` / ``UNOPipeline`` of bytedance/UNO), used here:

====================  =========================================================================
image size            512 x 512
steps                 25 (Euler)
guidance              4.0 (FLUX.1-dev's distilled guidance embedding)
reference size        long side 512 for one reference, 320 for several (aspect kept, LANCZOS, each side
                      centre-cropped down to a multiple of 16): :meth:`UnoPolicy.prepare_references`;
                      every reference keeps its own size and token count (UnoPE offsets per reference)
time shift            FLUX's resolution-dependent shift ``mu`` on a line through (256, 0.5) and (4096, 1.15),
                      evaluated -- as UNO's code does -- at ``(W/8)(H/8)/256`` = 16 "tokens" for 512 px
                      (FLUX itself would use the 1024 packed tokens). That gives ``mu = 0.4594``, i.e. the
                      static shift ``exp(mu) = 1.583`` (see :func:`uno_sigmas`); UNO was trained with the same
                      schedule function.
====================  =========================================================================

Deviation: UNO samples the VAE posterior for references (BFL's ``DiagonalGaussian(sample=True)``); we use its
mean so that a reference always gives the same tokens (FLUX's posterior std is tiny).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cgrpo.policy.base import register
from cgrpo.policy.flux_backbone import (
    FluxBackbonePolicy,
    load_backbone_policy,
    resize_references,
    uno_style_references,
)
from cgrpo.sde import flux_mu, flux_sigmas

UNO_IMAGE_SIZE = 512
UNO_NUM_STEPS = 25
UNO_GUIDANCE = 4.0
UNO_REFERENCE_SIZE = 512  # one reference; UNO uses 320 for several (ratio 0.625 of this)
UNO_MULTI_REFERENCE_RATIO = 320 / 512


def uno_schedule_seq_len(height: int, width: int) -> int:
    """The sequence length UNO's ``get_schedule`` gets: ``(W / 8) * (H / 8) // 256`` (16 at 512 px)."""
    return (width // 8) * (height // 8) // (16 * 16)


def uno_shift(height: int = UNO_IMAGE_SIZE, width: int = UNO_IMAGE_SIZE) -> float:
    """UNO's time shift as a static shift ``exp(mu)`` (1.583 at 512 x 512)."""
    return math.exp(flux_mu(uno_schedule_seq_len(height, width)))


def uno_sigmas(num_steps: int = UNO_NUM_STEPS, height: int = UNO_IMAGE_SIZE, width: int = UNO_IMAGE_SIZE):
    """``[num_steps + 1]`` sigmas of UNO's ``get_schedule(num_steps, (W/8)(H/8)/256, shift=True)``."""
    return flux_sigmas(num_steps, image_seq_len=uno_schedule_seq_len(height, width))


class UnoPolicy(FluxBackbonePolicy):
    """UNO: FLUX.1-dev + UNO's DiT LoRA, UnoPE references, UNO's sampling defaults (module docstring)."""

    default_num_steps = UNO_NUM_STEPS

    def sigmas(self, num_steps: int | None = None) -> torch.Tensor:
        """UNO's schedule (:func:`uno_sigmas`) for this policy's image size."""
        return uno_sigmas(num_steps or self.num_steps, *self.image_size)

    def reference_long_side(self, count: int) -> int:
        """UNO's reference long side for ``count`` references: ``reference_size`` (default: the image's long
        side, i.e. 512) for one, 0.625 of it (320) for several."""
        size = self.reference_size or max(self.image_size)
        if count > 1 and self.reference_size is None:
            size = round(size * UNO_MULTI_REFERENCE_RATIO)
        return size

    def prepare_references(self, images: Sequence[Image.Image | torch.Tensor]) -> list[torch.Tensor]:
        """UNO's ``preprocess_ref`` on each reference: long side :meth:`reference_long_side`, aspect kept
        (LANCZOS), sides centre-cropped down to a multiple of 16 -- a 4:3 photo becomes 512 x 384."""
        images = list(images)
        return uno_style_references(images, self.reference_long_side(len(images)), self.codec.token_size)

    def preprocess_references(self, references: list[torch.Tensor]) -> list[torch.Tensor]:
        """UNO's rule on tensors that did not come through :meth:`prepare_references` (bicubic instead of
        LANCZOS); a no-op on prepared references."""
        size = self.reference_long_side(len(references))
        return [resize_references(reference, size, self.codec.token_size) for reference in references]


# --- loading -------------------------------------------------------------------------------------------


def load_uno(
    flux_path: str | Path,
    lora_path: str | Path | None = None,
    *,
    image_size: int | Sequence[int] = UNO_IMAGE_SIZE,
    guidance: float = UNO_GUIDANCE,
    lora_scale: float = 1.0,
    uno_lora_mode: str = "merge",
    **options: Any,
) -> UnoPolicy:
    """Build the ``uno`` policy (see the module docstring for the defaults). ``options``: ``dtype``,
    ``vae_dtype``, ``max_text_length``, ``device``, ``prompt_embeddings`` and the memory switches of
    :func:`~cgrpo.policy.flux_backbone.load_backbone_policy`.

    UNO's LoRA is merged on ``device`` when one is given. ``lora_path=None`` gives plain FLUX.1-dev with UnoPE
    references (useful only for tests and ablations).
    """
    from cgrpo.policy.uno_lora import add_uno_lora_adapter, load_uno_lora_file, merge_uno_lora

    if uno_lora_mode not in ("merge", "adapter"):
        raise ValueError(f"uno_lora_mode must be 'merge' or 'adapter', got {uno_lora_mode!r}")
    policy = load_backbone_policy(
        UnoPolicy, "uno", flux_path, image_size=image_size, guidance=guidance, **options
    )
    if lora_path is not None:
        state = load_uno_lora_file(lora_path)
        if uno_lora_mode == "merge":
            merge_uno_lora(policy.transformer, state, scale=lora_scale)
        else:
            add_uno_lora_adapter(policy.transformer, state, adapter_name="uno", scale=lora_scale)
    return policy.eval()


@register("uno", help="UNO on FLUX.1-dev from local checkpoints (flux_path=..., lora_path=...), 512 px")
def uno(**options: Any) -> UnoPolicy:
    if "flux_path" not in options:
        raise TypeError(
            "the uno policy needs flux_path=<diffusers FLUX.1-dev folder> "
            "(and lora_path=<UNO dit_lora.safetensors>)"
        )
    return load_uno(**options)
