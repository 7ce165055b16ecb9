"""What a training run shows, hung on the trainer as callbacks (after transformers' ``TrainerCallback`` and
Lightning's callbacks): the trainer runs the algorithm and calls the hooks; images and logs live here.

A trainer calls every hook on its main process only (rank 0, where the run's files are written), in the
order of the callbacks, built-in ones first. Steps count iterations (GRPO) or training steps (RPO, SFT):
``on_rollout`` and ``on_advantages`` get the step the iteration will be logged as (the first is 1),
``on_evaluation`` the step of the evaluated weights (0 = the base policy).

Subclass :class:`Callback`, override the hooks you need, and pass an instance to the recipe
(``GRPOTrainer(config, callbacks=[...])`` or ``run(config, callbacks=[...])``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cgrpo.imaging import grid, save_png
from cgrpo.train.advantage_log import log_advantages, truncate_advantages
from cgrpo.train.logger import MetricsLogger


class Callback:
    """Hooks of a training run; each does nothing unless overridden."""

    def on_train_start(self, step: int) -> None:
        """Training starts (or resumes) at ``step``."""

    def on_rollout(self, step: int, references: torch.Tensor, images: torch.Tensor) -> None:
        """GRPO rollouts of iteration ``step``: ``references``, ``images`` ``[N, 3, H, W]`` (group-major);
        with K subjects per image ``references`` is a list of K ``[N, 3, H_k, W_k]``."""

    def on_advantages(
        self, step: int, a_id: torch.Tensor, a_prompt: torch.Tensor, valid: torch.Tensor, group_size: int
    ) -> None:
        """Group-normalised advantages ``[N]`` of iteration ``step``; ``valid`` ``[N]``: finite rewards."""

    def on_evaluation(self, step: int, result: Any) -> None:
        """A held-out evaluation of the weights after ``step`` (a :class:`~cgrpo.train.heldout.HeldoutResult`
        for GRPO and RPO, an :class:`~cgrpo.train.sft.SFTPreview` for SFT)."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """``metrics`` of ``step`` were written to ``metrics.jsonl``."""

    def on_train_end(self, summary: dict[str, Any]) -> None:
        """Training finished; ``summary`` is what the recipe returns (``{}`` without held-out data)."""


class CallbackList(Callback):
    """Calls each hook on every callback, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, step: int) -> None:
        for callback in self.callbacks:
            callback.on_train_start(step)

    def on_rollout(self, step: int, references: torch.Tensor, images: torch.Tensor) -> None:
        for callback in self.callbacks:
            callback.on_rollout(step, references, images)

    def on_advantages(
        self, step: int, a_id: torch.Tensor, a_prompt: torch.Tensor, valid: torch.Tensor, group_size: int
    ) -> None:
        for callback in self.callbacks:
            callback.on_advantages(step, a_id, a_prompt, valid, group_size)

    def on_evaluation(self, step: int, result: Any) -> None:
        for callback in self.callbacks:
            callback.on_evaluation(step, result)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_log(step, metrics)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_train_end(summary)


# --- built-in callbacks, installed by the recipes from their configs -----------------------------------


class RolloutGrids(Callback):
    """``samples/rollout-step-XXXXXX.png`` every ``every`` iterations: reference | rollout image, one row per
    sample of the first two groups (``log.sample_grid_every``)."""

    def __init__(self, directory: str | Path, every: int, group_size: int) -> None:
        self.directory = Path(directory)
        self.every = every
        self.group_size = group_size

    def on_rollout(self, step: int, references: torch.Tensor, images: torch.Tensor) -> None:
        if step % self.every:
            return
        rows = min(len(images), 2 * self.group_size)
        path = self.directory / f"rollout-step-{step:06d}.png"
        columns = [r[:rows].cpu() for r in reference_columns(references, images)]
        save_png(grid([*columns, images[:rows].cpu()]), path)


class AdvantagesLog(Callback):
    """Per-sample advantages to ``advantages.jsonl`` for the reward-conflict analysis (Fig. 7), masked
    samples as null (``log.advantages``).

    ``resume_step``: the step a resumed run continues from (later records are dropped, they will be re-run);
    ``None`` for a fresh run, which starts a new file."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_advantages(self.path, resume_step)

    def on_advantages(
        self, step: int, a_id: torch.Tensor, a_prompt: torch.Tensor, valid: torch.Tensor, group_size: int
    ) -> None:
        nan = float("nan")
        log_advantages(
            self.path, step, a_id.masked_fill(~valid, nan), a_prompt.masked_fill(~valid, nan), group_size
        )


class EvalImages(Callback):
    """Every held-out evaluation as ``samples/eval-step-XXXXXX.png`` (reference | sample per row; one
    reference column per subject) and, with ``save_tensors``, the images themselves as
    ``eval-step-XXXXXX.pt``.

    ``references``: ``[E, 3, H, W]``, one per held-out example (or a list of K such tensors, one per
    subject); repeated for its ``images_per_prompt``."""

    def __init__(
        self,
        directory: str | Path,
        references: torch.Tensor | Sequence[torch.Tensor],
        images_per_prompt: int,
        save_tensors: bool = True,
    ) -> None:
        self.directory = Path(directory)
        if isinstance(references, torch.Tensor):
            self.references = references.repeat_interleave(images_per_prompt, dim=0)
        else:
            self.references = [r.repeat_interleave(images_per_prompt, dim=0) for r in references]
        self.save_tensors = save_tensors

    def on_evaluation(self, step: int, result: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.save_tensors:
            torch.save(result.images, self.directory / f"eval-step-{step:06d}.pt")
        columns = reference_columns(self.references, result.images)
        save_png(grid([*columns, result.images]), self.directory / f"eval-step-{step:06d}.png")


def reference_columns(
    references: torch.Tensor | Sequence[torch.Tensor], images: torch.Tensor
) -> list[torch.Tensor]:
    """Grid columns of one reference tensor or K of them, each at the images' size (a grid's cells share
    one size; references of other sizes are resized for display only)."""
    columns = [references] if isinstance(references, torch.Tensor) else list(references)
    size = tuple(images.shape[-2:])
    return [
        c if tuple(c.shape[-2:]) == size else F.interpolate(c.float(), size=size, mode="area")
        for c in columns
    ]


class TensorBoardImages(Callback):
    """The first 16 held-out samples of every evaluation as the TensorBoard image ``eval/samples``."""

    def __init__(self, logger: MetricsLogger) -> None:
        self.logger = logger

    def on_evaluation(self, step: int, result: Any) -> None:
        self.logger.add_image("eval/samples", np.asarray(grid([result.images[:16]], scale=2)), step)


class PreviewGrids(Callback):
    """SFT's previews: ``samples/step_XXXXXX.png``, reference(s) | EMA sample | target per row."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_evaluation(self, step: int, result: Any) -> None:
        columns = [*reference_columns(result.references, result.images), result.images, result.targets]
        save_png(grid(columns), self.directory / f"step_{step:06d}.png")
