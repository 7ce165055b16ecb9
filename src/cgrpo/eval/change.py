"""The change from one evaluation to another of the same images: ``cgrpo eval change BEFORE AFTER``.

Two ``cgrpo eval`` folders of the same task, images and seeds (e.g. the base and a trained LoRA) hold one
row per image in the same order. Their difference image by image removes the spread between prompts, so the
95% interval of a mean change is far narrower than that of either mean (the demo report's reading, for any
two evaluations). Groups: all images, each subject category, each prompt kind and, for mini-world prompts,
each thing a prompt asks for (``color: teal``, ``pattern: stripes``, ``upside down``, ``position: top
left``, ...): a word-specific edit that is learnt or not shows there, where a kind's mean mixes a dozen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from cgrpo.eval.runner import BASE_COLUMNS, parse_score, read_scores
from cgrpo.train.heldout import ci95

PAIR_KEYS = ("subject", "prompt", "seed")


def paired_change(before: Sequence[float], after: Sequence[float]) -> dict[str, float | int]:
    """``{"before", "after", "change", "ci95", "n"}`` over the pairs where both scores are finite: the means,
    the mean of ``after - before`` and the half-width of its 95% normal interval (NaN below two pairs)."""
    if len(before) != len(after):
        raise ValueError(f"paired scores differ in length: {len(before)} before, {len(after)} after")
    x = torch.tensor(list(before), dtype=torch.float64)
    y = torch.tensor(list(after), dtype=torch.float64)
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    nan = float("nan")
    return {
        "before": float(x.mean()) if n else nan,
        "after": float(y.mean()) if n else nan,
        "change": float((y - x).mean()) if n else nan,
        "ci95": ci95(y - x),
        "n": n,
    }


def asked_labels(prompt: str) -> list[str]:
    """What a mini-world prompt asks for, one label per field of its parsed :class:`PromptSpec` but the shape
    (none for a plain prompt or a prompt that is not the mini world's)."""
    from cgrpo.data.miniworld import parse_prompt

    try:
        spec = parse_prompt(prompt)
    except ValueError:
        return []
    labels = []
    for field in fields(spec):
        value = getattr(spec, field.name)
        if field.name != "shape" and value:
            labels.append(field.name.replace("_", " ") if value is True else f"{field.name}: {value}")
    return labels


def check_pairs(
    before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], names: tuple[str, str]
) -> None:
    """Raise unless the two evaluations list the same images in the same order (subject, prompt, seed)."""
    if len(before) != len(after):
        raise ValueError(
            f"{names[0]} has {len(before)} images and {names[1]} has {len(after)}: evaluate both with the "
            "same task options (subjects, prompts per kind, images per prompt, seed)"
        )
    for index, (a, b) in enumerate(zip(before, after, strict=True)):
        if any(str(a.get(k)) != str(b.get(k)) for k in PAIR_KEYS):
            first = ", ".join(f"{k} {a.get(k)!r}" for k in PAIR_KEYS)
            second = ", ".join(f"{k} {b.get(k)!r}" for k in PAIR_KEYS)
            raise ValueError(
                f"image {index} differs: {names[0]} has {first}, {names[1]} has {second}; evaluate both "
                "with the same task options and seed"
            )


def change_summary(
    before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], metrics: Sequence[str]
) -> dict[str, dict[str, dict[str, float | int]]]:
    """``{group: {metric: paired_change}}`` over rows already paired by :func:`check_pairs`; groups ``all``,
    ``category: X``, ``kind: Y`` (where kinds are not the categories) and ``asked: Z`` (see the module
    docstring)."""
    # The mini world's categories are its prompt kinds: kinds get groups of their own only where they differ.
    keys = ["category"] + (["kind"] if any(r.get("kind") != r.get("category") for r in before) else [])
    groups: dict[str, list[int]] = {"all": list(range(len(before)))}
    for index, row in enumerate(before):
        labels = [f"{key}: {row[key]}" for key in keys if row.get(key)]
        labels += [f"asked: {label}" for label in asked_labels(str(row.get("prompt", "")))]
        for label in labels:
            groups.setdefault(label, []).append(index)
    order = ["all"] + [f"{key}:" for key in keys] + ["asked:"]
    ranked = sorted(groups, key=lambda g: (next(i for i, p in enumerate(order) if g.startswith(p)), g))
    return {
        group: {
            m: paired_change(
                [parse_score(before[i].get(m)) for i in indices],
                [parse_score(after[i].get(m)) for i in indices],
            )
            for m in metrics
        }
        for group, indices in ((g, groups[g]) for g in ranked)
    }


def shared_metrics(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> list[str]:
    """The score columns both evaluations have (every column but the row's description)."""
    first = [k for k in (before[0] if before else {}) if k not in BASE_COLUMNS]
    return [k for k in first if after and k in after[0]]


def read_evaluation(folder: Path) -> list[dict[str, str]]:
    """The rows of ``folder/scores.csv``; an error naming the folder when there are none."""
    rows = read_scores(folder / "scores.csv")
    if not rows:
        raise ValueError(f"{folder}: no scores.csv rows (expected a folder written by `cgrpo eval`)")
    return rows


def markdown(summary: dict[str, dict[str, dict[str, float | int]]], before: str, after: str) -> str:
    """``change.md``: one row per group of :func:`change_summary`, one column per metric."""
    metrics = list(next(iter(summary.values()))) if summary else []
    lines = [
        f"# Change from {before} to {after}",
        "",
        "Per image (same subject, prompt and seed): the mean of after - before, with the half-width of its "
        "95% normal interval.",
        "",
        "| images | n | " + " | ".join(f"{m}: before → after (change ± 95%)" for m in metrics) + " |",
        "|---|---:|" + "---|" * len(metrics),
    ]
    for group, by_metric in summary.items():
        n = max(int(c["n"]) for c in by_metric.values())
        cells = []
        for c in by_metric.values():
            if not c["n"] or not math.isfinite(float(c["change"])):
                cells.append("–")
                continue
            interval = f" ± {c['ci95']:.3f}" if math.isfinite(float(c["ci95"])) else ""
            cells.append(f"{c['before']:.3f} → {c['after']:.3f} ({c['change']:+.3f}{interval})")
        lines.append(f"| {group} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
