"""Faults and bad input: non-finite rewards, failing or hanging rewards, a full disk, bad datasets, bad
configs, leftovers of a killed save. (tests/test_grpo.py covers half-NaN rewards and a flaky reward.)"""

from __future__ import annotations

import errno
import json
import math
import threading
import time

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cgrpo import rewards
from cgrpo.cli import app
from cgrpo.config import load_config, save_config
from cgrpo.train import checkpoint as ckpt
from cgrpo.train import components
from cgrpo.train.components import CheckpointError, RewardFailure, score_with_retries
from cgrpo.train.config import GRPOConfig
from cgrpo.train.grpo import GRPOTrainer
from cgrpo.train.logger import read_metrics

G = 3  # images per group in the tiny config (2 groups per iteration)


def tiny_config(policy_dir, output_dir, *overrides) -> GRPOConfig:
    return load_config(GRPOConfig, None, tiny_overrides(policy_dir, output_dir, *overrides))


def tiny_overrides(policy_dir, output_dir, *overrides) -> list[str]:
    return [
        f"output_dir={output_dir}",
        f"policy.options={{path: {policy_dir}}}",
        "data.options={image_size: 16, num_train_subjects: 20, num_test_subjects: 4, "
        "train: {prompts_per_subject: 2}, eval: {num_subjects: 2, prompts_per_kind: 1}}",
        "train.iterations=2",
        "train.prompts_per_iteration=2",
        f"train.group_size={G}",
        "train.train_steps=2",
        "train.lr=1e-2",
        "sampling.num_steps=4",
        "eval.num_steps=3",
        "eval.every=0",
        "checkpoint.every=1",
        "log.tensorboard=false",
        "rewards.retry_backoff_s=0",
        *overrides,
    ]


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in trainer.policy.transformer.named_parameters() if p.requires_grad
    }


# ------------------------------------------------------------------------------------- non-finite rewards


@rewards.register("test_nan_first_group")
def _nan_first_group(**_):
    """Identity-like reward that is NaN or inf for the whole first group of every batch."""

    def score(images, references, prompts, subjects=None):
        values = images.float().mean(dim=(1, 2, 3))
        values[:G] = torch.tensor([math.nan, math.inf, -math.inf])
        return values

    return score


@rewards.register("test_all_nan")
def _all_nan(**_):
    return lambda images, references, prompts, subjects=None: torch.full((len(prompts),), math.nan)


def test_group_without_valid_sample_is_skipped_and_the_run_continues(tiny_policy_dir, tmp_path):
    config = tiny_config(tiny_policy_dir, tmp_path / "run", "rewards.identity.name=test_nan_first_group")
    trainer = GRPOTrainer(config)
    before = _lora(trainer)
    trainer.train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped_groups"] for r in records] == [1, 1]
    assert [r["invalid_samples"] for r in records] == [G, G]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward/id"]) for r in records)
    assert any(not torch.equal(before[k], v) for k, v in _lora(trainer).items()), "the valid group trains"


def test_iteration_with_no_valid_group_makes_no_update(tiny_policy_dir, tmp_path):
    config = tiny_config(tiny_policy_dir, tmp_path / "run", "rewards.prompt.name=test_all_nan")
    trainer = GRPOTrainer(config)
    before = _lora(trainer)
    metrics = trainer.iteration()
    assert metrics["skipped_groups"] == 2 and metrics["invalid_samples"] == 2 * G
    assert metrics["grad_norm"] == 0.0 and not trainer.optimizer.state  # AdamW never stepped
    assert all(torch.equal(before[k], v) for k, v in _lora(trainer).items())


# ---------------------------------------------------------------------------------- failing rewards


class _Hangs:
    name = "hangs"

    def __call__(self, images, references, prompts, subjects=None):
        threading.Event().wait(30)  # (not time.sleep: the test replaces it to record the backoff)
        return torch.ones(len(prompts))


def test_reward_timeout_is_retried_with_backoff_then_fails(monkeypatch):
    waits = []
    monkeypatch.setattr(components.time, "sleep", waits.append)
    tic = time.perf_counter()
    with pytest.raises(
        RewardFailure, match=r"'hangs' failed 3 times; last error: TimeoutError: no answer within"
    ):
        score_with_retries(
            _Hangs(), torch.zeros(2, 3, 4, 4), None, ["a", "b"], ["x", "y"], 2, 0.5, timeout_s=0.05
        )
    assert waits == [0.5, 1.0]  # exponential backoff between the attempts
    assert time.perf_counter() - tic < 5


def test_reward_with_wrong_number_of_scores_is_a_failure():
    with pytest.raises(RewardFailure, match="returned 1 scores for 2 images"):
        score_with_retries(lambda *a: torch.ones(1), None, None, ["a", "b"], None, 0, 0.0)


@rewards.register("test_down")
def _down(**_):
    def score(images, references, prompts, subjects=None):
        raise ConnectionError("reward server at 10.0.0.7:8000 refused the connection")

    return score


def test_cli_reward_failure_checkpoints_and_prints_one_red_line(tiny_policy_dir, tmp_path):
    run = tmp_path / "run"
    save_config(tiny_config(tiny_policy_dir, run, "rewards.prompt.name=test_down"), tmp_path / "cfg.yaml")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), "rewards.max_retries=2"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1, result.output
    assert "reward 'test_down' failed 3 times" in errors[0] and "refused the connection" in errors[0]
    assert "Saved checkpoint" in errors[0] and errors[0].rstrip().endswith("resume with --resume.")
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-000000"]
    assert "Traceback" not in result.output


class _FailsAfter:
    """A prompt reward that works for ``calls`` calls, then fails for good."""

    name = "fails_after"

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def __call__(self, *args):
        self.calls -= 1
        if self.calls < 0:
            raise TimeoutError("reward server timed out")
        return self.inner(*args)


def test_reward_failure_checkpoint_resumes_exactly(tiny_policy_dir, tmp_path):
    """The checkpoint written on a reward failure holds the state at the start of the failed iteration,
    so resuming from it gives the uninterrupted run's numbers."""
    overrides = ("train.iterations=3", "rewards.max_retries=0")
    GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "straight", *overrides)).train()
    trainer = GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "run", *overrides, "checkpoint.every=0"))
    trainer.prompt_reward = _FailsAfter(
        trainer.prompt_reward, calls=2 + 1
    )  # 1 eval + 2 iterations, then down
    with pytest.raises(RewardFailure, match="Saved checkpoint .*step-000002"):
        trainer.train()
    resumed = GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "run", *overrides), resume=True)
    assert resumed.step == 2
    resumed.train()
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    again = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3]
    for key in ("loss", "reward/id", "reward/prompt", "grad_norm"):
        assert again[2][key] == pytest.approx(straight[2][key], rel=1e-5, abs=1e-7), key


# ------------------------------------------------------------------------------------ disk full / denied


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_policy_dir, tmp_path, monkeypatch):
    trainer = GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "run", "train.iterations=3"))
    real_save = ckpt.torch.save
    calls: list = []

    def save_then_fill_the_disk(obj, path, *args, **kwargs):
        if not str(path).endswith("state.pt"):  # eval samples are saved with torch.save too
            return real_save(obj, path, *args, **kwargs)
        calls.append(path)
        if len(calls) >= 2:
            with open(path, "wb") as handle:  # half a file, then the disk is full
                handle.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_then_fill_the_disk)
    with pytest.raises(
        CheckpointError, match=r"No space left on device; the previous checkpoint step-000001"
    ):
        trainer.train()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001"]  # no temp dir left behind
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    resumed = GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "run", "train.iterations=3"), resume=True)
    assert resumed.step == 1


def test_cli_permission_denied_while_saving_exits_2(tiny_policy_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_config(tiny_config(tiny_policy_dir, run), tmp_path / "cfg.yaml")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(run / "checkpoints"))

    monkeypatch.setattr(ckpt, "save_file", denied)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml")])
    assert result.exit_code == 2, result.output
    assert "could not write checkpoint" in result.output and "Permission denied" in result.output
    assert ckpt.list_checkpoints(run / "checkpoints") == []


def test_leftover_temp_dirs_of_a_killed_save_are_ignored_and_cleaned(tiny_policy_dir, tmp_path):
    config = tiny_config(tiny_policy_dir, tmp_path / "run", "train.iterations=3")
    GRPOTrainer(config).train(max_steps=1)
    checkpoints = tmp_path / "run" / "checkpoints"
    half = checkpoints / ".step-000002.x1y2.tmp"  # killed while writing step 2
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"\0" * 10)
    aside = checkpoints / ".step-000001.k3j4.old"  # killed between the two renames of a re-save
    aside.mkdir()
    assert ckpt.latest_checkpoint(checkpoints).name == "step-000001"
    trainer = GRPOTrainer(config, resume=True)
    assert trainer.step == 1
    assert not half.exists() and not aside.exists()
    trainer.train()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000003"]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path, 4, model, {"v": 1})
    ckpt.save_checkpoint(tmp_path, 4, model, {"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-000004"]
    assert ckpt.read_checkpoint(tmp_path / "step-000004")[1]["v"] == 2


# ---------------------------------------------------------------------------------------- bad datasets


def _png(path, size=(16, 16), mode="RGB"):
    Image.new(mode, size, (200, 10, 10) if mode == "RGB" else 0).save(path)
    return path


def test_cli_bad_dataset_fails_before_the_first_step_naming_every_file_and_line(tiny_policy_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "ok.png")
    _png(data / "small.png", size=(8, 8))
    Image.new("CMYK", (16, 16)).save(data / "cmyk.jpg")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [
        {"id": "a", "reference": "ok.png", "subject_class": "cube", "prompt": "a cube"},
        {"id": "b", "reference": "missing.png", "subject_class": "cube", "prompt": "a cube at night"},
        {"id": "c", "reference": "corrupt.png", "subject_class": "cube", "prompt": "a cube"},
        {"id": "d", "reference": "small.png", "subject_class": "cube", "prompt": "a cube"},
        {"id": "e", "reference": "cmyk.jpg", "subject_class": "cube", "prompt": "a cube"},
        {"id": "f", "reference": "ok.png", "subject_class": "cube", "prompt": "  "},
        {"id": "a", "reference": "ok.png", "subject_class": "cube", "prompt": "a ball"},
    ]
    jsonl = data / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(
        tiny_policy_dir,
        tmp_path / "run",
        "data.name=jsonl",
        f"data.options={{path: {jsonl}, image_size: 16}}",
    )
    save_config(config, tmp_path / "cfg.yaml")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml")])
    assert result.exit_code == 2, result.output
    text = result.output
    for line, phrase in [
        (2, "missing.png not found"),
        (3, "corrupt.png is"),
        (4, "smaller than the required"),
        (5, "is CMYK"),
        (6, "empty prompt"),
        (7, "duplicate id 'a'"),
    ]:
        assert f"{jsonl}:{line}: " in text and phrase in text, (line, phrase, text)
    assert f"{jsonl}:1:" not in text
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "validation must come before the first step"


# ------------------------------------------------------------------------------------------ bad configs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.grup_size=4", "unknown key train.grup_size"),
        ("distributed.stratgy=ddp", "unknown key distributed.stratgy"),
        ("train.iterations=many", "train.iterations: expected an integer"),
        ("rewards.timeout_s=soon", "rewards.timeout_s: expected a number"),
        ("train.group_size=1", "train.group_size = 1 is invalid"),
        (
            "train.train_steps=4",
            "train.train_steps = 4 is invalid: expected between 1 and sampling.num_steps - 1",
        ),
        ("sampling.num_steps=2", "train.train_steps = 2 is invalid"),
        ("train.lr_schedule=linear", "train.lr_schedule: expected one of"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio = 2.0 is invalid"),
        ("train.betas=[0.9, 1.5]", "train.betas"),
        ("train.grad_clip=0", "train.grad_clip = 0.0 is invalid"),
        ("rewards.max_retries=-1", "rewards.max_retries = -1 is invalid"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last = 0 is invalid"),
        ("distributed.strategy=zero3", "distributed.strategy: expected one of"),
        ("train.step_selection=window", None),  # window_size 4 > T - 1 = 3
    ],
)
def test_cli_bad_config_names_the_key(tiny_policy_dir, tmp_path, override, message):
    save_config(tiny_config(tiny_policy_dir, tmp_path / "run"), tmp_path / "cfg.yaml")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), override])
    assert result.exit_code == 2, result.output
    assert (message or "train.window_size = 4 is invalid") in " ".join(result.output.split()), result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
