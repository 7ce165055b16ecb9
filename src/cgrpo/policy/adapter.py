"""Where a trained LoRA adapter lies: an adapter folder, a run folder or a saved policy folder."""

from __future__ import annotations

from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"


def resolve_adapter(path: str | Path) -> Path:
    """The adapter folder inside ``path``: ``path`` itself, ``path/final`` (a run) or ``path/lora`` (a saved
    policy)."""
    path = Path(path)
    for candidate in (path, path / "final", path / "lora"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise FileNotFoundError(
        f"{path} holds no LoRA adapter: expected {ADAPTER_CONFIG} in it, in final/ (a run) or in lora/"
    )
