"""The README's multi-subject table and grid from the runs of `configs/mini/multi_subject/*.yaml`.

Every run's held-out images (``samples/eval-step-*.pt``: the base at step 0, the trained policy at the end)
are scored again per image, so that each method's change is a paired mean with its 95% interval:

    python -m cgrpo.eval.multi_runs RUNS_DIR OUT_DIR [--methods naive_1to1 mean weakest pairwise]

RUNS_DIR holds one folder per run, ``<method>_s<seed>`` (as `cgrpo train ... --output-dir RUNS_DIR/mean_s0`).
Writes ``OUT_DIR/multi_subject.json`` (every number), ``table.md`` and ``grid.png`` (seed 0: references,
base and every method on held-out scenes, one per prompt kind).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from cgrpo.rewards.base import score_subjects
from cgrpo.train import recipe
from cgrpo.train.components import build_datasets, build_rewards


def per_image_scores(run: Path, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image identity of each subject, of the weakest one, prompt following, and the missing and
    confused subjects, for ``images`` of the run's held-out examples (in the trainer's order)."""
    config = recipe.load_config("grpo", run / "config.yaml")
    _, heldout = build_datasets(config.data, config.seed)
    repeat = len(images) // len(heldout)
    identity, prompt = build_rewards(config)
    references = [torch.stack([e.references[k] for e in heldout]) for k in range(heldout[0].num_subjects)]
    references = [r.repeat_interleave(repeat, dim=0) for r in references]
    classes = [[c for e in heldout for c in [e.subject_classes[k]] * repeat] for k in range(len(references))]
    prompts = [e.prompt for e in heldout for _ in range(repeat)]
    ids = score_subjects(identity, images, references, prompts, classes)
    assignment = identity.last_assignment()
    return {
        **{f"id_{k}": ids[:, k] for k in range(ids.shape[1])},
        "id": ids.mean(dim=1),
        "id_min": ids.amin(dim=1),
        "prompt": prompt(images, references[0], prompts, classes[0]),
        "missing": torch.tensor([float(a["missing"]) for a in assignment]),
        "confused": torch.tensor([float(a["confused"]) for a in assignment]),
    }


def paired(after: torch.Tensor, before: torch.Tensor) -> dict[str, float]:
    diff = (after - before).double()
    return {"mean": float(diff.mean()), "ci95": float(1.96 * diff.std() / math.sqrt(len(diff)))}


def eval_images(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    steps = sorted((run / "samples").glob("eval-step-*.pt"))
    return torch.load(steps[0]), torch.load(steps[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--methods", nargs="+", default=["naive_1to1", "mean", "weakest", "pairwise"])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    keys = ("id", "id_0", "id_1", "id_min", "prompt", "missing", "confused")
    results, base_done = {}, {}
    for method in args.methods:
        for run in sorted(args.runs.glob(f"{method}_s*")):
            if not (run / "summary.json").is_file():
                continue
            seed = int(run.name.rsplit("_s", 1)[1])
            base_images, trained_images = eval_images(run)
            if seed not in base_done:  # every run of a seed starts from the same base images
                base_done[seed] = per_image_scores(run, base_images)
            base, trained = base_done[seed], per_image_scores(run, trained_images)
            results[f"{method}/{seed}"] = {
                "method": method,
                "seed": seed,
                "base": {k: float(base[k].mean()) for k in keys},
                "trained": {k: float(trained[k].mean()) for k in keys},
                "change": {k: paired(trained[k], base[k]) for k in keys},
                "images": len(trained_images),
            }
    (args.out / "multi_subject.json").write_text(json.dumps(results, indent=2))

    def cell(entry: dict, key: str) -> str:
        c = entry["change"][key]
        return f"{entry['trained'][key]:.3f} ({c['mean']:+.3f} ± {c['ci95']:.3f})"

    def subjects(entry: dict) -> str:
        t, c = entry["trained"], entry["change"]
        return f"{t['id_0']:.3f} / {t['id_1']:.3f} ({c['id_0']['mean']:+.3f} / {c['id_1']['mean']:+.3f})"

    lines = [
        "| method | seed | identity, mean of subjects | subject 1 / subject 2 | weakest subject | prompt "
        "| missing / confused per image |",
        "|---|---|---|---|---|---|---|",
    ]
    # The training seed does not touch the base's held-out images: one base row when they are the same.
    same_base = all(
        torch.equal(base_done[s][k], base_done[min(base_done)][k]) for s in base_done for k in keys
    )
    for seed in sorted(base_done):
        b = {k: float(base_done[seed][k].mean()) for k in keys}
        if not same_base or seed == min(base_done):
            lines.append(
                f"| base | {'all' if same_base else seed} | {b['id']:.3f} "
                f"| {b['id_0']:.3f} / {b['id_1']:.3f} | {b['id_min']:.3f} | {b['prompt']:.3f} "
                f"| {b['missing']:.3f} / {b['confused']:.3f} |"
            )
        for method in args.methods:
            entry = results.get(f"{method}/{seed}")
            if entry is None:
                continue
            t = entry["trained"]
            lines.append(
                f"| {method} | {seed} | {cell(entry, 'id')} | {subjects(entry)} | {cell(entry, 'id_min')} "
                f"| {cell(entry, 'prompt')} | {t['missing']:.3f} / {t['confused']:.3f} |"
            )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    write_grid(args.runs, args.methods, args.out / "grid.png")


def write_grid(runs: Path, methods: list[str], path: Path, seed: int = 0) -> None:
    """References, base and every method's image for a held-out scene of each prompt kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = runs / f"{methods[0]}_s{seed}"
    config = recipe.load_config("grpo", first / "config.yaml")
    _, heldout = build_datasets(config.data, config.seed)
    base_images, _ = eval_images(first)
    repeat = len(base_images) // len(heldout)
    rows, kinds, pairs = [], set(), set()
    for index, example in enumerate(heldout):  # one scene per prompt kind, each of another subject pair
        if example.kind not in kinds and example.subject_id not in pairs:
            kinds.add(example.kind)
            pairs.add(example.subject_id)
            rows.append(index)
    columns = [("reference 1", None), ("reference 2", None), ("base", base_images)]
    columns += [(m, eval_images(runs / f"{m}_s{seed}")[1]) for m in methods]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.3 * len(columns), 1.45 * len(rows)))
    for r, index in enumerate(rows):
        example = heldout[index]
        for c, (title, images) in enumerate(columns):
            image = example.references[c] if images is None else images[index * repeat]
            ax = axes[r, c]
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
        axes[r, 0].set_ylabel(example.prompt.replace(" of ", " of\n", 1), fontsize=5, rotation=0, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)


if __name__ == "__main__":
    main()
