"""RPO baseline: harmonic-mean pairs, the Diffusion-DPO loss for rectified flow, a tiny run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cgrpo.config import ConfigError, load_config
from cgrpo.train.rpo import (
    RPOConfig,
    class_prompt,
    dpo_flow_loss,
    harmonic_reward,
    lora_disabled,
    run_rpo,
    select_pairs,
    velocity_errors,
)


def tiny_rpo_config(policy_dir, output_dir, *overrides) -> RPOConfig:
    return load_config(
        RPOConfig,
        None,
        [
            f"output_dir={output_dir}",
            f"policy.options={{path: {policy_dir}}}",
            "policy.lora={enabled: true, rank: 4, alpha: 4}",
            "data.options={image_size: 16, num_train_subjects: 20, num_test_subjects: 4, "
            "train: {prompts_per_subject: 2}, eval: {num_subjects: 2, prompts_per_kind: 1}}",
            "sampling.num_steps=3",
            "pairs.prompts=4",
            "pairs.candidates=3",
            "pairs.generation_batch=2",
            "train.steps=3",
            "train.batch_size=2",
            "train.lr=1e-2",
            "eval.num_steps=2",
            "eval.every=0",
            "log.tensorboard=false",
            *overrides,
        ],
    )


# --- pairs -------------------------------------------------------------------------------------------


def test_harmonic_reward_is_the_harmonic_mean():
    r_id, r_prompt = torch.tensor([0.9, 0.5, 0.0]), torch.tensor([0.1, 0.5, 1.0])
    h = harmonic_reward(r_id, r_prompt)
    torch.testing.assert_close(h[:2], torch.tensor([2 * 0.9 * 0.1 / 1.0, 0.5]))
    assert h[2] < 1e-5  # a zero reward sinks the mean (RPO's point: no specialist wins)
    # lambda > 0.5 leans on identity; scale brings rewards to one range first
    a, b = torch.tensor([0.9]), torch.tensor([0.3])
    torch.testing.assert_close(harmonic_reward(a, b, lam=0.9), torch.tensor([0.75]))  # 1 / (1 + 1/3)
    assert harmonic_reward(a, b, lam=0.9) > harmonic_reward(a, b)
    torch.testing.assert_close(
        harmonic_reward(torch.tensor([0.5]), torch.tensor([5.0]), scale=(1.0, 0.1)), torch.tensor([0.5])
    )


def test_pairs_are_best_vs_worst_by_harmonic_mean():
    # 3 prompts x 3 candidates. Row 0: the balanced sample beats the specialists (harmonic, not sum).
    r_id = torch.tensor([[0.98, 0.6, 0.3], [0.5, 0.5, 0.5], [0.8, float("nan"), 0.2]])
    r_prompt = torch.tensor([[0.3, 0.6, 0.9], [0.5, 0.5, 0.5], [0.7, 0.9, 0.2]])
    scores = harmonic_reward(r_id.flatten(), r_prompt.flatten()).view(3, 3)
    assert scores[0].argmax() == 1 and (r_id + r_prompt)[0].argmax() == 0  # a sum would pick candidate 0
    pairs = select_pairs(scores)
    # row 1 is all ties (no preference) and is dropped; row 2's NaN candidate is never picked
    assert pairs.group.tolist() == [0, 2]
    assert pairs.chosen.tolist() == [0 * 3 + 1, 2 * 3 + 0]
    assert pairs.rejected.tolist() == [0 * 3 + 2, 2 * 3 + 2]
    assert torch.all(pairs.margin > 0)
    assert select_pairs(scores, min_margin=0.3).group.tolist() == [2]  # row 0's gap is 0.15
    with pytest.raises(ValueError, match=r"\[P, K\]"):
        select_pairs(torch.zeros(4))


# --- the loss ----------------------------------------------------------------------------------------


def test_dpo_flow_loss_is_log2_at_the_reference_and_falls_when_chosen_improves():
    err = torch.tensor([0.3, 0.5, 0.2])
    loss, stats = dpo_flow_loss(err, err + 0.1, err, err + 0.1, beta=1000.0)
    assert float(loss) == pytest.approx(math.log(2))
    assert torch.all(stats["logits"] == 0)
    better, _ = dpo_flow_loss(err - 0.01, err + 0.1, err, err + 0.1, beta=1000.0)  # chosen error drops
    worse, _ = dpo_flow_loss(err, err + 0.09, err, err + 0.1, beta=1000.0)  # rejected error drops
    assert float(better) < math.log(2) < float(worse)
    # -log sigmoid(beta / 2 * 0.01) for beta = 1000
    assert float(better) == pytest.approx(-math.log(1 / (1 + math.exp(-5.0))), rel=1e-5)


def test_dpo_loss_with_a_policy_starts_at_log2_and_lora_disabled_is_the_reference(tiny_policy_dir):
    from cgrpo.policy.mini import mini

    policy = mini(tiny_policy_dir)
    policy.add_lora(4, 4)
    n, c = policy.latent_shape
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, n, c, generator=g), torch.randn(2, n, c, generator=g)
    sigma = torch.rand(2, generator=g)
    cond = policy.condition(["a circle", "a square"] * 2, torch.rand(4, 3, 16, 16, generator=g))
    x = (1 - sigma.repeat(2)[:, None, None]) * x0 + sigma.repeat(2)[:, None, None] * noise.repeat(2, 1, 1)

    def errors():
        v = policy.velocity(x, sigma.repeat(2), cond)
        return velocity_errors(v, noise.repeat(2, 1, 1), x0)

    with torch.no_grad():
        ref = errors()
        err = errors()  # zero-initialised LoRA B: policy == reference
        loss, _ = dpo_flow_loss(err[:2], err[2:], ref[:2], ref[2:], beta=1000.0)
        assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
        moved = errors()
        with lora_disabled(policy):
            restored = errors()
    assert not torch.allclose(moved, ref)
    torch.testing.assert_close(restored, ref)
    assert not torch.allclose(errors().detach(), ref)  # the adapter is back on after the context


def test_class_prompt():
    assert class_prompt("{a} {subject}", "arrow") == "an arrow"
    assert class_prompt("a photo of {a} {subject}", "dog") == "a photo of a dog"


def test_config_errors_name_the_key(tiny_policy_dir, tmp_path):
    with pytest.raises(ConfigError, match="pairs.candidates"):
        tiny_rpo_config(tiny_policy_dir, tmp_path, "pairs.candidates=1")
    with pytest.raises(ConfigError, match="train.similarity_prompt"):
        tiny_rpo_config(tiny_policy_dir, tmp_path, "train.similarity_prompt='{who}'")
    with pytest.raises(ConfigError, match="unknown key train.gamma"):
        tiny_rpo_config(tiny_policy_dir, tmp_path, "train.gamma=1")


# --- end to end --------------------------------------------------------------------------------------


def test_tiny_rpo_run_end_to_end(tiny_policy_dir, tmp_path):
    config = tiny_rpo_config(tiny_policy_dir, tmp_path / "run")
    summary = run_rpo(config)
    run = tmp_path / "run"
    assert set(summary) == {"base", "trained"} and {"id", "prompt"} <= set(summary["base"])
    assert json.loads((run / "summary.json").read_text()) == summary
    for name in ("config.yaml", "metrics.jsonl", "pairs.pt", "pairs.json", "final/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "samples" / "eval-step-000000.png").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "dpo_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)  # first step: policy == reference
    pairs = json.loads((run / "pairs.json").read_text())
    assert 1 <= pairs["pairs/count"] <= 4
    # the chosen samples are the better ones by the harmonic mean, on average over pairs
    chosen = 2 / (1 / pairs["pairs/chosen_id"] + 1 / pairs["pairs/chosen_prompt"])
    rejected = 2 / (1 / pairs["pairs/rejected_id"] + 1 / pairs["pairs/rejected_prompt"])
    assert chosen > rejected

    # a re-run with the same pair settings reuses the offline pairs; the trained adapter is the same
    again = run_rpo(config)
    assert again == summary
    reused = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("pairs/reused") == 1.0 for r in reused)


def test_rpo_command(tiny_policy_dir, tmp_path):
    from typer.testing import CliRunner

    from cgrpo.cli import app
    from cgrpo.config import save_config

    save_config(tiny_rpo_config(tiny_policy_dir, tmp_path / "cli", "train.steps=1"), tmp_path / "rpo.yaml")
    result = CliRunner().invoke(app, ["rpo", str(tmp_path / "rpo.yaml"), "pairs.prompts=2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "summary.json").is_file()
    assert "prompts: 2" in (tmp_path / "cli" / "config.yaml").read_text()
    bad = CliRunner().invoke(app, ["rpo", str(tmp_path / "rpo.yaml"), "train.beta=-1"])
    assert bad.exit_code == 2 and "train.beta" in bad.output


def test_rpo_resume_after_a_kill_matches_an_uninterrupted_run(tiny_policy_dir, tmp_path, monkeypatch):
    """The recipe contract's resume: RPO continues from its newest checkpoint, with the same numbers."""
    from safetensors.torch import load_file

    import cgrpo.train.rpo as rpo

    overrides = ("train.steps=4", "checkpoint.every=2", "eval.every=2")
    straight = rpo.run(tiny_rpo_config(tiny_policy_dir, tmp_path / "straight", *overrides))

    real_step, calls = rpo._train_step, {"n": 0}

    def killed_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    config = tiny_rpo_config(tiny_policy_dir, tmp_path / "run", *overrides)
    monkeypatch.setattr(rpo, "_train_step", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        rpo.run(config)
    monkeypatch.setattr(rpo, "_train_step", real_step)
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    resumed = rpo.run(config, resume=True)

    assert resumed == straight
    first = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    second = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    def logged(run):
        records = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(r).items() if not k.startswith("time/")} for r in records]

    assert logged("run") == logged("straight")  # one line per step, the same values
