"""Supervised flow-matching pretraining of the mini world's base policy (the stand-in for UNO's pretraining).

Rectified flow (Eq. 3-4 of the paper): ``x_sigma = (1 - sigma) x0 + sigma noise`` and the model regresses the
velocity ``noise - x0`` with a mean squared error. ``sigma`` is drawn from a logit-normal distribution
(``sigmoid(N(m, s))``, SD3 / FLUX practice: most samples at mid noise, where the velocity is hardest to
predict and most of the image structure is decided) or uniformly. The transformer and the tiny text encoder
are trained jointly from scratch with AdamW, linear warmup + cosine decay, gradient clipping and an EMA of the
weights; the EMA weights are evaluated (fixed-seed ODE samples of held-out subjects) and saved.

Run: ``cgrpo sft configs/mini/sft.yaml [key=value ...] [--resume]``. Outputs under ``output_dir``:
``config.yaml`` (resolved), ``metrics.jsonl``, ``tensorboard/``, ``samples/step_XXXXXX.png``
(reference | sample | target per row), ``checkpoints/step-XXXXXX/`` (resume state, as a GRPO run's) and
``final/`` (EMA weights, ``save_pretrained`` format).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cgrpo.config import ConfigError, save_config
from cgrpo.data.base import Example
from cgrpo.policy.base import Conditioning
from cgrpo.policy.flux import ReferenceFluxPolicy
from cgrpo.sde import flux_sigmas
from cgrpo.train.callbacks import Callback, CallbackList, PreviewGrids
from cgrpo.train.checkpoint import (
    latest_checkpoint,
    load_weights,
    read_checkpoint,
    remove_stale_temp_dirs,
    save_checkpoint,
    trainable_state_dict,
)
from cgrpo.train.config import DataConfig, LoraConfig, RewardsConfig, check_components
from cgrpo.train.flow_matching import SigmaSampling, sample_sigmas
from cgrpo.train.logger import MetricsLogger
from cgrpo.train.sampling import sample_images
from cgrpo.train.schedule import lr_scheduler
from cgrpo.train.subjects import (
    References,
    SubjectCountError,
    condition_references,
    reference_list,
    references_to,
    subject_count,
)

log = logging.getLogger(__name__)

# --- config ------------------------------------------------------------------------------------------


@dataclass
class SFTDataConfig:
    image_size: int = 32
    num_train_subjects: int = 600
    num_test_subjects: int = 64
    prompts_per_subject: int = 8
    kinds: list[str] | None = None  # prompt kinds to train on; None = the mini world's full mix
    # Keep a drawn property-change prompt with this probability: < 1 makes edits of the subject's look rare
    # in the pre-training data, as they are in real data (the base then explores them rarely, not never).
    property_rate: float = 1.0
    # The share of targets drawn with two identity details redrawn (mark moved, mark or pattern recoloured),
    # as imperfect synthesised pairs are: the base then drifts too, and identity has headroom without copying.
    detail_drift: float = 0.0
    # The share of targets that ignore the prompt and show the subject as in its reference (copy-paste pairs):
    # the base then sometimes ignores prompts, and prompt following has headroom that costs no identity.
    copy_paste: float = 0.0
    # The copy-paste share among prompts that edit the subject's look (null: copy_paste). At 0 the rare edits
    # are never contradicted by a copy (what that does to the base: docs/mini-world.md).
    copy_paste_property: float | None = None
    # The share of text-to-image pairs (no subject reference; the prompt names the body colour): the base then
    # learns what each colour word means from more than the rare recolours, as from text-to-image data.
    text_to_image: float = 0.0
    world_seed: int = 0  # which mini world (subjects) to build
    eval_examples: int = 8  # held-out (test-split) examples sampled into every preview grid
    # A registered dataset exactly as a GRPO config names it (`data:` of configs/mini/customized_grpo.yaml):
    # the SFT baseline then trains on the RL runs' (reference, prompt, target) pairs and is evaluated on their
    # held-out set. When set, the mini-world keys above are ignored.
    dataset: DataConfig | None = None


@dataclass
class SFTModelConfig:
    init: str | None = None  # a policy directory to continue from; None = a random mini policy
    patch_size: int = 4
    # A registered policy to continue from (e.g. "mini" = the committed base, "uno"), built with `options`;
    # takes precedence over `init`. With `lora.enabled` only a fresh LoRA on the transformer is trained (the
    # text encoder stays frozen), as in the GRPO and RPO runs; `final/` then holds the adapter.
    policy: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=False))


@dataclass
class SFTOptimConfig:
    lr: float = 2e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.01  # on matrices only (not biases, norms)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    batch_size: int = 32
    steps: int = 3000
    ema_decay: float = 0.999


@dataclass
class SFTFlowConfig:
    sigma_sampling: SigmaSampling = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class SFTHeldoutConfig:
    """Held-out rewards of the base and the trained policy (``summary.json``), as a GRPO run reports them."""

    enabled: bool = False
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    num_steps: int = 10  # ODE steps (GRPO's eval.num_steps)
    shift: float | None = None  # sigma shift (GRPO's sampling.shift); None = the policy's own schedule
    seed: int = 1234  # GRPO's eval.seed: the same initial noise as the GRPO runs' evaluations
    images_per_prompt: int = 1
    micro_batch: int = 0  # GRPO's sampling.micro_batch (batch composition changes float sums slightly)
    num_subjects: int = 16  # mini world without data.dataset: world.eval_set(num_subjects, prompts_per_kind)
    prompts_per_kind: int = 1


@dataclass
class SFTConfig:
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    optim: SFTOptimConfig = field(default_factory=SFTOptimConfig)
    flow: SFTFlowConfig = field(default_factory=SFTFlowConfig)
    heldout: SFTHeldoutConfig = field(default_factory=SFTHeldoutConfig)
    seed: int = 0
    output_dir: Path = Path("runs/sft")
    log_every: int = 25
    eval_every: int = 250  # EMA eval loss + preview grid; 0 disables
    save_every: int = 500  # resumable checkpoint (output_dir/checkpoints/step-N, the newest kept); 0 disables
    sample_steps: int = 20  # Euler steps of the preview samples
    num_threads: int = 2  # torch CPU threads; 0 keeps torch's default
    progress: bool = True
    # Wall-clock budget: stop early (EMA weights still evaluated and saved) when a shared machine is slower
    # than planned. The cosine schedule is then cut short and the run is no longer step-for-step reproducible.
    max_minutes: float | None = None
    # Stop after this step with the schedule still planned for optim.steps: how a run that max_minutes
    # stopped at step N is repeated step for step (same seed, same num_threads).
    stop_at_step: int | None = None

    def validate(self) -> None:
        # Registered names and their options first: a misspelt one is an error naming its key.
        if self.model.policy is not None:
            from cgrpo import policy as policies

            policies.check(self.model.policy, self.model.options, "model.policy", "model.options")
        if self.data.dataset is not None:
            from cgrpo.data import registry as datasets

            datasets.check(self.data.dataset.name, self.data.dataset.options, "data.dataset")
        check_components(rewards=self.heldout.rewards, prefix="heldout.")
        if self.optim.steps < 1:
            raise ConfigError(f"optim.steps: expected >= 1, got {self.optim.steps}")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.optim.steps:
            raise ConfigError(
                f"stop_at_step: expected between 1 and optim.steps ({self.optim.steps}), "
                f"got {self.stop_at_step}"
            )
        if self.optim.batch_size < 1:
            raise ConfigError(f"optim.batch_size: expected >= 1, got {self.optim.batch_size}")
        if not 0.0 <= self.optim.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay: expected in [0, 1), got {self.optim.ema_decay}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr: expected > 0, got {self.optim.lr}")
        if self.flow.logit_std <= 0:
            raise ConfigError(f"flow.logit_std: expected > 0, got {self.flow.logit_std}")


# --- math --------------------------------------------------------------------------------------------


def flow_matching_loss(
    policy: ReferenceFluxPolicy,
    prompts: Sequence[str],
    references: torch.Tensor,
    targets: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean of ``||v(x_sigma) - (noise - x0)||^2``; gradients reach the transformer *and* the text encoder.

    ``references``/``targets``: ``[B, 3, H, W]`` in [0, 1] (K references of multi-subject examples in any form
    ``policy.condition`` takes); ``sigma``: ``[B]``; ``noise``: ``[B, N, C]``.
    """
    x0 = policy.encode_images(targets)
    embeds, pooled = policy.text_encoder(prompts)
    ref_tokens, ref_ids = policy.encode_references(references)
    text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device)
    cond = Conditioning(embeds, pooled, text_ids, ref_tokens, ref_ids, policy.guidance_tensor(len(prompts)))
    return _velocity_mse(policy, cond, x0, sigma, noise)


def conditioned_flow_matching_loss(
    policy: ReferenceFluxPolicy,
    prompts: Sequence[str],
    references: torch.Tensor,
    targets: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """:func:`flow_matching_loss` through ``policy.condition`` (frozen text encoders): the LoRA fine-tuning
    path, which works for every policy (the mini one, UNO's T5 + CLIP). Same shapes."""
    x0 = policy.encode_images(targets)
    cond = policy.condition(prompts, references_to(references, x0.device))
    return _velocity_mse(policy, cond, x0, sigma, noise)


def _velocity_mse(
    policy: ReferenceFluxPolicy,
    cond: Conditioning,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma noise``; ``mean ||v(x_sigma) - (noise - x0)||^2``."""
    s = sigma.to(x0.device)[:, None, None]
    noise = noise.to(x0.device)
    v = policy.velocity((1.0 - s) * x0 + s * noise, sigma, cond)
    return torch.mean((v - (noise - x0)) ** 2)


# --- helpers -----------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of parameters, with the usual ``(1 + t) / (10 + t)`` warmup of the decay."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = [s.float().clone() for s in state["shadow"]]
        self.num_updates = int(state["num_updates"])


class ExampleBatcher:
    """Shuffled epochs over a dataset drawn with a seeded generator; examples are cached as tensors because
    procedural generation costs more than a training step's share."""

    def __init__(self, dataset: Sequence[Example], batch_size: int, generator: torch.Generator) -> None:
        if len(dataset) == 0:
            raise ValueError("the SFT dataset is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.generator = generator
        self.order = torch.randperm(len(dataset), generator=generator)
        self.position = 0
        self._cache: dict[int, Example] = {}

    def _get(self, index: int) -> Example:
        if index not in self._cache:
            example = self.dataset[index]
            if example.target is None:
                raise ValueError(f"example {example.id} has no target image; SFT needs targets")
            self._cache[index] = example
        return self._cache[index]

    def next(self) -> tuple[list[str], References, torch.Tensor]:
        """(prompts, references ``[B, 3, H, W]`` (all K subjects' for multi-subject examples: see
        :func:`~cgrpo.train.subjects.condition_references`), targets ``[B, 3, H, W]``)."""
        indices = []
        while len(indices) < self.batch_size:
            if self.position == len(self.order):
                self.order = torch.randperm(len(self.dataset), generator=self.generator)
                self.position = 0
            indices.append(int(self.order[self.position]))
            self.position += 1
        examples = [self._get(i) for i in indices]
        return (
            [e.prompt for e in examples],
            condition_references(examples),
            torch.stack([e.target for e in examples]),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order = state["order"]
        self.position = int(state["position"])


def build_mini_data(config: SFTDataConfig, seed: int) -> tuple[Sequence[Example], Sequence[Example]]:
    """(train examples, held-out eval examples) of the mini world."""
    from cgrpo.data.miniworld import MiniWorld

    world = MiniWorld(
        image_size=config.image_size,
        num_train_subjects=config.num_train_subjects,
        num_test_subjects=config.num_test_subjects,
        seed=config.world_seed,
    )
    kinds = list(config.kinds) if config.kinds is not None else None
    train = world.dataset(
        split="train",
        prompts_per_subject=config.prompts_per_subject,
        kinds=kinds,
        seed=seed,
        property_rate=config.property_rate,
        detail_drift=config.detail_drift,
        copy_paste=config.copy_paste,
        text_to_image=config.text_to_image,
        copy_paste_property=config.copy_paste_property,
    )
    # The preview grid: one held-out subject per row, going round the prompt kinds (plain, context, ...).
    held_out = list(world.eval_set(num_subjects=config.eval_examples, prompts_per_kind=1))
    by_subject: dict[str, list[Example]] = {}
    for example in held_out:
        by_subject.setdefault(example.subject_id, []).append(example)
    picked = [options[i % len(options)] for i, options in enumerate(by_subject.values())]
    return train, picked


def _build_policy(config: SFTConfig) -> ReferenceFluxPolicy:
    if config.model.policy is not None:
        from cgrpo import policy as policies

        return policies.build(config.model.policy, **config.model.options)  # type: ignore[return-value]
    if config.model.init is not None:
        return ReferenceFluxPolicy.from_pretrained(config.model.init)
    from cgrpo.policy.mini import build_mini_policy

    return build_mini_policy(
        seed=config.seed, image_size=config.data.image_size, patch_size=config.model.patch_size
    )


def _param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for module in modules:
        for _name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class SFTPreview:
    """An SFT evaluation: fixed-seed metrics and ODE samples of the preview examples (``[E, 3, H, W]``);
    ``references``: ``[E, 3, H, W]``, or a list of K such tensors for multi-subject examples."""

    metrics: dict[str, float]
    references: torch.Tensor | list[torch.Tensor]
    images: torch.Tensor
    targets: torch.Tensor


@torch.no_grad()
def evaluate(
    policy: ReferenceFluxPolicy,
    examples: Sequence[Example],
    flow: SFTFlowConfig,
    seed: int,
    sample_steps: int,
    loss_fn: Any = None,
) -> SFTPreview:
    """Fixed-seed eval loss and ODE samples of held-out examples."""
    prompts = [e.prompt for e in examples]
    references = condition_references(examples)
    targets = torch.stack([e.target for e in examples])
    generator = torch.Generator().manual_seed(seed)
    n, c = policy.latent_shape
    sigma = sample_sigmas(len(examples), flow.sigma_sampling, flow.logit_mean, flow.logit_std, generator)
    noise = torch.randn(len(examples), n, c, generator=generator)
    loss = (loss_fn or flow_matching_loss)(policy, prompts, references, targets, sigma, noise)
    cond = policy.condition(prompts, references)
    # The previews keep their plain schedule (no shift) and draw their noise after the loss's.
    noise = policy.initial_noise(len(examples), generator)
    images = sample_images(policy, cond, flux_sigmas(sample_steps, shift=1.0), noise)
    metrics = {
        "eval/loss": float(loss),
        "eval/sample_mse": float(torch.mean((images - targets.to(images.device)) ** 2)),
    }
    shown = reference_list(references)
    return SFTPreview(metrics, shown[0] if len(shown) == 1 else shown, images.cpu(), targets)


def _trained_weights(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``modules`` (full weights, or the LoRA), keyed ``<module>.<parameter>``."""
    return {
        f"{name}.{k}": v for name, module in modules.items() for k, v in trainable_state_dict(module).items()
    }


def _load_trained_weights(
    modules: dict[str, nn.Module], weights: dict[str, torch.Tensor], source: Path
) -> None:
    for name, module in modules.items():
        prefix = f"{name}."
        load_weights(
            module, {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, source
        )


def _train_mode(policy: ReferenceFluxPolicy, lora: bool):
    """What ``policy.train()`` means here. With LoRA only the transformer trains: frozen text encoders (and
    the VAE) stay in eval mode, so a T5 with dropout does not condition on randomly dropped embeddings."""

    def train_mode() -> None:
        if lora:
            policy.eval()
            policy.transformer.train()
        else:
            policy.train()

    return train_mode


class _Heldout:
    """Held-out rewards of the base and the trained policy, with the GRPO runs' sampler and seed."""

    def __init__(
        self, config: SFTConfig, policy: ReferenceFluxPolicy, examples: Sequence[Example] | None
    ) -> None:
        from cgrpo.train.components import build_rewards
        from cgrpo.train.sampling import schedule

        h = config.heldout
        if examples is None:
            from cgrpo.data.miniworld import MiniWorld

            d = config.data
            world = MiniWorld(d.image_size, d.num_train_subjects, d.num_test_subjects, seed=d.world_seed)
            examples = world.eval_set(num_subjects=h.num_subjects, prompts_per_kind=h.prompts_per_kind)
        self.examples = list(examples)
        self.config = h
        self.policy = policy
        self.identity, self.prompt = build_rewards(h)  # type: ignore[arg-type]
        self.sigmas = schedule(policy, h.num_steps, h.shift)

    def evaluate(self) -> dict[str, float]:
        from cgrpo.train.heldout import evaluate_heldout

        h = self.config
        if not self.examples:  # a dataset without held-out data: the summary says so
            return {}
        # evaluate_heldout conditions before it switches to eval mode: frozen text encoders with dropout
        # (T5) would otherwise draw random embeddings from the global RNG.
        training = self.policy.transformer.training
        self.policy.eval()
        result = evaluate_heldout(
            self.policy,
            self.examples,
            self.identity,
            self.prompt,
            self.sigmas,
            h.seed,
            h.images_per_prompt,
            micro_batch=h.micro_batch,
        )
        self.policy.transformer.train(training)
        return result.summary()

    def base(self, out: Path, log_metrics: Callable[[int, dict[str, float]], None], fresh: bool) -> None:
        """Score the policy before training (a resumed run keeps the scores of its start)."""
        from cgrpo.io import atomic_write_json

        path = out / "heldout_base.json"
        if fresh or not path.is_file():
            if not fresh:
                raise FileNotFoundError(f"{path} is missing: cannot report the base of a resumed SFT run")
            metrics = self.evaluate()
            atomic_write_json(path, metrics)
            if metrics:
                log_metrics(0, {f"eval/{k}": v for k, v in metrics.items()})
        self.base_metrics = json.loads(path.read_text())

    def trained(
        self, out: Path, log_metrics: Callable[[int, dict[str, float]], None], step: int
    ) -> dict[str, Any]:
        """Score the trained policy and write ``summary.json``; returns the summary."""
        from cgrpo.io import atomic_write_json
        from cgrpo.train.heldout import base_trained_summary

        metrics = self.evaluate()
        if metrics:
            log_metrics(step, {f"eval/{k}": v for k, v in metrics.items()})
        summary = base_trained_summary(self.base_metrics, metrics)
        atomic_write_json(out / "summary.json", summary)
        return summary


# --- the run -----------------------------------------------------------------------------------------


def run_sft(
    config: SFTConfig,
    resume: bool = False,
    *,
    policy: ReferenceFluxPolicy | None = None,
    train_data: Sequence[Example] | None = None,
    eval_data: Sequence[Example] | None = None,
    heldout_data: Sequence[Example] | None = None,
    callbacks: list[Callback] | None = None,
) -> Path:
    """Train, then return the directory of the final EMA weights (``output_dir/final``).

    ``policy``/``train_data``/``eval_data`` replace the mini world and the random mini policy (tests, other
    datasets). ``resume``: continue from the newest checkpoint in ``output_dir/checkpoints`` (if there is
    one).
    Deterministic on CPU for ``config.seed``, including across a resume.

    With ``heldout.enabled`` the base (before the first step) and the final EMA policy are scored with both
    rewards on ``heldout_data`` (default: ``data.dataset``'s held-out set, else the mini world's
    ``eval_set``) and ``summary.json`` gets ``{"base": ..., "trained": ...}`` as a GRPO run writes it.
    ``callbacks``: user :class:`~cgrpo.train.callbacks.Callback` s (``on_evaluation`` gets an
    :class:`SFTPreview`), called after the built-in preview grids.
    """
    from tqdm.auto import tqdm

    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from cgrpo.train.components import record_world_version

    record_world_version(config.data.dataset)
    save_config(config, out / "config.yaml")

    if train_data is None and config.data.dataset is not None:
        from cgrpo.train.components import build_datasets

        train_data, dataset_heldout = build_datasets(config.data.dataset, config.seed)
        heldout_data = dataset_heldout if heldout_data is None else heldout_data
        eval_data = dataset_heldout[: config.data.eval_examples] if eval_data is None else eval_data
    if train_data is None:
        train_data, default_eval = build_mini_data(config.data, config.seed)
        eval_data = default_eval if eval_data is None else eval_data
    eval_data = list(eval_data or [])
    # Every example conditions on all its subjects' references: a batch needs one number of them.
    subjects = subject_count(train_data, "SFT training")
    preview_subjects = subject_count(eval_data, "SFT preview") if eval_data else subjects
    if preview_subjects != subjects:
        raise SubjectCountError(
            f"the SFT preview examples have {preview_subjects} subject(s) each, the training examples "
            f"{subjects}; both must have the same number"
        )

    lora = config.model.lora
    checkpoint_dir = out / "checkpoints"
    remove_stale_temp_dirs(checkpoint_dir)  # left by a save that was killed
    checkpoint = latest_checkpoint(checkpoint_dir) if resume else None
    policy = _build_policy(config) if policy is None else policy
    if lora.enabled:
        # Only a fresh adapter on the transformer learns; text encoders stay frozen (as in GRPO and RPO).
        if not policy.has_lora:
            policy.add_lora(lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        trained = {"transformer": policy.transformer}
        loss_fn = conditioned_flow_matching_loss
    else:
        policy.requires_grad_(True)
        trained = {"transformer": policy.transformer, "text_encoder": policy.text_encoder}
        loss_fn = flow_matching_loss
    modules = list(trained.values())
    train_mode = _train_mode(policy, lora.enabled)
    train_mode()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    heldout = _Heldout(config, policy, heldout_data) if config.heldout.enabled else None

    optim = config.optim
    optimizer = torch.optim.AdamW(_param_groups(modules, optim.weight_decay), lr=optim.lr, betas=optim.betas)
    scheduler = lr_scheduler(optimizer, "cosine", optim.warmup_steps, optim.steps, optim.min_lr_ratio)
    ema = EMA(params, optim.ema_decay)
    generator = torch.Generator().manual_seed(config.seed)
    batcher = ExampleBatcher(train_data, optim.batch_size, generator)
    start = 0
    if checkpoint is not None:
        weights, state = read_checkpoint(checkpoint)
        _load_trained_weights(trained, weights, checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        batcher.load_state_dict(state["batcher"])
        generator.set_state(state["generator"])
        start = int(state["step"])

    logger = MetricsLogger(out, resume_step=start if checkpoint is not None else None)
    hooks = CallbackList([PreviewGrids(out / "samples"), *(callbacks or [])])

    def log_metrics(step: int, metrics: dict[str, float]) -> None:
        logger.log(step, metrics, echo=False)
        hooks.on_log(step, metrics)

    n_tokens, channels = policy.latent_shape
    flow = config.flow
    window: list[float] = []
    tick = started = time.perf_counter()
    done = start
    last_eval = -1

    def run_eval(step: int) -> None:
        if not eval_data:
            return
        policy.eval()
        with ema.swapped():
            preview = evaluate(
                policy, eval_data, config.flow, config.seed + 1, config.sample_steps, loss_fn=loss_fn
            )
        train_mode()
        hooks.on_evaluation(step, preview)
        log_metrics(step, preview.metrics)
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in preview.metrics.items()))

    hooks.on_train_start(start)
    if heldout is not None:
        heldout.base(out, log_metrics, fresh=start == 0)

    bar = tqdm(
        range(start, optim.steps),
        initial=start,
        total=optim.steps,
        disable=not config.progress,
        mininterval=5.0,
    )
    for step in bar:
        prompts, references, targets = batcher.next()
        sigma = sample_sigmas(len(prompts), flow.sigma_sampling, flow.logit_mean, flow.logit_std, generator)
        noise = torch.randn(len(prompts), n_tokens, channels, generator=generator)
        loss = loss_fn(policy, prompts, references, targets, sigma, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update()
        window.append(float(loss.detach()))

        done = step + 1
        if done % config.log_every == 0 or done == optim.steps:
            now = time.perf_counter()
            metrics = {
                "train/loss": sum(window) / len(window),
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": float(grad_norm),
                "train/steps_per_s": len(window) / max(now - tick, 1e-9),
            }
            log_metrics(done, metrics)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            window = []
        if config.eval_every and (done % config.eval_every == 0 or done == optim.steps):
            run_eval(done)
            last_eval = done
        if config.save_every and done % config.save_every == 0 and done < optim.steps:
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict(),
                "batcher": batcher.state_dict(),
                "generator": generator.get_state(),
            }
            # The trained weights only: the rest is rebuilt from the config on resume (UNO's is ~24 GB).
            save_checkpoint(checkpoint_dir, done, _trained_weights(trained), state, keep_last=1)
        if done % config.log_every == 0:
            tick = time.perf_counter()  # restart the clock after evals and saves: they are not training steps

        stop_reason = None
        if config.max_minutes is not None and time.perf_counter() - started > 60.0 * config.max_minutes:
            stop_reason = f"max_minutes={config.max_minutes} reached"
        elif config.stop_at_step is not None and config.stop_at_step <= done < optim.steps:
            stop_reason = "stop_at_step"
        if stop_reason is not None:
            log_metrics(done, {"train/stopped_early": 1.0})
            log.info("stopping at step %d: %s", done, stop_reason)
            break
    bar.close()
    if config.eval_every and last_eval != done:
        run_eval(done)

    final = out / "final"
    policy.eval()
    with ema.swapped():
        if lora.enabled:
            policy.save_lora(final)  # the adapter only, as GRPO and RPO runs save theirs
        else:
            policy.save_pretrained(final)  # atomic (temp dir + rename)
        summary = {} if heldout is None else heldout.trained(out, log_metrics, done)  # last: marks the end
    logger.close()
    hooks.on_train_end(summary)
    return final


CONFIG = SFTConfig


def run(config: SFTConfig, resume: bool = False, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """The SFT recipe (:mod:`cgrpo.train.recipe`): :func:`run_sft`, then the held-out summary (``{}`` without
    ``heldout.enabled``)."""
    run_sft(config, resume, callbacks=callbacks)
    summary = Path(config.output_dir) / "summary.json"
    return json.loads(summary.read_text()) if config.heldout.enabled else {}
