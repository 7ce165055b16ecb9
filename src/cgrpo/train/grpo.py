"""Customized-GRPO, Algorithm 1 of the paper, readable top to bottom.

One iteration (:meth:`GRPOTrainer.iteration`):

1. sample a batch of B (reference, prompt) pairs .......................... Alg. 1 line 2
2. roll out G images per pair with the SDE sampler, storing transitions ... line 5
3. score every image with the identity and the prompt reward .............. line 6
4. normalise each reward inside its group -> A_id, A_prompt ............... line 6, Eq. 8
5. pick the denoising steps to train (real step indices) .................. line 10
6. TDW weights of those real steps, SARS -> A_final [N, k] ................ lines 8, 12-18, Eq. 10-12
7. clipped policy loss on the selected steps, AdamW step .................. lines 20-21, Eq. 7
8. log; evaluate held-out subjects; checkpoint

The math lives in :mod:`cgrpo.advantage`, :mod:`cgrpo.sde` and :mod:`cgrpo.objective`; this file wires.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tqdm.auto import tqdm

from cgrpo.advantage import conflict_rate, group_normalize, sars, tdw_weights
from cgrpo.config import save_config, to_dict
from cgrpo.imaging import grid, save_png
from cgrpo.io import atomic_write_json
from cgrpo.objective import clipped_policy_loss, gaussian_mean_kl
from cgrpo.sde import flux_sigmas, sde_step_with_logprob, sde_window, select_steps, steps_to_mask
from cgrpo.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cgrpo.train.components import (
    BatchSampler,
    RewardFailure,
    build_datasets,
    build_policy,
    build_rewards,
    score_with_retries,
)
from cgrpo.train.config import GRPOConfig
from cgrpo.train.heldout import HeldoutResult, evaluate_heldout
from cgrpo.train.logger import MetricsLogger
from cgrpo.train.rollout import Trajectory, rollout


class GRPOTrainer:
    def __init__(self, config: GRPOConfig, resume: bool = False, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console(stderr=True)
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.output_dir / "config.yaml")
        torch.manual_seed(config.seed)

        self.policy = build_policy(config.policy, config.device)
        self.device = torch.device(config.device)
        self.train_set, self.heldout = build_datasets(config.data, config.seed)
        self.identity_reward, self.prompt_reward = build_rewards(config)
        self.sampler = BatchSampler(len(self.train_set), config.train.prompts_per_iteration, config.seed)
        params = list(self.policy.trainable_parameters())
        if not params:
            raise ValueError("the policy has no trainable parameters (enable policy.lora or full training)")
        self.optimizer = torch.optim.AdamW(
            params,
            lr=config.train.lr,
            betas=tuple(config.train.betas),
            weight_decay=config.train.weight_decay,
        )
        image_seq_len = self.policy.latent_shape[0]
        self.sigmas = flux_sigmas(
            config.sampling.num_steps, image_seq_len=image_seq_len, shift=config.sampling.shift
        )
        self.eval_sigmas = flux_sigmas(
            config.eval.num_steps, image_seq_len=image_seq_len, shift=config.sampling.shift
        )
        # Rollout noise and step selection draw from their own generators so that resume is exact.
        self.rollout_generator = torch.Generator().manual_seed(config.seed)
        self.step_generator = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self.history: dict[str, Any] = {"eval": []}
        if resume:
            self._resume()
        self.logger = MetricsLogger(
            self.output_dir,
            tensorboard=config.log.tensorboard,
            wandb=config.log.wandb,
            resume_step=self.step if resume else None,
            console=self.console,
            config=to_dict(config),
        )

    # ------------------------------------------------------------------------------------------ loop
    def train(self, max_steps: int | None = None) -> dict[str, Any]:
        """Run until ``train.iterations`` (or ``max_steps`` more iterations); returns the eval history."""
        cfg = self.config
        end = cfg.train.iterations if max_steps is None else min(cfg.train.iterations, self.step + max_steps)
        if self.step == 0 and not self.history["eval"]:
            self._evaluate()
        progress = tqdm(total=end, initial=self.step, desc="GRPO", unit="it", dynamic_ncols=True, leave=False)
        try:
            while self.step < end:
                metrics = self.iteration()
                self.step += 1
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < end:
                    metrics.update({f"eval/{k}": v for k, v in self._evaluate().items()})
                if self.step == end:
                    metrics.update({f"eval/{k}": v for k, v in self._evaluate().items()})
                if cfg.log.every and self.step % cfg.log.every == 0 or self.step == end:
                    self.logger.log(self.step, metrics, echo=not progress.disable or True)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 or self.step == end:
                    self.save_checkpoint()
                progress.update(1)
        except RewardFailure as failure:
            # Never lose work to a failing reward model: checkpoint what is trained, then exit clearly.
            path = self.save_checkpoint()
            raise RewardFailure(f"{failure}. Saved checkpoint {path}; resume with --resume.") from failure
        finally:
            progress.close()
            self.logger.close()
        self.save_policy(self.output_dir / "final")
        summary = {"base": self.history["eval"][0]["metrics"], "trained": self.history["eval"][-1]["metrics"]}
        atomic_write_json(self.output_dir / "summary.json", summary)
        return summary

    def iteration(self) -> dict[str, float]:
        cfg = self.config
        G, T = cfg.train.group_size, cfg.sampling.num_steps
        timings: dict[str, float] = {}

        # 1. A batch of (reference, prompt) pairs; each pair is repeated G times (one group).
        examples = [self.train_set[i] for i in self.sampler.next()]
        prompts = [e.prompt for e in examples for _ in range(G)]
        subjects = [e.subject_class for e in examples for _ in range(G)]
        references = torch.stack([e.reference for e in examples])
        cond = self.policy.condition(
            [e.prompt for e in examples], references.to(self.device)
        ).repeat_interleave(G)

        # The denoising steps trained this iteration (Alg. 1 line 10), as real step indices (0 = noisiest);
        # drawn before the rollout because MixGRPO's window also decides which steps are stochastic.
        steps = self._select_steps()

        # 2. SDE rollouts under the current policy (= pi_old for this iteration), transitions stored.
        tic = time.perf_counter()
        self.policy.eval()
        trajectory = rollout(
            self.policy,
            cond,
            self.sigmas,
            sde_steps=steps_to_mask(steps, T) if cfg.train.step_selection == "window" else self._sde_steps(),
            generator=self.rollout_generator,
            noise_level=cfg.sampling.noise_level,
            formulation=cfg.sampling.formulation,
            micro_batch=cfg.sampling.micro_batch,
        )
        images = self.policy.decode(trajectory.final.to(self.device))
        timings["time/rollout"] = time.perf_counter() - tic

        # 3. Both rewards; a non-finite score masks that sample out of its group.
        tic = time.perf_counter()
        group_references = references.repeat_interleave(G, dim=0)
        r_id = self._score(self.identity_reward, images, group_references, prompts, subjects)
        r_prompt = self._score(self.prompt_reward, images, group_references, prompts, subjects)
        valid = torch.isfinite(r_id) & torch.isfinite(r_prompt)
        timings["time/reward"] = time.perf_counter() - tic

        # 4. Each reward normalised inside its own group (Eq. 8).
        a_id = group_normalize(r_id, G, eps=cfg.advantage.eps, std=cfg.advantage.std, valid=valid)
        a_prompt = group_normalize(r_prompt, G, eps=cfg.advantage.eps, std=cfg.advantage.std, valid=valid)

        # 5-6. TDW weights keyed by the real step, then SARS per (sample, step) -> [N, k].
        w_id, w_prompt = self._tdw(steps)
        advantages = sars(
            a_id[:, None],
            a_prompt[:, None],
            w_id[None, :],
            w_prompt[None, :],
            alpha=cfg.advantage.alpha,
            synergy=cfg.advantage.synergy,
        )
        advantages = torch.where(valid[:, None], advantages, torch.zeros_like(advantages))

        # 7. Clipped policy loss on the selected steps; AdamW.
        tic = time.perf_counter()
        self.policy.train()
        loss_stats = self._optimize(trajectory, cond, steps, advantages)
        timings["time/train"] = time.perf_counter() - tic

        # 8. What the run shows: rewards, the conflict rate (Fig. 7), optimisation diagnostics.
        group_std = lambda r: float(torch.nan_to_num(r.view(-1, G)).std(dim=1, unbiased=False).mean())  # noqa: E731
        return {
            "loss": loss_stats["loss"],
            "reward/id": _nanmean(r_id),
            "reward/prompt": _nanmean(r_prompt),
            "reward/id_group_std": group_std(r_id),
            "reward/prompt_group_std": group_std(r_prompt),
            "conflict_rate": float(conflict_rate(a_id[valid], a_prompt[valid]))
            if valid.any()
            else float("nan"),
            "advantage/abs_mean": float(advantages.abs().mean()),
            "invalid_samples": int((~valid).sum()),
            "clip_fraction": loss_stats["clip_fraction"],
            "approx_kl": loss_stats["approx_kl"],
            "ratio_mean": loss_stats["ratio_mean"],
            "grad_norm": loss_stats["grad_norm"],
            "lr": self.optimizer.param_groups[0]["lr"],
            **timings,
        }

    # --------------------------------------------------------------------------------------- pieces
    def _sde_steps(self) -> torch.Tensor:
        """Steps sampled stochastically: all but the last (the final step to sigma=0 stays deterministic)."""
        steps = torch.ones(self.config.sampling.num_steps, dtype=torch.bool)
        steps[-1] = False
        return steps

    def _select_steps(self) -> torch.Tensor:
        t = self.config.train
        if t.step_selection == "window":
            return sde_window(self.step, self.config.sampling.num_steps, t.window_size)
        return select_steps(
            self.config.sampling.num_steps, t.step_selection, k=t.train_steps, generator=self.step_generator
        )

    def _tdw(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.config.advantage
        return tdw_weights(
            steps,
            self.config.sampling.num_steps,
            schedule=a.schedule,
            w_max=a.w_max,
            w_min=a.w_min,
            t_c=a.t_c,
            lam=a.lam,
            ratio=tuple(a.ratio),
        )

    def _score(self, reward, images, references, prompts, subjects) -> torch.Tensor:
        r = self.config.rewards
        return score_with_retries(
            reward, images, references, prompts, subjects, r.max_retries, r.retry_backoff_s
        )

    def _optimize(
        self, trajectory: Trajectory, cond, steps: torch.Tensor, advantages: torch.Tensor
    ) -> dict[str, float]:
        """Gradient of the clipped objective over the (sample, selected step) pairs.

        The pairs are flattened into one list of M = N * k transitions and run in micro-batches; with
        ``optimizer_step="timestep"`` the optimiser steps after each denoising step (Alg. 1 line 21
        literally), otherwise once per pass (gradient accumulation, as Flow-GRPO does).
        """
        cfg = self.config
        num_samples, k = advantages.shape
        sample_index = torch.arange(num_samples).repeat_interleave(k)
        column = torch.arange(k).repeat(num_samples)
        if cfg.train.optimizer_step == "timestep":
            order = torch.argsort(column, stable=True)
            sample_index, column = sample_index[order], column[order]
        total = len(sample_index)
        chunk = cfg.train.micro_batch or (num_samples if cfg.train.optimizer_step == "timestep" else total)
        sums = {"loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0}
        grad_norms = []
        for _ in range(cfg.train.inner_epochs):
            for start in range(0, total, chunk):
                i, j = sample_index[start : start + chunk], column[start : start + chunk]
                t = steps[j]
                x_t = trajectory.latents[i, t].to(self.device)
                x_next = trajectory.latents[i, t + 1].to(self.device)
                sigma, sigma_next = trajectory.sigmas[t], trajectory.sigmas[t + 1]
                velocity = self.policy.velocity(x_t, sigma.to(self.device), cond.index(i))
                transition = sde_step_with_logprob(
                    velocity,
                    sigma.to(self.device),
                    sigma_next.to(self.device),
                    x_t,
                    noise_level=cfg.sampling.noise_level,
                    prev_sample=x_next,
                    formulation=cfg.sampling.formulation,
                )
                kl_term = self._kl_to_reference(x_t, sigma, sigma_next, cond.index(i), transition)
                out = clipped_policy_loss(
                    transition.log_prob,
                    trajectory.log_probs[i, t].to(self.device),
                    advantages[i, j].to(self.device),
                    clip_range=cfg.train.clip_range,
                    adv_clip=cfg.train.adv_clip,
                )
                weight = len(i) / total
                ((out.loss + kl_term) * weight).backward()
                sums["loss"] += float(out.loss) * weight
                sums["clip_fraction"] += float(out.clip_fraction) * weight
                sums["approx_kl"] += float(out.approx_kl) * weight
                sums["ratio_mean"] += float(out.ratio_mean) * weight
                last_of_step = cfg.train.optimizer_step == "timestep" and (
                    start + chunk >= total or column[min(start + chunk, total - 1)] != j[-1]
                )
                if last_of_step or start + chunk >= total:
                    grad_norms.append(self._optimizer_step())
        epochs = cfg.train.inner_epochs
        return {**{k: v / epochs for k, v in sums.items()}, "grad_norm": sum(grad_norms) / len(grad_norms)}

    def _optimizer_step(self) -> float:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.train.grad_clip)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:  # a non-finite gradient would poison the weights and every later checkpoint
            self.console.print("[yellow]non-finite gradient norm: optimiser step skipped[/]")
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _kl_to_reference(self, x_t, sigma, sigma_next, cond, transition) -> torch.Tensor:
        """Flow-GRPO's KL between the Gaussian transitions of the policy and the frozen base (LoRA off)."""
        coef = self.config.train.kl_coef
        if coef == 0:
            return torch.zeros((), device=self.device)
        disable = getattr(self.policy, "disable_lora", None)
        with torch.no_grad(), disable() if disable else nullcontext():
            ref_velocity = self.policy.velocity(x_t, sigma.to(self.device), cond)
            reference = sde_step_with_logprob(
                ref_velocity,
                sigma.to(self.device),
                sigma_next.to(self.device),
                x_t,
                noise_level=self.config.sampling.noise_level,
                prev_sample=transition.prev_sample,
                formulation=self.config.sampling.formulation,
            )
        return coef * gaussian_mean_kl(transition.mean, reference.mean, transition.std).mean()

    # ------------------------------------------------------------------------- evaluation and state
    def _evaluate(self) -> dict[str, float]:
        cfg = self.config.eval
        if not self.heldout:
            return {}
        result = evaluate_heldout(
            self.policy,
            self.heldout,
            self.identity_reward,
            self.prompt_reward,
            self.eval_sigmas,
            seed=cfg.seed,
            images_per_prompt=cfg.images_per_prompt,
            micro_batch=self.config.sampling.micro_batch,
        )
        metrics = result.summary()
        self.history["eval"].append({"step": self.step, "metrics": metrics})
        self._save_eval_images(result)
        return metrics

    def _save_eval_images(self, result: HeldoutResult) -> None:
        directory = self.output_dir / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(result.images, directory / f"eval-step-{self.step:06d}.pt")
        references = torch.stack([e.reference for e in self.heldout]).repeat_interleave(
            self.config.eval.images_per_prompt, dim=0
        )
        save_png(grid([references, result.images]), directory / f"eval-step-{self.step:06d}.png")
        self.logger_image(result)

    def logger_image(self, result: HeldoutResult) -> None:
        logger = getattr(self, "logger", None)
        if logger is not None:
            import numpy as np

            logger.add_image("eval/samples", np.asarray(grid([result.images[:16]], scale=2)), self.step)

    def save_checkpoint(self) -> Path:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rollout_generator": self.rollout_generator.get_state(),
            "step_generator": self.step_generator.get_state(),
            "rng": rng_state(),
            "history": self.history,
        }
        return save_checkpoint(
            self.output_dir / "checkpoints",
            self.step,
            self.policy.transformer,
            state,
            self.config.checkpoint.keep_last,
        )

    def _resume(self) -> None:
        path = latest_checkpoint(self.output_dir / "checkpoints")
        if path is None:
            self.console.print(
                f"[yellow]--resume: no checkpoint in {self.output_dir}/checkpoints; starting fresh[/]"
            )
            return
        state = load_checkpoint(path, self.policy.transformer)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.rollout_generator.set_state(state["rollout_generator"])
        self.step_generator.set_state(state["step_generator"])
        set_rng_state(state["rng"])
        self.history = state["history"]
        self.step = int(state["step"])
        self.console.print(f"resumed from {path} at step {self.step}")

    def save_policy(self, directory: Path) -> None:
        """The trained adapter (or full weights) in the policy's own format, plus the eval history."""
        if self.config.policy.lora.enabled and hasattr(self.policy, "save_lora"):
            self.policy.save_lora(directory)
        else:
            self.policy.save_pretrained(directory)
        atomic_write_json(directory / "eval_history.json", self.history["eval"])


def _nanmean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan


def train(config: GRPOConfig, resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
    """Run Customized-GRPO (or a baseline/ablation, by config); returns ``{"base": ..., "trained": ...}``."""
    trainer = GRPOTrainer(config, resume=resume)
    summary = trainer.train(max_steps=max_steps)
    Console(stderr=True).print(json.dumps(summary, indent=1))
    return summary
