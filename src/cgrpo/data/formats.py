"""Subject datasets on disk: the JSONL record format, the folder layout, and a lazy loader.

Two on-disk forms are read by :func:`load_dataset` (full spec with examples: ``docs/datasets.md``).

**JSONL** — one JSON object per line (blank lines are skipped; UTF-8)::

    {"id": "dog/00", "reference": "dog/00.jpg", "subject_class": "dog", "prompt": "a dog in the snow"}
    {"id": "p1", "reference": ["a/0.jpg", "a/1.jpg"], "subject_class": "backpack",
     "prompt": "a backpack on the beach", "target": "a/2.jpg", "kind": "context"}

Required keys: ``id`` (string, unique in the file; an integer is accepted and read as a string),
``reference`` (a path, or a non-empty list of paths when the subject has several reference images),
``subject_class`` (the class noun, e.g. ``"dog"``), ``prompt`` (non-empty). Optional keys: ``target``
(a path or null: the ground-truth image, needed for SFT and ``cgrpo data filter``), ``kind`` (a prompt
kind for per-kind reports), ``subject`` (subject id; default: the first reference path as written, so
records sharing a reference share a subject), ``split`` (e.g. ``"train"``; see ``split=`` below) and
``meta`` (a JSON object carried along untouched, e.g. SynCD's precomputed scores). Any other key is an
error. Relative paths are relative to the JSONL file's folder; absolute paths are used as they are.

A multi-subject record (1-4 subjects in one image) replaces ``reference``/``subject_class`` (and
``subject``) by ``subjects``: a list of ``{"reference": path or [paths], "subject_class": str, "subject":
optional id}`` objects, the first being the primary subject::

    {"id": "s1", "subjects": [{"reference": "heart.png", "subject_class": "heart"},
                              {"reference": "star.png", "subject_class": "star"}],
     "prompt": "a heart left of a star"}

**Folder** — one folder per subject::

    ROOT/prompts.txt            one prompt per line ("#" comments and blank lines are skipped)
    ROOT/classes.txt            optional "subject,class" lines (DreamBench's format)
    ROOT/SUBJECT/ref*.{png,jpg,jpeg,webp}   the reference images (sorted by name; the first is primary)
    ROOT/SUBJECT/prompts.txt    optional: replaces ROOT/prompts.txt for this subject
    ROOT/SUBJECT/class.txt      optional: the subject's class (else classes.txt, else the folder name
                                without trailing digits, "_" read as a space: "red_cartoon2" -> "red cartoon")

A prompt may contain ``{class}``, replaced by the subject's class. Each (subject, prompt) pair is one
example with id ``SUBJECT/NNN`` (the prompt's index) and no target.

``split``: for a JSONL file, keep the records whose ``split`` key equals it; for a folder, read
``ROOT/{split}.jsonl`` if it exists, else the folder layout under ``ROOT/{split}/``.

Multiple references: :class:`Example` holds one reference tensor per subject (the subject's first image:
``reference``, then ``extra_references``); the dataset's ``references(index)`` returns all images of the
first subject (and ``record(index)`` the parsed record with its paths).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from cgrpo.data.base import Example
from cgrpo.io import atomic_write_text

REQUIRED_KEYS = ("id", "reference", "subject_class", "prompt")
OPTIONAL_KEYS = ("target", "kind", "subject", "split", "meta")
SUBJECTS_KEY = "subjects"  # the multi-subject form; replaces "reference", "subject_class" and "subject"
SUBJECT_KEYS = ("reference", "subject_class", "subject")  # keys of one entry of "subjects"
MAX_SUBJECTS = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

ImageSize = int | tuple[int, int]


class DatasetError(ValueError):
    """A dataset that cannot be used. ``problems`` lists each problem as ``FILE:LINE: message``."""

    def __init__(self, summary: str, problems: Sequence[str] = ()) -> None:
        self.summary = summary
        self.problems = list(problems)
        text = summary + "".join(f"\n  - {problem}" for problem in self.problems)
        super().__init__(text)


@dataclass(frozen=True)
class Problem:
    """One problem at ``source`` (a file or folder), on 1-based ``lines`` (empty when lines do not apply)."""

    source: str
    lines: tuple[int, ...]
    message: str

    def __str__(self) -> str:
        if not self.lines:
            return f"{self.source}: {self.message}"
        return f"{self.source}:{','.join(str(line) for line in self.lines)}: {self.message}"


@dataclass(frozen=True)
class SubjectEntry:
    """One subject of a record: its reference images (absolute paths, the first is primary), class and id."""

    references: tuple[Path, ...]
    subject_class: str
    subject: str


@dataclass(frozen=True, eq=False)
class Record:
    """One parsed dataset entry; paths are absolute. ``source``/``line`` say where it was read from.

    The first subject is ``references``/``subject_class``/``subject``; a multi-subject record lists its
    2nd..Kth subjects in ``extra_subjects``.
    """

    id: str
    references: tuple[Path, ...]
    subject_class: str
    prompt: str
    target: Path | None = None
    kind: str = ""
    subject: str = ""
    split: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    line: int = 0
    extra_subjects: tuple[SubjectEntry, ...] = ()

    @property
    def reference(self) -> Path:
        return self.references[0]

    @property
    def subjects(self) -> tuple[SubjectEntry, ...]:
        """All K subjects, the first one first."""
        return (SubjectEntry(self.references, self.subject_class, self.subject), *self.extra_subjects)

    def images(self) -> list[tuple[str, Path]]:
        """(role, path) of every image: ``reference`` (``subjects[k].reference`` in the multi-subject form),
        then ``target``; roles are the keys that name the file in messages."""
        if self.extra_subjects:
            roles = [
                (f"{SUBJECTS_KEY}[{k}].reference", path)
                for k, entry in enumerate(self.subjects)
                for path in entry.references
            ]
        else:
            roles = [("reference", path) for path in self.references]
        if self.target is not None:
            roles.append(("target", self.target))
        return roles

    def to_json(self, base: str | Path) -> dict[str, Any]:
        """The JSONL object of this record with paths relative to ``base`` (the output file's folder)."""
        base = Path(base).absolute()
        refs = [_relative(path, base) for path in self.references]
        obj: dict[str, Any] = {"id": self.id}
        if self.extra_subjects:
            obj[SUBJECTS_KEY] = [_subject_json(entry, base) for entry in self.subjects]
        else:
            if self.subject:
                obj["subject"] = self.subject
            obj["subject_class"] = self.subject_class
        if self.kind:
            obj["kind"] = self.kind
        obj["prompt"] = self.prompt
        if not self.extra_subjects:
            obj["reference"] = refs[0] if len(refs) == 1 else refs
        if self.target is not None:
            obj["target"] = _relative(self.target, base)
        if self.split is not None:
            obj["split"] = self.split
        if self.meta:
            obj["meta"] = dict(self.meta)
        return obj


def _subject_json(entry: SubjectEntry, base: Path) -> dict[str, Any]:
    refs = [_relative(path, base) for path in entry.references]
    obj: dict[str, Any] = {"reference": refs[0] if len(refs) == 1 else refs}
    obj["subject_class"] = entry.subject_class
    if entry.subject:
        obj["subject"] = entry.subject
    return obj


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return path.as_posix()


# ----------------------------------------------------------------------------------------------- parsing


def record_from_json(
    obj: Any, base: Path, source: str = "", line: int = 0
) -> tuple[Record | None, list[str]]:
    """Check one JSON object against the format: (record, problem messages).

    The record is None when its image paths cannot be read; a record that comes with messages is unusable.
    """
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"]
    errors: list[str] = []
    multi = SUBJECTS_KEY in obj
    required = REQUIRED_KEYS if not multi else tuple(k for k in REQUIRED_KEYS if k not in SUBJECT_KEYS)
    missing = [key for key in required if key not in obj]
    if missing:
        errors.append("missing key" + ("s " if len(missing) > 1 else " ") + ", ".join(map(repr, missing)))
    if multi:
        both = [key for key in SUBJECT_KEYS if key in obj]
        if both:
            errors.append(
                f"'{SUBJECTS_KEY}' and top-level {', '.join(map(repr, both))} are both given: name the "
                f"subjects either in '{SUBJECTS_KEY}' or with top-level 'reference' and 'subject_class'"
            )
    allowed = REQUIRED_KEYS + OPTIONAL_KEYS + (SUBJECTS_KEY,)
    for key in obj:
        if key not in allowed:
            errors.append(f"unknown key '{key}'{_hint(str(key), allowed)}")

    record_id = obj.get("id")
    if "id" in obj:
        if isinstance(record_id, int) and not isinstance(record_id, bool):
            record_id = str(record_id)
        if not isinstance(record_id, str) or not record_id.strip():
            errors.append(f"'id' must be a non-empty string, got {obj['id']!r}")

    entries = _parse_subjects(obj[SUBJECTS_KEY], errors) if multi else [_parse_subject(obj, "", errors)]
    references = entries[0][0] if entries else []

    prompt = obj.get("prompt")
    if "prompt" in obj:
        if not isinstance(prompt, str):
            errors.append(f"'prompt' must be a string, got {prompt!r}")
        elif not prompt.strip():
            errors.append("empty prompt")

    target = obj.get("target")
    if target is not None and (not isinstance(target, str) or not target.strip()):
        errors.append(f"'target' must be a path or null, got {target!r}")
    for key in ("kind", "split") if multi else ("kind", "subject", "split"):
        if key in obj and not isinstance(obj[key], str):
            errors.append(f"'{key}' must be a string, got {obj[key]!r}")
    if "meta" in obj and not isinstance(obj["meta"], dict):
        errors.append(f"'meta' must be a JSON object, got {obj['meta']!r}")
    target_ok = target is None or (isinstance(target, str) and bool(target.strip()))
    if not references or not target_ok:
        return None, errors
    # A record with other problems is still returned so that validation also checks its images;
    # every caller treats a record that comes with messages as unusable.

    def text(key: str) -> str:
        value = obj.get(key)
        return value.strip() if isinstance(value, str) else ""

    subjects = [
        SubjectEntry(tuple(_join(base, ref) for ref in refs), subject_class, subject or refs[0])
        for refs, subject_class, subject in entries
        if refs
    ]
    record = Record(
        id=record_id if isinstance(record_id, str) and record_id.strip() else f"<line {line}>",
        references=subjects[0].references,
        subject_class=subjects[0].subject_class,
        prompt=text("prompt"),
        target=_join(base, target) if target is not None else None,
        kind=text("kind"),
        subject=subjects[0].subject,
        split=obj["split"] if isinstance(obj.get("split"), str) else None,
        meta=obj["meta"] if isinstance(obj.get("meta"), dict) else {},
        source=source,
        line=line,
        extra_subjects=tuple(subjects[1:]) if multi else (),
    )
    return record, errors


def _hint(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f"; allowed keys: {', '.join(allowed)}"


def _parse_subject(obj: Mapping[str, Any], where: str, errors: list[str]) -> tuple[list[str], str, str]:
    """(reference paths as written, class, subject id) of one subject; ``where`` prefixes key names
    (``"subjects[1]."``, or ``""`` for the top-level single-subject form). Problems go to ``errors``."""
    references: list[str] = []
    if "reference" in obj:
        value = obj["reference"]
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            errors.append(f"'{where}reference' must be a path or a non-empty list of paths, got {value!r}")
        else:
            references = values
    subject_class = obj.get("subject_class")
    if "subject_class" in obj and (not isinstance(subject_class, str) or not subject_class.strip()):
        errors.append(f"'{where}subject_class' must be a non-empty string, got {subject_class!r}")
    subject = obj.get("subject")
    if where and "subject" in obj and not isinstance(subject, str):
        errors.append(f"'{where}subject' must be a string, got {subject!r}")
    return (
        references,
        subject_class.strip() if isinstance(subject_class, str) else "",
        subject.strip() if isinstance(subject, str) else "",
    )


def _parse_subjects(value: Any, errors: list[str]) -> list[tuple[list[str], str, str]]:
    """The entries of a ``subjects`` list (one per subject, in order); problems go to ``errors``."""
    if not isinstance(value, list) or not value:
        errors.append(
            f"'{SUBJECTS_KEY}' must be a non-empty list of {{reference, subject_class[, subject]}} objects, "
            f"got {value!r}"
        )
        return []
    if len(value) > MAX_SUBJECTS:
        errors.append(
            f"'{SUBJECTS_KEY}' lists {len(value)} subjects; a record may have at most {MAX_SUBJECTS}"
        )
    entries = []
    for k, item in enumerate(value):
        where = f"{SUBJECTS_KEY}[{k}]"
        if not isinstance(item, dict):
            errors.append(
                f"'{where}' must be a JSON object with 'reference' and 'subject_class', got {item!r}"
            )
            entries.append(([], "", ""))
            continue
        missing = [key for key in SUBJECT_KEYS[:2] if key not in item]
        if missing:
            errors.append(
                f"'{where}' is missing key"
                + ("s " if len(missing) > 1 else " ")
                + ", ".join(map(repr, missing))
            )
        for key in item:
            if key not in SUBJECT_KEYS:
                errors.append(f"unknown key '{where}.{key}'{_hint(str(key), SUBJECT_KEYS)}")
        entries.append(_parse_subject(item, where + ".", errors))
    if entries and not entries[0][0]:
        return []  # without the first subject's images the record has no primary reference
    return entries


def _join(base: Path, path: str) -> Path:
    # normpath (not resolve): "a/../b" reads better in messages, and symlinked folders keep their names
    return Path(os.path.normpath(base / path))


def parse_jsonl(path: str | Path) -> tuple[list[Record], list[Problem]]:
    """Every record of a JSONL file and every structural problem (bad JSON, keys, types, duplicate ids)."""
    path = Path(path).absolute()
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        return [], [Problem(source, (), f"cannot read the file ({error.strerror})")]
    records: list[Record] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    seen_any = False
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            problems.append(
                Problem(source, (number,), f"not UTF-8 text (bad byte at column {error.start + 1})")
            )
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        seen_any = True
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as error:
            hint = ""
            if number == 1 and text.lstrip().startswith("["):
                hint = "; the file looks like a JSON array: write one JSON object per line (JSONL)"
            problems.append(
                Problem(source, (number,), f"invalid JSON: {error.msg} (column {error.colno}){hint}")
            )
            continue
        record, errors = record_from_json(obj, path.parent, source, number)
        problems.extend(Problem(source, (number,), message) for message in errors)
        if record is None:
            continue
        if record.id in first_line:
            message = f"duplicate id '{record.id}' (first used on line {first_line[record.id]})"
            problems.append(Problem(source, (number,), message))
        else:
            first_line[record.id] = number
        records.append(record)  # kept even when invalid: validation still checks its images
    if not seen_any:
        problems.append(Problem(source, (), "the file has no records"))
    return records, problems


def _prompt_lines(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        (n, text.strip())
        for n, text in enumerate(lines, start=1)
        if text.strip() and not text.startswith("#")
    ]


def read_classes_file(path: Path) -> tuple[dict[str, str], list[Problem]]:
    """``subject,class`` lines (a ``subject_name,class`` header and blank/"#" lines are skipped)."""
    classes: dict[str, str] = {}
    problems: list[Problem] = []
    for number, text in _prompt_lines(path):
        name, _, cls = text.partition(",")
        name, cls = name.strip(), cls.strip()
        if name == "subject_name":
            continue
        if not name or not cls:
            problems.append(Problem(str(path), (number,), f"expected 'subject,class', got {text!r}"))
            continue
        classes[name] = cls
    return classes, problems


def class_from_folder_name(name: str) -> str:
    """``"red_cartoon"`` -> ``"red cartoon"``, ``"dog2"`` -> ``"dog"`` (when no class is written down)."""
    return re.sub(r"[\s_]*\d+$", "", name).replace("_", " ").strip() or name


def parse_folder(root: str | Path) -> tuple[list[Record], list[Problem]]:
    """Records of the folder layout (``ROOT/SUBJECT/ref*.png`` + ``prompts.txt``) and its problems."""
    root = Path(root).absolute()
    problems: list[Problem] = []
    classes: dict[str, str] = {}
    if (root / "classes.txt").is_file():
        classes, class_problems = read_classes_file(root / "classes.txt")
        problems += class_problems
    subjects = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subjects:
        problems.append(
            Problem(str(root), (), "no subject folders (expected ROOT/SUBJECT/ref*.png + prompts.txt)")
        )
    records: list[Record] = []
    for folder in subjects:
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        refs = tuple(p for p in images if p.name.lower().startswith("ref"))
        if not refs:
            others = f" ({len(images)} other images found: name the references ref*.jpg)" if images else ""
            problems.append(Problem(str(folder), (), f"no reference images ref*.png/ref*.jpg{others}"))
        prompts_file = folder / "prompts.txt"
        if not prompts_file.is_file():
            prompts_file = root / "prompts.txt"
        if not prompts_file.is_file():
            problems.append(Problem(str(folder), (), "no prompts.txt in the subject folder nor in the root"))
            continue
        prompts = _prompt_lines(prompts_file)
        if not prompts:
            problems.append(Problem(str(prompts_file), (), "no prompts (one prompt per line)"))
        if (folder / "class.txt").is_file():
            cls = (folder / "class.txt").read_text(encoding="utf-8").strip()
            if not cls:
                problems.append(Problem(str(folder / "class.txt"), (1,), "empty class"))
        else:
            cls = classes.get(folder.name) or class_from_folder_name(folder.name)
        if not refs or not cls:
            continue
        for index, (number, prompt) in enumerate(prompts):
            records.append(
                Record(
                    id=f"{folder.name}/{index:03d}",
                    references=refs,
                    subject_class=cls,
                    prompt=prompt.replace("{class}", cls),
                    subject=folder.name,
                    source=str(prompts_file),
                    line=number,
                )
            )
    jsonl_files = sorted(p.name for p in root.glob("*.jsonl"))
    if problems and jsonl_files:  # a common slip: passing the folder of a JSONL dataset
        hint = f"read as a folder of subjects; to read a JSONL file pass it itself ({', '.join(jsonl_files)})"
        problems.insert(0, Problem(str(root), (), hint))
    return records, problems


def locate(path: str | Path, split: str | None = None) -> tuple[str, Path]:
    """(``"jsonl"`` or ``"folder"``, the path to read) for a dataset path and an optional split."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist (expected a JSONL file or a folder of subjects)")
    if path.is_file():
        return "jsonl", path
    if split is None:
        return "folder", path
    if (path / f"{split}.jsonl").is_file():
        return "jsonl", path / f"{split}.jsonl"
    if (path / split).is_dir():
        return "folder", path / split
    raise DatasetError(f"dataset {path} has no split '{split}' (looked for {split}.jsonl and {split}/)")


def parse_path(path: str | Path, split: str | None = None) -> tuple[list[Record], list[Problem], str]:
    """(records, problems, source) for a JSONL file or folder; ``split`` as in :func:`load_dataset`."""
    form, target = locate(path, split)
    records, problems = parse_jsonl(target) if form == "jsonl" else parse_folder(target)
    if form == "jsonl" and split is not None and Path(path).is_file():
        found = sorted({r.split for r in records if r.split is not None})
        records = [r for r in records if r.split == split]
        if not records and not problems:
            problems.append(
                Problem(str(target.absolute()), (), f"no record has split '{split}' (found {found})")
            )
    return records, problems, str(target.absolute())


def read_records(path: str | Path, split: str | None = None) -> list[Record]:
    """Parse a dataset (no image is opened); raise :class:`DatasetError` listing every structural problem."""
    records, problems, source = parse_path(path, split)
    if problems:
        raise DatasetError(
            f"dataset {source} cannot be read ({len(problems)} problem(s)):", map(str, problems)
        )
    return records


def missing_files(records: Sequence[Record]) -> list[Problem]:
    """One problem per (file, role, missing image), naming the lines that use it (a cheap stat per path)."""
    exists: dict[Path, bool] = {}
    uses: dict[tuple[str, str, Path], list[int]] = {}
    for record in records:
        for role, path in record.images():
            if path not in exists:
                exists[path] = path.is_file()
            if not exists[path]:
                uses.setdefault((record.source, role, path), []).append(record.line)
    return [
        Problem(source, tuple(lines), f"{role} {path} not found")
        for (source, role, path), lines in uses.items()
    ]


def write_jsonl(records: Sequence[Record], out_path: str | Path) -> Path:
    """Write records as JSONL (paths relative to the file's folder), atomically."""
    out_path = Path(out_path).absolute()
    lines = [json.dumps(record.to_json(out_path.parent), ensure_ascii=False) for record in records]
    return atomic_write_text(out_path, "".join(line + "\n" for line in lines))


# ------------------------------------------------------------------------------------------------ images


def image_hw(image_size: ImageSize) -> tuple[int, int]:
    """``128`` -> ``(128, 128)``; ``(h, w)`` stays."""
    if isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return height, width


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image as RGB, honouring EXIF rotation; transparent pixels are composited onto white."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode == "RGB":
            image.load()
            return image
        if "A" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")


def fit(image: Image.Image, image_size: ImageSize) -> Image.Image:
    """Resize so the image covers ``image_size`` (keeping its aspect ratio), then center-crop to it."""
    height, width = image_hw(image_size)
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, image_size: ImageSize | None = None) -> torch.Tensor:
    """Float ``[3, H, W]`` in [0, 1]; resized and center-cropped to ``image_size`` when given."""
    image = open_rgb(path)
    if image_size is not None:
        image = fit(image, image_size)
    return pil_to_tensor(image)


# ----------------------------------------------------------------------------------------------- dataset


class JsonlDataset:
    """A :class:`~cgrpo.data.base.SubjectDataset` over parsed records; images are decoded on access."""

    def __init__(
        self, records: Sequence[Record], image_size: ImageSize | None = None, name: str = ""
    ) -> None:
        self.records = list(records)
        self.image_size = image_hw(image_size) if image_size is not None else None
        self.name = name
        # Set by prepare_references_with: references then keep their own size, as the policy prepares them.
        self._prepare: Callable[[list[Image.Image]], list[torch.Tensor]] | None = None

    def prepare_references_with(self, prepare: Callable[[list[Image.Image]], list[torch.Tensor]]) -> None:
        """Hand the decoded reference images of each record (all of them, not fitted to ``image_size``) to
        ``prepare`` (a policy's ``prepare_references``: UNO keeps the aspect ratio) instead of fitting them
        to ``image_size``; targets stay fitted."""
        self._prepare = prepare

    def reference_size_key(self, index: int) -> tuple[tuple[int, int], ...]:
        """The original ``(width, height)`` of each conditioning reference of example ``index`` (read from
        the file headers, nothing decoded): examples with equal keys get equally sized prepared references."""
        record = self.records[index]
        sizes = []
        for role, path in _conditioning_references(record):
            try:
                with Image.open(path) as image:
                    sizes.append(ImageOps.exif_transpose(image).size)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise DatasetError(
                    f"{record.source}:{record.line}: cannot read {role} {path}: {error}"
                ) from error
        return tuple(sizes)

    def _load_references(self, record: Record, references: Sequence[tuple[str, Path]]) -> list[torch.Tensor]:
        """``references`` ((role, path) pairs) fitted to ``image_size``, or prepared together by the policy
        (UNO sizes several references smaller than one)."""
        if self._prepare is None:
            return [self._load(record, role, path) for role, path in references]
        images = []
        for role, path in references:
            try:
                images.append(open_rgb(path))
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise DatasetError(
                    f"{record.source}:{record.line}: cannot load {role} {path}: {error} "
                    "(run `cgrpo data validate` on the dataset)"
                ) from error
        return self._prepare(images)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Example]:
        for index in range(len(self)):
            yield self[index]

    def record(self, index: int) -> Record:
        return self.records[index]

    def _load(self, record: Record, role: str, path: Path) -> torch.Tensor:
        try:
            return load_image(path, self.image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DatasetError(
                f"{record.source}:{record.line}: cannot load {role} {path}: {error} "
                "(run `cgrpo data validate` on the dataset)"
            ) from error

    def __getitem__(self, index: int) -> Example:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} examples")
        record = self.records[index]
        target = record.target
        extra = record.extra_subjects
        references = self._load_references(record, _conditioning_references(record))
        return Example(
            id=record.id,
            # a multi-subject example's subject is the combination: records of the same subjects share it
            subject_id="+".join(entry.subject for entry in record.subjects) if extra else record.subject,
            subject_class=record.subject_class,
            prompt=record.prompt,
            reference=references[0],
            target=self._load(record, "target", target) if target is not None else None,
            kind=record.kind,
            extra_references=tuple(references[1:]),
            extra_classes=tuple(entry.subject_class for entry in extra),
        )

    def references(self, index: int) -> list[torch.Tensor]:
        """All reference images of example ``index``'s first subject (``[3, H, W]``, prepared together by
        the policy when it sizes references itself); the first is ``Example.reference`` (the other subjects'
        are in ``record(index).extra_subjects``)."""
        record = self.records[index]
        return self._load_references(record, [("reference", path) for path in record.references])


def _conditioning_references(record: Record) -> list[tuple[str, Path]]:
    """What a policy is conditioned on: each subject's first reference image, as (role, path) pairs."""
    first = [("reference", record.references[0])]
    return first + [
        (f"{SUBJECTS_KEY}[{k}].reference", entry.references[0])
        for k, entry in enumerate(record.extra_subjects, start=1)
    ]


def load_dataset(
    path: str | Path, image_size: ImageSize | None = None, split: str | None = None
) -> JsonlDataset:
    """Open a JSONL file or a folder of subjects (module docstring) as a lazily decoded dataset.

    Structural problems and missing image files raise one :class:`DatasetError` naming every file and line;
    image contents are checked by :func:`cgrpo.data.validate.validate_dataset`, not here.
    """
    records, problems, source = parse_path(path, split)
    problems += missing_files(records)
    if problems:
        raise DatasetError(
            f"dataset {source} cannot be used ({len(problems)} problem(s)):", map(str, problems)
        )
    return JsonlDataset(records, image_size=image_size, name=source)
