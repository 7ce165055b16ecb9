"""One Customized-GRPO iteration at UNO / FLUX.1-dev size on one GPU: seconds, peak memory, FLOPs, MFU.

    python benchmarks/gpu_iteration.py            # full size, bf16, CUDA (exits with a message without one)
    python benchmarks/gpu_iteration.py --tiny     # the same code path with a tiny config on the CPU

What runs (the trainer's own pieces: :func:`cgrpo.train.sampling.rollout`,
:func:`cgrpo.sde.sde_step_with_logprob`, :func:`cgrpo.objective.clipped_policy_loss`, AdamW on peft LoRA
parameters):

- a ``FluxTransformer2DModel`` with FLUX.1-dev's config (19 double + 38 single blocks, 24 heads x 128, joint
  dim 4096, pooled 768, guidance embedding; ~11.9B parameters) and random weights (nothing is downloaded),
  bf16, LoRA rank 16 on the default targets, gradient checkpointing on;
- inputs of one UNO iteration at 512 px: 1024 image tokens + 1024 reference tokens (UnoPE ids) + 512 text
  tokens (random T5/CLIP embeddings: the text encoders and the VAE are not part of the measurement);
- rollout: G = 12 samples x T = 25 SDE steps, no grad, in micro-batches; then k = 14 trained steps x 12
  samples, fwd + bwd in micro-batches, one AdamW step. One warm-up forward and fwd+bwd precede the timing.

FLOPs (model FLOPs, the MFU convention): one forward of one sample costs

    F = 2 * sum over linear layers (in * out * tokens through it)  +  4 * L^2 * d * (blocks)

where the double blocks' image-stream linears (q, k, v, out, MLP: 12 d^2) see the 2048 image + reference
tokens, their text-stream linears (12 d^2) the 512 text tokens, the single blocks' linears (q, k, v, MLP in,
fused out: 12 d^2) all L = 2560 tokens, plus the embedders and the LoRA matrices; attention is ``Q K^T`` and
``A V`` (2 L^2 d each) in each of the 57 blocks, d = 3072. That is "2 * params * tokens" for the linears,
except that the ~3.2B modulation parameters act once per sample, not per token: F = 33.3 TFLOP of linears
+ 4.6 TFLOP of attention + 0.2 TFLOP of LoRA = 37.9 TFLOP; one iteration (T=25, G=12, k=14) = 30.4 PFLOP.
One iteration counts ``T * G * F`` (rollout) + ``3 * k * G * F`` (training: fwd + bwd = 3 forwards). Gradient
checkpointing's recomputed forward is *not* counted (hardware FLOPs would add ``k * G * F``), and with frozen
base weights the backward needs no weight gradients for them, so 3x slightly overstates the work done; both
conventions are reported. MFU = model FLOPs / seconds / 989 TFLOP/s (H100 SXM bf16 dense peak).

Prints JSON and writes ``benchmarks/results/gpu_iteration.json`` (``gpu_iteration_tiny.json`` with --tiny).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cgrpo.testing.policies import TINY_FLUX_TRANSFORMER

H100_BF16_DENSE_TFLOPS = 989.0
RESULTS = Path(__file__).resolve().parent / "results"

FLUX_DEV: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY: dict[str, Any] = {**TINY_FLUX_TRANSFORMER, "num_single_layers": 2}


@dataclass
class Setup:
    """One benchmark configuration. Token counts are per sample; ``grid`` is the packed image grid side."""

    transformer: dict[str, Any]
    grid: int = 32  # 32 x 32 = 1024 image tokens (512 px / 16)
    reference_grid: int = 32
    text_tokens: int = 512
    group_size: int = 12  # G
    num_steps: int = 25  # T
    train_steps: int = 14  # k
    rollout_micro_batch: int = 6
    train_micro_batch: int = 2
    lora_rank: int = 16
    dtype: str = "bfloat16"
    device: str = "cuda"
    guidance: float = 4.0
    noise_level: float = 0.7
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def reference_tokens(self) -> int:
        return self.reference_grid * self.reference_grid


FULL = Setup(FLUX_DEV)
TINY_SETUP = Setup(
    TINY,
    grid=4,
    reference_grid=4,
    text_tokens=8,
    group_size=4,
    num_steps=4,
    train_steps=2,
    rollout_micro_batch=2,
    train_micro_batch=2,
    lora_rank=4,
    dtype="float32",
    device="cpu",
)


# --- FLOPs --------------------------------------------------------------------------------------------------


def forward_flops(config: dict[str, Any], image: int, reference: int, text: int, lora_rank: int = 0) -> dict:
    """Model FLOPs of one forward of one sample (module docstring). Returns the parts and the total."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * d
    stream = image + reference  # the image stream: noisy image + reference tokens
    length = stream + text
    double, single = config["num_layers"], config["num_single_layers"]
    per_stream = 4 * d * d + 2 * d * mlp  # q, k, v, out + MLP
    single_params = 3 * d * d + d * mlp + (d + mlp) * d  # q, k, v + MLP in + fused out
    macs = double * (per_stream * stream + per_stream * text) + single * single_params * length
    macs += config["in_channels"] * d * stream + config["joint_attention_dim"] * d * text  # embedders
    macs += d * config["in_channels"] * stream  # proj_out
    # Per-sample modulation and conditioning embedders (one "token" each).
    macs += double * 2 * d * 6 * d + single * d * 3 * d + d * 2 * d
    macs += 2 * (256 * d + d * d) + config["pooled_projection_dim"] * d + d * d
    lora = 0
    if lora_rank:
        # Default targets: double-block image-stream q, k, v, out; single-block q, k, v, MLP in, fused out.
        lora += double * 4 * lora_rank * (d + d) * stream
        per_single = 3 * (d + d) + (d + mlp) + (d + mlp + d)
        lora += single * lora_rank * per_single * length
    linear = 2 * (macs + lora)
    attention = 4 * length * length * d * (double + single)
    return {"linear": linear, "attention": attention, "lora": 2 * lora, "total": linear + attention}


# --- the model ---------------------------------------------------------------------------------------------


class LatentCodec(nn.Module):
    """Stands in for the VAE: FLUX latents (16 channels, /8) in 2x2 patches; the benchmark never decodes."""

    kind = "latent"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.patch_size, self.vae_scale_factor, self._channels = 2, 8, channels

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def token_size(self) -> int:
        return self.patch_size * self.vae_scale_factor

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.token_size, width // self.token_size


def random_transformer(config: dict[str, Any], dtype: torch.dtype, device: str, seed: int):
    """A ``FluxTransformer2DModel`` allocated directly in ``dtype`` on ``device`` (no float32 copy of 12B
    parameters first) with random weights: linear weights ~ N(0, 1/fan_in), biases 0, norm scales 1."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return model


def build_policy(setup: Setup):
    from cgrpo.policy.flux import ReferenceFluxPolicy

    dtype = getattr(torch, setup.dtype)
    transformer = random_transformer(setup.transformer, dtype, setup.device, setup.seed)
    side = setup.grid * 16
    policy = ReferenceFluxPolicy(
        transformer, LatentCodec(setup.transformer["in_channels"]), nn.Module(), side, guidance=setup.guidance
    )
    policy.add_lora(rank=setup.lora_rank, alpha=setup.lora_rank)
    policy.enable_gradient_checkpointing()
    return policy.to(setup.device)


def random_condition(setup: Setup, policy):
    """A group's conditioning: one (prompt, reference) pair repeated G times, as the trainer builds it."""
    from cgrpo.policy.base import Conditioning
    from cgrpo.policy.flux import uno_reference_ids

    g = torch.Generator().manual_seed(setup.seed + 1)
    cfg, device = setup.transformer, setup.device
    cond = Conditioning(
        prompt_embeds=torch.randn(1, setup.text_tokens, cfg["joint_attention_dim"], generator=g),
        pooled_prompt_embeds=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        text_ids=torch.zeros(setup.text_tokens, 3),
        reference_tokens=torch.randn(1, setup.reference_tokens, cfg["in_channels"], generator=g),
        reference_ids=uno_reference_ids(policy.grid, [(setup.reference_grid, setup.reference_grid)]),
        guidance=torch.full((1,), setup.guidance),
    )
    return cond.to(device).repeat_interleave(setup.group_size)


# --- one iteration -----------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def grpo_iteration(policy, cond, optimizer, setup: Setup, generator: torch.Generator) -> dict[str, float]:
    """Rollout (no grad) -> k trained steps (fwd + bwd, micro-batched) -> AdamW. Returns phase seconds."""
    from cgrpo.objective import clipped_policy_loss
    from cgrpo.sde import flux_sigmas, sde_step_with_logprob, select_steps
    from cgrpo.train.sampling import rollout

    device, G, T, k = setup.device, setup.group_size, setup.num_steps, setup.train_steps
    sigmas = flux_sigmas(T, image_seq_len=setup.image_tokens)
    sde_steps = torch.ones(T, dtype=torch.bool)
    sde_steps[-1] = False
    noise = policy.initial_noise(G, generator).to(device)

    _sync(device)
    start = time.perf_counter()
    policy.eval()
    trajectory = rollout(
        policy,
        cond,
        sigmas,
        sde_steps,
        generator,
        noise_level=setup.noise_level,
        micro_batch=setup.rollout_micro_batch,
        initial_noise=noise,
    )
    _sync(device)
    rollout_s = time.perf_counter() - start

    policy.train()
    steps = select_steps(T, "random", k=k, generator=generator)
    advantages = torch.randn(G, k, generator=generator).to(device)
    sample_index = torch.arange(G).repeat_interleave(k)
    column = torch.arange(k).repeat(G)
    total = len(sample_index)
    for begin in range(0, total, setup.train_micro_batch):
        chunk = slice(begin, begin + setup.train_micro_batch)
        i, j = sample_index[chunk], column[chunk]
        t = steps[j]
        x_t, x_next = trajectory.latents[i, t].to(device), trajectory.latents[i, t + 1].to(device)
        sigma, sigma_next = trajectory.sigmas[t].to(device), trajectory.sigmas[t + 1].to(device)
        velocity = policy.velocity(x_t, sigma, cond.index(i.to(cond.prompt_embeds.device)))
        step = sde_step_with_logprob(
            velocity, sigma, sigma_next, x_t, noise_level=setup.noise_level, prev_sample=x_next
        )
        out = clipped_policy_loss(
            step.log_prob, trajectory.log_probs[i, t].to(device), advantages[i, j], clip_range=1e-5
        )
        (out.loss * len(i) / total).backward()
    torch.nn.utils.clip_grad_norm_(list(policy.trainable_parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    train_s = time.perf_counter() - start - rollout_s
    return {"rollout_s": rollout_s, "train_s": train_s, "iteration_s": rollout_s + train_s}


def warm_up(policy, cond, setup: Setup) -> None:
    """One no-grad forward and one fwd+bwd so that kernels are selected before timing."""
    n = min(setup.rollout_micro_batch, setup.group_size)
    latents = policy.initial_noise(n).to(setup.device)
    sigma = torch.full((n,), 0.5, device=setup.device)
    policy.eval()
    with torch.no_grad():
        policy.velocity(latents, sigma, cond.index(slice(0, n)))
    policy.train()
    m = min(setup.train_micro_batch, setup.group_size)
    policy.velocity(latents[:m], sigma[:m], cond.index(slice(0, m))).float().mean().backward()
    for param in policy.trainable_parameters():
        param.grad = None
    _sync(setup.device)


def run(setup: Setup, iterations: int = 1) -> dict[str, Any]:
    torch.manual_seed(setup.seed)
    build_start = time.perf_counter()
    policy = build_policy(setup)
    _sync(setup.device)
    build_s = time.perf_counter() - build_start
    cond = random_condition(setup, policy)
    optimizer = torch.optim.AdamW(list(policy.trainable_parameters()), lr=1e-5, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(setup.seed + 2)
    cuda = setup.device.startswith("cuda")
    warm_up(policy, cond, setup)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timings = [grpo_iteration(policy, cond, optimizer, setup, generator) for _ in range(iterations)]

    flops = forward_flops(
        setup.transformer, setup.image_tokens, setup.reference_tokens, setup.text_tokens, setup.lora_rank
    )
    G, T, k = setup.group_size, setup.num_steps, setup.train_steps
    rollout_flops = T * G * flops["total"]
    train_flops = 3 * k * G * flops["total"]
    model_flops = rollout_flops + train_flops
    hardware_flops = model_flops + k * G * flops["total"]  # + the checkpointed forward's recomputation
    seconds = min(t["iteration_s"] for t in timings)
    best = min(timings, key=lambda t: t["iteration_s"])
    params = sum(p.numel() for n, p in policy.transformer.named_parameters() if "lora_" not in n)
    lora_params = sum(p.numel() for p in policy.trainable_parameters())
    result: dict[str, Any] = {
        "benchmark": "gpu_iteration",
        "tiny": setup.device == "cpu",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "setup": {k_: v for k_, v in asdict(setup).items() if k_ != "transformer"},
        "transformer": setup.transformer,
        "parameters": params,
        "lora_parameters": lora_params,
        "tokens": {
            "image": setup.image_tokens,
            "reference": setup.reference_tokens,
            "text": setup.text_tokens,
        },
        "build_s": round(build_s, 3),
        "seconds_per_iteration": round(seconds, 3),
        "rollout_s": round(best["rollout_s"], 3),
        "train_s": round(best["train_s"], 3),
        "all_iterations_s": [round(t["iteration_s"], 3) for t in timings],
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "flops": {
            "forward_per_sample": flops,
            "rollout": rollout_flops,
            "train": train_flops,
            "model_per_iteration": model_flops,
            "hardware_per_iteration": hardware_flops,
            "formula": "T*G*F + 3*k*G*F; F = 2*sum(linear in*out*tokens) + 4*L^2*d*blocks",
        },
        "achieved_tflops": round(model_flops / seconds / 1e12, 2),
        "achieved_hardware_tflops": round(hardware_flops / seconds / 1e12, 2),
        "rollout_tflops": round(rollout_flops / best["rollout_s"] / 1e12, 2),
        "train_tflops": round(train_flops / best["train_s"] / 1e12, 2),
        "peak_tflops": H100_BF16_DENSE_TFLOPS,
        "mfu": round(model_flops / seconds / 1e12 / H100_BF16_DENSE_TFLOPS, 4) if cuda else None,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (the same code path)")
    parser.add_argument("--iterations", type=int, default=1, help="timed iterations (the best is reported)")
    parser.add_argument("--rollout-micro-batch", type=int, default=None)
    parser.add_argument("--train-micro-batch", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)

    setup = TINY_SETUP if args.tiny else FULL
    if not args.tiny and not torch.cuda.is_available():
        print(
            "gpu_iteration: no CUDA device found; nothing measured. Run it on a GPU machine, or pass --tiny "
            "to run the same code path with a tiny config on the CPU.",
            file=sys.stderr,
        )
        return 0
    overrides = {
        "rollout_micro_batch": args.rollout_micro_batch,
        "train_micro_batch": args.train_micro_batch,
        "lora_rank": args.lora_rank,
    }
    setup = Setup(**{**asdict(setup), **{k: v for k, v in overrides.items() if v is not None}})
    result = run(setup, iterations=args.iterations)
    out = args.out or RESULTS / ("gpu_iteration_tiny.json" if args.tiny else "gpu_iteration.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
