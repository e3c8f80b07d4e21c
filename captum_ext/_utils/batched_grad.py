"""The shared engine: gradients of many per-class scalars from one forward pass.

For a batch of N examples and C' classes per example, every method that needs
``d s_c(x) / d A`` for several classes ``c`` (a layer's activations ``A`` or the inputs) gets
them here from ONE forward pass and one batched vector-Jacobian product
(``torch.autograd.grad(..., is_grads_batched=True)``), split into chunks of at most
``max_batch`` classes to bound memory. Examples are independent in eval mode, so the
gradient of ``sum_n s_{c_nj}(x_n)`` with respect to ``A`` holds, in row ``n``, the gradient for
example ``n`` alone. Inside autograd's anomaly mode, whose NaN check ``vmap`` cannot batch,
a chunk's products are taken one class at a time instead (the same numbers, slower).
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize, prune
from torch.overrides import TorchFunctionMode

from .caller import keyword_only_forward_error, user_stacklevel
from .deprecation import moved_names
from .hooks import (
    OutputBytes,
    _as_leaves,
    call_hook,
    capture_layer,
    counted_output_bytes,
    registered_hooks,
    restored_buffers_of_modules_run,
)
from .layers import root_module, uncompiled
from .legacy_norms import is_legacy_norm_hook
from .model_state import gradients_on, preserved_state
from .validation import (
    OutOfMemoryError,
    PerExampleLayout,
    check_examples_first,
    check_int,
    format_additional_forward_args,
    output_selection,
    outside_inference_mode,
    outside_inference_mode_nested,
    rows_read_as_examples,
    take_rows,
)

#: Per-class scalars the engine differentiates (its ``score`` argument), each a function of
#: the (N, C) logits. (Named ``SCORES`` before; that name still works.)
TARGET_SCORE_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "logit": lambda logits: logits,
    "cross_entropy": lambda logits: -torch.log_softmax(logits, dim=1),
    "probability": lambda logits: torch.softmax(logits, dim=1),
}

#: the old name of :data:`TARGET_SCORE_FUNCTIONS` (it named three different things)
__getattr__ = moved_names(__name__, {"SCORES": f"{__name__}:TARGET_SCORE_FUNCTIONS"})

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
        logits: the model's output, detached: (N, C) logits, or (N, C, *positions) when the
            engine was allowed outputs of more than two dimensions (Captum's tuple targets).
        classes: (N, C') long tensor of the classes differentiated: columns of
            ``logits.flatten(1)`` (for (N, C) logits, the class indices).
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


def _mismatch_hint(forward_func: Callable, inputs: tuple[Tensor, ...]) -> str:
    """Name a dtype or device mismatch between the inputs and the model's parameters, the
    usual cause of torch's "Input type (double) and bias type (float) should be the same"."""
    model = root_module(forward_func)
    parameter = (
        next((p for p in model.parameters() if p.is_floating_point()), None) if model else None
    )
    if parameter is None:
        return ""
    hints = []
    for i, x in enumerate(inputs):
        where = "`inputs`" if len(inputs) == 1 else f"`inputs[{i}]`"
        if x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] > 4:
            hints.append(
                f"{where} has shape {tuple(x.shape)}: if these are images with their channels "
                "last (N, H, W, C), pass inputs.permute(0, 3, 1, 2) for (N, C, H, W)."
            )
        elif x.dim() == 3 and x.shape[0] in (1, 3, 4) and min(x.shape[1:]) > 4:
            hints.append(
                f"{where} has shape {tuple(x.shape)}: if it is one (C, H, W) image, it lacks "
                "the batch dimension; pass inputs.unsqueeze(0)."
            )
        if x.device != parameter.device:
            hints.append(
                f"{where} is on {x.device} but the model's parameters are on "
                f"{parameter.device}: move one to the other (inputs.to(device))."
            )
        elif x.is_floating_point() and x.dtype != parameter.dtype:
            hints.append(
                f"{where} is {x.dtype} but the model's parameters are {parameter.dtype}: pass "
                f"inputs.to({parameter.dtype}) (or convert the model)."
            )
        elif not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool:
            hints.append(
                f"{where} holds integers ({x.dtype}); if they are image pixels, convert them to "
                f"{parameter.dtype} and normalise them as the model was trained."
            )
    return "".join(" " + hint for hint in hints)


def call_model(
    forward_func: Callable, inputs: tuple[Tensor, ...], extra: tuple[Any, ...] = ()
) -> Any:
    """``forward_func(*inputs, *extra)``; where the model raises a RuntimeError or ValueError,
    the exception is kept (its type, message and traceback) with a note that gives the inputs'
    shapes and names a dtype, device or layout mismatch (integer pixels, channels last, a
    missing batch dimension), so that the cause is easy to trace back. A model whose
    ``forward`` takes only keyword arguments gets a TypeError that says how to wrap it
    (:func:`~captum_ext._utils.caller.keyword_only_forward_error`)."""
    try:
        return forward_func(*inputs, *extra)
    except OutOfMemoryError:
        raise
    except TypeError as error:  # ``def forward(self, *, pixel_values)``: say to wrap it
        clear = keyword_only_forward_error(forward_func, error, len(inputs) + len(extra))
        if clear is not None:
            raise clear from None
        raise
    except (RuntimeError, ValueError) as error:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, Tensor))
        add_note(
            error,
            f"captum_ext: forward_func raised on `inputs` of shape {shapes}. If the inputs are "
            "at fault, check the rank and size the model expects (batch first)."
            + _mismatch_hint(forward_func, inputs),
        )
        raise


_HALF_PRECISION = (torch.float16, torch.bfloat16)


def in_model_precision(forward_func: Callable, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``inputs`` with float32 / float64 tensors cast to the model's dtype where the model's
    floating-point parameters are all float16 or all bfloat16; otherwise as given.

    Captum's NoiseTunnel adds float32 noise to the inputs, so half-precision inputs reach a
    half-precision model as float32 and torch refuses them ("Input type (float) and bias type
    (c10::Half) should be the same"). The cast is differentiable: gradients still reach the
    inputs as they were passed."""
    if not any(x.dtype in (torch.float32, torch.float64) for x in inputs):
        return inputs
    dtype = half_precision_dtype(forward_func)
    if dtype is None:
        return inputs
    return tuple(x.to(dtype) if x.dtype in (torch.float32, torch.float64) else x for x in inputs)


def half_precision_dtype(forward_func: Callable) -> torch.dtype | None:
    """float16 or bfloat16 where every floating-point parameter of the model behind
    ``forward_func`` has that dtype; None otherwise (float32 / float64, mixed, or no model)."""
    model = root_module(forward_func)
    if model is None:
        return None
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or (dtype := next(iter(dtypes))) not in _HALF_PRECISION:
        return None
    return dtype


PROBABILITIES_WARNING = (
    "captum_ext: the model's outputs look like probabilities (every row is non-negative and "
    "sums to 1), but they are read as logits: a softmax here (the cross-entropy of the "
    "contrastive methods, the probabilities of the metrics and trust scores) would be a second "
    "one, which flattens the maps and curves without an error. "
)


def looks_like_probabilities(output: Any) -> bool:
    """Whether ``output`` is (N, C >= 2) with every row on the probability simplex (entries in
    [0, 1] summing to 1): the output of a model that ends in a softmax."""
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[1] < 2:
        return False
    if not output.is_floating_point():
        return False
    tolerance = 1e-2 if output.dtype in _HALF_PRECISION else 1e-4
    with torch.no_grad():
        return bool(
            (output >= 0).all()
            and (output <= 1).all()
            and ((output.sum(dim=1, dtype=torch.float32) - 1).abs() <= tolerance).all()
        )


#: added where some probabilities are exactly 0: their logits are gone
UNDERFLOW_NOTE = (
    " Some of its probabilities are exactly 0 (a confident model's softmax underflows): no "
    "transform recovers their logits, so the explanations of those classes are lost. Explain "
    "the model without its final softmax (the logits before it) where you can."
)


def _warn_if_probabilities(output: Tensor, takes_output_transform: bool) -> None:
    """Warn where ``output`` is (N, C) with rows on the probability simplex: a model that ends
    in a softmax. ``log`` of probabilities are logits (``softmax(log p) = p``)."""
    if looks_like_probabilities(output):
        remedy = (
            "Pass output_transform=captum_ext.data.log_probabilities (log-probabilities are "
            "logits: softmax(log p) = p) or remove the final softmax."
            if takes_output_transform
            else "Wrap the model: forward_func=lambda x: "
            "captum_ext.data.log_probabilities(model(x)) (log-probabilities are logits: "
            "softmax(log p) = p), or remove the final softmax."
        )
        if bool((output == 0).any()):
            remedy += UNDERFLOW_NOTE
        warnings.warn(PROBABILITIES_WARNING + remedy, UserWarning, stacklevel=user_stacklevel())


def warn_if_nan(output: Tensor, inputs: tuple[Tensor, ...], examples: Tensor | None = None) -> bool:
    """Warn, naming the examples, where the model's output holds NaN for finite inputs (they
    are checked on entry): activations that overflowed inside the model (a float16 model on
    large inputs, say). Everything computed from such rows is NaN or meaningless (a VOICE
    map of NaN gradients reads as "no uncertainty"). ``examples``: the user's example of
    each row, where the rows are perturbed copies (a metric's chunks). True if it warned."""
    if not output.is_floating_point():
        return False
    broken = torch.isnan(output.detach().reshape(output.shape[0], -1)).any(dim=1)
    if not bool(broken.any()):
        return False
    if examples is None:
        rows = broken.nonzero()[:, 0].tolist()
        which = f"{len(rows)} of {output.shape[0]} examples"
    else:
        rows = sorted(set(examples.to(broken.device)[broken].tolist()))
        which = f"{len(rows)} examples"
    shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
    dtypes = sorted({str(x.dtype).replace("torch.", "") for x in inputs})
    warnings.warn(
        f"the model's output holds NaN for {which} "
        f"(rows {shown}) although the inputs are finite: activations overflowed inside "
        f"the model (inputs in {', '.join(dtypes)}; check their scale and normalisation, "
        "or run the model in float32 / float64). Results for these rows are not "
        "meaningful.",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
    return True


def run_forward(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    additional_forward_args: Any,
    output_transform: Callable[[Any], Tensor] | None = None,
    *,
    allow_multidim: bool = False,
    takes_output_transform: bool = True,
    check_nan: bool = True,
) -> Tensor:
    """Call the model and check that it returns (N, C) logits.

    With ``allow_multidim`` any output with the examples first is accepted: (N,) scalars,
    (N, C) logits, or (N, C, *positions) (a segmentation network's (N, C, H, W)), which
    Captum's tuple targets index. ``takes_output_transform``: whether the caller's public
    function has an ``output_transform`` argument, which the error then points to (else it
    says to wrap the model).
    """
    extra = format_additional_forward_args(additional_forward_args)
    inputs = in_model_precision(forward_func, inputs)
    output = call_model(uncompiled(forward_func), inputs, extra)
    if output_transform is not None:
        output = output_transform(output)
    n = inputs[0].shape[0]
    if allow_multidim and isinstance(output, Tensor) and output.dim() >= 1:
        if output.shape[0] == n:
            _warn_if_probabilities(output, takes_output_transform)
            if check_nan:
                warn_if_nan(output, inputs)
            return output
    elif isinstance(output, Tensor) and output.dim() == 2 and output.shape[0] == n:
        _warn_if_probabilities(output, takes_output_transform)
        if check_nan:
            warn_if_nan(output, inputs)
        return output
    got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
    has_logits = isinstance(getattr(output, "logits", None), Tensor) or (
        isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor)
    )
    if has_logits:  # a Hugging Face model's output (ImageClassifierOutput) or such a dict
        got += " with a `logits` tensor (a Hugging Face model?)"
        pick = "['logits']" if isinstance(output, Mapping) else ".logits"
        remedy = (
            f"pass output_transform=lambda out: out{pick}."
            if takes_output_transform
            else "this function has no `output_transform`: wrap the model, e.g. "
            f"forward_func=lambda *args: model(*args){pick} (which passes the "
            "`additional_forward_args` on)."
        )
    elif (
        isinstance(output, (tuple, list))
        and output
        and isinstance(output[0], Tensor)
        and output[0].dim() >= 1
        and output[0].shape[0] == n
    ):  # (logits, features), (logits, aux_logits): the first is usually the logits
        got += " of " + ", ".join(
            f"{tuple(item.shape)}" if isinstance(item, Tensor) else type(item).__name__
            for item in output
        )
        remedy = (
            "if its first element holds the logits, pass output_transform=lambda out: out[0]."
            if takes_output_transform
            else "this function has no `output_transform`: if its first element holds the "
            "logits, wrap the model, forward_func=lambda *args: model(*args)[0] (which passes "
            "the `additional_forward_args` on)."
        )
    elif isinstance(output, Mapping) and output:  # torchvision's segmentation: {"out": ...}
        keys = ", ".join(repr(k) for k in list(output)[:5]) + (", ..." if len(output) > 5 else "")
        got += f" with keys {keys}"
        pick = f"[{next(iter(output))!r}]"
        remedy = (
            f"pass output_transform=lambda out: out{pick} (reduced to (N, classes) scores)."
            if takes_output_transform
            else "this function has no `output_transform`: wrap the model so that it returns "
            "(N, classes) scores, e.g. forward_func=lambda *args: "
            f"model(*args){pick}.mean(dim=(2, 3)) for a segmentation output."
        )
    elif takes_output_transform:
        remedy = "pass `output_transform` to reduce the output to (N, classes) scores."
    else:
        remedy = (
            "this function has no `output_transform`: wrap the model so that it returns "
            "(N, classes) scores, e.g. forward_func=lambda *args: "
            "model(*args).mean(dim=(2, 3)) for a segmentation output."
        )
    if allow_multidim:
        raise ValueError(
            f"forward_func must return a tensor with the N={n} examples first, got {got}; " + remedy
        )
    raise ValueError(
        f"forward_func must return (N, classes) logits for N={n} examples, got {got}; " + remedy
    )


#: ``torch.autograd.grad`` arguments the engine sets itself (one batched vector-Jacobian
#: product per chunk of classes), so ``grad_kwargs`` cannot.
_ENGINE_GRAD_ARGUMENTS = ("outputs", "inputs", "grad_outputs", "is_grads_batched", "only_inputs")
_USER_GRAD_ARGUMENTS = ("retain_graph", "create_graph", "allow_unused", "materialize_grads")


def check_grad_kwargs(grad_kwargs: Any, *, method: str = "this method") -> dict[str, Any]:
    """Validate Captum's ``grad_kwargs`` (extra keywords for ``torch.autograd.grad``).

    Accepted: ``retain_graph`` (the graph is internal to the call, so it changes nothing but
    memory), ``allow_unused`` (False: a layer the output does not depend on raises torch's
    error instead of giving zero maps), ``materialize_grads`` and ``create_graph=False``.
    Refused: ``create_graph=True`` (the engine cuts the graph at the layer, so the maps could
    not be differentiated with respect to the inputs or the parameters before the layer; use
    ``captum.attr.LayerGradCam`` for differentiable maps) and the arguments the engine sets.
    """
    if grad_kwargs is None:
        return {}
    if not isinstance(grad_kwargs, dict):
        raise TypeError(
            f"`grad_kwargs` must be a dict of keyword arguments for torch.autograd.grad, got "
            f"{type(grad_kwargs).__name__}."
        )
    for key, value in grad_kwargs.items():
        if key in _ENGINE_GRAD_ARGUMENTS:
            raise ValueError(
                f"`grad_kwargs` cannot set {key!r} for {method}: the engine sets it (one "
                "batched vector-Jacobian product per chunk of classes)."
            )
        if key not in _USER_GRAD_ARGUMENTS:
            raise TypeError(
                f"`grad_kwargs` holds {key!r}, which is not an argument of torch.autograd.grad "
                f"that {method} can pass on (accepted: {', '.join(_USER_GRAD_ARGUMENTS)})."
            )
        if key == "create_graph" and value:
            raise ValueError(
                f"`grad_kwargs={{'create_graph': True}}` is not supported by {method}: its "
                "engine stops the backward pass at the layer, so the maps cannot be "
                "differentiated with respect to the inputs or the parameters before the layer. "
                "Use captum.attr.LayerGradCam for differentiable maps."
            )
    return dict(grad_kwargs)


def resolve_score(score: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if callable(score):
        return score
    if score not in TARGET_SCORE_FUNCTIONS:
        raise ValueError(
            f"`score`={score!r}: expected one of {sorted(TARGET_SCORE_FUNCTIONS)} or a callable."
        )
    return TARGET_SCORE_FUNCTIONS[score]


def auto_chunk(
    max_batch: int | None, n_classes: int, wrt: Sequence[Tensor], working_bytes: int = 0
) -> int:
    """Classes per vector-Jacobian product: ``max_batch``, else 64 bounded to ~1 GiB per
    chunk, a class costing its gradients (``wrt``) and ``working_bytes`` (the backward pass's
    working memory per class, :func:`backward_working_bytes`)."""
    if max_batch is not None:
        return min(check_int(max_batch, "max_batch"), n_classes)
    per_class = sum(t.numel() * t.element_size() for t in wrt) + working_bytes
    return max(1, min(DEFAULT_MAX_BATCH, n_classes, _CHUNK_BYTES // max(per_class, 1)))


def backward_working_bytes(counted: OutputBytes) -> int:
    """The working memory of one class's backward pass, estimated from the bytes of the
    module outputs it goes through (:func:`~captum_ext._utils.hooks.counted_output_bytes`):
    half of them. Measured on a torchvision resnet18 at 224 px (CPU, peak RSS over chunks
    of 4 to 64 classes): 10.5 MB per image and class from the input (28.5 MiB of module
    outputs per image), 3.1 MB from ``layer1`` (9.4 MiB after it)."""
    return counted.bytes // 2


def _one_hot(columns: Tensor, width: int, like: Tensor) -> Tensor:
    """(N, B) column indices -> (N, B, width) one-hot rows."""
    rows = like.new_zeros(*columns.shape, width)
    return rows.scatter_(2, columns.unsqueeze(-1), 1)


def softmax_complement(logits: Tensor, dim: int = 1) -> Tensor:
    r"""``1 - softmax(logits)`` along ``dim``, without the cancellation of ``1 - p``.

    On a confident prediction (a logit gap of 17 or more in float32) ``p_P`` rounds to 1, so
    ``p_P - 1`` is 0 where its true value is ``-sum_{j != P} p_j`` (about ``1e-8``): every
    gradient of ``-log p_P`` or ``p_P`` then loses its largest term. Only the top class can
    have ``p > 1/2``; its complement is summed from the other classes' exponentials, the
    others' ``1 - p_c >= 1/2`` is exact as it is.
    """
    top = logits.argmax(dim=dim, keepdim=True)
    e = torch.exp(logits - logits.gather(dim, top))
    total = e.sum(dim=dim, keepdim=True)
    rest_of_top = e.scatter(dim, top, 0.0).sum(dim=dim, keepdim=True) / total
    return (1 - e / total).scatter(dim, top, rest_of_top)


def log_softmax_precise(logits: Tensor, dim: int = 1) -> Tensor:
    r"""``log_softmax(logits)`` with the top class's entry exact on confident predictions.

    ``log_softmax`` forms ``z - logsumexp(z)``; for the top class that is ``-log(1 + S)``
    with ``S = sum_{j != P} exp(z_j - z_P)``, which rounds to exactly 0 once ``S`` is below
    the dtype's epsilon (a logit gap of about 17 in float32, 37 in float64) although ``-S``
    is representable far beyond. Here it is ``-log1p(S)``; the other entries are
    ``z_j - z_P - log1p(S)``, as exact as before.
    """
    top = logits.argmax(dim=dim, keepdim=True)
    shifted = logits - logits.gather(dim, top)
    rest = torch.exp(shifted).scatter(dim, top, 0.0).sum(dim=dim, keepdim=True)
    return shifted - torch.log1p(rest)


def _analytic_cotangents(score: str, logits: Tensor) -> Callable[[Tensor], Tensor]:
    """Cotangents on ``logits.flatten(1)`` equal to d score_c / d logits for the built-in scores.

    Handing them to the backward directly skips the log-softmax / gather backward, which has
    no batching rule and would otherwise run once per class row. For an output
    (N, C, *positions) the softmax runs over the class axis (dim 1) at each position, and a
    column ``c * P + j`` is the score of class ``c`` at (ravelled) position ``j``. The entry
    ``c`` itself uses :func:`softmax_complement` (``p_c - 1 = -(1 - p_c)``), which keeps the
    gradient of a confident class's own score (Q == P) exact.
    """
    width = logits[0].numel()
    if score == "logit":
        return lambda columns: _one_hot(columns, width, logits)
    detached = logits.detach()
    precise = detached if detached.dtype == torch.float64 else detached.float()
    p = torch.softmax(precise, dim=1).to(logits.dtype)  # half logits: softmax in float32
    rest = softmax_complement(precise, dim=1).to(logits.dtype).reshape(p.shape[0], width)
    n, num_classes = p.shape[:2]
    positions = width // max(num_classes, 1)
    if positions == 1:
        p = p.reshape(n, num_classes)

        def softmax_at(columns: Tensor) -> Tensor:
            return p.unsqueeze(1)

    else:
        p_grid = p.reshape(n, 1, num_classes, positions)

        def softmax_at(columns: Tensor) -> Tensor:
            """(N, B, C * P): the softmax vector at each column's position, zeros elsewhere."""
            at = _one_hot(columns % positions, positions, p_grid).unsqueeze(2)
            return (p_grid * at).flatten(2)

        p = p.reshape(n, width)

    def own_and_others(columns: Tensor) -> tuple[Tensor, Tensor]:
        """The one-hot rows of ``columns`` and the softmax at their positions without them."""
        own = _one_hot(columns, width, p)
        return own, softmax_at(columns) * (1 - own)

    if score == "cross_entropy":  # d(-log p_c)/dz = p - e_c; entry c: -(1 - p_c)

        def cross_entropy(columns: Tensor) -> Tensor:
            own, others = own_and_others(columns)
            return others - rest.gather(1, columns).unsqueeze(-1) * own

        return cross_entropy

    # probability: d p_c / dz = p_c (e_c - p); entry c: p_c (1 - p_c)
    def probability(columns: Tensor) -> Tensor:
        own, others = own_and_others(columns)
        p_c = p.gather(1, columns).unsqueeze(-1)
        return p_c * (rest.gather(1, columns).unsqueeze(-1) * own - others)

    return probability


def _anomaly_checks_nan() -> bool:
    """Whether autograd's anomaly mode checks every backward function's output for NaN
    (``torch.autograd.detect_anomaly()``, ``set_detect_anomaly(True)``). That check reads a
    value (``.item()``), which ``vmap`` cannot batch: a batched vector-Jacobian product
    (``is_grads_batched=True``) then fails with "Batching rule not implemented for
    aten::item"."""
    return torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled()


def _vjp_one_by_one(
    output: Tensor,
    wrt: tuple[Tensor, ...],
    vectors: Tensor,
    retain_graph: bool,
    options: dict[str, Any],
) -> tuple[Tensor | None, ...]:
    """The batched vector-Jacobian products of one chunk, (N, B, *t.shape[1:]) per tensor of
    ``wrt``, computed one cotangent column at a time with plain ``torch.autograd.grad``: the
    same numbers as ``is_grads_batched=True``, which anomaly mode's NaN check breaks
    (:func:`_anomaly_checks_nan`). A debugging mode, so speed is secondary."""
    width = vectors.shape[1]
    columns: list[tuple[Tensor | None, ...]] = []
    for j in range(width):
        columns.append(
            torch.autograd.grad(
                output,
                wrt,
                grad_outputs=vectors[:, j],
                retain_graph=retain_graph or j + 1 < width,
                **options,
            )
        )
    return tuple(
        None
        if all(column[i] is None for column in columns)
        else torch.stack(
            [torch.zeros_like(t) if column[i] is None else column[i] for column in columns],
            dim=1,
        )
        for i, t in enumerate(wrt)
    )


def _vjp_chunks(
    output: Tensor,
    wrt: tuple[Tensor, ...],
    selection: Tensor,
    chunk: int,
    cotangents: Callable[[Tensor], Tensor],
    grad_kwargs: dict[str, Any] | None = None,
):
    """Yield (start, gradients) with gradients (N, B, *t.shape[1:]) per tensor of ``wrt``.

    ``cotangents(columns)`` maps (N, B) selected columns to the (N, B, M) cotangents on
    ``output`` whose vector-Jacobian products are the wanted gradients.
    """
    n, n_classes = selection.shape
    options = dict(grad_kwargs or {})
    keep_graph = bool(options.pop("retain_graph", False))
    options.setdefault("allow_unused", True)
    for start in range(0, n_classes, chunk):
        stop = min(start + chunk, n_classes)
        last = stop == n_classes
        width = stop - start
        vectors = cotangents(selection[:, start:stop])
        if n_classes == 1:
            grads = torch.autograd.grad(
                output,
                wrt,
                grad_outputs=vectors[:, 0],
                retain_graph=keep_graph or not last,
                **options,
            )
            grads = tuple(None if g is None else g.unsqueeze(1) for g in grads)
        elif _anomaly_checks_nan():
            grads = _vjp_one_by_one(output, wrt, vectors, keep_graph or not last, options)
        else:
            grads = torch.autograd.grad(
                output,
                wrt,
                grad_outputs=vectors.movedim(1, 0),
                is_grads_batched=True,
                retain_graph=keep_graph or not last,
                **options,
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
    grad_kwargs: dict[str, Any] | None = None,
    allow_multidim: bool = False,
    reshape_transform: Callable[[Tensor], Tensor] | None = None,
) -> ClassGradients:
    """Gradients of ``score(logits)[n, c]`` for the requested classes, in one forward pass.

    Args:
        forward_func: the model, (inputs..., additional_forward_args...) -> (N, C) logits
            (or, with ``allow_multidim``, any output with the examples first).
        inputs: tuple of input tensors (batch first).
        classes: any Captum-style target (see ``class_selection``): None, int, list, tensor,
            ``"all"``, or 2-D (N, C'); for an output of more than two dimensions (with
            ``allow_multidim``) a tuple or a list of N tuples (see ``output_selection``); or,
            for methods composed on the engine, a callable mapping the detached logits to an
            (N, C') tensor of columns of ``score``.
        layer: differentiate with respect to this module's output (or its inputs when
            ``layer_input``); None differentiates with respect to ``inputs``.
        score: "logit", "cross_entropy" (cross-entropy with the class as label),
            "probability", or a callable mapping (N, C) logits to (N, M) per-example scalars
            (M = C for per-class scores).
        max_batch: classes per batched vector-Jacobian product (default 64, or fewer so that
            one chunk's gradients and working memory take at most about 1 GiB:
            :func:`auto_chunk`).
        reduce: ``reduce(gradients, activations)`` applied to each chunk, in column order,
            where gradients are (N, B, *A) per tensor; its tensor (or tuple of tensors)
            outputs are concatenated along dim 1 (a reducer that accumulates itself returns
            None). Use it to keep memory at the size of the final maps.
        grad_kwargs: Captum's extra keywords for ``torch.autograd.grad``, checked by
            :func:`check_grad_kwargs`.
        allow_multidim: accept outputs other than (N, C) logits with a built-in ``score``:
            (N,) scalars (one column) and (N, C, *positions), whose class axis is dim 1 (the
            softmax of "cross_entropy" and "probability" runs over it at each position) and
            whose elements Captum's tuple targets select.
        reshape_transform: the caller's transform of the layer's activations to an output
            with the examples first (the CAMs' ``reshape_transform``). The engine does not
            apply it to what it returns; it only reads it for the check below.

    The layer's activations must have the N examples first (row ``i`` is example ``i``, or
    a multiple of N rows where the model folds frames or crops into the batch), or, with
    ``reshape_transform``, its output must: a tokens-first ``(tokens, N, D)`` layer
    (``batch_first=False``) is refused with a ValueError naming ``layer``
    (:func:`~captum_ext._utils.validation.check_examples_first`), unless the transform
    moves the examples first. Of several tensors (a layer's inputs), one with a single row
    is broadcast over the batch and passes. Whatever the layout, the gradients come back
    with the class axis at dimension 1: (A_0, B, *A[1:]) for activations A.

    Returns:
        ClassGradients.
    """
    score_fn = resolve_score(score)
    grad_kwargs = check_grad_kwargs(grad_kwargs)
    multidim = allow_multidim and isinstance(score, str) and not callable(classes)
    model = root_module(forward_func)
    # a plain-function forward_func hides its model: restore the buffers of whatever ran
    with (
        preserved_state([model, layer]),
        restored_buffers_of_modules_run(exclude=[model, layer]),
        gradients_on(),
    ):
        if layer is None:
            replaced, leaves = _as_leaves(inputs)
            if not leaves:
                raise TypeError("`inputs` holds no floating-point tensor to differentiate.")
            with counted_output_bytes() as counted:
                logits = run_forward(
                    forward_func,
                    replaced,
                    additional_forward_args,
                    output_transform,
                    allow_multidim=multidim,
                )
            wrt = leaves
        else:
            with (
                capture_layer(layer, layer_input=layer_input) as capture,
                counted_output_bytes(layer) as counted,
            ):
                logits = run_forward(
                    forward_func,
                    inputs,
                    additional_forward_args,
                    output_transform,
                    allow_multidim=multidim,
                )
            wrt = capture.single_call(type(layer).__name__)
            _check_layer_examples_first(
                wrt, inputs[0].shape[0], forward_func, layer, layer_input, reshape_transform
            )
        if logits.dim() == 1:  # one scalar per example: a single column
            logits = logits.unsqueeze(1)
        if callable(classes):
            # internal composition: the caller picks columns of `score` from the logits
            selection, multi = classes(logits.detach()), True
        else:
            selection, multi = output_selection(
                classes, logits, argument=class_argument, default=default_classes
            )
        if isinstance(score, str):
            output, cotangents = logits.flatten(1), _analytic_cotangents(score, logits)
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
        # per class: its gradients and its row of cotangents
        chunk = auto_chunk(
            max_batch, selection.shape[1], (*wrt, output), backward_working_bytes(counted)
        )
        activations = tuple(t.detach() for t in wrt)
        pieces = []
        for _, grads in _vjp_chunks(output, wrt, selection, chunk, cotangents, grad_kwargs):
            pieces.append(grads if reduce is None else reduce(grads, activations))
    result = _concat_pieces(pieces)
    return ClassGradients(result, activations, logits.detach(), selection, multi)


def _layer_label(forward_func: Callable, layer: nn.Module) -> str:
    """``'dotted.name' (Class)`` of ``layer`` in the model behind ``forward_func``."""
    model = root_module(forward_func)
    name = None
    if model is not None:
        name = next((n for n, m in model.named_modules() if m is layer and n), None)
    kind = type(layer).__name__
    return f"{name!r} ({kind})" if name else kind


def _check_layer_examples_first(
    activations: tuple[Tensor, ...],
    n: int,
    forward_func: Callable,
    layer: nn.Module,
    layer_input: bool,
    reshape_transform: Callable[[Tensor], Tensor] | None,
) -> None:
    """The one place where a layer's captured activations are checked to have the ``n``
    examples first (after ``reshape_transform``, where the caller gives one), by the rule of
    :func:`~captum_ext._utils.validation.check_examples_first`: ``n`` rows, or a multiple of
    ``n`` rows that does not look tokens-first (a model folding frames or crops into the
    batch gets one map per row, as before).

    Of several tensors (a block's inputs ``(x, pos)`` with ``attribute_to_layer_input``), one
    with a single row while ``n > 1`` is broadcast over the batch (a positional map shared by
    the examples; Captum's LayerGradCam gives it a one-row map) and is not checked, unless
    every tensor is so."""
    where = "input" if layer_input else "output"
    checked = [
        (i, activation)
        for i, activation in enumerate(activations)
        if not (n > 1 and len(activations) > 1 and activation.dim() and activation.shape[0] == 1)
    ] or list(enumerate(activations))
    for i, activation in checked:
        which = f" {where} {i}" if len(activations) > 1 else f" {where}"
        if reshape_transform is None:
            if rows_read_as_examples(tuple(activation.shape), n):
                continue
            label = _layer_label(forward_func, layer)
            check_examples_first(
                tuple(activation.shape), n, what=f"`layer` {label}{which}", where=where
            )
            continue
        with torch.no_grad():
            folded = reshape_transform(activation.detach())
        if not isinstance(folded, Tensor):
            raise TypeError("`reshape_transform` must return a tensor.")
        if rows_read_as_examples(tuple(folded.shape), n):
            continue
        raise ValueError(
            f"`reshape_transform` returned a tensor of shape {tuple(folded.shape)} for the "
            f"{tuple(activation.shape)}{which} of `layer` {_layer_label(forward_func, layer)}: "
            f"it must return the N={n} examples first (N x K x h x w), as every method reads "
            "row i of the activations as example i."
        )


def _concat_pieces(pieces: list) -> Any:
    if all(piece is None for piece in pieces):  # the reducer accumulated on its own
        return None
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], Tensor):
        return torch.cat(pieces, dim=1)
    return tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))


# ---------------------------------------------------------------------------------------------
# other gradients: of one scalar objective, w.r.t. the inputs, and per-example parameter
# gradients. Every backward pass of the package outside the class-gradient engine goes
# through these functions.


def objective_gradients(
    objective: Tensor, wrt: Sequence[Tensor], *, allow_unused: bool = False
) -> tuple[Tensor | None, ...]:
    """Gradients of the scalar ``objective`` with respect to the tensors ``wrt``.

    The one place (with :func:`class_gradients`) where the package calls
    ``torch.autograd.grad``. With ``allow_unused`` a tensor the objective does not depend on
    gets ``None``.
    """
    with gradients_on():
        return tuple(torch.autograd.grad(objective, list(wrt), allow_unused=allow_unused))


def input_gradients(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    objective: Callable[[Tensor], Tensor],
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
    *,
    check_logits: Callable[[Tensor], None] | None = None,
    needed_by: str = "the input gradient of the model's output",
    instead: str = "",
) -> tuple[Tensor | None, ...]:
    """Gradients of ``objective(logits)`` (a scalar) with respect to every floating-point
    tensor of ``inputs``, model state restored: ``None`` for the other tensors, and a zero
    gradient for a floating-point input the output does not depend on through autograd (a
    float mask compared with a threshold). ``check_logits`` runs on the logits before the
    gradients are taken.

    Raises:
        TypeError: ``inputs`` holds no floating-point tensor.
        ValueError: the output depends on none of them through autograd (``torch.no_grad()``
            or ``.detach()`` inside ``forward``), where torch says only that "the
            differentiated Tensor ... appears to not have been used in the graph";
            ``needed_by`` says what needed the gradient and ``instead`` what to use instead.
    """
    model = root_module(forward_func)
    with preserved_state([model], hidden_model=model is None), gradients_on():
        leaves = tuple(
            x.detach().requires_grad_(True) if x.is_floating_point() else x for x in inputs
        )
        wrt = [x for x in leaves if x.requires_grad]
        if not wrt:
            raise TypeError("`inputs` holds no floating-point tensor to differentiate.")
        logits = run_forward(forward_func, leaves, additional_forward_args, output_transform)
        if check_logits is not None:
            check_logits(logits)
        score = objective(logits)
        found = (
            objective_gradients(score, wrt, allow_unused=True)
            if score.requires_grad
            else (None,) * len(wrt)
        )
    if all(g is None for g in found):
        raise ValueError(
            f"{needed_by}, but no floating-point input of `forward_func` reaches its output "
            "through autograd: its forward cuts the graph (torch.no_grad() or .detach() "
            "inside forward, e.g. a linear probe on a frozen backbone), or uses the input only "
            "through a comparison (a float mask tested against a threshold). Lift the "
            "no_grad / detach while scoring (a frozen backbone can keep requires_grad=False "
            f"on its parameters){instead}."
        )
    grads = iter(torch.zeros_like(x) if g is None else g for x, g in zip(wrt, found))
    return tuple(next(grads) if x.requires_grad else None for x in leaves)


class _Holder(nn.Module):
    """Holds modules as children so that ``functional_call`` can swap their parameters while
    the user's ``forward_func`` (which calls those modules) runs."""

    def __init__(self, forward_func: Callable, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.__dict__["_call"] = forward_func  # not registered: forward_func may be a Module
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, *args):
        return self.__dict__["_call"](*args)


#: bytes of per-example gradients held at once by :func:`per_example_parameter_gradients`
PER_EXAMPLE_CHUNK_BYTES = 256 * 2**20
_UNBATCHED_OPERATOR_NOTE = "There is a performance drop because we have not yet implemented"


#: torch's error when a batch norm in train mode sees one value per channel (a batch of one)
_BATCH_OF_ONE_NORM = "Expected more than 1 value per channel when training"


def _batch_of_one_error(error: Exception) -> ValueError | None:
    """The clear error for a train-mode batch norm that cannot normalise one example alone
    (one value per channel: ``BatchNorm1d`` on (1, C), or a ``BatchNorm2d`` on a 1 x 1 map
    such as Inception's auxiliary head), or None for any other error."""
    text = str(error)
    if _BATCH_OF_ONE_NORM not in text:
        return None
    size = re.search(r"got input size (torch\.Size\(\[[^\]]*\]\)|\S+)", text)
    given = f": it was given {size.group(1)}" if size else ""
    return ValueError(
        "per-example gradients run each example alone (a batch of one), and the model is in "
        "train mode with a batch norm that cannot normalise a single example whose channels "
        f"hold one value each (no spatial extent{given}). Call model.eval() first: scores and "
        "explanations are meant for the model as it predicts."
    )


def _training_batch_norms(model: nn.Module | None) -> bool:
    """Whether a batch norm of ``model`` normalises with the statistics of the batch it is
    given: in train mode, or, in eval mode too, one built with
    ``track_running_stats=False`` (it has no running statistics to use)."""
    return model is not None and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training or (m.running_mean is None and m.running_var is None))
        for m in model.modules()
    )


def _device_types(forward_func: Callable, inputs: tuple[Tensor, ...]) -> set[str]:
    """The device types of ``inputs`` and of the parameters of the model behind
    ``forward_func``: those where the caller's ``torch.autocast`` acts on the model."""
    model = root_module(forward_func)
    tensors = [x for x in inputs if isinstance(x, Tensor)]
    if model is not None:
        tensors += list(model.parameters())
    return {t.device.type for t in tensors}


def _autocast_on(device_types: set[str]) -> list[str]:
    """Those of ``device_types`` where the caller's ``torch.autocast`` is enabled."""
    enabled = []
    for device_type in sorted(device_types):
        try:
            if torch.is_autocast_enabled(device_type):
                enabled.append(device_type)
        except RuntimeError:  # a device type autocast does not know ("meta")
            continue
    return enabled


@contextlib.contextmanager
def _without_autocast(device_types: list[str]) -> Iterator[None]:
    """``torch.autocast(device_type, enabled=False)`` for each of ``device_types``."""
    with contextlib.ExitStack() as stack:
        for device_type in device_types:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def logits_seen_per_example(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    extra: tuple,
    logits: Tensor,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    """The logits that :func:`per_example_parameter_gradients` differentiates: ``logits``
    (the batch's), unless a batch norm of the model is in train mode. There each example
    runs alone (normalised by its own statistics), so its logits differ from the batch's,
    and cotangents built from the batch's logits would mix two forward passes (GradTrust at
    an inner layer of a train-mode ResNet: scores off by up to 0.4). Then each example is run
    alone here too, without gradients, on a copy of the buffers (left as they were).

    Inside the caller's ``torch.autocast``, :func:`per_example_parameter_gradients` runs
    without it (in the model's own dtype), so the logits are computed again here without it
    too, in the dtype of the model's output, and the cotangents built from them match the
    forward pass they are applied to (not the batch's float16 / bfloat16 logits)."""
    model = root_module(forward_func)
    autocast = _autocast_on(_device_types(forward_func, inputs))
    if autocast:
        with _without_autocast(autocast):
            if not _training_batch_norms(model):
                inputs = in_model_precision(forward_func, inputs)
                with torch.no_grad():
                    out = uncompiled(forward_func)(*inputs, *extra)
                return output_transform(out) if output_transform is not None else out
            return _logits_one_by_one(forward_func, inputs, extra, output_transform)
    if not _training_batch_norms(model):
        return logits
    return _logits_one_by_one(forward_func, inputs, extra, output_transform).to(logits.dtype)


def _logits_one_by_one(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    extra: tuple,
    output_transform: Callable[[Any], Tensor] | None,
) -> Tensor:
    """Each example run alone (without gradients, on a copy of the buffers, which are left as
    they were): the logits of a model normalised by the statistics of a batch of one."""
    model = root_module(forward_func)
    n = inputs[0].shape[0]
    saved = {name: b.clone() for name, b in model.named_buffers()}
    layout = PerExampleLayout(extra, n)  # walked once, not once per example
    rows = []
    try:
        with torch.no_grad():
            for i in range(n):
                args = [x[i : i + 1] if isinstance(x, Tensor) else x for x in inputs]
                more = layout.select(slice(i, i + 1))
                try:
                    out = uncompiled(forward_func)(*args, *more)
                except ValueError as error:
                    clear = _batch_of_one_error(error)
                    if clear is None:
                        raise
                    raise clear from None
                rows.append(output_transform(out) if output_transform is not None else out)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])
    return torch.cat(rows)


def _with_autocast_off(function: Callable) -> Callable:
    """``function(forward_func, inputs, ...)`` run with the caller's ``torch.autocast``
    disabled on the devices of ``inputs`` and of the model."""

    @functools.wraps(function)
    def without_autocast(forward_func: Callable, inputs: tuple[Tensor, ...], *args, **kwargs):
        with _without_autocast(_autocast_on(_device_types(forward_func, inputs))):
            return function(forward_func, inputs, *args, **kwargs)

    return without_autocast


def _with_inference_mode_off(function: Callable) -> Callable:
    """``function(forward_func, inputs, extra, modules, names, cotangents, ...)`` with normal
    copies of the tensors of ``inputs``, ``extra`` and ``cotangents`` made in
    ``torch.inference_mode()``, run outside the caller's inference mode.

    The cotangents are built from logits computed in the caller's mode: inside a serving
    block, inference tensors. The backward pass of ``vjp`` under ``vmap`` saves them where
    gradients are enabled (``torch.enable_grad()`` inside the inference-mode block), and
    activation checkpointing saves the inputs of its forward pass in any mode; torch refuses
    inference tensors in both ("Inference tensors cannot be saved for backward"). Outside
    inference mode the tensors made along the way (casts, copies of the buffers) are normal
    too. A model whose parameters are inference tensors (loaded inside inference mode) can
    only be run in it: there the caller's mode is kept."""

    @functools.wraps(function)
    def without_inference_mode(
        forward_func: Callable,
        inputs: tuple[Tensor, ...],
        extra: tuple,
        modules: dict[str, nn.Module],
        names: dict[str, Tensor],
        cotangents: Tensor,
        *args,
        **kwargs,
    ):
        model = root_module(forward_func)
        weights = [*names.values(), *(model.parameters() if model is not None else ())]
        keep = torch.is_inference_mode_enabled() and any(w.is_inference() for w in weights)
        with torch.inference_mode(keep):
            return function(
                forward_func,
                outside_inference_mode_nested(inputs),
                outside_inference_mode_nested(extra),
                modules,
                names,
                outside_inference_mode(cotangents),
                *args,
                **kwargs,
            )

    return without_inference_mode


@_with_autocast_off
@_with_inference_mode_off
def per_example_parameter_gradients(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    extra: tuple,
    modules: dict[str, nn.Module],
    names: dict[str, Tensor],
    cotangents: Tensor,
    reduce: Callable[[dict[str, Tensor]], Tensor],
    output_transform: Callable[[Any], Tensor] | None = None,
    *,
    chunk_bytes: int | None = None,
) -> Tensor:
    """``reduce`` of per-example vector-Jacobian products of the logits w.r.t. parameters,
    chunked over examples.

    For example n and row j of ``cotangents`` (N, K, C), the gradient of
    ``<cotangents[n, j], logits(x_n)>`` with respect to the named parameters ``names`` (keys
    ``"child.param"`` of ``_Holder(forward_func, modules)``), computed with torch.func
    (``functional_call`` + ``vjp`` under ``vmap``): shape (n, K, *parameter.shape) per name.
    ``reduce`` maps those to (n,) scores. Extra forward args whose first dimension equals N are
    split per example; the others are passed to every example unchanged.

    The buffers of the model (batch norm running statistics) are given to every example as
    its own copy: a model in train mode updates those copies, never the user's buffers (and
    each example is normalised with its own statistics, as a batch of one). The caller keeps
    the model's state with ``preserved_state``; no parameter is modified.

    Inside the caller's ``torch.autocast`` the computation runs with autocast disabled for
    the devices of the inputs and the model: torch.func cannot batch a batch norm under
    autocast ("expected scalar type BFloat16 but found Float"), so the gradients are those
    of the model in its own dtype, as outside autocast. Build ``cotangents`` from
    :func:`logits_seen_per_example`, which computes the logits the same way; cotangents of
    another dtype are cast to the logits'.

    Inside the caller's ``torch.inference_mode()`` (with or without ``torch.enable_grad()``)
    the computation runs outside it, on normal copies of the inference tensors of
    ``inputs``, ``extra`` and ``cotangents`` (:func:`_with_inference_mode_off`); a model
    whose parameters are inference tensors is run in the caller's mode.

    A tensor of ``names`` that is not a registered parameter or buffer of its module is a
    weight the layer computes for each forward pass: ``torch.nn.utils.prune`` (``weight =
    weight_orig * weight_mask``), the legacy ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` (forward pre-hooks) or ``torch.nn.utils.parametrize``
    (``parametrizations.weight_norm``, ...). Its gradient is taken with respect to the
    tensor the forward pass actually uses (the effective weight: the scores of the same
    model with the weight folded, ``prune.remove`` / ``remove_weight_norm`` /
    ``remove_parametrizations``), with plain autograd one example at a time: a forward
    pre-hook of ours, run after the layer's own, gives the layer a leaf copy of the weight
    it computed (a parametrisation's weight is computed once per forward pass, under
    ``parametrize.cached()``, and that tensor is differentiated); a layer called several
    times gets the sum over its calls.

    The model's own hooks run inside ``vmap`` and ``vjp``, where the tensors they see are
    torch.func wrappers that cannot be used after the call ("your tensor may have escaped
    from inside a function being vmapped"). Where a module of the model, or torch's global
    module hooks, carries a forward, forward-pre, backward or backward-pre hook that is not
    the package's own (nor a layer's pruning or legacy normalisation hook), the gradients
    are computed with plain autograd one example at a time instead (the same numbers,
    slower), so the user's hooks see plain tensors (of one example each). A model hidden
    behind a plain function (``lambda x: model(x)``) cannot be searched in advance: there a
    global forward pre-hook looks at each module before it runs under ``vmap``, and the
    first one carrying a hook of the user's abandons that chunk before its hooks run (the
    loop from there on). Hooks on the parameters themselves (``weight.register_hook``) are
    run by neither path: the loop differentiates leaf copies swapped in for them, as
    ``functional_call`` does under ``vmap``. A hook that the
    model's ``forward`` registers on a tensor (``activation.register_hook(...)``) cannot be
    seen on the modules: where a forward pass under ``vjp`` registers one
    (``Tensor.register_hook`` / ``register_post_accumulate_grad_hook``, noted by a
    ``TorchFunctionMode``), that chunk is abandoned before its backward pass (the hook is
    never called with wrappers) and the gradients are computed with plain autograd from
    there on. (Hooks registered on a tensor's ``grad_fn`` are not noted.) Tensors the
    model's modules hold as plain attributes (a pruned layer's ``weight``, activations a
    forward pass cached) are put back as they were on exit.
    """
    inputs = in_model_precision(forward_func, inputs)
    model = root_module(forward_func)
    paths = {id(m): p for p, m in model.named_modules()} if model is not None else {}
    if all(id(module) in paths for module in modules.values()):
        # the modules belong to the model: reach every parameter and buffer through it once
        # (a module reached by two paths would be swapped twice and not restored)
        prefix = {key: ("_root." + paths[id(m)]).rstrip(".") for key, m in modules.items()}
        renamed, original = {}, {}
        for name, tensor in names.items():
            key, _, rest = name.partition(".")
            renamed[f"{prefix[key]}.{rest}"] = tensor
            original[f"{prefix[key]}.{rest}"] = name
        names, modules = renamed, {"_root": model}
    else:
        original = {name: name for name in names}
    holder = _Holder(forward_func, modules)
    computed = _computed_tensors(holder, names)
    params = {name: tensor.detach() for name, tensor in names.items() if name not in computed}
    buffers = {name: b.detach() for name, b in holder.named_buffers()}
    n, k = cotangents.shape[:2]
    gradient_bytes = k * sum(t.numel() * t.element_size() for t in names.values())
    budget = PER_EXAMPLE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    reached = [*holder.modules(), *(model.modules() if model is not None else ())]
    by_loop = bool(computed) or _hooks_not_ours(reached)
    # the per-example tensors of ``extra``, also those nested in tuples, lists, mappings and
    # dataclasses: vmapped with the inputs, each put back in its place for one example (the
    # extra arguments are walked once for the whole call); vmap takes no sparse or nested
    # tensor, so those are passed one example at a time
    layout = PerExampleLayout(extra, n)
    batched = layout.tensors()
    by_loop = by_loop or any(t.is_nested or t.layout != torch.strided for t in batched)
    # The first chunk is one example, whose module outputs measure the others' cost: the
    # forward pass's (all of them, held while it runs) and, for each of the k cotangents,
    # the backward pass's (those from the first module holding a parameter asked for), and
    # the gradients twice (the chunk's and their reduction). On a torchvision resnet18 at
    # 224 px with 10 classes, about 200 MB per example were measured (peak RSS) at
    # ``layer1.0.conv1`` (28.5 MiB of module outputs, 18.5 after it, 1.5 MB of gradients)
    # and at ``layer4.1.conv2`` (94 MB of gradients): chunks of one example there.
    chunk = 1 if n > 1 else n
    if by_loop:  # the loop holds one example's graph at a time: chunks by gradients alone
        chunk = max(1, min(n, budget // max(gradient_bytes, 1)))
    starts = [m for m in holder.modules() if any(True for _ in m.parameters(recurse=False))]

    def one(xs: tuple, extras_b: tuple, cot: Tensor, bufs: dict[str, Tensor]):
        args = [x.unsqueeze(0) if isinstance(x, Tensor) else x for x in xs]
        more = layout.with_tensors([a.unsqueeze(0) for a in extras_b])

        probe = _TensorHookProbe()

        def logits_of(p):
            # fresh copies made inside the transform: train-mode updates touch only these
            own = {name: b.clone() for name, b in bufs.items()}
            with probe:
                out = functional_call(holder, {**own, **p}, tuple(args) + tuple(more))
            return output_transform(out) if output_transform is not None else out

        out, pullback = vjp(logits_of, params)
        if probe.registered:  # before the backward pass would call the hook with wrappers
            raise _TensorHookInForward
        grads = vmap(pullback)(cot.unsqueeze(1).to(out.dtype))[0]
        return {original[name]: g for name, g in grads.items()}

    x_dims = tuple(0 if isinstance(x, Tensor) else None for x in inputs)
    scores = []
    wanted = {id(t) for t in names.values()}
    starts = [  # ScriptModules take no hooks; their outputs go uncounted (an estimate low)
        m
        for m in starts
        if any(id(p) in wanted for p in m.parameters(recurse=False))
        and not isinstance(m, torch.jit.ScriptModule)
    ]
    with _tensors_put_back(holder) as put_back:
        start = 0
        while start < n:
            stop = min(n, start + chunk)
            xs = tuple(x[start:stop] if isinstance(x, Tensor) else x for x in inputs)
            extras_b = tuple(take_rows(a, slice(start, stop)) for a in batched)
            bufs = {name: b.expand(stop - start, *b.shape) for name, b in buffers.items()}
            if by_loop:
                grads = _per_example_by_loop(
                    forward_func, xs, layout, start, names, original,
                    cotangents[start:stop], output_transform, computed, holder,
                )  # fmt: skip
                scores.append(reduce(grads).detach())
                start = stop
                continue
            try:
                with warnings.catch_warnings():
                    # torch's note that an operator (attention's fused kernels, say) runs unbatched
                    # under vmap: about speed only, and nothing the caller can act on
                    warnings.filterwarnings("ignore", message=_UNBATCHED_OPERATOR_NOTE)
                    first = start == 0
                    counting = counted_output_bytes(starts) if first else nullcontext()
                    refusal = _HookRefusal()
                    try:
                        with _users_hooks_refused(refusal), counting as counted:
                            grads = vmap(one, in_dims=(x_dims, 0, 0, 0), randomness="different")(
                                xs, extras_b, cotangents[start:stop], bufs
                            )
                    except Exception:
                        if not refusal.seen:
                            raise
                    # a forward that catches the refusal (``except Exception``) or wraps it in
                    # another error: the chunk is redone by the loop all the same
                    if refusal.seen:
                        raise _UsersHookInForward
                    if first:
                        working = counted.total + k * counted.bytes
                        chunk = max(1, min(n, budget // max(2 * gradient_bytes + working, 1)))
            except (_TensorHookInForward, _UsersHookInForward):
                # the model's forward registers a hook on a tensor, or runs a module carrying
                # a hook of the user's (a model hidden behind a plain function): plain
                # autograd instead (this chunk again), so that the hooks see plain tensors
                put_back()  # (a module reached twice keeps functional_call's tensors)
                by_loop = True
                chunk = max(1, min(n, budget // max(gradient_bytes, 1)))
                continue
            except ValueError as error:
                clear = _batch_of_one_error(error)
                if clear is None:
                    raise
                raise clear from None
            except RuntimeError as error:
                if "would mutate a captured Tensor" in str(error) and any(
                    parametrize.is_parametrized(m) for m in holder.modules()
                ):
                    raise ValueError(
                        "per-example gradients: torch.func cannot differentiate through a "
                        "parametrized layer (torch.nn.utils.parametrize: weight_norm, "
                        "spectral_norm, ...) whose parameters are asked for. Pick another layer, "
                        "or fold the parametrization into a plain weight first "
                        "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'))."
                    ) from error
                if not any(sign in str(error) for sign in _TRANSFORM_REFUSALS):
                    raise
                if start == 0:
                    warnings.warn(
                        _unbatched_warning(
                            error, _any_training(holder), _callers_saved_tensor_hooks(error)
                        ),
                        RuntimeWarning,
                        stacklevel=user_stacklevel(),
                    )
                    # the loop holds one example's graph at a time: chunks by gradients alone
                    chunk = max(1, min(n, budget // max(gradient_bytes, 1)))
                put_back()  # (a module reached twice keeps functional_call's tensors)
                grads = _per_example_by_loop(
                    forward_func, xs, layout, start, names, original,
                    cotangents[start:stop], output_transform, holder=holder,
                )  # fmt: skip
            scores.append(reduce(grads).detach())
            start = stop
    return torch.cat(scores)


def _computed_tensors(holder: nn.Module, names: dict[str, Tensor]) -> dict[str, tuple]:
    """``{name: (module, attribute)}`` for the tensors of ``names`` (paths in ``holder``)
    that are not a registered parameter or buffer of their module: weights the layer
    computes for each forward pass (``torch.nn.utils.prune``, the legacy ``weight_norm`` /
    ``spectral_norm``, ``torch.nn.utils.parametrize``). ``functional_call`` cannot swap them
    (the layer overwrites what it is given), so their gradients are taken by
    :func:`_per_example_by_loop` with respect to the tensor the forward pass uses. Raises a
    ValueError for a computed weight that is neither a plain attribute nor a
    parametrisation (a property of the module's class, computed at each access: no single
    tensor to differentiate)."""
    computed = {}
    for name, tensor in names.items():
        path, _, attribute = name.rpartition(".")
        module = holder.get_submodule(path)
        if isinstance(module, torch.jit.ScriptModule):  # (its tables are not dicts)
            continue
        if any(table.get(attribute) is tensor for table in (module._parameters, module._buffers)):
            continue
        if attribute not in vars(module) and not parametrize.is_parametrized(module, attribute):
            raise ValueError(
                f"`layer` ({type(module).__name__}): its `{attribute}` is neither a parameter, "
                "a buffer, a plain attribute set by a forward pre-hook (torch.nn.utils.prune, "
                "weight_norm) nor a parametrisation (torch.nn.utils.parametrize), so the "
                "tensor its forward pass uses cannot be differentiated. Register it as a "
                "parameter, or pick another layer."
            )
        computed[name] = (module, attribute)
    return computed


#: where the hooks that compute a layer's own weights come from (not the user's hooks)
_WEIGHT_HOOK_MODULES = ("torch.nn.utils.prune", "torch.nn.utils.weight_norm")


def _is_our_hook(hook: Any) -> bool:
    """Whether ``hook`` is the package's own (a function defined in ``captum_ext``, such as
    the hooks counting output bytes or restoring a hidden model's buffers) or one by which
    a layer computes its weight (pruning, any ``prune.BasePruningMethod`` included one the
    user defined, the legacy ``weight_norm`` / ``spectral_norm``): neither keeps the tensors
    it sees (a pruning method's hook only recomputes the weight)."""
    if is_legacy_norm_hook(hook) or isinstance(hook, prune.BasePruningMethod):
        return True
    function = hook
    while isinstance(function, functools.partial):
        function = function.func
    function = getattr(function, "__func__", function)  # a bound method: its function
    where = getattr(function, "__module__", None) or type(function).__module__
    return isinstance(where, str) and (
        where == "captum_ext" or where.startswith("captum_ext.") or where in _WEIGHT_HOOK_MODULES
    )


def _hooks_not_ours(modules: Iterable[nn.Module]) -> bool:
    """Whether one of ``modules`` or torch's global module hooks carries a forward,
    forward-pre, backward or backward-pre hook that is not :func:`_is_our_hook`: a user's
    hook, which under ``vmap`` / ``vjp`` would see (and might keep) torch.func's wrapper
    tensors."""
    module_hooks = torch.nn.modules.module
    tables = [
        module_hooks._global_forward_hooks,
        module_hooks._global_forward_pre_hooks,
        module_hooks._global_backward_hooks,
        module_hooks._global_backward_pre_hooks,
    ]
    for module in modules:
        tables += _hook_tables(module)
    return any(not _is_our_hook(hook) for table in tables for hook in list(table.values()))


def _hook_tables(module: nn.Module) -> list[dict]:
    """``module``'s forward, forward-pre, backward and backward-pre hooks (dicts)."""
    return [
        getattr(module, kind, None) or {}
        for kind in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        )
    ]


class _UsersHookInForward(Exception):
    """A module that carries a hook of the user's was about to run inside ``vmap`` (raised
    before that module's own hooks, which would see torch.func's wrapper tensors)."""


@dataclass
class _HookRefusal:
    """Whether :func:`_users_hooks_refused` refused a module (``seen``), also where the
    model's own forward caught or re-wrapped the exception."""

    seen: bool = False


@contextlib.contextmanager
def _users_hooks_refused(refusal: _HookRefusal | None = None) -> Iterator[None]:
    """Raise :class:`_UsersHookInForward` where a module that carries a hook of the user's
    (:func:`_hooks_not_ours`) is about to run in the block, in the calling thread, and mark
    ``refusal.seen`` (the caller redoes the work by plain autograd even if the model's forward
    swallowed the exception). A forward hook registered with ``always_call=True`` still runs
    when its module's call is refused (torch calls it with the wrapped inputs and no output).

    The modules a ``forward_func`` runs cannot all be known in advance (a plain function
    hides its model): a global forward pre-hook, removed on exit, looks at each module
    before it runs; torch's global pre-hooks run before the module's own hooks, so the
    user's hooks have not seen a tensor yet. Torch's warning that a compiled module runs
    while global hooks exist (this one) is silenced in the block."""
    thread = threading.get_ident()
    checked: set[int] = set()

    def refuse_users_hooks(module: nn.Module, args: Any) -> None:
        if id(module) in checked or threading.get_ident() != thread:
            return
        if _hooks_not_ours_on(module):
            if refusal is not None:
                refusal.seen = True
            raise _UsersHookInForward
        checked.add(id(module))

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Using `torch\.compile\(module\)` when there are global hooks"
        )
        handle = torch.nn.modules.module.register_module_forward_pre_hook(refuse_users_hooks)
        try:
            yield
        finally:
            handle.remove()


def _hooks_not_ours_on(module: nn.Module) -> bool:
    """Whether ``module`` itself carries a hook that is not :func:`_is_our_hook`."""
    return any(
        not _is_our_hook(hook) for table in _hook_tables(module) for hook in list(table.values())
    )


@contextlib.contextmanager
def _tensors_put_back(root: nn.Module) -> Iterator[Callable[[], None]]:
    """Put every parameter and buffer object of ``root``'s modules back where it was, and
    the tensors they hold as plain attributes.

    ``functional_call`` swaps tensors in by attribute path; a module reached by two paths
    (``self.head = self.backbone.fc``) is swapped twice and restored from the second swap,
    which left torch.func's wrapper tensors in the user's model (no longer nn.Parameters,
    and a later ``copy.deepcopy`` failed). A pruned or legacy normalised layer recomputes
    its ``weight`` attribute in a forward pre-hook, under ``vmap`` from the swapped
    tensors: a wrapper tensor was left there too."""
    saved = [
        (module, kind, name, tensor)
        for module in root.modules()
        if not isinstance(module, torch.jit.ScriptModule)  # (their tables are not dicts)
        for kind in ("_parameters", "_buffers")
        for name, tensor in getattr(module, kind).items()
    ]
    attributes = [
        (vars(module), name, value)
        for module in root.modules()
        if not isinstance(module, torch.jit.ScriptModule)
        for name, value in list(vars(module).items())
        if isinstance(value, Tensor)
    ]

    def put_back() -> None:
        for module, kind, name, tensor in saved:
            table = getattr(module, kind)
            if name in table and table[name] is not tensor:
                table[name] = tensor
        for table, name, value in attributes:
            if table.get(name) is not value:
                table[name] = value

    try:
        yield put_back  # also callable inside the block (before falling back to the loop)
    finally:
        put_back()


#: torch.utils.checkpoint's warning when a reentrant segment's inputs need no gradient
_REENTRANT_CHECKPOINT = "None of the inputs have requires_grad=True. Gradients will be None"

#: the tensor methods by which a model's forward pass registers a hook on a tensor
_TENSOR_HOOK_REGISTRATIONS = tuple(
    getattr(Tensor, name)
    for name in ("register_hook", "register_post_accumulate_grad_hook")
    if hasattr(Tensor, name)
)


class _TensorHookInForward(Exception):
    """The model's forward pass registered a hook on a tensor inside ``vjp`` (raised before
    the backward pass, which would call it with torch.func's wrapper tensors)."""


class _TensorHookProbe(TorchFunctionMode):
    """Notes whether a hook is registered on a tensor (``Tensor.register_hook``) while it is
    active; every call goes through unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.registered = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _TENSOR_HOOK_REGISTRATIONS:
            self.registered = True
        return func(*args, **(kwargs or {}))


#: what torch.func says when it cannot transform a model (then: one example at a time)
_SAVED_TENSOR_HOOKS_REFUSAL = "don't yet support saved tensor hooks"
_TRANSFORM_REFUSALS = (
    _SAVED_TENSOR_HOOKS_REFUSAL,
    "must override the setup_context staticmethod",
    "functorch",
    "vmap:",
)


def _any_training(holder: nn.Module) -> bool:
    """Whether a module held by ``holder`` (the engine's own wrapper, whose flag means
    nothing) is in train mode."""
    return any(m.training for child in holder.children() for m in child.modules())


def _callers_saved_tensor_hooks(error: Exception) -> bool:
    """Whether torch.func's refusal ``error`` is its refusal of saved-tensor hooks and such
    hooks are active where the package runs: the caller's
    ``torch.autograd.graph.save_on_cpu()`` or ``saved_tensors_hooks(...)`` block (activation
    checkpointing inside the model gives the same refusal, but its hooks are gone once the
    forward pass is over).

    torch has no public query of its hook stack: a tensor is saved for backward under
    ``disable_saved_tensors_hooks`` (public), which raises its message only where a hook
    would have packed it (none is called)."""
    if _SAVED_TENSOR_HOOKS_REFUSAL not in str(error):
        return False
    probe = "captum_ext: probe of the caller's saved-tensor hooks"
    try:
        with (
            torch.autograd.graph.disable_saved_tensors_hooks(probe),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            leaf = torch.ones(1, requires_grad=True)
            leaf * leaf  # noqa: B018 (saves ``leaf`` for the backward pass)
    except RuntimeError as refusal:
        return probe in str(refusal)
    return False


def _unbatched_warning(error: Exception, training: bool = True, callers_hooks: bool = False) -> str:
    """The warning that per-example gradients fall back to one example at a time because
    torch.func refused to batch the model (``error``), with the usual cause of that refusal.

    torch.func refuses an in-place random draw on a tensor made inside the model (the mask
    of ``torchvision.ops.StochasticDepth``, in EfficientNet and ConvNeXt: ``bernoulli_`` on
    a new tensor), which runs in train mode only: there the results are random (new masks at
    every call), and the advice is ``model.eval()``, not a slower but equal loop.
    ``training``: whether a module of the model is in train mode (a model in eval mode that
    draws noise itself, as randomized smoothing does, is told so without that advice).
    ``callers_hooks``: the refusal comes from the caller's saved-tensor hooks
    (:func:`_callers_saved_tensor_hooks`), not from the model: the advice is to call outside
    that block."""
    cause = str(error).splitlines()[0][:160]
    if callers_hooks:
        return (
            "per-example gradients run one example at a time: the call runs inside a "
            "torch.autograd.graph.save_on_cpu() or saved_tensors_hooks(...) block, and "
            "torch.func cannot batch under saved-tensor hooks. The results are the same, only "
            "slower; call it outside that block to batch the examples."
        )
    if "randomness" in str(error) and not training:
        return (
            "per-example gradients run one example at a time: torch.func cannot batch this "
            f"model ({cause}). The model draws random numbers in place (in eval mode: noise "
            "of its own, as randomized smoothing adds), so its scores differ from call to "
            "call; seed torch's generator before each call to repeat them."
        )
    if "randomness" in str(error):
        return (
            "per-example gradients run one example at a time: torch.func cannot batch this "
            f"model ({cause}). A layer draws random numbers in place while the model is in "
            "train mode (stochastic depth, for instance), so every call draws new random "
            "masks and its scores differ from call to call. Call model.eval() first: scores "
            "are meant for the model as it predicts (and eval mode is batched, so faster)."
        )
    return (
        "per-example gradients run one example at a time: torch.func cannot batch this model "
        f"({cause}). The results are the same, only slower. Activation checkpointing "
        "(torch.utils.checkpoint) and autograd.Functions without `setup_context` are the "
        "usual causes."
    )


def _parameter_slots(root: nn.Module | None, wanted: Iterable[Tensor]) -> list[tuple]:
    """``(table, name, tensor)`` for every parameter slot of ``root``'s modules that holds
    one of ``wanted`` (a parameter reached by several paths, or tied, in each of them)."""
    ids = {id(t) for t in wanted}
    return [
        (table, name, tensor)
        for module in (root.modules() if root is not None else ())
        if not isinstance(module, torch.jit.ScriptModule)  # (their tables are not dicts)
        for table in (module._parameters,)
        for name, tensor in table.items()
        if tensor is not None and id(tensor) in ids
    ]


@contextlib.contextmanager
def _swapped_in(slots: list[tuple], copies: dict[int, Tensor]) -> Iterator[None]:
    """Each slot of :func:`_parameter_slots` holds ``copies[id(its tensor)]`` in the block;
    put back on exit."""
    try:
        for table, name, tensor in slots:
            table[name] = copies[id(tensor)]
        yield
    finally:
        for table, name, tensor in slots:
            table[name] = tensor


def _per_example_by_loop(
    forward_func: Callable,
    xs: tuple,
    extra: PerExampleLayout,
    start: int,
    names: dict[str, Tensor],
    original: dict[str, str],
    cotangents: Tensor,
    output_transform: Callable[[Any], Tensor] | None,
    computed: dict[str, tuple] | None = None,
    holder: nn.Module | None = None,
) -> dict[str, Tensor]:
    """What the vmapped vector-Jacobian products of :func:`per_example_parameter_gradients`
    compute, with plain autograd: a forward pass per example (a batch of one, as under
    ``vmap``, with its rows of the extra arguments, ``extra``, laid out once for all the
    examples of the call) and a backward pass per cotangent row. The caller restores the
    model's state (``preserved_state``), including the ``requires_grad`` flags set here.

    The parameters of ``names`` are differentiated through leaf copies, swapped into every
    parameter slot of ``holder``'s modules that holds them while an example runs (forward
    and backward passes), as ``functional_call`` swaps them under ``vmap``: hooks the user
    registered on a parameter (``weight.register_hook(...)``, gradient clipping or freezing)
    are not run, so both paths give the same numbers. A parameter in no slot (inside
    TorchScript code) is differentiated itself.

    ``computed`` (:func:`_computed_tensors`): weights a layer computes in each forward pass,
    differentiated as used. A forward pre-hook appended after the layer's own (which
    compute the weight) replaces a plain attribute by a leaf copy of it, or takes a
    parametrisation's weight, computed once under ``parametrize.cached()`` (its originals
    requiring gradients); the gradients of every call of the layer are summed. The caller
    puts the attributes back (:func:`_tensors_put_back`)."""
    computed = computed or {}
    # leaf copies, swapped in for the parameters while each example runs (forward and
    # backward): the user's tensor hooks on a parameter (weight.register_hook(...), gradient
    # clipping) never run, as under vmap, where functional_call swaps in other tensors too
    parameters = {name: t for name, t in names.items() if name not in computed}
    slots = _parameter_slots(holder, parameters.values())
    reached = {id(tensor) for _, _, tensor in slots}
    copies = {id(t): t.detach().requires_grad_(True) for t in parameters.values()}
    for name, parameter in parameters.items():
        if id(parameter) in reached:
            parameters[name] = copies[id(parameter)]
        else:  # not in a module's table (inside TorchScript code): the parameter itself
            parameter.requires_grad_(True)
    used: dict[str, dict[int, Tensor]] = {name: {} for name in computed}

    def capture_of(name: str, attribute: str) -> Callable:
        def capture(module: nn.Module, args: Any) -> None:
            table = vars(module)
            if attribute in table:  # set by the layer's own pre-hook: a leaf in its place
                tensor = table[attribute] = table[attribute].detach().requires_grad_(True)
            else:  # a parametrisation: the weight cached for this forward pass
                tensor = getattr(module, attribute)
            used[name][id(tensor)] = tensor

        return capture

    registrations = []
    for name, (module, attribute) in computed.items():
        if parametrize.is_parametrized(module, attribute):
            for original_tensor in module.parametrizations[attribute].parameters():
                original_tensor.requires_grad_(True)
        registrations.append(call_hook(module, capture_of(name, attribute), pre=True))
    cached = (
        parametrize.cached
        if any(parametrize.is_parametrized(m, a) for m, a in computed.values())
        else nullcontext
    )
    rows: dict[str, list[Tensor]] = {original[name]: [] for name in names}
    with registered_hooks(*registrations):
        for i in range(cotangents.shape[0]):
            args = [x[i : i + 1] if isinstance(x, Tensor) else x for x in xs]
            more = extra.select(slice(start + i, start + i + 1))
            for tensors in used.values():
                tensors.clear()
            with gradients_on(), _swapped_in(slots, copies):
                with warnings.catch_warnings(record=True) as caught, cached():
                    warnings.simplefilter("always")
                    out = uncompiled(forward_func)(*args, *more)
                reentrant = any(_REENTRANT_CHECKPOINT in str(w.message) for w in caught)
                for w in caught if i == 0 else ():  # the model's own warnings, once
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                out = output_transform(out) if output_transform is not None else out
                # per name, the tensors to differentiate: the parameter, or each tensor the
                # layer used (those outside the graph get no gradient)
                wrt = {
                    name: [parameters[name]]
                    if name in parameters
                    else [t for t in used[name].values() if t.requires_grad]
                    for name in names
                }
                flat = [t for tensors in wrt.values() for t in tensors]
                per_row = []
                for j in range(cotangents.shape[1]):
                    found = (
                        torch.autograd.grad(
                            out,
                            flat,
                            grad_outputs=cotangents[i, j].reshape(out.shape).to(out.dtype),
                            retain_graph=j + 1 < cotangents.shape[1],
                            allow_unused=True,
                        )
                        if flat
                        else ()
                    )
                    per_row.append(found)
            if reentrant and any(g is None for row in per_row for g in row):
                raise ValueError(
                    "the model runs part of its forward pass under torch.utils.checkpoint "
                    "with use_reentrant=True, whose parameters get no gradients from "
                    "torch.autograd.grad (their per-example gradients would read as 0); use "
                    "use_reentrant=False, or turn activation checkpointing off while "
                    "explaining (e.g. timm's model.set_grad_checkpointing(False))."
                )
            offset = 0
            for name, tensors in wrt.items():
                per_class = []
                for row in per_row:
                    found = [g for g in row[offset : offset + len(tensors)] if g is not None]
                    per_class.append(
                        functools.reduce(torch.add, found)
                        if found
                        else torch.zeros_like(names[name])
                    )
                rows[original[name]].append(torch.stack(per_class))
                offset += len(tensors)
    return {name: torch.stack(values) for name, values in rows.items()}
