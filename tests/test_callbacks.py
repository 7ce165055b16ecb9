"""Callbacks: the hooks a recipe calls, the built-in ones that write a run's images and logs, and notices that
go through Python logging (tiny runs on a random policy, seconds)."""

import json
import logging

import torch
from PIL import Image

from cgrpo.imaging import grid
from cgrpo.train import sft
from cgrpo.train.callbacks import Callback
from cgrpo.train.grpo import GRPOTrainer, run
from cgrpo.train.heldout import HeldoutResult
from tests.test_grpo import tiny_config


class Recorder(Callback):
    """Every hook call as (hook, step), plus what the hooks were given."""

    def __init__(self):
        self.calls = []
        self.rollouts = {}
        self.advantages = {}
        self.evaluations = {}
        self.summary = None

    def on_train_start(self, step):
        self.calls.append(("train_start", step))

    def on_rollout(self, step, references, images):
        self.calls.append(("rollout", step))
        self.rollouts[step] = (references.clone(), images.clone())

    def on_advantages(self, step, a_id, a_prompt, valid, group_size):
        self.calls.append(("advantages", step))
        self.advantages[step] = (a_id.clone(), a_prompt.clone(), valid.clone(), group_size)

    def on_evaluation(self, step, result):
        self.calls.append(("evaluation", step))
        self.evaluations[step] = result

    def on_log(self, step, metrics):
        self.calls.append(("log", step))

    def on_train_end(self, summary):
        self.calls.append(("train_end", None))
        self.summary = summary


def test_user_callback_gets_the_hooks_in_order_with_their_steps(tiny_policy_dir, tmp_path):
    recorder = Recorder()
    config = tiny_config(tiny_policy_dir, tmp_path / "run", "eval.every=1")
    summary = run(config, callbacks=[recorder])
    assert recorder.calls == [
        ("train_start", 0),
        ("evaluation", 0),  # the base policy
        ("rollout", 1),
        ("advantages", 1),
        ("evaluation", 1),
        ("log", 1),
        ("rollout", 2),
        ("advantages", 2),
        ("evaluation", 2),
        ("log", 2),
        ("train_end", None),
    ]
    assert recorder.summary == summary
    assert all(isinstance(result, HeldoutResult) for result in recorder.evaluations.values())
    references, images = recorder.rollouts[1]
    assert references.shape == images.shape == (6, 3, 16, 16)  # 2 prompts x G=3
    a_id, a_prompt, valid, group_size = recorder.advantages[2]
    assert a_id.shape == a_prompt.shape == valid.shape == (6,) and group_size == 3


def test_builtin_callbacks_write_what_the_hooks_saw(tiny_policy_dir, tmp_path):
    recorder = Recorder()
    config = tiny_config(tiny_policy_dir, tmp_path / "run", "log.sample_grid_every=2", "eval.every=1")
    GRPOTrainer(config, callbacks=[recorder]).train()
    samples = tmp_path / "run" / "samples"

    # The rollout grid: every second iteration, reference | image of the first two groups (6 rows).
    assert sorted(p.name for p in samples.glob("rollout-*")) == ["rollout-step-000002.png"]
    references, images = recorder.rollouts[2]
    written = Image.open(samples / "rollout-step-000002.png")
    assert list(written.getdata()) == list(grid([references, images]).getdata())

    # The advantages log: one line per iteration, the values the hook got (rounded as the log stores them).
    lines = [json.loads(line) for line in (tmp_path / "run" / "advantages.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        a_id, a_prompt, valid, group_size = recorder.advantages[line["step"]]
        assert line["group_size"] == group_size and valid.all()
        assert line["a_id"] == [round(v, 6) for v in a_id.tolist()]
        assert line["a_prompt"] == [round(v, 6) for v in a_prompt.tolist()]

    # Held-out images: the tensor and a PNG (reference | sample) of every evaluation.
    assert sorted(recorder.evaluations) == [0, 1, 2]
    for step, result in recorder.evaluations.items():
        assert torch.equal(torch.load(samples / f"eval-step-{step:06d}.pt"), result.images)
        assert Image.open(samples / f"eval-step-{step:06d}.png").size[1] == grid([result.images]).size[1]


def test_grids_and_advantages_are_off_when_the_config_says_so(tiny_policy_dir, tmp_path):
    config = tiny_config(tiny_policy_dir, tmp_path / "run", "log.sample_grid_every=0", "log.advantages=false")
    GRPOTrainer(config).train()
    assert not list((tmp_path / "run" / "samples").glob("rollout-*"))
    assert not (tmp_path / "run" / "advantages.jsonl").exists()


def test_notices_and_metrics_lines_go_to_logging(tiny_policy_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cgrpo")
    GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "run"), resume=True).train(max_steps=1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.name for r in warnings] == ["cgrpo.train.grpo"]
    assert (
        warnings[0].getMessage()
        == f"--resume: no checkpoint in {tmp_path / 'run' / 'checkpoints'}; starting fresh"
    )
    [line] = [r.getMessage() for r in caplog.records if r.name == "cgrpo.train.logger"]
    assert line.startswith("step    1  loss ") and "reward/id " in line and "[" not in line  # no markup

    caplog.clear()
    GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "run"), resume=True).train(max_steps=1)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    assert f"resumed from {checkpoint} at step 1" in [r.getMessage() for r in caplog.records]


def test_the_command_line_shows_the_notices(tiny_policy_dir, tmp_path):
    from typer.testing import CliRunner

    from cgrpo.cli import app
    from cgrpo.config import save_config

    save_config(tiny_config(tiny_policy_dir, tmp_path / "cli"), tmp_path / "cfg.yaml")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), "--max-steps", "1", "--resume"])
    assert result.exit_code == 0, result.output
    assert "--resume: no checkpoint in" in result.output
    assert "step    1  loss " in result.output


def test_sft_callbacks_get_previews_and_metrics(tmp_path):
    recorder = Recorder()
    config = sft.SFTConfig()
    config.output_dir = tmp_path / "sft"
    config.data = sft.SFTDataConfig(
        image_size=16, num_train_subjects=4, num_test_subjects=2, prompts_per_subject=1, eval_examples=2
    )
    config.optim = sft.SFTOptimConfig(steps=2, batch_size=2, warmup_steps=1)
    config.log_every, config.eval_every, config.save_every = 1, 2, 0
    config.sample_steps, config.num_threads, config.progress = 2, 1, False
    assert sft.run(config, callbacks=[recorder]) == {}
    assert recorder.calls == [
        ("train_start", 0),
        ("log", 1),
        ("log", 2),
        ("evaluation", 2),
        ("log", 2),
        ("train_end", None),
    ]
    assert isinstance(recorder.evaluations[2], sft.SFTPreview)
    assert (tmp_path / "sft" / "samples" / "step_000002.png").is_file()
