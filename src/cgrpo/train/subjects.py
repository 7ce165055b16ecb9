"""Batches of multi-subject examples: K references and K class names per example, in the forms the policy
and the rewards take (``cgrpo.data.base.Example.references`` / ``subject_classes``).

Every example of a dataset has the same number of subjects K (checked once at start-up by
:func:`subject_count`); K = 1 is the single-subject case and gives exactly the tensors the trainer built
before multi-subject data existed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from cgrpo.data.base import Example, SubjectDataset
from cgrpo.train.components import TrainingError

References = torch.Tensor | list[torch.Tensor]


class SubjectCountError(TrainingError):
    """The examples of one dataset do not all have the same number of subjects (``cgrpo train`` prints it
    and exits 2)."""


def references_of(example: Example) -> tuple[torch.Tensor, ...]:
    """The example's K references ``[3, H_k, W_k]``, first = ``example.reference``."""
    return tuple(example.references)


def classes_of(example: Example) -> tuple[str, ...]:
    """The example's K subject class names, first = ``example.subject_class``."""
    return tuple(example.subject_classes)


def subject_count(examples: SubjectDataset | Sequence[Example], dataset: str) -> int:
    """The number of subjects K every example of ``examples`` (a dataset or a list) has; ``dataset`` names
    it in the error. A file dataset (one with parsed ``records``) is counted from its records, without
    decoding an image.

    Raises:
        SubjectCountError: when examples differ in K, naming the dataset and the first example that differs.
    """
    count: int | None = None
    first_id = ""
    for example_id, k in _counts(examples):
        if count is None:
            count, first_id = k, example_id
        elif k != count:
            raise SubjectCountError(
                f"dataset {dataset}: every example must have the same number of subjects; example "
                f"{first_id!r} has {count}, example {example_id!r} has {k}"
            )
    if count is None:
        raise SubjectCountError(f"dataset {dataset} is empty")
    return count


def _counts(examples: SubjectDataset | Sequence[Example]) -> Iterator[tuple[str, int]]:
    """(id, K) of every example."""
    records = getattr(examples, "records", None)
    if records is not None:  # cgrpo.data.formats.Record: ``subjects`` lists all K
        for record in records:
            yield record.id, len(getattr(record, "subjects", None) or (record,))
        return
    for index in range(len(examples)):
        example = examples[index]
        yield example.id, len(references_of(example))


def condition_references(examples: Sequence[Example]) -> References:
    """The references of a batch for ``policy.condition``: ``[B, 3, H, W]`` for one subject (as always),
    ``[B, K, 3, H, W]`` for K subjects of one size, else K tensors ``[B, 3, H_k, W_k]``."""
    return batch_references(references_per_subject(examples))


def batch_references(per_subject: Sequence[torch.Tensor]) -> References:
    """K reference batches ``[B, 3, H_k, W_k]`` in the form ``policy.condition`` takes: ``[B, 3, H, W]`` for
    one subject, ``[B, K, 3, H, W]`` for K of one size, else the K batches."""
    per_subject = list(per_subject)
    if len(per_subject) == 1:
        return per_subject[0]
    if len({tuple(r.shape) for r in per_subject}) == 1:
        return torch.stack(per_subject, dim=1)
    return per_subject


def references_per_subject(examples: Sequence[Example], repeat: int = 1) -> list[torch.Tensor]:
    """K tensors ``[B * repeat, 3, H_k, W_k]``: subject k's reference of every example, each repeated
    ``repeat`` times in a row (one group), as the rewards take them."""
    count = len(references_of(examples[0]))
    return [
        torch.stack([references_of(e)[k] for e in examples]).repeat_interleave(repeat, dim=0)
        for k in range(count)
    ]


def classes_per_subject(examples: Sequence[Example], repeat: int = 1) -> list[list[str]]:
    """K lists of ``B * repeat`` class names: subject k's class of every example, repeated like
    :func:`references_per_subject`."""
    count = len(classes_of(examples[0]))
    return [[classes_of(e)[k] for e in examples for _ in range(repeat)] for k in range(count)]


def references_to(references: References, device: torch.device | str) -> References:
    """A reference tensor, or a list of K reference tensors, on ``device``."""
    if isinstance(references, torch.Tensor):
        return references.to(device)
    return [r.to(device) for r in references]


def reference_list(references: References) -> list[torch.Tensor]:
    """K tensors ``[B, 3, H_k, W_k]`` of any form :func:`condition_references` returns."""
    if not isinstance(references, torch.Tensor):
        return list(references)
    return [references] if references.ndim == 4 else list(references.unbind(dim=1))
