"""The policy contract (:class:`Policy`, an abstract base class) shared by the mini world and the real
backbones, and the policy registry.

A policy is a reference-conditioned flow-matching generator in *token space*: latents are packed tokens
``[B, N, C]`` (N image tokens of C channels) with position ids ``[N, 3]``, as diffusers' FLUX models use.
Trainers, samplers, evaluation and export only talk to this interface, so the mini policy (pixels in 4x4
patches, tiny transformer) and UNO on FLUX.1-dev (VAE latents in 2x2 patches, full transformer) run through
exactly the same loop.

Sigma convention: ``sigma`` in [0, 1], 1 = pure noise, 0 = clean; ``x_sigma = (1 - sigma) x0 + sigma noise``
and the model predicts the velocity ``noise - x0`` (rectified flow, Eq. 3-4 of the paper).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from cgrpo.registry import Registry
from cgrpo.sde import flux_sigmas


@dataclass
class Conditioning:
    """Everything the transformer needs besides the noisy latents. Batch-first tensors.

    - ``prompt_embeds``: ``[B, L, D]`` text sequence embeddings;
    - ``pooled_prompt_embeds``: ``[B, P]`` pooled text embedding;
    - ``text_ids``: ``[L, 3]`` text position ids (zeros for FLUX);
    - ``reference_tokens``: ``[B, R, C]`` packed reference-image latents (R may be 0);
    - ``reference_ids``: ``[R, 3]`` their position ids (UNO's shifted UnoPE ids);
    - ``guidance``: ``[B]`` guidance scale for guidance-distilled models (FLUX.1-dev), else None.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    reference_tokens: torch.Tensor
    reference_ids: torch.Tensor
    guidance: torch.Tensor | None = None

    _BATCHED = ("prompt_embeds", "pooled_prompt_embeds", "reference_tokens", "guidance")

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map_batched(self, fn) -> Conditioning:
        changes = {name: fn(getattr(self, name)) for name in self._BATCHED if getattr(self, name) is not None}
        return replace(self, **changes)

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each condition ``repeats`` times in a row: ``[B, ...] -> [B * repeats, ...]`` (a group of G)."""
        return self._map_batched(lambda t: t.repeat_interleave(repeats, dim=0))

    def index(self, index: torch.Tensor | slice) -> Conditioning:
        """Select a sub-batch (a micro-batch of a rollout or of a training step)."""
        return self._map_batched(lambda t: t[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return replace(
            self, **{f.name: move(v) for f in fields(self) if (v := getattr(self, f.name)) is not None}
        )

    @staticmethod
    def cat(conditions: Sequence[Conditioning]) -> Conditioning:
        first = conditions[0]
        changes = {}
        for name in Conditioning._BATCHED:
            if getattr(first, name) is not None:
                changes[name] = torch.cat([getattr(c, name) for c in conditions], dim=0)
        return replace(first, **changes)


class Policy(nn.Module, ABC):
    """The contract of a reference-conditioned flow policy: the trainers, samplers, evaluation and export call
    only these members, directly. Subclasses implement every ``@abstractmethod`` (Python refuses to build one
    that does not, naming the missing members); the concrete members are defaults that are right for every
    policy and may be overridden (:meth:`sigmas` for a backbone's own schedule, :meth:`guidance_tensor` for
    guidance-distilled models).

    ``transformer`` is the module whose (LoRA) parameters are trained; text encoders and the image codec
    are frozen.
    """

    transformer: nn.Module
    default_num_steps: int = 28  # sampling steps when a caller asks for the policy's default (None)

    # --- conditioning -------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts -> (``prompt_embeds [B, L, D]``, ``pooled [B, P]``, ``text_ids [L, 3]``), no grad."""

    # True when :meth:`prepare_references` keeps each reference at its own size (aspect ratio) instead of
    # the generated image's square: datasets then hand the policy decoded images to prepare (UNO, Kontext,
    # FLUX.2 [klein]), and a training batch only mixes examples whose references share their sizes.
    own_reference_sizes: bool = False

    def prepare_references(self, images: Sequence[Image.Image | torch.Tensor]) -> list[torch.Tensor]:
        """The K references of one sample as the backbone's pipeline preprocesses them: PIL images (or
        ``[3, H, W]`` tensors in [0, 1]) -> ``[3, H_k, W_k]`` float tensors in [0, 1], each at its own size.

        Default (the mini policy): a square of the generated image's size, as the datasets make it -- PIL
        images are LANCZOS-resized to cover it and centre-cropped, tensors centre-cropped to a square and
        resized bicubically (antialiased)."""
        from cgrpo.data.formats import fit
        from cgrpo.imaging import pil_to_tensor, square_resize

        height, width = self.image_size
        prepared = []
        for image in images:
            if isinstance(image, torch.Tensor) and height == width:
                prepared.append(square_resize(image.float(), height))
            else:
                if isinstance(image, torch.Tensor):
                    from cgrpo.imaging import tensor_to_pil

                    image = tensor_to_pil(image)
                prepared.append(pil_to_tensor(fit(image.convert("RGB"), (height, width))))
        return prepared

    @abstractmethod
    def encode_references(
        self, references: torch.Tensor | Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference images in [0, 1] -> (``tokens [B, R, C]``, ``ids [R, 3]``), no grad. ``references``:
        ``[B, 3, H, W]`` (one each), ``[B, K, 3, H, W]`` (K of one size) or a sequence of K tensors
        ``[B, 3, H_k, W_k]`` (each reference its own size and token count)."""

    def condition(
        self, prompts: Sequence[str], references: torch.Tensor | Sequence[torch.Tensor]
    ) -> Conditioning:
        """One :class:`Conditioning` for B (prompt, reference) pairs."""
        prompt_embeds, pooled, text_ids = self.encode_prompts(prompts)
        tokens, ids = self.encode_references(references)
        return Conditioning(prompt_embeds, pooled, text_ids, tokens, ids, self.guidance_tensor(len(prompts)))

    def guidance_tensor(self, batch_size: int) -> torch.Tensor | None:
        """``[B]`` scale of a guidance-embedding transformer (FLUX.1-dev); default None: no such embedding."""
        return None

    @abstractmethod
    def override_guidance(self, scale: float) -> contextlib.AbstractContextManager[None]:
        """A context manager inside which the policy samples with guidance ``scale``: the distilled guidance
        embedding's scale (FLUX.1-dev, UNO, Kontext) or the classifier-free guidance scale (FLUX.2 klein)."""

    # --- latents and images ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels of a generated image."""

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int]:
        """(N tokens, C channels) of one image's packed latents."""

    @abstractmethod
    def image_ids(self) -> torch.Tensor:
        """``[N, 3]`` position ids of the generated image's tokens."""

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, N, C]`` standard normal latents (float32, on CPU when the generator is a CPU one)."""
        n, c = self.latent_shape
        return torch.randn(batch_size, n, c, generator=generator, dtype=torch.float32)

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> clean latents ``[B, N, C]`` (flow-matching targets)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents ``[B, N, C]`` -> images ``[B, 3, H, W]`` in [0, 1]."""

    def sigmas(self, num_steps: int | None = None) -> torch.Tensor:
        """``[T + 1]`` sampling sigmas from 1 to 0; ``num_steps`` None: :attr:`default_num_steps`.

        Default: FLUX's resolution-dependent shift at this policy's token count. Backbones sampled with
        another schedule (UNO, FLUX.2 [klein]) override it."""
        return flux_sigmas(num_steps or self.default_num_steps, image_seq_len=self.latent_shape[0])

    # --- the model ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the transformer runs (text encoders may be offloaded elsewhere)."""
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (LoRA adapters stay float32 on a bf16 base)."""
        return next(self.transformer.parameters()).dtype

    @abstractmethod
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Predicted velocity ``[B, N, C]`` for latents ``[B, N, C]`` at noise level ``sigma [B]``."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.transformer.parameters() if p.requires_grad)

    @abstractmethod
    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the transformer's activations in the backward pass (memory for time)."""

    # --- LoRA -----------------------------------------------------------------------------------------
    @abstractmethod
    def add_lora(
        self, rank: int, alpha: float, dropout: float = 0.0, target_modules: Sequence[str] | None = None
    ) -> None:
        """Freeze the transformer and inject LoRA adapters through peft."""

    @property
    @abstractmethod
    def has_lora(self) -> bool:
        """Whether :meth:`add_lora` or :meth:`load_lora` injected the trained adapter."""

    @abstractmethod
    def disable_lora(self) -> contextlib.AbstractContextManager[None]:
        """A context manager inside which the policy runs as its frozen base (adapters off)."""

    @abstractmethod
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in peft's naming (what :meth:`save_lora` writes and export converts)."""

    @abstractmethod
    def save_lora(self, directory: str | Path) -> None:
        """Write only the LoRA adapter (peft format, safetensors)."""

    @abstractmethod
    def load_lora(self, directory: str | Path) -> None:
        """Load an adapter written by :meth:`save_lora` into this policy."""

    @property
    @abstractmethod
    def pipeline_class(self) -> type:
        """The diffusers pipeline class whose ``save_lora_weights`` format ``cgrpo export`` writes."""

    # --- persistence ----------------------------------------------------------------------------------
    @abstractmethod
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the whole policy (one diffusers/transformers subfolder per component), atomically."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, directory: str | Path, **options) -> Policy:
        """Load a directory written by :meth:`save_pretrained`."""


POLICIES: Registry[Policy] = Registry("policy")


def register(name: str, help: str = ""):
    return POLICIES.register(name, help)


def _import_builtin_policies() -> None:
    import importlib

    for module in ("mini", "uno", "kontext", "flux2_klein"):
        try:
            importlib.import_module(f"cgrpo.policy.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"cgrpo.policy.{module}":
                raise


def build(name: str, **options) -> Policy:
    """Build a registered policy, e.g. ``build("mini")`` or ``build("uno", flux_path=..., lora_path=...)``."""
    _import_builtin_policies()
    return POLICIES.build(name, **options)


def check(
    name: str,
    options: dict[str, Any] | None,
    name_key: str = "policy.name",
    options_key: str = "policy.options",
) -> None:
    """Raise :class:`~cgrpo.config.ConfigError` naming ``name_key`` or ``<options_key>.<option>`` if no policy
    ``name`` is registered or its factory takes no such option; builds nothing."""
    _import_builtin_policies()
    POLICIES.check(name, options, name_key, options_key)


def names() -> list[str]:
    _import_builtin_policies()
    return POLICIES.names()


def describe() -> dict[str, str]:
    _import_builtin_policies()
    return POLICIES.describe()
