"""The shared engine: gradients of many per-class scalars from one forward pass.

For a batch of N examples and C' classes per example, every method that needs
``d s_c(x) / d A`` for several classes ``c`` (a layer's activations ``A`` or the inputs) gets
them here from ONE forward pass and one batched vector-Jacobian product
(``torch.autograd.grad(..., is_grads_batched=True)``), split into chunks of at most
``max_batch`` classes to bound memory. Examples are independent in eval mode, so the
gradient of ``sum_n s_{c_nj}(x_n)`` with respect to ``A`` holds, in row ``n``, the gradient for
example ``n`` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .hooks import _as_leaves, capture_layer
from .layers import root_module
from .model_state import preserved_state
from .validation import class_selection, format_additional_forward_args

#: Per-class scalars the engine differentiates, each a function of the (N, C) logits.
SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "logit": lambda logits: logits,
    "cross_entropy": lambda logits: -torch.log_softmax(logits, dim=1),
    "probability": lambda logits: torch.softmax(logits, dim=1),
}

DEFAULT_MAX_BATCH = 64
_CHUNK_BYTES = 1 << 30  # bound on one chunk's gradient tensor

Reducer = Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], Any]


@dataclass
class ClassGradients:
    """What the engine returns.

    Attributes:
        result: per chunk, ``reduce(gradients, activations)`` concatenated along dim 1; with no
            reducer, a tuple of gradients shaped (N, C', *activation.shape[1:]).
        activations: the layer activations (or inputs), detached, one tensor per captured input.
        logits: the model's (N, C) output, detached.
        classes: (N, C') long tensor of the classes differentiated.
        multi: True when the caller asked for several classes per example.
    """

    result: Any
    activations: tuple[Tensor, ...]
    logits: Tensor
    classes: Tensor
    multi: bool


def add_note(error: BaseException, note: str) -> None:
    """Attach ``note`` to ``error`` (PEP 678), so that it is shown with the traceback; the
    exception keeps its type. Python 3.10 has no ``add_note``: the note goes into ``args``."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    elif error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{note}", *error.args[1:])


def run_forward(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    additional_forward_args: Any,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    """Call the model and check that it returns (N, C) logits."""
    extra = format_additional_forward_args(additional_forward_args)
    try:
        output = forward_func(*inputs, *extra)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as error:
        # keep the model's own exception (its type, message and traceback); add which inputs
        # it was called with, so that a shape mismatch is easy to trace back
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        add_note(
            error,
            f"captum_ext: forward_func raised on `inputs` of shape {shapes}. If the inputs are "
            "at fault, check the rank and size the model expects (batch first).",
        )
        raise
    if output_transform is not None:
        output = output_transform(output)
    n = inputs[0].shape[0]
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != n:
        got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(
            f"forward_func must return (N, classes) logits for N={n} examples, got {got}; pass "
            "`output_transform` to reduce the output to (N, classes)."
        )
    return output


def resolve_score(score: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if callable(score):
        return score
    if score not in SCORES:
        raise ValueError(f"`score`={score!r}: expected one of {sorted(SCORES)} or a callable.")
    return SCORES[score]


def auto_chunk(max_batch: int | None, n_classes: int, wrt: Sequence[Tensor]) -> int:
    """Classes per vector-Jacobian product: ``max_batch``, else 64 bounded to ~1 GiB."""
    if max_batch is not None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"`max_batch` must be a positive int, got {max_batch!r}.")
        return min(max_batch, n_classes)
    per_class = sum(t.numel() * t.element_size() for t in wrt)
    return max(1, min(DEFAULT_MAX_BATCH, n_classes, _CHUNK_BYTES // max(per_class, 1)))


def _one_hot(columns: Tensor, width: int, like: Tensor) -> Tensor:
    """(N, B) column indices -> (N, B, width) one-hot rows."""
    rows = like.new_zeros(*columns.shape, width)
    return rows.scatter_(2, columns.unsqueeze(-1), 1)


def _analytic_cotangents(score: str, logits: Tensor) -> Callable[[Tensor], Tensor]:
    """Cotangents on the logits equal to d score_c / d logits for the built-in scores.

    Handing them to the backward directly skips the log-softmax / gather backward, which has
    no batching rule and would otherwise run once per class row.
    """
    if score == "logit":
        return lambda columns: _one_hot(columns, logits.shape[1], logits)
    detached = logits.detach()
    precise = detached if detached.dtype == torch.float64 else detached.float()
    p = torch.softmax(precise, dim=1).to(logits.dtype)  # half logits: softmax in float32
    if score == "cross_entropy":  # d(-log p_c)/dz = p - e_c
        return lambda columns: p.unsqueeze(1) - _one_hot(columns, p.shape[1], p)
    # probability: d p_c / dz = p_c (e_c - p)
    return lambda columns: (
        p.gather(1, columns).unsqueeze(-1) * (_one_hot(columns, p.shape[1], p) - p.unsqueeze(1))
    )


def _vjp_chunks(
    output: Tensor,
    wrt: tuple[Tensor, ...],
    selection: Tensor,
    chunk: int,
    cotangents: Callable[[Tensor], Tensor],
):
    """Yield (start, gradients) with gradients (N, B, *t.shape[1:]) per tensor of ``wrt``.

    ``cotangents(columns)`` maps (N, B) selected columns to the (N, B, M) cotangents on
    ``output`` whose vector-Jacobian products are the wanted gradients.
    """
    n, n_classes = selection.shape
    for start in range(0, n_classes, chunk):
        stop = min(start + chunk, n_classes)
        last = stop == n_classes
        width = stop - start
        vectors = cotangents(selection[:, start:stop])
        if n_classes == 1:
            grads = torch.autograd.grad(
                output, wrt, grad_outputs=vectors[:, 0], retain_graph=not last, allow_unused=True
            )
            grads = tuple(None if g is None else g.unsqueeze(1) for g in grads)
        else:
            grads = torch.autograd.grad(
                output,
                wrt,
                grad_outputs=vectors.movedim(1, 0),
                is_grads_batched=True,
                retain_graph=not last,
                allow_unused=True,
            )
            grads = tuple(None if g is None else g.movedim(0, 1) for g in grads)
        grads = tuple(
            t.new_zeros(n, width, *t.shape[1:]) if g is None else g for g, t in zip(grads, wrt)
        )
        yield start, grads


def class_gradients(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    classes: Any,
    *,
    layer: nn.Module | None = None,
    layer_input: bool = False,
    score: str | Callable[[Tensor], Tensor] = "logit",
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
    max_batch: int | None = None,
    reduce: Reducer | None = None,
    class_argument: str = "target",
    default_classes: str = "predicted",
) -> ClassGradients:
    """Gradients of ``score(logits)[n, c]`` for the requested classes, in one forward pass.

    Args:
        forward_func: the model, (inputs..., additional_forward_args...) -> (N, C) logits.
        inputs: tuple of input tensors (batch first).
        classes: any Captum-style target (see ``class_selection``): None, int, list, tensor,
            ``"all"``, or 2-D (N, C'); or, for methods composed on the engine, a callable
            mapping the detached logits to an (N, C') tensor of columns of ``score``.
        layer: differentiate with respect to this module's output (or its inputs when
            ``layer_input``); None differentiates with respect to ``inputs``.
        score: "logit", "cross_entropy" (cross-entropy with the class as label),
            "probability", or a callable mapping (N, C) logits to (N, M) per-example scalars
            (M = C for per-class scores).
        max_batch: classes per batched vector-Jacobian product (default 64, or fewer so that
            one chunk's gradients take at most about 1 GiB).
        reduce: ``reduce(gradients, activations)`` applied to each chunk, in column order,
            where gradients are (N, B, *A) per tensor; its tensor (or tuple of tensors)
            outputs are concatenated along dim 1 (a reducer that accumulates itself returns
            None). Use it to keep memory at the size of the final maps.

    Returns:
        ClassGradients.
    """
    score_fn = resolve_score(score)
    model = root_module(forward_func)
    with preserved_state([model, layer]), torch.enable_grad():
        if layer is None:
            replaced, leaves = _as_leaves(inputs)
            if not leaves:
                raise TypeError("`inputs` holds no floating-point tensor to differentiate.")
            logits = run_forward(forward_func, replaced, additional_forward_args, output_transform)
            wrt = leaves
        else:
            with capture_layer(layer, layer_input=layer_input) as capture:
                logits = run_forward(
                    forward_func, inputs, additional_forward_args, output_transform
                )
            wrt = capture.single_call(type(layer).__name__)
        if callable(classes):
            # internal composition: the caller picks columns of `score` from the logits
            selection, multi = classes(logits.detach()), True
        else:
            selection, multi = class_selection(
                classes, logits, argument=class_argument, default=default_classes
            )
        if isinstance(score, str):
            output, cotangents = logits, _analytic_cotangents(score, logits)
        else:
            output = score_fn(logits)
            if (
                not isinstance(output, Tensor)
                or output.dim() != 2
                or output.shape[0] != len(logits)
            ):
                raise ValueError(
                    f"`score` must map (N, C) logits to an (N, M) tensor, got "
                    f"{getattr(output, 'shape', type(output).__name__)}."
                )
            width = output.shape[1]
            cotangents = lambda columns: _one_hot(columns, width, output)  # noqa: E731
        if not output.requires_grad:
            raise ValueError(
                "the model's output does not depend on the differentiated tensors "
                "(does forward_func detach its output or run under torch.no_grad?)."
            )
        chunk = auto_chunk(max_batch, selection.shape[1], wrt)
        activations = tuple(t.detach() for t in wrt)
        pieces = []
        for _, grads in _vjp_chunks(output, wrt, selection, chunk, cotangents):
            pieces.append(grads if reduce is None else reduce(grads, activations))
    result = _concat_pieces(pieces)
    return ClassGradients(result, activations, logits.detach(), selection, multi)


def _concat_pieces(pieces: list) -> Any:
    if all(piece is None for piece in pieces):  # the reducer accumulated on its own
        return None
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], Tensor):
        return torch.cat(pieces, dim=1)
    return tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))
