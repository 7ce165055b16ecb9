"""One contract for every training method (GRPO, SFT, RPO), after torchtune's recipes.

A recipe is a module of :mod:`cgrpo.train` with

- ``CONFIG``: its typed config dataclass (loaded from YAML with dotted overrides, ``validate()`` on load);
- ``run(config, resume=False, callbacks=None) -> dict``: train, write ``final/`` and (with held-out data)
  ``summary.json``, and return the summary ``{"base": ..., "trained": ...}`` (``{}`` when there is no held-out
  evaluation).
  ``resume=True`` continues from the newest checkpoint in ``output_dir`` and starts fresh when there is none.
  ``callbacks``: user :class:`~cgrpo.train.callbacks.Callback` s, called after the recipe's built-in ones.

The command line (``cgrpo train`` / ``sft`` / ``rpo``) and ``cgrpo reproduce`` run any recipe through
:func:`get` and :func:`load_config` without knowing which one it is. Modules are imported on first use, so
that ``cgrpo --help`` stays fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from cgrpo import config as config_io

# kind -> (module, the command that runs it)
RECIPES: dict[str, tuple[str, str]] = {
    "grpo": ("cgrpo.train.grpo", "cgrpo train"),
    "sft": ("cgrpo.train.sft", "cgrpo sft"),
    "rpo": ("cgrpo.train.rpo", "cgrpo rpo"),
}


class Recipe(Protocol):
    CONFIG: type

    def run(self, config: Any, resume: bool = False, callbacks: list | None = None) -> dict[str, Any]: ...


def get(kind: str) -> Recipe:
    """The recipe module of ``kind`` (``grpo``, ``sft`` or ``rpo``)."""
    if kind not in RECIPES:
        raise ValueError(f"unknown run kind {kind!r}; expected one of {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[kind][0])  # type: ignore[return-value]


def command(kind: str) -> str:
    """The command line that runs a config of ``kind``, e.g. ``cgrpo sft``."""
    get(kind)  # the same error for an unknown kind
    return RECIPES[kind][1]


def config_class(kind: str) -> type:
    return get(kind).CONFIG


def load_config(kind: str, path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """``kind``'s typed config from a YAML file and dotted overrides; errors name the key."""
    return config_io.load_config(config_class(kind), path, list(overrides or []))


def from_dict(kind: str, data: dict[str, Any]) -> Any:
    """``kind``'s typed config from a plain dict (a plan's or a spec's); errors name the key."""
    return config_io.from_dict(config_class(kind), data)
