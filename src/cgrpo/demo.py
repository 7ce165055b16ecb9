"""``cgrpo demo``: Customized-GRPO on the mini world from the committed base, with a report.

Writes ``OUTPUT/report.md`` (reward curves, conflict rate, a reference | base | trained grid of held-out
subjects for every prompt kind) and ``OUTPUT/metrics.json`` with the held-out rewards of the base and
the trained policy measured on the same subjects, prompts and seeds.

The run's own held-out curve has few images (80 in the demo config: a 95% interval of about +-0.04 per
mean). After training, the demo therefore measures the base (the LoRA switched off) and the trained policy
on a larger held-out set, by default the full reproduce profile's 1,280 images
(:data:`~cgrpo.eval.mini.PRECISE_HELDOUT`, the images ``cgrpo eval mini --num-subjects 64
--prompts-per-kind 2 --images-per-prompt 2`` draws); the report's changes and grids come from it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from cgrpo.config import load_config
from cgrpo.data.base import Example
from cgrpo.eval.change import paired_change
from cgrpo.eval.mini import PRECISE_HELDOUT, HeldoutSet
from cgrpo.imaging import grid, save_png
from cgrpo.io import atomic_write_json, atomic_write_text
from cgrpo.plots import conflict_curve, reward_curves
from cgrpo.train.components import mini_world
from cgrpo.train.config import GRPOConfig
from cgrpo.train.grpo import GRPOTrainer
from cgrpo.train.heldout import HeldoutResult, evaluate_heldout, score_heldout
from cgrpo.train.logger import log_to_stderr, read_metrics

DEMO_CONFIG = "mini/customized_grpo.yaml"
FINAL_FILE = "final_heldout.pt"
# Images per forward pass of the final evaluation when the config sets no micro-batch: 1,280 mini images in
# one batch took 102 s on 2 threads, in batches of 32 49 s (the images do not depend on the batching).
FINAL_MICRO_BATCH = 32

log = logging.getLogger(__name__)


def packaged_config(name: str) -> Path:
    """Path of a config shipped inside the package (``configs/`` in the repository)."""
    return Path(str(resources.files("cgrpo") / "configs" / name))


def run_demo(
    output_dir: str | Path = "runs/demo",
    steps: int | None = None,
    seed: int = 0,
    config: str | Path | None = None,
    compare: str | Path | None = None,
    heldout: HeldoutSet | None = PRECISE_HELDOUT,
) -> Path:
    """Train the demo config and write its report. ``compare``: a second config (a file, or the name of a
    packaged mini config such as ``naive_1to1``) trained at the same time in a second process, one CPU
    thread each, into ``OUTPUT/<its name>``; the report then shows its column beside the demo's.
    ``heldout``: the set the base and the trained policies are measured on after training (mini world
    only; None: the run's own held-out images)."""
    overrides = [f"output_dir={output_dir}", f"seed={seed}"]
    if steps is not None:
        overrides.append(f"train.iterations={steps}")
    cfg = load_config(GRPOConfig, config or packaged_config(DEMO_CONFIG), overrides)
    if cfg.data.name != "mini":
        heldout = None  # a dataset of files has only its own held-out set
    start = time.perf_counter()
    if compare is None:
        trainer = GRPOTrainer(cfg)
        summary = trainer.train()
        final = evaluate_final(trainer, heldout) if heldout else None
        return write_report(trainer, summary, time.perf_counter() - start, final=final)
    compare_path = _compare_config(compare)
    compare_dir = Path(output_dir) / compare_path.stem
    compare_overrides = [*overrides[1:], f"output_dir={compare_dir}"]
    load_config(GRPOConfig, compare_path, compare_overrides)  # a bad config fails before any training
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        other = pool.submit(_train_alone, str(compare_path), compare_overrides, heldout)
        torch.set_num_threads(1)  # the two runs share the machine's cores
        trainer = GRPOTrainer(cfg)
        summary = trainer.train()
        final = evaluate_final(trainer, heldout) if heldout else None
        other.result()  # re-raises the comparison run's error, if any
    wall_time = time.perf_counter() - start
    return write_report(trainer, summary, wall_time, compare_dir=compare_dir, final=final)


def _compare_config(compare: str | Path) -> Path:
    path = Path(compare)
    if path.is_file():
        return path
    packaged = packaged_config(f"mini/{compare}.yaml")
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"--compare {compare}: no such config file, nor a packaged configs/mini/{compare}.yaml"
    )


def _train_alone(config: str, overrides: list[str], heldout: HeldoutSet | None) -> None:
    """The comparison run, in its own process with one thread; its notices and metrics lines on stderr.
    With ``heldout`` its trained policy's images and rewards on that set go to ``OUTPUT/<its name>/``
    :data:`FINAL_FILE` (the base is measured once, by the demo's own process)."""
    torch.set_num_threads(1)
    log_to_stderr()
    trainer = GRPOTrainer(load_config(GRPOConfig, config, overrides))
    trainer.train()
    if heldout:
        examples = heldout_examples(trainer.config, heldout)
        trained = evaluate_policy(trainer, examples, heldout)
        saved = {"images": trained.images, "id": trained.identity, "prompt": trained.prompt}
        torch.save(saved, trainer.output_dir / FINAL_FILE)


@dataclass
class FinalEvaluation:
    """The base and the trained policy on one held-out set (``examples`` repeated once per image)."""

    heldout: HeldoutSet
    examples: list[Example]
    base: HeldoutResult
    trained: HeldoutResult


def heldout_examples(config: GRPOConfig, heldout: HeldoutSet) -> list[Example]:
    """The run's mini world's held-out examples of ``heldout``'s size (its ``eval_set``; the run's own
    held-out options give the world and the seed that chooses the set)."""
    world, _, eval_options = mini_world(config.data.options)
    size = {"num_subjects": heldout.num_subjects, "prompts_per_kind": heldout.prompts_per_kind}
    return list(world.eval_set(**{**eval_options, **size}))


def evaluate_policy(
    trainer: GRPOTrainer, examples: list[Example], heldout: HeldoutSet, base: bool = False
) -> HeldoutResult:
    """ODE samples of the trainer's policy (its frozen base with ``base``) on ``examples``, seeded per image
    as ``cgrpo eval`` seeds them, scored with the run's rewards."""
    from cgrpo.train.sampling import schedule

    sigmas = schedule(trainer.policy, heldout.steps, trainer.config.sampling.shift)
    with trainer.policy.disable_lora() if base else nullcontext():
        return evaluate_heldout(
            trainer.policy,
            examples,
            trainer.identity_reward,
            trainer.prompt_reward,
            sigmas,
            seed=heldout.seed,
            images_per_prompt=heldout.images_per_prompt,
            micro_batch=trainer.config.sampling.micro_batch or FINAL_MICRO_BATCH,
        )


def evaluate_final(trainer: GRPOTrainer, heldout: HeldoutSet) -> FinalEvaluation:
    """The base and the trained policy on ``heldout``, same images before and after."""
    examples = heldout_examples(trainer.config, heldout)
    images = len(examples) * heldout.images_per_prompt
    log.info("final held-out evaluation: base and trained policy on %d images", images)
    base = evaluate_policy(trainer, examples, heldout, base=True)
    trained = evaluate_policy(trainer, examples, heldout)
    repeated = [e for e in examples for _ in range(heldout.images_per_prompt)]
    return FinalEvaluation(heldout, repeated, base, trained)


def _varied(indices: list[int], examples: list[Example], limit: int) -> list[int]:
    """Up to ``limit`` of ``indices``: one per subject first, then the others in order (a grid of many
    subjects rather than one subject's prompts and images)."""
    seen: set[str] = set()
    first, rest = [], []
    for i in indices:
        (rest if examples[i].subject_id in seen else first).append(i)
        seen.add(examples[i].subject_id)
    return (first + rest)[:limit]


def _kind_rows(examples: list[Example], per_kind: int) -> list[int]:
    """Indices of up to ``per_kind`` examples of each prompt kind (different subjects where there are),
    kinds in first-seen order."""
    by_kind: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_kind.setdefault(example.kind, []).append(index)
    return [i for indices in by_kind.values() for i in _varied(indices, examples, per_kind)]


def write_report(
    trainer: GRPOTrainer,
    summary: dict[str, Any],
    wall_time: float,
    compare_dir: Path | None = None,
    final: FinalEvaluation | None = None,
) -> Path:
    """``report.md`` and ``metrics.json``; changes and grids come from ``final`` when given, else from the
    run's own first and last held-out images."""
    out = Path(trainer.config.output_dir)
    records = read_metrics(out / "metrics.jsonl")
    compare_name = compare_dir.name if compare_dir is not None else None
    if final is not None:
        examples, base, trained = final.examples, final.base, final.trained
        compare = _load_final(compare_dir / FINAL_FILE, examples) if compare_dir is not None else None
        size, subjects = final.heldout, len({e.subject_id for e in examples})  # the world may have fewer
        measured_on = (
            f"{len(examples)} held-out images ({subjects} subjects x every prompt kind x "
            f"{size.prompts_per_kind} prompts x {size.images_per_prompt} images, image seed {size.seed}), "
            "measured after training"
        )
    else:
        examples, base, trained, compare = _run_images(trainer, compare_dir)
        measured_on = f"the run's own {len(examples)} held-out images"
    base_summary, trained_summary = base.summary(), trained.summary()
    larger = None
    if final is not None:
        points = [{"step": 0, "metrics": base_summary}, {"step": trainer.step, "metrics": trained_summary}]
        larger = (f"held-out, {len(examples)} images (95% interval)", points)
    run_images = len(trainer.heldout) * trainer.config.eval.images_per_prompt
    reward_curves(records, trainer.history["eval"], out / "reward_curves.png", larger, run_images)
    conflict_curve(records, out / "conflict_rate.png")
    rows = _kind_rows(examples, per_kind=3)
    columns = [base.images, trained.images] + ([compare.images] if compare is not None else [])
    references = torch.stack([examples[i].reference for i in rows])
    save_png(grid([references, *(c[rows] for c in columns)]), out / "grid_reference_base_trained.png")
    # The prompts that ask to change the subject's look: where identity and prompt following fight.
    edits = _varied([i for i, e in enumerate(examples) if _asks_property(e.prompt)], examples, 16)
    if edits:
        edit_refs = torch.stack([examples[i].reference for i in edits])
        save_png(grid([edit_refs, *(c[edits] for c in columns)]), out / "grid_property_edits.png")
    changes = paired_changes(examples, base, trained)
    # The comparison run is paired with the same base images: same base, seeds and examples.
    compare_changes = paired_changes(examples, base, compare) if compare is not None else None

    conflict = [r["conflict_rate"] for r in records if r.get("conflict_rate") is not None]
    metrics = {
        "base": base_summary,
        "trained": trained_summary,
        "measured_on": measured_on,
        "run_heldout": summary,  # the run's own held-out evaluation (its curve's first and last points)
        "method": trainer.config.method,
        "seed": trainer.config.seed,
        "iterations": trainer.step,
        "wall_time_s": round(wall_time, 1),
        "conflict_rate_mean": sum(conflict) / len(conflict) if conflict else None,
        "world_version": trainer.config.data.options.get("version"),
        "changes": changes,
        "compare": {"method": compare_name, "changes": compare_changes} if compare_name else None,
    }
    atomic_write_json(out / "metrics.json", metrics)
    edit_examples = [examples[i] for i in edits]
    atomic_write_text(out / "report.md", _markdown(metrics, [examples[i] for i in rows], edit_examples))
    return out / "report.md"


def _run_images(
    trainer: GRPOTrainer, compare_dir: Path | None
) -> tuple[list[Example], HeldoutResult, HeldoutResult, HeldoutResult | None]:
    """The run's first and last held-out images (and the comparison run's last), re-scored."""
    samples = trainer.output_dir / "samples"
    history = trainer.history["eval"]
    per_image = trainer.config.eval.images_per_prompt
    rewards = (trainer.identity_reward, trainer.prompt_reward)

    def score(images: torch.Tensor) -> HeldoutResult:
        return score_heldout(trainer.heldout, images, *rewards, per_image)

    base = score(torch.load(samples / f"eval-step-{history[0]['step']:06d}.pt"))
    trained = score(torch.load(samples / f"eval-step-{history[-1]['step']:06d}.pt"))
    compare = None
    if compare_dir is not None:
        last = json.loads((compare_dir / "final" / "eval_history.json").read_text())[-1]["step"]
        compare = score(torch.load(compare_dir / "samples" / f"eval-step-{last:06d}.pt"))
    examples = [e for e in trainer.heldout for _ in range(per_image)]
    return examples, base, trained, compare


def _load_final(path: Path, examples: list[Example]) -> HeldoutResult:
    saved = torch.load(path)
    return HeldoutResult(saved["images"], saved["id"], saved["prompt"], [e.kind for e in examples])


def _asks_property(prompt: str) -> bool:
    from cgrpo.data.miniworld import asks_property

    try:
        return asks_property(prompt)
    except ValueError:  # not a mini-world prompt
        return False


def paired_changes(
    examples: list[Example], before: HeldoutResult, after: HeldoutResult
) -> dict[str, dict[str, float]]:
    """Trained minus base per held-out image (same subject, prompt and noise), with the 95% normal
    interval of the mean change: overall, per prompt kind and on property-change prompts. ``before`` and
    ``after``: the two policies' held-out results, image by image in the order of ``examples``.

    ``{"<group>/<reward>": {"base", "trained", "change", "ci95", "n"}}``, each from
    :func:`cgrpo.eval.change.paired_change` over the images both policies scored; pairing removes the spread
    between prompts, so the interval of a change is much narrower than that of either mean."""
    groups: dict[str, list[int]] = {"all": list(range(len(examples)))}
    for index, example in enumerate(examples):
        groups.setdefault(example.kind or "other", []).append(index)
        if _asks_property(example.prompt):
            groups.setdefault("property-change", []).append(index)
    rewards = {"id": (before.identity, after.identity), "prompt": (before.prompt, after.prompt)}
    out = {}
    for group, indices in groups.items():
        for name, (base, trained) in rewards.items():
            change = paired_change(base[indices].tolist(), trained[indices].tolist())
            out[f"{group}/{name}"] = {
                "base": change["before"],
                "trained": change["after"],
                "change": change["change"],
                "ci95": change["ci95"],
                "n": change["n"],
            }
    return out


def _changes_table(changes: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows of :func:`paired_changes`."""
    table = [
        "| held-out images | reward | n | base | trained | change (95% interval) |",
        "|---|---|---|---|---|---|",
    ]
    for key, c in changes.items():
        group, reward = key.rsplit("/", 1)
        table.append(
            f"| {group} | {reward} | {c['n']} | {c['base']:.4f} | {c['trained']:.4f} |"
            f" {c['change']:+.4f} ± {c['ci95']:.4f} |"
        )
    return table


def _markdown(metrics: dict[str, Any], grid_examples, edit_examples=()) -> str:
    table = _changes_table(metrics["changes"])
    compare = metrics.get("compare")
    if compare:
        table += [
            "",
            f"Trained with `{compare['method']}` (second process, same base, seed and held-out images):",
            "",
            *_changes_table(compare["changes"]),
        ]
    columns = "reference | base | trained" + (f" | {compare['method']}" if compare else "")
    rows = "\n".join(f"{i + 1}. ({e.kind}) {e.prompt}" for i, e in enumerate(grid_examples))
    edit_rows = "\n".join(f"{i + 1}. {e.prompt}" for i, e in enumerate(edit_examples))
    edits = (
        f"""
## Property-change prompts: {columns}
The prompts that ask to change the subject's look, where identity and prompt following compete.
![property edits](grid_property_edits.png)

Rows:
{edit_rows}
"""
        if edit_examples
        else ""
    )
    conflict = metrics["conflict_rate_mean"]
    conflict_text = f"{conflict:.1%}" if conflict is not None else "n/a"
    return f"""# Customized-GRPO demo on the mini world

Method `{metrics["method"]}`, seed {metrics["seed"]}, {metrics["iterations"]} GRPO iterations,
wall time {metrics["wall_time_s"] / 60:.1f} min, mini world version {metrics["world_version"]}. Rewards are
measured on {metrics["measured_on"]}: deterministic ODE samples with the same seeds before and after
training; a change is the mean of per-image differences, with the 95% interval of that mean.

{chr(10).join(table)}

Mean reward-conflict rate over training (opposite-sign advantages; the paper measured 50.2% on UNO):
{conflict_text}.

## Rewards over training
![reward curves](reward_curves.png)

## Reward conflict over training
![conflict rate](conflict_rate.png)

## Held-out subjects: {columns}
![grid](grid_reference_base_trained.png)

Rows:
{rows}
{edits}"""
