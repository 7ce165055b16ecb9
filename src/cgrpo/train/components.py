"""Builds the run's parts from a config: policy, datasets, rewards, the batch sampler."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from cgrpo import policy as policies
from cgrpo import rewards as reward_registry
from cgrpo.advantage import group_normalize, group_normalize_columns, multi_sars, tdw_weights
from cgrpo.data.base import Example, SubjectDataset
from cgrpo.policy.base import Policy
from cgrpo.rewards.base import Reward
from cgrpo.train.config import DataConfig, GRPOConfig, PolicyConfig


def build_policy(config: PolicyConfig, device: str = "cpu") -> Policy:
    policy = policies.build(config.name, **config.options)
    policy.requires_grad_(False)
    if config.lora.enabled:
        policy.add_lora(config.lora.rank, config.lora.alpha, config.lora.dropout, config.lora.target_modules)
    else:
        policy.transformer.requires_grad_(True)
    if config.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy.to(device)


def record_world_version(config: DataConfig | None) -> None:
    """Write the mini world's version into ``config`` (and so into the run's ``config.yaml``) if unset."""
    if config is not None and config.name == "mini":
        from cgrpo.data.miniworld import WORLD_VERSION

        config.options.setdefault("version", WORLD_VERSION)
        if config.options.get("subjects", 1) > 1:  # scenes: their grammar's version too
            from cgrpo.data.miniworld import SCENE_VERSION

            config.options.setdefault("scene_version", SCENE_VERSION)


def normalized_advantages(
    config: GRPOConfig, r_ids: torch.Tensor, r_prompt: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8 under ``config.advantage``: identity rewards ``[N, K]`` (each subject's column on its own) and
    prompt rewards ``[N]`` normalised inside their groups of ``train.group_size``; ``valid`` masks samples."""
    a, G = config.advantage, config.train.group_size
    a_ids = group_normalize_columns(r_ids, G, eps=a.eps, std=a.std, valid=valid)
    return a_ids, group_normalize(r_prompt, G, eps=a.eps, std=a.std, valid=valid)


def shaped_advantages(
    config: GRPOConfig, a_ids: torch.Tensor, a_prompt: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    """``[N, k]``: SARS (Eq. 10-11; n-objective with K > 1 subjects) of the normalised advantages with TDW's
    weights (Eq. 12) for the real denoising ``steps`` ``[k]``, under ``config.advantage``."""
    a = config.advantage
    w_id, w_prompt = tdw_weights(
        steps,
        config.sampling.num_steps,
        schedule=a.schedule,
        w_max=a.w_max,
        w_min=a.w_min,
        t_c=a.t_c,
        lam=a.lam,
        ratio=tuple(a.ratio),
    )
    return multi_sars(
        a_ids,
        a_prompt,
        w_id[None, :],
        w_prompt[None, :],
        alpha=a.alpha,
        synergy=a.synergy,
        mode=a.multi_subject,
    )


def build_datasets(config: DataConfig, seed: int) -> tuple[SubjectDataset, list[Example]]:
    """(training dataset, held-out evaluation examples)."""
    options = dict(config.options)
    if config.name == "mini":
        world, train_options, eval_options = mini_world(options)
        train = world.dataset("train", seed=seed, **train_options)
        heldout = list(world.eval_set(**eval_options))
        return train, heldout
    from cgrpo.data.registry import DATASETS

    eval_path = options.pop("eval_path", None)
    train = DATASETS.build(config.name, **options)
    heldout = list(DATASETS.build(config.name, **{**options, "path": eval_path})) if eval_path else []
    return train, heldout


def mini_world(options: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A config's mini world (``data.options`` of ``name: mini``): the world, and the options of its
    training set (``train``) and of its held-out set (``eval``)."""
    from cgrpo.data.miniworld import MiniWorld

    options = dict(options)
    eval_options = options.pop("eval", {})
    train_options = options.pop("train", {})
    return MiniWorld(**options), train_options, eval_options


def use_policy_references(dataset: Any, policy: Any) -> list[Hashable] | None:
    """Let a dataset of files hand its references to ``policy.prepare_references`` when the policy keeps
    each reference's own size (UNO, Kontext, FLUX.2 [klein]); returns the batch sampler's bucket keys then
    (the references' original sizes), else None: the dataset and its batches stay exactly as they were."""
    if not getattr(policy, "own_reference_sizes", False) or not hasattr(dataset, "prepare_references_with"):
        return None
    dataset.prepare_references_with(policy.prepare_references)
    return [dataset.reference_size_key(i) for i in range(len(dataset))]


def build_rewards(config: GRPOConfig) -> tuple[Reward, Reward]:
    identity = reward_registry.build(config.rewards.identity.name, **config.rewards.identity.options)
    prompt = reward_registry.build(config.rewards.prompt.name, **config.rewards.prompt.options)
    for reward, name in ((identity, config.rewards.identity.name), (prompt, config.rewards.prompt.name)):
        if not hasattr(reward, "name"):  # a plain function: error messages name it by its registry name
            with contextlib.suppress(AttributeError):
                reward.name = name
    return identity, prompt


class TrainingError(RuntimeError):
    """A run cannot go on for a reason the user must fix; ``cgrpo train`` prints the message and exits 2."""


class RewardFailure(TrainingError):
    """A reward kept failing after all retries; the trainer checkpoints and exits with this message."""


class CheckpointError(TrainingError):
    """A checkpoint could not be written (disk full, permission denied); the previous one is intact."""


def validate_data(config: DataConfig) -> None:
    """Check every file of a ``jsonl`` (JSONL file or folder) dataset and its held-out set before training.

    Raises one :class:`~cgrpo.data.formats.DatasetError` naming every offending file and line (missing,
    unreadable or corrupt images, wrong mode or size, empty prompts, duplicate ids, ...).
    """
    if not config.validate or config.name != "jsonl":
        return
    from cgrpo.data.validate import validate_dataset

    options = config.options
    for key in ("path", "eval_path"):
        if options.get(key):
            validate_dataset(options[key], options.get("image_size"), split=options.get("split"))


def score_with_retries(
    reward: Reward,
    images: torch.Tensor,
    references: torch.Tensor,
    prompts: Sequence[str],
    subjects: Sequence[str],
    max_retries: int,
    backoff_s: float,
    timeout_s: float = 0.0,
) -> torch.Tensor:
    """Call ``reward``; on an exception (or a call longer than ``timeout_s`` > 0) retry with exponential
    backoff, then raise :class:`RewardFailure`. A timed-out call cannot be interrupted: it is abandoned
    in its thread and its result ignored."""

    def scores_of(value: Any) -> torch.Tensor:
        scores = torch.as_tensor(value, dtype=torch.float32).reshape(-1).cpu()
        if len(scores) != len(prompts):
            raise ValueError(f"returned {len(scores)} scores for {len(prompts)} images")
        return scores

    args = (images, references, prompts, subjects)
    return _retrying(reward, reward, args, scores_of, max_retries, backoff_s, timeout_s)


def score_subjects_with_retries(
    reward: Reward,
    images: torch.Tensor,
    references: Sequence[torch.Tensor],
    prompts: Sequence[str],
    subject_classes: Sequence[Sequence[str]],
    max_retries: int,
    backoff_s: float,
    timeout_s: float = 0.0,
) -> torch.Tensor:
    """:func:`cgrpo.rewards.base.score_subjects` (``[N, K]``: one identity score per image and subject, K
    the number of reference batches) retried like :func:`score_with_retries`."""
    from cgrpo.rewards.base import score_subjects

    count = len(references)

    def scores_of(value: Any) -> torch.Tensor:
        scores = torch.as_tensor(value, dtype=torch.float32).cpu()
        if tuple(scores.shape) != (len(prompts), count):
            raise ValueError(
                f"returned scores of shape {tuple(scores.shape)} "
                f"for {len(prompts)} images of {count} subjects"
            )
        return scores

    def call(*args: Any) -> Any:
        return score_subjects(reward, *args)

    args = (images, references, prompts, subject_classes)
    return _retrying(reward, call, args, scores_of, max_retries, backoff_s, timeout_s)


def _retrying(reward, call, args: tuple, check, max_retries: int, backoff_s: float, timeout_s: float):
    """``check(call(*args))``, retried with exponential backoff; :class:`RewardFailure` naming ``reward``."""
    name = getattr(reward, "name", type(reward).__name__)
    for attempt in range(max_retries + 1):
        try:
            return check(_call_with_timeout(call, args, timeout_s))
        except Exception as error:  # a reward server may fail in any way; we retry all of them
            if attempt == max_retries:
                raise RewardFailure(
                    f"reward '{name}' failed {max_retries + 1} times; "
                    f"last error: {type(error).__name__}: {error}"
                ) from error
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class RetryingReward:
    """``reward`` for evaluation: every call (and :meth:`score_subjects`) retried like the training rewards,
    :class:`RewardFailure` at the end; :meth:`last_assignment` is the wrapped reward's, or None."""

    def __init__(self, reward: Reward, max_retries: int, backoff_s: float, timeout_s: float = 0.0) -> None:
        self.reward = reward
        self.name = getattr(reward, "name", type(reward).__name__)
        self.retries = (max_retries, backoff_s, timeout_s)

    def __call__(self, images, references, prompts, subjects=None) -> torch.Tensor:
        return score_with_retries(self.reward, images, references, prompts, subjects, *self.retries)

    def score_subjects(self, images, references, prompts, subject_classes) -> torch.Tensor:
        return score_subjects_with_retries(
            self.reward, images, references, prompts, subject_classes, *self.retries
        )

    def last_assignment(self) -> list[dict[str, Any]] | None:
        """Per-sample ``missing``/``confused`` counts of the last joint scoring, if the reward keeps them."""
        method = getattr(self.reward, "last_assignment", None)
        return method() if callable(method) else None


def _call_with_timeout(fn, args: tuple, timeout_s: float):
    if not timeout_s:
        return fn(*args)
    # A daemon thread, not a ThreadPoolExecutor: a hung call must not keep the process from exiting.
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as error:  # handed to the caller below
            result["error"] = error

    thread = threading.Thread(target=target, name="reward-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within rewards.timeout_s = {timeout_s:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class BatchSampler:
    """Draws B example indices per iteration from seeded per-epoch permutations; its state resumes exactly.

    ``keys`` (one hashable per example, e.g. its references' sizes): a batch only holds examples of one key
    -- aspect-ratio bucketing, as diffusion trainers do -- because references of different sizes cannot be
    stacked into one forward batch. Each epoch's permutation is split into buckets (in order of first
    appearance), each bucket into batches of B (a short last batch is topped up from its bucket's start), and
    the batches are shuffled. Without keys, or with one key, batches are exactly the plain sampler's.
    """

    def __init__(self, size: int, batch_size: int, seed: int, keys: Sequence[Hashable] | None = None) -> None:
        if size == 0:
            raise ValueError("the training dataset is empty")
        if keys is not None and len(keys) != size:
            raise ValueError(f"{len(keys)} bucket keys for {size} examples")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.keys = None if keys is None or len(set(keys)) <= 1 else list(keys)
        self.epoch, self.position = 0, 0

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator)

    def _bucketed_batches(self) -> list[list[int]]:
        assert self.keys is not None
        buckets: dict[Hashable, list[int]] = {}
        for index in self._permutation().tolist():
            buckets.setdefault(self.keys[index], []).append(index)
        batches = []
        for bucket in buckets.values():
            for start in range(0, len(bucket), self.batch_size):
                batch = bucket[start : start + self.batch_size]
                while len(batch) < self.batch_size:  # top up from the bucket (cycling when it is tiny)
                    batch += bucket[: self.batch_size - len(batch)]
                batches.append(batch)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def next(self) -> list[int]:
        if self.keys is not None:
            batches = self._bucketed_batches()
            batch = batches[self.position]
            self.position += 1
            if self.position >= len(batches):
                self.epoch, self.position = self.epoch + 1, 0
            return batch
        indices: list[int] = []
        while len(indices) < self.batch_size:
            order = self._permutation()
            take = order[self.position : self.position + self.batch_size - len(indices)].tolist()
            indices += take
            self.position += len(take)
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
