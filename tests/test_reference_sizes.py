"""References as each backbone's pipeline prepares them, each at its own size: UNO's ``preprocess_ref``, the
FluxKontextPipeline and Flux2KleinPipeline image processors, per-reference ids, the eval schedule, and two
GRPO iterations through ``cgrpo train`` with references of different sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cgrpo.policy import build
from cgrpo.testing import rewards as tiny_rewards
from cgrpo.testing.policies import save_tiny_flux2_klein, save_tiny_kontext, save_tiny_uno

# (width, height) of 4:3, 3:4, 1:1 and 16:9 photos
ASPECTS = [(96, 72), (72, 96), (80, 80), (128, 72)]


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def _uno_rule(image: Image.Image, long_size: int) -> Image.Image:
    """UNO's preprocess_ref, written out independently with PIL."""
    w, h = image.size
    scale = long_size / max(w, h)
    new_w, new_h = (long_size, int(scale * h)) if w >= h else (int(scale * w), long_size)
    resized = image.resize((new_w, new_h), Image.LANCZOS)
    cw, ch = new_w - new_w % 16, new_h - new_h % 16
    return resized.crop(
        ((new_w - cw) // 2, (new_h - ch) // 2, (new_w - cw) // 2 + cw, (new_h - ch) // 2 + ch)
    )


@pytest.fixture(scope="module")
def tiny_uno(tmp_path_factory):
    return save_tiny_uno(tmp_path_factory.mktemp("uno"), seed=0, lora_rank=4)


@pytest.fixture(scope="module")
def tiny_kontext(tmp_path_factory):
    return save_tiny_kontext(tmp_path_factory.mktemp("kontext"), seed=1)


@pytest.fixture(scope="module")
def tiny_klein(tmp_path_factory):
    return save_tiny_flux2_klein(tmp_path_factory.mktemp("klein"), seed=2)


@pytest.mark.parametrize("size", ASPECTS)
def test_uno_prepares_references_with_unos_rule(tiny_uno, size):
    policy = build("uno", **tiny_uno, image_size=64, reference_size=64)
    # A tiny VAE packs 4 px per token, not 16: compare on UNO's 16 with a policy whose tokens are 16 px.
    policy.codec.vae_scale_factor = 8
    photo = _photo(*size)
    (one,) = policy.prepare_references([photo])
    expected = _uno_rule(photo, 64)
    assert one.shape[1:] == (expected.height, expected.width)
    assert torch.equal(one, _tensor(expected))
    # Without reference_size: long side = the image's long side, 0.625 of it with several references.
    policy.reference_size = None
    two = policy.prepare_references([photo, _photo(*ASPECTS[0], seed=1)])
    assert torch.equal(two[0], _tensor(_uno_rule(photo, 40)))
    assert torch.equal(two[1], _tensor(_uno_rule(_photo(*ASPECTS[0], seed=1), 40)))


def test_uno_4_3_photo_is_512_by_384(tiny_uno):
    policy = build("uno", **tiny_uno, image_size=512)
    policy.codec.vae_scale_factor = 8  # UNO's 16-pixel tokens
    (reference,) = policy.prepare_references([_photo(640, 480)])
    assert reference.shape == (3, 384, 512)


@pytest.mark.parametrize("size", ASPECTS)
def test_kontext_prepares_references_as_its_pipeline(tiny_kontext, size):
    from diffusers import FluxKontextPipeline
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext["flux_path"])
    policy = build("flux-kontext", **tiny_kontext, image_size=32)
    photo = _photo(*size)
    (ours,) = policy.prepare_references([photo])
    # FluxKontextPipeline.__call__, step 3 (_auto_resize=True)
    multiple_of = pipe.vae_scale_factor * 2
    image_height, image_width = pipe.image_processor.get_default_height_width(photo)
    aspect_ratio = image_width / image_height
    _, image_width, image_height = min(
        (abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
    )
    image_width = image_width // multiple_of * multiple_of
    image_height = image_height // multiple_of * multiple_of
    image = pipe.image_processor.resize(photo, image_height, image_width)
    expected = (pipe.image_processor.preprocess(image, image_height, image_width)[0] + 1) / 2
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() < 1e-6


@pytest.mark.parametrize("size", [(1280, 960), (72, 96), (80, 80), (128, 72)])
def test_klein_prepares_references_as_its_pipeline(tiny_klein, size):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein["path"])
    policy = build("flux2-klein", **tiny_klein, image_size=64)
    photo = _photo(*size)
    (ours,) = policy.prepare_references([photo])
    # Flux2KleinPipeline.__call__, step 4
    img = photo
    image_width, image_height = img.size
    if image_width * image_height > 1024 * 1024:
        img = pipe.image_processor._resize_to_target_area(img, 1024 * 1024)
        image_width, image_height = img.size
    multiple_of = pipe.vae_scale_factor * 2
    image_width = (image_width // multiple_of) * multiple_of
    image_height = (image_height // multiple_of) * multiple_of
    img = pipe.image_processor.preprocess(img, height=image_height, width=image_width, resize_mode="crop")
    expected = (img[0] + 1) / 2
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() < 1e-6


def test_uno_conditions_on_two_references_of_their_own_sizes(tiny_uno):
    from cgrpo.policy.flux import uno_reference_ids

    # Prepared references (long side 20, sides multiples of the tiny VAE's 4 px tokens) pass unchanged.
    policy = build("uno", **tiny_uno, image_size=32, reference_size=20)
    first, second = torch.rand(2, 3, 20, 12), torch.rand(2, 3, 12, 20)  # 3:5 and 5:3
    cond = policy.condition(["a dog", "a cat"], [first, second])
    assert cond.reference_tokens.shape[1] == 5 * 3 + 3 * 5
    # UnoPE: reference 0 after the 8x8 target, reference 1 after reference 0, each with its own grid.
    assert torch.equal(cond.reference_ids, uno_reference_ids((8, 8), [(5, 3), (3, 5)]))
    assert cond.reference_ids[:15, 1].min() == 8 and cond.reference_ids[15:, 1].min() == 8 + 5
    assert cond.reference_ids[15:, 2].min() == 8 + 3
    one = policy.condition(["a dog", "a cat"], first)
    assert torch.equal(cond.reference_tokens[:, :15], one.reference_tokens)
    v = policy.velocity(policy.initial_noise(2), torch.full((2,), 0.5), cond)
    assert v.shape == (2, 64, policy.codec.channels) and torch.isfinite(v).all()


def test_klein_conditions_on_two_references_as_its_pipeline(tiny_klein):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein["path"])
    policy = build("flux2-klein", **tiny_klein, image_size=64)
    photos = [_photo(96, 64), _photo(64, 80, seed=1)]
    refs = policy.prepare_references(photos)
    cond = policy.condition(["a dog"], [r[None] for r in refs])
    processed = [
        pipe.image_processor.preprocess(p, p.height // 16 * 16, p.width // 16 * 16, "crop") for p in photos
    ]
    with torch.no_grad():
        latents, ids = pipe.prepare_image_latents(processed, 1, None, "cpu", torch.float32)
    assert torch.equal(cond.reference_ids, ids[0].float())
    assert (cond.reference_tokens - latents).abs().max() < 1e-5


def test_kontext_places_references_of_their_own_sizes_side_by_side(tiny_kontext):
    from cgrpo.policy.kontext import kontext_reference_ids

    policy = build("flux-kontext", **tiny_kontext, image_size=32, reference_size=32)
    cond = policy.condition(["a dog"], [torch.rand(1, 3, 32, 24), torch.rand(1, 3, 16, 32)])
    assert cond.reference_tokens.shape[1] == 8 * 6 + 4 * 8
    assert torch.equal(cond.reference_ids, kontext_reference_ids([(8, 6), (4, 8)]))


def test_eval_runner_samples_with_the_policys_schedule(tiny_uno, tmp_path, monkeypatch):
    from cgrpo.eval import runner

    policy = build("uno", **tiny_uno, image_size=32)
    task = runner.EvalTask(
        "t",
        [runner.Case("dog", "dog", "object", "context", "a dog")],
        reference=lambda subject: _tensor(_photo(40, 30)),
        reference_path=lambda subject: "dog.png",
    )
    seen = {}

    def fake_generate(policy, prompts, references, seeds, sigmas):
        seen["sigmas"], seen["references"] = sigmas, references
        return torch.zeros(len(prompts), 3, 32, 32)

    monkeypatch.setattr(runner, "generate_images", fake_generate)
    items = runner.build_items(task.cases, 1, 0)
    settings = runner.GenerationSettings(policy="uno", steps=5)
    runner.generate_missing(task, items, tmp_path, settings, lambda: policy, 4, progress=False)
    assert torch.equal(seen["sigmas"], policy.sigmas(5))
    assert seen["references"].shape == (1, 3, 24, 32)  # UNO's aspect-kept reference, not a square
    settings = runner.GenerationSettings(policy="uno", steps=5, shift=3.0)
    (tmp_path / items[0].image).unlink()
    runner.generate_missing(task, items, tmp_path, settings, lambda: policy, 4, progress=False)
    assert not torch.equal(seen["sigmas"], policy.sigmas(5))


def test_bucketed_sampler_batches_one_size_and_resumes():
    from cgrpo.train.components import BatchSampler

    keys = ["a", "b", "a", "b", "a", "b", "a"]
    sampler = BatchSampler(len(keys), 2, seed=3, keys=keys)
    batches = [sampler.next() for _ in range(9)]
    assert all(len({keys[i] for i in batch}) == 1 and len(batch) == 2 for batch in batches)
    resumed = BatchSampler(len(keys), 2, seed=3, keys=keys)
    resumed.load_state_dict({"epoch": 1, "position": 1})
    replay = BatchSampler(len(keys), 2, seed=3, keys=keys)
    first_epoch = [replay.next() for _ in range(len(replay._bucketed_batches()))]
    assert replay.epoch == 1 and len(first_epoch) == 4
    replay.next()
    assert resumed.next() == replay.next()
    plain, same = BatchSampler(7, 2, seed=3), BatchSampler(7, 2, seed=3, keys=["x"] * 7)
    assert [plain.next() for _ in range(5)] == [same.next() for _ in range(5)]


def _write_dataset(root, sizes_per_record) -> None:
    lines = []
    for i, sizes in enumerate(sizes_per_record):
        paths = []
        for j, (w, h) in enumerate(sizes):
            _photo(w, h, seed=10 * i + j).save(root / f"r{i}_{j}.png")
            paths.append(f"r{i}_{j}.png")
        record = {"id": str(i), "reference": paths, "subject_class": "dog", "prompt": f"a dog {i}"}
        lines.append(json.dumps(record))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")


def _train_two_iterations(name: str, tiny_options: dict, tmp_path, method: str, **sections) -> None:
    """``cgrpo train`` of two GRPO iterations of the tiny ``name`` policy (LoRA) on ``tmp_path/train.jsonl``
    with the tiny DINO-Seg and HPS-v3 rewards; ``sections``: extra config sections."""
    from typer.testing import CliRunner

    from cgrpo.cli import app

    if name == "uno":
        options = {**tiny_options, "image_size": 32, "reference_size": 32}
    else:
        options = {**tiny_options, "image_size": 64}
    config = {
        "method": method,
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "policy": {"name": name, "options": options, "lora": {"enabled": True, "rank": 4, "alpha": 4}},
        "data": {"name": "jsonl", "options": {"path": str(tmp_path / "train.jsonl"), "image_size": 32}},
        "rewards": {
            "identity": {"name": "dino_seg", "options": tiny_rewards.save_tiny_dino_seg(tmp_path / "ds")},
            "prompt": {"name": "hpsv3", "options": tiny_rewards.save_tiny_hpsv3(tmp_path / "hps")},
            "max_retries": 0,
        },
        "sampling": {"num_steps": 2, "noise_level": 0.7, "shift": 1.583, "micro_batch": 2},
        "train": {
            "iterations": 2,
            "prompts_per_iteration": 2,
            "group_size": 2,
            "train_steps": 1,
            "lr": 1e-4,
            "micro_batch": 2,
        },
        **sections,
        "eval": {"every": 0, "num_steps": 2, "images_per_prompt": 1},
        "log": {"tensorboard": False, "sample_grid_every": 0},
        "checkpoint": {"every": 0, "keep_last": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["uno", "flux2-klein"])
def test_two_grpo_iterations_with_references_of_different_sizes(name, tiny_uno, tiny_klein, tmp_path):
    # Records whose references differ in size (4:3 and 3:4), each record with two references of its own
    # sizes (the list form); the trainer buckets batches by the references' sizes.
    _write_dataset(tmp_path, [[(96, 72), (64, 80)], [(72, 96), (80, 64)], [(96, 72), (64, 80)]])
    _train_two_iterations(name, tiny_uno if name == "uno" else tiny_klein, tmp_path, "customized_grpo")
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["uno", "flux2-klein"])
def test_two_grpo_iterations_with_two_subjects_of_different_sizes(name, tiny_uno, tiny_klein, tmp_path):
    """Issue 16's end-to-end check: every record names two subjects whose references have their own sizes
    (4:3 and 3:4); the policy is conditioned on both, and each subject gets its own identity reward."""

    from cgrpo.train.logger import read_metrics

    lines = []
    for i in range(3):
        subjects = []
        for j, (cls, (w, h)) in enumerate([("dog", (96, 72)), ("cat", (64, 80))]):
            _photo(w, h, seed=10 * i + j).save(tmp_path / f"s{i}_{j}.png")
            subjects.append({"reference": f"s{i}_{j}.png", "subject_class": cls})
        lines.append(json.dumps({"id": str(i), "subjects": subjects, "prompt": f"a dog and a cat {i}"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    _train_two_iterations(
        name,
        tiny_uno if name == "uno" else tiny_klein,
        tmp_path,
        "customized_grpo_multi",
        advantage={"multi_subject": "pairwise"},
    )
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert {"reward/id_0", "reward/id_1", "reward/id_min"} <= set(last)
    assert last["reward/id_min"] <= min(last["reward/id_0"], last["reward/id_1"]) + 1e-6
