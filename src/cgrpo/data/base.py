"""What every dataset yields: one (reference image(s), prompt) example, optionally with a target image."""

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

    A multi-subject example (K subjects in one image) keeps its first subject in ``reference`` and
    ``subject_class`` and the 2nd..Kth in ``extra_references`` (``[3, H_k, W_k]`` each, sizes may differ)
    and ``extra_classes``; ``references``, ``subject_classes`` and ``num_subjects`` see all K. A
    single-subject example has K = 1 and no extras.
    """

    id: str
    subject_id: str
    subject_class: str
    prompt: str
    reference: torch.Tensor
    target: torch.Tensor | None = None
    kind: str = ""  # prompt kind, e.g. "context", "placement", "property" (for per-kind reports)
    extra_references: tuple[torch.Tensor, ...] = ()
    extra_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.extra_references) != len(self.extra_classes):
            raise ValueError(
                f"example {self.id}: {len(self.extra_references)} extra references but "
                f"{len(self.extra_classes)} extra classes (one class per subject)"
            )

    @property
    def references(self) -> tuple[torch.Tensor, ...]:
        """All K subjects' reference images; the first is ``reference``."""
        return (self.reference, *self.extra_references)

    @property
    def subject_classes(self) -> tuple[str, ...]:
        """All K subjects' class names; the first is ``subject_class``."""
        return (self.subject_class, *self.extra_classes)

    @property
    def num_subjects(self) -> int:
        return 1 + len(self.extra_references)


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
