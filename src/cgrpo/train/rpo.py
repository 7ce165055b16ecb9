"""RPO baseline: offline preference optimisation for subject-driven generation (Miao et al., 2024).

The Customized-GRPO paper compares against RPO in Table 2 and describes its replication in Appendix A.2:
the frozen base model generates candidates, RPO's harmonic-mean reward picks winners and losers, and the
model is fine-tuned with an offline DPO loss plus RPO's similarity loss. What this module implements:

1. **Candidates.** For P (reference, prompt) pairs of the training set (the first P the GRPO trainer with
   the same seed would draw) the frozen base policy (LoRA disabled) draws K samples each: ODE samples from
   K initial noises, or SDE samples (``pairs.sde``) with the GRPO sampler's noise level.
2. **Scores and pairs.** Both rewards score every candidate; their λ-harmonic mean
   ``h = 1 / (λ / r_id + (1 - λ) / r_prompt)`` (RPO's λ-Harmonic reward; λ = 0.5 is the plain harmonic mean
   the Customized-GRPO paper names) ranks the K candidates of a pair, and the best and the worst form one
   preference pair (chosen, rejected) — P pairs at most, pairs whose gap is not above ``pairs.min_margin``
   are dropped.
3. **Loss.** Diffusion-DPO (Wallace et al., 2024) adapted to rectified flow: for a pair with clean latents
   ``x_w``, ``x_l``, one noise level ``sigma`` and one noise shared by both,
   ``x = (1 - sigma) x0 + sigma eps`` and ``u = eps - x0``; with per-sample errors
   ``e = mean ||v(x) - u||^2`` of the policy and of the frozen reference (the base, LoRA disabled)::

       L_dpo = -log sigmoid(-beta / 2 * [(e_w - e_w_ref) - (e_l - e_l_ref)])

   plus RPO's similarity loss, the flow-matching loss of the policy on the *reference image itself* as the
   target, conditioned on the reference and a class prompt (``train.similarity_prompt``, "a dog")::

       L = L_dpo + similarity_weight * L_sim

Where the papers are silent (our choices, all config keys): the number of candidates and pairs, best-vs-worst
pairing, beta, the similarity weight and its prompt, the noise-level distribution (uniform, as
Diffusion-DPO draws timesteps), LoRA on the transformer only, AdamW, steps and batch size. RPO's original
setting (a text-only U-Net fine-tuned per subject on 3-5 reference images with DreamBooth-style class
prompts) does not map one to one onto a reference-conditioned model trained on many subjects; Appendix A.2
says the candidates were generated "conditioned solely on text prompts", which we do not reproduce: the
candidates and the loss are conditioned on (reference, prompt), so that the DPO terms compare images under
the condition the model is trained and evaluated with.

Run: ``cgrpo rpo configs/mini/rpo.yaml [key=value ...] [--resume]``. Outputs under ``output_dir``, as a
GRPO run: ``config.yaml``, ``metrics.jsonl``, ``pairs.pt`` + ``pairs.json`` (the offline preference data,
reused by a re-run with the same settings), ``samples/``, ``checkpoints/step-XXXXXX/`` (every
``checkpoint.every`` training steps), ``final/`` (the LoRA) and ``summary.json`` with held-out rewards of the
base and the trained policy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cgrpo.config import ConfigError, to_dict
from cgrpo.sde import steps_to_mask
from cgrpo.train.callbacks import Callback, CallbackList, EvalImages
from cgrpo.train.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    PolicyConfig,
    RewardsConfig,
    SamplingConfig,
    check_components,
)
from cgrpo.train.flow_matching import SigmaSampling, sample_sigmas

log = logging.getLogger(__name__)

# --- config ------------------------------------------------------------------------------------------


@dataclass
class RPOPairsConfig:
    prompts: int = 480  # (reference, prompt) pairs to build preferences for; 0 = the whole training set
    candidates: int = 8  # K base-policy samples per pair
    sde: bool = False  # False: ODE samples from K noises; True: SDE samples at sampling.noise_level
    harmonic_lambda: float = 0.5  # RPO's λ-harmonic reward; 0.5 = the plain harmonic mean
    reward_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # (id, prompt) before the mean
    min_margin: float = 0.0  # keep a pair only if h(chosen) - h(rejected) > min_margin
    generation_batch: int = 8  # pairs sampled per chunk (K images each)


@dataclass
class RPOTrainConfig:
    steps: int = 200
    batch_size: int = 8  # preference pairs per step
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    beta: float = 1000.0  # DPO inverse temperature on errors averaged over latent dims (not in the paper)
    # RPO's similarity (reference reconstruction) loss weight. At policy = reference the DPO term weighs each
    # error by beta / 4, so beta / 4 puts both terms on an equal footing at the start (papers: no value).
    similarity_weight: float = 250.0
    # {a}: "a"/"an", {subject}: the class; "a photo of {a} {subject}" is DreamBooth's form for real data.
    similarity_prompt: str = "{a} {subject}"
    sigma_sampling: SigmaSampling = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class RPOConfig:
    seed: int = 0
    output_dir: str = "runs/rpo"
    device: str = "cpu"
    method: str = "rpo"  # a label for reports
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # candidates; eval uses its shift
    pairs: RPOPairsConfig = field(default_factory=RPOPairsConfig)
    train: RPOTrainConfig = field(default_factory=RPOTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # eval.every counts training steps here
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # every: training steps

    def validate(self) -> None:
        check_components(self.policy, self.data, self.rewards)
        p, t = self.pairs, self.train
        checks = [
            (p.prompts >= 0, "pairs.prompts", p.prompts, ">= 0 (0 = the whole training set)"),
            (p.candidates >= 2, "pairs.candidates", p.candidates, ">= 2 (a pair needs two samples)"),
            (0.0 <= p.harmonic_lambda <= 1.0, "pairs.harmonic_lambda", p.harmonic_lambda, "in [0, 1]"),
            (
                len(p.reward_scale) == 2 and min(p.reward_scale) > 0,
                "pairs.reward_scale",
                p.reward_scale,
                "two positive numbers (identity, prompt)",
            ),
            (p.min_margin >= 0, "pairs.min_margin", p.min_margin, ">= 0"),
            (p.generation_batch >= 1, "pairs.generation_batch", p.generation_batch, ">= 1"),
            (t.steps >= 0, "train.steps", t.steps, ">= 0"),
            (t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1"),
            (t.lr > 0, "train.lr", t.lr, "> 0"),
            (t.beta > 0, "train.beta", t.beta, "> 0"),
            (t.similarity_weight >= 0, "train.similarity_weight", t.similarity_weight, ">= 0"),
            (t.grad_clip > 0, "train.grad_clip", t.grad_clip, "> 0"),
            (t.logit_std > 0, "train.logit_std", t.logit_std, "> 0"),
            (
                len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
                "train.betas",
                t.betas,
                "two numbers in [0, 1)",
            ),
            (self.sampling.num_steps >= 1, "sampling.num_steps", self.sampling.num_steps, ">= 1"),
            (self.eval.every >= 0, "eval.every", self.eval.every, ">= 0 (0 = only at start and end)"),
            (self.eval.num_steps >= 1, "eval.num_steps", self.eval.num_steps, ">= 1"),
            (self.checkpoint.every >= 0, "checkpoint.every", self.checkpoint.every, ">= 0 (0 = never)"),
            (self.checkpoint.keep_last >= 1, "checkpoint.keep_last", self.checkpoint.keep_last, ">= 1"),
        ]
        for ok, key, value, expected in checks:
            if not ok:
                raise ConfigError(f"{key} = {value!r} is invalid: expected {expected}")
        try:
            t.similarity_prompt.format(a="a", subject="dog")
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigError(
                f"train.similarity_prompt = {t.similarity_prompt!r} is invalid: expected a template with "
                f"only {{a}} and {{subject}} ({error})"
            ) from None


# --- math --------------------------------------------------------------------------------------------


def harmonic_reward(
    r_id: torch.Tensor,
    r_prompt: torch.Tensor,
    lam: float = 0.5,
    scale: Sequence[float] = (1.0, 1.0),
    eps: float = 1e-6,
) -> torch.Tensor:
    """RPO's λ-harmonic reward ``1 / (lam / r_id + (1 - lam) / r_prompt)``, ``[N]`` -> ``[N]``.

    Rewards are multiplied by ``scale`` and floored at ``eps`` (the mean is defined for positive values; a
    zero reward gives a score near zero, as it should). NaN stays NaN. ``lam = 0.5`` is the plain harmonic
    mean ``2 / (1 / a + 1 / b)``; ``lam > 0.5`` leans on identity.
    """
    a = (r_id * scale[0]).clamp_min(eps)
    b = (r_prompt * scale[1]).clamp_min(eps)
    return 1.0 / (lam / a + (1.0 - lam) / b)


@dataclass
class PairSelection:
    """Preference pairs picked from ``[P, K]`` scores; all ``[M]`` long tensors (M <= P).

    ``group``: the pair's row (prompt) in ``[0, P)``; ``chosen``/``rejected``: flat indices into the
    ``P * K`` candidates (row-major); ``margin``: ``[M]`` float score gaps."""

    group: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: torch.Tensor


def select_pairs(scores: torch.Tensor, min_margin: float = 0.0) -> PairSelection:
    """Best vs worst candidate of each row of ``scores`` ``[P, K]``; NaN scores are never picked.

    A row yields a pair only if it has two finite scores whose gap is above ``min_margin`` (equal scores
    express no preference). Ties go to the lowest index."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [P, K] with K >= 2, got {tuple(scores.shape)}")
    finite = torch.isfinite(scores)
    best = torch.where(finite, scores, torch.full_like(scores, -math.inf)).argmax(dim=1)
    worst = torch.where(finite, scores, torch.full_like(scores, math.inf)).argmin(dim=1)
    rows = torch.arange(scores.shape[0])
    margin = scores[rows, best] - scores[rows, worst]
    keep = (finite.sum(dim=1) >= 2) & (margin > min_margin)
    k = scores.shape[1]
    group = rows[keep]
    return PairSelection(group, group * k + best[keep], group * k + worst[keep], margin[keep].float())


def dpo_flow_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO on rectified flow: ``-log sigmoid(-beta / 2 * [(e_w - e_w_ref) - (e_l - e_l_ref)])``.

    All inputs ``[B]``: per-pair squared velocity errors (mean over latent dims) of the policy and of the
    frozen reference on the chosen (w) and rejected (l) sample at a shared noise level and noise. Returns
    (the mean loss, stats ``[B]``: ``logits`` inside the sigmoid; ``accuracy``: 1 where the policy already
    improved the chosen sample more than the rejected). At policy = reference the loss is log 2.
    """
    logits = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    loss = -F.logsigmoid(logits).mean()
    return loss, {"logits": logits.detach(), "accuracy": (logits.detach() > 0).float()}


def velocity_errors(velocity: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``[B, N, C]`` velocities, noise and clean latents -> ``[B]`` mean squared error to ``noise - x0``."""
    return ((velocity.float() - (noise - x0).float()) ** 2).flatten(1).mean(dim=1)


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma noise`` for ``[B, N, C]`` latents and ``sigma [B]``."""
    s = sigma.to(x0)[:, None, None]
    return (1.0 - s) * x0 + s * noise


def class_prompt(template: str, subject_class: str) -> str:
    """The similarity loss's prompt: ``"{a} {subject}"`` with ``a`` the class's article -> ``"an arrow"``."""
    article = "an" if subject_class[:1].lower() in ("a", "e", "i", "o", "u") else "a"
    return template.format(a=article, subject=subject_class)


# --- helpers -----------------------------------------------------------------------------------------


def lora_disabled(policy: Any):
    """Run the policy as its frozen base: the reference model of DPO, the sampler of the candidates."""
    return policy.disable_lora()


@dataclass
class PreferenceData:
    """The offline preference set. ``chosen``/``rejected``: clean latents ``[M, N, C]``; ``examples``: ``[M]``
    training-set indices; rewards ``[M]`` of both samples (for reports)."""

    examples: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_id: torch.Tensor
    chosen_prompt: torch.Tensor
    rejected_id: torch.Tensor
    rejected_prompt: torch.Tensor
    margin: torch.Tensor
    num_prompts: int

    def stats(self) -> dict[str, float]:
        mean = lambda t: float(t.mean()) if len(t) else math.nan  # noqa: E731
        return {
            "pairs/count": float(len(self.examples)),
            "pairs/prompts": float(self.num_prompts),
            "pairs/chosen_id": mean(self.chosen_id),
            "pairs/chosen_prompt": mean(self.chosen_prompt),
            "pairs/rejected_id": mean(self.rejected_id),
            "pairs/rejected_prompt": mean(self.rejected_prompt),
            "pairs/margin": mean(self.margin),
        }


def _pairs_key(config: RPOConfig) -> str:
    """What the preference data depends on; a cached ``pairs.pt`` is reused only when this matches."""
    keys = ("seed", "policy", "data", "rewards", "sampling", "pairs")
    relevant = {k: to_dict(getattr(config, k)) for k in keys}
    relevant["policy"].pop("lora", None)  # candidates come from the base with the adapter disabled
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def build_preferences(
    policy: Any,
    train_set: Any,
    indices: Sequence[int],
    identity_reward: Any,
    prompt_reward: Any,
    config: RPOConfig,
    sigmas: torch.Tensor,
    generator: torch.Generator,
) -> PreferenceData:
    """Sample K candidates per example with the base policy, score them, pick best-vs-worst pairs."""
    from cgrpo.train.sampling import rollout

    p, s = config.pairs, config.sampling
    k = p.candidates
    num_steps = len(sigmas) - 1
    # SDE candidates take the GRPO rollouts' stochastic steps: the first sampling.sde_steps (default all but
    # the last); ODE candidates none.
    count = (num_steps - 1 if s.sde_steps is None else s.sde_steps) if p.sde else 0
    sde_steps = steps_to_mask(torch.arange(count), num_steps)
    latents, r_id, r_prompt = [], [], []
    policy.eval()
    for start in range(0, len(indices), p.generation_batch):
        examples = [train_set[i] for i in indices[start : start + p.generation_batch]]
        references = torch.stack([e.reference for e in examples])
        prompts = [e.prompt for e in examples for _ in range(k)]
        subjects = [e.subject_class for e in examples for _ in range(k)]
        cond = policy.condition([e.prompt for e in examples], references.to(policy.device))
        cond = cond.repeat_interleave(k)
        with lora_disabled(policy):
            trajectory = rollout(
                policy,
                cond,
                sigmas,
                sde_steps,
                generator,
                noise_level=s.noise_level,
                formulation=s.formulation,
                micro_batch=s.micro_batch,
            )
        final = trajectory.final
        images = policy.decode(final.to(policy.device))
        group_refs = references.repeat_interleave(k, dim=0)
        r_id.append(torch.as_tensor(identity_reward(images, group_refs, prompts, subjects)).float().cpu())
        r_prompt.append(torch.as_tensor(prompt_reward(images, group_refs, prompts, subjects)).float().cpu())
        latents.append(final.float().cpu())
    all_latents = torch.cat(latents)
    r_id_all, r_prompt_all = torch.cat(r_id), torch.cat(r_prompt)
    scores = harmonic_reward(r_id_all, r_prompt_all, p.harmonic_lambda, p.reward_scale)
    picked = select_pairs(scores.view(-1, k), p.min_margin)
    index_tensor = torch.as_tensor(list(indices), dtype=torch.long)
    return PreferenceData(
        examples=index_tensor[picked.group],
        chosen=all_latents[picked.chosen],
        rejected=all_latents[picked.rejected],
        chosen_id=r_id_all[picked.chosen],
        chosen_prompt=r_prompt_all[picked.chosen],
        rejected_id=r_id_all[picked.rejected],
        rejected_prompt=r_prompt_all[picked.rejected],
        margin=picked.margin,
        num_prompts=len(indices),
    )


def _load_or_build_preferences(out: Path, key: str, build) -> tuple[PreferenceData, bool]:
    from cgrpo.io import atomic_write, atomic_write_json

    path = out / "pairs.pt"
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored.get("key") == key:
            return PreferenceData(**stored["data"]), True
    data: PreferenceData = build()
    atomic_write(path, lambda tmp: torch.save({"key": key, "data": vars(data)}, tmp))
    atomic_write_json(out / "pairs.json", data.stats())
    return data, False


# --- the run -----------------------------------------------------------------------------------------


def run_rpo(
    config: RPOConfig, resume: bool = False, *, callbacks: list[Callback] | None = None
) -> dict[str, Any]:
    """Generate preference pairs, train with DPO + similarity loss, evaluate; returns the summary
    ``{"base": {...}, "trained": {...}}`` of held-out rewards (also written to ``summary.json``).

    ``resume``: continue the training from the newest checkpoint in ``output_dir/checkpoints`` (if there is
    one). The preference pairs (``pairs.pt``) are reused whenever their settings match, resumed or not.
    ``callbacks``: user :class:`~cgrpo.train.callbacks.Callback` s, called after the built-in ones."""
    from cgrpo.config import save_config
    from cgrpo.io import atomic_write_json
    from cgrpo.train.checkpoint import (
        latest_checkpoint,
        load_weights,
        read_checkpoint,
        remove_stale_temp_dirs,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )
    from cgrpo.train.components import (
        BatchSampler,
        TrainingError,
        build_datasets,
        build_policy,
        build_rewards,
        record_world_version,
    )
    from cgrpo.train.heldout import base_trained_summary, evaluate_heldout
    from cgrpo.train.logger import MetricsLogger
    from cgrpo.train.sampling import schedule

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record_world_version(config.data)
    save_config(config, out / "config.yaml")
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    policy = build_policy(config.policy, str(device))
    params = list(policy.trainable_parameters())
    if not params:
        raise ValueError("the policy has no trainable parameters (enable policy.lora or full training)")
    train_set, heldout = build_datasets(config.data, config.seed)
    identity_reward, prompt_reward = build_rewards(config)  # type: ignore[arg-type]
    sigmas = schedule(policy, config.sampling.num_steps, config.sampling.shift)
    eval_sigmas = schedule(policy, config.eval.num_steps, config.sampling.shift)
    t = config.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    generator = torch.Generator().manual_seed(config.seed + 1)
    history: list[dict[str, Any]] = []
    checkpoint_dir = out / "checkpoints"
    remove_stale_temp_dirs(checkpoint_dir)  # left by a save that was killed
    checkpoint = latest_checkpoint(checkpoint_dir) if resume else None
    start, state = 0, {}
    if checkpoint is not None:
        weights, state = read_checkpoint(checkpoint)
        load_weights(policy.transformer, weights, checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history, start = state["history"], int(state["step"])
        log.info("resumed from %s at step %d", checkpoint, start)
    logger = MetricsLogger(
        out,
        tensorboard=config.log.tensorboard,
        wandb=config.log.wandb,
        resume_step=start if checkpoint is not None else None,
    )
    builtin: list[Callback] = []
    if heldout:
        references = torch.stack([e.reference for e in heldout])
        builtin.append(
            EvalImages(out / "samples", references, config.eval.images_per_prompt, save_tensors=False)
        )
    hooks = CallbackList([*builtin, *(callbacks or [])])

    def log_metrics(step: int, metrics: dict[str, float], echo: bool = True) -> None:
        logger.log(step, metrics, echo=echo)
        hooks.on_log(step, metrics)

    def evaluate(step: int) -> dict[str, float]:
        if not heldout:
            return {}
        policy.eval()  # before evaluate_heldout conditions: no text-encoder dropout in evaluations
        result = evaluate_heldout(
            policy,
            heldout,
            identity_reward,
            prompt_reward,
            eval_sigmas,
            seed=config.eval.seed,
            images_per_prompt=config.eval.images_per_prompt,
            micro_batch=config.sampling.micro_batch,
        )
        metrics = result.summary()
        history.append({"step": step, "metrics": metrics})
        hooks.on_evaluation(step, result)
        return metrics

    hooks.on_train_start(start)
    try:
        # 0. The base policy's held-out rewards (the adapter is zero-initialised: policy == base).
        if checkpoint is None:
            base_metrics = evaluate(0)
            log_metrics(0, {f"eval/{k}": v for k, v in base_metrics.items()}, echo=False)
        else:
            base_metrics = history[0]["metrics"] if history else {}

        # 1-2. Offline preference data from the frozen base: the first P pairs GRPO would draw with this seed.
        count = config.pairs.prompts or len(train_set)
        indices = BatchSampler(len(train_set), count, config.seed).next()
        tic = time.perf_counter()
        data, reused = _load_or_build_preferences(
            out,
            _pairs_key(config),
            lambda: build_preferences(
                policy,
                train_set,
                indices,
                identity_reward,
                prompt_reward,
                config,
                sigmas,
                torch.Generator().manual_seed(config.seed),
            ),
        )
        if checkpoint is None:
            stats = data.stats()
            log_metrics(0, {**stats, "time/pairs": time.perf_counter() - tic, "pairs/reused": float(reused)})
        if len(data.examples) == 0:
            raise TrainingError(
                "no preference pairs: every prompt's candidates scored the same (or NaN); "
                "raise pairs.candidates or lower pairs.min_margin"
            )

        # 3. DPO + similarity loss on the pairs.
        if checkpoint is not None:
            set_rng_state(state["rng"])  # last: nothing between here and the next step draws from it
        for step in range(start + 1, t.steps + 1):
            tic = time.perf_counter()
            # Only the transformer trains: frozen text encoders with dropout (T5) must not drop out here.
            policy.eval()
            policy.transformer.train()
            pick = torch.randint(len(data.examples), (t.batch_size,), generator=generator)
            metrics = _train_step(policy, train_set, data, pick, config, optimizer, params, generator)
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            metrics["time/step"] = time.perf_counter() - tic
            if config.eval.every and step % config.eval.every == 0 and step < t.steps:
                metrics.update({f"eval/{k}": v for k, v in evaluate(step).items()})
            if config.log.every and step % config.log.every == 0 or step == t.steps:
                log_metrics(step, metrics, echo=step == t.steps or step % max(1, t.steps // 10) == 0)
            if config.checkpoint.every and step % config.checkpoint.every == 0 and step < t.steps:
                resumable = {
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "rng": rng_state(),
                    "history": copy.deepcopy(history),
                }
                save_checkpoint(
                    checkpoint_dir, step, policy.transformer, resumable, config.checkpoint.keep_last
                )
        trained_metrics = evaluate(t.steps) if t.steps > 0 or not history else history[-1]["metrics"]
        log_metrics(t.steps, {f"eval/{k}": v for k, v in trained_metrics.items()}, echo=False)
    finally:
        logger.close()

    final = out / "final"
    if config.policy.lora.enabled:
        policy.save_lora(final)
    else:
        policy.save_pretrained(final)
    atomic_write_json(final / "eval_history.json", history)
    summary = base_trained_summary(base_metrics, trained_metrics)
    atomic_write_json(out / "summary.json", summary)
    hooks.on_train_end(summary)
    return summary


def _train_step(
    policy: Any,
    train_set: Any,
    data: PreferenceData,
    pick: torch.Tensor,
    config: RPOConfig,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    generator: torch.Generator,
) -> dict[str, float]:
    """One AdamW step on ``L_dpo + similarity_weight * L_sim`` for the pairs ``pick`` ``[B]``."""
    t = config.train
    device = policy.device
    examples = [train_set[int(i)] for i in data.examples[pick]]
    references = torch.stack([e.reference for e in examples]).to(device)
    b = len(examples)
    cond = policy.condition([e.prompt for e in examples], references)
    x_w, x_l = data.chosen[pick].to(device), data.rejected[pick].to(device)
    # One noise level and one noise per pair, shared by its chosen and rejected sample (Diffusion-DPO).
    sigma = sample_sigmas(b, t.sigma_sampling, t.logit_mean, t.logit_std, generator)
    noise = torch.randn(x_w.shape, generator=generator).to(device)
    x0 = torch.cat([x_w, x_l])
    pair_cond = type(cond).cat([cond, cond])
    pair_sigma, pair_noise = torch.cat([sigma, sigma]), torch.cat([noise, noise])
    x_t = noisy(x0, pair_noise, pair_sigma)
    with torch.no_grad(), lora_disabled(policy):
        ref_err = velocity_errors(policy.velocity(x_t, pair_sigma, pair_cond), pair_noise, x0)
    err = velocity_errors(policy.velocity(x_t, pair_sigma, pair_cond), pair_noise, x0)
    dpo, stats = dpo_flow_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], t.beta)
    loss = dpo
    sim = torch.zeros((), device=device)
    if t.similarity_weight > 0:
        # RPO's similarity loss: reconstruct the reference image itself from (reference, class prompt).
        sim_prompts = [class_prompt(t.similarity_prompt, e.subject_class) for e in examples]
        sim_cond = policy.condition(sim_prompts, references)
        target = policy.encode_images(references)
        sim_sigma = sample_sigmas(b, t.sigma_sampling, t.logit_mean, t.logit_std, generator)
        sim_noise = torch.randn(target.shape, generator=generator).to(device)
        v = policy.velocity(noisy(target, sim_noise, sim_sigma), sim_sigma, sim_cond)
        sim = velocity_errors(v, sim_noise, target).mean()
        loss = dpo + t.similarity_weight * sim
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
    if math.isfinite(grad_norm):  # a non-finite gradient would poison the adapter
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": float(loss.detach()),
        "dpo_loss": float(dpo.detach()),
        "similarity_loss": float(sim.detach()),
        "implicit_accuracy": float(stats["accuracy"].mean()),
        "dpo_logit": float(stats["logits"].mean()),
        "error/chosen": float(err[:b].detach().mean()),
        "error/rejected": float(err[b:].detach().mean()),
        "grad_norm": grad_norm,
    }


CONFIG = RPOConfig


def run(config: RPOConfig, resume: bool = False, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """The RPO recipe (:mod:`cgrpo.train.recipe`): :func:`run_rpo`."""
    return run_rpo(config, resume=resume, callbacks=callbacks)
