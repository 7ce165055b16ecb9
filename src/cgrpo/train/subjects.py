"""Batches of multi-subject examples: K references and K class names per example, in the forms the policy
and the rewards take (``cgrpo.data.base.Example.references`` / ``subject_classes``).

Every example of a dataset has the same number of subjects K (checked once at start-up by
:func:`subject_count`); K = 1 is the single-subject case and gives exactly the tensors the trainer built
before multi-subject data existed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cgrpo.data.base import Example

References = torch.Tensor | list[torch.Tensor]


class SubjectCountError(ValueError):
    """The examples of one dataset do not all have the same number of subjects."""


def references_of(example: Example) -> tuple[torch.Tensor, ...]:
    """The example's K references ``[3, H_k, W_k]``, first = ``example.reference``."""
    # An Example-like without the multi-subject fields (a dataset written before them) has one subject.
    return tuple(getattr(example, "references", None) or (example.reference,))


def classes_of(example: Example) -> tuple[str, ...]:
    """The example's K subject class names, first = ``example.subject_class``."""
    return tuple(getattr(example, "subject_classes", None) or (example.subject_class,))


def subject_count(examples: Sequence[Example], dataset: str) -> int:
    """The number of subjects K every example of ``dataset`` (a name for the error) has.

    Raises:
        SubjectCountError: when examples differ in K (naming the dataset and the first example that
            differs), or an example's references and class names differ in number.
    """
    count: int | None = None
    first_id = ""
    for example in examples:
        k = len(references_of(example))
        if len(classes_of(example)) != k:
            raise SubjectCountError(
                f"dataset {dataset}: example {example.id!r} has {k} references but "
                f"{len(classes_of(example))} subject classes"
            )
        if count is None:
            count, first_id = k, example.id
        elif k != count:
            raise SubjectCountError(
                f"dataset {dataset}: every example must have the same number of subjects; example "
                f"{first_id!r} has {count}, example {example.id!r} has {k}"
            )
    if count is None:
        raise SubjectCountError(f"dataset {dataset} is empty")
    return count


def condition_references(examples: Sequence[Example]) -> References:
    """The references of a batch for ``policy.condition``: ``[B, 3, H, W]`` for one subject (as always),
    ``[B, K, 3, H, W]`` for K subjects of one size, else K tensors ``[B, 3, H_k, W_k]``."""
    per_subject = references_per_subject(examples)
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
