"""Matplotlib figures of a run (headless Agg backend): reward curves and the conflict rate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cgrpo.io import atomic_write  # noqa: E402


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return out


def reward_curves(
    records: list[dict[str, Any]],
    eval_history: list[dict[str, Any]],
    path: str | Path,
    larger: tuple[str, list[dict[str, Any]]] | None = None,
    heldout_images: int | None = None,
) -> Path:
    """Training-rollout rewards (smoothed) and held-out ODE rewards over iterations, one panel per reward.
    ``larger``: (its label, points like ``eval_history``'s) of a larger held-out evaluation, drawn beside;
    ``heldout_images``: how many images each point of ``eval_history`` has (named in the legend)."""
    heldout_label = "held-out (ODE, fixed seeds; 95% interval)"
    if heldout_images:
        heldout_label = f"held-out, {heldout_images} images (ODE, fixed seeds; 95% interval)"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in records]
    window = max(1, len(records) // 15)
    for ax, key, title in zip(axes, ("id", "prompt"), ("identity reward", "prompt reward"), strict=True):
        values = [r.get(f"reward/{key}") for r in records]
        if steps and all(v is not None for v in values):
            ax.plot(steps, values, color="0.75", lw=0.8, label="rollouts")
            ax.plot(steps, _smooth(values, window), color="C0", lw=1.6, label=f"rollouts (mean of {window})")
        eval_steps = [e["step"] for e in eval_history]
        eval_values = [e["metrics"].get(key) for e in eval_history]
        intervals = [e["metrics"].get(f"{key}_ci95") for e in eval_history]
        if eval_steps:
            ax.errorbar(
                eval_steps,
                eval_values,
                yerr=None if None in intervals else intervals,
                fmt="o-",
                color="C3",
                lw=1.6,
                capsize=3,
                label=heldout_label,
            )
        if larger is not None:
            label, points = larger
            ax.errorbar(
                [p["step"] for p in points],
                [p["metrics"][key] for p in points],
                yerr=[p["metrics"].get(f"{key}_ci95", 0.0) for p in points],
                fmt="s--",
                color="C2",
                lw=1.2,
                capsize=3,
                label=label,
            )
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    # One legend below both panels: inside them it covered the first held-out points.
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.02))
        fig.subplots_adjust(bottom=0.3)
    return _save(fig, path)


def conflict_curve(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Share of samples whose identity and prompt advantages have opposite signs (the paper's Fig. 7)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = [r["step"] for r in records if r.get("conflict_rate") is not None]
    rates = [r["conflict_rate"] for r in records if r.get("conflict_rate") is not None]
    if steps:
        ax.plot(steps, rates, color="0.75", lw=0.8)
        ax.plot(steps, _smooth(rates, max(1, len(rates) // 15)), color="C1", lw=1.6, label="smoothed")
        ax.axhline(0.502, ls="--", color="k", lw=1, label="paper (UNO, 50.2%)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("conflict rate")
    ax.set_title("reward conflict: opposite-sign advantages")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
