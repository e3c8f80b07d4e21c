"""Argument checks and labels shared by the report sections (private)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`images` must be an N x C x H x W tensor, got {got}.")
    if images.shape[0] == 0:
        raise ValueError("`images` holds no images (N = 0).")
    return images


def _check_names_labels(names: Any, labels: Any, n: int) -> list[Any] | None:
    if names is not None and len(names) != n:
        raise ValueError(f"`names` has {len(names)} entries for {n} images.")
    if labels is None:
        return None
    mixed = isinstance(labels, np.ndarray) and labels.dtype == object  # e.g. [3, None]
    if isinstance(labels, (Tensor, np.ndarray)) and not mixed and not _integer_dtype(labels.dtype):
        raise TypeError(
            f"`labels` must hold integer class indices (or None), got a {labels.dtype} "
            f"{type(labels).__name__}"
            + _float_note(
                labels.dtype.is_floating_point
                if isinstance(labels, Tensor)
                else np.issubdtype(labels.dtype, np.floating)
            )
        )
    if isinstance(labels, (Tensor, np.ndarray)):
        if labels.ndim == 2 and labels.shape[1] == 1:  # (N, 1): one label per row
            labels = labels.reshape(-1)
        if labels.ndim != 1:  # a 0-d label for one image, or a table
            raise ValueError(
                f"`labels` must be a sequence of N = {n} class indices (or None), got a "
                f"{type(labels).__name__} of shape {tuple(labels.shape)}."
            )
        labels = labels.tolist()
    else:
        labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"`labels` has {len(labels)} entries for {n} images.")
    return [_label_entry(label, i) for i, label in enumerate(labels)]


def _label_entry(label: Any, i: int) -> int | None:
    """``labels[i]`` as a class index (None where unknown). Integers only, as
    ``IntrospectiveNetwork.fit`` takes them: Python and numpy integers, and one-element
    integer tensors or arrays (a DataLoader's ``tensor([3])``). A float (also 2.0) or a bool
    is refused, naming ``labels``, where ``int()`` would truncate 0.7 and -0.9 to class 0
    without a word."""
    if label is None:
        return None
    if isinstance(label, (Tensor, np.ndarray)):  # e.g. tensor([3]) from a DataLoader
        count = label.numel() if isinstance(label, Tensor) else label.size
        if count != 1 or not _integer_dtype(label.dtype):
            raise TypeError(
                f"`labels`[{i}] must be an integer class index (or None), got a {label.dtype} "
                f"{type(label).__name__} of shape {tuple(label.shape)}"
                + _float_note(
                    label.dtype.is_floating_point
                    if isinstance(label, Tensor)
                    else (np.issubdtype(label.dtype, np.floating))
                )
            )
        return int(label.reshape(()).item())
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise TypeError(
            f"`labels`[{i}] must be an integer class index (or None), got "
            f"{type(label).__name__} {label!r}"
            + _float_note(
                isinstance(label, numbers.Real) and not isinstance(label, numbers.Integral)
            )
        )
    return int(label)


def _float_note(is_float: bool) -> str:
    return "; float labels are refused, not rounded." if is_float else "."


def _integer_dtype(dtype: Any) -> bool:
    """Whether a tensor's or array's ``dtype`` holds integers (bool does not count)."""
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return np.issubdtype(dtype, np.integer)


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(
            f"`class_names` (--classes) has {len(class_names)} names but the model has "
            f"{num_classes} outputs."
        )
    return [str(name) for name in class_names]


def _true_class(labels: list[Any] | None, i: int, class_names: list[str]) -> int | None:
    if labels is None or labels[i] is None:
        return None
    true = _label_entry(labels[i], i)
    if not 0 <= true < len(class_names):
        raise ValueError(
            f"`labels`[{i}]={true} is not a class index of the model (0..{len(class_names) - 1})."
        )
    return true


def _image_name(names: Sequence[str] | None, i: int) -> str:
    return str(names[i]) if names is not None else f"#{i}"


def _row_label(
    name: str, probabilities: Tensor, p: int, q: int, true: int | None, class_names: list[str]
) -> str:
    label = f"{name}: predicted {class_names[p]} ({float(probabilities[p]):.1%}), "
    label += f"runner-up {class_names[q]} ({float(probabilities[q]):.1%})"
    if true is not None:
        label += f"; true class {class_names[true]} ({'correct' if true == p else 'wrong'})"
    return label


def _to_cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32)


def _check_count(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{argument}` must be a non-negative int, got {value!r}.")
    return value


def _check_overlay_options(alpha: Any, cmap: Any, caller: str) -> None:
    """Check a section's ``alpha`` (a number in [0, 1]) and ``cmap`` (a matplotlib colormap
    name; None: the section takes no ``cmap``) when it is called, before any map is computed."""
    from .overlay import _check_alpha, _colormap

    _check_alpha(alpha)
    if cmap is not None:
        _colormap(cmap, caller)
