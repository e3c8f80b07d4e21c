"""Guarantee that a method leaves the user's model as it found it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved_state(modules: Iterable[nn.Module | None]) -> Iterator[None]:
    """Restore training flags, ``requires_grad``, ``.grad``, buffers, grad mode and dtype.

    Applies to every submodule, parameter and buffer of the given modules, after the block
    exits normally or by an exception. Buffers matter for models in train mode: a forward
    pass there updates BatchNorm's ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` in place, and a method must not leave those changed. Their values
    are copied back in place (the same tensor objects), so references the user holds stay
    valid; a buffer the block replaced by another tensor is left as it is.
    """
    seen: dict[int, nn.Module] = {}
    for module in modules:
        if module is None:
            continue
        for sub in module.modules():
            seen.setdefault(id(sub), sub)
    submodules = list(seen.values())
    training = [(m, m.training) for m in submodules]
    params = {id(p): p for m in submodules for p in m.parameters(recurse=False)}
    flags = [(p, p.requires_grad, p.grad) for p in params.values()]
    buffers = {id(b): b for m in submodules for b in m.buffers(recurse=False)}
    saved_buffers = [(b, b.detach().clone()) for b in buffers.values()]
    grad_enabled = torch.is_grad_enabled()
    default_dtype = torch.get_default_dtype()
    try:
        yield
    finally:
        for module, was_training in training:
            module.training = was_training  # per module: .train() would recurse
        for param, requires_grad, grad in flags:
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)
            if param.grad is not grad:
                param.grad = grad
        with torch.no_grad():
            for buffer, value in saved_buffers:
                if buffer.shape == value.shape and not torch.equal(buffer, value):
                    buffer.copy_(value)
        torch.set_grad_enabled(grad_enabled)
        if torch.get_default_dtype() != default_dtype:
            torch.set_default_dtype(default_dtype)
