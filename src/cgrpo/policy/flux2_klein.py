"""FLUX.2 [klein] as a reference-conditioned policy (``flux2-klein``).

Components of diffusers' ``Flux2KleinPipeline``: ``Flux2Transformer2DModel``, the ``AutoencoderKLFlux2`` VAE
(32 latent channels, 2x2 patchified to 128, normalised by the VAE's batch-norm running statistics) and a Qwen3
text encoder whose hidden states at three layers (default 9, 18, 27) are concatenated per token.

Conditioning follows ``Flux2KleinPipeline`` exactly (tested against it on tiny components):

- position ids have four axes ``(t, h, w, l)``: the target ``(0, row, col, 0)``; text ``(0, 0, 0, token)``;
  reference k ``(10 + 10 k, row, col, 0)`` -- references are told apart by the first axis, not by offsets;
- several reference images are supported (K tensors ``[B, 3, H_k, W_k]``, each at its own size and token
  count), their tokens concatenated after the target's; :meth:`Flux2KleinPolicy.prepare_references` sizes
  them as the pipeline does (at most 1 MP, sides floored to a multiple of 16, centre crop);
- no pooled text embedding (``Conditioning.pooled_prompt_embeds`` is ``[B, 0]``), no guidance embedding;
- the base (non-distilled) model uses classifier-free guidance with the empty prompt as negative
  (``cfg_scale``, default 4.0, one batched forward of 2B); step-distilled checkpoints (``is_distilled`` in the
  folder's ``model_index.json``) run without it;
- time shift: the pipeline's empirical ``mu(image_seq_len, num_steps)``, i.e. a static shift
  ``exp(mu)`` (:meth:`Flux2KleinPolicy.sigmas`). Default steps: 4 for distilled checkpoints, 50 for the base.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from cgrpo.imaging import pil_to_tensor
from cgrpo.policy.base import Conditioning, register
from cgrpo.policy.cache import OffloadedTextMixin, PromptCache, load_prompt_embeddings
from cgrpo.policy.flux import (
    POLICY_FILE,
    ReferenceFluxPolicy,
    VaeCodec,
    atomic_directory,
    pack,
    unpack,
)
from cgrpo.policy.flux_backbone import as_pil, parse_dtype, resize_references, uno_style_references
from cgrpo.sde import flux_sigmas

KLEIN_IMAGE_SIZE = 512
KLEIN_TEXT_LAYERS = (9, 18, 27)
KLEIN_MAX_TEXT_LENGTH = 512
KLEIN_REFERENCE_T_SCALE = 10  # reference k has t = 10 + 10 k
KLEIN_MAX_REFERENCE_AREA = 1024 * 1024  # the pipeline shrinks larger references to this area
# Attention projections of the double blocks (both streams) and the fused qkv+MLP / output projections of the
# single blocks. `attn.to_out` is a ModuleList in double blocks, a Linear in single ones: two alternatives.
FLUX2_LORA_TARGETS = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
)


def flux2_image_ids(height: int, width: int, t: float = 0.0) -> torch.Tensor:
    """``[height * width, 4]`` ids ``(t, row, col, 0)``, row-major (``Flux2Pipeline._prepare_latent_ids``)."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    ids = torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1)
    return ids.reshape(height * width, 4)


def flux2_text_ids(length: int) -> torch.Tensor:
    """``[length, 4]`` text ids ``(0, 0, 0, token index)``."""
    ids = torch.zeros(length, 4)
    ids[:, 3] = torch.arange(length, dtype=torch.float32)
    return ids


def flux2_reference_ids(grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[sum(h_k * w_k), 4]`` ids of K references: reference k at ``t = 10 + 10 k``."""
    chunks = [flux2_image_ids(h, w, t=KLEIN_REFERENCE_T_SCALE * (1 + k)) for k, (h, w) in enumerate(grids)]
    return torch.cat(chunks) if chunks else torch.zeros(0, 4)


def klein_shift(image_seq_len: int, num_steps: int) -> float:
    """The pipeline's empirical time shift as a static shift ``exp(mu)``."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return math.exp(compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps))


class Flux2VaeCodec(VaeCodec):
    """``AutoencoderKLFlux2``: posterior mean, 2x2 patches packed to ``4 * 32 = 128`` channels ordered
    ``(c, py, px)``, then normalised per channel by the VAE's batch-norm running mean and variance."""

    kind = "flux2-vae"

    def _stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.to(device, torch.float32)
        std = torch.sqrt(bn.running_var.to(device, torch.float32) + self.vae.config.batch_norm_eps)
        return mean.to(dtype), std.to(dtype)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, (H/16)(W/16), 128]``."""
        x = (images * 2.0 - 1.0).to(device=self.vae.device, dtype=self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mode()
        tokens = pack(latents, self.patch_size)
        mean, std = self._stats(tokens.device, tokens.dtype)
        return (tokens - mean) / std

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        mean, std = self._stats(tokens.device, torch.float32)
        tokens = tokens.float() * std + mean
        f = self.vae_scale_factor
        latents = unpack(tokens, height // f, width // f, self.patch_size).to(dtype=self.vae.dtype)
        images = self.vae.decode(latents, return_dict=False)[0]
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class Qwen3TextEncoder(nn.Module):
    """Klein's text side: the chat-templated prompt through Qwen3, the hidden states of ``layers`` stacked per
    token -> ``[B, L, len(layers) * hidden]``; no pooled embedding (``[B, 0]``)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        layers: Sequence[int] = KLEIN_TEXT_LAYERS,
        max_length: int = KLEIN_MAX_TEXT_LENGTH,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.layers = tuple(layers)
        self.max_length = max_length
        if max(self.layers) > model.config.num_hidden_layers:
            raise ValueError(
                f"text layers {self.layers} exceed the text encoder's {model.config.num_hidden_layers} layers"
            )

    @property
    def sequence_dim(self) -> int:
        return len(self.layers) * self.model.config.hidden_size

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for prompt in prompts
        ]
        batch = self.tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_length
        )
        device = next(self.model.parameters()).device
        output = self.model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = torch.stack([output.hidden_states[k] for k in self.layers], dim=2)  # [B, L, 3, H]
        embeds = hidden.flatten(2)
        return embeds, embeds.new_zeros(len(prompts), 0)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        torch_dtype: torch.dtype | None = None,
        layers: Sequence[int] = KLEIN_TEXT_LAYERS,
        max_length: int = KLEIN_MAX_TEXT_LENGTH,
    ) -> Qwen3TextEncoder:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(directory)
        model = AutoModelForCausalLM.from_pretrained(directory / "text_encoder", dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        return cls(model, tokenizer, layers=layers, max_length=max_length)


class Flux2KleinPolicy(OffloadedTextMixin, ReferenceFluxPolicy):
    """FLUX.2 [klein] policy. ``cfg_scale`` > 1 turns on classifier-free guidance (base checkpoints)."""

    pipeline_class_name = "Flux2KleinPipeline"
    default_lora_targets = FLUX2_LORA_TARGETS
    own_reference_sizes = True  # references preprocessed as Flux2KleinPipeline does, each at its own size

    def __init__(
        self,
        transformer: nn.Module,
        codec: Flux2VaeCodec,
        text_encoder: Qwen3TextEncoder,
        image_size: int | tuple[int, int] = KLEIN_IMAGE_SIZE,
        guidance: float | None = None,
        *,
        cfg_scale: float = 4.0,
        is_distilled: bool = False,
        num_steps: int | None = None,
        offload: bool = False,
        prompt_cache: int = 256,
        decode_batch: int = 4,
        reference_size: int | None = None,
    ) -> None:
        super().__init__(transformer, codec, text_encoder, image_size, guidance=guidance)
        self.register_buffer("_image_ids", flux2_image_ids(*self.grid), persistent=False)
        self.is_distilled = is_distilled
        self.cfg_scale = 1.0 if is_distilled else cfg_scale
        self.num_steps = num_steps or (4 if is_distilled else 50)
        self.offload = offload
        self.prompt_cache = PromptCache(prompt_cache)
        self.decode_batch = decode_batch
        self.reference_size = reference_size
        self._negative: torch.Tensor | None = None

    def sigmas(self, num_steps: int | None = None) -> torch.Tensor:
        """The pipeline's schedule: linear sigmas with the empirical shift for this size and step count."""
        steps = num_steps or self.num_steps
        return flux_sigmas(steps, shift=klein_shift(self.latent_shape[0], steps))

    def sampling_defaults(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "cfg_scale": self.cfg_scale, "image_size": list(self.image_size)}

    def guidance_tensor(self, batch_size: int) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        return torch.full((batch_size,), float(self.guidance or 1.0), device=self.device)

    @contextlib.contextmanager
    def override_guidance(self, scale: float) -> Iterator[None]:
        """Inside the block classifier-free guidance uses ``scale`` (Klein guides by CFG, no embedding)."""
        old, self.cfg_scale = self.cfg_scale, float(scale)
        try:
            yield
        finally:
            self.cfg_scale = old

    # --- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds, pooled = self._encode_text(list(prompts), self.device)
        return embeds, pooled, flux2_text_ids(embeds.shape[1]).to(embeds.device)

    def load_prompt_embeddings(self, path: str | Path) -> int:
        return load_prompt_embeddings(self.prompt_cache, path)

    def reference_ids(self, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``[R, 4]`` ids: reference k at ``t = 10 + 10 k``, each at its own grid (the pipeline's)."""
        return flux2_reference_ids(grids)

    def prepare_references(self, images: Sequence[Image.Image | torch.Tensor]) -> list[torch.Tensor]:
        """Flux2KleinPipeline's preprocessing of each reference: above 1 MP resized to 1 MP (aspect kept,
        LANCZOS), then each side floored to a multiple of 16 and centre-cropped, by the pipeline's
        ``Flux2ImageProcessor``. With ``reference_size``: UNO's rule at that long side instead."""
        multiple = self.codec.token_size
        if self.reference_size is not None:
            return uno_style_references(images, self.reference_size, multiple)
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        processor = Flux2ImageProcessor(vae_scale_factor=multiple)
        prepared = []
        for index, image in enumerate(images):
            image = as_pil(image)
            try:
                processor.check_image_input(image)
            except ValueError as error:
                raise ValueError(f"reference {index} cannot condition flux2-klein: {error}") from None
            if image.width * image.height > KLEIN_MAX_REFERENCE_AREA:
                image = processor._resize_to_target_area(image, KLEIN_MAX_REFERENCE_AREA)
            width, height = image.width // multiple * multiple, image.height // multiple * multiple
            prepared.append(pil_to_tensor(processor.resize(image, height, width, resize_mode="crop")))
        return prepared

    def preprocess_references(self, references: list[torch.Tensor]) -> list[torch.Tensor]:
        """UNO's rule at ``reference_size`` on tensors when that option is set; else as given."""
        if self.reference_size is None:
            return references
        return [resize_references(r, self.reference_size, self.codec.token_size) for r in references]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        step = self.decode_batch or len(latents)
        return torch.cat(
            [self.codec.decode(latents[i : i + step], *self.image_size) for i in range(0, len(latents), step)]
        )

    # --- the model -------------------------------------------------------------------------------------
    def _forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype, device = self.dtype, self.device
        n = latents.shape[1]
        hidden = torch.cat([latents.to(device, dtype), cond.reference_tokens.to(device, dtype)], dim=1)
        img_ids = torch.cat([self.image_ids().to(device), cond.reference_ids.to(device, torch.float32)])
        out = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=cond.prompt_embeds.to(device, dtype),
            timestep=sigma.to(dtype),
            img_ids=img_ids,
            txt_ids=cond.text_ids.to(device, torch.float32),
            guidance=cond.guidance.to(device, dtype) if cond.guidance is not None else None,
            return_dict=False,
        )[0]
        return out[:, :n].float()

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``[B, N, 128]`` velocity; with CFG ``v_uncond + s (v_cond - v_uncond)`` from one 2B forward."""
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, device=self.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(b)
        if self.cfg_scale <= 1.0:
            return self._forward(latents, sigma, cond)
        if self._negative is None:  # the empty prompt, encoded once (the pipeline's negative prompt)
            self._negative = self.encode_prompts([""])[0].cpu()
        negative = self._negative.to(self.device, cond.prompt_embeds.dtype).expand(b, -1, -1)
        if negative.shape[1] != cond.prompt_embeds.shape[1]:
            raise ValueError("the negative prompt's embedding length differs from the prompts'")
        both = Conditioning(
            torch.cat([cond.prompt_embeds.to(negative.device), negative]),
            torch.cat([cond.pooled_prompt_embeds] * 2),
            cond.text_ids,
            torch.cat([cond.reference_tokens] * 2),
            cond.reference_ids,
            torch.cat([cond.guidance] * 2) if cond.guidance is not None else None,
        )
        v_cond, v_uncond = self._forward(
            torch.cat([latents, latents]), torch.cat([sigma, sigma]), both
        ).chunk(2)
        return v_uncond + self.cfg_scale * (v_cond - v_uncond)

    # --- persistence -----------------------------------------------------------------------------------
    def policy_metadata(self) -> dict[str, Any]:
        return {
            **super().policy_metadata(),
            "text_layers": list(self.text_encoder.layers),
            "cfg_scale": self.cfg_scale,
            "is_distilled": self.is_distilled,
            "num_steps": self.num_steps,
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``policy.json`` (+ ``lora/``)."""
        from cgrpo.io import atomic_write_json

        with atomic_directory(directory) as tmp:
            self._save_transformer(tmp / "transformer")
            self.text_encoder.save_pretrained(tmp)
            self.codec.vae.save_pretrained(tmp / "vae")
            if self.has_lora:
                self.save_lora(tmp / "lora")
            atomic_write_json(tmp / POLICY_FILE, self.policy_metadata())

    @classmethod
    def from_pretrained(cls, directory: str | Path, **options: Any) -> Flux2KleinPolicy:
        """A folder of :meth:`save_pretrained` or a diffusers ``Flux2KleinPipeline`` folder."""
        return load_flux2_klein(directory, **options)


def load_flux2_klein(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    vae_dtype: str | torch.dtype | None = "float32",
    image_size: int | Sequence[int] | None = None,
    guidance: float | None = None,
    cfg_scale: float | None = None,
    is_distilled: bool | None = None,
    text_layers: Sequence[int] | None = None,
    max_text_length: int | None = None,
    num_steps: int | None = None,
    device: str | None = None,
    prompt_embeddings: str | Path | None = None,
    offload: bool = False,
    prompt_cache: int = 256,
    decode_batch: int = 4,
    reference_size: int | None = None,
) -> Flux2KleinPolicy:
    """Build the ``flux2-klein`` policy from a diffusers FLUX.2 [klein] folder (``transformer/``, ``vae/``,
    ``text_encoder/`` Qwen3, ``tokenizer/``, ``scheduler/``, ``model_index.json``) or a saved policy folder.

    ``is_distilled`` defaults to ``model_index.json``'s value; ``max_text_length`` to 512 (the pipeline's);
    options not given fall back to ``policy.json`` when the folder has one.
    """
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    path = Path(path)
    missing = [
        name for name in ("transformer", "vae", "text_encoder", "tokenizer") if not (path / name).is_dir()
    ]
    if missing:
        raise FileNotFoundError(
            f"{path} lacks {', '.join(m + '/' for m in missing)}: expected a diffusers FLUX.2 [klein] "
            "folder with transformer/, vae/, text_encoder/, tokenizer/"
        )
    meta: dict[str, Any] = {}
    if (path / POLICY_FILE).is_file():
        meta = json.loads((path / POLICY_FILE).read_text())
    elif (path / "model_index.json").is_file():
        meta = {
            "is_distilled": json.loads((path / "model_index.json").read_text()).get("is_distilled", False)
        }
    torch_dtype = parse_dtype(dtype)
    transformer = Flux2Transformer2DModel.from_pretrained(path / "transformer", torch_dtype=torch_dtype)
    vae = AutoencoderKLFlux2.from_pretrained(path / "vae", torch_dtype=parse_dtype(vae_dtype) or torch_dtype)
    text_encoder = Qwen3TextEncoder.from_pretrained(
        path,
        torch_dtype=torch_dtype,
        layers=text_layers or meta.get("text_layers", KLEIN_TEXT_LAYERS),
        max_length=max_text_length or meta.get("max_text_length", KLEIN_MAX_TEXT_LENGTH),
    )
    size = image_size or meta.get("image_size", KLEIN_IMAGE_SIZE)
    size = (size, size) if isinstance(size, int) else tuple(size)
    distilled = meta.get("is_distilled", False) if is_distilled is None else is_distilled
    policy = Flux2KleinPolicy(
        transformer,
        Flux2VaeCodec(vae),
        text_encoder,
        size,
        guidance=guidance if guidance is not None else meta.get("guidance"),
        cfg_scale=cfg_scale if cfg_scale is not None else meta.get("cfg_scale", 4.0),
        is_distilled=distilled,
        num_steps=num_steps or meta.get("num_steps"),
        offload=offload,
        prompt_cache=prompt_cache,
        decode_batch=decode_batch,
        reference_size=reference_size,
    )
    if device is not None:
        policy.to(device)
    if (path / "lora").is_dir():
        policy.load_lora(path / "lora")
    if prompt_embeddings is not None:
        policy.load_prompt_embeddings(prompt_embeddings)
    return policy.eval()


@register("flux2-klein", help="FLUX.2 klein from a local diffusers folder (path=...), several references")
def flux2_klein(**options: Any) -> Flux2KleinPolicy:
    if "path" not in options:
        raise TypeError("the flux2-klein policy needs path=<diffusers FLUX.2 [klein] folder>")
    return load_flux2_klein(**options)
