"""The per-sample advantages a GRPO run logs (``advantages.jsonl``), read by the reward-conflict analysis
(:func:`cgrpo.eval.analyses.conflict_analysis`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from cgrpo.io import truncate_jsonl

ADVANTAGES_FILE = "advantages.jsonl"


def log_advantages(
    path: str | Path,
    step: int,
    a_id: torch.Tensor,
    a_prompt: torch.Tensor,
    group_size: int | None = None,
    denoising_step: int | None = None,
) -> None:
    """Append one iteration's per-sample advantages (``[N]`` each) to ``advantages.jsonl``.

    One line ``{"step", "a_id": [...], "a_prompt": [...], "group_size"?, "t"?}``; ``t`` marks advantages
    computed at one denoising step (e.g. from rewards of the predicted clean image at that step), read by
    the per-step conflict analysis. Non-finite values (masked samples) are written as null.
    """
    a_id, a_prompt = torch.as_tensor(a_id).reshape(-1), torch.as_tensor(a_prompt).reshape(-1)
    if a_id.shape != a_prompt.shape:
        raise ValueError(f"a_id {tuple(a_id.shape)} and a_prompt {tuple(a_prompt.shape)} differ in shape")
    record: dict[str, Any] = {
        "step": int(step),
        "a_id": [_json_float(v) for v in a_id.tolist()],
        "a_prompt": [_json_float(v) for v in a_prompt.tolist()],
    }
    if group_size is not None:
        record["group_size"] = int(group_size)
    if denoising_step is not None:
        record["t"] = int(denoising_step)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_advantages(path: str | Path, step: int) -> None:
    """On resume from iteration ``step``: drop logged records of later iterations (they will be re-run)."""
    truncate_jsonl(path, step)


def _json_float(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None
