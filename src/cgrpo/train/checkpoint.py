"""Checkpoints that are never half-written: a temp directory is filled, fsynced and renamed into place.

Layout: ``OUTPUT/checkpoints/step-000050/{trainable.safetensors, state.pt, COMPLETE}``. ``state.pt``
holds the optimiser, all RNG states, the step, the data position and the tracker state, so a resumed
run continues exactly where the killed one stopped. Old checkpoints are removed only after a new one
is complete (keep-last-k), so a failure while saving (disk full, permission error) leaves the previous
one intact.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

_PREFIX = "step-"
_TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad (LoRA adapters, or everything in full fine-tuning)."""
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    module: nn.Module | dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep_last``. Returns its path.

    ``module``: the model whose trainable parameters are saved, or those tensors already gathered (FSDP).
    Nothing is visible under ``step-NNNNNN`` until every file is written and fsynced; a failure (disk full,
    permission denied, a kill) leaves at most a dot-prefixed temp dir, which :func:`list_checkpoints`
    ignores and :func:`remove_stale_temp_dirs` deletes.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    weights = trainable_state_dict(module) if isinstance(module, nn.Module) else module
    final = checkpoint_dir / f"{_PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=_TMP_SUFFIX, dir=checkpoint_dir))
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors")
        )
        torch.save({"step": step, **state}, tmp / "state.pt")
        (tmp / "COMPLETE").write_text(str(step))
        for name in ("trainable.safetensors", "state.pt", "COMPLETE"):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            # Re-saving a step (after a resume): move the old one aside first, so that a crash between the
            # two renames still leaves a complete copy on disk (the aside copy is cleaned up at next start).
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=_OLD_SUFFIX, dir=checkpoint_dir))
            os.replace(final, aside / final.name)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(checkpoint_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable (a power cut after ``os.replace`` must not lose the new entry)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_dirs(checkpoint_dir: str | Path) -> list[Path]:
    """Delete the temp dirs a killed save left behind (``.step-NNNNNN.*``); returns what was removed."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    stale = [
        p
        for p in checkpoint_dir.iterdir()
        if p.is_dir() and p.name.startswith(f".{_PREFIX}") and p.name.endswith((_TMP_SUFFIX, _OLD_SUFFIX))
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs and ones without ``COMPLETE`` are ignored)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [
        p
        for p in checkpoint_dir.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and (p / "COMPLETE").exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, state) of a complete checkpoint directory, on CPU."""
    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise ValueError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    weights = load_file(str(path / "trainable.safetensors"))
    return weights, torch.load(path / "state.pt", weights_only=False)


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor], source: str | Path = "") -> None:
    """Copy ``weights`` into ``module``'s parameters (strictly: every saved key must exist)."""
    params = dict(module.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise ValueError(f"checkpoint {source} has weights the model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load_checkpoint(path: str | Path, module: nn.Module) -> dict[str, Any]:
    """Load the trainable weights into ``module`` (strictly: every saved key must exist) and return state."""
    weights, state = read_checkpoint(path)
    load_weights(module, weights, path)
    return state
