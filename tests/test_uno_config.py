"""configs/uno/paper.yaml: the paper's UNO setting loads as a valid GRPOConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from cgrpo.config import load_config
from cgrpo.train.config import GRPOConfig

PAPER = Path(__file__).resolve().parents[1] / "src" / "cgrpo" / "configs" / "uno" / "paper.yaml"


def test_paper_config_loads_with_the_papers_values():
    config = load_config(GRPOConfig, PAPER)
    config.validate()
    assert config.policy.name == "uno" and config.policy.options["dtype"] == "bfloat16"
    assert config.policy.lora.enabled and config.policy.gradient_checkpointing
    assert (config.train.group_size, config.sampling.num_steps, config.train.train_steps) == (12, 25, 14)
    assert (config.train.lr, config.train.weight_decay) == (1e-5, 1e-4)
    assert (config.train.iterations, config.train.prompts_per_iteration) == (1250, 1)
    assert config.advantage.alpha == 0.5 and (config.advantage.w_max, config.advantage.w_min) == (0.7, 0.3)
    assert config.advantage.synergy == "tanh" and config.advantage.schedule == "paper"
    assert config.rewards.identity.name == "dino_seg" and config.rewards.prompt.name == "hpsv3"
    assert config.data.name == "jsonl"
    assert config.sampling.shift == pytest.approx(1.583)


def test_paper_config_shift_is_unos():
    from cgrpo.policy.uno import uno_shift

    assert load_config(GRPOConfig, PAPER).sampling.shift == pytest.approx(uno_shift(512, 512), abs=1e-3)


def test_paper_config_accepts_overrides():
    config = load_config(GRPOConfig, PAPER, ["policy.options.flux_path=/ckpt/flux", "train.lr=2e-5"])
    assert config.policy.options["flux_path"] == "/ckpt/flux" and config.train.lr == 2e-5


def test_cgrpo_policies_lists_the_backbones():
    from typer.testing import CliRunner

    from cgrpo import policy
    from cgrpo.cli import app

    assert {"mini", "uno", "flux-kontext", "flux2-klein"} <= set(policy.names())
    result = CliRunner().invoke(app, ["policies"])
    assert result.exit_code == 0
    for name in ("mini", "uno", "flux-kontext", "flux2-klein"):
        assert name in result.output
