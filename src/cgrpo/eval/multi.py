"""Multi-subject benchmarks (DreamBench's multi-subject track, as UNO evaluates it): K references per image.

The same machinery as :mod:`cgrpo.eval.runner` -- one seed per image, resumable generation and scoring, the
same ``eval_config.json`` check -- with K references per case:

- **generation** conditions the policy on all K references of a case (``policy.condition(prompts, refs)``,
  ``refs`` a ``[B, K, 3, H, W]`` tensor when the K share a size, else K tensors ``[B, 3, H_k, W_k]``);
- **identity metrics** (DINO, CLIP-I, DINO-Seg, ...) score every image against each of its references
  (:func:`cgrpo.rewards.base.score_subjects`: a reward that assigns detections to subjects does so jointly,
  any other is called once per subject). ``scores.csv`` keeps each subject's score (``dino_s1``,
  ``dino_s2``), their mean (``dino``, UNO's number) and the weakest subject (``dino_min``); a reward that
  reports its assignment (``dino_seg``) adds the image's ``dino_seg_missing`` and ``dino_seg_confused``
  subject counts;
- **prompt metrics** (CLIP-T, HPS-v3) score each image once (with its first reference, which they ignore).

``summary.json`` has the runner's blocks (overall, per category, per prompt kind) plus ``per_subject``
(first, second, ...), ``weakest`` and ``failures`` (missing and confused counts); ``samples.png`` shows the
references and the images of each pair, framing images with a missing subject in red and with a subject
drawn twice in orange.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cgrpo.config import ConfigError
from cgrpo.eval import metrics as metric_info
from cgrpo.eval.runner import (
    BASE_COLUMNS,
    CONFIG_FILE,
    Case,
    GenerationSettings,
    Item,
    _batches,
    _check_config,
    _default_method,
    _free_memory,
    _jsonable,
    _row,
    _to_pil,
    build_eval_policy,
    build_items,
    format_interval,
    load_image,
    markdown_table,
    parse_score,
    policy_image_size,
    read_scores,
    square_resize,
    summarise,
    write_scores,
)
from cgrpo.eval.stats import DEFAULT_RESAMPLES, bootstrap_mean
from cgrpo.imaging import grid, save_png
from cgrpo.io import atomic_write_json, atomic_write_text
from cgrpo.policy.base import Policy
from cgrpo.rewards.base import score_subjects
from cgrpo.train.sampling import schedule, seeded_images

MISSING_COLOUR = (1.0, 0.0, 0.0)  # frame of an image with a missing subject in samples.png
CONFUSED_COLOUR = (1.0, 0.6, 0.0)  # frame of an image with a subject drawn twice


@dataclass(frozen=True)
class MultiCase(Case):
    """A case with K subjects: ``subject`` is the group's id (``"cat+dog"``), ``subject_class`` its classes
    joined by ``" + "``; ``subjects`` and ``subject_classes`` list them one by one."""

    subjects: tuple[str, ...] = ()
    subject_classes: tuple[str, ...] = ()


@dataclass
class MultiEvalTask:
    """A multi-subject benchmark: its cases, each subject's reference (``[3, H, W]`` in [0, 1]) and path."""

    name: str
    cases: list[MultiCase]
    reference: Callable[[str], torch.Tensor]
    reference_path: Callable[[str], str]

    @property
    def num_subjects(self) -> int:
        counts = {len(case.subjects) for case in self.cases}
        if len(counts) != 1:
            raise ConfigError(
                f"{self.name}: every case needs the same number of subjects, got {sorted(counts)}"
            )
        return counts.pop()


def subject_columns(metric: str, k: int) -> list[str]:
    """``dino`` -> ``dino_s1 .. dino_sK`` (one column per subject, first = 1)."""
    return [f"{metric}_s{j + 1}" for j in range(k)]


# --- generation -----------------------------------------------------------------------------------------


def prepare_multi_references(
    policy: Policy, images: Sequence[torch.Tensor], size: int | None
) -> list[torch.Tensor]:
    """The K references of a case as the policy is conditioned on them: each ``[3, H, W]`` centre-cropped
    and resized to a square of ``size`` (default the policy's image side), as the single-subject evaluation
    prepares its reference. The one place to change when policies prepare their own references."""
    side = size or policy_image_size(policy) or 512
    return [square_resize(image, side) for image in images]


def condition_references(per_subject: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """K reference batches ``[B, 3, H_k, W_k]`` -> ``[B, K, 3, H, W]`` when they share a size (what every
    policy takes), else the K batches as they are (per-reference sizes)."""
    if len({tuple(r.shape) for r in per_subject}) == 1:
        return torch.stack(list(per_subject), dim=1)
    return list(per_subject)


@torch.no_grad()
def generate_multi_images(
    policy: Policy,
    prompts: Sequence[str],
    references: Sequence[torch.Tensor],
    seeds: Sequence[int],
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """ODE samples ``[B, 3, H, W]`` in [0, 1], each conditioned on its K references (K batches
    ``[B, 3, h_k, w_k]``); each sample's noise comes from its own seed, as in the single-subject runner."""
    refs = condition_references([r.to(policy.device) for r in references])
    cond = policy.condition(list(prompts), refs)
    return seeded_images(policy, cond, seeds, sigmas).float().cpu()


def generate_missing_multi(
    task: MultiEvalTask,
    items: Sequence[Item],
    out: Path,
    settings: GenerationSettings,
    policy_factory: Callable[[], Any],
    batch_size: int,
    progress: bool = True,
) -> list[Item]:
    """Generate the items whose PNG is missing; returns them. The policy is built only if one is missing."""
    missing = [item for item in items if not (out / item.image).is_file()]
    if not missing:
        return []
    policy = policy_factory()
    # The policy's own schedule (UNO's shift for `uno`) unless --shift asks for a static one.
    sigmas = schedule(policy, settings.steps, settings.shift)
    prepared: dict[str, list[torch.Tensor]] = {}
    groups: dict[tuple[tuple[int, ...], ...], list[Item]] = defaultdict(list)
    for item in missing:  # cases whose references differ in size cannot share a forward pass
        case: MultiCase = item.case  # type: ignore[assignment]
        if case.subject not in prepared:
            images = [task.reference(s) for s in case.subjects]
            prepared[case.subject] = prepare_multi_references(policy, images, settings.reference_size)
        groups[tuple(tuple(r.shape) for r in prepared[case.subject])].append(item)
    bar = tqdm(total=len(missing), desc=f"{task.name}: generating", unit="img", disable=not progress)
    try:
        for group in groups.values():
            for batch in _batches(group, batch_size):
                k = len(prepared[batch[0].case.subject])
                references = [
                    torch.stack([prepared[item.case.subject][j] for item in batch]) for j in range(k)
                ]
                images = generate_multi_images(
                    policy,
                    [item.case.prompt for item in batch],
                    references,
                    [item.seed for item in batch],
                    sigmas,
                )
                for item, image in zip(batch, images, strict=True):
                    save_png(_to_pil(image), out / item.image)
                bar.update(len(batch))
    finally:
        bar.close()
        del policy
        _free_memory()
    return missing


# --- scoring --------------------------------------------------------------------------------------------


def score_missing_multi(
    task: MultiEvalTask,
    rows: list[dict[str, Any]],
    out: Path,
    metrics: Sequence[str],
    metric_options: dict[str, dict[str, Any]],
    batch_size: int,
    progress: bool = True,
    scores_path: Path | None = None,
    device: str | None = None,
) -> None:
    """Fill the missing metric cells of ``rows`` in place, metric by metric (see the module docstring)."""
    cases = {case.subject: case for case in task.cases}
    cache: dict[tuple[str, int], torch.Tensor] = {}

    def reference(subject: str, size: int) -> torch.Tensor:
        if (subject, size) not in cache:
            cache[(subject, size)] = square_resize(task.reference(subject), size)
        return cache[(subject, size)]

    columns = all_columns(metrics, task.num_subjects)
    for metric in metrics:
        todo = [row for row in rows if row.get(metric) in (None, "")]
        if not todo:
            continue
        reward = metric_info.build_metric(metric, metric_options.get(metric), device)
        identity = metric_info.info(metric).criterion == "identity"
        bar = tqdm(total=len(todo), desc=f"{task.name}: {metric}", unit="img", disable=not progress)
        try:
            for batch in _batches(todo, batch_size):
                images = torch.stack([load_image(out / row["image"]) for row in batch])
                size = images.shape[-1]
                prompts = [row["prompt"] for row in batch]
                group = [cases[row["subject"]] for row in batch]
                k = len(group[0].subjects)
                references = [torch.stack([reference(c.subjects[j], size) for c in group]) for j in range(k)]
                classes = [[c.subject_classes[j] for c in group] for j in range(k)]
                if identity:
                    _fill_identity(batch, metric, reward, images, references, prompts, classes)
                else:
                    scores = torch.as_tensor(reward(images, references[0], prompts, classes[0])).float()
                    for row, score in zip(batch, scores.tolist(), strict=True):
                        row[metric] = score
                if scores_path is not None:
                    write_scores(scores_path, rows, columns)
                bar.update(len(batch))
        finally:
            bar.close()
            del reward
            _free_memory()


def _fill_identity(batch, metric, reward, images, references, prompts, classes) -> None:
    """Each subject's score, their mean and minimum, and the assignment's failure counts when reported."""
    scores = score_subjects(reward, images, references, prompts, classes).double().cpu()  # [N, K]
    report = getattr(reward, "last_assignment", None)
    diagnostics = report() if callable(report) else None
    for i, row in enumerate(batch):
        for column, score in zip(subject_columns(metric, scores.shape[1]), scores[i].tolist(), strict=True):
            row[column] = score
        row[f"{metric}_min"] = scores[i].min().item()
        row[metric] = scores[i].mean().item()  # UNO's number: the mean over the image's references
        if diagnostics is not None:
            row[f"{metric}_missing"] = int(diagnostics[i]["missing"])
            row[f"{metric}_confused"] = int(diagnostics[i]["confused"])


def metric_columns(metric: str, k: int) -> set[str]:
    """Every column a metric writes (stale scores of a metric are dropped together)."""
    extra = [*subject_columns(metric, k), f"{metric}_min", f"{metric}_missing", f"{metric}_confused"]
    return {metric, *extra}


def all_columns(metrics: Sequence[str], k: int) -> list[str]:
    """The metric columns of ``scores.csv`` in order: each metric, then its per-subject and weakest columns
    (identity metrics)."""
    columns: list[str] = []
    for metric in metrics:
        columns.append(metric)
        if metric_info.info(metric).criterion == "identity":
            columns += [*subject_columns(metric, k), f"{metric}_min"]
    return columns


# --- summary, table, grid -------------------------------------------------------------------------------


def summarise_multi(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    method: str,
    k: int,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """The runner's summary plus ``per_subject`` (``"1"`` .. ``"K"``), ``weakest`` (identity metrics) and
    ``failures`` (per metric that reports its assignment: missing and confused subjects and images)."""
    summary = summarise(rows, metrics, method, n_resamples=n_resamples, seed=seed)
    identity = [m for m in metrics if metric_info.info(m).criterion == "identity"]

    def stat(column: str) -> dict[str, Any]:
        values = [parse_score(r.get(column)) for r in rows]
        return bootstrap_mean(values, n_resamples=n_resamples, seed=seed).as_dict()

    summary["n_pairs"] = summary.pop("n_subjects")
    summary["num_subjects"] = k
    summary["per_subject"] = {
        str(j + 1): {m: stat(subject_columns(m, k)[j]) for m in identity} for j in range(k)
    }
    summary["weakest"] = {m: stat(f"{m}_min") for m in identity}
    failures = {}
    for m in identity:
        missing = [r.get(f"{m}_missing") for r in rows]
        if any(v not in (None, "") for v in missing):
            counts = [int(parse_score(v)) for v in missing if v not in (None, "")]
            confused = [
                int(parse_score(r.get(f"{m}_confused")))
                for r in rows
                if r.get(f"{m}_confused") not in (None, "")
            ]
            failures[m] = {
                "n_images": len(counts),
                "missing": sum(counts),
                "confused": sum(confused),
                "images_with_missing": sum(c > 0 for c in counts),
                "images_with_confused": sum(c > 0 for c in confused),
                "missing_rate": sum(counts) / (k * len(counts)),
                "confused_rate": sum(c > 0 for c in confused) / max(1, len(confused)),
            }
    summary["failures"] = failures
    return summary


def markdown_multi(summary: dict[str, Any], title: str, description: str = "") -> str:
    """The runner's table, then identity per subject and for the weakest subject, then failure counts."""
    text = markdown_table(summary, title, description).rstrip("\n")
    labels = summary.get("labels", {})
    identity = list(summary["weakest"])
    if identity:
        header = "| Subject | " + " | ".join(f"{labels.get(m, m)} ↑" for m in identity) + " |"
        lines = ["", "", "Identity per subject (each image against each of its references):", "", header]
        lines.append("|---|" + "---:|" * len(identity))
        for j, block in summary["per_subject"].items():
            lines.append(f"| subject {j} | " + " | ".join(format_interval(block[m]) for m in identity) + " |")
        weakest = " | ".join(f"**{format_interval(summary['weakest'][m])}**" for m in identity)
        lines.append(f"| weakest | {weakest} |")
        text += "\n".join(lines)
    for metric, counts in summary.get("failures", {}).items():
        text += (
            f"\n\n{labels.get(metric, metric)}: {counts['missing']} missing subjects in "
            f"{counts['images_with_missing']} of {counts['n_images']} images, "
            f"{counts['images_with_confused']} images with a subject drawn twice (confused). samples.png "
            "frames them in red (missing) and orange (confused)."
        )
    return text + "\n"


def _framed(image: torch.Tensor, colour: tuple[float, float, float], width: int = 2) -> torch.Tensor:
    framed = image.clone()
    value = torch.tensor(colour, dtype=image.dtype)[:, None, None]
    framed[:, :width], framed[:, -width:] = value, value
    framed[:, :, :width], framed[:, :, -width:] = value, value
    return framed


def multi_sample_grid(
    out: Path, rows: Sequence[dict[str, Any]], task: MultiEvalTask, metrics: Sequence[str], max_pairs: int = 8
) -> Path | None:
    """``samples.png``: per pair (its first prompt), the K references then its images; an image with a
    missing subject is framed red, one with a subject drawn twice orange (by the first metric that counts)."""
    counted = next((m for m in metrics if any(r.get(f"{m}_missing") not in (None, "") for r in rows)), None)
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_case[(row["subject"], row["prompt"])].append(row)
    chosen, seen = [], set()
    for (pair, _), case_rows in by_case.items():
        if pair not in seen and len(chosen) < max_pairs:
            seen.add(pair)
            chosen.append(sorted(case_rows, key=lambda r: int(Path(r["image"]).stem)))
    if not chosen:
        return None
    cases = {case.subject: case for case in task.cases}
    k, count = task.num_subjects, min(len(c) for c in chosen)
    size = load_image(out / chosen[0][0]["image"]).shape[-1]
    columns = [
        torch.stack([square_resize(task.reference(cases[c[0]["subject"]].subjects[j]), size) for c in chosen])
        for j in range(k)
    ]
    for j in range(count):
        tiles = []
        for c in chosen:
            row, image = c[j], load_image(out / c[j]["image"])
            if counted and parse_score(row.get(f"{counted}_missing")) > 0:
                image = _framed(image, MISSING_COLOUR)
            elif counted and parse_score(row.get(f"{counted}_confused")) > 0:
                image = _framed(image, CONFUSED_COLOUR)
            tiles.append(image)
        columns.append(torch.stack(tiles))
    return save_png(grid(columns, scale=max(1, 128 // size)), out / "samples.png")


# --- the pipeline ---------------------------------------------------------------------------------------


def run_multi_benchmark(
    task: MultiEvalTask,
    out: str | Path,
    settings: GenerationSettings,
    metrics: Sequence[str],
    metric_options: dict[str, dict[str, Any]] | None = None,
    images_per_prompt: int = 4,
    batch_size: int = 4,
    score_batch_size: int = 16,
    method: str | None = None,
    device: str = "cpu",
    policy_factory: Callable[[], Any] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    ci_seed: int = 0,
    title: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate and score every (case, k) of ``task`` into ``out``; returns the summary (also written)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = list(metrics)
    metric_options = metric_options or {}
    metric_info.check_metrics(metrics)
    k = task.num_subjects
    method = method or _default_method(settings)
    items = build_items(task.cases, images_per_prompt, settings.seed)
    config = {"task": task.name, **settings.as_dict(), "num_subjects": k}
    old_config = _check_config(out, config, has_images=(out / "images").is_dir())
    old_options = old_config.get("metric_options", {})
    new_options = {m: _jsonable(metric_options.get(m, {})) for m in metrics}
    stale = {m for m in metrics if m in old_options and old_options[m] != new_options[m]}
    atomic_write_json(out / CONFIG_FILE, {**config, "metric_options": {**old_options, **new_options}})

    factory = policy_factory or (lambda: build_eval_policy(settings, device))
    regenerated = {
        item.image
        for item in generate_missing_multi(task, items, out, settings, factory, batch_size, progress)
    }
    columns = all_columns(metrics, k)
    scores_path = out / "scores.csv"
    previous = {row["image"]: row for row in read_scores(scores_path)}
    rows = []
    for item in items:
        case: MultiCase = item.case  # type: ignore[assignment]
        row = _row(item, method, ";".join(task.reference_path(s) for s in case.subjects))
        old = previous.get(item.image)
        if old is not None and item.image not in regenerated:
            row.update(
                {
                    key: value
                    for key, value in old.items()
                    if key not in BASE_COLUMNS
                    and value not in (None, "")
                    and not any(key in metric_columns(m, k) for m in stale)
                }
            )
        rows.append(row)
    write_scores(scores_path, rows, columns)
    score_missing_multi(
        task, rows, out, metrics, metric_options, score_batch_size, progress, scores_path, device
    )
    write_scores(scores_path, rows, columns)

    summary = summarise_multi(rows, metrics, method, k, n_resamples=n_resamples, seed=ci_seed)
    summary.update(
        {"task": task.name, "images_per_prompt": images_per_prompt, "generation": settings.as_dict()}
    )
    atomic_write_json(out / "summary.json", summary)
    description = (
        f"{summary['n_images']} images: {summary['n_pairs']} groups of {k} subjects, {summary['n_prompts']} "
        f"(group, prompt) pairs, {images_per_prompt} images each; policy `{settings.policy}`"
        f"{f' + LoRA `{settings.lora}`' if settings.lora else ''}, {settings.steps} ODE steps, "
        f"seed {settings.seed}. Identity metrics: the mean over each image's {k} references."
    )
    atomic_write_text(
        out / "table.md", markdown_multi(summary, title or f"{task.name}: {method}", description)
    )
    multi_sample_grid(out, rows, task, metrics)
    return summary
