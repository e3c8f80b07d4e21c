"""torch's hook-based (legacy) ``torch.nn.utils.weight_norm`` and ``spectral_norm``.

They keep the trained tensors as parameters (``weight_g`` / ``weight_v``, ``weight_orig``)
and recompute ``weight``, a plain attribute of the module, in a forward pre-hook. Three
things follow for code that copies or re-initialises a user's model:

- ``copy.deepcopy`` refuses the computed ``weight`` once it has autograd history ("Only
  Tensors created explicitly by the user (graph leaves) support the deepcopy protocol"):
  :func:`copied_model` copies with it detached;
- the pre-hooks *are* the layer: a copy stripped of hooks would keep a frozen ``weight`` and
  ignore its parameters (:func:`is_legacy_norm_hook` tells them apart from users' hooks);
- ``reset_parameters`` writes into the computed ``weight``, which the next forward
  overwrites: :func:`resynchronise_legacy_norms` moves a re-initialised weight into the
  parameters (and, for spectral norm, recomputes the power-iteration vectors).
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.utils.spectral_norm import (
    SpectralNorm,
    SpectralNormLoadStateDictPreHook,
    SpectralNormStateDictHook,
)
from torch.nn.utils.weight_norm import WeightNorm

_Module = TypeVar("_Module", bound=nn.Module)

_HOOK_TYPES = (
    WeightNorm,
    SpectralNorm,
    SpectralNormStateDictHook,
    SpectralNormLoadStateDictPreHook,
)

#: power iterations for a re-initialised spectrally normalised weight (as for parametrize's)
_POWER_ITERATIONS = 15


def is_legacy_norm_hook(hook: Any) -> bool:
    """Whether ``hook`` (a value of a module's hook dicts) is part of a legacy
    ``weight_norm`` / ``spectral_norm`` (torch wraps some state-dict hooks)."""
    return isinstance(hook, _HOOK_TYPES) or isinstance(getattr(hook, "hook", None), _HOOK_TYPES)


def copied_model(model: _Module) -> _Module:
    """``copy.deepcopy(model)``, also when legacy normalised layers hold a computed weight
    with autograd history (the copy gets it detached; its pre-hook recomputes it on the next
    forward). The user's model is left as it was.

    A TorchScript module (the model, or one inside it) is copied by cloning its tensors,
    which with gradients enabled gives parameters that are not leaves and lead back to the
    user's: every backward pass through the copy then warns about ``.grad`` of a non-leaf
    tensor, and gradients could reach the user's parameters. It is copied under
    ``torch.no_grad()`` (leaf tensors, no graph), its ``requires_grad`` flags set as the
    user's."""
    computed = [
        (module.__dict__, name, value)
        for module in model.modules()
        if not isinstance(module, torch.jit.ScriptModule)
        for name, value in list(vars(module).items())
        if isinstance(value, torch.Tensor) and value.grad_fn is not None
    ]
    try:
        for attributes, name, value in computed:
            attributes[name] = value.detach()
        if not any(isinstance(module, torch.jit.ScriptModule) for module in model.modules()):
            return copy.deepcopy(model)
        with torch.no_grad():
            copied = copy.deepcopy(model)
    finally:
        for attributes, name, value in computed:
            attributes[name] = value
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, parameter in copied.named_parameters():
        if name in flags and parameter.requires_grad != flags[name]:
            parameter.requires_grad_(flags[name])
    return copied


def resynchronise_legacy_norms(module: nn.Module) -> None:
    """After ``module.reset_parameters()`` wrote a new weight into the computed attribute of
    a legacy normalised layer: the layer's parameters are set to represent it (``weight_g``
    = its norm over every dim but ``dim``, ``weight_v`` = it; ``weight_orig`` = it, with
    ``_POWER_ITERATIONS`` power iterations for the new weight's singular vectors) and the
    attribute is recomputed from them, as the pre-hook would."""
    hooks = [hook for hook in module._forward_pre_hooks.values() if is_legacy_norm_hook(hook)]
    with torch.no_grad():
        for hook in hooks:
            weight = getattr(module, hook.name).detach().clone()
            if isinstance(hook, WeightNorm):
                getattr(module, hook.name + "_g").copy_(torch.norm_except_dim(weight, 2, hook.dim))
                getattr(module, hook.name + "_v").copy_(weight)
                setattr(module, hook.name, hook.compute_weight(module))
            else:
                getattr(module, hook.name + "_orig").copy_(weight)
                for _ in range(_POWER_ITERATIONS):
                    hook.compute_weight(module, do_power_iteration=True)
                setattr(module, hook.name, hook.compute_weight(module, do_power_iteration=False))
