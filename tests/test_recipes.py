"""The shared parts of the recipes (GRPO, SFT, RPO): one contract, schedule, sigma sampler, JSONL helper."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cgrpo.io import truncate_jsonl
from cgrpo.train import recipe
from cgrpo.train.flow_matching import sample_sigmas
from cgrpo.train.schedule import lr_factor, lr_scheduler

# --- the learning-rate schedule ----------------------------------------------------------------------


def _sft_lr_lambda_before(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """``cgrpo.train.sft.lr_lambda`` as it was before the recipes shared one schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _grpo_lr_factor_before(iteration: int, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    """``cgrpo.train.components.lr_factor`` as it was before the recipes shared one schedule."""
    if schedule == "constant":
        return 1.0
    if iteration < warmup:
        return (iteration + 1) / warmup
    if schedule == "warmup":
        return 1.0
    progress = min(1.0, (iteration - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    "warmup,total,min_ratio", [(0, 10, 0.0), (3, 10, 0.05), (200, 3000, 0.05), (5, 5, 0.1)]
)
def test_one_schedule_reproduces_both_former_copies_exactly(warmup, total, min_ratio):
    steps = sorted({0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 1, total, total + 3} - {-1})
    for step in steps:
        cosine = lr_factor(step, "cosine", warmup, total, min_ratio)
        assert cosine == _sft_lr_lambda_before(step, warmup, total, min_ratio)  # bit for bit
        for schedule in ("constant", "warmup", "cosine"):
            expected = _grpo_lr_factor_before(step, schedule, max(warmup, 1), total, min_ratio)
            assert lr_factor(step, schedule, max(warmup, 1), total, min_ratio) == expected


def test_schedule_after_warmup_is_transformers_cosine_and_its_warmup_is_why_we_keep_our_own():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    warmup, total, min_ratio = 4, 20, 0.1
    ours = lr_scheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "cosine", warmup, total, min_ratio
    )
    theirs = get_cosine_with_min_lr_schedule_with_warmup(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), warmup, total, min_lr_rate=min_ratio
    )
    mine, library = ours.lr_lambdas[0], theirs.lr_lambdas[0]
    for step in range(warmup, total + 1):
        assert mine(step) == pytest.approx(library(step), abs=1e-12)
    # transformers' (and diffusers') warmup starts at 0: the first step would make no update.
    assert library(0) == 0.0 and mine(0) == 1 / warmup


def test_lr_scheduler_state_resumes():
    def scheduler():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        return lr_scheduler(optimizer, "cosine", 2, 10, 0.1)

    def step(schedule, times):
        for _ in range(times):
            schedule.optimizer.step()
            schedule.step()

    straight, resumed = scheduler(), scheduler()
    step(straight, 4)
    step(resumed, 2)
    state = resumed.state_dict()
    resumed = scheduler()
    resumed.load_state_dict(state)
    step(resumed, 2)
    assert resumed.get_last_lr() == straight.get_last_lr() == [0.5 * lr_factor(4, "cosine", 2, 10, 0.1)]


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="'linear'"):
        lr_factor(5, "linear", 1, 10)


# --- the sigma sampler -------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_sample_sigmas_draws_what_the_former_copies_drew(sampling):
    mean, std = 0.3, 1.7
    shared = torch.Generator().manual_seed(7)
    ours = [sample_sigmas(5, sampling, mean, std, shared) for _ in range(3)]
    former = torch.Generator().manual_seed(7)  # SFT's sample_sigmas / RPO's _sample_sigmas, before
    for drawn in ours:
        if sampling == "uniform":
            expected = torch.rand(5, generator=former)
        else:
            expected = torch.sigmoid(mean + std * torch.randn(5, generator=former))
        assert torch.equal(drawn, expected)
        assert ((drawn > 0) & (drawn < 1)).all()


def test_sample_sigmas_rejects_unknown_sampling():
    with pytest.raises(ValueError, match="'beta'"):
        sample_sigmas(2, "beta")  # type: ignore[arg-type]


# --- the JSONL helper --------------------------------------------------------------------------------


def test_truncate_jsonl_keeps_records_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": s / 10} for s in (0, 1, 2, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    truncate_jsonl(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:4]
    truncate_jsonl(tmp_path / "missing.jsonl", 2)
    assert not (tmp_path / "missing.jsonl").exists()


def test_logger_and_advantage_log_truncate_the_same_way(tmp_path):
    from cgrpo.train.advantage_log import log_advantages, truncate_advantages
    from cgrpo.train.logger import MetricsLogger, read_metrics

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, {"loss": float(step)}, echo=False)
        log_advantages(tmp_path / "advantages.jsonl", step, torch.zeros(2), torch.ones(2))
    logger.close()
    MetricsLogger(tmp_path, tensorboard=False, resume_step=2).close()
    truncate_advantages(tmp_path / "advantages.jsonl", 2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "advantages.jsonl")] == [1, 2]


# --- the recipe contract -----------------------------------------------------------------------------


def test_every_recipe_has_the_same_entry_point():
    import inspect

    from cgrpo.train.config import GRPOConfig
    from cgrpo.train.rpo import RPOConfig
    from cgrpo.train.sft import SFTConfig

    assert {k: recipe.config_class(k) for k in recipe.RECIPES} == {
        "grpo": GRPOConfig,
        "sft": SFTConfig,
        "rpo": RPOConfig,
    }
    for kind in recipe.RECIPES:
        parameters = list(inspect.signature(recipe.get(kind).run).parameters)
        assert parameters[:2] == ["config", "resume"], kind
        assert recipe.command(kind).startswith("cgrpo ")
    with pytest.raises(ValueError, match="unknown run kind 'dpo'"):
        recipe.get("dpo")


def test_recipe_config_errors_name_the_key():
    from cgrpo.config import ConfigError

    with pytest.raises(ConfigError, match="optim.lr"):
        recipe.load_config("sft", None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="unknown key resume"):  # resume is the contract's argument now
        recipe.load_config("sft", None, ["resume=true"])


def test_cli_commands_share_the_recipe_options():
    from typer.testing import CliRunner

    from cgrpo.cli import app

    for command in ("train", "sft", "rpo"):
        result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0
        assert "--resume" in result.output and "--output-dir" in result.output, command
