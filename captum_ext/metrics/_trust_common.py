"""Private helpers shared by :mod:`captum_ext.metrics.grad_trust` and
:mod:`captum_ext.metrics.trust_baselines`: argument checks, the final-layer look-up and the
recorded forward pass. The gradients themselves are computed by the engine in
:mod:`captum_ext._utils.batched_grad`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from captum_ext._utils.batched_grad import run_forward
from captum_ext._utils.hooks import call_hook, registered_hooks
from captum_ext._utils.layers import find_last_linear, resolve_layer, root_module
from captum_ext._utils.model_state import preserved_state
from captum_ext._utils.validation import format_inputs


def _check_choice(value: Any, choices: Sequence[str], argument: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{argument}`={value!r}: expected one of {', '.join(choices)}.")
    return value


def _last_linear(forward_func: Callable, run: Callable[[], Any] | None) -> nn.Linear:
    """The final nn.Linear: the last to run in ``run()`` (one forward pass on the inputs)."""
    model = root_module(forward_func)
    if model is None:
        raise TypeError(
            "`layer` is None, so the final nn.Linear is looked up in the model, but "
            "forward_func is not an nn.Module (nor a bound method of one); pass `layer`."
        )
    with preserved_state([model], hidden_model=model is None):
        _, module = find_last_linear(model, run, argument="layer")
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(
            "`layer`: the final linear layer of this TorchScript model is compiled, and forward "
            "hooks cannot be registered on ScriptModules. Wrap the model with "
            "captum_ext.torchscript.expose_final_layer(model), which runs an eager copy of "
            "that layer (as `captum-ext score` does)."
        )
    return module


def _resolve_head(
    forward_func: Callable,
    layer: Any,
    inputs: tuple[Tensor, ...],
    extra: tuple,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> tuple[nn.Module, bool]:
    """``(layer module, found automatically)``."""
    if layer is None:

        def run() -> None:  # (a probe for the layer: the scoring pass warns, not this one)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_forward(forward_func, inputs, extra, output_transform, check_nan=False)

        return _last_linear(forward_func, run), True
    return resolve_layer(forward_func, layer), False


def _check_transform(output_transform: Any) -> Callable[[Any], Tensor] | None:
    if output_transform is not None and not callable(output_transform):
        raise TypeError(
            "`output_transform` must be callable (model output -> (N, classes) logits), got "
            f"{type(output_transform).__name__}."
        )
    return output_transform


def _forward_recording(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    extra: Any,
    layer: nn.Module,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> tuple[Tensor, list[tuple[Tensor | None, Tensor | None]]]:
    """One forward pass without gradients; record ``layer``'s first input and its output."""
    calls: list[tuple[Tensor | None, Tensor | None]] = []

    def hook(module, args, output):
        first = args[0] if args and isinstance(args[0], Tensor) else None
        out = output if isinstance(output, Tensor) else None
        calls.append((first, out))

    with registered_hooks(call_hook(layer, hook)), torch.no_grad():
        logits = run_forward(forward_func, inputs, extra, output_transform)
    return logits, calls


def _head_features(layer: nn.Module, logits: Tensor, calls: list) -> Tensor | None:
    """The features h (N, d) when ``layer`` is an nn.Linear whose output is the logits up to
    a constant per row (:func:`_same_up_to_row_shift`). That is enough for the closed forms
    of shift-invariant losses (cross-entropy, KL from the uniform distribution: functions of
    the softmax); a loss that reads the logits' level (GradTrust's reference form) checks
    :func:`_exactly_the_logits` or :func:`_log_softmax_of` as well."""
    if not isinstance(layer, nn.Linear) or len(calls) != 1:
        return None
    h, out = calls[0]
    if h is None or out is None or h.dim() != 2 or out.shape != logits.shape:
        return None
    if not _same_up_to_row_shift(out, logits):
        return None
    return h


def _exactly_the_logits(out: Tensor, logits: Tensor) -> bool:
    """Whether the layer's output IS the logits, value for value (rows of NaN compared by
    where they are NaN): no output transform or final layer between them, as the closed
    forms of losses that are not shift-invariant (GradTrust's reference form) need."""
    if out.shape != logits.shape:
        return False
    if torch.equal(out, logits):
        return True
    missing = torch.isnan(out)
    if not torch.equal(missing, torch.isnan(logits)):
        return False
    return bool(torch.equal(out[~missing], logits[~missing]))


def _log_softmax_of(out: Tensor, logits: Tensor) -> bool:
    """Whether the logits are the log-softmax of the layer's output (a model ending in
    ``log_softmax``, or a softmax model read through
    :func:`~captum_ext.data.log_probabilities`), to the rounding tolerance of
    :func:`_same_up_to_row_shift`: each row is the output less its log-sum-exp. Then the
    logits' Jacobian with respect to the output is ``I - 1 p^T`` (``p = softmax``), the same
    for any number of such normalisations in a row. Rows of NaN are left out; False when
    no finite row is left or the values are not finite."""
    if out.shape != logits.shape or not _same_up_to_row_shift(out, logits):
        return False
    rows = ~(torch.isnan(out).any(dim=1) | torch.isnan(logits).any(dim=1))
    a, b = out[rows].double(), logits[rows].double()
    if a.numel() == 0 or not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    expected = a - torch.logsumexp(a, dim=1, keepdim=True)
    scale = float(a.abs().max() + b.abs().max()) + 1.0
    eps = max(torch.finfo(out.dtype).eps, torch.finfo(logits.dtype).eps)
    tolerance = 16 * eps * scale
    return bool(((b - expected).abs() <= tolerance).all())


def _same_up_to_row_shift(out: Tensor, logits: Tensor) -> bool:
    """Whether the layer's output gives the logits up to a constant per row (the
    ``log_probabilities`` output transform of a softmax model subtracts each row's
    log-sum-exp): then softmax(logits) = softmax(out), and the cross-entropy's gradient at
    the layer is the closed form ``(p - e_Q) h^T`` all the same. Rows of NaN (a model that
    overflowed) are compared by where they are NaN."""
    if torch.equal(out, logits):
        return True
    missing = torch.isnan(out)
    if not torch.equal(missing, torch.isnan(logits)):
        return False
    rows = ~missing.any(dim=1)
    a, b = out[rows].double(), logits[rows].double()
    if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        return bool(torch.equal(a, b))
    if a.numel() == 0:
        return True
    shift = a - b
    scale = float(a.abs().max() + b.abs().max()) + 1.0
    tolerance = 16 * torch.finfo(out.dtype).eps * scale
    return bool(((shift - shift[:, :1]).abs() <= tolerance).all())


def _weight_of(layer: nn.Module) -> Tensor:
    """``layer.weight``: a parameter, or the weight that a pruned or weight-normalised layer
    computes (``weight_orig * weight_mask``, ``g * v / ||v||``, a parametrisation's
    output). :func:`~captum_ext._utils.batched_grad.per_example_parameter_gradients`
    recognises a computed weight (not a registered parameter) and differentiates the tensor
    the forward pass uses, not this one, which the layer's pre-hook replaces."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise TypeError(
            f"`layer` ({type(layer).__name__}) has no weight matrix (a `weight` parameter with "
            "at least 2 dimensions) to differentiate."
        )
    return weight


def _logits(forward_func, inputs, additional_forward_args, output_transform=None) -> Tensor:
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    model = root_module(forward_func)
    with preserved_state([model], hidden_model=model is None), torch.no_grad():
        return run_forward(forward_func, inputs, additional_forward_args, output_transform)
