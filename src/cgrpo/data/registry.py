"""The dataset registry: a YAML ``data.name`` picks a factory here, ``data.options`` are its arguments.

Every factory takes ``path`` (what the trainer swaps for ``eval_path`` to build the held-out set) and
returns a :class:`~cgrpo.data.base.SubjectDataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cgrpo.data.base import SubjectDataset
from cgrpo.data.formats import ImageSize
from cgrpo.registry import Registry

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
) -> SubjectDataset:
    """The procedural mini world (CPU): subjects, prompts of every kind and ground-truth targets."""
    from cgrpo.data.miniworld import MiniWorld

    world = MiniWorld(image_size, num_train_subjects, num_test_subjects, seed=seed)
    return world.dataset(split, prompts_per_subject=prompts_per_subject, seed=seed)
