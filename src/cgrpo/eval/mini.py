"""The mini world's held-out subjects as an evaluation task, scored with the mini rewards per prompt kind.

The cases are exactly the trainer's held-out set (``MiniWorld(image_size).eval_set(num_subjects,
prompts_per_kind, seed)``), so ``cgrpo eval mini`` on a run's LoRA measures what the run's held-out curve
measured, with more images per prompt and bootstrap intervals. Categories are the prompt kinds (plain,
context, placement, property, combo). References are rendered in memory and saved to ``references/`` so
that ``scores.csv`` can point at them.
"""

from __future__ import annotations

from pathlib import Path

from cgrpo.eval.runner import Case, EvalTask, safe_name
from cgrpo.imaging import save_png


def mini_task(
    out: str | Path | None,
    image_size: int = 32,
    num_subjects: int = 16,
    prompts_per_kind: int = 1,
    seed: int = 1234,
    world_seed: int = 0,
) -> EvalTask:
    """The held-out mini-world task; reference PNGs are written under ``out/references`` (if ``out``)."""
    from cgrpo.data.miniworld import MiniWorld
    from cgrpo.imaging import grid

    world = MiniWorld(image_size=image_size, seed=world_seed)
    examples = list(world.eval_set(num_subjects=num_subjects, prompts_per_kind=prompts_per_kind, seed=seed))
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
