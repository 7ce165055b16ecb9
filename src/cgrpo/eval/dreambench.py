"""DreamBench (Ruiz et al., 2023) as an evaluation task: 30 subjects x 25 prompts, object and live subjects.

The folder is the DreamBooth release's ``dataset/``: one folder of photos per subject and
``prompts_and_classes.txt`` (a ``subject_name,class`` list, then the 25 object prompts and the 25 live-subject
prompts as Python ``'...'.format(unique_token, class_token)`` lines). A user's full-size copy works as is;
``shared/data/dreambench`` in this project holds 512x512 copies.

Prompts are formatted without a unique token by default (``"a dog in the jungle"``), as finetuning-free
methods such as UNO are evaluated; ``unique_token="sks"`` gives DreamBooth's ``"a sks dog ..."``.
Live subjects are the animals (classes ``cat`` and ``dog``), every other subject is an object. Prompt kinds
follow the prompt lists' order: 0-9 recontextualisation (``context``), 10-19 ``context`` for objects and
``accessory`` for live subjects, 20-24 ``property`` (colour, material, shape).

The conditioning reference of a subject is its first photo in sorted file order (``reference_index``);
identity metrics can instead be averaged over all its photos (DreamBooth's protocol).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from cgrpo.config import ConfigError
from cgrpo.eval.runner import Case, EvalTask, load_image

ENV_VAR = "CGRPO_DREAMBENCH"
PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"cat", "dog"})
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_TEMPLATE = re.compile(r"""^\s*(['"])(.*?)\1\s*\.format\(""")


@dataclass(frozen=True)
class DreamBenchSpec:
    """Parsed ``prompts_and_classes.txt``: subject -> class, and the two lists of prompt templates."""

    classes: dict[str, str]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]


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


def parse_prompts_and_classes(path: str | Path) -> DreamBenchSpec:
    """Read DreamBench's ``prompts_and_classes.txt``."""
    path = Path(path)
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        lowered = line.lower()
        if lowered == "classes":
            section = "classes"
        elif lowered.startswith("object prompts"):
            section = "object"
        elif lowered.startswith("live subject prompts"):
            section = "live"
        elif section == "classes" and "," in line and not lowered.startswith("subject_name"):
            subject, cls = (part.strip() for part in line.split(",", 1))
            classes[subject] = cls
        elif section in lists and (match := _TEMPLATE.match(line)):
            lists[section].append(match.group(2))
    if not classes or not lists["object"] or not lists["live"]:
        raise ConfigError(
            f"{path}: expected a 'subject_name,class' list and 'Object Prompts' / 'Live Subject Prompts' "
            "lists"
        )
    return DreamBenchSpec(classes, tuple(lists["object"]), tuple(lists["live"]))


def format_prompt(template: str, subject_class: str, unique_token: str = "") -> str:
    """``'a {0} {1} in the snow'`` -> ``"a dog in the snow"`` (or ``"a sks dog ..."`` with a token)."""
    return " ".join(template.format(unique_token, subject_class).split())


def category(subject_class: str) -> str:
    return "live" if subject_class in LIVE_CLASSES else "object"


def prompt_kind(index: int, live: bool) -> str:
    if index >= 20:
        return "property"
    if index >= 10 and live:
        return "accessory"
    return "context"


def subject_images(root: Path, subject: str) -> list[Path]:
    folder = root / subject
    files = (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    )
    if not files:
        raise ConfigError(f"{folder}: no images of subject {subject!r} (expected .jpg/.png files)")
    return files


def dreambench_cases(
    root: Path,
    subjects: list[str] | None = None,
    prompts_per_subject: int | None = None,
    unique_token: str = "",
) -> list[Case]:
    """Every (subject, prompt) of DreamBench, or of the named ``subjects`` with the first N prompts each."""
    spec = parse_prompts_and_classes(root / PROMPTS_FILE)
    if subjects:
        unknown = [s for s in subjects if s not in spec.classes]
        if unknown:
            raise ConfigError(
                f"unknown DreamBench subject(s) {', '.join(unknown)}; known: {', '.join(spec.classes)}"
            )
    if prompts_per_subject is not None and prompts_per_subject < 1:
        raise ConfigError(f"--prompts-per-subject must be at least 1, got {prompts_per_subject}")
    cases = []
    for subject in subjects or list(spec.classes):
        cls = spec.classes[subject]
        live = category(cls) == "live"
        templates = spec.live_prompts if live else spec.object_prompts
        for index, template in enumerate(templates[:prompts_per_subject]):
            prompt = format_prompt(template, cls, unique_token)
            cases.append(Case(subject, cls, category(cls), prompt_kind(index, live), prompt))
    return cases


def dreambench_task(
    root: str | Path | None = None,
    subjects: list[str] | None = None,
    prompts_per_subject: int | None = None,
    unique_token: str = "",
    reference_index: int = 0,
) -> EvalTask:
    """DreamBench as an :class:`EvalTask` (references loaded lazily and cached)."""
    root = find_root(root).resolve()
    cases = dreambench_cases(root, subjects, prompts_per_subject, unique_token)

    def reference_file(subject: str) -> Path:
        files = subject_images(root, subject)
        if not 0 <= reference_index < len(files):
            raise ConfigError(
                f"--reference-index {reference_index}: subject {subject!r} has {len(files)} images"
            )
        return files[reference_index]

    @cache
    def reference(subject: str) -> torch.Tensor:
        return load_image(reference_file(subject))

    def all_references(subject: str) -> list[torch.Tensor]:
        files = subject_images(root, subject)
        first = reference_file(subject)
        # The conditioning reference first, then the others in file order.
        return [reference(subject)] + [load_image(f) for f in files if f != first]

    return EvalTask(
        name="dreambench",
        cases=cases,
        reference=lambda subject: reference(subject).clone(),
        reference_path=lambda subject: str(reference_file(subject)),
        identity_references=all_references,
    )
