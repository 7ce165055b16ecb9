"""DreamBench (DreamBooth's benchmark): parse the official folder and turn it into prompts and records.

Supported layout (the official release, e.g. the project's copy under ``shared/data/dreambench``)::

    ROOT/prompts_and_classes.txt     the official file, see below
    ROOT/SUBJECT/*.{jpg,jpeg,png}    reference images of each subject (30 subjects, 4-6 images each)

``prompts_and_classes.txt`` has a ``Classes`` section of ``subject_name,class`` lines, then an
``Object Prompts`` and a ``Live Subject Prompts`` section, each a Python list of lines such as
``'a {0} {1} in the jungle'.format(unique_token, class_token),`` (25 templates each).

Prompts: DreamBooth puts a rare *unique token* before the class (``"a sks dog in the jungle"``) because it
fine-tunes one model per subject. Encoder-style models (UNO and the models this project trains) see the
subject through the reference image, so by default we render ``{0}`` as nothing and collapse the spaces:
``"a dog in the jungle"`` (the "a {class}" style). Pass ``unique_token="sks"`` for DreamBooth-style prompts.

Live subjects are the subjects whose class is ``cat`` or ``dog`` (DreamBench's 9 pets); they get the live
prompt list, the 21 others the object list. Each prompt also gets a type for per-kind reports
(``Example.kind``): ``property`` when the template puts a word between "a" and the subject (``"a red
{0} {1}"``), ``accessory`` for live prompts with "wearing" or "outfit", else ``context``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cgrpo.data.formats import (
    IMAGE_SUFFIXES,
    DatasetError,
    ImageSize,
    JsonlDataset,
    Record,
    write_jsonl,
)

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"cat", "dog"})

_QUOTED = re.compile(r"""^\s*(?P<q>['"])(?P<template>.*?)(?P=q)\s*(\.format\(.*\))?\s*,?\s*$""")


@dataclass(frozen=True)
class DreamBenchSpec:
    """``prompts_and_classes.txt``: templates use ``{0}`` (unique token) and ``{1}`` (class)."""

    classes: dict[str, str]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]


@dataclass(frozen=True)
class DreamBenchItem:
    """One (subject, prompt) evaluation case; images are paths, not loaded."""

    id: str  # "SUBJECT/NN", NN the prompt's index in its list
    subject: str
    subject_class: str
    category: str  # "object" | "live"
    prompt: str
    prompt_index: int
    prompt_type: str  # "context" | "accessory" | "property"
    template: str
    references: tuple[Path, ...]  # sorted by name; the first is the primary reference

    @property
    def reference(self) -> Path:
        return self.references[0]

    def to_record(self) -> Record:
        meta = {"category": self.category, "prompt_index": self.prompt_index, "template": self.template}
        return Record(
            id=self.id,
            references=self.references,
            subject_class=self.subject_class,
            prompt=self.prompt,
            kind=self.prompt_type,
            subject=self.subject,
            meta=meta,
            source=str(self.references[0].parent),
            line=self.prompt_index + 1,
        )


def render(template: str, subject_class: str, unique_token: str = "") -> str:
    """``'a {0} {1} in the snow'`` -> ``'a dog in the snow'`` (single spaces)."""
    return " ".join(template.format(unique_token, subject_class).split())


def prompt_type(template: str, category: str) -> str:
    if not re.match(r"^an?\s+\{0\}\s*\{1\}", template.strip()):
        return "property"
    if category == "live" and re.search(r"\b(wearing|outfit)\b", template):
        return "accessory"
    return "context"


def parse_prompts_and_classes(path: str | Path) -> DreamBenchSpec:
    """Parse DreamBench's ``prompts_and_classes.txt``; raise :class:`DatasetError` naming bad lines."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} not found: a DreamBench folder has the official {PROMPTS_FILE}")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    problems: list[str] = []
    section = ""
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        heading = line.lower()
        if heading == "classes":
            section = "classes"
        elif heading == "object prompts":
            section = "object"
        elif heading in ("live subject prompts", "live prompts"):
            section = "live"
        elif heading == "prompts":
            section = ""
        elif not line or line.startswith(("prompt_list", "]", "#")):
            continue
        elif section == "classes":
            name, _, cls = line.partition(",")
            if name.strip() == "subject_name":
                continue
            if not name.strip() or not cls.strip():
                problems.append(f"{path}:{number}: expected 'subject_name,class', got {line!r}")
            else:
                classes[name.strip()] = cls.strip()
        elif section in lists:
            match = _QUOTED.match(line)
            template = match.group("template") if match else ""
            try:
                ok = match is not None and "{1}" in template and bool(render(template, "x"))
            except (IndexError, KeyError, ValueError):
                ok = False
            if not ok:
                problems.append(f"{path}:{number}: expected a quoted template with {{0}} {{1}}, got {line!r}")
            else:
                lists[section].append(template)
    if not classes:
        problems.append(f"{path}: no 'Classes' section with subject_name,class lines")
    for name, templates in lists.items():
        if not templates:
            problems.append(f"{path}: no {name} prompt list")
    if problems:
        raise DatasetError(f"{path} is not a DreamBench {PROMPTS_FILE}:", problems)
    return DreamBenchSpec(classes, tuple(lists["object"]), tuple(lists["live"]))


def _spread(count: int, keep: int | None) -> list[int]:
    """``keep`` indices spread evenly over ``range(count)`` (so a short run still sees every prompt type)."""
    if keep is None or keep >= count:
        return list(range(count))
    if keep <= 0:
        raise ValueError(f"prompts_per_subject must be positive, got {keep}")
    return [(i * count) // keep for i in range(keep)]


def dreambench_examples(
    root: str | Path,
    subjects: Iterable[str] | None = None,
    prompts_per_subject: int | None = None,
    unique_token: str = "",
    live_classes: Iterable[str] = LIVE_CLASSES,
) -> list[DreamBenchItem]:
    """Every (subject, prompt) case of a DreamBench folder: 30 subjects x 25 prompts for the official one.

    ``subjects``: keep these subject folders (in the given order); ``prompts_per_subject``: keep that many
    prompts per subject, evenly spaced over its list (indices ``i * 25 // k``), all when None.
    """
    root = Path(root).absolute()
    spec = parse_prompts_and_classes(root / PROMPTS_FILE)
    names = list(subjects) if subjects is not None else list(spec.classes)
    unknown = [name for name in names if name not in spec.classes]
    if unknown:
        raise DatasetError(f"unknown DreamBench subject(s) {unknown}; known: {', '.join(spec.classes)}")
    live = set(live_classes)
    problems: list[str] = []
    items: list[DreamBenchItem] = []
    for subject in names:
        folder = root / subject
        refs = (
            tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
            if folder.is_dir()
            else ()
        )
        if not refs:
            problems.append(f"{folder}: no reference images for subject '{subject}'")
            continue
        cls = spec.classes[subject]
        category = "live" if cls in live else "object"
        templates = spec.live_prompts if category == "live" else spec.object_prompts
        for index in _spread(len(templates), prompts_per_subject):
            template = templates[index]
            items.append(
                DreamBenchItem(
                    id=f"{subject}/{index:02d}",
                    subject=subject,
                    subject_class=cls,
                    category=category,
                    prompt=render(template, cls, unique_token),
                    prompt_index=index,
                    prompt_type=prompt_type(template, category),
                    template=template,
                    references=refs,
                )
            )
    if problems:
        raise DatasetError(f"DreamBench folder {root} is incomplete:", problems)
    return items


def import_dreambench(
    root: str | Path,
    out_jsonl: str | Path,
    subjects: Sequence[str] | None = None,
    prompts_per_subject: int | None = None,
    unique_token: str = "",
) -> Path:
    """Write a DreamBench folder as a JSONL dataset (all references of a subject per record, no target).

    Records carry ``kind`` = prompt type and ``meta`` = {category, prompt_index, template}. Returns the path.
    """
    items = dreambench_examples(root, subjects, prompts_per_subject, unique_token)
    return write_jsonl([item.to_record() for item in items], out_jsonl)


def load_dreambench(
    root: str | Path,
    image_size: ImageSize | None = None,
    subjects: Sequence[str] | None = None,
    prompts_per_subject: int | None = None,
    unique_token: str = "",
) -> JsonlDataset:
    """DreamBench as a lazily decoded dataset of :class:`~cgrpo.data.base.Example` (no targets)."""
    items = dreambench_examples(root, subjects, prompts_per_subject, unique_token)
    return JsonlDataset([item.to_record() for item in items], image_size=image_size, name=str(root))


# --- the multi-subject protocol -----------------------------------------------------------------------

MULTI_SUBJECT_FILE = "multi_subject.json"


@dataclass(frozen=True)
class MultiDreamBenchItem:
    """One (subject pair, prompt) case of the multi-subject protocol; references are paths, not loaded."""

    id: str  # "PAIR/NN", NN the prompt's index among the pair's prompts
    pair: str  # the subjects joined by "+", e.g. "backpack_dog+bear_plushie"
    subjects: tuple[str, ...]
    subject_classes: tuple[str, ...]
    category: str  # "object" | "live" | "mixed" (both kinds of subjects)
    prompt: str
    prompt_index: int
    prompt_type: str  # "context" | "accessory" | "property", see _multi_prompt_type
    references: tuple[Path, ...]  # one photo per subject, in the entry's order


def _pair_category(classes: Sequence[str], live: frozenset[str] | set[str]) -> str:
    kinds = {"live" if cls in live else "object" for cls in classes}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _multi_prompt_type(prompt: str, subjects: str) -> str:
    """``context`` ("a dog and a cat in the snow"), ``accessory`` ("a dog wearing a red hat, next to it
    is a cat") or ``property`` ("a red dog, next to it is a cat"), as the single-subject prompt kinds."""
    if prompt.startswith(subjects + " "):
        return "context"
    return "accessory" if re.search(r"\b(wearing|outfit)\b", prompt) else "property"


def multi_subject_examples(
    root: str | Path,
    protocol: str | Path | None = None,
    pairs: Iterable[str] | None = None,
    prompts_per_pair: int | None = None,
    live_classes: Iterable[str] = LIVE_CLASSES,
) -> list[MultiDreamBenchItem]:
    """The multi-subject DreamBench protocol (UNO's ``dreambench_multiip.json``: 30 pairs x 25 prompts).

    ``protocol``: a JSON list of ``{"prompt": str, "references": ["SUBJECT/NN.jpg", ...]}`` entries, paths
    relative to ``root`` (default ``ROOT/multi_subject.json``); a subject is the folder of its photo and its
    class comes from ``prompts_and_classes.txt``. ``pairs``: keep these pair ids (``"cat+dog"``) in the
    given order; ``prompts_per_pair``: keep the first N prompts of each pair. Raises :class:`DatasetError`
    naming every bad entry.
    """
    import json

    root = Path(root).absolute()
    spec = parse_prompts_and_classes(root / PROMPTS_FILE)
    path = Path(protocol) if protocol is not None else root / MULTI_SUBJECT_FILE
    if not path.is_file():
        raise DatasetError(f"{path} not found: the multi-subject protocol is a JSON list of entries")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: expected a non-empty JSON list of {{prompt, references}} entries")
    live = set(live_classes)
    problems: list[str] = []
    items: list[MultiDreamBenchItem] = []
    counts: dict[str, int] = {}
    for number, entry in enumerate(entries):
        where = f"{path}: entry {number}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected an object with 'prompt' and 'references'")
            continue
        unknown = sorted(set(entry) - {"prompt", "references"})
        prompt, references = entry.get("prompt"), entry.get("references")
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)}")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{where}: 'prompt' must be a non-empty string")
            continue
        where = f"{where} ({prompt!r})"
        if (
            not isinstance(references, list)
            or not 2 <= len(references) <= 4
            or not all(isinstance(r, str) and r for r in references)
        ):
            problems.append(f"{where}: 'references' must be a list of 2-4 image paths, one per subject")
            continue
        subjects = tuple(Path(r).parent.name for r in references)
        bad = [r for r, s in zip(references, subjects, strict=True) if s not in spec.classes]
        missing = [r for r in references if not (root / r).is_file()]
        if bad:
            problems.append(f"{where}: {', '.join(bad)} not in a DreamBench subject folder of {PROMPTS_FILE}")
        if missing:
            problems.append(f"{where}: reference image(s) {', '.join(missing)} not found under {root}")
        if len(set(subjects)) != len(subjects):
            problems.append(f"{where}: a subject appears twice in {references}")
        if bad or missing or len(set(subjects)) != len(subjects):
            continue
        classes = tuple(spec.classes[s] for s in subjects)
        pair = "+".join(subjects)
        index = counts[pair] = counts.get(pair, -1) + 1
        joined = " and ".join(f"a {cls}" for cls in classes)
        items.append(
            MultiDreamBenchItem(
                id=f"{pair}/{index:02d}",
                pair=pair,
                subjects=subjects,
                subject_classes=classes,
                category=_pair_category(classes, live),
                prompt=" ".join(prompt.split()),
                prompt_index=index,
                prompt_type=_multi_prompt_type(" ".join(prompt.split()), joined),
                references=tuple(root / r for r in references),
            )
        )
    if problems:
        raise DatasetError(f"{path} is not a valid multi-subject protocol:", problems)
    if pairs is not None:
        wanted = list(pairs)
        known = list(dict.fromkeys(item.pair for item in items))
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise DatasetError(f"unknown subject pair(s) {', '.join(unknown)}; known: {', '.join(known)}")
        items = [item for p in wanted for item in items if item.pair == p]
    if prompts_per_pair is not None:
        if prompts_per_pair < 1:
            raise DatasetError(f"prompts per pair must be at least 1, got {prompts_per_pair}")
        items = [item for item in items if item.prompt_index < prompts_per_pair]
    return items
