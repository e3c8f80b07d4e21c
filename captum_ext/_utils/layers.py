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


def _called_modules(model: nn.Module, run) -> list[tuple[str, nn.Module, tuple]]:
    """Run ``run()`` with hooks on every module: (name, module, output shape) by completion
    order, only modules called exactly once whose output is one tensor."""
    calls: dict[int, int] = {}
    order: list[tuple[str, nn.Module, tuple]] = []
    names = {id(m): name for name, m in model.named_modules() if name}

    def hook(module, inputs, output):
        calls[id(module)] = calls.get(id(module), 0) + 1
        if isinstance(output, torch.Tensor):
            order.append((names[id(module)], module, tuple(output.shape)))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if id(m) in names and not isinstance(m, torch.jit.ScriptModule)
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [entry for entry in order if calls[id(entry[1])] == 1]


def spatial_layer_suggestions(model: nn.Module, run, before: nn.Module, n: int = 3) -> list[str]:
    """Names of the layers closest before ``before`` (in execution order) whose output has
    spatial dimensions larger than 1 x 1 (``N x K x h x w``): the two that finish last (often
    the enclosing blocks) and the last convolution among them.

    ``run()`` performs one forward pass of ``model`` (run under ``torch.no_grad``; the
    caller keeps the model's state).
    """
    with torch.no_grad():
        order = _called_modules(model, run)
    stop = next((i for i, entry in enumerate(order) if entry[1] is before), len(order))
    spatial = [
        (name, module)
        for name, module, shape in order[:stop]
        if len(shape) >= 3 and any(s > 1 for s in shape[2:])
    ][::-1]
    picked = [name for name, _ in spatial[: max(0, n - 1)]]
    conv = next(
        (name for name, module in spatial if isinstance(module, nn.modules.conv._ConvNd)), None
    )
    if conv is not None and conv not in picked:
        picked.append(conv)
    for name, _ in spatial:
        if len(picked) >= n:
            break
        if name not in picked:
            picked.append(name)
    return picked
