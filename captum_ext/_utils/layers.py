"""Finding the layer a method explains, given as a module or a dotted name."""

from __future__ import annotations

import difflib

import torch
from torch import nn


def root_module(forward_func) -> nn.Module | None:
    """The ``nn.Module`` behind ``forward_func``: itself, or the owner of a bound method."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    return None


def resolve_layer(forward_func, layer, *, argument: str = "layer") -> nn.Module:
    """Return the module named by ``layer``.

    Args:
        forward_func: the model (or a bound ``forward`` of a model) that owns the layer.
        layer (nn.Module or str): the module itself, or its dotted name in
            ``model.named_modules()`` such as ``"layer4.1.conv2"``.
        argument: the argument name used in error messages.

    Raises:
        TypeError: ``layer`` is neither a module nor a string, or is a TorchScript module
            (forward hooks cannot be registered on ScriptModules).
        ValueError: no module has that name; the message lists the closest names.
    """
    if isinstance(layer, str):
        model = root_module(forward_func)
        if model is None:
            raise TypeError(
                f"`{argument}` was given as the name {layer!r}, but forward_func is not an "
                "nn.Module (nor a bound method of one), so names cannot be looked up; "
                "pass the module itself."
            )
        modules = dict(model.named_modules())
        if layer not in modules:
            names = [name for name in modules if name]
            close = difflib.get_close_matches(layer, names, n=5, cutoff=0.4)
            hint = f" Closest names: {', '.join(close)}." if close else ""
            raise ValueError(
                f"`{argument}`={layer!r} is not a module of {type(model).__name__}.{hint} "
                "Use a name from model.named_modules()."
            )
        layer = modules[layer]
    if not isinstance(layer, nn.Module):
        raise TypeError(
            f"`{argument}` must be an nn.Module or a dotted module name, got "
            f"{type(layer).__name__}."
        )
    if isinstance(layer, torch.jit.ScriptModule):
        raise TypeError(
            f"`{argument}` is a TorchScript module ({type(layer).__name__}); forward hooks "
            "cannot be registered on ScriptModules. Explain an eager model (later parts of "
            "it may be scripted), or wrap a loaded TorchScript model with "
            "captum_ext.data.expose_layer(model, 'layer.name')."
        )
    return layer
