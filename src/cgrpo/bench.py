"""``cgrpo bench``: performance of the GRPO trainer on the mini policy, measured side by side.

Setting (the issue's): a random-initialised mini policy (:func:`cgrpo.policy.mini.build_mini_policy`, 32x32
images, 64 image + 64 reference tokens), B = 4 prompts x G = 8 images, T = 10 steps, k = 5 trained steps,
LoRA rank 16, CPU. Every ratio compares variants measured in the same process, interleaved repetition by
repetition (the order alternates, ABBA), so that drifts of a shared, noisy machine hit both sides. The ratio
reported is that of the fastest runs' process CPU time (interference from other processes only adds time,
and CPU time leaves out the time they take from us); the wall-clock ratio and the ratio of every
interleaved pair are reported beside it.

- ``trainer_overhead_ratio``: one GRPO iteration (:meth:`GRPOTrainer.iteration`: conditioning, rollout,
  rewards, advantages, loss, AdamW) over the *bare* model work of the same shapes: T no-grad forwards of
  N samples, one forward + backward over the N * k trained transitions (in the trainer's micro-batches)
  and an AdamW step, with no rewards, advantages or logging. Target <= 1.10.
- ``sars_tdw_overhead``: iteration time with SARS + TDW over the naive weighted sum (Eq. 9), minus 1.
  Target <= 0.01. The advantage arithmetic itself is also timed alone (microseconds), which gives the
  overhead with far less noise than the difference of two ~10 s iterations.
- ``rollout_throughput``: images/s of :func:`cgrpo.train.sampling.rollout` (SDE steps with log-probs,
  stored transitions) over a plain sampling loop with diffusers' ``FlowMatchEulerDiscreteScheduler`` on the
  same model, sigmas and batch. Target >= 1.0.
- ``scaling``: seconds per iteration against G and against k (JSON and ``scaling.png``).

``--quick`` (about 4 minutes on 2 busy cores, under 5) uses fewer repetitions and scaling points.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

TARGETS = {"trainer_overhead_ratio": 1.10, "sars_tdw_overhead": 0.01, "rollout_throughput_ratio": 1.0}
# Table 8 of the paper: seconds per training step of Customized-GRPO and of the naive weighted sum.
PAPER_TABLE8 = {"customized_grpo_s": 311.82, "naive_s": 291.28}


def build_trainer(
    work_dir: Path,
    prompts: int = 4,
    group_size: int = 8,
    num_steps: int = 10,
    train_steps: int = 5,
    seed: int = 0,
    overrides: list[str] | None = None,
):
    """A :class:`GRPOTrainer` on a random mini policy (saved and loaded like a real checkpoint)."""
    from cgrpo.config import load_config
    from cgrpo.policy.mini import build_mini_policy
    from cgrpo.train.config import GRPOConfig
    from cgrpo.train.grpo import GRPOTrainer

    policy_dir = work_dir / "policy"
    if not (policy_dir / "transformer").is_dir():
        build_mini_policy(seed=seed).save_pretrained(policy_dir)
    config = load_config(
        GRPOConfig,
        None,
        [
            f"output_dir={work_dir / 'run'}",
            f"seed={seed}",
            f"policy.options={{path: {policy_dir}}}",
            "policy.lora={enabled: true, rank: 16, alpha: 16}",
            "data.options={image_size: 32}",
            f"train.prompts_per_iteration={prompts}",
            f"train.group_size={group_size}",
            f"train.train_steps={train_steps}",
            f"sampling.num_steps={num_steps}",
            "train.iterations=1000000",
            "eval.every=0",
            "log.tensorboard=false",
            "checkpoint.every=0",
            *(overrides or []),
        ],
    )
    return GRPOTrainer(config)


# ------------------------------------------------------------------------------------------- variants
def bare_iteration(trainer) -> Callable[[], None]:
    """The model work of one iteration of ``trainer`` with nothing else: same forwards, same shapes."""
    cfg = trainer.config
    policy = trainer.policy
    num_samples = cfg.train.prompts_per_iteration * cfg.train.group_size
    transitions = num_samples * cfg.train.train_steps
    examples = [trainer.train_set[i] for i in range(cfg.train.prompts_per_iteration)]
    with torch.no_grad():
        cond = policy.condition([e.prompt for e in examples], torch.stack([e.reference for e in examples]))
    cond = cond.repeat_interleave(cfg.train.group_size)
    train_cond = cond.index(torch.arange(num_samples).repeat_interleave(cfg.train.train_steps))
    sigmas = trainer.sigmas
    params = list(policy.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-12)  # the step costs what the trainer's costs; moves nothing
    chunk = cfg.train.micro_batch or transitions
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        policy.eval()
        with torch.no_grad():
            x = policy.initial_noise(num_samples, generator)
            for t in range(len(sigmas) - 1):
                v = policy.velocity(x, torch.full((num_samples,), float(sigmas[t])), cond)
                x = x + (sigmas[t + 1] - sigmas[t]) * v
        policy.train()
        x_t = torch.randn(transitions, *x.shape[1:], generator=generator)
        sigma = sigmas[torch.randint(0, len(sigmas) - 2, (transitions,), generator=generator)]
        for start in range(0, transitions, chunk):
            rows = slice(start, start + chunk)
            v = policy.velocity(x_t[rows], sigma[rows], train_cond.index(rows))
            (v.square().mean() * (len(range(transitions)[rows]) / transitions)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def _set_advantage(trainer, variant: str) -> None:
    a = trainer.config.advantage
    if variant == "customized":  # SARS (tanh synergy) + TDW (the paper's schedule)
        a.synergy, a.schedule = "tanh", "paper"
    else:  # the naive 1:1 weighted sum of Eq. 9
        a.synergy, a.schedule, a.ratio = "none", "static", [1.0, 1.0]


class Timings:
    """Seconds of each run of each variant: process CPU time (``cpu``) and wall-clock time (``wall``)."""

    def __init__(self, names: list[str]) -> None:
        self.cpu: dict[str, list[float]] = {name: [] for name in names}
        self.wall: dict[str, list[float]] = {name: [] for name in names}

    def run(self, name: str, fn: Callable[[], Any]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.cpu[name].append(time.process_time() - cpu)
        self.wall[name].append(time.perf_counter() - wall)

    def best(self, name: str, clock: str = "cpu") -> float:
        """The fastest run: interference from other processes only ever adds time (timeit's rule)."""
        return min(getattr(self, clock)[name])


def interleaved(variants: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> Timings:
    """``reps`` runs of each variant, interleaved; the order alternates every repetition (ABBA)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    timings = Timings(names)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            timings.run(name, variants[name])
    return timings


def _ratio_stats(t: Timings, numerator: str, denominator: str) -> dict[str, Any]:
    """``ratio``: best CPU time of ``numerator`` over best CPU time of ``denominator``. CPU time of this
    process, because on a shared machine wall-clock includes time other processes took from it; the
    wall-clock ratio and the ratio of every interleaved pair are reported beside it."""
    paired = [a / b for a, b in zip(t.cpu[numerator], t.cpu[denominator], strict=True)]
    return {
        "ratio": round(t.best(numerator) / t.best(denominator), 4),
        "ratio_wall": round(t.best(numerator, "wall") / t.best(denominator, "wall"), 4),
        "paired_ratios": [round(r, 4) for r in paired],
        "paired_ratio_median": round(statistics.median(paired), 4),
    }


# ----------------------------------------------------------------------------------------- benchmarks
def bench_iteration(trainer, reps: int, micro_number: int = 300) -> tuple[dict[str, Any], dict[str, Any]]:
    """Customized iteration vs bare model work vs naive iteration, interleaved in one loop."""
    bare = bare_iteration(trainer)
    breakdown: dict[str, list[float]] = {}

    def iteration(variant: str) -> Callable[[], None]:
        def run() -> None:
            _set_advantage(trainer, variant)
            metrics = trainer.iteration()
            if variant == "customized":
                for key, value in metrics.items():
                    if key.startswith("time/"):
                        breakdown.setdefault(key[5:], []).append(value)

        return run

    t = interleaved({"customized": iteration("customized"), "bare": bare, "naive": iteration("naive")}, reps)
    _set_advantage(trainer, "customized")
    component = advantage_microbench(trainer, micro_number)
    iteration_s = t.best("customized")
    overhead = {
        **_ratio_stats(t, "customized", "bare"),
        "target": TARGETS["trainer_overhead_ratio"],
        "iteration_cpu_s": round(iteration_s, 4),
        "bare_cpu_s": round(t.best("bare"), 4),
        "iteration_wall_s": round(t.best("customized", "wall"), 4),
        "bare_wall_s": round(t.best("bare", "wall"), 4),
        "iteration_breakdown_wall_s": {k: round(min(v), 4) for k, v in breakdown.items()},
        "reps": reps,
    }
    overhead["met"] = overhead["ratio"] <= overhead["target"]
    stats = _ratio_stats(t, "customized", "naive")
    sars = {
        "overhead": round(stats["ratio"] - 1.0, 4),
        "overhead_wall": round(stats["ratio_wall"] - 1.0, 4),
        "paired_ratios": stats["paired_ratios"],
        "target": TARGETS["sars_tdw_overhead"],
        "customized_cpu_s": round(iteration_s, 4),
        "naive_cpu_s": round(t.best("naive"), 4),
        "advantage_compute_us": component,
        "overhead_from_advantage_compute": round(
            (component["sars_tdw"] - component["naive"]) * 1e-6 / iteration_s, 7
        ),
        "paper_table8": {
            **PAPER_TABLE8,
            "overhead": round(PAPER_TABLE8["customized_grpo_s"] / PAPER_TABLE8["naive_s"] - 1.0, 4),
        },
        "reps": reps,
    }
    sars["met"] = sars["overhead"] <= sars["target"]
    return overhead, sars


def advantage_microbench(trainer, number: int = 300) -> dict[str, float]:
    """Microseconds per call of the advantage arithmetic of one iteration (group normalisation of both
    rewards, TDW weights of the k steps, SARS -> [N, k]) for SARS + TDW and for the naive sum."""
    from cgrpo.advantage import group_normalize, sars, tdw_weights

    cfg = trainer.config
    G, T, k = cfg.train.group_size, cfg.sampling.num_steps, cfg.train.train_steps
    n = cfg.train.prompts_per_iteration * G
    generator = torch.Generator().manual_seed(0)
    r_id, r_prompt = torch.rand(n, generator=generator), torch.rand(n, generator=generator)
    steps = torch.randperm(T - 1, generator=generator)[:k].sort().values
    valid = torch.ones(n, dtype=torch.bool)

    def advantages(synergy: str, schedule: str) -> torch.Tensor:
        a_id = group_normalize(r_id, G, valid=valid)
        a_prompt = group_normalize(r_prompt, G, valid=valid)
        w_id, w_prompt = tdw_weights(steps, T, schedule=schedule)
        return sars(a_id[:, None], a_prompt[:, None], w_id[None], w_prompt[None], alpha=0.5, synergy=synergy)

    out = {}
    for name, args in (("sars_tdw", ("tanh", "paper")), ("naive", ("none", "static"))):
        advantages(*args)
        best = min(timeit.repeat(lambda a=args: advantages(*a), number=number, repeat=3))
        out[name] = round(best / number * 1e6, 2)
    return out


def bench_rollout(trainer, reps: int) -> dict[str, Any]:
    """Our SDE rollout (log-probs, stored transitions) vs diffusers' Euler scheduler loop, same model."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cgrpo.sde import flux_mu
    from cgrpo.train.sampling import rollout

    cfg = trainer.config
    policy = trainer.policy
    num_samples = cfg.train.prompts_per_iteration * cfg.train.group_size
    T = cfg.sampling.num_steps
    examples = [trainer.train_set[i] for i in range(cfg.train.prompts_per_iteration)]
    with torch.no_grad():
        cond = policy.condition([e.prompt for e in examples], torch.stack([e.reference for e in examples]))
    cond = cond.repeat_interleave(cfg.train.group_size)
    sigmas = trainer.sigmas
    sde = trainer._sde_steps()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / T, T), mu=flux_mu(policy.latent_shape[0]))
    if not torch.allclose(scheduler.sigmas.float(), sigmas, atol=1e-6):
        raise RuntimeError("diffusers' sigmas differ from the trainer's: the comparison would be unfair")
    policy.eval()

    def ours() -> None:
        trajectory = rollout(
            policy, cond, sigmas, sde, torch.Generator().manual_seed(0), noise_level=cfg.sampling.noise_level
        )
        policy.decode(trajectory.final)

    @torch.no_grad()
    def plain() -> None:  # what a diffusers pipeline's denoising loop does
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / T, T), mu=flux_mu(policy.latent_shape[0]))
        x = policy.initial_noise(num_samples, torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            v = policy.velocity(x, (t / 1000).expand(num_samples), cond)
            x = scheduler.step(v, t, x, return_dict=False)[0]
        policy.decode(x)

    t = interleaved({"ours": ours, "diffusers": plain}, reps)
    result = {
        **_ratio_stats(t, "diffusers", "ours"),  # throughput ratio = inverse time ratio
        "target": TARGETS["rollout_throughput_ratio"],
        "ours_images_per_cpu_s": round(num_samples / t.best("ours"), 3),
        "diffusers_images_per_cpu_s": round(num_samples / t.best("diffusers"), 3),
        "ours_images_per_s": round(num_samples / t.best("ours", "wall"), 3),
        "diffusers_images_per_s": round(num_samples / t.best("diffusers", "wall"), 3),
        "batch": num_samples,
        "num_steps": T,
        "reps": reps,
    }
    result["met"] = result["ratio"] >= result["target"]
    return result


def bench_scaling(trainer, group_sizes: list[int], train_steps: list[int], reps: int) -> dict[str, Any]:
    """Seconds per iteration against G (k fixed) and against k (G fixed): the fastest of ``reps``
    interleaved runs, in process CPU time and in wall-clock time."""
    cfg = trainer.config.train
    base_g, base_k = cfg.group_size, cfg.train_steps

    def point(g: int, k: int) -> Callable[[], None]:
        def run() -> None:
            cfg.group_size, cfg.train_steps = g, k
            trainer.iteration()

        return run

    variants = {f"G={g}": point(g, base_k) for g in group_sizes}
    for k in train_steps:
        if not (k == base_k and base_g in group_sizes):  # (G, k) = (base_g, base_k) is measured once
            variants[f"k={k}"] = point(base_g, k)
    t = interleaved(variants, reps, warmup=0)
    cfg.group_size, cfg.train_steps = base_g, base_k

    def series(clock: str) -> tuple[list[float], list[float]]:
        best = {name: t.best(name, clock) for name in variants}
        by_g = [round(best[f"G={g}"], 4) for g in group_sizes]
        by_k = [round(best.get(f"k={k}", best.get(f"G={base_g}", math.nan)), 4) for k in train_steps]
        return by_g, by_k

    (g_cpu, k_cpu), (g_wall, k_wall) = series("cpu"), series("wall")
    return {
        "group_size": {"values": group_sizes, "cpu_s": g_cpu, "wall_s": g_wall, "train_steps": base_k},
        "train_steps": {"values": train_steps, "cpu_s": k_cpu, "wall_s": k_wall, "group_size": base_g},
        "prompts_per_iteration": trainer.config.train.prompts_per_iteration,
        "num_steps": trainer.config.sampling.num_steps,
        "reps": reps,
    }


def plot_scaling(scaling: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in (
        (axes[0], "group_size", "group size G"),
        (axes[1], "train_steps", "trained steps k"),
    ):
        series = scaling[key]
        ax.plot(series["values"], series["cpu_s"], "o-", label="CPU time of the process")
        ax.plot(series["values"], series["wall_s"], "s--", alpha=0.6, label="wall clock")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per iteration")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"k = {scaling['group_size']['train_steps']}")
    axes[1].set_title(f"G = {scaling['train_steps']['group_size']}")
    fig.suptitle(
        f"GRPO iteration, mini policy, {scaling['prompts_per_iteration']} prompts, T = {scaling['num_steps']}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- entry
def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "device": "cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_benchmarks(
    quick: bool = False,
    out_dir: str | Path = "benchmarks/results",
    threads: int = 1,
    setting: dict[str, Any] | None = None,
) -> dict:
    """Run every benchmark, write ``OUT_DIR/{bench,trainer_overhead,sars_tdw_overhead,rollout_throughput,
    scaling}.json`` and ``OUT_DIR/scaling.png``; return the combined results.

    ``threads``: torch intra-op threads (1 by default: on a shared 2-core machine 2 threads are slower and
    far noisier). ``setting``: overrides of the sizes and repetitions (tests use a tiny one): ``prompts``,
    ``group_size``, ``num_steps``, ``train_steps``, ``reps``, ``scaling_group_sizes``,
    ``scaling_train_steps``, ``scaling_reps``, ``micro_number``."""
    from cgrpo.io import atomic_write_json

    s = {
        "prompts": 4,
        "group_size": 8,
        "num_steps": 10,
        "train_steps": 5,
        "reps": 3 if quick else 7,
        "scaling_group_sizes": [4, 8, 16] if quick else [2, 4, 8, 12, 16],
        "scaling_train_steps": [1, 5, 9] if quick else [1, 3, 5, 7, 9],
        "scaling_reps": 1 if quick else 3,
        "micro_number": 300,  # calls per timing of the advantage arithmetic alone
        **(setting or {}),
    }
    out_dir = Path(out_dir)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="cgrpo-bench-") as tmp:
            trainer = build_trainer(
                Path(tmp), s["prompts"], s["group_size"], s["num_steps"], s["train_steps"]
            )
            overhead, sars = bench_iteration(trainer, s["reps"], s["micro_number"])
            rollout_result = bench_rollout(trainer, s["reps"] + 1)
            scaling = bench_scaling(
                trainer, s["scaling_group_sizes"], s["scaling_train_steps"], s["scaling_reps"]
            )
    finally:
        torch.set_num_threads(previous_threads)
    env = {
        **environment(),
        "threads": threads,
        "quick": quick,
        "setting": s,
        "seconds": round(time.perf_counter() - started, 1),
    }
    results = {
        "trainer_overhead_ratio": overhead["ratio"],
        "sars_tdw_overhead": sars["overhead"],
        "rollout_throughput_ratio": rollout_result["ratio"],
        "targets": TARGETS,
        "trainer_overhead": overhead,
        "sars_tdw": sars,
        "rollout_throughput": rollout_result,
        "scaling": scaling,
        "environment": env,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (
        ("trainer_overhead", overhead),
        ("sars_tdw_overhead", sars),
        ("rollout_throughput", rollout_result),
        ("scaling", scaling),
    ):
        atomic_write_json(out_dir / f"{name}.json", {**part, "environment": env})
    atomic_write_json(out_dir / "bench.json", results)
    plot_scaling(scaling, out_dir / "scaling.png")
    return results


def bench_command(
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer repetitions and points (about 4 min).")
    ] = False,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON files and scaling.png go.")] = Path(
        "benchmarks/results"
    ),
    threads: Annotated[
        int, typer.Option(help="torch threads (1: steadier timings on a shared machine).")
    ] = 1,
) -> None:
    """Trainer performance on the mini policy: overhead, SARS+TDW cost, rollout throughput, scaling.

    Prints JSON and writes OUT_DIR/*.json and OUT_DIR/scaling.png (wired as ``cgrpo bench``)."""
    print(json.dumps(run_benchmarks(quick=quick, out_dir=out_dir, threads=threads), indent=1))
