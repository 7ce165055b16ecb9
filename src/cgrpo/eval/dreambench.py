"""DreamBench (Ruiz et al., 2023) as an evaluation task: 30 subjects x 25 prompts, object and live subjects.

The folder is the DreamBooth release's ``dataset/``: one folder of photos per subject and
``prompts_and_classes.txt``. A user's full-size copy works as is; ``shared/data/dreambench`` in this project
holds 512x512 copies. Parsing, prompts, the object/live category and the prompt kind (``context``,
``accessory``, ``property``) come from :mod:`cgrpo.data.dreambench`, the one reader of that folder.

Prompts are formatted without a unique token by default (``"a dog in the jungle"``), as finetuning-free
methods such as UNO are evaluated; ``unique_token="sks"`` gives DreamBooth's ``"a sks dog ..."``.
``prompts_per_subject=N`` keeps the *first* N prompts of each subject's list (the dataset reader spreads them
instead), so a short evaluation is a prefix of the full one.

The conditioning reference of a subject is its first photo in sorted file order (``reference_index``);
identity metrics can instead be averaged over all its photos (DreamBooth's protocol).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

from cgrpo.config import ConfigError
from cgrpo.data.dreambench import (
    PROMPTS_FILE,
    DreamBenchItem,
    dreambench_examples,
    multi_subject_examples,
    parse_prompts_and_classes,
)
from cgrpo.data.formats import DatasetError
from cgrpo.eval.multi import MultiCase, MultiEvalTask
from cgrpo.eval.runner import Case, EvalTask, load_image

ENV_VAR = "CGRPO_DREAMBENCH"


def find_root(root: str | Path | None = None) -> Path:
    """The DreamBench folder: ``root``, else ``$CGRPO_DREAMBENCH``, else a ``shared/data/dreambench`` beside
    the working directory or the repository (any parent). Raises a :class:`ConfigError` saying what to pass.
    """
    if root is None and os.environ.get(ENV_VAR):
        root = os.environ[ENV_VAR]
    if root is not None:
        path = Path(root).expanduser()
        if not (path / PROMPTS_FILE).is_file():
            raise ConfigError(f"{path} is not a DreamBench folder: expected {path / PROMPTS_FILE}")
        return path
    starts = [Path.cwd(), Path(__file__).resolve()]
    for start in starts:
        for base in [start, *start.parents]:
            candidate = base / "shared" / "data" / "dreambench"
            if (candidate / PROMPTS_FILE).is_file():
                return candidate
    raise ConfigError(
        "DreamBench not found: pass --dreambench-root PATH (the DreamBooth dataset folder with "
        f"{PROMPTS_FILE} and one folder per subject) or set {ENV_VAR}"
    )


def _items(
    root: Path, subjects: list[str] | None, prompts_per_subject: int | None, unique_token: str
) -> list[DreamBenchItem]:
    """The dataset reader's items of ``subjects`` (all when None or empty), the first N prompts each."""
    try:
        classes = parse_prompts_and_classes(root / PROMPTS_FILE).classes
        if subjects:
            unknown = [s for s in subjects if s not in classes]
            if unknown:
                raise ConfigError(
                    f"unknown DreamBench subject(s) {', '.join(unknown)}; known: {', '.join(classes)}"
                )
        if prompts_per_subject is not None and prompts_per_subject < 1:
            raise ConfigError(f"--prompts-per-subject must be at least 1, got {prompts_per_subject}")
        items = dreambench_examples(root, subjects or None, unique_token=unique_token)
    except DatasetError as error:
        raise ConfigError(str(error)) from error
    if prompts_per_subject is None:
        return items
    return [item for item in items if item.prompt_index < prompts_per_subject]


def _case(item: DreamBenchItem) -> Case:
    return Case(item.subject, item.subject_class, item.category, item.prompt_type, item.prompt)


def dreambench_cases(
    root: Path,
    subjects: list[str] | None = None,
    prompts_per_subject: int | None = None,
    unique_token: str = "",
) -> list[Case]:
    """Every (subject, prompt) of DreamBench, or of the named ``subjects`` with the first N prompts each."""
    return [_case(item) for item in _items(root, subjects, prompts_per_subject, unique_token)]


def dreambench_task(
    root: str | Path | None = None,
    subjects: list[str] | None = None,
    prompts_per_subject: int | None = None,
    unique_token: str = "",
    reference_index: int = 0,
) -> EvalTask:
    """DreamBench as an :class:`EvalTask` (references loaded lazily and cached)."""
    items = _items(find_root(root).resolve(), subjects, prompts_per_subject, unique_token)
    photos = {item.subject: item.references for item in items}  # sorted by name

    def reference_file(subject: str) -> Path:
        files = photos[subject]
        if not 0 <= reference_index < len(files):
            raise ConfigError(
                f"--reference-index {reference_index}: subject {subject!r} has {len(files)} images"
            )
        return files[reference_index]

    @cache
    def reference(subject: str) -> torch.Tensor:
        return load_image(reference_file(subject))

    def all_references(subject: str) -> list[torch.Tensor]:
        first = reference_file(subject)
        # The conditioning reference first, then the others in file order.
        return [reference(subject)] + [load_image(f) for f in photos[subject] if f != first]

    return EvalTask(
        name="dreambench",
        cases=[_case(item) for item in items],
        reference=lambda subject: reference(subject).clone(),
        reference_path=lambda subject: str(reference_file(subject)),
        identity_references=all_references,
    )


def dreambench_multi_task(
    root: str | Path | None = None,
    protocol: str | Path | None = None,
    pairs: list[str] | None = None,
    prompts_per_pair: int | None = None,
) -> MultiEvalTask:
    """DreamBench's multi-subject track (``ROOT/multi_subject.json``, UNO's 30 pairs x 25 prompts, or the
    ``protocol`` file given) as a :class:`MultiEvalTask`; ``pairs``: only these ``"a+b"`` pairs; the first
    ``prompts_per_pair`` prompts of each. References are the protocol's photos, loaded lazily and cached."""
    try:
        items = multi_subject_examples(find_root(root).resolve(), protocol, pairs or None, prompts_per_pair)
    except DatasetError as error:
        raise ConfigError(str(error)) from error
    photos: dict[str, Path] = {}
    for item in items:
        for subject, path in zip(item.subjects, item.references, strict=True):
            if photos.setdefault(subject, path) != path:
                raise ConfigError(
                    f"subject {subject!r} has two reference photos in the protocol ({photos[subject].name}, "
                    f"{path.name}); one photo per subject is expected"
                )

    @cache
    def reference(subject: str) -> torch.Tensor:
        return load_image(photos[subject])

    cases = [
        MultiCase(
            item.pair,
            " + ".join(item.subject_classes),
            item.category,
            item.prompt_type,
            item.prompt,
            subjects=item.subjects,
            subject_classes=item.subject_classes,
        )
        for item in items
    ]
    return MultiEvalTask(
        name="dreambench_multi",
        cases=cases,
        reference=lambda subject: reference(subject).clone(),
        reference_path=lambda subject: str(photos[subject]),
    )
