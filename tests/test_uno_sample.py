"""``cgrpo.sample``: the sample() function and the ``cgrpo sample`` command on a tiny ``uno`` policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from cgrpo.config import parse_policy_options
from cgrpo.policy import build
from cgrpo.sample import sample, sample_command
from cgrpo.testing.policies import save_tiny_uno


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    options = save_tiny_uno(root / "uno")
    rng = np.random.default_rng(0)
    for name in ("dog", "cup"):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root, options


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("sample")(sample_command)
    app.command("other")(lambda: None)
    return app


def test_sample_is_deterministic_and_batch_independent(tiny):
    root, options = tiny
    policy = build("uno", **options, image_size=32)
    refs = [root / "dog.png", root / "cup.png"]
    prompts = ["a dog on the beach", "a cup in the snow"]
    one = sample(policy, refs, prompts, num_steps=3, seed=5, batch_size=1)
    two = sample(policy, refs, prompts, num_steps=3, seed=5, batch_size=2)
    assert [i.size for i in one] == [(32, 32), (32, 32)]
    for a, b in zip(one, two, strict=True):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    other_seed = sample(policy, refs[:1], prompts[:1], num_steps=3, seed=6)
    assert not np.array_equal(np.asarray(other_seed[0]), np.asarray(one[0]))
    text_only = sample(policy, [None], ["a dog"], num_steps=2)
    assert text_only[0].size == (32, 32)
    assert policy.guidance == 4.0
    sample(policy, refs[:1], prompts[:1], num_steps=2, guidance=2.0)
    assert policy.guidance == 4.0  # the override is temporary


def test_sample_command_with_prompts_pairs_and_lora(tiny):
    root, options = tiny
    runner = CliRunner()
    policy_options = [
        f"--policy-option=flux_path={options['flux_path']}",
        f"--policy-option=lora_path={options['lora_path']}",
        "--policy-option=image_size=32",
    ]
    common = ["sample", "--policy", "uno", *policy_options, "--num-steps", "2", "--device", "cpu"]
    out = root / "out"
    result = runner.invoke(
        _app(),
        [
            *common,
            "--reference",
            str(root / "dog.png"),
            "--prompt",
            "a dog",
            "--prompt",
            "a dog at night",
            "--images-per-prompt",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == [
        "0000_0.png",
        "0000_1.png",
        "0001_0.png",
        "0001_1.png",
    ]
    manifest = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in manifest] == [0, 1, 0, 1] and manifest[2]["prompt"] == "a dog at night"

    pairs = root / "pairs.jsonl"
    records = [
        {"id": "a", "reference": "dog.png", "subject_class": "dog", "prompt": "a dog"},
        {"id": "b", "reference": ["cup.png", "dog.png"], "subject_class": "cup", "prompt": "a cup"},
    ]
    pairs.write_text("".join(json.dumps(record) + "\n" for record in records))
    policy = build("uno", **options, image_size=32)
    policy.add_lora(rank=2, alpha=2)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    policy.save_lora(root / "adapter")
    result = runner.invoke(
        _app(),
        [*common, "--pairs", str(pairs), "--lora", str(root / "adapter"), "--out", str(root / "pairs")],
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in (root / "pairs").glob("*.png")} == {"0000_0.png", "0001_0.png"}
    with_lora = np.asarray(Image.open(root / "pairs" / "0000_0.png"))
    without = np.asarray(Image.open(out / "0000_0.png"))  # same pair ("a dog", dog.png), seed 0
    assert not np.array_equal(with_lora, without)


def test_sample_command_errors(tiny):
    root, options = tiny
    result = CliRunner().invoke(
        _app(),
        [
            "sample",
            f"--policy-option=flux_path={options['flux_path']}",
            "--reference",
            str(root / "nope.png"),
            "--prompt",
            "x",
            "--out",
            str(root / "err"),
        ],
    )
    assert result.exit_code == 2 and "does not exist" in result.output
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_policy_options(["flux_path"])
    assert parse_policy_options(["image_size=512", "dtype=bfloat16", "offload=true"]) == {
        "image_size": 512,
        "dtype": "bfloat16",
        "offload": True,
    }
