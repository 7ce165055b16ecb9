"""End to end: two GRPO iterations of a tiny ``uno`` policy (tiny FLUX components + a random UNO-format LoRA)
with tiny ``dino_seg`` and ``hpsv3`` reward models, through the trainer and through ``cgrpo train``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from cgrpo.testing import rewards as tiny_rewards
from cgrpo.testing.policies import save_tiny_uno


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    policy_options = save_tiny_uno(root / "uno", seed=0, lora_rank=4)
    dino_seg = tiny_rewards.save_tiny_dino_seg(root / "dino_seg")
    hpsv3 = tiny_rewards.save_tiny_hpsv3(root / "hpsv3")
    rng = np.random.default_rng(0)
    lines = []
    for i, (subject, prompt) in enumerate(
        [("dog", "a dog on the beach"), ("cup", "a cup in the snow"), ("toy", "a toy on a table")]
    ):
        image = np.full((40, 40, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        image[10:30, 10:30] = rng.integers(0, 256, 3)
        Image.fromarray(image).save(root / f"{subject}.png")
        record = {"id": str(i), "reference": f"{subject}.png", "subject_class": subject, "prompt": prompt}
        lines.append(json.dumps(record))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    config = {
        "method": "customized_grpo",
        "seed": 0,
        "output_dir": str(root / "run"),
        "device": "cpu",
        "policy": {
            "name": "uno",
            "options": {**policy_options, "image_size": 32},
            "lora": {"enabled": True, "rank": 4, "alpha": 4},
            "gradient_checkpointing": True,
        },
        "data": {
            "name": "jsonl",
            "options": {
                "path": str(root / "train.jsonl"),
                "image_size": 32,
                "eval_path": str(root / "train.jsonl"),
            },
        },
        "rewards": {
            "identity": {"name": "dino_seg", "options": {**dino_seg, "batch_size": 4}},
            "prompt": {"name": "hpsv3", "options": {**hpsv3, "batch_size": 4}},
            "max_retries": 0,
        },
        "sampling": {"num_steps": 3, "noise_level": 0.7, "shift": 1.583, "micro_batch": 2},
        "train": {
            "iterations": 2,
            "prompts_per_iteration": 1,
            "group_size": 2,
            "train_steps": 2,
            "lr": 1e-4,
            "micro_batch": 2,
        },
        "eval": {"every": 0, "num_steps": 2, "images_per_prompt": 1},
        "log": {"tensorboard": False, "sample_grid_every": 0},
        "checkpoint": {"every": 0, "keep_last": 1},
    }
    path = root / "uno_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def test_two_grpo_iterations_with_the_trainer(setup):
    import torch

    from cgrpo.config import load_config
    from cgrpo.train.config import GRPOConfig
    from cgrpo.train.grpo import GRPOTrainer

    root, path = setup
    config = load_config(GRPOConfig, path, [f"output_dir={root / 'trainer'}"])
    trainer = GRPOTrainer(config)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    summary = trainer.train()
    assert trainer.step == 2
    assert set(summary) == {"base", "trained"}
    after = dict(trainer.policy.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the LoRA was updated
    assert (root / "trainer" / "final" / "adapter_model.safetensors").is_file()
    metrics = [json.loads(line) for line in (root / "trainer" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) >= 2


def test_two_grpo_iterations_through_the_cli(setup):
    from typer.testing import CliRunner

    from cgrpo.cli import app

    root, path = setup
    result = CliRunner().invoke(app, ["train", str(path), f"output_dir={root / 'cli'}"])
    assert result.exit_code == 0, result.output
    assert (root / "cli" / "final" / "adapter_config.json").is_file()
    assert (root / "cli" / "summary.json").is_file()
