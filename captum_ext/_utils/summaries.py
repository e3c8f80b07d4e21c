"""Compact ``repr`` of result objects: the shapes and dtypes of their tensors, not the values;
and durations in words (:func:`format_seconds`).

A result of a few images printed with the default dataclass ``repr`` shows every tensor in
full (hundreds of lines, hundreds of kilobytes for a ResNet's per-layer tensors). The result
classes print themselves with :func:`compact_repr` instead::

    @dataclass
    class SomeResult:
        maps: Tensor
        target: Tensor

        def __repr__(self) -> str:
            return compact_repr(self)

    # SomeResult(maps=Tensor(shape=(16, 1, 224, 224), dtype=float32),
    #            target=Tensor(shape=(16,), dtype=int64))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

#: sequences and mappings longer than this print their first two items, "..." and the last
MAX_ITEMS = 6


def tensor_summary(value: Any) -> str:
    """A short description of ``value``: ``Tensor(shape=(N, ...), dtype=float32)`` for a
    tensor (``, device=cuda:0`` added off the CPU), ``ndarray(shape=..., dtype=...)`` for a
    numpy array; tuples, lists and mappings item by item (the first two items, ``...`` and
    the last, after the count, when they hold more than :data:`MAX_ITEMS`: ``[12 items:
    0, 1, ..., 11]``); anything else
    (numbers, strings, None) as its ``repr``."""
    if isinstance(value, Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        device = "" if value.device.type == "cpu" else f", device={value.device}"
        return f"Tensor(shape={tuple(value.shape)}, dtype={dtype}{device})"
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        return f"ndarray(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, Mapping):
        items = [f"{key!r}: {tensor_summary(item)}" for key, item in value.items()]
        return _bracketed(items, "{", "}")
    if isinstance(value, tuple | list) and not hasattr(value, "_fields"):
        items = [tensor_summary(item) for item in value]
        if isinstance(value, tuple) and len(items) == 1:
            return f"({items[0]},)"
        return _bracketed(items, *(("(", ")") if isinstance(value, tuple) else ("[", "]")))
    return repr(value)


def names_summary(names: Mapping[str, Any] | Sequence[str], noun: str) -> str:
    """``<K layers: 'a', 'b', ..., 'z'>``: how many names, the first two and the last; for a
    mapping of per-name tensors, each name with its tensor's :func:`tensor_summary`."""
    if isinstance(names, Mapping):
        items = [f"{name!r}: {tensor_summary(value)}" for name, value in names.items()]
    elif isinstance(names, tuple | list):
        items = [repr(name) for name in names]
    else:
        return type(names).__name__
    if len(items) > 3:
        items = [*items[:2], "...", items[-1]]
    count = len(names)
    return f"<{count} {noun}{'' if count == 1 else 's'}: " + ", ".join(items) + ">"


def compact_repr(result: Any, **formatted: str) -> str:
    """``Name(field=..., ...)`` of a dataclass or NamedTuple ``result``, each field by
    :func:`tensor_summary` (dataclass fields declared with ``repr=False`` left out).

    Args:
        result (dataclass or NamedTuple): the object to describe.
        **formatted (str): already formatted text for some fields, by field name (e.g.
            ``layers=names_summary(result.layers, "layer")``).

    Returns:
        str: one line, e.g. ``VOICEResult(explanation=Tensor(shape=(16, 1, 224, 224),
        dtype=float32), ...)``.
    """
    if dataclasses.is_dataclass(result):
        names = [field.name for field in dataclasses.fields(result) if field.repr]
    else:
        names = list(result._fields)
    unknown = set(formatted) - set(names)
    if unknown:
        raise ValueError(f"`formatted` names no field of {type(result).__name__}: {unknown}.")
    fields = (
        f"{name}={formatted[name] if name in formatted else tensor_summary(getattr(result, name))}"
        for name in names
    )
    return f"{type(result).__name__}(" + ", ".join(fields) + ")"


def _bracketed(items: list[str], opening: str, closing: str) -> str:
    if len(items) > MAX_ITEMS:
        shown = ", ".join([*items[:2], "...", items[-1]])
        return f"{opening}{len(items)} items: {shown}{closing}"
    return opening + ", ".join(items) + closing


def format_seconds(seconds: float) -> str:
    """A duration as "12.3 s", "4.5 min" or "1.2 h"."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"
