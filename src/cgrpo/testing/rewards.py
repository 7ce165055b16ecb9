"""Tiny random-initialised reward models, saved in the same on-disk layout as the real checkpoints.

Tests (ours and other engineers' end-to-end tests) build these in a temporary directory and then load them
through exactly the code path a real checkpoint takes (``cgrpo.rewards.build(name, **paths)``). Nothing is
downloaded: tokenizers are built from tiny in-memory vocabularies, models from small configs.

Every helper returns the keyword options of the matching reward, so that
``build("dino_seg", **save_tiny_dino_seg(tmp))`` works as is:

- ``save_tiny_clip(dir)      -> {"path": ...}``                                       (``clip_i``, ``clip_t``)
- ``save_tiny_dino(dir)      -> {"path": ...}``                                       (``dino``)
- ``save_tiny_dino_seg(dir)  -> {"detector_path": ..., "sam_path": ..., "dino_path": ...}``  (``dino_seg``)
- ``save_tiny_hpsv3(dir)     -> {"base_path": ..., "checkpoint": ...}``               (``hpsv3``)

The models are random, so their scores mean nothing; they exercise shapes, preprocessing, key names and
loading. A tiny random GroundingDINO detects "something" in almost every image with a high score, so tests
that need the no-detection fallback pass a ``box_threshold`` above 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Byte-level BPE alphabet: every string tokenises without unknown tokens, with no merges needed.
_QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A Jinja chat template that renders the Qwen2-VL conversation format (system turn added when missing,
# one <|vision_start|><|image_pad|><|vision_end|> per image part). Written here for the tiny test model;
# a real checkpoint brings its own template.
_QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


def byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def clip_byte_vocab() -> dict[str, int]:
    """A CLIP tokenizer vocabulary with no merges: every byte, alone and word-final (``</w>``), then the start
    and end tokens."""
    alphabet = byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _mkdir(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_tiny_clip(directory: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """A tiny ``CLIPModel`` + ``CLIPProcessor`` (openai/clip-vit-base-patch32 layout) -> ``{"path": dir}``."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = _mkdir(directory)
    vocab = clip_byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return {"path": str(out)}


def save_tiny_dino(directory: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """A tiny ``ViTModel``, no pooler (facebook/dino-vits16 layout), + its image processor -> ``{"path"}``."""
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    out = _mkdir(directory)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(seed)
    ViTModel(config, add_pooling_layer=False).save_pretrained(out)
    ViTImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD
    ).save_pretrained(out)
    return {"path": str(out)}


def save_tiny_dinov2(directory: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """A tiny ``Dinov2Model`` + ``BitImageProcessor`` (facebook/dinov2-large layout) -> ``{"path"}``."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    out = _mkdir(directory)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    Dinov2Model(config).save_pretrained(out)
    BitImageProcessorPil(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD,
    ).save_pretrained(out)
    return {"path": str(out)}


def save_tiny_grounding_dino(directory: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """A tiny ``GroundingDinoForObjectDetection`` + processor (IDEA-Research/grounding-dino layout)."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    out = _mkdir(directory)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "dog", "cat", "backpack", "toy", "object"]
    words += list(letters) + ["##" + c for c in letters]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tokenizer = BertTokenizer(vocab=vocab)
    config = GroundingDinoConfig(
        backbone_config=dict(
            model_type="swin",
            image_size=64,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            out_indices=[2, 3, 4],
        ),
        text_config=dict(
            model_type="bert",
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
        d_model=32,  # GroupNorm(32, d_model) in the input projection needs a multiple of 32
        encoder_layers=1,
        decoder_layers=2,  # the shared bbox-head tying expects at least two decoder layers
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=10,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(out)
    # Large enough that the last (stride-64) feature level is more than 1x1: GroupNorm needs >1 value/group.
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 128})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return {"path": str(out)}


def save_tiny_sam(directory: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """A tiny ``SamModel`` + ``SamProcessor`` (facebook/sam-vit-* layout) -> ``{"path"}``."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    out = _mkdir(directory)
    config = SamConfig(
        vision_config=dict(
            hidden_size=16,
            output_channels=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=8,
            mlp_dim=32,
        ),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16
        ),
    )
    torch.manual_seed(seed)
    SamModel(config).save_pretrained(out)
    image_processor = SamImageProcessorPil(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    SamProcessor(image_processor=image_processor).save_pretrained(out)
    return {"path": str(out)}


def save_tiny_dino_seg(directory: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """GroundingDINO + SAM + DINOv2 in sub-directories -> ``{"detector_path", "sam_path", "dino_path"}``."""
    out = _mkdir(directory)
    return {
        "detector_path": save_tiny_grounding_dino(out / "grounding-dino", seed)["path"],
        "sam_path": save_tiny_sam(out / "sam", seed)["path"],
        "dino_path": save_tiny_dinov2(out / "dinov2", seed)["path"],
    }


def _legacy_qwen2_vl_key(key: str) -> str:
    """transformers-5 ``Qwen2VLForConditionalGeneration`` key -> the 4.45 key the HPSv3 release uses."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def _hpsv3_bpe(vocab_size: int = 700) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE trained on HPSv3's prompt text: ~700 tokens per sample instead of ~2,600 bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from cgrpo.rewards.hpsv3 import HPSV3_INSTRUCTION, HPSV3_RATING_SUFFIX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([HPSV3_INSTRUCTION, HPSV3_RATING_SUFFIX, "You are a helpful assistant."], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def save_tiny_hpsv3(directory: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """A tiny HPSv3 release: a Qwen2-VL base directory plus ``HPSv3.safetensors`` in the released key layout.

    ``base/`` mirrors Qwen2-VL-7B-Instruct's files: a *flat* pre-v5 ``config.json`` (``rope_scaling`` with
    ``mrope_section``, ``vision_config`` with ``in_chans``), ``preprocessor_config.json`` with ``min_pixels``/
    ``max_pixels``, ``chat_template.json`` and the tokenizer. Its ``vocab_size`` is padded above the tokenizer
    length, like the real one (152064 vs 151657 tokens).

    ``HPSv3.safetensors`` mirrors the release: a full state dict of HPSv3's ``Qwen2VLRewardModelBT`` saved
    with transformers 4.45 names (``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``visual.*``,
    ``lm_head``) whose token embeddings were resized to ``len(tokenizer) + 1`` for ``<|Reward|>``, plus the
    reward MLP ``rm_head.{0,3,5}`` (hidden -> 1024 -> 16 -> 2 in the release; smaller here).

    Returns ``{"base_path": base_dir, "checkpoint": checkpoint_file}``.
    """
    from safetensors.torch import save_file
    from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    out = _mkdir(directory)
    base = _mkdir(out / "base")
    vocab, merges = _hpsv3_bpe()
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL_TOKENS})
    tokenizer.save_pretrained(base)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIAL_TOKENS}

    hidden, vocab_size = 32, len(tokenizer) + 40
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,
            "embed_dim": 32,
            "mlp_ratio": 2,
            "num_heads": 2,
            "in_chans": 3,
            "hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},  # sums to head_dim / 2 = 4
        "vocab_size": vocab_size,
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    (base / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (base / "chat_template.json").write_text(json.dumps({"chat_template": _QWEN2_VL_CHAT_TEMPLATE}))

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(base))
    model.resize_token_embeddings(len(tokenizer) + 1)  # + <|Reward|>, as HPSv3's training script does
    state = {_legacy_qwen2_vl_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    widths = [hidden, 24, 8, 2]  # the release: [3584, 1024, 16, 2]
    for index, fan_in, fan_out in zip((0, 3, 5), widths[:-1], widths[1:], strict=True):
        layer = torch.nn.Linear(fan_in, fan_out)
        state[f"rm_head.{index}.weight"] = layer.weight.detach().clone()
        state[f"rm_head.{index}.bias"] = layer.bias.detach().clone()
    checkpoint = out / "HPSv3.safetensors"
    save_file(state, str(checkpoint))
    return {"base_path": str(base), "checkpoint": str(checkpoint)}
