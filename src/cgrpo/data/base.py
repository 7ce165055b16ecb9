"""What every dataset yields: one (reference image, prompt) example, optionally with a target image."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Example:
    """One training or evaluation pair.

    ``reference``: float ``[3, H, W]`` in [0, 1] (the subject's reference image);
    ``target``: float ``[3, H, W]`` in [0, 1] ground truth if the dataset has one (SFT, checks), else None.
    """

    id: str
    subject_id: str
    subject_class: str
    prompt: str
    reference: torch.Tensor
    target: torch.Tensor | None = None
    kind: str = ""  # prompt kind, e.g. "context", "placement", "property" (for per-kind reports)


class SubjectDataset(Protocol):
    """A finite, indexable list of examples; the trainer draws batches from it with its own RNG."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


def iterate(dataset: SubjectDataset) -> Iterator[Example]:
    for index in range(len(dataset)):
        yield dataset[index]


def stack_references(examples: Sequence[Example]) -> torch.Tensor:
    """``[B, 3, H, W]`` references of a batch of examples."""
    return torch.stack([example.reference for example in examples])
