"""The batches of a user's DataLoader: tensors, ``(inputs, labels, ...)`` tuples, or dicts as
Hugging Face datasets and image processors give them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

#: where a dict batch keeps the inputs, and the labels
INPUT_KEYS = ("pixel_values", "image", "images", "inputs", "input")
LABEL_KEYS = ("labels", "label", "targets", "target")


def dict_batch(batch: Mapping, argument: str) -> tuple[Tensor, Any]:
    """``(inputs, labels or None)`` of a dict batch: the inputs under exactly one of
    :data:`INPUT_KEYS` (a tensor), the labels under at most one of :data:`LABEL_KEYS`;
    other keys are ignored. ``ValueError`` naming ``argument`` and the keys otherwise."""
    inputs = [key for key in INPUT_KEYS if key in batch]
    labels = [key for key in LABEL_KEYS if key in batch]
    if len(inputs) != 1 or len(labels) > 1 or not isinstance(batch[inputs[0]], Tensor):
        raise ValueError(
            f"`{argument}` yields dicts with keys {sorted(map(str, batch))}; the inputs are read "
            f"from exactly one tensor of {list(INPUT_KEYS)} and the labels from at most one of "
            f"{list(LABEL_KEYS)} (or give a collate_fn that returns (inputs, labels) pairs)."
        )
    return batch[inputs[0]], (batch[labels[0]] if labels else None)
