"""A UNO-style reference-conditioned flow policy on diffusers' :class:`FluxTransformer2DModel`.

UNO (Wu et al., 2025) conditions FLUX on reference images by *sequence concatenation*: the reference's packed
latent tokens are appended to the noisy image tokens, the transformer attends over
``[text tokens | image tokens | reference tokens]`` and only the first N image outputs are the velocity.
The reference tokens are clean latents (sigma 0) but share the sequence's single timestep embedding,
exactly as in UNO. Their rotary position ids are UNO's shifted ids ("UnoPE"): the reference grid is placed
diagonally after the generated image's grid (row and column ids offset by the target's packed height and
width), and every further reference continues the offset, so references never overlap the target.

The image side is pluggable (:class:`PixelCodec` for the mini world, :class:`VaeCodec` for FLUX's VAE) and the
text side is :class:`FluxTextEncoder` (CLIP pooled + T5 sequence, or CLIP only in the mini configuration).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

# atomic_directory is also imported from here by policy/flux2_klein.py, export.py and train/sft.py.
from cgrpo.io import atomic_directory, atomic_write_json
from cgrpo.policy.base import Conditioning, Policy

POLICY_FILE = "policy.json"
LORA_WEIGHTS = "adapter_model.safetensors"
ADAPTER = "default"
# Attention projections of every block plus the single blocks' MLP-in and fused output projection: the set
# common FLUX LoRAs train. A regex (peft full-matches it) so that the top-level `proj_out` is not caught.
DEFAULT_LORA_TARGETS = (
    r"(single_)?transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|proj_mlp|proj_out)"
)


# --- position ids -------------------------------------------------------------------------------------


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """``[height * width, 3]`` ids of a packed grid, row-major ``(0, row, col)`` (FluxPipeline's)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(width, dtype=torch.float32)[None, :]
    return ids.reshape(height * width, 3)


def uno_reference_ids(
    target_grid: tuple[int, int], reference_grids: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """UnoPE ids ``[sum(h_k * w_k), 3]`` of K references after a target of packed grid ``(h, w)``.

    Reference k's rows are offset by ``h + h_0 + ... + h_{k-1}`` and its columns by
    ``w + w_0 + ... + w_{k-1}`` (diagonally after the target and after the previous references); the first
    id axis stays 0.
    """
    row_offset, col_offset = target_grid
    chunks = []
    for ref_h, ref_w in reference_grids:
        ids = flux_image_ids(ref_h, ref_w)
        ids[:, 1] += row_offset
        ids[:, 2] += col_offset
        chunks.append(ids)
        row_offset += ref_h
        col_offset += ref_w
    return torch.cat(chunks) if chunks else torch.zeros(0, 3)


# --- packing -----------------------------------------------------------------------------------------


def pack(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/p)(W/p), C*p*p]``, channels ordered ``(c, py, px)`` like FluxPipeline's."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[B, N, C*p*p] -> [B, C, H, W]`` with ``H, W`` the unpacked size."""
    b, n, d = tokens.shape
    gh, gw = height // patch, width // patch
    if n != gh * gw:
        raise ValueError(f"{n} tokens do not form a {gh}x{gw} grid")
    c = d // (patch * patch)
    x = tokens.reshape(b, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


# --- image codecs ------------------------------------------------------------------------------------


def reference_list(references: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[B, 3, H, W]`` (one reference each), ``[B, K, 3, H, W]`` (K of one size) or a sequence of K
    tensors ``[B, 3, H_k, W_k]`` (each reference its own size) -> the K tensors ``[B, 3, H_k, W_k]``."""
    if isinstance(references, torch.Tensor):
        if references.ndim == 4:
            references = references[:, None]
        if references.ndim != 5 or references.shape[2] != 3:
            raise ValueError(
                f"references must be [B, 3, H, W], [B, K, 3, H, W] or a list of K [B, 3, H_k, W_k], "
                f"got {tuple(references.shape)}"
            )
        return list(references.unbind(1))
    references = list(references)
    for k, reference in enumerate(references):
        if reference.ndim != 4 or reference.shape[1] != 3 or len(reference) != len(references[0]):
            raise ValueError(
                f"reference {k} must be [B, 3, H, W] with the batch size {len(references[0])} of "
                f"reference 0, got {tuple(reference.shape)}"
            )
    return references


def reference_stack(references: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` (one reference each) or ``[B, K, 3, H, W]`` -> ``[B, K, 3, H, W]``, else an error."""
    return torch.stack(reference_list(references), dim=1)


class PixelCodec(nn.Module):
    """No autoencoder: pixels in [-1, 1] packed into ``3*p*p``-channel tokens (the mini world's "latents")."""

    kind = "pixel"

    def __init__(self, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size

    @property
    def channels(self) -> int:
        return 3 * self.patch_size**2

    @property
    def token_size(self) -> int:
        """Pixels per packed token side."""
        return self.patch_size

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Packed grid ``(rows, cols)`` of an image of ``height x width`` pixels."""
        return height // self.patch_size, width // self.patch_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, N, 3*p*p]`` in [-1, 1]."""
        return pack(images * 2.0 - 1.0, self.patch_size)

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, N, 3*p*p]`` -> ``[B, 3, H, W]`` in [0, 1] (clamped: samples can overshoot)."""
        return ((unpack(tokens.float(), height, width, self.patch_size) + 1.0) / 2.0).clamp(0.0, 1.0)


class VaeCodec(nn.Module):
    """FLUX's VAE: ``(latent - shift) * scale``, then 2x2 packing (``16 * 4 = 64`` channels for FLUX.1)."""

    kind = "vae"

    def __init__(self, vae: nn.Module, patch_size: int = 2) -> None:
        super().__init__()
        self.vae = vae
        self.patch_size = patch_size
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        return self.vae.config.latent_channels * self.patch_size**2

    @property
    def token_size(self) -> int:
        """Pixels per packed token side (16 for FLUX: VAE /8, then 2x2 patches)."""
        return self.vae_scale_factor * self.patch_size

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.token_size, width // self.token_size

    def _shift_scale(self) -> tuple[float, float]:
        shift = self.vae.config.shift_factor
        return (0.0 if shift is None else float(shift)), float(self.vae.config.scaling_factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, N, C*p*p]``; the posterior mean (deterministic references)."""
        shift, scale = self._shift_scale()
        x = (images * 2.0 - 1.0).to(device=self.vae.device, dtype=self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mode()
        return pack((latents - shift) * scale, self.patch_size)

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        shift, scale = self._shift_scale()
        f = self.vae_scale_factor
        latents = unpack(tokens, height // f, width // f, self.patch_size)
        latents = latents.to(dtype=self.vae.dtype) / scale + shift
        images = self.vae.decode(latents, return_dict=False)[0]
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


# --- text --------------------------------------------------------------------------------------------


class FluxTextEncoder(nn.Module):
    """FLUX's text side: CLIP gives the pooled embedding, T5 the sequence; CLIP's last hidden state is the
    sequence when no T5 is given (the mini configuration).

    Subfolders follow the diffusers FLUX layout: ``text_encoder/`` + ``tokenizer/`` (CLIP) and
    ``text_encoder_2/`` + ``tokenizer_2/`` (T5).
    """

    def __init__(
        self,
        clip: nn.Module,
        clip_tokenizer: Any,
        t5: nn.Module | None = None,
        t5_tokenizer: Any | None = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if (t5 is None) != (t5_tokenizer is None):
            raise ValueError("FluxTextEncoder needs both a T5 encoder and its tokenizer, or neither")
        self.clip = clip
        self.clip_tokenizer = clip_tokenizer
        self.t5 = t5
        self.t5_tokenizer = t5_tokenizer
        self.clip_max_length = min(clip_tokenizer.model_max_length, clip.config.max_position_embeddings)
        # The sequence length L: T5's (512 for FLUX.1-dev) or CLIP's when CLIP also gives the sequence.
        self.max_length = max_length or (512 if t5 is not None else self.clip_max_length)
        if t5 is None and self.max_length != self.clip_max_length:
            raise ValueError(
                f"max_length {self.max_length} must equal CLIP's length {self.clip_max_length} without T5"
            )

    @property
    def sequence_dim(self) -> int:
        return (self.t5 if self.t5 is not None else self.clip).config.hidden_size

    def _ids(
        self, tokenizer: Any, prompts: Sequence[str], max_length: int, device: torch.device
    ) -> torch.Tensor:
        batch = tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        return batch.input_ids.to(device)

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (sequence ``[B, L, D]``, pooled ``[B, P]``); with grad (SFT trains the mini one)."""
        clip_ids = self._ids(self.clip_tokenizer, prompts, self.clip_max_length, self.clip.device)
        # No attention mask, like FluxPipeline: CLIP is causal, so padding after EOS leaves the pooled EOS
        # state and every real token's state unchanged.
        clip_out = self.clip(clip_ids, output_hidden_states=False)
        pooled = clip_out.pooler_output
        if self.t5 is None:
            return clip_out.last_hidden_state, pooled
        t5_ids = self._ids(self.t5_tokenizer, prompts, self.max_length, self.t5.device)
        return self.t5(t5_ids, output_hidden_states=False)[0], pooled

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.clip.save_pretrained(directory / "text_encoder")
        self.clip_tokenizer.save_pretrained(directory / "tokenizer")
        if self.t5 is not None:
            self.t5.save_pretrained(directory / "text_encoder_2")
            self.t5_tokenizer.save_pretrained(directory / "tokenizer_2")

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, torch_dtype: torch.dtype | None = None, max_length: int | None = None
    ) -> FluxTextEncoder:
        from transformers import AutoTokenizer, CLIPTextModel

        directory = Path(directory)
        for sub in ("text_encoder", "tokenizer"):
            if not (directory / sub).is_dir():
                raise FileNotFoundError(f"{directory / sub} does not exist: expected a CLIP text model there")
        clip = CLIPTextModel.from_pretrained(directory / "text_encoder", dtype=torch_dtype)
        clip_tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        t5 = t5_tokenizer = None
        if (directory / "text_encoder_2").is_dir():
            from transformers import T5EncoderModel

            t5 = T5EncoderModel.from_pretrained(directory / "text_encoder_2", dtype=torch_dtype)
            t5_tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer_2")
        return cls(clip, clip_tokenizer, t5, t5_tokenizer, max_length=max_length)


# --- the policy --------------------------------------------------------------------------------------


class ReferenceFluxPolicy(Policy):
    """UNO-style policy: ``transformer`` (trained), ``codec`` and ``text_encoder`` (frozen during RL).

    ``image_size`` is the generated image's ``(height, width)`` in pixels; ``guidance`` the distilled guidance
    scale passed to guidance-embedding transformers (FLUX.1-dev), ignored otherwise.
    """

    default_lora_targets: str = DEFAULT_LORA_TARGETS  # the transformer's attention and MLP projections
    pipeline_class_name = "FluxPipeline"  # whose LoRA format `cgrpo export` writes

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        codec: PixelCodec | VaeCodec,
        text_encoder: FluxTextEncoder,
        image_size: int | tuple[int, int],
        guidance: float | None = None,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.codec = codec
        self.text_encoder = text_encoder
        self._image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.guidance = guidance
        # Frozen unless a trainer says otherwise (SFT trains the mini text encoder; RL never does).
        self.text_encoder.requires_grad_(False)
        self.codec.requires_grad_(False)
        grid = codec.grid(*self.image_size)
        if (grid[0] * codec.token_size, grid[1] * codec.token_size) != self.image_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the codec's token size")
        self.grid = grid
        in_channels = transformer.config.in_channels
        if in_channels != codec.channels:
            raise ValueError(f"transformer in_channels {in_channels} != codec channels {codec.channels}")
        self.register_buffer("_image_ids", flux_image_ids(*grid), persistent=False)

    # --- properties ------------------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.grid[0] * self.grid[1], self.codec.channels

    def image_ids(self) -> torch.Tensor:
        # float32 even after `policy.to(torch.bfloat16)` cast the buffer: bf16 integers are exact only to 256.
        return self._image_ids.float()

    def guidance_tensor(self, batch_size: int) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        scale = 3.5 if self.guidance is None else self.guidance
        return torch.full((batch_size,), float(scale), device=self.device)

    @contextlib.contextmanager
    def override_guidance(self, scale: float) -> Iterator[None]:
        """Inside the block the distilled guidance embedding gets ``scale`` (no effect without one)."""
        old, self.guidance = self.guidance, float(scale)
        try:
            yield
        finally:
            self.guidance = old

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    # --- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds, pooled = self.text_encoder(prompts)
        text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device)
        return embeds, pooled, text_ids

    def preprocess_references(self, references: list[torch.Tensor]) -> list[torch.Tensor]:
        """Resize the K references ``[B, 3, H_k, W_k]`` the way the backbone expects them (default: as given;
        :meth:`prepare_references` gives them the right size already)."""
        return references

    def reference_ids(self, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``[R, 3]`` position ids of K references of packed grids ``(h_k, w_k)``: UnoPE (UNO's)."""
        return uno_reference_ids(self.grid, grids)

    @torch.no_grad()
    def encode_references(
        self, references: torch.Tensor | Sequence[torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` (one reference each), ``[B, K, 3, H, W]`` (K each) or K tensors
        ``[B, 3, H_k, W_k]`` (each its own size), in [0, 1] -> tokens ``[B, R, C]`` (``R = sum h_k w_k``) and
        ids ``[R, 3]``; ``None`` gives R = 0 (text-only generation)."""
        if references is None:
            empty_ids = self.reference_ids([])
            return torch.zeros(0, 0, self.codec.channels, device=self.device), empty_ids.to(self.device)
        references = self.preprocess_references(reference_list(references))
        tokens = [self.codec.encode(reference.to(self.device)) for reference in references]
        ids = self.reference_ids([self.codec.grid(*reference.shape[-2:]) for reference in references])
        return torch.cat(tokens, dim=1), ids.to(self.device)

    def condition(
        self, prompts: Sequence[str], references: torch.Tensor | Sequence[torch.Tensor] | None
    ) -> Conditioning:
        embeds, pooled, text_ids = self.encode_prompts(prompts)
        tokens, ids = self.encode_references(references)
        if references is None:
            tokens = tokens.new_zeros(len(prompts), 0, self.codec.channels)
        return Conditioning(embeds, pooled, text_ids, tokens, ids, self.guidance_tensor(len(prompts)))

    # --- latents ---------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(images.to(self.device)).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents, *self.image_size)

    # --- the model -------------------------------------------------------------------------------------
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``[B, N, C]`` velocity of the image tokens; reference tokens ride along and are dropped after."""
        dtype, device = self.dtype, self.device
        b, n, _ = latents.shape
        sigma = torch.as_tensor(sigma, device=device)
        if sigma.ndim == 0:
            sigma = sigma.expand(b)
        hidden = torch.cat([latents.to(device, dtype), cond.reference_tokens.to(device, dtype)], dim=1)
        # Ids stay float32: bf16 cannot represent every integer position of large grids.
        img_ids = torch.cat([self.image_ids().to(device), cond.reference_ids.to(device, torch.float32)])
        guidance = cond.guidance.to(device, dtype) if cond.guidance is not None else None
        out = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=cond.prompt_embeds.to(device, dtype),
            pooled_projections=cond.pooled_prompt_embeds.to(device, dtype),
            timestep=sigma.to(dtype),  # the model multiplies by 1000, as FluxPipeline passes t / 1000
            img_ids=img_ids,
            txt_ids=cond.text_ids.to(device, torch.float32),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out[:, :n].float()

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    # --- LoRA ------------------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        # diffusers gives the transformer a `peft_config` only once an adapter is added.
        return ADAPTER in (getattr(self.transformer, "peft_config", None) or {})

    def add_lora(
        self,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        target_modules: Sequence[str] | str | None = None,
        init_lora_weights: bool | str = True,
    ) -> None:
        """Freeze the whole policy and inject LoRA adapters into the transformer (B zero-initialised, so
        the policy's outputs are unchanged). ``target_modules``: peft's list of name suffixes or a full-match
        regex; default :attr:`default_lora_targets`."""
        from peft import LoraConfig

        if self.has_lora:
            raise ValueError("this policy already has a LoRA adapter")
        targets: list[str] | str = (
            self.default_lora_targets
            if target_modules is None
            else target_modules
            if isinstance(target_modules, str)
            else list(target_modules)
        )
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            init_lora_weights=init_lora_weights,
        )
        self._inject_lora(config)

    def _inject_lora(self, config: Any) -> None:
        self.requires_grad_(False)
        self.transformer.add_adapter(config, adapter_name=ADAPTER)
        # Adapters are trained in float32 even on a bf16 base (standard mixed-precision LoRA practice).
        for name, param in self.transformer.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
                param.requires_grad_(True)

    @contextlib.contextmanager
    def disable_lora(self) -> Iterator[None]:
        """Run as the frozen base inside the block (peft's adapter switch): the reference model of the KL
        penalty and of DPO. Without an adapter the policy already is its base."""
        if not self.has_lora:
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora:
            raise ValueError("this policy has no LoRA adapter; call add_lora first")
        return get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER)

    def save_lora(self, directory: str | Path) -> None:
        """``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format), written atomically."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.lora_state_dict().items()}
        with atomic_directory(directory) as tmp:
            self.transformer.peft_config[ADAPTER].save_pretrained(tmp)
            save_file(state, tmp / LORA_WEIGHTS)

    def load_lora(self, directory: str | Path) -> None:
        """Load adapter weights saved by :meth:`save_lora`, injecting the adapter first if needed."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        weights = directory / LORA_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} does not exist: expected a LoRA saved by save_lora")
        if not self.has_lora:
            self._inject_lora(LoraConfig.from_pretrained(directory))
        result = set_peft_model_state_dict(self.transformer, load_file(weights), adapter_name=ADAPTER)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{weights}: keys that match no LoRA module: {', '.join(unexpected[:5])}")

    # --- persistence -----------------------------------------------------------------------------------
    def policy_metadata(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "codec": self.codec.kind,
            "patch_size": self.codec.patch_size,
            "image_size": list(self.image_size),
            "max_text_length": self.text_encoder.max_length,
            "guidance": self.guidance,
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """One diffusers/transformers subfolder per component plus ``policy.json``; a LoRA goes to ``lora/``
        and the transformer's base weights are saved without it. Written atomically."""
        with atomic_directory(directory) as tmp:
            self._save_transformer(tmp / "transformer")
            self.text_encoder.save_pretrained(tmp)
            if isinstance(self.codec, VaeCodec):
                self.codec.vae.save_pretrained(tmp / "vae")
            if self.has_lora:
                self.save_lora(tmp / "lora")
            atomic_write_json(tmp / POLICY_FILE, self.policy_metadata())

    def _save_transformer(self, directory: Path) -> None:
        if not self.has_lora:
            self.transformer.save_pretrained(directory)
            return
        from safetensors.torch import save_file

        # peft wraps targets as `<name>.base_layer`; strip it and drop adapter tensors to get the base model.
        state = {
            key.replace(".base_layer.", "."): value.detach().contiguous().cpu()
            for key, value in self.transformer.state_dict().items()
            if "lora_" not in key
        }
        directory.mkdir(parents=True, exist_ok=True)
        self.transformer.save_config(directory)
        save_file(state, directory / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, torch_dtype: torch.dtype | None = None, **options: Any
    ) -> ReferenceFluxPolicy:
        """Load a directory written by :meth:`save_pretrained`, or a diffusers FLUX directory (without
        ``policy.json``: VAE codec, 2x2 patches, 512x512 images, T5 length 512, guidance 3.5). ``options``
        override ``policy.json`` (``image_size``, ``guidance``, ``max_text_length``)."""
        directory = Path(directory)
        if not (directory / "transformer").is_dir():
            raise FileNotFoundError(
                f"{directory} is not a policy directory: expected a transformer/ subfolder (save_pretrained)"
            )
        meta: dict[str, Any] = {"codec": "vae", "patch_size": 2, "image_size": [512, 512], "guidance": 3.5}
        if (directory / POLICY_FILE).is_file():
            meta.update(json.loads((directory / POLICY_FILE).read_text()))
        unknown = set(options) - {"image_size", "guidance", "max_text_length"}
        if unknown:
            raise TypeError(f"unknown policy option(s): {', '.join(sorted(unknown))}")
        meta.update(options)

        transformer = FluxTransformer2DModel.from_pretrained(
            directory / "transformer", torch_dtype=torch_dtype
        )
        text_encoder = FluxTextEncoder.from_pretrained(
            directory, torch_dtype=torch_dtype, max_length=meta.get("max_text_length")
        )
        if meta["codec"] == "pixel":
            codec: PixelCodec | VaeCodec = PixelCodec(meta["patch_size"])
        elif meta["codec"] == "vae":
            from diffusers import AutoencoderKL

            codec = VaeCodec(AutoencoderKL.from_pretrained(directory / "vae", torch_dtype=torch_dtype))
        else:
            raise ValueError(
                f"{directory / POLICY_FILE}: codec must be 'pixel' or 'vae', got {meta['codec']!r}"
            )
        image_size = meta["image_size"]
        policy = cls(transformer, codec, text_encoder, tuple(image_size), guidance=meta.get("guidance"))
        if (directory / "lora").is_dir():
            policy.load_lora(directory / "lora")
        return policy.eval()
