"""Where a warning raised inside the package should point (the user's own line), what to
say where ``forward_func`` cannot be called as the methods call it, and the eager module
behind a compiled ``forward_func``."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable

import captum
from torch import nn

# with the separator: a user's folder beside them (captum_ext_examples/) is not theirs
_PACKAGES = tuple(
    os.path.join(folder, "")
    for folder in (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(captum.__file__))
)


def uncompiled(forward_func):
    """The eager module behind ``torch.compile(model)`` (its ``_orig_mod``); anything else
    as it is.

    Methods run a compiled model through its eager module: the same parameters and the
    same outputs up to float rounding. Compiled graphs do not take the per-example
    gradients' ``vmap`` (a deep "vmap: aten::copy_" error) and recompile each time a
    method registers its hooks. ``model.compile()`` (in place) is handled by
    :func:`captum_ext._utils.model_state.preserved_state`.
    """
    while isinstance(forward_func, nn.Module) and isinstance(
        getattr(forward_func, "_orig_mod", None), nn.Module
    ):
        forward_func = forward_func._orig_mod
    return forward_func


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called by the caller of this function that points at
    the first frame outside captum_ext and Captum: the user's call, also when it came through
    NoiseTunnel or Captum's logging wrapper."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGES):
        frame, level = frame.f_back, level + 1
    return level


#: Captum's wrappers that repeat each example's inputs k times (in ``repeat_interleave``
#: order) and pass keywords they do not know unchanged
_EXPANDING_WRAPPERS = (
    os.path.join(os.path.dirname(captum.__file__), "attr", "_core", "noise_tunnel.py"),
    os.path.join(os.path.dirname(captum.__file__), "metrics", ""),
)


def inside_expanding_wrapper() -> bool:
    """Whether the current call came through Captum's NoiseTunnel, ``infidelity`` or
    ``sensitivity_max``, which hand a method N x k inputs with our per-example keywords
    (``contrast=``) still of length N."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_EXPANDING_WRAPPERS):
            return True
        frame = frame.f_back
    return False


def _keyword_only_parameters(forward_func: Callable) -> list[str] | None:
    """The required keyword-only parameters of ``forward_func`` (of a module's ``forward``)
    where it takes no positional argument at all (``def forward(self, *, pixel_values)``),
    or all of them where none is required (``*, pixel_values=None``); None where it takes
    positional arguments, no named ones (``**kwargs`` only), or has no signature to read."""
    callee = uncompiled(forward_func)
    if isinstance(callee, nn.Module):
        callee = callee.forward
    try:
        parameters = inspect.signature(callee).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing to say
        return None
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    if any(p.kind in positional for p in parameters):
        return None
    keywords = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    required = [p.name for p in keywords if p.default is inspect.Parameter.empty]
    return required or [p.name for p in keywords] or None


class KeywordOnlyForwardError(TypeError):
    """The TypeError that says to wrap a model whose ``forward`` takes only keyword arguments
    (made by :func:`keyword_only_forward_error`). ``python_error`` keeps Python's own
    refusal, so that a caller that knows more (the CAMs know their ``layer``) can build the
    message again with what it knows instead of wrapping this one in a second message."""

    def __init__(self, message: str, python_error: TypeError) -> None:
        super().__init__(message)
        self.python_error = python_error

    def __reduce__(self):  # pickled and copied whole (a multiprocessing worker's error)
        return type(self), (str(self), self.python_error)


def keyword_only_forward_error(
    forward_func: Callable, error: TypeError, n_positional: int, *, layer_name: str | None = None
) -> KeywordOnlyForwardError | None:
    """The clear error for Python's bare "forward() takes 1 positional argument but 2 were
    given" (``error``), raised where a model whose ``forward`` takes only keyword arguments
    (``def forward(self, *, pixel_values)``) is called, as every method calls
    ``forward_func``, with ``n_positional`` positional arguments (the inputs, then
    ``additional_forward_args``): it says to wrap the model. None where ``forward_func``
    takes positional arguments (the TypeError has another cause: re-raise it as it is).
    ``layer_name``: the dotted name of the ``layer`` the method explains, which a function
    wrapping the model cannot look up (the error then says how to give it). Where ``error``
    is already this clear error (a :class:`KeywordOnlyForwardError` raised by an inner model
    call), the message is built again from Python's refusal it keeps, not nested in it."""
    if isinstance(error, KeywordOnlyForwardError):
        error = error.python_error
    keywords = _keyword_only_parameters(forward_func)
    if keywords is None or n_positional < 1:
        return None
    # one input per keyword where the counts match, else the first keyword takes the input
    names = [f"x{i}" for i in range(len(keywords))] if n_positional == len(keywords) > 1 else ["x"]
    passed = [f"{k}={x}" for k, x in zip(keywords, names)]
    passed += [f"{k}=..." for k in keywords[len(names) :]]
    wrapper = f"lambda {', '.join(names)}: model({', '.join(passed)})"
    owner = uncompiled(forward_func)
    subject = f"`forward_func` ({type(owner).__name__}.forward)"
    if not isinstance(owner, nn.Module):
        subject = "`forward_func`"
    layer = ""
    if layer_name:
        layer = (
            f" Then give `layer` as the module itself (model.{layer_name}) with the function, "
            f"which has no module names, or as {'model.' + layer_name!r} with the nn.Module."
        )
    return KeywordOnlyForwardError(
        f"{subject} takes only keyword arguments ({', '.join(k + '=' for k in keywords)}), "
        "but it is called with the inputs as positional arguments, "
        f"forward_func(*inputs, *additional_forward_args), which Python refuses ({error}). "
        f"Wrap the model so that it takes them positionally: forward_func={wrapper}, or a "
        f"small nn.Module whose forward(self, x) returns self.model({keywords[0]}=x).{layer}",
        error,
    )
