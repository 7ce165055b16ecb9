"""Check a dataset before training, so that a bad file fails in seconds with its name, not hours into a run.

:func:`validate_dataset` parses the dataset (JSONL file, folder of subjects, or in-memory records), then
opens every image once (PIL ``verify`` and a full decode) and raises one :class:`DatasetError` whose
message lists every problem as ``FILE:LINE[,LINE...]: message``:

- bad JSON, a non-object line, non-UTF-8 text, missing or unknown keys, wrong value types, an empty
  prompt, duplicate ids (naming the first line with that id); in the multi-subject form (``subjects``)
  also both forms at once, an empty list, more than 4 subjects, a subject without reference or class;
- a missing image file, an unreadable or corrupt or truncated image (every subject's images are checked);
- a mode without a faithful RGB conversion: CMYK, transparent pixels (RGBA/LA/PA, or a palette image
  with a transparent colour), 16-bit or float images;
- an image smaller than ``image_size`` when a size is required (it would have to be upscaled).

Modes that convert to RGB without loss of meaning (grayscale L/1, opaque palette P, a fully opaque alpha
channel, YCbCr) are warnings (:class:`DatasetWarning`), as is a target that is its reference's file.
For in-memory records the source is ``<records>`` and the "line" is the 1-based record number.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from cgrpo.data.formats import (
    DatasetError,
    ImageSize,
    Problem,
    Record,
    image_hw,
    parse_path,
    record_from_json,
)

__all__ = [
    "DatasetError",
    "DatasetWarning",
    "ValidationReport",
    "check_dataset",
    "inspect_image",
    "validate_dataset",
]

# Modes PIL converts to RGB without changing what the image shows.
_CONVERTIBLE = {
    "L": "is grayscale (mode L); it will be converted to RGB",
    "1": "is black-and-white (mode 1); it will be converted to RGB",
    "P": "is a palette image (mode P); it will be converted to RGB",
    "YCbCr": "is YCbCr; it will be converted to RGB",
}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class DatasetWarning(UserWarning):
    """A dataset detail that is handled automatically but worth knowing (e.g. a grayscale image)."""


@dataclass
class ValidationReport:
    """What :func:`check_dataset` found; ``errors`` make the dataset unusable, ``warnings`` do not."""

    source: str
    records: int = 0
    images: int = 0
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        if self.errors:
            raise DatasetError(
                f"dataset {self.source} is not valid ({len(self.errors)} problem(s)):", map(str, self.errors)
            )


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _alpha_state(image: Image.Image) -> bool | None:
    """None: no alpha; True: some pixel is not fully opaque; False: an alpha channel that is all opaque."""
    if "A" in image.getbands():
        alpha = image.getchannel("A")
    elif "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
    else:
        return None
    return alpha.getextrema()[0] < 255


def inspect_image(path: Path, min_size: tuple[int, int] | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings) for one image file; ``min_size`` is ``(height, width)``."""
    if not path.exists():
        return ["not found"], []
    if not path.is_file():
        return ["is not a file"], []
    try:
        with Image.open(path) as image:
            image.verify()  # checks the container (e.g. PNG chunk CRCs) without decoding pixels
    except UnidentifiedImageError:
        return ["is not an image file PIL can read (unknown format, or not an image)"], []
    except Image.DecompressionBombError as error:
        return [f"is too large to decode safely ({error})"], []
    except Exception as error:  # PIL raises many types for damaged files
        return [f"is corrupt ({_reason(error)})"], []
    try:
        with Image.open(path) as image:
            image.load()  # a full decode finds truncated pixel data that verify() does not
            mode, (width, height) = image.mode, image.size
            alpha = _alpha_state(image)
    except Exception as error:
        return [f"is corrupt or truncated ({_reason(error)})"], []

    errors: list[str] = []
    notes: list[str] = []
    if mode == "CMYK":
        errors.append(
            "is CMYK; convert it to RGB with its colour profile (a plain conversion shifts colours)"
        )
    elif alpha:
        detail = "a palette image with a transparent colour" if mode == "P" else f"mode {mode}"
        errors.append(
            f"has transparent pixels ({detail}); flatten it onto an opaque background and save it as RGB"
        )
    elif mode in _ALPHA_MODES:
        notes.append(f"has an alpha channel (mode {mode}) that is fully opaque; it will be dropped")
    elif mode in _CONVERTIBLE:
        notes.append(_CONVERTIBLE[mode])
    elif mode != "RGB":
        errors.append(f"has mode {mode}, which has no faithful RGB conversion; save it as 8-bit RGB")
    if min_size is not None and (height < min_size[0] or width < min_size[1]):
        errors.append(
            f"is {width}x{height} pixels (width x height), smaller than the required "
            f"{min_size[1]}x{min_size[0]}; it would have to be upscaled"
        )
    return errors, notes


def _records_of(
    items: Iterable[Mapping[str, Any] | Record], root: str | Path | None
) -> tuple[list[Record], list[Problem]]:
    base = Path(root if root is not None else ".").absolute()
    records: list[Record] = []
    problems: list[Problem] = []
    first: dict[str, str] = {}
    for number, item in enumerate(items, start=1):
        if isinstance(item, Record):
            record, errors = item, []
        else:
            record, errors = record_from_json(item, base, "<records>", number)
        problems.extend(Problem("<records>", (number,), message) for message in errors)
        if record is None:
            continue
        where = f"{record.source}:{record.line}"
        if record.id in first:
            message = f"duplicate id '{record.id}' (first used at {first[record.id]})"
            problems.append(Problem(record.source, (record.line,), message))
        else:
            first[record.id] = where
        records.append(record)
    return records, problems


def check_dataset(
    path_or_records: str | os.PathLike | Iterable[Mapping[str, Any] | Record],
    image_size: ImageSize | None = None,
    *,
    split: str | None = None,
    root: str | Path | None = None,
    workers: int | None = None,
) -> ValidationReport:
    """Every problem of a dataset, without raising. ``root``: base folder of in-memory records' paths."""
    if isinstance(path_or_records, str | os.PathLike):
        records, problems, source = parse_path(path_or_records, split)
    else:
        records, problems = _records_of(path_or_records, root)
        source = "<records>"
    report = ValidationReport(source=source, records=len(records), errors=list(problems))

    # Each image is opened once, however many records use it; problems name every line that uses it.
    uses: dict[Path, list[tuple[Record, str]]] = {}
    for record in records:
        for role, path in record.images():  # every subject's references (multi-subject form), then target
            uses.setdefault(path, []).append((record, role))
        if record.target is not None and any(record.target in e.references for e in record.subjects):
            report.warnings.append(
                Problem(record.source, (record.line,), f"target {record.target} is also its reference")
            )
    min_size = image_hw(image_size) if image_size is not None else None
    paths = list(uses)
    # Decoding releases the GIL, so a few threads help on large datasets.
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda p: inspect_image(p, min_size), paths))
    report.images = len(paths)

    grouped: dict[tuple[str, str, Path, str, bool], list[int]] = {}
    for path, (errors, notes) in zip(paths, results, strict=True):
        for record, role in uses[path]:
            for message, is_error in [(m, True) for m in errors] + [(m, False) for m in notes]:
                grouped.setdefault((record.source, role, path, message, is_error), []).append(record.line)
    for (source_name, role, path, message, is_error), lines in grouped.items():
        problem = Problem(source_name, tuple(sorted(set(lines))), f"{role} {path} {message}")
        (report.errors if is_error else report.warnings).append(problem)

    def order(problem: Problem) -> tuple[str, int]:
        return problem.source, problem.lines[0] if problem.lines else 0

    report.errors.sort(key=order)
    report.warnings.sort(key=order)
    return report


def validate_dataset(
    path_or_records: str | os.PathLike | Iterable[Mapping[str, Any] | Record],
    image_size: ImageSize | None = None,
    *,
    split: str | None = None,
    root: str | Path | None = None,
) -> None:
    """Raise one :class:`DatasetError` naming every offending file and line; warn (``DatasetWarning``)
    about convertible details. ``image_size`` (int or ``(h, w)``) makes smaller images an error."""
    report = check_dataset(path_or_records, image_size, split=split, root=root)
    for problem in report.warnings:
        warnings.warn(str(problem), DatasetWarning, stacklevel=2)
    report.raise_for_errors()
