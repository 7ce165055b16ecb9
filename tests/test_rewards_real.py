"""The real rewards on tiny random models saved in their real checkpoints' layouts and loaded back by path."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cgrpo.rewards import build
from cgrpo.rewards.dino_seg import detection_query, mask_and_crop
from cgrpo.rewards.hpsv3 import (
    HPSV3_INSTRUCTION,
    HPSV3_RATING_SUFFIX,
    IMAGE_PAD_TOKEN,
    REWARD_TOKEN,
    map_release_key,
    smart_resize,
)
from cgrpo.testing import rewards as tiny

SMALL = {"min_pixels": 56 * 56, "max_pixels": 56 * 84}  # few image tokens: the text dominates anyway


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-rewards")
    return {
        # torchmetrics' CLIPScore only accepts paths naming a known family; "openai" routes to CLIPModel.
        "clip": tiny.save_tiny_clip(root / "openai-clip-tiny"),
        "dino": tiny.save_tiny_dino(root / "dino-vits16"),
        "dino_seg": tiny.save_tiny_dino_seg(root / "dino-seg"),
        "hpsv3": tiny.save_tiny_hpsv3(root / "hpsv3"),
    }


def random_uint8(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(seed).integers(0, 256, (n, 3, height, width), dtype=np.uint8)
    )


# -- CLIP-I / CLIP-T --------------------------------------------------------------------------------------


def test_clip_scores_agree_with_torchmetrics_and_plain_transformers(models):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import AutoProcessor, CLIPModel

    path = models["clip"]["path"]
    pixels = random_uint8(3, 40, 48, seed=1)
    ref_pixels = random_uint8(3, 36, 52, seed=2)
    images, references = pixels.float() / 255, ref_pixels.float() / 255
    prompts = ["a photo of a dog", "a red backpack on the moon", "toy"]
    clip_t = build("clip_t", path=path)(images, references, prompts)
    clip_i = build("clip_i", path=path)(images, references, prompts)
    assert clip_t.shape == clip_i.shape == (3,)

    # Independent reference with plain transformers calls: projected pooled outputs, cosine.
    model, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    with torch.no_grad():
        pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
        ref_pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in ref_pixels]
        image_emb = model.visual_projection(
            model.vision_model(
                pixel_values=processor(images=pil, return_tensors="pt")["pixel_values"]
            ).pooler_output
        )
        ref_emb = model.visual_projection(
            model.vision_model(
                pixel_values=processor(images=ref_pil, return_tensors="pt")["pixel_values"]
            ).pooler_output
        )
        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        text_emb = model.text_projection(model.text_model(**tokens).pooler_output)
    cos = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(clip_t, cos(image_emb, text_emb), atol=1e-5, rtol=0)
    torch.testing.assert_close(clip_i, cos(image_emb, ref_emb), atol=1e-5, rtol=0)

    # torchmetrics loads the saved directory by path, offline and without torchvision ...
    CLIPScore(model_name_or_path=path)
    assert "torchvision" not in sys.modules

    # ... but its feature step expects get_*_features to return tensors (transformers 4); in transformers 5
    # they return a ModelOutput. So it gets the same saved model through its loader-callable hook, with the
    # features unwrapped; the preprocessing, normalisation, x100 and clamp are all torchmetrics' own.
    class TensorFeaturesCLIP(CLIPModel):
        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    metric = CLIPScore(
        model_name_or_path=lambda: (
            TensorFeaturesCLIP.from_pretrained(path),
            AutoProcessor.from_pretrained(path),
        )
    )
    for i in range(3):
        for target, ours in ((prompts[i], clip_t[i]), (ref_pixels[i], clip_i[i])):
            metric.reset()
            metric.update(pixels[i], target)
            assert metric.compute().item() == pytest.approx(max(100 * ours.item(), 0.0), abs=1e-3)


def test_identity_metrics_are_one_for_identical_images_and_less_otherwise(models):
    images = random_uint8(2, 40, 40, seed=3).float() / 255
    others = random_uint8(2, 40, 40, seed=4).float() / 255
    prompts = ["a", "b"]
    for reward in (build("dino", **models["dino"]), build("clip_i", **models["clip"])):
        same = reward(images, images.clone(), prompts)
        torch.testing.assert_close(same, torch.ones(2), atol=1e-5, rtol=0)
        assert (reward(images, others, prompts) < 1 - 1e-4).all()
    with pytest.raises(FileNotFoundError, match="dino: path='/nonexistent' is not a directory"):
        build("dino", path="/nonexistent")


# -- DINO-Seg ---------------------------------------------------------------------------------------------


def test_dino_seg_scores_caches_references_and_counts_fallbacks(models):
    reward = build("dino_seg", **models["dino_seg"], batch_size=3)
    generated = random_uint8(4, 48, 64, seed=5)
    reference = generated[:1].expand(4, -1, -1, -1).clone()  # a group of 4 sharing one reference
    prompts, subjects = ["a dog"] * 4, ["Dog"] * 4
    scores = reward(generated.float() / 255, reference.float() / 255, prompts, subjects)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and (scores.abs() <= 1 + 1e-5).all()
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5)  # image 0 is its own reference
    assert reward.stats == {"images": 5, "fallbacks": 0, "empty_masks": 0, "cache_hits": 3}

    # The same reference content again (a new tensor): served from the cache, same scores.
    again = reward(generated.float() / 255, reference.float().clone() / 255, prompts, subjects)
    torch.testing.assert_close(again, scores)
    assert reward.stats["cache_hits"] == 7 and reward.stats["images"] == 9

    # Nothing passes the threshold: whole images are embedded and every one is counted.
    strict = build("dino_seg", **models["dino_seg"], box_threshold=1.01)
    fallback = strict(generated.float() / 255, reference.float() / 255, prompts)  # no subjects: "object."
    assert strict.stats["fallbacks"] == strict.stats["images"] == 5
    assert fallback[0].item() == pytest.approx(1.0, abs=1e-5)
    assert build("dino_seg", **models["dino_seg"])([], [], []).shape == (0,)


def test_dino_seg_falls_back_to_the_box_when_sam_returns_an_empty_mask(models, monkeypatch):
    reward = build("dino_seg", **models["dino_seg"])
    images = [Image.fromarray(random_uint8(1, 48, 64, seed=6)[0].permute(1, 2, 0).numpy())]
    monkeypatch.setattr(reward, "detect", lambda imgs, queries: [[10.0, 8.0, 30.0, 20.0]] * len(imgs))
    monkeypatch.setattr(reward, "segment", lambda imgs, boxes: [np.zeros((48, 64), bool)] * len(imgs))
    (crop,) = reward.crops(images, ["dog"])
    assert crop.size == (20, 20) and reward.stats["empty_masks"] == 1
    box = np.asarray(images[0])[8:20, 10:30]
    np.testing.assert_array_equal(np.asarray(crop)[4:16], box)  # 12 rows centred in a 20x20 square


def test_mask_and_crop_and_query():
    pixels = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:7] = True
    mask[2, 2] = False  # a hole inside the box is filled with the background
    crop = np.asarray(mask_and_crop(Image.fromarray(pixels), mask, (9, 9, 9)))
    assert crop.shape == (5, 5, 3)
    np.testing.assert_array_equal(crop[1:4], np.where(mask[1:4, 2:7, None], pixels[1:4, 2:7], 9))
    assert (crop[0] == 9).all() and (crop[4] == 9).all()
    whole = np.asarray(mask_and_crop(Image.fromarray(pixels), None, (0, 0, 0)))
    assert whole.shape == (8, 8, 3) and (whole[1:7] == pixels).all()
    assert detection_query(" Dog ") == "dog." and detection_query(None) == "object."


# -- HPSv3 ------------------------------------------------------------------------------------------------


def test_hpsv3_prompt_text_is_the_released_one():
    # sha256 of HPSv3's data_collator_qwen.INSTRUCTION and prompt_with_special_token, as released.
    assert hashlib.sha256(HPSV3_INSTRUCTION.encode()).hexdigest() == (
        "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"
    )
    assert hashlib.sha256(HPSV3_RATING_SUFFIX.encode()).hexdigest() == (
        "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a"
    )


def test_smart_resize_matches_hpsv3():
    assert smart_resize(512, 512) == (448, 448)  # 256 tokens after the 2x2 merge
    assert smart_resize(1024, 768) == (504, 364)
    assert smart_resize(64, 80) == (420, 504)  # small images are scaled up to the pixel budget
    rng = np.random.default_rng(0)
    for height, width in rng.integers(30, 3000, size=(200, 2)):
        h, w = smart_resize(int(height), int(width))
        assert h % 28 == 0 and w % 28 == 0
        # Rounding to multiples of 28 moves thin images off the budget (as in HPSv3: its ceil branch can
        # overshoot max_pixels when min_pixels == max_pixels); typical images land within a few percent.
        assert 0.7 < h * w / (256 * 28 * 28) < 1.4 and abs(np.log((h / w) / (height / width))) < 0.35
        if max(height, width) <= 2 * min(height, width):
            assert 0.85 < h * w / (256 * 28 * 28) < 1.15


def test_hpsv3_loads_every_release_tensor_under_its_mapped_name(models):
    reward = build("hpsv3", **models["hpsv3"])
    release = load_file(models["hpsv3"]["checkpoint"])
    ours = reward.model.backbone.state_dict()
    head = reward.model.head.state_dict()
    head_index = {"0": "0", "3": "1", "5": "2"}
    for key, value in release.items():
        mapped = map_release_key(key)
        if mapped is None:
            assert key == "lm_head.weight"
        elif mapped[0] == "head":
            index, kind = mapped[1].split(".")
            torch.testing.assert_close(head[f"layers.{head_index[index]}.{kind}"], value, rtol=0, atol=0)
        else:
            torch.testing.assert_close(ours.pop(mapped[1]), value, rtol=0, atol=0)
    assert not ours, f"backbone tensors not in the release: {sorted(ours)}"
    assert reward.tokenizer.convert_tokens_to_ids(REWARD_TOKEN) == len(reward.tokenizer) - 1
    assert reward.dtype == torch.float32 and reward.device.type == "cpu"


def hpsv3_inputs():
    rng = np.random.default_rng(7)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 60), (64, 64))
    ]
    return images, ["a dog", "a dog wearing a tiny hat on the beach at sunset"]


def test_hpsv3_matches_an_independent_forward_and_is_batch_invariant(models):
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    reward = build("hpsv3", **models["hpsv3"], batch_size=2, **SMALL)
    images, prompts = hpsv3_inputs()
    batch = reward.prepare(images, prompts)
    ids = batch["input_ids"]
    reward_id = reward.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    assert ((ids == reward_id).sum(1) == 1).all()
    image_pad = reward.tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
    assert (ids == image_pad).sum().item() == batch["image_grid_thw"].prod(-1).sum().item() // 4
    text = reward.tokenizer.decode(ids[1][batch["attention_mask"][1].bool()])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(HPSV3_RATING_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n")

    scores = reward.score(images, prompts)
    assert scores.shape == (2, 2)

    # Independent path: transformers' own legacy-key conversion loads the release into
    # Qwen2VLForConditionalGeneration; the head is applied by hand from the raw release tensors.
    release = load_file(models["hpsv3"]["checkpoint"])
    config = AutoConfig.from_pretrained(models["hpsv3"]["base_path"])
    config.text_config.vocab_size = release["model.embed_tokens.weight"].shape[0]
    backbone = {k: v for k, v in release.items() if not k.startswith("rm_head.")}
    reference = Qwen2VLForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=backbone
    ).eval()
    length = ids.shape[1]
    with torch.no_grad():
        hidden = reference.model(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            position_ids=torch.arange(length).view(1, 1, -1).expand(3, 2, -1),  # HPSv3's 1-D positions
        ).last_hidden_state
        x = hidden[ids == reward_id]
        for index in ("0", "3"):
            x = torch.relu(
                torch.nn.functional.linear(
                    x, release[f"rm_head.{index}.weight"], release[f"rm_head.{index}.bias"]
                )
            )
        x = torch.nn.functional.linear(x, release["rm_head.5.weight"], release["rm_head.5.bias"])
    torch.testing.assert_close(scores, x, atol=1e-5, rtol=0)

    reward.batch_size = 1  # no padding: the same scores
    torch.testing.assert_close(reward.score(images, prompts), scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward(images, images, prompts), scores[:, 0])


def test_hpsv3_reward_is_output_zero_the_mean(models, tmp_path):
    images, prompts = hpsv3_inputs()
    base = build("hpsv3", **models["hpsv3"], **SMALL).score(images, prompts)
    release = load_file(models["hpsv3"]["checkpoint"])
    for column, shift in ((0, 1.5), (1, -2.0)):
        edited = dict(release)
        edited["rm_head.5.bias"] = release["rm_head.5.bias"].clone()
        edited["rm_head.5.bias"][column] += shift
        path = tmp_path / f"edited-{column}.safetensors"
        save_file(edited, str(path))
        reward = build("hpsv3", base_path=models["hpsv3"]["base_path"], checkpoint=str(path), **SMALL)
        shifted = reward(images, images, prompts)
        expected = base[:, 0] + (shift if column == 0 else 0.0)
        torch.testing.assert_close(shifted, expected, atol=1e-5, rtol=0)


def test_rewards_run_in_bfloat16(models):
    # The real rewards run in bfloat16 on a GPU; the same casts are exercised here on the CPU.
    images, prompts = hpsv3_inputs()
    full = build("hpsv3", **models["hpsv3"], **SMALL).score(images, prompts)
    half = build("hpsv3", **models["hpsv3"], dtype="bfloat16", **SMALL)
    assert next(half.model.backbone.parameters()).dtype == torch.bfloat16
    assert half.model.head.layers[0].weight.dtype == torch.float32  # the release keeps its head in fp32
    torch.testing.assert_close(half.score(images, prompts), full, atol=0.05, rtol=0)
    generated = random_uint8(2, 48, 64, seed=8).float() / 255
    seg = build("dino_seg", **models["dino_seg"], dtype="bfloat16")
    assert seg(generated, generated, ["a", "b"], ["dog", "dog"]).tolist() == pytest.approx(
        [1.0, 1.0], abs=1e-2
    )


def test_hpsv3_load_errors_are_clear(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .* does not exist"):
        build(
            "hpsv3", base_path=models["hpsv3"]["base_path"], checkpoint=str(tmp_path / "missing.safetensors")
        )
    release = load_file(models["hpsv3"]["checkpoint"])
    grown = dict(release)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[key] = torch.cat([release[key], release[key][:1]])
    save_file(grown, str(tmp_path / "HPSv3.safetensors"))
    with pytest.raises(ValueError, match="token embeddings but the tokenizer"):
        build("hpsv3", base_path=models["hpsv3"]["base_path"], checkpoint=str(tmp_path))
    missing = {k: v for k, v in release.items() if not k.startswith("model.layers.1.")}
    save_file(missing, str(tmp_path / "HPSv3.safetensors"))
    with pytest.raises(KeyError, match=r"missing \['language_model.layers.1"):
        build("hpsv3", base_path=models["hpsv3"]["base_path"], checkpoint=str(tmp_path))
