"""Multi-process GRPO on CPU (gloo): W processes compute what one process computes on the same global batch.

The 2-process runs go through the real launcher and CLI (``torchrun -m cgrpo.cli train``), with a group that
spans both processes (B = 3 prompts x G = 4 images = 12 samples, 6 per process: group 1 is rows 4-7).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cgrpo.config import load_config, save_config
from cgrpo.train.config import GRPOConfig
from cgrpo.train.distributed import Distributed
from cgrpo.train.grpo import GRPOTrainer
from cgrpo.train.logger import read_metrics
from cgrpo.train.sampling import rollout


def spanning_config(policy_dir, output_dir, *overrides) -> GRPOConfig:
    return load_config(
        GRPOConfig,
        None,
        [
            f"output_dir={output_dir}",
            f"policy.options={{path: {policy_dir}}}",
            "data.options={image_size: 16, num_train_subjects: 20, num_test_subjects: 4, "
            "train: {prompts_per_subject: 2}, eval: {num_subjects: 2, prompts_per_kind: 1}}",
            "train.iterations=1",
            "train.prompts_per_iteration=3",
            "train.group_size=4",
            "train.train_steps=2",
            "train.lr=1e-2",
            "sampling.num_steps=4",
            "eval.num_steps=2",
            "eval.every=0",
            "checkpoint.every=1",
            "log.tensorboard=false",
            *overrides,
        ],
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(config: GRPOConfig, config_path, nproc: int = 2, timeout: float = 240):
    """``torchrun --nproc_per_node N -m cgrpo.cli train CONFIG``, as docs/scaling.md shows it."""
    save_config(config, config_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "cgrpo.cli",
        "train",
        str(config_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _compare_runs(single_dir, multi_dir, initial: dict[str, torch.Tensor]):
    one = load_file(single_dir / "checkpoints" / "step-000001" / "trainable.safetensors")
    two = load_file(multi_dir / "checkpoints" / "step-000001" / "trainable.safetensors")
    assert one.keys() == two.keys() and one
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one)
    assert moved > 1e-3, "the step did not change the weights: the comparison would be vacuous"
    # AdamW's first step moves every entry by about lr * g / (|g| + eps): entries whose gradient is near
    # eps = 1e-8 turn float-rounding differences of the gradient (batch 12 vs 2 x 6) into visible ones,
    # hence an absolute tolerance of 1e-3 x lr (observed: <= 7e-4 x lr; a wrong gradient moves them by lr).
    lr = 0.01 if "lora" in next(iter(one)) else 0.001
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-3 * lr, msg=key)
    a = read_metrics(single_dir / "metrics.jsonl")
    b = read_metrics(multi_dir / "metrics.jsonl")
    assert [r["step"] for r in b] == [1]
    for key in ("reward/id", "reward/prompt", "loss", "grad_norm", "clip_fraction", "advantage/abs_mean"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-4, abs=1e-6), key


def test_two_processes_ddp_equal_one_process(tiny_policy_dir, tmp_path):
    single = GRPOTrainer(spanning_config(tiny_policy_dir, tmp_path / "one"))
    initial = {
        n: p.detach().clone() for n, p in single.policy.transformer.named_parameters() if p.requires_grad
    }
    single.train()
    torchrun_train(spanning_config(tiny_policy_dir, tmp_path / "two"), tmp_path / "two.yaml")
    _compare_runs(tmp_path / "one", tmp_path / "two", initial)
    assert (tmp_path / "two" / "final" / "adapter_model.safetensors").exists()
    # rank 0 alone writes: one metrics line, one config, no leftovers from rank 1
    assert len(list((tmp_path / "two" / "checkpoints").iterdir())) == 1


@pytest.mark.slow
def test_two_processes_fsdp_full_finetuning_equal_one_process(tiny_policy_dir, tmp_path):
    overrides = ("policy.lora.enabled=false", "train.lr=1e-3")
    single = GRPOTrainer(spanning_config(tiny_policy_dir, tmp_path / "one", *overrides))
    initial = {n: p.detach().clone() for n, p in single.policy.transformer.named_parameters()}
    single.train()
    torchrun_train(spanning_config(tiny_policy_dir, tmp_path / "two", *overrides), tmp_path / "two.yaml")
    _compare_runs(tmp_path / "one", tmp_path / "two", initial)
    assert (tmp_path / "two" / "final" / "transformer").is_dir()


def test_single_process_context_is_a_pass_through():
    dist = Distributed()
    assert (dist.rank, dist.world_size, dist.is_main, dist.enabled) == (0, 1, True, False)
    assert dist.local_rows(12) == slice(0, 12)
    x = torch.arange(6.0)
    assert dist.gather(x) is x and dist.all_true(True) and not dist.all_true(False)
    assert dist.mean({"loss": 2.0}) == {"loss": 2.0}


def test_rank_slices_of_a_rollout_equal_the_whole(tiny_policy_dir):
    """Each process's rows, rolled out alone with the same generator state, equal those rows of the
    single-process rollout (the noise is drawn for the global batch and sliced)."""
    from cgrpo.policy.mini import mini
    from cgrpo.sde import flux_sigmas

    policy = mini(path=tiny_policy_dir)
    cond = policy.condition(["a red circle", "a blue square", "a star"], torch.rand(3, 3, 16, 16))
    cond = cond.repeat_interleave(4)
    sigmas = flux_sigmas(4, image_seq_len=16)
    sde = torch.tensor([True, True, True, False])
    whole = rollout(policy, cond, sigmas, sde, torch.Generator().manual_seed(3))
    for rows in (slice(0, 6), slice(6, 12)):
        part = rollout(
            policy, cond.index(rows), sigmas, sde, torch.Generator().manual_seed(3), shard=(rows, 12)
        )
        torch.testing.assert_close(part.latents, whole.latents[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(part.log_probs, whole.log_probs[rows], rtol=1e-5, atol=1e-6)


def test_batch_that_does_not_split_over_processes_is_refused(monkeypatch, tiny_policy_dir, tmp_path):
    from cgrpo.train.components import TrainingError

    monkeypatch.setattr(Distributed, "world_size", property(lambda self: 5))
    with pytest.raises(TrainingError, match="12 samples cannot be split evenly over 5 processes"):
        GRPOTrainer(spanning_config(tiny_policy_dir, tmp_path / "run"))
