"""The mini world's held-out subjects as an evaluation task, scored with the mini rewards per prompt kind.

The cases are exactly the trainer's held-out set (``MiniWorld(image_size).eval_set(num_subjects,
prompts_per_kind, seed)``), so ``cgrpo eval mini`` on a run's LoRA measures what the run's held-out curve
measured, with more images per prompt and bootstrap intervals. Categories are the prompt kinds (plain,
context, placement, property, combo). References are rendered in memory and saved to ``references/`` so
that ``scores.csv`` can point at them.

The world can also draw the images itself (``cgrpo eval mini --draw ground-truth`` or ``--draw copy``): every
case's ground truth, or the copy of its reference. Scored with the mini rewards and read with ``cgrpo eval
change COPY GROUND_TRUTH``, they give the world's conflict per kind and per asked attribute — what a faithful
image costs in identity and gains in prompt following against the copy — from the committed commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from cgrpo.eval.runner import EvalTask


@dataclass(frozen=True)
class HeldoutSet:
    """A held-out evaluation of mini-world policies on the ``cgrpo eval mini`` images: ``num_subjects`` x
    every prompt kind x ``prompts_per_kind`` x ``images_per_prompt``, ODE-sampled with ``steps`` steps from
    the noise of image seed ``seed``. The full reproduce profile and ``cgrpo demo`` share one such set."""

    num_subjects: int
    prompts_per_kind: int
    images_per_prompt: int
    steps: int = 10
    seed: int = 0

    @property
    def images(self) -> int:
        from cgrpo.data.miniworld import KINDS

        return self.num_subjects * len(KINDS) * self.prompts_per_kind * self.images_per_prompt


# The 1,280 images (64 subjects x 5 kinds x 2 prompts x 2 images; 95% intervals of about +-0.01 per mean)
# on which the full reproduce profile and the demo measure their policies.
PRECISE_HELDOUT = HeldoutSet(num_subjects=64, prompts_per_kind=2, images_per_prompt=2)


# What ``cgrpo eval mini --draw`` can take besides a policy's samples: images the world draws itself.
WORLD_DRAWINGS = ("ground-truth", "copy")


def world_drawings(
    draw: str,
    image_size: int = 32,
    num_subjects: int = 16,
    prompts_per_kind: int = 1,
    seed: int = 1234,
    world_seed: int = 0,
) -> dict[tuple[str, str], torch.Tensor]:
    """``(subject id, prompt) -> [3, H, W]`` for every case of :func:`mini_task` with the same arguments:
    the world's ground truth of the prompt (``draw="ground-truth"``) or the subject's reference
    (``"copy"``)."""
    if draw not in WORLD_DRAWINGS:
        raise ValueError(f"the mini world draws one of {', '.join(WORLD_DRAWINGS)}, not {draw!r}")
    examples = _held_out(image_size, num_subjects, prompts_per_kind, seed, world_seed)
    return {(e.subject_id, e.prompt): e.target if draw == "ground-truth" else e.reference for e in examples}


def _held_out(image_size: int, num_subjects: int, prompts_per_kind: int, seed: int, world_seed: int) -> list:
    """The held-out examples that :func:`mini_task` and :func:`world_drawings` both describe."""
    from cgrpo.data.miniworld import MiniWorld

    world = MiniWorld(image_size=image_size, seed=world_seed)
    return list(world.eval_set(num_subjects=num_subjects, prompts_per_kind=prompts_per_kind, seed=seed))


def mini_task(
    out: str | Path | None,
    image_size: int = 32,
    num_subjects: int = 16,
    prompts_per_kind: int = 1,
    seed: int = 1234,
    world_seed: int = 0,
) -> EvalTask:
    """The held-out mini-world task; reference PNGs are written under ``out/references`` (if ``out``)."""
    from cgrpo.eval.runner import Case, EvalTask, safe_name
    from cgrpo.imaging import grid, save_png

    examples = _held_out(image_size, num_subjects, prompts_per_kind, seed, world_seed)
    cases = [Case(e.subject_id, e.subject_class, e.kind, e.kind, e.prompt) for e in examples]
    references = {e.subject_id: e.reference for e in examples}
    for subject, image in references.items():
        path = Path(out or ".") / "references" / f"{safe_name(subject)}.png"
        if out is not None and not path.is_file():
            save_png(grid([image[None]], scale=1, pad=0), path)
    return EvalTask(
        name="mini",
        cases=cases,
        reference=lambda subject: references[subject].clone(),
        reference_path=lambda subject: f"references/{safe_name(subject)}.png",
    )
