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
    checkpoint_dir: str | Path, step: int, module: nn.Module, state: dict[str, Any], keep_last: int = 2
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep_last``. Returns its path."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"{_PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=checkpoint_dir))
    try:
        save_file(trainable_state_dict(module), str(tmp / "trainable.safetensors"))
        torch.save({"step": step, **state}, tmp / "state.pt")
        (tmp / "COMPLETE").write_text(str(step))
        for name in ("trainable.safetensors", "state.pt", "COMPLETE"):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # re-saving the same step after a resume: replace it as a whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_checkpoint(path: str | Path, module: nn.Module) -> dict[str, Any]:
    """Load the trainable weights into ``module`` (strictly: every saved key must exist) and return state."""
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(module.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise ValueError(f"checkpoint {path} has weights the model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return torch.load(path / "state.pt", weights_only=False)
