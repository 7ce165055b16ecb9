"""The FLUX.1 backbone shared by the ``uno`` and ``flux-kontext`` policies (``flux2-klein`` uses its dtype
names and reference resizing): :class:`FluxBackbonePolicy`, a :class:`~cgrpo.policy.flux.ReferenceFluxPolicy`
on real diffusers components with the memory switches, and the loading of a diffusers FLUX.1 folder.

A backbone module (:mod:`cgrpo.policy.uno`, :mod:`cgrpo.policy.kontext`) adds only what differs: the reference
ids and preprocessing, the sampling defaults and its adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from PIL import Image

from cgrpo.imaging import pil_to_tensor, tensor_to_pil, uno_preprocess_ref
from cgrpo.policy.cache import OffloadedTextMixin, PromptCache, load_prompt_embeddings
from cgrpo.policy.flux import FluxTextEncoder, ReferenceFluxPolicy, VaeCodec
from cgrpo.sde import flux_sigmas

FLUX_IMAGE_SIZE = 512  # the RL resolution of the FLUX.1 policies (UNO's)
FLUX_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / a ``torch.dtype`` / None -> ``torch.dtype`` or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[value]


def resize_references(references: torch.Tensor, long_side: int, multiple: int) -> torch.Tensor:
    """UNO's ``preprocess_ref`` on tensors: scale so the long side is ``long_side`` (aspect kept), then
    centre-crop both sides down to a multiple of ``multiple``.

    ``references``: ``[..., 3, H, W]`` in [0, 1] -> ``[..., 3, H', W']``. Unchanged if already that size.
    """
    h, w = references.shape[-2:]
    if h >= w:
        new_h, new_w = long_side, int(long_side / h * w)
    else:
        new_h, new_w = int(long_side / w * h), long_side
    lead = references.shape[:-3]
    x = references.reshape(-1, *references.shape[-3:])
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    crop_h, crop_w = new_h // multiple * multiple, new_w // multiple * multiple
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    x = x[..., top : top + crop_h, left : left + crop_w]
    return x.reshape(*lead, *x.shape[-3:])


def as_pil(image: Image.Image | torch.Tensor) -> Image.Image:
    """A reference as an RGB PIL image (``[3, H, W]`` tensors in [0, 1] are quantised to 8 bits, which is
    lossless for images read from 8-bit files)."""
    return tensor_to_pil(image) if isinstance(image, torch.Tensor) else image.convert("RGB")


def uno_style_references(
    images: Sequence[Image.Image | torch.Tensor], long_side: int, multiple: int
) -> list[torch.Tensor]:
    """UNO's reference preprocessing (:func:`~cgrpo.imaging.uno_preprocess_ref`) of each image, as tensors."""
    return [pil_to_tensor(uno_preprocess_ref(as_pil(image), long_side, multiple)) for image in images]


class FluxBackbonePolicy(OffloadedTextMixin, ReferenceFluxPolicy):
    """A FLUX.1 reference policy on real (or tiny) diffusers components, with the memory switches:

    - ``offload``: the text encoders live on the CPU and visit the GPU only to encode cache misses;
    - ``prompt_cache``: LRU of prompt embeddings (0 disables it); ``prompt_embeddings``: a file written by
      :func:`~cgrpo.policy.cache.precompute_prompt_embeddings`, loaded pinned into the cache;
    - ``decode_batch``: VAE decode micro-batch (the decoder's activations dominate memory at 512 px).

    ``num_steps`` is the default number of sampling steps (:mod:`cgrpo.sample`); :meth:`sigmas` the schedule.
    """

    default_num_steps = 28
    own_reference_sizes = True  # each backbone preprocesses references as its pipeline does

    def __init__(
        self,
        transformer,
        codec,
        text_encoder: FluxTextEncoder,
        image_size: int | tuple[int, int] = FLUX_IMAGE_SIZE,
        guidance: float | None = None,
        *,
        offload: bool = False,
        prompt_cache: int = 256,
        decode_batch: int = 4,
        reference_size: int | None = None,
        num_steps: int | None = None,
    ) -> None:
        super().__init__(transformer, codec, text_encoder, image_size, guidance=guidance)
        self.offload = offload
        self.prompt_cache = PromptCache(prompt_cache)
        self.decode_batch = decode_batch
        self.reference_size = reference_size
        self.num_steps = num_steps or self.default_num_steps

    def sigmas(self, num_steps: int | None = None) -> torch.Tensor:
        """The sampling schedule: FLUX's resolution-dependent shift at this image's token count."""
        return flux_sigmas(num_steps or self.num_steps, image_seq_len=self.latent_shape[0])

    def sampling_defaults(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "guidance": self.guidance, "image_size": list(self.image_size)}

    # --- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds, pooled = self._encode_text(list(prompts), self.device)
        text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device)
        return embeds, pooled, text_ids

    def load_prompt_embeddings(self, path: str | Path) -> int:
        return load_prompt_embeddings(self.prompt_cache, path)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        step = self.decode_batch or len(latents)
        return torch.cat(
            [
                super(FluxBackbonePolicy, self).decode(latents[i : i + step])
                for i in range(0, len(latents), step)
            ]
        )


# --- loading -------------------------------------------------------------------------------------------


def check_flux_directory(path: str | Path, components: Sequence[str] = FLUX_COMPONENTS) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"flux_path {path} does not exist: expected a diffusers-format FLUX folder")
    missing = [name for name in components if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"flux_path {path} lacks {', '.join(m + '/' for m in missing)}: expected a diffusers-format FLUX "
            f"folder with {', '.join(c + '/' for c in components)}"
        )
    return path


def load_flux_components(
    flux_path: str | Path,
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = torch.float32,
    max_text_length: int | None = None,
    transformer_class=None,
):
    """``(transformer, VaeCodec, FluxTextEncoder)`` from a diffusers FLUX folder.

    ``dtype`` applies to the transformer and the text encoders; the VAE is float32 by default (its decoder is
    small and bf16 decoding costs image quality). ``max_text_length`` defaults to ``min(512, T5 tokenizer's
    model_max_length)`` (512 for FLUX.1-dev).
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer

    path = check_flux_directory(flux_path)
    transformer_class = transformer_class or FluxTransformer2DModel
    transformer = transformer_class.from_pretrained(path / "transformer", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=vae_dtype or dtype)
    if max_text_length is None:
        max_text_length = min(512, AutoTokenizer.from_pretrained(path / "tokenizer_2").model_max_length)
    text_encoder = FluxTextEncoder.from_pretrained(path, torch_dtype=dtype, max_length=max_text_length)
    return transformer, VaeCodec(vae), text_encoder


B = TypeVar("B", bound=FluxBackbonePolicy)
BACKBONE_SWITCHES = ("offload", "prompt_cache", "decode_batch", "reference_size", "num_steps")


def load_backbone_policy(
    policy_class: type[B],
    policy_name: str,
    flux_path: str | Path,
    *,
    image_size: int | Sequence[int],
    guidance: float,
    dtype: str | torch.dtype | None = None,
    vae_dtype: str | torch.dtype | None = "float32",
    max_text_length: int | None = None,
    device: str | None = None,
    prompt_embeddings: str | Path | None = None,
    **options: Any,
) -> B:
    """``policy_class`` on the components of a diffusers FLUX.1 folder (:func:`load_flux_components`).

    ``device``: the policy is moved there right after loading (adapters are then merged on it, fast on a
    GPU); the text encoders stay on the CPU with ``offload=True``. ``prompt_embeddings``: a file of
    precomputed prompt embeddings loaded into the cache. ``options``: :class:`FluxBackbonePolicy`'s memory
    switches (:data:`BACKBONE_SWITCHES`); anything else is an error naming ``policy_name``. The policy is left
    in training mode: the caller adds its adapters (UNO's LoRA) and then calls ``.eval()``.
    """
    switches = {k: options.pop(k) for k in BACKBONE_SWITCHES if k in options}
    if options:
        raise TypeError(f"unknown {policy_name} policy option(s): {', '.join(sorted(options))}")
    transformer, codec, text_encoder = load_flux_components(
        flux_path, parse_dtype(dtype), parse_dtype(vae_dtype), max_text_length
    )
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    policy = policy_class(transformer, codec, text_encoder, size, guidance=guidance, **switches)
    if device is not None:
        policy.to(device)
    if prompt_embeddings is not None:
        policy.load_prompt_embeddings(prompt_embeddings)
    return policy
