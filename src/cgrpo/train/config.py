"""The GRPO run configuration: typed dataclasses, loaded from YAML with dotted overrides.

Each field's comment says what it controls; `validate()` rejects impossible values naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from cgrpo.config import ConfigError


@dataclass
class LoraConfig:
    enabled: bool = True
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the policy's default (attention + MLP projections)


@dataclass
class PolicyConfig:
    name: str = "mini"  # registered policy: mini | uno | flux-kontext | flux2-klein
    options: dict[str, Any] = field(default_factory=dict)  # passed to the policy factory (paths, dtype, ...)
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    name: str = "mini"  # registered dataset: mini | jsonl | dreambench
    options: dict[str, Any] = field(default_factory=dict)
    validate: bool = True  # check every file of a jsonl/folder dataset before the first iteration


@dataclass
class RewardConfig:
    name: str = "mini_id"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardsConfig:
    identity: RewardConfig = field(default_factory=lambda: RewardConfig("mini_id"))
    prompt: RewardConfig = field(default_factory=lambda: RewardConfig("mini_prompt"))
    max_retries: int = 3  # a reward that raises is retried with backoff, then the run checkpoints and exits
    retry_backoff_s: float = 1.0  # first wait; doubles after every failed attempt
    timeout_s: float = 0.0  # a call that takes longer counts as a failure (and is retried); 0 = no limit


@dataclass
class AdvantageConfig:
    std: Literal["group", "global"] = "group"  # Eq. 8 per group, or Flow-GRPO's batch-wide std
    eps: float = 1e-6
    synergy: Literal["tanh", "min", "max", "harmonic", "none", "linear"] = "tanh"  # SARS term, Eq. 10
    alpha: float = 0.5  # synergy coefficient, Eq. 11
    schedule: Literal["paper", "static", "inverted", "linear"] = "paper"  # TDW, Eq. 12
    w_max: float = 0.7
    w_min: float = 0.3
    ratio: list[float] = field(default_factory=lambda: [1.0, 1.0])  # w_id : w_prompt for `static`
    t_c: float | None = None  # TDW centre; None = 14/25 of T (not given in the paper)
    lam: float = 0.8  # TDW sigmoid slope at T=25 (not given in the paper)
    # Several subjects per image (one identity advantage each): how SARS combines them (cgrpo.advantage.
    # multi_sars): `mean` / `weakest` aggregate the identity advantages, `pairwise` shapes every pair.
    multi_subject: Literal["mean", "weakest", "pairwise"] = "mean"


@dataclass
class SamplingConfig:
    num_steps: int = 10  # T, denoising steps of a rollout
    noise_level: float = 0.7  # SDE noise (Flow-GRPO's `a`, DanceGRPO's / CPS's `eta`)
    # Stochastic steps are the first `sde_steps` (None = all but the last); the rest run as an ODE so
    # the final image carries no injected noise (MixGRPO's idea, fixed window). Trained steps come from these.
    sde_steps: int | None = None
    formulation: Literal["flow_grpo", "dance_grpo", "cps"] = "flow_grpo"
    shift: float | None = None  # static sigma shift; None = the policy's own schedule (else FLUX's dynamic)
    guidance: float | None = None  # for guidance-distilled backbones (FLUX.1-dev: 3.5 in UNO)
    micro_batch: int = 0  # rollout forward batch; 0 = the whole group batch at once


@dataclass
class TrainConfig:
    iterations: int = 150
    prompts_per_iteration: int = 4  # B (reference, prompt) pairs per iteration
    group_size: int = 8  # G images per pair
    train_steps: int = 5  # k denoising steps trained per iteration
    step_selection: Literal["random", "all", "window"] = "random"
    window_size: int = 4  # for `window` (MixGRPO's sliding SDE window)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    clip_range: float = 1e-4  # ratio clip (Flow-GRPO's default; log-probs are means over many dims)
    # The per-step log-probability of the ratio: `gaussian`, the transition's log-density; `squared_error`,
    # Flow-GRPO's CPS surrogate -mean((x_next - mean)^2), i.e. each step's log-ratio times 2 std_t^2, which
    # evens out the steps' gradients (the density's grow as 1/std_t toward the clean end).
    log_prob: Literal["gaussian", "squared_error"] = "gaussian"
    adv_clip: float = 5.0  # advantages are clamped to [-adv_clip, adv_clip]
    kl_coef: float = 0.0  # KL to the frozen base policy (off by default, as in the paper)
    inner_epochs: int = 1  # optimisation passes over one rollout batch
    micro_batch: int = 0  # training forward batch; 0 = all N samples at once
    optimizer_step: Literal["iteration", "timestep"] = "iteration"  # one AdamW step per iteration or per t
    lr_schedule: Literal["constant", "warmup", "cosine"] = "constant"  # per iteration; saved in checkpoints
    warmup_iterations: int = 0  # linear warmup from lr / warmup_iterations to lr (warmup and cosine)
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at the last iteration
    compile: bool = False  # torch.compile the transformer (GPU; on CPU it needs a C++ compiler and warms up)


@dataclass
class EvalConfig:
    """How the held-out set is evaluated; the set itself is the dataset's (``data.options.eval`` of the mini
    world, ``data.options.eval_path`` of a JSONL dataset)."""

    # Keys of earlier releases that were never read, and where their setting lives (cgrpo.config.from_dict).
    removed_keys: ClassVar[dict[str, str]] = {
        "num_subjects": "data.options.eval.num_subjects (the mini world's held-out subjects)",
        "prompts_per_kind": "data.options.eval.prompts_per_kind (the mini world's held-out prompts)",
    }

    every: int = 25  # iterations between held-out evaluations (0 = only at start and end)
    images_per_prompt: int = 1
    num_steps: int = 10  # ODE steps for evaluation samples
    seed: int = 1234


@dataclass
class LogConfig:
    every: int = 1
    sample_grid_every: int = 50  # iterations between PNG grids of training rollouts (0 = never)
    advantages: bool = True  # per-sample A_id, A_prompt to advantages.jsonl (`cgrpo analyze conflict`)
    tensorboard: bool = True
    wandb: bool = False


@dataclass
class CheckpointConfig:
    every: int = 50  # iterations between checkpoints (0 = only at the end)
    keep_last: int = 2


@dataclass
class DistributedConfig:
    """Multi-process training (docs/scaling.md). Launching with ``accelerate launch`` or ``torchrun`` with
    more than one process turns it on by itself; ``enabled: true`` also uses accelerate for one process."""

    enabled: bool = False
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: DDP for LoRA, FSDP for full fine-tuning
    find_unused_parameters: bool = False  # DDP: needed only if some trained parameter gets no gradient
    timeout_s: float = 1800.0  # collective timeout (a rank stuck in a reward server fails the run then)


@dataclass
class GRPOConfig:
    seed: int = 0
    output_dir: str = "runs/grpo"
    device: str = "cpu"
    method: str = "customized_grpo"  # a label for reports
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        check_components(self.policy, self.data, self.rewards)
        t, s = self.train, self.sampling
        _require(t.group_size >= 2, "train.group_size", t.group_size, "at least 2 (advantages are relative)")
        _require(t.prompts_per_iteration >= 1, "train.prompts_per_iteration", t.prompts_per_iteration, ">= 1")
        _require(s.num_steps >= 2, "sampling.num_steps", s.num_steps, ">= 2")
        # The last step (to sigma = 0) has no SDE noise, so at most T - 1 steps can be trained.
        _require(
            1 <= t.train_steps <= s.num_steps - 1,
            "train.train_steps",
            t.train_steps,
            f"between 1 and sampling.num_steps - 1 = {s.num_steps - 1}",
        )
        _require(t.iterations >= 0, "train.iterations", t.iterations, ">= 0")
        _require(t.lr > 0, "train.lr", t.lr, "> 0")
        _require(t.clip_range > 0, "train.clip_range", t.clip_range, "> 0")
        _require(t.adv_clip > 0, "train.adv_clip", t.adv_clip, "> 0")
        _require(t.inner_epochs >= 1, "train.inner_epochs", t.inner_epochs, ">= 1")
        _require(s.noise_level > 0, "sampling.noise_level", s.noise_level, "> 0 (GRPO needs SDE rollouts)")
        if s.formulation == "cps":
            _require(s.noise_level <= 1, "sampling.noise_level", s.noise_level, "<= 1 (cps's eta)")
        a = self.advantage
        _require(a.alpha >= 0, "advantage.alpha", a.alpha, ">= 0")
        _require(
            0 <= a.w_min <= a.w_max <= 1,
            "advantage.w_min/w_max",
            (a.w_min, a.w_max),
            "0 <= w_min <= w_max <= 1",
        )
        _require(
            len(a.ratio) == 2 and min(a.ratio) >= 0 and sum(a.ratio) > 0,
            "advantage.ratio",
            a.ratio,
            "two non-negative numbers w_id, w_prompt",
        )
        _require(
            len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
            "train.betas",
            t.betas,
            "two numbers in [0, 1)",
        )
        _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
        _require(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "> 0")
        _require(t.kl_coef >= 0, "train.kl_coef", t.kl_coef, ">= 0")
        _require(t.micro_batch >= 0, "train.micro_batch", t.micro_batch, ">= 0 (0 = all at once)")
        _require(s.micro_batch >= 0, "sampling.micro_batch", s.micro_batch, ">= 0 (0 = all at once)")
        _require(s.shift is None or s.shift > 0, "sampling.shift", s.shift, "> 0 or null")
        _require(t.warmup_iterations >= 0, "train.warmup_iterations", t.warmup_iterations, ">= 0")
        _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "between 0 and 1")
        n_sde = s.num_steps - 1 if s.sde_steps is None else s.sde_steps
        _require(
            1 <= n_sde <= s.num_steps - 1,
            "sampling.sde_steps",
            s.sde_steps,
            f"between 1 and {s.num_steps - 1}",
        )
        if t.step_selection != "window":
            _require(
                t.train_steps <= n_sde,
                "train.train_steps",
                t.train_steps,
                f"at most sampling.sde_steps = {n_sde}",
            )
        if t.step_selection == "window":
            _require(
                1 <= t.window_size <= s.num_steps - 1,
                "train.window_size",
                t.window_size,
                f"between 1 and sampling.num_steps - 1 = {s.num_steps - 1}",
            )
        _require(a.eps >= 0, "advantage.eps", a.eps, ">= 0")
        r = self.rewards
        _require(r.max_retries >= 0, "rewards.max_retries", r.max_retries, ">= 0")
        _require(r.retry_backoff_s >= 0, "rewards.retry_backoff_s", r.retry_backoff_s, ">= 0")
        _require(r.timeout_s >= 0, "rewards.timeout_s", r.timeout_s, ">= 0 (0 = no limit)")
        e = self.eval
        _require(e.every >= 0, "eval.every", e.every, ">= 0 (0 = only at start and end)")
        _require(e.images_per_prompt >= 1, "eval.images_per_prompt", e.images_per_prompt, ">= 1")
        _require(e.num_steps >= 1, "eval.num_steps", e.num_steps, ">= 1")
        _require(self.log.every >= 0, "log.every", self.log.every, ">= 0")
        _require(
            self.checkpoint.every >= 0, "checkpoint.every", self.checkpoint.every, ">= 0 (0 = at the end)"
        )
        _require(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", self.checkpoint.keep_last, ">= 1")
        d = self.distributed
        _require(d.timeout_s > 0, "distributed.timeout_s", d.timeout_s, "> 0")


def check_components(
    policy: PolicyConfig | None = None,
    data: DataConfig | None = None,
    rewards: RewardsConfig | None = None,
    prefix: str = "",
) -> None:
    """Check the registered names and the options of a config's components before any is built: a misspelt
    name or option is a :class:`ConfigError` naming its key (``rewards.prompt.name``), not a traceback later.
    ``prefix`` is where the sections sit in the config (``heldout.`` for SFT's rewards)."""
    # Imported here: the registries load their built-in components (diffusers, transformers) on first use.
    if policy is not None:
        from cgrpo import policy as policies

        policies.check(policy.name, policy.options, f"{prefix}policy.name", f"{prefix}policy.options")
    if data is not None:
        from cgrpo.data import registry as datasets

        datasets.check(data.name, data.options, f"{prefix}data")
    if rewards is not None:
        from cgrpo import rewards as reward_registry

        for role in ("identity", "prompt"):
            reward = getattr(rewards, role)
            reward_registry.check(reward.name, reward.options, f"{prefix}rewards.{role}")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: expected {expected}")
