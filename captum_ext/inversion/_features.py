"""Penultimate features of a model: the input of its last nn.Linear, or a given layer.

Unlike :func:`captum_ext._utils.hooks.capture_layer` (which cuts the graph at the layer to
take gradients there), the tap keeps the captured tensor in the graph, so that losses on the
features backpropagate to whatever produced the model's input (the generator).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from captum_ext._utils.hooks import call_hook, registered_hooks
from captum_ext._utils.layers import find_last_linear, resolve_layer
from captum_ext._utils.model_state import preserved_state
from captum_ext._utils.validation import is_integer


def final_linear(model: nn.Module, example: Tensor) -> nn.Module:
    """The nn.Linear that runs last in a forward pass on ``example`` and produces the logits.

    The rule of :func:`captum_ext._utils.layers.find_last_linear` (last linear layer to run,
    seen by forward hooks during one no-grad, eval-mode pass; the model's state is
    restored), plus a check that its output has the logits' shape.
    """
    remedy = "pass `{argument}` (a module or dotted name)"
    shapes: dict[int, tuple] = {}
    logits: list[Tensor] = []

    def record(module, args, output):
        if isinstance(output, Tensor):
            shapes[id(module)] = tuple(output.shape)

    def run() -> None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        with registered_hooks(*(call_hook(m, record) for m in linears)):
            logits.append(model(example))

    with preserved_state([model]):
        model.eval()
        _, module = find_last_linear(model, run, argument="feature_layer", remedy=remedy)
    expected = tuple(logits[-1].shape) if isinstance(logits[-1], Tensor) else None
    if shapes.get(id(module)) != expected:
        raise ValueError(
            f"`feature_layer`: the last nn.Linear to run outputs shape {shapes.get(id(module))}, "
            f"not the logits' {expected}; pass `feature_layer` (a module or dotted name)."
        )
    return module


#: the former private name (used by older tests)
_find_last_linear = final_linear


class _FeatureTap:
    """Records a layer's output (or input) on each forward pass, inside the graph."""

    def __init__(self, layer: nn.Module, *, layer_input: bool) -> None:
        self.layer = layer
        self.layer_input = layer_input
        self._values: list[Tensor] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[_FeatureTap]:
        def on_input(module, args):
            tensors = [a for a in args if isinstance(a, Tensor)]
            if not tensors:
                raise TypeError("`feature_layer` received no tensor input.")
            self._values.append(tensors[0])

        def on_output(module, args, output):
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"`feature_layer` returns {type(output).__name__}, not a tensor; pick "
                    "another layer or set `feature_layer_input=True`."
                )
            self._values.append(output)

        register = (
            call_hook(self.layer, on_input, pre=True)
            if self.layer_input
            else call_hook(self.layer, on_output)
        )
        self._values = []
        try:
            with registered_hooks(register):
                yield self
        finally:
            self._values = []

    def clear(self) -> None:
        """Forget what was recorded (after extra forward passes whose features are unused)."""
        self._values = []

    def pop(self) -> Tensor:
        """The features of the last forward pass, ``N x D`` (flattened), then forgotten."""
        if len(self._values) != 1:
            count = len(self._values)
            self._values = []
            raise ValueError(
                f"`feature_layer` ran {count} times in one forward pass of the model; "
                "pick a layer that runs exactly once."
            )
        value = self._values.pop()
        return value.flatten(1)


def _feature_tap(
    model: nn.Module, feature_layer, example: Tensor, *, layer_input: bool | None
) -> _FeatureTap:
    """The tap of ``feature_layer`` (output by default), or of the last nn.Linear's input."""
    if feature_layer is None:
        return _FeatureTap(final_linear(model, example), layer_input=True)
    layer = resolve_layer(model, feature_layer, argument="feature_layer")
    return _FeatureTap(layer, layer_input=bool(layer_input))


#: the remedy of the probabilities warning for the inversion classes, which take the model
#: itself (an nn.Module whose layers they find and extend) and no ``output_transform``
MODULE_PROBABILITIES_REMEDY = (
    "This class takes the model itself and no output_transform: give the model without its "
    "final softmax (its logits), or wrap it, captum_ext.data.LogitsOutput(model, "
    "reads='probabilities'), which returns its log-probabilities (logits: softmax(log p) = "
    "p) and keeps its layers and their names."
)


#: True while the model's output head was warned of already (see
#: :func:`head_already_checked`)
_HEAD_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "captum_ext_inversion_head_checked", default=False
)


@contextlib.contextmanager
def head_already_checked() -> Iterator[None]:
    """Within the block :func:`count_classes` does not warn of probabilities again: for a
    class that probes the model and then builds another on it (TIE's NetworkInversion), so
    the user sees the warning once."""
    token = _HEAD_CHECKED.set(True)
    try:
        yield
    finally:
        _HEAD_CHECKED.reset(token)


def warn_if_probabilities(logits: Tensor) -> None:
    """Warn where the model's (N, C) output has rows on the probability simplex (a model that
    ends in a softmax), which the inversion losses and TIE's probabilities would take a
    second softmax of: the methods' probabilities warning, with the remedy for a model that
    is given as it is (:data:`MODULE_PROBABILITIES_REMEDY`)."""
    import warnings

    from captum_ext._utils.batched_grad import (
        PROBABILITIES_WARNING,
        UNDERFLOW_NOTE,
        looks_like_probabilities,
    )
    from captum_ext._utils.caller import user_stacklevel

    if looks_like_probabilities(logits) and not _HEAD_CHECKED.get():
        remedy = MODULE_PROBABILITIES_REMEDY
        if bool((logits == 0).any()):
            remedy += UNDERFLOW_NOTE
        warnings.warn(PROBABILITIES_WARNING + remedy, UserWarning, stacklevel=user_stacklevel())


def count_classes(model: nn.Module, input_shape, device, dtype, *, warn: bool = True) -> int:
    """The number of logits ``model`` returns for (C, H, W) = ``input_shape`` inputs, from
    one forward pass on two zero images (eval mode, no gradients; the model's state is
    restored). A model that fails on such inputs, or does not return N x K logits, raises a
    ValueError naming ``input_shape`` / ``model``; a model whose rows are probabilities (it
    ends in a softmax, which TIE's probabilities and the inversion losses would take a
    second softmax of) gets the probabilities warning (:func:`warn_if_probabilities`) unless
    ``warn`` is False (a probe repeated by a later one that warns)."""
    if (
        isinstance(input_shape, str)
        or not hasattr(input_shape, "__len__")
        or len(input_shape) != 3
        or not all(is_integer(s) and s > 0 for s in input_shape)
    ):
        raise ValueError(f"`input_shape` must be (C, H, W) of positive ints, got {input_shape}")
    input_shape = tuple(int(s) for s in input_shape)  # numpy integers as Python ints
    example = torch.zeros(2, *input_shape, device=device, dtype=dtype)
    with preserved_state([model]), torch.no_grad():
        model.eval()
        try:
            logits = model(example)
        except Exception as error:
            raise ValueError(
                f"`input_shape` {tuple(input_shape)}: the model fails on such inputs "
                f"({type(error).__name__}: {error})."
            ) from error
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"`model` must return N x K logits, got {got}.")
    if warn:
        warn_if_probabilities(logits)
    return int(logits.shape[1])
