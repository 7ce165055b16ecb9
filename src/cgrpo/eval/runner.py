"""The benchmark runner shared by DreamBench and the mini world: generate, score, summarise — resumably.

Layout of an evaluation directory ``DIR``::

    eval_config.json                    what generated the images (checked on resume)
    images/<subject>/<prompt-slug>/<k>.png
    references/<subject>.png            only for in-memory references (the mini world)
    scores.csv                          one row per image: method, subject, class, category, kind, prompt,
                                        seed, image, reference, then one column per metric
    summary.json                        {"method", "metrics": {m: {mean, ci_low, ci_high, n}},
                                         "per_category": {c: {m: ...}}, "per_kind": {...}, ...}
    table.md                            the paper's Table 1 layout, mean [95% CI], per category and overall
    samples.png                         reference | generated images, one row per subject (first prompt)

Every image has its own seed, a stable hash of (``--seed``, subject, prompt, k), and its own initial noise
drawn from that seed, so an image does not depend on the batch it was generated in, two methods evaluated
with the same ``--seed`` start from the same noise (paired comparisons, the human-evaluation app joins on
``subject, prompt, seed``), and a resumed run produces exactly the images it would have produced.

Resume: images already on disk are not generated again (the policy is not even loaded when none is
missing), and scores already in ``scores.csv`` are reused; only missing (image, metric) cells are computed.
Metrics run one after another, each loaded once, after the policy is freed: the real policy (FLUX) and the
real HPS-v3 (a 7B VLM) never need to share accelerator memory.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cgrpo.config import ConfigError
from cgrpo.eval import metrics as metric_info
from cgrpo.eval.stats import DEFAULT_RESAMPLES, bootstrap_mean
from cgrpo.imaging import grid, save_png, square_resize
from cgrpo.io import atomic_write_json, atomic_write_text
from cgrpo.policy.base import Policy
from cgrpo.train.sampling import item_seed, seeded_images
from cgrpo.train.subjects import batch_references, references_to

# No column but the metrics holds numbers other than the seed: the human-evaluation app keeps every other
# numeric column as a reward score (the image index k is in the file name).
BASE_COLUMNS = ("method", "subject", "class", "category", "kind", "prompt", "seed", "image", "reference")
CONFIG_FILE = "eval_config.json"
SLUG_LENGTH = 60
MISSING_COLOUR = (1.0, 0.0, 0.0)  # frame of an image with a missing subject in samples.png
CONFUSED_COLOUR = (1.0, 0.6, 0.0)  # frame of an image with a subject drawn twice


# --- what to evaluate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One (subject, prompt) of a benchmark; ``category`` groups subjects (object / live) or prompt kinds."""

    subject: str
    subject_class: str
    category: str
    kind: str
    prompt: str

    @property
    def subjects(self) -> tuple[str, ...]:
        """The subjects whose references condition the image: this one (K subjects: :class:`MultiCase`)."""
        return (self.subject,)


@dataclass
class EvalTask:
    """A benchmark: its cases and how to get each subject's reference image.

    - ``reference(subject)`` -> ``[3, H, W]`` float in [0, 1], the image the policy is conditioned on;
    - ``reference_path(subject)`` -> the path written to ``scores.csv`` (absolute, or relative to DIR);
    - ``identity_references(subject)`` -> all real images of the subject, for identity metrics averaged over
      them (DreamBooth's protocol); None when only the conditioning reference exists.
    """

    name: str
    cases: list[Case]
    reference: Callable[[str], torch.Tensor]
    reference_path: Callable[[str], str]
    identity_references: Callable[[str], list[torch.Tensor]] | None = None

    # What :func:`run_benchmark` asks of a task: one subject per case here; a task with K subjects per case
    # (:class:`cgrpo.eval.multi.MultiEvalTask`) overrides these.

    def run_settings(self, identity_references: str) -> dict[str, Any]:
        """Entries of ``eval_config.json`` and ``summary.json`` besides the generation settings."""
        return {"identity_references": identity_references}

    def prepare_reference(
        self, policy: Policy, image: torch.Tensor, reference_size: int | None
    ) -> torch.Tensor:
        """One conditioning reference ``[3, h, w]`` (see :func:`prepare_reference`)."""
        return prepare_reference(policy, image, reference_size)

    def score_columns(self, metrics: Sequence[str]) -> list[str]:
        """The metric columns of ``scores.csv``, in order."""
        return list(metrics)

    def metric_columns(self, metric: str) -> set[str]:
        """Every column a metric writes (a metric's stale scores are dropped together)."""
        return {metric}

    def score_batch(
        self,
        reward: Any,
        metric: str,
        rows: Sequence[dict[str, Any]],
        images: torch.Tensor,
        resized: Callable[[str, int, bool], list[torch.Tensor]],
        identity_references: str,
    ) -> None:
        """Fill ``metric`` of ``rows`` from their ``images`` ``[N, 3, H, W]``: the score against the
        conditioning reference, or the mean over every real image of the subject (``identity_references``
        ``"all"``, identity metrics); ``resized(subject, size, every)`` gives those references."""
        every = (
            identity_references == "all"
            and self.identity_references is not None
            and metric_info.info(metric).criterion == "identity"
        )
        size = images.shape[-1]
        references = [resized(row["subject"], size, every) for row in rows]
        prompts = [row["prompt"] for row in rows]
        subjects = [row["class"] for row in rows]
        scores = _score_against_references(reward, images, references, prompts, subjects)
        for row, score in zip(rows, scores.tolist(), strict=True):
            row[metric] = score

    def summarise(
        self, rows: Sequence[dict[str, Any]], metrics: Sequence[str], method: str, n_resamples: int, seed: int
    ) -> dict[str, Any]:
        return summarise(rows, metrics, method, n_resamples=n_resamples, seed=seed)

    def describe(self, summary: dict[str, Any], settings: GenerationSettings, images_per_prompt: int) -> str:
        """The line under ``table.md``'s title."""
        return (
            f"{summary['n_images']} images: {summary['n_subjects']} subjects, {summary['n_prompts']} "
            f"(subject, prompt) pairs, {images_per_prompt} images each; {_generation_text(settings)}."
        )

    def markdown(self, summary: dict[str, Any], title: str, description: str) -> str:
        return markdown_table(summary, title, description)


@dataclass(frozen=True)
class Item:
    """One image to generate and score: a case and its image index ``k`` with its seed."""

    case: Case
    k: int
    seed: int

    @property
    def image(self) -> str:
        """Path relative to the evaluation directory."""
        return f"images/{safe_name(self.case.subject)}/{prompt_slug(self.case.prompt)}/{self.k}.png"


@dataclass
class GenerationSettings:
    """Everything that determines the images (written to ``eval_config.json`` and checked on resume)."""

    policy: str
    policy_options: dict[str, Any] = field(default_factory=dict)
    lora: str | None = None
    steps: int = 25
    shift: float | None = None
    seed: int = 0
    # None: each policy's own reference preprocessing (Policy.prepare_references); N: squares of side N
    reference_size: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "policy_options": self.policy_options,
            "lora": self.lora,
            "steps": self.steps,
            "shift": self.shift,
            "seed": self.seed,
            "reference_size": self.reference_size,
        }


def safe_name(text: str) -> str:
    """A file-system-safe directory name (subject ids are usually safe already)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "_"


def prompt_slug(prompt: str) -> str:
    """``"a dog on the beach"`` -> ``"a-dog-on-the-beach"``; long prompts are cut and get a hash suffix."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-") or "prompt"
    if len(slug) > SLUG_LENGTH:
        slug = f"{slug[:SLUG_LENGTH].rstrip('-')}-{zlib.crc32(prompt.encode()):08x}"
    return slug


def build_items(cases: Sequence[Case], images_per_prompt: int, seed: int) -> list[Item]:
    if images_per_prompt < 1:
        raise ConfigError(f"--images-per-prompt must be at least 1, got {images_per_prompt}")
    items, seen = [], {}
    for case in cases:
        key = (safe_name(case.subject), prompt_slug(case.prompt))
        if seen.setdefault(key, case.prompt) != case.prompt:
            raise ConfigError(
                f"prompts {seen[key]!r} and {case.prompt!r} of subject {case.subject!r} map to the same "
                "directory name; make them differ in letters or digits"
            )
        items += [
            Item(case, k, item_seed(seed, case.subject, case.prompt, k)) for k in range(images_per_prompt)
        ]
    return items


# --- images ---------------------------------------------------------------------------------------------


def load_image(path: str | Path) -> torch.Tensor:
    """An image file -> ``[3, H, W]`` float32 in [0, 1]."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (
        (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    )
    return Image.fromarray(array)


@torch.no_grad()
def generate_images(
    policy: Policy,
    prompts: Sequence[str],
    references: torch.Tensor | Sequence[torch.Tensor],
    seeds: Sequence[int],
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """ODE samples ``[B, 3, H, W]`` in [0, 1] for B (prompt, reference(s), seed) triples; ``references``:
    ``[B, 3, h, w]``, ``[B, K, 3, h, w]`` or K tensors ``[B, 3, h_k, w_k]`` (what :meth:`Policy.condition`
    takes, :func:`cgrpo.train.subjects.batch_references`).

    Each sample's initial noise comes from its own seed, so the result does not depend on the batch; the
    trainer's held-out evaluation samples the same way (:func:`cgrpo.train.sampling.seeded_images`).
    """
    cond = policy.condition(list(prompts), references_to(references, policy.device))
    return seeded_images(policy, cond, seeds, sigmas).float().cpu()


def policy_image_size(policy: Policy) -> int | None:
    """The side of the policy's square images, None when they are not square."""
    height, width = policy.image_size
    return int(height) if height == width else None


def resolve_lora(path: str | Path) -> Path:
    """A LoRA directory (``adapter_model.safetensors``) or a training run directory (its ``final/``)."""
    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / "adapter_model.safetensors").is_file():
            return candidate.resolve()
    if (path / "final" / "transformer").is_dir() or (path / "transformer").is_dir():
        full = path / "final" if (path / "final" / "transformer").is_dir() else path
        raise ConfigError(
            f"{full} holds full policy weights, not a LoRA: pass --policy-option path={full} "
            "instead of --lora"
        )
    raise ConfigError(
        f"--lora {path}: expected a LoRA directory with adapter_model.safetensors "
        "(or a run directory with final/)"
    )


def build_eval_policy(settings: GenerationSettings, device: str = "cpu"):
    """The policy named by ``settings`` (registry + options) with its LoRA, in eval mode, on ``device``."""
    from cgrpo import policy as policies

    try:
        policy = policies.build(settings.policy, **settings.policy_options)
    except KeyError as error:
        raise ConfigError(str(error).strip("'\"")) from None
    if settings.lora:
        policy.load_lora(settings.lora)
    policy.requires_grad_(False)
    return policy.to(device).eval()


# --- scores.csv -----------------------------------------------------------------------------------------


def read_scores(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``scores.csv`` as dicts of strings (empty list when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_scores(path: str | Path, rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> None:
    extra = [m for row in rows for m in row if m not in BASE_COLUMNS and m not in metrics]
    columns = [*BASE_COLUMNS, *metrics, *dict.fromkeys(extra)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def parse_score(value: Any) -> float:
    """A score read from ``scores.csv`` or a JSON export (text, number or None); blank or malformed: NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _has_score(row: dict[str, Any], metric: str) -> bool:
    return row.get(metric) not in (None, "")


# --- the pipeline ---------------------------------------------------------------------------------------


def _check_config(out: Path, config: dict[str, Any], has_images: bool) -> dict[str, Any]:
    """Refuse to mix images of different generation settings in one folder; returns the previous config."""
    path = out / CONFIG_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    if has_images:
        for key, value in config.items():
            if key in old and old[key] != value:
                raise ConfigError(
                    f"{out} holds images generated with {key}={old[key]!r}, not {value!r}: "
                    "use another --out directory or delete the old images"
                )
    return old


def _jsonable(value: Any) -> Any:
    """Options as JSON would store them (objects such as a shared embedder become their repr)."""
    return json.loads(json.dumps(value, default=repr))


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    size = max(1, size)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_missing(
    task: EvalTask,
    items: Sequence[Item],
    out: Path,
    settings: GenerationSettings,
    policy_factory: Callable[[], Any],
    batch_size: int,
    progress: bool = True,
) -> list[Item]:
    """Generate the items whose PNG is missing, each conditioned on the references of its case's subjects;
    returns them. The policy is built only if one is missing."""
    missing = [item for item in items if not (out / item.image).is_file()]
    if not missing:
        return []
    from cgrpo.train.sampling import schedule

    policy = policy_factory()
    # The policy's own schedule (UNO's shift for `uno`) unless --shift asks for a static one.
    sigmas = schedule(policy, settings.steps, settings.shift)
    prepared: dict[str, list[torch.Tensor]] = {}  # by case.subject: the case's K prepared references
    groups: dict[tuple[tuple[int, ...], ...], list[Item]] = {}
    for item in missing:  # cases whose references differ in size cannot share a forward pass
        case = item.case
        if case.subject not in prepared:
            prepared[case.subject] = [
                task.prepare_reference(policy, task.reference(subject), settings.reference_size)
                for subject in case.subjects
            ]
        groups.setdefault(tuple(tuple(r.shape) for r in prepared[case.subject]), []).append(item)
    bar = tqdm(total=len(missing), desc=f"{task.name}: generating", unit="img", disable=not progress)
    try:
        for group in groups.values():
            for batch in _batches(group, batch_size):
                per_subject = [
                    torch.stack(refs) for refs in zip(*(prepared[i.case.subject] for i in batch), strict=True)
                ]
                images = generate_images(
                    policy,
                    [item.case.prompt for item in batch],
                    batch_references(per_subject),
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


def write_drawn_images(
    task: EvalTask,
    out: str | Path,
    settings: GenerationSettings,
    images_per_prompt: int,
    draw: Callable[[Case], torch.Tensor],
) -> None:
    """Write the missing images of ``task`` that come from no policy (a world's ground truth, a copy of the
    reference: ``draw(case)`` -> ``[3, H, W]`` in [0, 1]) where :func:`run_benchmark` looks for them.
    ``settings`` name the drawing (its ``policy``), so a folder of sampled images is refused."""
    out = Path(out)
    items = build_items(task.cases, images_per_prompt, settings.seed)
    config = {"task": task.name, **settings.as_dict(), **task.run_settings("reference")}
    _check_config(out, config, has_images=(out / "images").is_dir())
    for item in items:
        if not (out / item.image).is_file():
            save_png(_to_pil(draw(item.case)), out / item.image)


def prepare_reference(policy: Policy, image: torch.Tensor, reference_size: int | None = None) -> torch.Tensor:
    """The conditioning reference ``[3, h, w]`` of an image: the policy's own preprocessing
    (:meth:`Policy.prepare_references`: UNO keeps the aspect ratio at long side 512), or a square of side
    ``reference_size`` when one is given."""
    if reference_size is not None:
        return square_resize(image, reference_size)
    return policy.prepare_references([image])[0]


def _free_memory() -> None:
    """Give a dropped model's accelerator memory back before the next model loads (FLUX, then a 7B scorer).

    A full collection costs ~0.5 s with transformers' heaps, so CPU runs leave it to the interpreter."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def score_missing(
    task: EvalTask,
    rows: list[dict[str, Any]],
    out: Path,
    metrics: Sequence[str],
    metric_options: dict[str, dict[str, Any]],
    batch_size: int,
    identity_references: str = "reference",
    progress: bool = True,
    scores_path: Path | None = None,
    device: str | None = None,
) -> None:
    """Fill the missing metric cells of ``rows`` in place, metric by metric (:meth:`EvalTask.score_batch`);
    ``scores.csv`` is rewritten after each batch so that an interrupted run keeps what it scored. A
    non-finite score is stored as an empty cell, so the next run retries it."""
    cache: dict[tuple[str, int, bool], list[torch.Tensor]] = {}

    def resized(subject: str, size: int, every: bool) -> list[torch.Tensor]:
        """The conditioning reference, or every real image of the subject, at the generated size."""
        key = (subject, size, every)
        if key not in cache:
            images = task.identity_references(subject) if every else [task.reference(subject)]
            cache[key] = [square_resize(image, size) for image in images]
        return cache[key]

    columns = task.score_columns(metrics)
    for metric in metrics:
        todo = [row for row in rows if not _has_score(row, metric)]
        if not todo:
            continue
        reward = metric_info.build_metric(metric, metric_options.get(metric), device)
        bar = tqdm(total=len(todo), desc=f"{task.name}: {metric}", unit="img", disable=not progress)
        try:
            for batch in _batches(todo, batch_size):
                images = torch.stack([load_image(out / row["image"]) for row in batch])
                task.score_batch(reward, metric, batch, images, resized, identity_references)
                if scores_path is not None:
                    write_scores(scores_path, rows, columns)
                bar.update(len(batch))
        finally:
            bar.close()
            del reward
            _free_memory()


def _score_against_references(
    reward, images: torch.Tensor, references: Sequence[Sequence[torch.Tensor]], prompts, subjects
) -> torch.Tensor:
    """Mean score of each image ``[N, 3, H, W]`` over its list of references (usually one)."""
    total = torch.zeros(len(images), dtype=torch.float64)
    count = torch.zeros(len(images), dtype=torch.float64)
    for j in range(max(len(r) for r in references)):
        index = [i for i, r in enumerate(references) if len(r) > j]
        refs = torch.stack([references[i][j] for i in index])
        scores = torch.as_tensor(
            reward(images[index], refs, [prompts[i] for i in index], [subjects[i] for i in index])
        )
        total[index] += scores.detach().double().cpu().reshape(-1)
        count[index] += 1
    return (total / count).float()


def _row(item: Item, method: str, reference: str) -> dict[str, Any]:
    case = item.case
    return {
        "method": method,
        "subject": case.subject,
        "class": case.subject_class,
        "category": case.category,
        "kind": case.kind,
        "prompt": case.prompt,
        "seed": item.seed,
        "image": item.image,
        "reference": reference,
    }


def summarise(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    method: str,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Means and 95% bootstrap intervals per metric: overall, per category and per prompt kind."""

    def block(subset: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            m: bootstrap_mean(
                [parse_score(r.get(m)) for r in subset], n_resamples=n_resamples, seed=seed
            ).as_dict()
            for m in metrics
        }

    def grouped(key: str) -> dict[str, Any]:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            groups[str(row.get(key, ""))].append(row)
        return {name: {"n_images": len(g), "metrics": block(g)} for name, g in groups.items() if name}

    return {
        "method": method,
        "n_images": len(rows),
        "n_subjects": len({r["subject"] for r in rows}),
        "n_prompts": len({(r["subject"], r["prompt"]) for r in rows}),
        "metrics": block(rows),
        "per_category": grouped("category"),
        "per_kind": grouped("kind"),
        "labels": {m: metric_info.info(m).label for m in metrics},
        "criteria": {m: metric_info.info(m).criterion for m in metrics},
        "ci": {
            "confidence": 0.95,
            "method": "percentile bootstrap over images",
            "resamples": n_resamples,
            "seed": seed,
        },
    }


def format_interval(stat: dict[str, Any], digits: int = 3) -> str:
    mean, low, high = stat.get("mean"), stat.get("ci_low"), stat.get("ci_high")
    if mean is None or not math.isfinite(mean):
        return "–"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(summary: dict[str, Any], title: str, description: str = "") -> str:
    """Table 1's layout (method, then one column per metric, higher is better), one row per subject category
    and one overall, then a per-prompt-kind table."""
    metrics = list(summary["metrics"])
    labels = summary.get("labels", {})
    header = "| Method | Subjects | Images | " + " | ".join(f"{labels.get(m, m)} ↑" for m in metrics) + " |"
    rule = "|---|---|---:|" + "---:|" * len(metrics)
    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += [header, rule]
    method = summary["method"]
    for name, group in sorted(summary["per_category"].items()):
        cells = " | ".join(format_interval(group["metrics"][m]) for m in metrics)
        lines.append(f"| {method} | {name} | {group['n_images']} | {cells} |")
    cells = " | ".join(f"**{format_interval(summary['metrics'][m])}**" for m in metrics)
    lines.append(f"| {method} | overall | {summary['n_images']} | {cells} |")
    kinds = summary.get("per_kind", {})
    if len(kinds) > 1 and set(kinds) != set(summary["per_category"]):
        lines += ["", "Per prompt kind:", "", header.replace("Subjects", "Prompt kind"), rule]
        for name, group in sorted(kinds.items()):
            cells = " | ".join(format_interval(group["metrics"][m]) for m in metrics)
            lines.append(f"| {method} | {name} | {group['n_images']} | {cells} |")
    lines += [
        "",
        "Mean over images [95% percentile-bootstrap interval, images resampled with a fixed seed].",
        "",
    ]
    return "\n".join(lines)


def sample_grid(
    out: Path,
    rows: Sequence[dict[str, Any]],
    task: EvalTask,
    metrics: Sequence[str] = (),
    max_subjects: int = 8,
) -> Path | None:
    """``samples.png``: per case subject (its first prompt), the K references then its images; an image with
    a missing subject is framed red, one with a subject drawn twice orange (by the first of ``metrics`` that
    counts them: a multi-subject ``dino_seg``)."""
    counted = next((m for m in metrics if any(_has_score(r, f"{m}_missing") for r in rows)), None)
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_case[(row["subject"], row["prompt"])].append(row)
    chosen, seen = [], set()
    for (subject, _), case_rows in by_case.items():
        if subject not in seen and len(chosen) < max_subjects:
            seen.add(subject)
            chosen.append(sorted(case_rows, key=lambda r: int(Path(r["image"]).stem)))
    if not chosen:
        return None
    subjects = {case.subject: case.subjects for case in task.cases}
    references = [subjects[c[0]["subject"]] for c in chosen]
    count = min(len(c) for c in chosen)
    size = load_image(out / chosen[0][0]["image"]).shape[-1]
    columns = [
        torch.stack([square_resize(task.reference(refs[j]), size) for refs in references])
        for j in range(len(references[0]))
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


def _framed(image: torch.Tensor, colour: tuple[float, float, float], width: int = 2) -> torch.Tensor:
    framed = image.clone()
    value = torch.tensor(colour, dtype=image.dtype)[:, None, None]
    framed[:, :width], framed[:, -width:] = value, value
    framed[:, :, :width], framed[:, :, -width:] = value, value
    return framed


def run_benchmark(
    task: EvalTask,
    out: str | Path,
    settings: GenerationSettings,
    metrics: Sequence[str],
    metric_options: dict[str, dict[str, Any]] | None = None,
    images_per_prompt: int = 4,
    batch_size: int = 4,
    score_batch_size: int = 16,
    method: str | None = None,
    device: str = "cpu",
    identity_references: str = "reference",
    policy_factory: Callable[[], Any] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    ci_seed: int = 0,
    title: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate and score every (case, k) of ``task`` into ``out``; returns the summary (also written).
    One subject per case, or K (a :class:`cgrpo.eval.multi.MultiEvalTask`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = list(metrics)
    if identity_references not in ("reference", "all"):
        raise ConfigError(f"identity references must be 'reference' or 'all', got {identity_references!r}")
    metric_options = metric_options or {}
    metric_info.check_metrics(metrics)
    method = method or _default_method(settings)
    items = build_items(task.cases, images_per_prompt, settings.seed)
    run_settings = task.run_settings(identity_references)
    config = {"task": task.name, **settings.as_dict(), **run_settings}
    old_config = _check_config(out, config, has_images=(out / "images").is_dir())
    # Scores of a metric computed with other options (another checkpoint path, say) are not reused.
    old_options = old_config.get("metric_options", {})
    new_options = {m: _jsonable(metric_options.get(m, {})) for m in metrics}
    stale = set().union(
        *(task.metric_columns(m) for m in metrics if m in old_options and old_options[m] != new_options[m])
    )
    all_options = {**old_options, **new_options}
    atomic_write_json(out / CONFIG_FILE, {**config, "metric_options": all_options})

    factory = policy_factory or (lambda: build_eval_policy(settings, device))
    regenerated = {
        item.image for item in generate_missing(task, items, out, settings, factory, batch_size, progress)
    }

    columns = task.score_columns(metrics)
    scores_path = out / "scores.csv"
    previous = {row["image"]: row for row in read_scores(scores_path)}
    rows = []
    for item in items:
        row = _row(item, method, ";".join(task.reference_path(s) for s in item.case.subjects))
        old = previous.get(item.image)
        if old is not None and item.image not in regenerated:
            # Reuse finished scores; the descriptive columns are rebuilt from the task.
            row.update(
                {
                    k: v
                    for k, v in old.items()
                    if k not in BASE_COLUMNS and k not in stale and v not in (None, "")
                }
            )
        rows.append(row)
    write_scores(scores_path, rows, columns)
    score_missing(
        task,
        rows,
        out,
        metrics,
        metric_options,
        score_batch_size,
        identity_references,
        progress,
        scores_path,
        device,
    )
    write_scores(scores_path, rows, columns)

    summary = task.summarise(rows, metrics, method, n_resamples, ci_seed)
    summary.update(
        {
            "task": task.name,
            "images_per_prompt": images_per_prompt,
            "generation": settings.as_dict(),
            **run_settings,
        }
    )
    atomic_write_json(out / "summary.json", summary)
    description = task.describe(summary, settings, images_per_prompt)
    atomic_write_text(
        out / "table.md", task.markdown(summary, title or f"{task.name}: {method}", description)
    )
    sample_grid(out, rows, task, metrics)
    return summary


def _generation_text(settings: GenerationSettings) -> str:
    """``policy `mini` + LoRA `run/final`, 25 ODE steps, seed 0`` (the end of a table's description)."""
    if not settings.steps:  # drawn, not sampled (`cgrpo eval mini --draw ground-truth`)
        return f"images drawn by `{settings.policy}`, not sampled"
    lora = f" + LoRA `{settings.lora}`" if settings.lora else ""
    return f"policy `{settings.policy}`{lora}, {settings.steps} ODE steps, seed {settings.seed}"


def _default_method(settings: GenerationSettings) -> str:
    """``policy[@weights folder][+LoRA name]``, e.g. ``uno+customized_grpo`` for a run's ``final/`` LoRA."""
    label = settings.policy
    path = settings.policy_options.get("path")
    if path:
        label += f"@{Path(str(path)).name}"
    if settings.lora:
        lora = Path(settings.lora)
        label += f"+{lora.parent.name if lora.name == 'final' else lora.name}"
    return label
