"""HPSv3 (Ma et al., 2025) on current transformers: a Qwen2-VL-7B backbone and HPSv3's reward MLP.

The ``hpsv3`` package pins transformers 4.45 and torchvision, so this module re-implements its inference
path from the published description and source (github.com/MizzenAI/HPSv3, MIT): ``hpsv3/inference.py``
(``HPSv3RewardInferencer``), ``hpsv3/model/qwen2vl_trainer.py`` (``Qwen2VLRewardModelBT``),
``hpsv3/dataset/data_collator_qwen.py`` (prompt text) and ``hpsv3/dataset/utils.py`` (image resizing), read
at the upstream commits of August-September 2025. Nothing is imported from it.

What HPSv3 computes, and how we reproduce it
--------------------------------------------
1. **Image**: RGB, resized with PIL bicubic to ``smart_resize(h, w, factor=28, min_pixels=max_pixels=
   256*28*28)`` -- both sides multiples of 28, about 200,704 pixels, aspect ratio kept (so 256 visual tokens
   after Qwen2-VL's 2x2 merge for a square image). Then Qwen2-VL's own image processor (loaded with
   ``AutoImageProcessor`` from the base directory) rescales, normalises and patchifies; its own resize is
   skipped (``do_resize=False``): on an already-conforming size it is a no-op in HPSv3 too.
2. **Text**: one user turn holding the image and ``HPSV3_INSTRUCTION.format(text_prompt=prompt) +
   HPSV3_RATING_SUFFIX``, rendered with the base model's chat template and ``add_generation_prompt=True``.
   ``<|Reward|>`` is added to the tokenizer as an additional special token, exactly as the release does at
   load time. Each ``<|image_pad|>`` is expanded to ``prod(image_grid_thw) / merge_size**2`` copies (what
   ``Qwen2VLProcessor`` does; we do it ourselves because in transformers 5 that processor cannot be built
   without torchvision, which its video processor needs). Padding is on the right.
3. **Backbone**: ``Qwen2VLModel`` (vision tower + language model, no LM head). HPSv3's forward embeds the
   tokens and calls the 4.45 *text* model with ``position_ids=None``, which falls back to plain sequential
   positions ``0..L-1`` on all three M-RoPE axes -- not Qwen2-VL's 3-D image positions. The released weights
   were trained and are used that way, so we pass those 1-D positions explicitly.
4. **Head**: the last hidden state at the ``<|Reward|>`` token, cast to float32, goes through the MLP
   ``Linear(3584, 1024) -> ReLU -> Dropout(0.05) -> Linear(1024, 16) -> ReLU -> Linear(16, 2)`` (the
   "ranknet" head, kept in float32 by the release). Output 0 is the predicted mean ``mu``; output 1 is the
   log standard deviation (training samples ``mu_A - mu_B`` with ``sigma = exp(out[1])``). The reward is
   ``mu``, as in the release's inference ("we select miu as the final output") and in the paper.

Checkpoint layout and key mapping
---------------------------------
The release is ``HPSv3.safetensors`` (MizzenAI/HPSv3 on the Hub), a full ``state_dict`` of HPSv3's
``Qwen2VLForConditionalGeneration`` subclass saved with transformers 4.45, with no config or tokenizer: those
come from Qwen2-VL-7B-Instruct (``base_path``; its weights are not read). Keys map as follows:

- ``visual.<rest>`` -> ``backbone.visual.<rest>`` (vision tower and merger);
- ``model.embed_tokens.weight`` -> ``backbone.language_model.embed_tokens.weight``;
- ``model.layers.<i>.<rest>`` -> ``backbone.language_model.layers.<i>.<rest>``;
- ``model.norm.weight`` -> ``backbone.language_model.norm.weight``;
- ``lm_head.weight`` -> dropped (the reward never decodes tokens);
- ``rm_head.{0,3,5}.{weight,bias}`` -> ``head.layers.{0,1,2}.{weight,bias}`` (release indices 1, 2 and 4 are
  the weightless ReLU, Dropout and ReLU).

Keys already in the transformers-5 layout (``model.language_model.*``, ``model.visual.*``) are accepted too.
The release resized the token embeddings to ``len(tokenizer)`` after adding ``<|Reward|>`` (151,657 Qwen2-VL
tokens + 1 = 151,658 rows, not the config's padded 152,064), so the text ``vocab_size`` is taken from the
checkpoint, and we require it to equal the tokenizer length: that guarantees ``<|Reward|>`` gets the id it
was trained with. Loading is strict: a missing or unexpected backbone key is an error that names it.

Verified here (tests/test_rewards_real.py, with a tiny random Qwen2-VL saved in the release's layout):
the key mapping (every loaded tensor equals its release tensor), strict loading, the reward token's id, the
head's output order (shifting ``rm_head.5.bias[0]`` shifts every score by exactly that amount; ``[1]`` does
not move it), the score against an independent forward through transformers' own
``Qwen2VLForConditionalGeneration`` loading of the same legacy checkpoint, batch/padding invariance,
``smart_resize`` values, and the prompt text (byte-identical to HPSv3's; its sha256 is pinned in the tests).
Not verified without the real 16 GB checkpoint: absolute score values against the ``hpsv3`` package
(expected to differ slightly across transformers 4.45 -> 5 kernels and bf16 rounding), and that the real
Qwen2-VL-7B-Instruct chat template and tokenizer under transformers 5 tokenise the prompt exactly as 4.45 did.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from cgrpo.rewards._hf import batches, require_dir, resolve_device, resolve_dtype, to_model
from cgrpo.rewards.base import BatchReward, ImageBatch, RewardBatch, register, to_pil

REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
IMAGE_FACTOR = 28  # Qwen2-VL patch 14 x spatial merge 2
HPSV3_PIXELS = 256 * 28 * 28  # HPSv3 fixes min_pixels = max_pixels = 200,704
CHECKPOINT_NAME = "HPSv3.safetensors"

# The instruction HPSv3 was trained with (data_collator_qwen.INSTRUCTION), byte for byte: it is part of the
# model's input, so it must not be reworded (its sha256 is pinned in the tests).
HPSV3_INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and "
    "give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 "
    "being the worst and 10 being the best. \n\n**Visual Quality:**  \nEvaluate the overall visual quality "
    "of the image. The following sub-dimensions should be considered:\n- **Reasonableness:** The image "
    "should not contain any significant biological or logical errors, such as abnormal body structures or "
    "nonsensical environmental setups.\n- **Clarity:** Evaluate the sharpness and visibility of the image. "
    "The image should be clear and easy to interpret, with no blurring or indistinct areas.\n- **Detail "
    "Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n- **Aesthetic and Creativity:** Assess the artistic aspects of the "
    "image, including the color scheme, composition, atmosphere, depth of field, and the overall creative "
    "appeal. The scene should convey a sense of harmony and balance.\n- **Safety:** The image should not "
    "contain harmful or inappropriate content, such as political, violent, or adult material. If such "
    "content is present, the image quality and satisfaction score should be the lowest possible. "
    "\n\n**Text Alignment:**  \nAssess how well the image matches the textual prompt across the following "
    "sub-dimensions:\n- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., "
    "person, animal, object) align with the textual description. The subject should match the description "
    "in terms of number, appearance, and behavior.\n- **Style Relevance:** If the prompt specifies a "
    "particular artistic or stylistic style, evaluate how well the image adheres to this style.\n- "
    "**Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the "
    "image logically fit the scenario described in the prompt. The environment should support and enhance "
    "the subject without contradictions.\n- **Attribute Fidelity**: Check if specific attributes mentioned "
    "in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented "
    "in the image. Minor deviations may be acceptable, but critical attributes should be preserved.\n- "
    "**Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in "
    "the image. The generated content should not introduce elements that conflict with or distort the "
    "original description.\nTextual prompt - {text_prompt}\n\n\n"
)
HPSV3_RATING_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = HPSV3_PIXELS,
    max_pixels: int = HPSV3_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's target size: sides multiples of ``factor``, area near ``[min_pixels, max_pixels]``.

    Same arithmetic (and Python's round-half-to-even) as HPSv3's ``smart_resize``, so sizes match exactly --
    including its quirks: rounding to multiples of 28 can leave the area a little outside the bounds (the
    upscaling branch rounds up). The aspect ratio is kept as closely as the rounding allows. Returns
    ``(height, width)``.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be at most 200, got {height}x{width}")
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        new_h = math.floor(height / beta / factor) * factor
        new_w = math.floor(width / beta / factor) * factor
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * beta / factor) * factor
        new_w = math.ceil(width * beta / factor) * factor
    return new_h, new_w


def resize_for_hpsv3(image: Image.Image, min_pixels: int = HPSV3_PIXELS, max_pixels: int = HPSV3_PIXELS):
    """RGB + PIL bicubic resize to :func:`smart_resize`'s size, as HPSv3's ``fetch_image`` does with PIL."""
    image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    return image.resize((width, height), Image.Resampling.BICUBIC)


class RewardHead(nn.Module):
    """HPSv3's reward MLP: Linear layers with ReLU between them (the release's Dropout is off at inference).

    ``widths`` = ``[hidden, 1024, 16, 2]`` in the release. Input ``[B, hidden]`` -> ``[B, widths[-1]]``.
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if index < len(self.layers) - 1:
                hidden = torch.relu(hidden)
        return hidden


def map_release_key(key: str) -> tuple[str, str] | None:
    """A release key -> ``("backbone" | "head", our key)``, or ``None`` for a key the reward does not use.

    Head keys keep their release index here (``rm_head.3.weight`` -> ``"3.weight"``); :func:`load_release`
    renumbers them in order.
    """
    if key.startswith("rm_head."):
        return "head", key[len("rm_head.") :]
    if key.startswith("lm_head."):
        return None
    if key.startswith("visual."):
        return "backbone", key
    if key.startswith("model.visual."):
        return "backbone", key[len("model.") :]
    if key.startswith("model.language_model."):
        return "backbone", "language_model." + key[len("model.language_model.") :]
    if key.startswith("model."):
        return "backbone", "language_model." + key[len("model.") :]
    return "backbone", key  # unknown: strict loading reports it by name


def _head_from_state(state: dict[str, torch.Tensor], checkpoint: Path) -> RewardHead:
    """Build the MLP from ``{"<release index>.weight": ..., ...}``, checking that the shapes chain."""
    indices = sorted({int(key.split(".")[0]) for key in state})
    if not indices:
        raise KeyError(f"{checkpoint}: no 'rm_head.*' keys; this is not an HPSv3 reward checkpoint")
    weights = [state[f"{i}.weight"] for i in indices]
    widths = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    for previous, weight in zip(weights[:-1], weights[1:], strict=True):
        if weight.shape[1] != previous.shape[0]:
            raise ValueError(
                f"{checkpoint}: rm_head layers do not chain: {[tuple(w.shape) for w in weights]}"
            )
    head = RewardHead(widths)
    renumbered = {}
    for position, index in enumerate(indices):
        renumbered[f"layers.{position}.weight"] = state[f"{index}.weight"]
        renumbered[f"layers.{position}.bias"] = state[f"{index}.bias"]
    head.load_state_dict({k: v.float() for k, v in renumbered.items()}, strict=True)
    return head


class HPSv3Model(nn.Module):
    """``Qwen2VLModel`` + :class:`RewardHead` at the ``<|Reward|>`` token -> ``[B, 2]`` (mu, log sigma)."""

    def __init__(self, backbone: nn.Module, head: RewardHead, reward_token_id: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.reward_token_id = reward_token_id

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
    ) -> torch.Tensor:
        """``input_ids``/``attention_mask`` ``[B, L]`` (right-padded), ``pixel_values`` ``[P, C*2*14*14]``."""
        batch, length = input_ids.shape
        # HPSv3's sequential positions on all three M-RoPE axes (see the module docstring, point 3).
        positions = torch.arange(length, device=input_ids.device).view(1, 1, length).expand(3, batch, length)
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state  # [B, L, D]
        is_reward = input_ids == self.reward_token_id
        if not bool(is_reward.any(dim=1).all()):
            raise ValueError(f"every sequence must contain {REWARD_TOKEN}; the prompt template lost it")
        # The suffix's token is the last one even if a user prompt happened to contain the literal token.
        where = length - 1 - is_reward.flip(dims=[1]).int().argmax(dim=1)  # [B]
        pooled = hidden[torch.arange(batch, device=hidden.device), where]  # [B, D]
        return self.head(pooled.float())


def _resolve_checkpoint(checkpoint: str | os.PathLike | None, base_path: str | os.PathLike | None) -> Path:
    if checkpoint is None and base_path is None:
        raise ValueError(f"hpsv3: pass checkpoint= the released {CHECKPOINT_NAME} and base_path= Qwen2-VL")
    candidate = Path(checkpoint if checkpoint is not None else base_path).expanduser()
    if candidate.is_dir():
        candidate = candidate / CHECKPOINT_NAME
    if not candidate.is_file():
        raise FileNotFoundError(
            f"hpsv3: checkpoint '{candidate}' does not exist; pass checkpoint= the released "
            f"{CHECKPOINT_NAME} (or a directory holding it)"
        )
    return candidate


def _read_chat_template(base: Path, tokenizer) -> str:
    """The base model's chat template: ``chat_template.jinja``, ``chat_template.json`` or the tokenizer's."""
    import json

    if (base / "chat_template.jinja").is_file():
        return (base / "chat_template.jinja").read_text()
    if (base / "chat_template.json").is_file():
        return json.loads((base / "chat_template.json").read_text())["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise FileNotFoundError(
        f"hpsv3: no chat template in '{base}' (chat_template.jinja/.json or tokenizer_config)"
    )


def load_release(
    base_path: str | os.PathLike,
    checkpoint: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
):
    """Load the released HPSv3 weights onto a transformers-5 ``Qwen2VLModel`` and a :class:`RewardHead`.

    Returns ``(model, tokenizer, image_processor, chat_template)``; the tokenizer holds ``<|Reward|>``.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2VLModel

    base = require_dir(base_path, "hpsv3", "base_path", "Qwen2-VL-7B-Instruct (config, tokenizer, processor)")
    checkpoint = Path(checkpoint)
    config = AutoConfig.from_pretrained(base)
    if config.model_type != "qwen2_vl":
        raise ValueError(
            f"hpsv3: {base}/config.json has model_type '{config.model_type}', expected 'qwen2_vl'"
        )
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    image_processor = AutoImageProcessor.from_pretrained(base)
    chat_template = _read_chat_template(base, tokenizer)

    backbone_state: dict[str, torch.Tensor] = {}
    head_state: dict[str, torch.Tensor] = {}
    with safe_open(str(checkpoint), framework="pt", device="cpu") as file:
        for key in file.keys():  # noqa: SIM118 - safe_open is not a Mapping
            target = map_release_key(key)
            if target is None:
                continue
            part, name = target
            if part == "head":
                head_state[name] = file.get_tensor(key)
            else:
                backbone_state[name] = file.get_tensor(key).to(device=device, dtype=dtype)

    embed_key = "language_model.embed_tokens.weight"
    if embed_key not in backbone_state:
        raise KeyError(f"hpsv3: {checkpoint} has no token embeddings ('model.embed_tokens.weight')")
    rows = backbone_state[embed_key].shape[0]
    if rows != len(tokenizer):
        raise ValueError(
            f"hpsv3: {checkpoint} has {rows} token embeddings but the tokenizer in {base} has "
            f"{len(tokenizer)} tokens including {REWARD_TOKEN}; pass the Qwen2-VL-7B-Instruct files the "
            "checkpoint was trained with"
        )
    config.text_config.vocab_size = rows

    # Parameters on the meta device (no 8B random init), buffers real; then the checkpoint is assigned in.
    with init_empty_weights(include_buffers=False):
        backbone = Qwen2VLModel._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    result = backbone.load_state_dict(backbone_state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"hpsv3: {checkpoint} does not match Qwen2-VL from {base}: "
            f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    # Like the release (model.to(bfloat16)), non-persistent buffers such as RoPE inv_freq take the dtype too.
    backbone.to(device=device, dtype=dtype)
    head = _head_from_state(head_state, checkpoint).to(device)  # float32, as the release keeps it
    if head.layers[0].in_features != config.text_config.hidden_size:
        raise ValueError(
            f"hpsv3: rm_head expects hidden size {head.layers[0].in_features}, "
            f"the backbone has {config.text_config.hidden_size}"
        )
    model = HPSv3Model(backbone, head, reward_token_id).eval().requires_grad_(False)
    return model, tokenizer, image_processor, chat_template


@register("hpsv3")
class HPSv3Reward(BatchReward):
    """HPSv3 human-preference score (predicted mean) of each image for its prompt; higher is better.

    Options:
        base_path: local Qwen2-VL-7B-Instruct directory (config.json, tokenizer, preprocessor_config.json,
            chat template; its weights are not read). Defaults to the checkpoint's directory.
        checkpoint: the released ``HPSv3.safetensors``, or a directory holding it.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or ``"auto"``.
        dtype: ``"auto"`` (bfloat16 on an accelerator, as the release runs; float32 on the CPU) or a name.
        batch_size: images per forward pass.
        min_pixels, max_pixels: image area bounds (HPSv3: both 256*28*28).
        attn_implementation: attention backend (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``).

    ``reward(images, references, prompts)`` -> ``Tensor[N]`` of means; :meth:`score` returns ``[N, 2]`` with
    the log standard deviation as well. References and subjects are ignored.
    """

    name = "hpsv3"

    def __init__(
        self,
        base_path: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        batch_size: int = 4,
        min_pixels: int = HPSV3_PIXELS,
        max_pixels: int = HPSV3_PIXELS,
        attn_implementation: str = "sdpa",
    ) -> None:
        checkpoint_file = _resolve_checkpoint(checkpoint, base_path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, auto=torch.bfloat16)
        self.batch_size = batch_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.model, self.tokenizer, self.image_processor, self.chat_template = load_release(
            base_path if base_path is not None else checkpoint_file.parent,
            checkpoint_file,
            self.device,
            self.dtype,
            attn_implementation,
        )
        self.stats: dict[str, int] = {"images": 0}

    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Images and prompts -> model inputs, as HPSv3's ``prepare_batch`` builds them (docstring, 1-2)."""
        resized = [resize_for_hpsv3(image, self.min_pixels, self.max_pixels) for image in images]
        # Already at the final size; skipping the processor's resize keeps pixels identical whichever backend
        # (PIL or torchvision) AutoImageProcessor picked -- HPSv3's own second resize was a no-op too.
        vision = self.image_processor(images=resized, do_resize=False, return_tensors="pt")
        merge = self.image_processor.merge_size
        texts = []
        for prompt, grid in zip(prompts, vision["image_grid_thw"], strict=True):
            conversation = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {
                            "type": "text",
                            "text": HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_RATING_SUFFIX,
                        },
                    ],
                }
            ]
            text = self.tokenizer.apply_chat_template(
                conversation, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
            if text.count(IMAGE_PAD_TOKEN) != 1:
                raise ValueError(
                    f"hpsv3: the chat template produced {text.count(IMAGE_PAD_TOKEN)} image slots"
                )
            texts.append(text.replace(IMAGE_PAD_TOKEN, IMAGE_PAD_TOKEN * (int(grid.prod()) // merge**2)))
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }

    @torch.no_grad()
    def score(self, images: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        """``[N, 2]`` float32 on the CPU: column 0 the predicted mean (the reward), column 1 the log std."""
        pil = to_pil(images)
        if len(pil) != len(prompts):
            raise ValueError(f"hpsv3: {len(pil)} images but {len(prompts)} prompts")
        outputs = [torch.zeros(0, self.model.head.layers[-1].out_features)]
        for chunk in batches(len(pil), self.batch_size):
            inputs = to_model(self.prepare(pil[chunk], list(prompts[chunk])), self.device, self.dtype)
            outputs.append(self.model(**inputs).float().cpu())
        self.stats["images"] += len(pil)
        return torch.cat(outputs)

    def score_batch(self, batch: RewardBatch) -> torch.Tensor:
        return self.score(batch.images, batch.prompts)[:, 0]
