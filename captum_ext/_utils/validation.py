"""Argument checks with messages that name the argument."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def format_inputs(inputs: Any, *, argument: str = "inputs") -> tuple[Tensor, ...]:
    """Captum's input convention: a tensor or a tuple of tensors, batch first, finite."""
    as_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
    if not as_tuple:
        raise ValueError(f"`{argument}` is an empty tuple; expected at least one tensor.")
    for i, tensor in enumerate(as_tuple):
        where = argument if len(as_tuple) == 1 else f"{argument}[{i}]"
        if not isinstance(tensor, Tensor):
            raise TypeError(f"`{where}` must be a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.dim() == 0:
            raise ValueError(f"`{where}` is a scalar; expected a batch with the examples first.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"`{where}` contains NaN or infinite values.")
    batch = as_tuple[0].shape[0]
    for i, tensor in enumerate(as_tuple[1:], start=1):
        if tensor.shape[0] != batch:
            raise ValueError(
                f"`{argument}[{i}]` has {tensor.shape[0]} examples but `{argument}[0]` has "
                f"{batch}; every input tensor needs the same batch size."
            )
    return as_tuple


def format_additional_forward_args(additional_forward_args: Any) -> tuple:
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def expand_per_example(values: Tensor, n: int, argument: str) -> Tensor:
    """Match per-example ``values`` (L, ...) to a batch of ``n``.

    L == n is used as is; L == 1 is broadcast; L dividing n is repeated with
    ``repeat_interleave``, the order in which Captum's NoiseTunnel, ``infidelity`` and
    ``sensitivity_max`` expand the inputs while passing other keywords through unchanged.
    """
    length = values.shape[0]
    if length == n:
        return values
    if length == 1:
        return values.expand(n, *values.shape[1:])
    if length and n % length == 0:
        return values.repeat_interleave(n // length, dim=0)
    raise ValueError(
        f"`{argument}` has {length} entries but the inputs have {n} examples; give one per "
        "example (or one for all)."
    )


def repeat_per_example(value: Any, n: int, repeats: int, rows: slice | None = None) -> Any:
    """Repeat each example of per-example tensors (leading dim ``n``) ``repeats`` times.

    Used where a batch is expanded with ``repeat_interleave`` (noisy copies, one row per
    (example, class) pair): tensors whose first dimension is ``n`` follow it, also inside
    tuples, optionally keeping only ``rows`` of the expanded batch; anything else (scalars,
    broadcastable tensors, non-tensors) is returned as it is.
    """
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        repeated = value.repeat_interleave(repeats, dim=0)
        return repeated if rows is None else repeated[rows]
    if isinstance(value, tuple):
        return tuple(repeat_per_example(v, n, repeats, rows) for v in value)
    return value


ALL_CLASSES = "all"


def class_selection(
    value: Any, logits: Tensor, *, argument: str, default: str
) -> tuple[Tensor, bool]:
    """Turn a Captum-style ``target``/``contrast`` into a (N, C') tensor of class indices.

    Accepted: None (``default``: "predicted" or "runner_up"), an int, a 0-dim or
    1-element tensor, a tuple of one int, a list of ints or of one-int tuples or a 1-D tensor
    (one class per example), ``"all"`` (every class), or a 2-D tensor / list of lists
    (N or 1 rows of C' classes each).

    Returns:
        (classes, multi): the indices on the logits' device, and whether the caller asked for
        several classes per example (so the output keeps a class dimension).
    """
    n, num_classes = logits.shape
    device = logits.device
    multi = False
    if value is None:
        if default == "runner_up":
            if num_classes < 2:
                raise ValueError(
                    f"`{argument}` defaults to the runner-up class, but the model has only "
                    f"{num_classes} output."
                )
            classes = logits.detach().topk(2, dim=1).indices[:, 1:2]
        else:
            classes = logits.detach().argmax(dim=1, keepdim=True)
        return classes, False
    if isinstance(value, str):
        if value != ALL_CLASSES:
            raise ValueError(f"`{argument}`={value!r}: the only string accepted is 'all'.")
        classes = torch.arange(num_classes, device=device).expand(n, num_classes)
        return classes, True
    if isinstance(value, tuple):
        if len(value) != 1:
            raise ValueError(
                f"`{argument}`={value!r}: a tuple indexes an output with more than two "
                "dimensions; these methods need (N, classes) logits."
            )
        value = value[0]
    if isinstance(value, bool):
        raise TypeError(f"`{argument}` must be a class index, not a bool.")
    if isinstance(value, int):
        classes = torch.full((n, 1), value, dtype=torch.long, device=device)
    else:
        if isinstance(value, list):
            value = [v[0] if isinstance(v, tuple) and len(v) == 1 else v for v in value]
            try:
                value = torch.tensor(value)
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"`{argument}` must be an int, a list of ints, 'all' or a tensor of "
                    f"class indices: {error}"
                ) from None
        if not isinstance(value, Tensor):
            raise TypeError(
                f"`{argument}` must be an int, a list, 'all' or a tensor of class indices, got "
                f"{type(value).__name__}."
            )
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"`{argument}` must hold integer class indices, got {value.dtype}.")
        value = value.to(device=device, dtype=torch.long)
        if value.numel() == 1 and value.dim() <= 1:
            classes = value.reshape(1, 1).expand(n, 1)
        elif value.dim() == 1:
            classes = expand_per_example(value, n, argument).unsqueeze(1)
        elif value.dim() == 2:
            classes = expand_per_example(value, n, argument)
            multi = True
        else:
            raise ValueError(
                f"`{argument}` has {value.dim()} dimensions; expected 1 (one class per example) "
                "or 2 (several classes per example)."
            )
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ValueError(
            f"`{argument}` holds class indices outside [0, {num_classes}) for a model with "
            f"{num_classes} outputs."
        )
    return classes, multi
