"""The GRPO trainer end to end on a tiny random policy and the mini world (CPU, seconds)."""

import json
import math

import pytest
import torch

from cgrpo import rewards
from cgrpo.advantage import sars, tdw_weights
from cgrpo.config import load_config
from cgrpo.policy.mini import build_mini_policy
from cgrpo.sde import sde_step_with_logprob
from cgrpo.train import grpo as grpo_module
from cgrpo.train.components import RewardFailure
from cgrpo.train.config import GRPOConfig
from cgrpo.train.grpo import GRPOTrainer
from cgrpo.train.logger import read_metrics

REQUIRED_KEYS = {"step", "loss", "reward/id", "reward/prompt", "conflict_rate", "clip_fraction"}


def tiny_config(policy_dir, output_dir, *overrides):
    return load_config(
        GRPOConfig,
        None,
        [
            f"output_dir={output_dir}",
            f"policy.options={{path: {policy_dir}}}",
            "data.options={image_size: 16, num_train_subjects: 20, num_test_subjects: 4, "
            "train: {prompts_per_subject: 2}, eval: {num_subjects: 2, prompts_per_kind: 1}}",
            "train.iterations=2",
            "train.prompts_per_iteration=2",
            "train.group_size=3",
            "train.train_steps=2",
            "sampling.num_steps=4",
            "eval.num_steps=3",
            "eval.every=0",
            "checkpoint.every=1",
            "log.tensorboard=false",
            *overrides,
        ],
    )


def test_two_iterations_write_everything(tiny_policy_dir, tmp_path):
    config = tiny_config(tiny_policy_dir, tmp_path / "run")
    summary = GRPOTrainer(config).train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(set(r) >= REQUIRED_KEYS for r in records)
    assert all(math.isfinite(r["loss"]) and 0 <= r["conflict_rate"] <= 1 for r in records)
    assert set(summary) == {"base", "trained"} and {"id", "prompt"} <= set(summary["base"])
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "summary.json").exists()
    assert (run / "final" / "adapter_model.safetensors").exists()
    assert (run / "samples" / "eval-step-000000.png").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001", "step-000002"]


def test_same_seed_same_numbers(tiny_policy_dir, tmp_path):
    first = GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "a", "train.lr=1e-2")).train()
    second = GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "b", "train.lr=1e-2")).train()
    assert first == second
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)


def test_resume_matches_uninterrupted_run(tiny_policy_dir, tmp_path):
    overrides = ("train.iterations=4", "train.lr=1e-2")
    GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "straight", *overrides)).train()
    GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "resumed", *overrides)).train(max_steps=2)
    GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "resumed", *overrides), resume=True).train()
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for x, y in zip(straight, resumed, strict=True):
        for key in ("loss", "reward/id", "reward/prompt", "clip_fraction", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key


def test_training_changes_the_policy(tiny_policy_dir, tmp_path):
    config = tiny_config(tiny_policy_dir, tmp_path / "run", "train.lr=1e-2", "train.iterations=3")
    trainer = GRPOTrainer(config)
    before = {
        n: p.detach().clone() for n, p in trainer.policy.transformer.named_parameters() if p.requires_grad
    }
    trainer.train()
    after = dict(trainer.policy.transformer.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n])]
    assert changed, "no LoRA parameter moved"
    frozen = [n for n, p in after.items() if not p.requires_grad]
    assert frozen, "the base transformer should be frozen under LoRA"


@rewards.register("test_nan_half")
def _nan_half(**_):
    """Identity-like reward that is NaN for every other sample."""

    def score(images, references, prompts, subjects=None):
        values = images.float().mean(dim=(1, 2, 3))
        values[::2] = float("nan")
        return values

    return score


def test_nan_rewards_are_masked_and_counted(tiny_policy_dir, tmp_path):
    config = tiny_config(
        tiny_policy_dir, tmp_path / "run", "rewards.identity.name=test_nan_half", "eval.every=0"
    )
    GRPOTrainer(config).train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # 2 groups x 3 samples, every other one NaN
    assert [r["invalid_samples"] for r in records] == [3, 3]
    assert all(math.isfinite(r["loss"]) for r in records)


class _Flaky:
    name = "flaky"

    def __init__(self, failures):
        self.failures = failures
        self.calls = 0

    def __call__(self, images, references, prompts, subjects=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("reward server unreachable")
        return torch.ones(len(prompts))


def test_failing_reward_retries_then_checkpoints_and_exits(tiny_policy_dir, tmp_path):
    config = tiny_config(
        tiny_policy_dir,
        tmp_path / "run",
        "rewards.max_retries=1",
        "rewards.retry_backoff_s=0",
        "train.iterations=3",
    )
    trainer = GRPOTrainer(config)
    trainer.train(max_steps=1)  # one good iteration, checkpointed
    trainer.prompt_reward = _Flaky(failures=100)
    with pytest.raises(RewardFailure, match="failed 2 times.*Saved checkpoint"):
        trainer.train()
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "COMPLETE").exists()
    # a transient failure is retried and the run continues
    trainer = GRPOTrainer(config, resume=True)
    trainer.prompt_reward = _Flaky(failures=1)
    trainer.train(max_steps=1)
    assert trainer.step == 2


def test_tdw_is_keyed_by_the_real_step(tiny_policy_dir, tmp_path, monkeypatch):
    """The advantages passed to the loss for step t use the TDW weights of t (not of its list position)."""
    config = tiny_config(
        tiny_policy_dir,
        tmp_path / "run",
        "sampling.num_steps=8",
        "train.train_steps=3",
        "train.iterations=1",
    )
    trainer = GRPOTrainer(config)
    seen = {}
    import cgrpo.train.components as components  # where the trainer's advantages are shaped

    real_sars, real_loss = components.multi_sars, grpo_module.clipped_policy_loss

    def spy_sars(a_ids, a_prompt, w_id, w_prompt, **kw):  # one subject: a_ids [N, 1]
        seen["a"] = (a_ids[:, 0].clone(), a_prompt.clone())
        return real_sars(a_ids, a_prompt, w_id, w_prompt, **kw)

    def spy_select():
        seen["steps"] = torch.tensor([6, 0, 3])  # deliberately unsorted
        return seen["steps"]

    def spy_loss(log_prob, old_log_prob, advantages, **kw):
        seen.setdefault("adv", []).append(advantages.detach().clone())
        return real_loss(log_prob, old_log_prob, advantages, **kw)

    monkeypatch.setattr(components, "multi_sars", spy_sars)
    monkeypatch.setattr(grpo_module, "clipped_policy_loss", spy_loss)
    monkeypatch.setattr(trainer, "_select_steps", spy_select)
    trainer.iteration()
    a_id, a_prompt = seen["a"]
    w_id, w_prompt = tdw_weights(seen["steps"], 8)
    expected = sars(a_id[:, None], a_prompt[:, None], w_id[None], w_prompt[None], alpha=0.5)
    used = torch.cat(seen["adv"]).view(len(a_id), 3)  # sample-major flattening of (sample, step)
    torch.testing.assert_close(used, expected)
    # and the weights really differ between the early and the late step
    assert w_prompt[1] > w_prompt[0]


def test_squared_error_log_prob_scales_each_steps_log_probs(tiny_policy_dir, tmp_path, monkeypatch):
    """train.log_prob=squared_error hands the loss the Gaussian log-probs times 2 std_t^2 of their step."""
    seen = {}
    real_loss = grpo_module.clipped_policy_loss

    def spy_loss(log_prob, old_log_prob, advantages, **kw):
        seen.setdefault(mode, []).append((log_prob.detach().clone(), old_log_prob.clone()))
        return real_loss(log_prob, old_log_prob, advantages, **kw)

    monkeypatch.setattr(grpo_module, "clipped_policy_loss", spy_loss)
    for mode in ("gaussian", "squared_error"):
        config = tiny_config(
            tiny_policy_dir,
            tmp_path / mode,
            "sampling.formulation=cps",
            "train.iterations=1",
            "train.train_steps=1",
            "train.optimizer_step=timestep",
            f"train.log_prob={mode}",
        )
        trainer = GRPOTrainer(config)
        monkeypatch.setattr(trainer, "_select_steps", lambda: torch.tensor([1]))
        trainer.iteration()
    sigma_next = float(trainer.sigmas[2])
    scale = 2 * (sigma_next * math.sin(0.5 * math.pi * config.sampling.noise_level)) ** 2
    (gauss_new, gauss_old), (sq_new, sq_old) = seen["gaussian"][0], seen["squared_error"][0]
    torch.testing.assert_close(sq_new, gauss_new * scale)
    torch.testing.assert_close(sq_old, gauss_old * scale)
    assert scale < 1  # the step is really rescaled, not left as it was


def test_cli_train_writes_metrics(tiny_policy_dir, tmp_path):
    from typer.testing import CliRunner

    from cgrpo.cli import app

    config = tiny_config(tiny_policy_dir, tmp_path / "cli")
    from cgrpo.config import save_config

    save_config(config, tmp_path / "cfg.yaml")
    result = CliRunner().invoke(
        app, ["train", str(tmp_path / "cfg.yaml"), "--max-steps", "1", "train.lr=1e-3"]
    )
    assert result.exit_code == 0, result.output
    records = read_metrics(tmp_path / "cli" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1]
    resolved = (tmp_path / "cli" / "config.yaml").read_text()
    assert "lr: 0.001" in resolved
    bad = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), "train.group_size=1"])
    assert bad.exit_code == 2 and "train.group_size" in bad.output
    json.dumps(records)  # plain JSON


def test_full_size_mini_policy_builds():
    policy = build_mini_policy(seed=0)
    assert 2_000_000 < sum(p.numel() for p in policy.transformer.parameters()) < 3_000_000


def test_kl_penalty_compares_with_the_frozen_base(tiny_policy_dir, tmp_path):
    """With a LoRA that moved, the KL to the reference (LoRA off) is positive and has a gradient."""
    config = tiny_config(tiny_policy_dir, tmp_path / "run", "train.kl_coef=0.1")
    trainer = GRPOTrainer(config)
    policy = trainer.policy
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    example = trainer.train_set[0]
    cond = policy.condition([example.prompt], example.reference[None])
    x_t = torch.randn(1, *policy.latent_shape)
    sigma, sigma_next = torch.tensor([0.8]), torch.tensor([0.6])
    with torch.no_grad():
        policy.transformer.disable_adapters()  # peft's switch, independent of the code under test
        base_velocity = policy.velocity(x_t, sigma, cond)
        policy.transformer.enable_adapters()
    velocity = policy.velocity(x_t, sigma, cond)
    assert (velocity - base_velocity).abs().max() > 1e-3  # the LoRA changes the policy
    transition = sde_step_with_logprob(velocity, sigma, sigma_next, x_t, noise_level=0.7)
    kl = trainer._kl_to_reference(x_t, sigma, sigma_next, cond, transition)
    assert kl.item() > 0
    kl.backward()
    grads = [p.grad for n, p in policy.transformer.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # the adapter is back on after the reference pass
    torch.testing.assert_close(policy.velocity(x_t, sigma, cond), velocity)
