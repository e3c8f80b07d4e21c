"""captum_ext.torchscript: the public home of TorchScriptLayerModel and its helpers."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from captum_ext import torchscript


def _scripted() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    return torch.jit.script(model.eval())


def test_last_linear_name_follows_the_single_rule():
    model = _scripted()
    assert torchscript.last_linear_name(model) == "3"
    assert torchscript.last_linear_name(torch.jit.script(nn.Sequential(nn.ReLU()))) is None


def test_expose_final_layer_reproduces_the_model():
    model = _scripted()
    x = torch.randn(5, 1, 4, 4)
    wrapper = torchscript.expose_final_layer(model, example=x)
    assert isinstance(wrapper, torchscript.TorchScriptLayerModel)
    torch.testing.assert_close(wrapper(x), model(x))


def test_old_private_path_still_imports_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from captum_ext._utils.torchscript import (
            TorchScriptLayerModel,
            expose_final_layer,
            expose_layer,
            last_linear_name,
        )
    assert TorchScriptLayerModel is torchscript.TorchScriptLayerModel
    assert expose_layer is torchscript.expose_layer
    assert expose_final_layer is torchscript.expose_final_layer
    assert last_linear_name is torchscript.last_linear_name
