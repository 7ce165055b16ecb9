"""Run logging: one JSON object per step in ``metrics.jsonl``, TensorBoard scalars, a console line.

The console line is an INFO record of this module's :mod:`logging` logger (the command line shows it).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from cgrpo.io import truncate_jsonl

log = logging.getLogger(__name__)


class MetricsLogger:
    """Append-only metrics log; on resume, lines past the resumed step are dropped first."""

    def __init__(
        self,
        output_dir: str | Path,
        tensorboard: bool = True,
        wandb: bool = False,
        resume_step: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        if resume_step is not None:
            # A run killed after logging step s but before checkpointing it re-runs s: one line per step.
            truncate_jsonl(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, purge events past the resumed step so the curves hold one value per step.
            purge_step = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=purge_step)
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                log.warning("log.wandb is true but wandb is not installed; skipping W&B")
            else:
                self._wandb = wandb_module.init(dir=str(self.output_dir), config=config or {}, resume="allow")

    def log(self, step: int, metrics: dict[str, float], echo: bool = True) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if echo:
            log.info(_console_line(record))

    def add_image(self, tag: str, image_hwc, step: int) -> None:
        if self._writer is not None:
            self._writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value: Any) -> Any:
    # Full precision: a KL of 1e-9 next to a clip fraction of 0.03 is information, not noise to round away.
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON has no NaN or infinity
    return value


_CONSOLE_KEYS = (
    "loss",
    "reward/id",
    "reward/prompt",
    "conflict_rate",
    "clip_fraction",
    "eval/id",
    "eval/prompt",
)


def _console_line(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']:>4}"]
    for key in _CONSOLE_KEYS:
        value = record.get(key)
        if isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
    return "  ".join(parts)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def log_to_stderr() -> None:
    """Show cgrpo's notices and metrics lines (``logging`` records, INFO and up) as plain lines on stderr.

    For worker processes (``cgrpo reproduce``'s runs, ``cgrpo demo --compare``) whose stderr is a log file or
    the parent's terminal; the command line itself shows them with rich (:mod:`cgrpo.cli`)."""
    library = logging.getLogger("cgrpo")
    if not any(getattr(h, "cgrpo_stderr", False) for h in library.handlers):
        handler = logging.StreamHandler()  # sys.stderr
        handler.cgrpo_stderr = True  # type: ignore[attr-defined]  # one handler however often it is called
        library.addHandler(handler)
    library.setLevel(logging.INFO)
