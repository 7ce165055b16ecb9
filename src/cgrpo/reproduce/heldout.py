"""The reproduction's own held-out evaluation: the base and every finished run, on one larger image set.

A trainer evaluates its run on a small set to follow its progress (80 images in the mini profiles: a 95%
interval of about +-0.04 per mean), too few to tell methods apart whose effects differ by 0.01-0.02. A
profile with a :class:`~cgrpo.eval.mini.HeldoutSet` evaluates the base policy once and each finished
run's final LoRA with ``cgrpo eval mini`` on the same images (same subjects, prompts and per-image noise for
every policy), in ``OUT/heldout/base/`` and ``OUT/heldout/<run_id>/``; these folders are resumable, and the
report reads their ``summary.json``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from cgrpo.eval.mini import HeldoutSet
from cgrpo.reproduce.plan import MAIN, Plan, PlannedRun

BASE = "base"
METRICS = ("mini_id", "mini_prompt")  # the report's ``id`` and ``prompt``


def heldout_dir(plan: Plan, run: PlannedRun | None) -> Path:
    """Where the held-out evaluation of ``run`` (None: the base policy) is written."""
    return plan.out / "heldout" / (run.run_id if run is not None else BASE)


def evaluated(plan: Plan, run: PlannedRun | None) -> bool:
    return (heldout_dir(plan, run) / "summary.json").is_file()


def eval_command(plan: Plan, run: PlannedRun | None) -> list[str]:
    """The ``cgrpo eval mini`` command line of one policy: the plan's policy, plus ``run``'s final LoRA."""
    heldout = _heldout(plan)
    main = plan.run(MAIN, 0) or next(r for r in plan.runs if r.kind == "grpo")
    policy, data = main.config["policy"], main.config["data"]
    options = data.get("options", {})
    argv = [sys.executable, "-m", "cgrpo.cli", "eval", "mini", "--out", str(heldout_dir(plan, run))]
    argv += ["--policy", policy["name"]]
    for key, value in sorted((policy.get("options") or {}).items()):
        argv += ["-P", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    argv += [
        "--num-subjects", str(heldout.num_subjects),
        "--prompts-per-kind", str(heldout.prompts_per_kind),
        "--images-per-prompt", str(heldout.images_per_prompt),
        "--eval-seed", str(options.get("eval", {}).get("seed", 1234)),
        "--image-size", str(options.get("image_size", 32)),
        "--steps", str(heldout.steps),
        "--seed", str(heldout.seed),
    ]  # fmt: skip
    if run is not None:
        argv += ["--lora", str(run.output_dir)]
    return argv


def pending(plan: Plan) -> list[tuple[str, list[str]]]:
    """``(name, command)`` of every evaluation still to run: the base, then the finished runs."""
    if plan.profile.heldout is None:
        return []
    todo: list[PlannedRun | None] = [None, *(r for r in plan.runs if r.finished)]
    return [
        (BASE if run is None else run.run_id, eval_command(plan, run))
        for run in todo
        if not evaluated(plan, run)
    ]


def heldout_value(plan: Plan, run: PlannedRun, use: str, metric: str) -> float | None:
    """``run``'s ``metric`` (``id``/``prompt``) of its ``use`` (``base``/``trained``) policy on the plan's
    held-out set; None while that evaluation has not run."""
    path = heldout_dir(plan, None if use == "base" else run) / "summary.json"
    if not path.is_file():
        return None
    name = METRICS[0] if metric == "id" else METRICS[1]
    stat: dict[str, Any] = json.loads(path.read_text())["metrics"].get(name, {})
    value = stat.get("mean")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def describe(heldout: HeldoutSet) -> str:
    return (
        f"Held-out numbers: `cgrpo eval mini` of the base (once) and of every run's final LoRA on the same "
        f"{heldout.images:,} images ({heldout.num_subjects} subjects x 5 prompt kinds x "
        f"{heldout.prompts_per_kind} prompts x {heldout.images_per_prompt} images, {heldout.steps} ODE "
        "steps; `heldout/`), not the trainers' smaller evaluation."
    )


def _heldout(plan: Plan) -> HeldoutSet:
    if plan.profile.heldout is None:
        raise ValueError(f"profile {plan.profile.name!r} has no held-out set")
    return plan.profile.heldout
