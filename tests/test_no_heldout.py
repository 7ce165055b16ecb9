"""Runs on a dataset without held-out data (no ``eval_path``) finish, and their summary says so."""

import json

import torch
from typer.testing import CliRunner

from cgrpo.cli import app
from cgrpo.config import load_config, save_config
from cgrpo.data.miniworld import MiniWorld
from cgrpo.rewards import to_pil
from cgrpo.train.config import GRPOConfig
from cgrpo.train.heldout import NO_HELDOUT
from cgrpo.train.rpo import RPOConfig
from cgrpo.train.sft import SFTConfig


def _jsonl_dataset(directory):
    """Four mini-world (reference, prompt, target) records of 16 x 16 images, and no held-out file."""
    directory.mkdir()
    rows = []
    for index, example in enumerate(
        MiniWorld(16, num_train_subjects=4, num_test_subjects=1).dataset("train", 1)
    ):
        reference, target = to_pil(torch.stack([example.reference, example.target]))
        reference.save(directory / f"{index}-reference.png")
        target.save(directory / f"{index}-target.png")
        rows.append(
            {
                "id": str(index),
                "reference": f"{index}-reference.png",
                "target": f"{index}-target.png",
                "subject_class": example.subject_class,
                "prompt": example.prompt,
            }
        )
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tiny_policy_on_jsonl(tiny_policy_dir, tmp_path) -> list[str]:
    """Overrides shared by the GRPO and RPO runs: the tiny policy on a JSONL set without held-out data."""
    jsonl = _jsonl_dataset(tmp_path / "data")
    return [
        f"policy.options={{path: {tiny_policy_dir}}}",
        "data.name=jsonl",
        f"data.options={{path: {jsonl}, image_size: 16}}",
    ]


def _train_and_check_summary(config_class, command: str, run, overrides: list[str], tmp_path) -> None:
    """``cgrpo <command>`` on a config of ``config_class`` with ``overrides``: it succeeds, and the summary in
    ``run`` says that there was no held-out data."""
    config = load_config(config_class, None, [f"output_dir={run}", *overrides])
    save_config(config, tmp_path / f"{command}.yaml")
    result = CliRunner().invoke(app, [command, str(tmp_path / f"{command}.yaml")])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary == {"base": {}, "trained": {}, "heldout": NO_HELDOUT}


def test_cli_train_without_heldout_data_succeeds_and_says_so(tiny_policy_dir, tmp_path):
    run = tmp_path / "run"
    overrides = [
        *_tiny_policy_on_jsonl(tiny_policy_dir, tmp_path),
        "train.iterations=2",
        "train.prompts_per_iteration=2",
        "train.group_size=2",
        "train.train_steps=1",
        "sampling.num_steps=3",
        "eval.every=1",
        "checkpoint.every=0",
        "log.tensorboard=false",
    ]
    _train_and_check_summary(GRPOConfig, "train", run, overrides, tmp_path)
    assert "eval_path" in NO_HELDOUT
    assert (run / "final" / "adapter_model.safetensors").exists()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_cli_rpo_without_heldout_data_succeeds_and_says_so(tiny_policy_dir, tmp_path):
    run = tmp_path / "rpo"
    overrides = [
        *_tiny_policy_on_jsonl(tiny_policy_dir, tmp_path),
        "sampling.num_steps=3",
        "pairs.prompts=4",
        "pairs.candidates=4",
        "train.steps=2",
        "train.batch_size=2",
        "log.tensorboard=false",
    ]
    _train_and_check_summary(RPOConfig, "rpo", run, overrides, tmp_path)


def test_cli_sft_without_heldout_data_succeeds_and_says_so(tiny_policy_dir, tmp_path):
    jsonl = _jsonl_dataset(tmp_path / "data")
    run = tmp_path / "sft"
    overrides = [
        f"data.dataset={{name: jsonl, options: {{path: {jsonl}, image_size: 16}}}}",
        "model.policy=mini",
        f"model.options={{path: {tiny_policy_dir}}}",
        "model.lora={enabled: true, rank: 4, alpha: 4}",
        "optim.steps=2",
        "optim.batch_size=2",
        "optim.warmup_steps=1",
        "heldout.enabled=true",
        "heldout.num_steps=2",
        "log_every=1",
        "eval_every=1",
        "save_every=0",
        "sample_steps=2",
        "num_threads=0",
        "progress=false",
    ]
    _train_and_check_summary(SFTConfig, "sft", run, overrides, tmp_path)
    assert (run / "final" / "adapter_model.safetensors").exists()
