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
With several processes (:mod:`cgrpo.train.distributed`) each one rolls out and scores its rows of the
iteration's N = B * G samples; rewards are gathered before step 4, so groups are normalised as a whole.
What the run shows besides its metrics (rollout grids, the advantages log, held-out images) hangs on the
trainer as callbacks (:mod:`cgrpo.train.callbacks`); notices go to :mod:`logging`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cgrpo.advantage import (
    conflict_rate,
    group_stats,
    multi_conflict_rate,
)
from cgrpo.config import save_config, to_dict
from cgrpo.io import atomic_write_json
from cgrpo.objective import clipped_policy_loss, gaussian_mean_kl, log_ratio_scale
from cgrpo.sde import sde_step_with_logprob, sde_window, select_steps, steps_to_mask
from cgrpo.train.callbacks import (
    AdvantagesLog,
    Callback,
    CallbackList,
    EvalImages,
    RolloutGrids,
    TensorBoardImages,
)
from cgrpo.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    remove_stale_temp_dirs,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cgrpo.train.components import (
    BatchSampler,
    CheckpointError,
    RetryingReward,
    RewardFailure,
    TrainingError,
    build_datasets,
    build_policy,
    build_rewards,
    normalized_advantages,
    record_world_version,
    score_subjects_with_retries,
    score_with_retries,
    shaped_advantages,
    use_policy_references,
    validate_data,
)
from cgrpo.train.config import GRPOConfig
from cgrpo.train.distributed import Distributed
from cgrpo.train.heldout import NO_HELDOUT, base_trained_summary, evaluate_heldout
from cgrpo.train.logger import MetricsLogger
from cgrpo.train.sampling import Trajectory, rollout, schedule
from cgrpo.train.schedule import lr_scheduler
from cgrpo.train.subjects import (
    SubjectCountError,
    classes_per_subject,
    condition_references,
    references_per_subject,
    references_to,
    subject_count,
)

log = logging.getLogger(__name__)


class GRPOTrainer:
    """``callbacks``: user :class:`~cgrpo.train.callbacks.Callback` s, called after the built-in ones."""

    def __init__(
        self, config: GRPOConfig, resume: bool = False, callbacks: list[Callback] | None = None
    ) -> None:
        self.config = config
        self.dist = Distributed.setup(config.distributed, not config.policy.lora.enabled, config.device)
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        record_world_version(config.data)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
            for stale in remove_stale_temp_dirs(self.checkpoint_dir):  # left by a save that was killed
                log.warning("removed %s: an unfinished checkpoint write", stale)
        # Every file of a JSONL/folder dataset is checked before anything expensive is built.
        validate_data(config.data)
        num_samples = config.train.prompts_per_iteration * config.train.group_size
        if num_samples % self.dist.world_size:
            raise TrainingError(
                f"train.prompts_per_iteration x train.group_size = {num_samples} samples cannot be split "
                f"evenly over {self.dist.world_size} processes; use a multiple of {self.dist.world_size}"
            )
        torch.manual_seed(config.seed)

        self.device = self.dist.device(config.device)
        self.policy = build_policy(config.policy, str(self.device))
        if config.sampling.guidance is not None:  # guidance-distilled backbones (FLUX.1-dev)
            self.policy.guidance = config.sampling.guidance
        if config.train.compile:
            self.policy.transformer.compile()
        self.train_set, self.heldout = build_datasets(config.data, config.seed)
        if not self.heldout and self.dist.is_main:
            log.warning(NO_HELDOUT)
        self.num_subjects = self._check_subjects()
        self.identity_reward, self.prompt_reward = build_rewards(config)
        # Policies that keep each reference's own size prepare the dataset's references themselves; a batch
        # then only mixes examples whose references share their sizes (bucketing).
        bucket_keys = use_policy_references(self.train_set, self.policy)
        self.sampler = BatchSampler(
            len(self.train_set), config.train.prompts_per_iteration, config.seed, keys=bucket_keys
        )
        # DDP/FSDP wrapping comes before the optimiser: FSDP replaces the parameters by sharded ones.
        self.train_velocity = self.dist.wrap(self.policy)
        params = list(self.policy.trainable_parameters())
        if not params:
            raise ValueError("the policy has no trainable parameters (enable policy.lora or full training)")
        self.optimizer = torch.optim.AdamW(
            params,
            lr=config.train.lr,
            betas=tuple(config.train.betas),
            weight_decay=config.train.weight_decay,
        )
        t = config.train
        self.lr_scheduler = lr_scheduler(
            self.optimizer, t.lr_schedule, t.warmup_iterations, t.iterations, t.min_lr_ratio
        )
        self.sigmas = schedule(self.policy, config.sampling.num_steps, config.sampling.shift)
        self.eval_sigmas = schedule(self.policy, config.eval.num_steps, config.sampling.shift)
        # Rollout noise and step selection draw from their own generators so that resume is exact.
        self.rollout_generator = torch.Generator().manual_seed(config.seed)
        self.step_generator = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self.history: dict[str, Any] = {"eval": []}
        self._iteration_start: dict[str, Any] | None = None
        if resume:
            self._resume()
        self.logger = (
            MetricsLogger(
                self.output_dir,
                tensorboard=config.log.tensorboard,
                wandb=config.log.wandb,
                resume_step=self.step if resume else None,
                config=to_dict(config),
            )
            if self.dist.is_main
            else _NullLogger()
        )
        # Hooks run where the run's files are written: on the main process only.
        self.callbacks = CallbackList(
            [*self._builtin_callbacks(resume), *(callbacks or [])] if self.dist.is_main else []
        )

    # ------------------------------------------------------------------------------------------ loop
    def train(self, max_steps: int | None = None) -> dict[str, Any]:
        """Run until ``train.iterations`` (or ``max_steps`` more iterations); returns the eval history."""
        cfg = self.config
        end = cfg.train.iterations if max_steps is None else min(cfg.train.iterations, self.step + max_steps)
        progress = tqdm(
            total=end,
            initial=self.step,
            desc="GRPO",
            unit="it",
            dynamic_ncols=True,
            leave=False,
            disable=not self.dist.is_main,
        )
        unlogged: dict[str, float] | None = None  # metrics of self.step not yet in metrics.jsonl
        self.callbacks.on_train_start(self.step)
        try:
            if self.step == 0 and not self.history["eval"]:
                self._evaluate()
            while self.step < end:
                metrics = self.iteration()
                self.step += 1
                self._iteration_start, unlogged = None, metrics  # the state is now that of self.step
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < end:
                    metrics.update({f"eval/{k}": v for k, v in self._evaluate().items()})
                if self.step == end:
                    metrics.update({f"eval/{k}": v for k, v in self._evaluate().items()})
                if cfg.log.every and self.step % cfg.log.every == 0 or self.step == end:
                    self._log(metrics)
                unlogged = None
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 or self.step == end:
                    self.save_checkpoint()
                progress.update(1)
        except RewardFailure as failure:
            # Never lose work to a failing reward model. Failed while scoring an iteration: checkpoint the
            # state at its start (weights and optimiser are untouched until its update). Failed in an
            # evaluation after an iteration: log that iteration, checkpoint the current state.
            if unlogged is not None:
                self._log(unlogged)
            path = self.save_checkpoint(self._iteration_start)
            raise RewardFailure(f"{failure}. Saved checkpoint {path}; resume with --resume.") from failure
        finally:
            progress.close()
            self.logger.close()
        self.save_policy(self.output_dir / "final")
        history = self.history["eval"]  # empty without held-out data
        summary = base_trained_summary(
            history[0]["metrics"] if history else None, history[-1]["metrics"] if history else None
        )
        if self.dist.is_main:
            atomic_write_json(self.output_dir / "summary.json", summary)
        self.callbacks.on_train_end(summary)
        self.dist.barrier()
        return summary

    def _log(self, metrics: dict[str, float]) -> None:
        self.logger.log(self.step, metrics, echo=True)
        self.callbacks.on_log(self.step, metrics)

    def iteration(self) -> dict[str, float]:
        cfg = self.config
        G, T = cfg.train.group_size, cfg.sampling.num_steps
        timings: dict[str, float] = {}
        self._iteration_start = self._resumable_state()  # what a checkpoint of this step must hold

        self.policy.eval()  # rollouts and conditioning run in eval mode (no dropout in text encoders)

        # 1. A batch of (reference, prompt) pairs; each pair is repeated G times (one group). This process
        #    handles `rows` of the N = B * G samples (all of them with one process).
        #    With K subjects per example the policy is conditioned on all K references and every subject
        #    gets its own identity reward.
        examples = [self.train_set[i] for i in self.sampler.next()]
        num_samples = len(examples) * G
        rows = self.dist.local_rows(num_samples)
        prompts = [e.prompt for e in examples for _ in range(G)][rows]
        classes = [c[rows] for c in classes_per_subject(examples, G)]  # K lists of this process's rows
        cond = (
            self.policy.condition(
                [e.prompt for e in examples], references_to(condition_references(examples), self.device)
            )
            .repeat_interleave(G)
            .index(rows)
        )

        # The denoising steps trained this iteration (Alg. 1 line 10), as real step indices (0 = noisiest);
        # drawn before the rollout because MixGRPO's window also decides which steps are stochastic.
        steps = self._select_steps()

        # 2. SDE rollouts under the current policy (= pi_old for this iteration), transitions stored.
        tic = time.perf_counter()
        trajectory = rollout(
            self.policy,
            cond,
            self.sigmas,
            sde_steps=steps_to_mask(steps, T) if cfg.train.step_selection == "window" else self._sde_steps(),
            generator=self.rollout_generator,
            noise_level=cfg.sampling.noise_level,
            formulation=cfg.sampling.formulation,
            micro_batch=cfg.sampling.micro_batch,
            shard=(rows, num_samples),
        )
        images = self.policy.decode(trajectory.final.to(self.device))
        timings["time/rollout"] = time.perf_counter() - tic
        group_references = [r[rows] for r in references_per_subject(examples, G)]  # K x [n, 3, H_k, W_k]
        shown = group_references[0] if self.num_subjects == 1 else group_references
        self.callbacks.on_rollout(self.step + 1, shown, images)

        # 3. Both rewards, gathered over processes; a non-finite score masks that sample out of its group.
        #    r_ids [N, K]: one identity reward per subject.
        tic = time.perf_counter()
        r_ids, r_prompt = self._score(images, group_references, prompts, classes)
        valid = torch.isfinite(r_ids).all(dim=1) & torch.isfinite(r_prompt)
        skipped = valid.view(-1, G).sum(dim=1) < 2  # no pair of valid samples: zero advantage, no signal
        timings["time/reward"] = time.perf_counter() - tic

        # 4. Each reward normalised inside its own group (Eq. 8), every subject's identity column on its own.
        a = cfg.advantage
        a_ids, a_prompt = normalized_advantages(cfg, r_ids, r_prompt, valid)
        # The conflict statistic and the advantages log take one identity advantage: with K > 1 subjects
        # the one SARS sees, the subjects' mean (the minimum for multi_subject=weakest); with K = 1 it is
        # a_ids[:, 0] exactly.
        a_id = a_ids.amin(dim=1) if a.multi_subject == "weakest" else a_ids.mean(dim=1)
        self.callbacks.on_advantages(self.step + 1, a_id, a_prompt, valid, G)

        # 5-6. TDW weights keyed by the real step, then SARS per (sample, step) -> [N, k]; with K subjects the
        #      n-objective SARS (advantage.multi_subject), which splits TDW's identity weight over them.
        advantages = shaped_advantages(cfg, a_ids, a_prompt, steps)
        advantages = torch.where(valid[:, None], advantages, torch.zeros_like(advantages))

        # 7. Clipped policy loss on the selected steps (this process's rows); AdamW. An iteration whose
        #    groups are all skipped has no learning signal and makes no update.
        tic = time.perf_counter()
        self.policy.train()
        if skipped.all():
            loss_stats = dict.fromkeys(("loss", "clip_fraction", "approx_kl", "ratio_mean", "grad_norm"), 0.0)
        else:
            loss_stats = self._optimize(trajectory, cond, steps, advantages[rows])
        with warnings.catch_warnings():  # torch warns when an iteration without update steps the schedule
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
            self.lr_scheduler.step()
        timings["time/train"] = time.perf_counter() - tic

        # 8. What the run shows: rewards, the conflict rate (Fig. 7), optimisation diagnostics.
        def group_std(rewards: torch.Tensor) -> float:  # mean within-group spread: how much signal there is
            return float(torch.nanmean(group_stats(rewards, G, valid=valid).std))

        return {
            "loss": loss_stats["loss"],
            "reward/id": _nanmean(r_ids),
            "reward/prompt": _nanmean(r_prompt),
            "reward/id_group_std": sum(group_std(r) for r in r_ids.T) / self.num_subjects,
            "reward/prompt_group_std": group_std(r_prompt),
            "conflict_rate": float(conflict_rate(a_id[valid], a_prompt[valid]))
            if valid.any()
            else float("nan"),
            **(self._subject_metrics(r_ids, a_ids[valid], a_prompt[valid]) if self.num_subjects > 1 else {}),
            "advantage/abs_mean": float(advantages.abs().mean()),
            "invalid_samples": int((~valid).sum()),
            "skipped_groups": int(skipped.sum()),
            "clip_fraction": loss_stats["clip_fraction"],
            "approx_kl": loss_stats["approx_kl"],
            "ratio_mean": loss_stats["ratio_mean"],
            "grad_norm": loss_stats["grad_norm"],
            "lr": self.optimizer.param_groups[0]["lr"],
            **timings,
        }

    # --------------------------------------------------------------------------------------- pieces
    def _num_sde_steps(self) -> int:
        s = self.config.sampling
        return s.num_steps - 1 if s.sde_steps is None else s.sde_steps

    def _sde_steps(self) -> torch.Tensor:
        """Steps sampled stochastically: the first ``sampling.sde_steps`` (default all but the last)."""
        return steps_to_mask(torch.arange(self._num_sde_steps()), self.config.sampling.num_steps)

    def _select_steps(self) -> torch.Tensor:
        t = self.config.train
        if t.step_selection == "window":
            return sde_window(self.step, self.config.sampling.num_steps, t.window_size)
        # select_steps draws from the first (num_steps - 1) steps, so this draws among the SDE steps.
        return select_steps(
            self._num_sde_steps() + 1, t.step_selection, k=t.train_steps, generator=self.step_generator
        )

    def _score(self, images, references, prompts, classes) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity rewards ``[N, K]`` and prompt rewards ``[N]`` of all processes' samples; each process
        scores its rows. ``references``: K batches ``[n, 3, H_k, W_k]``; ``classes``: K lists of n names.

        One subject: the identity reward is called as a plain reward, exactly as before multi-subject data.
        K subjects: :func:`cgrpo.rewards.base.score_subjects` (joint scoring with assignment where the reward
        has it). The prompt reward takes the first subject's reference and class (its protocol has one).
        A reward that keeps failing raises :class:`RewardFailure` on every process (they agree first, so
        no process is left waiting in the gather)."""
        r = self.config.rewards
        retries = (r.max_retries, r.retry_backoff_s, r.timeout_s)
        failure: RewardFailure | None = None
        r_ids = r_prompt = torch.empty(0)
        try:
            if len(references) == 1:
                r_ids = score_with_retries(
                    self.identity_reward, images, references[0], prompts, classes[0], *retries
                )[:, None]
            else:
                r_ids = score_subjects_with_retries(
                    self.identity_reward, images, references, prompts, classes, *retries
                )
            r_prompt = score_with_retries(
                self.prompt_reward, images, references[0], prompts, classes[0], *retries
            )
        except RewardFailure as error:
            failure = error
        if not self.dist.all_true(failure is None):
            raise failure or RewardFailure("a reward failed on another process (see its log)")
        return self.dist.gather(r_ids), self.dist.gather(r_prompt)

    def _subject_metrics(
        self, r_ids: torch.Tensor, a_ids: torch.Tensor, a_prompt: torch.Tensor
    ) -> dict[str, float]:
        """Per-subject rewards ``reward/id_<k>``, the weakest subject's ``reward/id_min`` (mean over samples
        of the lowest subject reward) and ``conflict_rate/multi``: the share of (valid) samples where some
        pair of the K + 1 objectives pulls in opposite directions."""
        finite = torch.isfinite(r_ids).all(dim=1)
        out = {f"reward/id_{k}": _nanmean(column) for k, column in enumerate(r_ids.T)}
        out["reward/id_min"] = _nanmean(r_ids[finite].amin(dim=1)) if finite.any() else math.nan
        out["conflict_rate/multi"] = multi_conflict_rate(a_ids, a_prompt) if len(a_ids) else math.nan
        return out

    def _check_subjects(self) -> int:
        """K, the number of subjects of every training and held-out example, checked at start-up."""
        name = self.config.data.name
        count = subject_count(self.train_set, f"{name} (training)")
        if self.heldout:
            held = subject_count(self.heldout, f"{name} (held-out)")
            if held != count:
                raise SubjectCountError(
                    f"dataset {name}: the training examples have {count} subject(s) each but the held-out "
                    f"examples {held}; both must have the same number"
                )
        return count

    def _with_retries(self, reward) -> RetryingReward:
        """``reward`` for evaluation: retried like the training rewards, :class:`RewardFailure` at the end."""
        r = self.config.rewards
        return RetryingReward(reward, r.max_retries, r.retry_backoff_s, r.timeout_s)

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
                last_of_step = cfg.train.optimizer_step == "timestep" and (
                    start + chunk >= total or column[min(start + chunk, total - 1)] != j[-1]
                )
                ends_step = last_of_step or start + chunk >= total
                # Gradients are averaged over processes only on the micro-batch that ends a step.
                with self.dist.sync_gradients(ends_step):
                    velocity = self.train_velocity(x_t, sigma.to(self.device), cond.index(i))
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
                    scale = log_ratio_scale(transition.std, cfg.train.log_prob)
                    out = clipped_policy_loss(
                        transition.log_prob * scale,
                        trajectory.log_probs[i, t].to(self.device) * scale,
                        advantages[i, j].to(self.device),
                        clip_range=cfg.train.clip_range,
                        adv_clip=cfg.train.adv_clip,
                    )
                    weight = len(i) / total
                    self.dist.backward((out.loss + kl_term) * weight)
                sums["loss"] += float(out.loss.detach()) * weight
                sums["clip_fraction"] += float(out.clip_fraction) * weight
                sums["approx_kl"] += float(out.approx_kl) * weight
                sums["ratio_mean"] += float(out.ratio_mean) * weight
                if ends_step:
                    grad_norms.append(self._optimizer_step())
        epochs = cfg.train.inner_epochs
        stats = self.dist.mean({k: v / epochs for k, v in sums.items()})  # every process has as many rows
        return {**stats, "grad_norm": sum(grad_norms) / len(grad_norms)}

    def _optimizer_step(self) -> float:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = self.dist.clip_grad_norm_(params, self.config.train.grad_clip)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:  # a non-finite gradient would poison the weights and every later checkpoint
            log.warning("non-finite gradient norm: optimiser step skipped")
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _kl_to_reference(self, x_t, sigma, sigma_next, cond, transition) -> torch.Tensor:
        """Flow-GRPO's KL between the Gaussian transitions of the policy and the frozen base (LoRA off)."""
        coef = self.config.train.kl_coef
        if coef == 0:
            return torch.zeros((), device=self.device)
        with torch.no_grad(), self.policy.disable_lora():
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
            self._with_retries(self.identity_reward),
            self._with_retries(self.prompt_reward),
            self.eval_sigmas,
            seed=cfg.seed,
            images_per_prompt=cfg.images_per_prompt,
            micro_batch=self.config.sampling.micro_batch,
        )
        metrics = result.summary()
        self.history["eval"].append({"step": self.step, "metrics": metrics})
        self.callbacks.on_evaluation(self.step, result)  # every process evaluates (FSDP needs them all)
        return metrics

    def _builtin_callbacks(self, resume: bool) -> list[Callback]:
        """The run's images and logs besides ``metrics.jsonl``, as its config asks for them."""
        cfg, samples = self.config, self.output_dir / "samples"
        callbacks: list[Callback] = []
        if cfg.log.sample_grid_every:
            callbacks.append(RolloutGrids(samples, cfg.log.sample_grid_every, cfg.train.group_size))
        if cfg.log.advantages:
            path = self.output_dir / "advantages.jsonl"
            callbacks.append(AdvantagesLog(path, resume_step=self.step if resume else None))
        if self.heldout:
            references = references_per_subject(self.heldout)
            shown = references[0] if self.num_subjects == 1 else references
            callbacks.append(EvalImages(samples, shown, cfg.eval.images_per_prompt))
        if cfg.log.tensorboard:
            callbacks.append(TensorBoardImages(self.logger))
        return callbacks

    def _resumable_state(self) -> dict[str, Any]:
        """Data position, RNG states, lr schedule and tracker state (small; snapshotted every iteration)."""
        return {
            "sampler": self.sampler.state_dict(),
            "rollout_generator": self.rollout_generator.get_state(),
            "step_generator": self.step_generator.get_state(),
            "rng": rng_state(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "history": copy.deepcopy(self.history),
        }

    def save_checkpoint(self, resumable: dict[str, Any] | None = None) -> Path:
        """Checkpoint ``self.step`` atomically (rank 0 writes; every process must call it).

        ``resumable``: the :meth:`_resumable_state` to store instead of the current one (the state at the
        start of an iteration that failed before its update). A failed write raises
        :class:`CheckpointError` on every process and leaves the previous checkpoint intact."""
        weights = self.dist.trainable_state_dict(self.policy.transformer)
        optimizer = self.dist.optimizer_state_dict(self.policy.transformer, self.optimizer)
        path = self.checkpoint_dir / f"step-{self.step:06d}"
        error: BaseException | None = None
        if self.dist.is_main:
            state = {"optimizer": optimizer, **(resumable or self._resumable_state())}
            try:
                save_checkpoint(
                    self.checkpoint_dir, self.step, weights, state, self.config.checkpoint.keep_last
                )
            except OSError as failure:
                error = failure
        if not self.dist.all_true(error is None):
            previous = [p.name for p in list_checkpoints(self.checkpoint_dir)]
            kept = (
                f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint"
            )
            raise CheckpointError(
                f"could not write checkpoint {path}: {error or 'failed on rank 0'}; {kept}"
            ) from error
        return path

    def _resume(self) -> None:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            if self.dist.is_main:
                log.warning("--resume: no checkpoint in %s; starting fresh", self.checkpoint_dir)
            return
        weights, state = read_checkpoint(path)
        self.dist.load_trainable(self.policy.transformer, weights, path)
        self.dist.load_optimizer_state_dict(self.policy.transformer, self.optimizer, state["optimizer"])
        if "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.rollout_generator.set_state(state["rollout_generator"])
        self.step_generator.set_state(state["step_generator"])
        set_rng_state(state["rng"])
        self.history = state["history"]
        self.step = int(state["step"])
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def save_policy(self, directory: Path) -> None:
        """The trained adapter (or full weights) in the policy's own format, plus the eval history."""
        with self.dist.full_weights(self.policy.transformer):
            if self.dist.is_main:
                if self.config.policy.lora.enabled:
                    self.policy.save_lora(directory)
                else:
                    self.policy.save_pretrained(directory)
                atomic_write_json(directory / "eval_history.json", self.history["eval"])
        self.dist.barrier()


class _NullLogger:
    """The metrics logger of processes other than rank 0: they log nothing."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _nanmean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan


CONFIG = GRPOConfig


def run(
    config: GRPOConfig,
    resume: bool = False,
    max_steps: int | None = None,
    callbacks: list[Callback] | None = None,
) -> dict[str, Any]:
    """The GRPO recipe (:mod:`cgrpo.train.recipe`): Customized-GRPO, or a baseline/ablation by config.

    Returns ``{"base": ..., "trained": ...}``; ``max_steps``: stop after this many more iterations;
    ``callbacks``: user :class:`~cgrpo.train.callbacks.Callback` s."""
    trainer = GRPOTrainer(config, resume=resume, callbacks=callbacks)
    try:
        summary = trainer.train(max_steps=max_steps)
    finally:
        trainer.dist.close()
    return summary
