"""Exact resume: a run killed with SIGKILL mid-training and resumed with ``--resume`` logs the same numbers
as an uninterrupted run with the same seed (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from cgrpo.cli import app
from cgrpo.config import load_config, save_config
from cgrpo.train.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from cgrpo.train.config import GRPOConfig
from cgrpo.train.grpo import GRPOTrainer
from cgrpo.train.logger import read_metrics

COMPARED = ("loss", "reward/id", "reward/prompt", "clip_fraction", "grad_norm", "lr", "advantage/abs_mean")


def tiny_config(policy_dir, output_dir, *overrides) -> GRPOConfig:
    return load_config(
        GRPOConfig,
        None,
        [
            f"output_dir={output_dir}",
            f"policy.options={{path: {policy_dir}}}",
            "data.options={image_size: 16, num_train_subjects: 20, num_test_subjects: 4, "
            "train: {prompts_per_subject: 2}, eval: {num_subjects: 2, prompts_per_kind: 1}}",
            "train.prompts_per_iteration=2",
            "train.group_size=3",
            "train.train_steps=2",
            "train.lr=1e-2",
            "train.lr_schedule=cosine",  # the schedule's position must survive the kill too
            "train.warmup_iterations=3",
            "sampling.num_steps=4",
            "eval.num_steps=3",
            "eval.every=0",
            "checkpoint.every=1",
            "checkpoint.keep_last=2",
            "log.tensorboard=false",
            *overrides,
        ],
    )


def assert_same_metrics(straight, resumed):
    assert [r["step"] for r in resumed] == [r["step"] for r in straight], "one metrics line per step"
    for x, y in zip(straight, resumed, strict=True):
        for key in COMPARED:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_policy_dir, tmp_path):
    iterations = 30
    config = tiny_config(tiny_policy_dir, tmp_path / "killed", f"train.iterations={iterations}")
    save_config(config, tmp_path / "cfg.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cgrpo.cli", "train", str(tmp_path / "cfg.yaml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 180
    try:
        while True:  # kill as soon as step 3's checkpoint is complete: mid-run, maybe mid-iteration
            newest = latest_checkpoint(checkpoints)
            if newest is not None and int(newest.name.split("-")[1]) >= 3:
                break
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    killed_at = int(latest_checkpoint(checkpoints).name.split("-")[1])
    assert killed_at < iterations, "the run finished before it was killed"
    assert not (tmp_path / "killed" / "summary.json").exists()

    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output

    straight = tiny_config(tiny_policy_dir, tmp_path / "straight", f"train.iterations={iterations}")
    GRPOTrainer(straight).train()
    assert_same_metrics(
        read_metrics(tmp_path / "straight" / "metrics.jsonl"),
        read_metrics(tmp_path / "killed" / "metrics.jsonl"),
    )
    one = read_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"))[0]
    two = read_checkpoint(latest_checkpoint(checkpoints))[0]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-7)


def test_metrics_past_the_last_checkpoint_are_dropped_on_resume(tiny_policy_dir, tmp_path):
    """Steps logged after the newest checkpoint (a kill between logging and saving) are re-run once."""
    overrides = ("train.iterations=5", "checkpoint.keep_last=5")
    GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "straight", *overrides)).train()
    run = tmp_path / "run"
    GRPOTrainer(tiny_config(tiny_policy_dir, run, *overrides)).train(max_steps=4)
    import shutil

    for newer in list_checkpoints(run / "checkpoints")[2:]:  # keep steps 1-2; metrics has steps 1-4
        shutil.rmtree(newer)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    trainer = GRPOTrainer(tiny_config(tiny_policy_dir, run, *overrides), resume=True)
    assert trainer.step == 2
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    trainer.train()
    assert_same_metrics(
        read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    )


def test_checkpoint_holds_everything_resume_needs(tiny_policy_dir, tmp_path):
    trainer = GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "run", "train.iterations=2"))
    trainer.train()
    weights, state = read_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert weights and all("lora" in k for k in weights)
    assert state["step"] == 2
    expected = {
        "optimizer",
        "lr_scheduler",
        "sampler",
        "rollout_generator",
        "step_generator",
        "rng",
        "history",
    }
    assert expected <= set(state)
    assert set(state["rng"]) == {"torch", "numpy", "python"}
    assert state["lr_scheduler"]["last_epoch"] == 2  # stepped once per iteration
    assert state["history"]["eval"][0]["step"] == 0  # the tracker's eval history


def test_lr_schedules():
    from cgrpo.train.schedule import lr_factor

    assert [lr_factor(i, "constant", 3, 10) for i in (0, 5)] == [1.0, 1.0]
    assert [lr_factor(i, "warmup", 4, 10) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_factor(i, "cosine", 2, 12, min_ratio=0.1) for i in range(13)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:], strict=False))
