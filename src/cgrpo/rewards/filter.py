"""Rank a paired dataset by reward scores and keep the best fraction (the paper's filtered 10k SynCD pairs).

Each record's *target* image (its reference with ``score_target=False``) is scored against the record's
first reference, prompt and subject class by every chosen reward (``cgrpo.rewards.build(name, **options)``).
Each reward's scores are z-scored over the whole dataset, ``(s - mean) / std``, and the z-scores averaged,
so rewards on different scales (a cosine similarity, an HPS score) weigh the same; the paper ranked its
pairs by DINOv2 similarity and aesthetics, e.g. ``rewards=["dino", "hpsv3"]``.

``meta.KEY`` is a pseudo-reward that reads the number ``meta[KEY]`` of each record and loads no model,
e.g. ``meta.syncd_dino`` / ``meta.syncd_aesthetics``, the scores SynCD ships (see :mod:`cgrpo.data.syncd`).

A record with a non-finite score (a reward may return NaN, e.g. when no subject is detected) ranks last
and is never kept. Ties keep the dataset's order. The kept records are written in the dataset's order;
``scores.csv`` lists every record by rank with its raw and z-scores. Both files are written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cgrpo.data.formats import (
    DatasetError,
    ImageSize,
    Record,
    fit,
    missing_files,
    open_rgb,
    pil_to_tensor,
    read_records,
    write_jsonl,
)
from cgrpo.data.validate import validate_dataset
from cgrpo.io import atomic_write_text
from cgrpo.rewards.base import build as build_reward

META_PREFIX = "meta."


@dataclass
class FilterResult:
    out_jsonl: Path
    scores_csv: Path
    total: int
    kept: int
    non_finite: dict[str, int] = field(default_factory=dict)  # reward -> records it scored NaN/inf


def zscore(values: np.ndarray) -> np.ndarray:
    """``(v - mean) / std`` over the finite entries (0 where std is 0); non-finite entries stay NaN."""
    finite = np.isfinite(values)
    out = np.full(values.shape, np.nan)
    if finite.any():
        mean, std = values[finite].mean(), values[finite].std()
        out[finite] = (values[finite] - mean) / std if std > 0 else 0.0
    return out


def _meta_scores(records: Sequence[Record], key: str) -> np.ndarray:
    scores = np.empty(len(records))
    problems: list[str] = []
    for index, record in enumerate(records):
        value = record.meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{record.source}:{record.line}: record '{record.id}' has no number meta.{key}")
            continue
        scores[index] = float(value)
    if problems:
        raise DatasetError(f"cannot rank by meta.{key} ({len(problems)} record(s) lack it):", problems)
    return scores


def _batch_images(paths: Sequence[Path], image_size: ImageSize | None) -> torch.Tensor | list[Image.Image]:
    images = [open_rgb(path) for path in paths]
    if image_size is None:
        return images  # rewards do their own preprocessing of PIL images of any size
    return torch.stack([pil_to_tensor(fit(image, image_size)) for image in images])


def _fmt(value: float) -> str:
    return format(value, ".6g")


def filter_dataset(
    dataset_path: str | Path,
    rewards: Sequence[str],
    reward_options: Mapping[str, Mapping[str, Any]] | None,
    keep_fraction: float,
    out_jsonl: str | Path,
    batch_size: int = 16,
    score_target: bool = True,
    *,
    keep_count: int | None = None,
    image_size: ImageSize | None = None,
    scores_csv: str | Path | None = None,
    split: str | None = None,
    validate: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> FilterResult:
    """Keep the best-scoring ``keep_fraction`` (rounded up) or ``keep_count`` records of a dataset.

    ``reward_options`` maps a reward name to its build options, e.g. ``{"dino": {"path": ...}}``.
    ``image_size``: score tensors ``[N, 3, H, W]`` resized/center-cropped to it (else PIL images, any size).
    ``scores_csv`` defaults to ``scores.csv`` beside ``out_jsonl``. The dataset is validated first.
    """
    rewards = list(rewards)
    if not rewards:
        raise ValueError("give at least one reward to rank the dataset by")
    if len(set(rewards)) != len(rewards):
        raise ValueError(f"a reward is listed twice in {rewards}")
    options = {name: dict(value) for name, value in (reward_options or {}).items()}
    stray = sorted(set(options) - set(rewards))
    if stray:
        raise ValueError(f"reward_options names {stray}, which are not among the rewards {rewards}")
    if keep_count is None and not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if keep_count is not None and keep_count < 1:
        raise ValueError(f"keep_count must be at least 1, got {keep_count}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out_jsonl = Path(out_jsonl)
    scores_path = Path(scores_csv) if scores_csv is not None else out_jsonl.parent / "scores.csv"

    records = read_records(dataset_path, split)
    if score_target:
        untargeted = [
            f"{r.source}:{r.line}: record '{r.id}' has no target" for r in records if r.target is None
        ]
        if untargeted:
            raise DatasetError(
                f"cannot score targets: {len(untargeted)} record(s) have none (use score_target=False "
                "to score the references):",
                untargeted,
            )
    if validate:
        validate_dataset(records, image_size)
    else:
        missing = missing_files(records)
        if missing:
            raise DatasetError(f"dataset {dataset_path} has missing images:", map(str, missing))

    n = len(records)
    raw = np.full((len(rewards), n), np.nan)
    models: list[tuple[int, Any]] = []
    for k, name in enumerate(rewards):
        if name.startswith(META_PREFIX):
            raw[k] = _meta_scores(records, name[len(META_PREFIX) :])
        else:
            models.append((k, build_reward(name, **options.get(name, {}))))

    if models:
        for start in range(0, n, batch_size):
            batch = records[start : start + batch_size]
            scored = [r.target if score_target else r.reference for r in batch]
            images = _batch_images(scored, image_size)  # type: ignore[arg-type]
            references = _batch_images([r.reference for r in batch], image_size)
            prompts = [r.prompt for r in batch]
            subjects = [r.subject_class for r in batch]
            for k, reward in models:
                with torch.no_grad():
                    scores = torch.as_tensor(
                        reward(images, references, prompts, subjects), dtype=torch.float64
                    )
                scores = scores.reshape(-1).cpu()
                if scores.numel() != len(batch):
                    raise RuntimeError(
                        f"reward '{rewards[k]}' returned {scores.numel()} scores for {len(batch)} images"
                    )
                raw[k, start : start + len(batch)] = scores.numpy()
            if progress is not None:
                progress(start + len(batch), n)

    z = np.stack([zscore(row) for row in raw])
    combined = z.mean(axis=0)  # NaN wherever any reward was non-finite
    finite = np.isfinite(combined)
    combined = np.where(finite, combined, -np.inf)
    order = sorted(range(n), key=lambda i: (-combined[i], i))
    wanted = keep_count if keep_count is not None else math.ceil(keep_fraction * n - 1e-9)
    keep = min(wanted, n, int(finite.sum()))
    kept = set(order[:keep])

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(
        ["rank", "kept", "id", "subject", "source", "line", "score"]
        + [column for name in rewards for column in (name, f"{name}_z")]
    )
    for rank, i in enumerate(order, start=1):
        record = records[i]
        per_reward = [_fmt(value) for k in range(len(rewards)) for value in (raw[k, i], z[k, i])]
        writer.writerow(
            [rank, int(i in kept), record.id, record.subject, record.source, record.line, _fmt(combined[i])]
            + per_reward
        )
    atomic_write_text(scores_path, table.getvalue())
    write_jsonl([records[i] for i in range(n) if i in kept], out_jsonl)
    non_finite = {name: int((~np.isfinite(raw[k])).sum()) for k, name in enumerate(rewards)}
    return FilterResult(
        out_jsonl=out_jsonl,
        scores_csv=scores_path,
        total=n,
        kept=keep,
        non_finite={name: count for name, count in non_finite.items() if count},
    )
