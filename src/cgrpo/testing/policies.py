"""Tiny random-initialised policies for tests: the mini policy at 16x16, and FLUX.1 (UNO, Kontext) and
FLUX.2 [klein] components saved in their real diffusers folder layouts.

Tests build these in a temporary directory and load them back through exactly the code path a real checkpoint
takes (``cgrpo.policy.build(name, **options)``); each ``save_tiny_*`` returns those options. Nothing is
downloaded: tokenizers are built from tiny in-memory vocabularies (the byte alphabet of
:func:`cgrpo.testing.rewards.byte_alphabet`), models from small configs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from cgrpo.policy.flux import ReferenceFluxPolicy
from cgrpo.policy.mini import build_mini_policy
from cgrpo.testing.rewards import byte_alphabet, clip_byte_vocab

# --- the mini policy ----------------------------------------------------------------------------------------

# The FLUX.1 transformer of every tiny FLUX policy: 1 double + 1 single block, 2 heads x 16.
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
# For unit tests: the same at 16x16 images (16 + 16 image tokens of 4x4 RGB pixels), 8 text tokens.
TINY_MINI_TRANSFORMER: dict[str, Any] = {**TINY_FLUX_TRANSFORMER, "in_channels": 48, "guidance_embeds": False}
TINY_MINI_TEXT: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=8,
)
TINY_MINI_VOCABULARY = [
    *("a", "photo", "of", "the", "on", "in", "at", "left", "right", "top", "bottom", "snow", "night"),
    *(
        "red",
        "green",
        "blue",
        "yellow",
        "cube",
        "ball",
        "star",
        "ring",
        "small",
        "large",
        "striped",
        "dotted",
    ),
]


def tiny_policy_for_tests(seed: int = 0, vocabulary: Iterable[str] | None = None) -> ReferenceFluxPolicy:
    """An even smaller random policy for unit tests (16x16 images, one block of each kind)."""
    return build_mini_policy(
        seed=seed,
        image_size=16,
        vocabulary=TINY_MINI_VOCABULARY if vocabulary is None else vocabulary,
        transformer_config=TINY_MINI_TRANSFORMER,
        text_config=TINY_MINI_TEXT,
    )


# --- FLUX.1: UNO and Kontext --------------------------------------------------------------------------------

TINY_TEXT_LENGTH = 16


def _tiny_clip(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = clip_byte_vocab()
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


def save_tiny_kontext(directory: str | Path, seed: int = 0) -> dict[str, str]:
    """Tiny random FLUX.1 Kontext components (``FluxKontextPipeline`` layout) -> ``{"flux_path": ...}``."""
    return save_tiny_flux(directory, seed=seed, pipeline="FluxKontextPipeline")


# --- FLUX.2 [klein] -----------------------------------------------------------------------------------------

TINY_FLUX2_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,  # 4 VAE channels x 2x2 patches
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,  # 3 layers x hidden 16
    timestep_guidance_channels=32,
    mlp_ratio=2.0,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=False,
)
TINY_QWEN3_LAYERS = (0, 1, 2)
TINY_QWEN3_LENGTH = 48
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def _tiny_qwen3(seed: int):
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    vocab = {c: i for i, c in enumerate(byte_alphabet())}
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], model_max_length=TINY_QWEN3_LENGTH)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]}
    )
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=TINY_QWEN3_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    )
    return model, tokenizer


def tiny_flux2_vae(seed: int = 0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        mid_block_add_attention=False,
    )
    # Non-trivial batch-norm statistics so that the normalisation is exercised.
    generator = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features, generator=generator) * 0.1)
    vae.bn.running_var.copy_(torch.rand(vae.bn.num_features, generator=generator) + 0.5)
    return vae


def save_tiny_flux2_klein(directory: str | Path, seed: int = 0, is_distilled: bool = False) -> dict[str, Any]:
    """Random tiny ``Flux2KleinPipeline`` components saved by the pipeline. Returns the ``flux2-klein``
    options for them (``path``, and the tiny model's ``text_layers`` and ``max_text_length``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    text_encoder, tokenizer = _tiny_qwen3(seed)
    torch.manual_seed(seed + 3)
    transformer = Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
    )
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=tiny_flux2_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )
    pipe.save_pretrained(directory)
    return {
        "path": str(directory),
        "text_layers": list(TINY_QWEN3_LAYERS),
        "max_text_length": TINY_QWEN3_LENGTH,
    }
