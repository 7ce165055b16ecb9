"""Atomic file and directory writes: a reader or a crash never sees a half-written file or checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file in the same directory, fsync it, then rename over ``path``.

    If ``write`` raises (disk full, permission error) the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``directory``; on success it replaces ``directory`` (rename), on error it
    is removed and ``directory`` is untouched. Readers never see a half-written checkpoint."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Keep only the records of a ``{"step": ...}`` JSONL log up to ``step`` (inclusive), atomically.

    A run resumed from the checkpoint of ``step`` re-runs what came after it; dropping those records first
    keeps one record per step. A missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
