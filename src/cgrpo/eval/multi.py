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

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from cgrpo.config import ConfigError
from cgrpo.eval import metrics as metric_info
from cgrpo.eval.runner import (
    Case,
    EvalTask,
    GenerationSettings,
    _generation_text,
    format_interval,
    markdown_table,
    parse_score,
    policy_image_size,
    square_resize,
    summarise,
)
from cgrpo.eval.stats import DEFAULT_RESAMPLES, bootstrap_mean
from cgrpo.policy.base import Policy
from cgrpo.rewards.base import score_subjects


@dataclass(frozen=True)
class MultiCase(Case):
    """A case with K subjects: ``subject`` is the group's id (``"cat+dog"``), ``subject_class`` its classes
    joined by ``" + "``; ``subjects`` and ``subject_classes`` list them one by one."""

    subjects: tuple[str, ...] = ()
    subject_classes: tuple[str, ...] = ()


@dataclass
class MultiEvalTask(EvalTask):
    """A multi-subject benchmark for :func:`cgrpo.eval.runner.run_benchmark`: its cases, each subject's
    reference (``[3, H, W]`` in [0, 1]) and path; generation, scoring and reports as the module says."""

    @property
    def num_subjects(self) -> int:
        counts = {len(case.subjects) for case in self.cases}
        if len(counts) != 1:
            raise ConfigError(
                f"{self.name}: every case needs the same number of subjects, got {sorted(counts)}"
            )
        return counts.pop()

    @cached_property
    def _cases(self) -> dict[str, MultiCase]:
        return {case.subject: case for case in self.cases}

    def run_settings(self, identity_references: str) -> dict[str, Any]:
        if identity_references != "reference":
            raise ConfigError(f"{self.name}: identity references other than 'reference' are not defined")
        return {"num_subjects": self.num_subjects}

    def prepare_reference(
        self, policy: Policy, image: torch.Tensor, reference_size: int | None
    ) -> torch.Tensor:
        """Each of the K references centre-cropped and resized to a square of ``reference_size`` (default the
        policy's image side). The one place to change when policies prepare their own references."""
        return square_resize(image, reference_size or policy_image_size(policy) or 512)

    def score_columns(self, metrics: Sequence[str]) -> list[str]:
        """Each metric, then its per-subject and weakest columns (identity metrics)."""
        columns: list[str] = []
        for metric in metrics:
            columns.append(metric)
            if metric_info.info(metric).criterion == "identity":
                columns += [*subject_columns(metric, self.num_subjects), f"{metric}_min"]
        return columns

    def metric_columns(self, metric: str) -> set[str]:
        extra = [f"{metric}_min", f"{metric}_missing", f"{metric}_confused"]
        return {metric, *subject_columns(metric, self.num_subjects), *extra}

    def score_batch(self, reward, metric, rows, images, resized, identity_references) -> None:
        """Identity metrics: each subject's score, their mean and minimum, and the assignment's failure
        counts when the reward reports them; prompt metrics: once per image (with its first reference)."""
        size = images.shape[-1]
        prompts = [row["prompt"] for row in rows]
        group = [self._cases[row["subject"]] for row in rows]
        k = len(group[0].subjects)
        references = [torch.stack([resized(c.subjects[j], size, False)[0] for c in group]) for j in range(k)]
        classes = [[c.subject_classes[j] for c in group] for j in range(k)]
        if metric_info.info(metric).criterion == "identity":
            _fill_identity(rows, metric, reward, images, references, prompts, classes)
        else:
            scores = torch.as_tensor(reward(images, references[0], prompts, classes[0])).float()
            for row, score in zip(rows, scores.tolist(), strict=True):
                row[metric] = score

    def summarise(self, rows, metrics, method, n_resamples, seed) -> dict[str, Any]:
        return summarise_multi(rows, metrics, method, self.num_subjects, n_resamples=n_resamples, seed=seed)

    def describe(self, summary: dict[str, Any], settings: GenerationSettings, images_per_prompt: int) -> str:
        k = self.num_subjects
        return (
            f"{summary['n_images']} images: {summary['n_pairs']} groups of {k} subjects, "
            f"{summary['n_prompts']} (group, prompt) pairs, {images_per_prompt} images each; "
            f"{_generation_text(settings)}. "
            f"Identity metrics: the mean over each image's {k} references."
        )

    def markdown(self, summary: dict[str, Any], title: str, description: str) -> str:
        return markdown_multi(summary, title, description)


def subject_columns(metric: str, k: int) -> list[str]:
    """``dino`` -> ``dino_s1 .. dino_sK`` (one column per subject, first = 1)."""
    return [f"{metric}_s{j + 1}" for j in range(k)]


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


# --- summary, table --------------------------------------------------------------------------------------


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
