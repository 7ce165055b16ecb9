"""Supervised flow-matching pretraining on a tiny policy and a synthetic dataset."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cgrpo.data.miniworld as mw
import cgrpo.train.sft as sft
from cgrpo.config import load_config
from cgrpo.data.base import Example
from cgrpo.policy.flux import ReferenceFluxPolicy
from cgrpo.testing.policies import tiny_policy_for_tests
from cgrpo.train.checkpoint import list_checkpoints
from cgrpo.train.sft import SFTConfig, flow_matching_loss, run_sft

COLOURS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.2),
    "blue": (0.1, 0.2, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}


def _dataset() -> list[Example]:
    """A colour square on grey; the target moves it left or right: reference + prompt determine the target."""
    examples = []
    for colour, rgb in COLOURS.items():
        for side in ("left", "right"):
            ref = torch.full((3, 16, 16), 0.5)
            ref[:, 4:12, 4:12] = torch.tensor(rgb)[:, None, None]
            target = torch.full((3, 16, 16), 0.5)
            cols = slice(0, 8) if side == "left" else slice(8, 16)
            target[:, 4:12, cols] = torch.tensor(rgb)[:, None, None]
            examples.append(
                Example(f"{colour}-{side}", colour, "square", f"a {colour} cube on the {side}", ref, target)
            )
    return examples


def _config(tmp_path: Path, name: str, **optim) -> SFTConfig:
    overrides = [
        f"output_dir={tmp_path / name}",
        "optim.batch_size=8",
        "optim.steps=30",
        "optim.warmup_steps=5",
        "optim.lr=3e-3",
        "optim.ema_decay=0.5",
        "log_every=5",
        "eval_every=15",
        "save_every=0",
        "sample_steps=2",
        "num_threads=0",
        "progress=false",
        *(f"optim.{k}={v}" for k, v in optim.items()),
    ]
    return load_config(SFTConfig, None, overrides)


def _fixed_batch_loss(policy: ReferenceFluxPolicy, examples: list[Example]) -> float:
    g = torch.Generator().manual_seed(123)
    n, c = policy.latent_shape
    sigma = torch.rand(len(examples), generator=g)
    noise = torch.randn(len(examples), n, c, generator=g)
    with torch.no_grad():
        return float(
            flow_matching_loss(
                policy,
                [e.prompt for e in examples],
                torch.stack([e.reference for e in examples]),
                torch.stack([e.target for e in examples]),
                sigma,
                noise,
            )
        )


def test_sft_decreases_loss_and_is_deterministic(tmp_path):
    data = _dataset()
    before = _fixed_batch_loss(tiny_policy_for_tests(seed=0), data)

    final = run_sft(
        _config(tmp_path, "a"), policy=tiny_policy_for_tests(seed=0), train_data=data, eval_data=data[:3]
    )
    trained = ReferenceFluxPolicy.from_pretrained(final)
    after = _fixed_batch_loss(trained, data)
    assert after < 0.7 * before

    out = tmp_path / "a"
    assert (out / "config.yaml").is_file() and (out / "samples" / "step_000030.png").is_file()
    assert list((out / "tensorboard").iterdir())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [5, 10, 15, 20, 25, 30]
    assert any("eval/sample_mse" in r for r in records)

    again = run_sft(_config(tmp_path, "b"), policy=tiny_policy_for_tests(seed=0), train_data=data)
    for sub in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        first, second = load_file(final / sub), load_file(again / sub)
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_sft_resume_matches_uninterrupted(tmp_path, monkeypatch):
    data = _dataset()
    config = dict(steps=12)
    straight = run_sft(
        _config(tmp_path, "straight", **config), policy=tiny_policy_for_tests(seed=0), train_data=data
    )

    calls = {"n": 0}
    real_loss = sft.flow_matching_loss

    def crash_at_step_9(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    resumed_cfg = _config(tmp_path, "resumed", **config)
    resumed_cfg.save_every = 4
    monkeypatch.setattr(sft, "flow_matching_loss", crash_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        run_sft(resumed_cfg, policy=tiny_policy_for_tests(seed=0), train_data=data)
    monkeypatch.setattr(sft, "flow_matching_loss", real_loss)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step-000008"]
    resumed = run_sft(resumed_cfg, resume=True, policy=tiny_policy_for_tests(seed=0), train_data=data)

    first = load_file(straight / "transformer/diffusion_pytorch_model.safetensors")
    second = load_file(resumed / "transformer/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated log lines after resume


def test_stop_at_step_repeats_a_run_that_max_minutes_stopped(tmp_path, monkeypatch):
    data = _dataset()
    calls = {"n": 0}
    real_loss, real_clock = sft.flow_matching_loss, time.perf_counter

    def counting_loss(*args, **kwargs):
        calls["n"] += 1
        return real_loss(*args, **kwargs)

    # The wall clock jumps an hour once step 7 has computed its loss: max_minutes stops the run after it.
    monkeypatch.setattr(sft, "flow_matching_loss", counting_loss)
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + (3600.0 if calls["n"] >= 7 else 0.0))
    timed_cfg = _config(tmp_path, "timed", steps=12)
    timed_cfg.max_minutes = 30.0
    timed = run_sft(timed_cfg, policy=tiny_policy_for_tests(seed=0), train_data=data)
    monkeypatch.undo()

    stopped_cfg = _config(tmp_path, "stopped", steps=12)
    stopped_cfg.stop_at_step = 7
    stopped = run_sft(stopped_cfg, policy=tiny_policy_for_tests(seed=0), train_data=data)
    # A 7-step schedule is another run: its learning rate decays over 7 steps, not 12.
    short_cfg = _config(tmp_path, "short", steps=7)
    short = run_sft(short_cfg, policy=tiny_policy_for_tests(seed=0), train_data=data)

    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(run / weights) for run in (timed, stopped, short))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(b[k], c[k]) for k in b)
    for name in ("timed", "stopped"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "train/stopped_early" in r] == [7]

    from cgrpo.config import ConfigError

    with pytest.raises(ConfigError, match="stop_at_step"):
        load_config(SFTConfig, None, ["optim.steps=12", "stop_at_step=13"]).validate()


def test_sft_config_errors_name_the_key(tmp_path):
    from cgrpo.config import ConfigError

    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(SFTConfig, None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        load_config(SFTConfig, None, ["optim.ema_decay=1.5"])
    repo_config = Path(__file__).resolve().parents[1] / "configs" / "mini" / "sft.yaml"
    if repo_config.is_file():
        assert load_config(SFTConfig, repo_config).optim.batch_size >= 1


def test_sft_data_text_to_image_share_reaches_the_training_set():
    config = load_config(
        SFTConfig,
        None,
        [
            "data.num_train_subjects=20",
            "data.num_test_subjects=8",
            "data.text_to_image=0.5",
            "data.copy_paste=0.2",
        ],
    )
    train, _ = sft.build_mini_data(config.data, seed=0)
    blank = [e for e in train if bool((e.reference == e.reference[:, :1, :1]).all())]
    assert 0.3 < len(blank) / len(train) < 0.7  # a background-only reference: the text-to-image pairs
    with pytest.raises(ValueError, match="text_to_image"):
        sft.build_mini_data(load_config(SFTConfig, None, ["data.text_to_image=2.0"]).data, seed=0)


def test_sft_data_copy_paste_property_reaches_the_training_set():
    base = ["data.num_train_subjects=20", "data.num_test_subjects=8", "data.copy_paste=1.0"]
    pasted, _ = sft.build_mini_data(load_config(SFTConfig, None, base).data, seed=0)
    kept_config = load_config(SFTConfig, None, [*base, "data.copy_paste_property=0.0"])
    kept, _ = sft.build_mini_data(kept_config.data, seed=0)
    edits = [i for i, e in enumerate(kept) if mw.asks_property(e.prompt)]
    others = [i for i, e in enumerate(kept) if not mw.asks_property(e.prompt) and e.kind != "plain"]
    assert edits and others
    # a copy-paste target is the reference itself; the kept edits are drawn as asked
    assert all(torch.equal(pasted[i].target, pasted[i].reference) for i in edits + others)
    assert not any(torch.equal(kept[i].target, kept[i].reference) for i in edits)
    assert all(torch.equal(kept[i].target, kept[i].reference) for i in others)
