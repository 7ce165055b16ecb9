"""``cgrpo demo``: Customized-GRPO on the mini world from the committed base, with a report.

Writes ``OUTPUT/report.md`` (reward curves, conflict rate, a reference | base | trained grid of held-out
subjects for every prompt kind) and ``OUTPUT/metrics.json`` with the held-out rewards of the base and
the trained policy measured on the same subjects, prompts and seeds.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from cgrpo.config import load_config
from cgrpo.imaging import grid, save_png
from cgrpo.io import atomic_write_json, atomic_write_text
from cgrpo.plots import conflict_curve, reward_curves
from cgrpo.train.config import GRPOConfig
from cgrpo.train.grpo import GRPOTrainer
from cgrpo.train.heldout import ci95
from cgrpo.train.logger import log_to_stderr, read_metrics

DEMO_CONFIG = "mini/customized_grpo.yaml"


def packaged_config(name: str) -> Path:
    """Path of a config shipped inside the package (``configs/`` in the repository)."""
    return Path(str(resources.files("cgrpo") / "configs" / name))


def run_demo(
    output_dir: str | Path = "runs/demo",
    steps: int | None = None,
    seed: int = 0,
    config: str | Path | None = None,
    compare: str | Path | None = None,
) -> Path:
    """Train the demo config and write its report. ``compare``: a second config (a file, or the name of a
    packaged mini config such as ``naive_1to1``) trained at the same time in a second process, one CPU
    thread each, into ``OUTPUT/<its name>``; the report then shows its column beside the demo's."""
    overrides = [f"output_dir={output_dir}", f"seed={seed}"]
    if steps is not None:
        overrides.append(f"train.iterations={steps}")
    cfg = load_config(GRPOConfig, config or packaged_config(DEMO_CONFIG), overrides)
    start = time.perf_counter()
    if compare is None:
        trainer = GRPOTrainer(cfg)
        summary = trainer.train()
        return write_report(trainer, summary, time.perf_counter() - start)
    compare_path = _compare_config(compare)
    compare_dir = Path(output_dir) / compare_path.stem
    compare_overrides = [*overrides[1:], f"output_dir={compare_dir}"]
    load_config(GRPOConfig, compare_path, compare_overrides)  # a bad config fails before any training
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        other = pool.submit(_train_alone, str(compare_path), compare_overrides)
        torch.set_num_threads(1)  # the two runs share the machine's cores
        trainer = GRPOTrainer(cfg)
        summary = trainer.train()
        other.result()  # re-raises the comparison run's error, if any
    return write_report(trainer, summary, time.perf_counter() - start, compare_dir=compare_dir)


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


def _train_alone(config: str, overrides: list[str]) -> dict[str, Any]:
    """The comparison run, in its own process with one thread; its notices and metrics lines on stderr."""
    torch.set_num_threads(1)
    log_to_stderr()
    return GRPOTrainer(load_config(GRPOConfig, config, overrides)).train()


def _kind_rows(kinds: list[str], per_kind: int) -> list[int]:
    """Indices of up to ``per_kind`` examples of each prompt kind, kinds in first-seen order."""
    chosen: dict[str, list[int]] = {}
    for index, kind in enumerate(kinds):
        rows = chosen.setdefault(kind, [])
        if len(rows) < per_kind:
            rows.append(index)
    return [i for rows in chosen.values() for i in rows]


def write_report(
    trainer: GRPOTrainer, summary: dict[str, Any], wall_time: float, compare_dir: Path | None = None
) -> Path:
    out = Path(trainer.config.output_dir)
    records = read_metrics(out / "metrics.jsonl")
    history = trainer.history["eval"]
    reward_curves(records, history, out / "reward_curves.png")
    conflict_curve(records, out / "conflict_rate.png")

    samples = out / "samples"
    first, last = history[0]["step"], history[-1]["step"]
    base_images = torch.load(samples / f"eval-step-{first:06d}.pt")
    trained_images = torch.load(samples / f"eval-step-{last:06d}.pt")
    per_image = trainer.config.eval.images_per_prompt
    examples = [e for e in trainer.heldout for _ in range(per_image)]
    rows = _kind_rows([e.kind for e in examples], per_kind=3)
    columns = [base_images, trained_images]
    compare_images, compare_name = None, None
    if compare_dir is not None:
        compare_history = json.loads((compare_dir / "final" / "eval_history.json").read_text())
        last_compare = compare_history[-1]["step"]
        compare_images = torch.load(compare_dir / "samples" / f"eval-step-{last_compare:06d}.pt")
        columns.append(compare_images)
        compare_name = compare_dir.name
    references = torch.stack([examples[i].reference for i in rows])
    save_png(grid([references, *(c[rows] for c in columns)]), out / "grid_reference_base_trained.png")
    # The prompts that ask to change the subject's look: where identity and prompt following fight.
    edits = [i for i, e in enumerate(examples) if _asks_property(e.prompt)][:16]
    if edits:
        edit_refs = torch.stack([examples[i].reference for i in edits])
        save_png(grid([edit_refs, *(c[edits] for c in columns)]), out / "grid_property_edits.png")
    changes = paired_changes(trainer, examples, base_images, trained_images)
    compare_changes = None
    if compare_images is not None:  # paired with the same base images: same base, seeds and examples
        compare_changes = paired_changes(trainer, examples, base_images, compare_images)

    conflict = [r["conflict_rate"] for r in records if r.get("conflict_rate") is not None]
    metrics = {
        "base": summary["base"],
        "trained": summary["trained"],
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


def _asks_property(prompt: str) -> bool:
    from cgrpo.data.miniworld import asks_property

    try:
        return asks_property(prompt)
    except ValueError:  # not a mini-world prompt
        return False


def paired_changes(
    trainer: GRPOTrainer, examples: list, base_images: torch.Tensor, trained_images: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Trained minus base per held-out image (same subject, prompt and noise), with the 95% normal
    interval of the mean change: overall, per prompt kind and on property-change prompts.

    ``{"<group>/<reward>": {"base", "trained", "change", "ci95", "n"}}``; pairing removes the spread between
    prompts, so the interval of a change is much narrower than that of either mean."""
    references = torch.stack([e.reference for e in examples])
    prompts = [e.prompt for e in examples]
    subjects = [e.subject_class for e in examples]
    scores = {}
    for name, reward in (("id", trainer.identity_reward), ("prompt", trainer.prompt_reward)):
        before = torch.as_tensor(reward(base_images, references, prompts, subjects)).double()
        after = torch.as_tensor(reward(trained_images, references, prompts, subjects)).double()
        scores[name] = (before, after)
    groups: dict[str, list[int]] = {"all": list(range(len(examples)))}
    for index, example in enumerate(examples):
        groups.setdefault(example.kind or "other", []).append(index)
        if _asks_property(example.prompt):
            groups.setdefault("property-change", []).append(index)
    out = {}
    for group, indices in groups.items():
        for name, (before, after) in scores.items():
            diff = (after - before)[indices]
            diff = diff[torch.isfinite(diff)]
            n = len(diff)
            out[f"{group}/{name}"] = {
                "base": float(before[indices].nanmean()),
                "trained": float(after[indices].nanmean()),
                "change": float(diff.mean()) if n else float("nan"),
                "ci95": ci95(diff),
                "n": n,
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
measured on held-out subjects with deterministic ODE samples and the same seeds before and after training;
a change is the mean of per-image differences, with the 95% interval of that mean.

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
