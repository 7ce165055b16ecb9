"""The learning-rate schedule of every recipe: constant, linear warmup, or warmup + cosine to a floor.

Hand-written on purpose: diffusers' ``get_cosine_schedule_with_warmup`` and transformers'
``get_cosine_with_min_lr_schedule_with_warmup`` ramp the warmup as ``i / warmup`` (the first step takes no
update at all), ours as ``(i + 1) / warmup``; and diffusers has no cosine floor. After the warmup the cosine
is transformers' formula (``tests/test_schedule.py`` checks both). Switching would change every published
number of a run with a warmup.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``.

    ``constant``: 1. ``warmup``: linear ramp ``(i + 1) / warmup`` over the first ``warmup`` steps, then 1.
    ``cosine``: the same ramp, then a half cosine from 1 down to ``min_ratio`` at ``total``.
    """
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "warmup":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; expected constant, warmup or cosine")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`lr_factor`, stepped once per optimisation step (its state is checkpointed)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, warmup, total, min_ratio)
    )
