"""Wrapped and compiled models: plain functions, bound ``forward``, ``nn.DataParallel``,
and TorchScript (clear errors for scripted layers and traced models; a scripted head works)."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from _interop import (
    CAM_CLASSES,
    LAYER,
    PER_EXAMPLE,
)
from captum.attr import (
    Saliency,
)
from torch import nn

from captum_ext.attr import (
    ContrastCAM,
    Contrastive,
    CounterfactualCAM,
    LayerGradCamPlusPlus,
)

# ------------------------------------------------------------------ 9. wrapped models


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_plain_function_bound_forward_and_data_parallel_agree(name, tiny_cnn, tiny_inputs):
    cls = CAM_CLASSES[name]
    key = "contrast" if cls is ContrastCAM else "target"
    layer = tiny_cnn.features[3]
    reference = cls(tiny_cnn, LAYER).attribute(tiny_inputs, **{key: PER_EXAMPLE})
    parallel = nn.DataParallel(tiny_cnn)
    variants = {
        "function": cls(lambda x: tiny_cnn(x), layer),
        "bound forward": cls(tiny_cnn.forward, layer),
        "bound forward by name": cls(tiny_cnn.forward, LAYER),
        "data parallel": cls(parallel, layer),
        "data parallel by name": cls(parallel, "module." + LAYER),
    }
    before = model_snapshot(tiny_cnn)
    for label, method in variants.items():
        got = method.attribute(tiny_inputs, **{key: PER_EXAMPLE})
        torch.testing.assert_close(got, reference, rtol=0, atol=0, msg=label)
    assert_model_unchanged(tiny_cnn, before)


def test_contrastive_with_a_plain_function_and_data_parallel(tiny_cnn, tiny_inputs):
    reference = Contrastive(Saliency, tiny_cnn).attribute(tiny_inputs, contrast=PER_EXAMPLE)
    for forward in (lambda x: tiny_cnn(x), tiny_cnn.forward, nn.DataParallel(tiny_cnn)):
        got = Contrastive(Saliency, forward).attribute(tiny_inputs, contrast=PER_EXAMPLE)
        torch.testing.assert_close(got, reference, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [ContrastCAM, CounterfactualCAM, LayerGradCamPlusPlus])
def test_layer_name_with_a_plain_function_is_a_clear_type_error(cls, tiny_cnn):
    with pytest.raises(TypeError, match="layer.*(module|nn.Module)"):
        cls(lambda x: tiny_cnn(x), LAYER)


# ------------------------------------------------------------------ 6. JIT


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
@pytest.mark.parametrize("cls", [ContrastCAM, CounterfactualCAM, LayerGradCamPlusPlus])
def test_scripted_layer_is_a_clear_type_error(cls):
    model = make_tiny_cnn()
    model.features[3] = torch.jit.script(model.features[3])
    for layer in (LAYER, model.features[3]):
        with pytest.raises(TypeError, match="(ScriptModule|TorchScript)"):
            cls(model, layer)


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
def test_layer_of_a_traced_model_is_a_clear_type_error(tiny_inputs):
    traced = torch.jit.trace(make_tiny_cnn(), tiny_inputs)
    with pytest.raises(TypeError, match="(ScriptModule|TorchScript)"):
        ContrastCAM(traced, LAYER)


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
def test_eager_model_with_scripted_head_works(tiny_inputs):
    eager = make_tiny_cnn()
    partly_scripted = make_tiny_cnn()
    partly_scripted.head = torch.jit.script(partly_scripted.head)
    partly_scripted.classifier = torch.jit.script(partly_scripted.classifier)
    before = model_snapshot(partly_scripted)
    for name, kwargs in [("contrast", {"contrast": "all"}), ("counterfactual", {"target": 2})]:
        expected = CAM_CLASSES[name](eager, LAYER).attribute(tiny_inputs, **kwargs)
        got = CAM_CLASSES[name](partly_scripted, LAYER).attribute(tiny_inputs, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert_model_unchanged(partly_scripted, before)
