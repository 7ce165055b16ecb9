"""SynCD (Kumari et al., 2025, "Generating Multi-Image Synthetic Data for Text-to-Image Customization").

The paper trains on a filtered 10k subset of SynCD. This module converts the *released* SynCD layout
(the dataset repository ``nupurkmr9/syncd`` after its ``unzip.sh``, as read by the authors' training
loader) into our JSONL format. Supported layout, and only this one::

    ROOT/*metadata*.json              and/or one level down:  ROOT/SHARD/*metadata*.json
    ROOT[/SHARD]/<name>.jpg           the images, named in the metadata relative to the JSON's folder
    ROOT[/SHARD]/masks/<name>.jpg     subject masks (not used by the importer)

A metadata file (``metadata.json``, ``metadata_<rank>.json``, ``metadata_with_scores.json``, ...) is a
JSON *list* of items, one per synthesized subject::

    {"filenames": ["12_0_0.jpg", "12_0_1.jpg", "12_0_2.jpg"],   # >= 2 images of the same subject
     "prompts": ["caption of image 0", "...", "..."],           # one caption per image
     "category": "rigid" | "deformable",                        # optional
     "objaverse_id": "...",                                     # optional
     "dino_scores": [[...], ...],                               # optional: N x N, upper triangle: DINOv2
     "aesthetics_scores": {"12_0_1": 6.1, ...}}                 # optional: LAION aesthetics per image stem

When a folder has ``*metadata_with_scores.json`` files (written by SynCD's ``cal_scores.py`` from the
plain ones) only those are read, so items are not imported twice. A filename with a folder prefix that
does not exist (the generator wrote ``OUTDIR/name.jpg``) is looked up by its base name in the JSON's folder.

Each ordered pair (i, j), i != j, of an item's images becomes one record: ``reference`` = image i,
``target`` = image j, ``prompt`` = caption j, ``subject`` = ``SHARD/ITEM``, ``kind`` = the item's
category, and ``meta`` = ``syncd_dino`` (the pair's DINOv2 similarity) and ``syncd_aesthetics`` (the
target's) when present — ``cgrpo data filter --reward meta.syncd_dino --reward meta.syncd_aesthetics``
ranks pairs by them without loading any model. ``pairs="first"`` keeps only image 0 as the reference.

Subject class: SynCD stores no class noun. Deformable images are named ``<category>_<d>_<d>_<d>_<d>.jpg``
by the generator, so the class is that category (``"teddy_bear"`` -> ``"teddy bear"``); otherwise it is
``default_class`` (``"object"``). DINO-Seg uses the class as its detection query: set a better one if known.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from cgrpo.data.formats import DatasetError, Record, write_jsonl

LAYOUT_HINT = (
    "expected SynCD's released layout: ROOT/*metadata*.json (or ROOT/SHARD/*metadata*.json), each a JSON "
    "list of items with 'filenames' and 'prompts' lists, images next to the JSON file"
)
_DEFORMABLE_NAME = re.compile(r"^(?P<category>.+?)_\d+_\d+_\d+_\d+$")


def metadata_files(root: Path) -> list[Path]:
    """The metadata files of ROOT and of its direct subfolders (``masks/`` excluded)."""
    folders = [root] + sorted(d for d in root.iterdir() if d.is_dir() and d.name != "masks")
    files: list[Path] = []
    for folder in folders:
        found = sorted(p for p in folder.glob("*.json") if "metadata" in p.name)
        scored = [p for p in found if p.name.endswith("metadata_with_scores.json")]
        files += scored or found
    return files


def _find_image(folder: Path, name: str) -> Path | None:
    path = Path(name)
    candidates = [path] if path.is_absolute() else [folder / path]
    candidates.append(folder / path.name)
    return next((c for c in candidates if c.is_file()), None)


def _subject_class(stem: str, category: str, default_class: str) -> str:
    match = _DEFORMABLE_NAME.match(stem)
    if category != "rigid" and match:
        return match.group("category").replace("_", " ").strip() or default_class
    return default_class


def _pair_score(scores: Any, i: int, j: int, n: int) -> float | None:
    # SynCD stores the similarity matrix upper-triangular (zeros below the diagonal).
    if not (
        isinstance(scores, list)
        and len(scores) == n
        and all(isinstance(r, list) and len(r) == n for r in scores)
    ):
        return None
    value = scores[min(i, j)][max(i, j)]
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def read_syncd(
    root: str | Path,
    pairs: Literal["all", "first"] = "all",
    default_class: str = "object",
    skip_missing: bool = False,
) -> list[Record]:
    """Records of a SynCD folder (module docstring); :class:`DatasetError` lists every problem found."""
    root = Path(root).absolute()
    if pairs not in ("all", "first"):
        raise ValueError(f"pairs must be 'all' or 'first', got {pairs!r}")
    if not root.is_dir():
        raise DatasetError(f"SynCD root {root} is not a folder; {LAYOUT_HINT}")
    files = metadata_files(root)
    if not files:
        raise DatasetError(
            f"no SynCD metadata file (*metadata*.json) in {root} or its subfolders; {LAYOUT_HINT}"
        )
    records: list[Record] = []
    problems: list[str] = []
    for meta_file in files:
        try:
            items = json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            problems.append(f"{meta_file}:{error.lineno}: invalid JSON: {error.msg}")
            continue
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"{meta_file}: cannot read ({error})")
            continue
        if not isinstance(items, list):
            problems.append(
                f"{meta_file}: expected a JSON list of items, got {type(items).__name__}; {LAYOUT_HINT}"
            )
            continue
        folder = meta_file.parent
        shard = folder.relative_to(root).as_posix()
        for k, item in enumerate(items):
            where = f"{meta_file}: item {k}"
            names = item.get("filenames") if isinstance(item, dict) else None
            captions = item.get("prompts") if isinstance(item, dict) else None
            if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
                problems.append(f"{where}: 'filenames' must be a list of >= 2 image names; {LAYOUT_HINT}")
                continue
            if not (isinstance(captions, list) and len(captions) == len(names)):
                problems.append(f"{where}: 'prompts' must be a list with one caption per file ({len(names)})")
                continue
            if not all(isinstance(c, str) and c.strip() for c in captions):
                problems.append(f"{where}: empty or non-string caption in 'prompts'")
                continue
            paths = [_find_image(folder, name) for name in names]
            missing = [name for name, path in zip(names, paths, strict=True) if path is None]
            if missing:
                if not skip_missing:
                    problems.append(f"{where}: image(s) not found in {folder}: {', '.join(missing)}")
                    continue
                keep = [i for i, path in enumerate(paths) if path is not None]
                if len(keep) < 2:
                    continue
            else:
                keep = list(range(len(names)))
            category = str(item.get("category") or "")
            aesthetics = (
                item.get("aesthetics_scores") if isinstance(item.get("aesthetics_scores"), dict) else {}
            )
            subject = f"{shard}/{k:06d}" if shard != "." else f"{k:06d}"
            cls = _subject_class(Path(names[0]).stem, category, default_class)
            for i in keep[:1] if pairs == "first" else keep:
                for j in keep:
                    if i == j:
                        continue
                    meta: dict[str, Any] = {}
                    if category:
                        meta["syncd_category"] = category
                    if item.get("objaverse_id"):
                        meta["syncd_objaverse_id"] = str(item["objaverse_id"])
                    dino = _pair_score(item.get("dino_scores"), i, j, len(names))
                    if dino is not None:
                        meta["syncd_dino"] = dino
                    aesthetic = aesthetics.get(Path(names[j]).stem)
                    if isinstance(aesthetic, int | float) and math.isfinite(aesthetic):
                        meta["syncd_aesthetics"] = float(aesthetic)
                    records.append(
                        Record(
                            id=f"{subject}/{i}-{j}",
                            references=(paths[i],),
                            subject_class=cls,
                            prompt=" ".join(captions[j].split()),
                            target=paths[j],
                            kind=category,
                            subject=subject,
                            meta=meta,
                            source=str(meta_file),
                            line=k,
                        )
                    )
    if problems:
        raise DatasetError(f"SynCD folder {root} cannot be imported ({len(problems)} problem(s)):", problems)
    if not records:
        raise DatasetError(f"SynCD folder {root} has no usable item; {LAYOUT_HINT}")
    return records


def import_syncd(
    root: str | Path,
    out_jsonl: str | Path,
    pairs: Literal["all", "first"] = "all",
    default_class: str = "object",
    skip_missing: bool = False,
) -> Path:
    """Convert a SynCD folder into a JSONL dataset of (reference, target, caption) pairs; returns the path."""
    return write_jsonl(read_syncd(root, pairs, default_class, skip_missing), out_jsonl)
