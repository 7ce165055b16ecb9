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
references) -- :class:`~cgrpo.policy.flux.ReferenceFluxPolicy` implements it; this module adds loading, UNO's
sampling defaults, reference preprocessing, prompt caching and text-encoder offload.

UNO's inference defaults (``inference.py`` / ``UNOPipeline`` of bytedance/UNO), used here:

====================  =========================================================================
image size            512 x 512
steps                 25 (Euler)
guidance              4.0 (FLUX.1-dev's distilled guidance embedding)
reference size        long side 512 for one reference, 320 for several (aspect kept, multiple of 16)
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
import torch.nn.functional as F

from cgrpo.policy.base import register
from cgrpo.policy.cache import OffloadedTextMixin, PromptCache, load_prompt_embeddings
from cgrpo.policy.flux import FluxTextEncoder, ReferenceFluxPolicy, VaeCodec
from cgrpo.sde import flux_mu, flux_sigmas

UNO_IMAGE_SIZE = 512
UNO_NUM_STEPS = 25
UNO_GUIDANCE = 4.0
UNO_REFERENCE_SIZE = 512  # one reference; UNO uses 320 for several (ratio 0.625 of this)
UNO_MULTI_REFERENCE_RATIO = 320 / 512
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


def uno_schedule_seq_len(height: int, width: int) -> int:
    """The sequence length UNO's ``get_schedule`` gets: ``(W / 8) * (H / 8) // 256`` (16 at 512 px)."""
    return (width // 8) * (height // 8) // (16 * 16)


def uno_shift(height: int = UNO_IMAGE_SIZE, width: int = UNO_IMAGE_SIZE) -> float:
    """UNO's time shift as a static shift ``exp(mu)`` (1.583 at 512 x 512)."""
    return math.exp(flux_mu(uno_schedule_seq_len(height, width)))


def uno_sigmas(num_steps: int = UNO_NUM_STEPS, height: int = UNO_IMAGE_SIZE, width: int = UNO_IMAGE_SIZE):
    """``[num_steps + 1]`` sigmas of UNO's ``get_schedule(num_steps, (W/8)(H/8)/256, shift=True)``."""
    return flux_sigmas(num_steps, image_seq_len=uno_schedule_seq_len(height, width))


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


class FluxBackbonePolicy(OffloadedTextMixin, ReferenceFluxPolicy):
    """A FLUX.1 reference policy on real (or tiny) diffusers components, with the memory switches:

    - ``offload``: the text encoders live on the CPU and visit the GPU only to encode cache misses;
    - ``prompt_cache``: LRU of prompt embeddings (0 disables it); ``prompt_embeddings``: a file written by
      :func:`~cgrpo.policy.cache.precompute_prompt_embeddings`, loaded pinned into the cache;
    - ``decode_batch``: VAE decode micro-batch (the decoder's activations dominate memory at 512 px).

    ``num_steps`` is the default number of sampling steps (:mod:`cgrpo.sample`); :meth:`sigmas` the schedule.
    """

    default_num_steps = 28
    pipeline_class_name = "FluxPipeline"

    def __init__(
        self,
        transformer,
        codec,
        text_encoder: FluxTextEncoder,
        image_size: int | tuple[int, int] = UNO_IMAGE_SIZE,
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

    @property
    def token_size(self) -> int:
        """Pixels per packed token side (16 for FLUX: VAE /8, then 2x2 patches)."""
        return self.codec.patch_size * getattr(self.codec, "vae_scale_factor", 1)

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

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

    def preprocess_references(self, references: torch.Tensor) -> torch.Tensor:
        """Resize ``[B, 3, H, W]`` / ``[B, K, 3, H, W]`` references the way the backbone expects them."""
        return references

    @torch.no_grad()
    def encode_references(self, references: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if references is not None:
            references = self.preprocess_references(references)
        return super().encode_references(references)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        step = self.decode_batch or len(latents)
        return torch.cat(
            [
                super(FluxBackbonePolicy, self).decode(latents[i : i + step])
                for i in range(0, len(latents), step)
            ]
        )


class UnoPolicy(FluxBackbonePolicy):
    """UNO: FLUX.1-dev + UNO's DiT LoRA, UnoPE references, UNO's sampling defaults (module docstring)."""

    default_num_steps = UNO_NUM_STEPS

    def sigmas(self, num_steps: int | None = None) -> torch.Tensor:
        """UNO's schedule (:func:`uno_sigmas`) for this policy's image size."""
        return uno_sigmas(num_steps or self.num_steps, *self.image_size)

    def preprocess_references(self, references: torch.Tensor) -> torch.Tensor:
        """UNO's reference preprocessing: long side ``reference_size`` (default: the image's long side, i.e.
        512) for one reference, 0.625 of it (320) for several; sides cropped to a multiple of 16."""
        several = references.ndim == 5 and references.shape[1] > 1
        size = self.reference_size or max(self.image_size)
        if several and self.reference_size is None:
            size = round(size * UNO_MULTI_REFERENCE_RATIO)
        return resize_references(references, size, self.token_size)


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


def _policy_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    keys = ("offload", "prompt_cache", "decode_batch", "reference_size", "num_steps")
    return {k: options.pop(k) for k in keys if k in options}


def load_uno(
    flux_path: str | Path,
    lora_path: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    vae_dtype: str | torch.dtype | None = "float32",
    image_size: int | Sequence[int] = UNO_IMAGE_SIZE,
    guidance: float = UNO_GUIDANCE,
    lora_scale: float = 1.0,
    uno_lora_mode: str = "merge",
    max_text_length: int | None = None,
    device: str | None = None,
    prompt_embeddings: str | Path | None = None,
    **options: Any,
) -> UnoPolicy:
    """Build the ``uno`` policy (see the module docstring for the defaults).

    ``device``: move the policy there right after loading, so that UNO's LoRA is merged on it (fast on a GPU);
    the text encoders stay on the CPU with ``offload=True``. ``lora_path=None`` gives plain FLUX.1-dev with
    UnoPE references (useful only for tests and ablations).
    """
    from cgrpo.policy.uno_lora import add_uno_lora_adapter, load_uno_lora_file, merge_uno_lora

    kwargs = _policy_kwargs(options)
    if options:
        raise TypeError(f"unknown uno policy option(s): {', '.join(sorted(options))}")
    if uno_lora_mode not in ("merge", "adapter"):
        raise ValueError(f"uno_lora_mode must be 'merge' or 'adapter', got {uno_lora_mode!r}")
    transformer, codec, text_encoder = load_flux_components(
        flux_path, parse_dtype(dtype), parse_dtype(vae_dtype), max_text_length
    )
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    policy = UnoPolicy(transformer, codec, text_encoder, size, guidance=guidance, **kwargs)
    if device is not None:
        policy.to(device)
    if lora_path is not None:
        state = load_uno_lora_file(lora_path)
        if uno_lora_mode == "merge":
            merge_uno_lora(policy.transformer, state, scale=lora_scale)
        else:
            add_uno_lora_adapter(policy.transformer, state, adapter_name="uno", scale=lora_scale)
    if prompt_embeddings is not None:
        policy.load_prompt_embeddings(prompt_embeddings)
    return policy.eval()


@register("uno", help="UNO on FLUX.1-dev from local checkpoints (flux_path=..., lora_path=...), 512 px")
def uno(**options: Any) -> UnoPolicy:
    if "flux_path" not in options:
        raise TypeError(
            "the uno policy needs flux_path=<diffusers FLUX.1-dev folder> "
            "(and lora_path=<UNO dit_lora.safetensors>)"
        )
    return load_uno(**options)


# --- tiny components for tests and the CPU benchmark ------------------------------------------------------

TINY_FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,  # 4 VAE channels x 2x2 packing
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
TINY_TEXT_LENGTH = 16


def _tiny_clip(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cgrpo.rewards.tiny import _byte_alphabet  # the same byte alphabet as the tiny reward models

    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_TEXT_LENGTH)
    torch.manual_seed(seed)
    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=TINY_TEXT_LENGTH,
            projection_dim=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    return model, tokenizer


def _tiny_t5(seed: int):
    import string

    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_letters]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TINY_TEXT_LENGTH)
    torch.manual_seed(seed + 1)
    model = T5EncoderModel(
        T5Config(
            vocab_size=len(pieces),
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return model, tokenizer


def tiny_flux_vae(seed: int = 0, latent_channels: int = 4):
    """A ~20k-parameter ``AutoencoderKL`` with FLUX's latent scaling (2x downsampling instead of 8x)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 2)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.3611,  # FLUX.1's values
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def flux_scheduler():
    """FLUX.1-dev's scheduler config (dynamic shift between seq lens 256 and 4096)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def save_tiny_flux(
    directory: str | Path,
    seed: int = 0,
    pipeline: str = "FluxPipeline",
    transformer_config: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Random tiny FLUX.1 components in the diffusers folder layout (``pipeline.save_pretrained``), e.g.
    ``FluxPipeline`` or ``FluxKontextPipeline``. Returns ``{"flux_path": directory}``."""
    import diffusers
    from diffusers import FluxTransformer2DModel

    clip, clip_tokenizer = _tiny_clip(seed)
    t5, t5_tokenizer = _tiny_t5(seed)
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(**(transformer_config or TINY_FLUX_TRANSFORMER))
    pipe = getattr(diffusers, pipeline)(
        scheduler=flux_scheduler(),
        vae=tiny_flux_vae(seed),
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)
    return {"flux_path": str(directory)}


def save_tiny_uno(directory: str | Path, seed: int = 0, lora_rank: int = 4) -> dict[str, str]:
    """Tiny FLUX components plus a random UNO-format LoRA (``dit_lora.safetensors``) under ``directory``.
    Returns the ``uno`` policy options ``{"flux_path": ..., "lora_path": ...}``."""
    from safetensors.torch import save_file

    from cgrpo.policy.uno_lora import random_uno_lora

    directory = Path(directory)
    options = save_tiny_flux(directory / "flux", seed=seed)
    lora = random_uno_lora(TINY_FLUX_TRANSFORMER, rank=lora_rank, seed=seed)
    save_file(lora, str(directory / "dit_lora.safetensors"))
    return {**options, "lora_path": str(directory / "dit_lora.safetensors")}
