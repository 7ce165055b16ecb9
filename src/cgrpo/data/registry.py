"""The dataset registry: a YAML ``data.name`` picks a factory here, ``data.options`` are its arguments.

Every factory takes ``path`` (what the trainer swaps for ``eval_path`` to build the held-out set) and
returns a :class:`~cgrpo.data.base.SubjectDataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cgrpo.data.base import SubjectDataset
from cgrpo.data.formats import ImageSize
from cgrpo.registry import Registry, check_options

DATASETS: Registry[SubjectDataset] = Registry("dataset")


@DATASETS.register("jsonl")
def jsonl_dataset(
    path: str | Path, image_size: ImageSize | None = None, split: str | None = None
) -> SubjectDataset:
    """A JSONL file of records or a folder of subjects (docs/datasets.md)."""
    from cgrpo.data.formats import load_dataset

    return load_dataset(path, image_size=image_size, split=split)


@DATASETS.register("dreambench")
def dreambench_dataset(
    path: str | Path,
    image_size: ImageSize | None = None,
    subjects: Sequence[str] | None = None,
    prompts_per_subject: int | None = None,
    unique_token: str = "",
) -> SubjectDataset:
    """DreamBench from its official folder: 30 subjects x 25 prompts, "a {class}" prompts, no targets."""
    from cgrpo.data.dreambench import load_dreambench

    return load_dreambench(path, image_size, subjects, prompts_per_subject, unique_token)


@DATASETS.register("mini")
def mini_dataset(
    split: str = "train",
    image_size: int = 32,
    num_train_subjects: int = 600,
    num_test_subjects: int = 64,
    prompts_per_subject: int = 8,
    seed: int = 0,
    subjects: int = 1,
) -> SubjectDataset:
    """The procedural mini world (CPU): subjects, prompts of every kind and ground-truth targets;
    ``subjects`` 2 or 3 gives multi-subject scenes."""
    from cgrpo.data.miniworld import MiniWorld

    world = MiniWorld(image_size, num_train_subjects, num_test_subjects, seed=seed, subjects=subjects)
    return world.dataset(split, prompts_per_subject=prompts_per_subject, seed=seed)


def check(name: str, options: dict[str, Any] | None, key: str = "data") -> None:
    """Raise :class:`~cgrpo.config.ConfigError` naming ``<key>.name`` or ``<key>.options.<option>`` if no
    dataset ``name`` is registered or a training config's ``data.options`` hold an option it does not take.

    The options are those ``cgrpo.train.components.build_datasets`` takes: ``eval_path`` (the held-out
    file) besides the factory's own; for ``mini`` the :class:`~cgrpo.data.miniworld.MiniWorld` arguments,
    ``train`` (:meth:`~cgrpo.data.miniworld.MiniWorld.dataset`'s) and ``eval`` (its ``eval_set``'s).
    """
    options = dict(options or {})
    if name != "mini":
        options.pop("eval_path", None)
        DATASETS.check(name, options, f"{key}.name", f"{key}.options")
        return
    from cgrpo.data.miniworld import MiniWorld

    what, where = "the mini world", f"{key}.options"
    parts = {"train": MiniWorld.dataset, "eval": MiniWorld.eval_set}
    for part, factory in parts.items():
        # `split` and `seed` of the training set come from the trainer (the run's seed), not from options.
        exclude = ("self", "split", "seed") if part == "train" else ("self",)
        check_options(factory, options.pop(part, None) or {}, f"{where}.{part}", what, exclude=exclude)
    check_options(MiniWorld.__init__, options, where, what, exclude=["self"], also=parts)
