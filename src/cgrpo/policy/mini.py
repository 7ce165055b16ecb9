"""The mini world's policy: a tiny UNO-style FLUX transformer on 4x4 pixel patches and a tiny word-level CLIP.

32x32 RGB images in 4x4 patches are 64 tokens of 48 channels; with the reference that is 64 + 64 image
tokens plus 16 text tokens, which trains at roughly 2 steps/s at batch 32 on two CPU cores (see DESIGN.md).
Nothing is ever downloaded: the tokenizer is built from the mini world's vocabulary and the weights are
either random or the committed SFT base in ``cgrpo/assets/mini_base``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from cgrpo.policy.base import register
from cgrpo.policy.flux import FluxTextEncoder, PixelCodec, ReferenceFluxPolicy

# ~2.3M parameters; head dim 32 = rope axes 8 + 12 + 12.
MINI_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=48,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
MINI_TEXT: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3, in this order
PUNCTUATION = (",", ".")
MINI_BASE = "mini_base"


def build_word_tokenizer(vocabulary: Iterable[str], max_length: int):
    """A word-level :class:`PreTrainedTokenizerFast`: lowercase, split on whitespace and punctuation,
    ``[BOS] words [EOS]``, padded with ``[PAD]`` (id 0); unknown words map to ``[UNK]``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in [*PUNCTUATION, *sorted({w.lower() for w in vocabulary})]:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        model_max_length=max_length,
    )


def _default_vocabulary() -> list[str]:
    try:
        from cgrpo.data.miniworld import vocabulary
    except ModuleNotFoundError as error:
        raise RuntimeError(
            "the mini world (cgrpo.data.miniworld) is not available: pass vocabulary=... explicitly"
        ) from error
    return list(vocabulary())


def build_mini_policy(
    seed: int = 0,
    image_size: int = 32,
    vocabulary: Iterable[str] | None = None,
    transformer_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None,
    patch_size: int = 4,
) -> ReferenceFluxPolicy:
    """A random-initialised mini policy, deterministic for ``seed``; ``vocabulary``: the mini world's."""
    from transformers import CLIPTextConfig, CLIPTextModel

    transformer_config = dict(MINI_TRANSFORMER if transformer_config is None else transformer_config)
    text_config = dict(MINI_TEXT if text_config is None else text_config)
    words = _default_vocabulary() if vocabulary is None else list(vocabulary)
    max_length = text_config["max_position_embeddings"]
    tokenizer = build_word_tokenizer(words, max_length)

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**transformer_config)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            # Not 2: CLIP then pools the first EOS position (id 2 selects transformers' legacy argmax path).
            eos_token_id=tokenizer.eos_token_id,
            projection_dim=text_config["hidden_size"],
            **text_config,
        )
    )
    text_encoder = FluxTextEncoder(clip, tokenizer)
    if text_encoder.sequence_dim != transformer_config["joint_attention_dim"]:
        raise ValueError("text hidden_size must equal the transformer's joint_attention_dim")
    codec = PixelCodec(patch_size)
    return ReferenceFluxPolicy(transformer, codec, text_encoder, image_size).eval()


def mini_base_path() -> Path | None:
    """The committed SFT base inside the installed package, or None when it has not been built yet."""
    path = Path(str(resources.files("cgrpo") / "assets" / MINI_BASE))
    return path if (path / "transformer").is_dir() else None


def add_words(policy: ReferenceFluxPolicy, words: Iterable[str]) -> list[str]:
    """Teach the policy's word tokenizer ``words`` it does not know yet (e.g. the scene grammar's "above",
    "of"), with new embedding rows in its text encoder; returns the words added.

    Known words keep their ids and embeddings, so the policy's outputs for its old prompts do not change. The
    new rows start as transformers initialises resized embeddings; training (SFT) gives them meaning.
    """
    from tokenizers import AddedToken

    text = policy.text_encoder
    tokenizer = text.clip_tokenizer
    vocab = tokenizer.get_vocab()
    new = sorted({w.lower() for w in words} - set(vocab))
    if new:
        # single_word: "of" is a word of its own, never the end of "roof".
        tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in new])
        text.clip.resize_token_embeddings(len(tokenizer))
    return new


@register("mini", help="tiny UNO-style FLUX policy of the mini world (committed SFT base, CPU)")
def mini(path: str | Path | None = None, extra_words: Sequence[str] = (), **kw: Any) -> ReferenceFluxPolicy:
    """The mini world's policy: the committed SFT base, or the policy directory ``path``; ``extra_words``:
    words to add to its tokenizer (:func:`add_words`), e.g. the scene grammar's for a two-subject base."""
    if path is None:
        path = mini_base_path()
        if path is None:
            raise FileNotFoundError(
                "the mini base weights (cgrpo/assets/mini_base) are missing: pass path=<policy directory> or "
                "pretrain them with `cgrpo sft configs/mini/sft_v3_stage1.yaml` (then stage2, stage3)"
            )
    path = Path(path)
    if not (path / "transformer").is_dir():
        raise FileNotFoundError(f"{path} is not a policy directory: expected a transformer/ subfolder")
    policy = ReferenceFluxPolicy.from_pretrained(path, **kw)
    add_words(policy, extra_words)
    return policy
