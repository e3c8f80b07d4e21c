"""Models that run a frozen backbone under ``torch.no_grad()`` inside ``forward`` (fine-tuning
only the head is common). No gradient reaches a layer of the backbone.

Before: Grad-CAM's warning listed other causes only (a ViT's last block, reentrant
checkpointing), and GradTrust at such a layer returned NaN for every example without a word.
Quantized models (``quantize_dynamic``) pass no gradients through their quantized layers at all.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_ext.attr import GradCAM
from captum_ext.metrics import gradtrust


class _FrozenBackbone(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.m.features(x)
        return self.m.classifier(self.m.flatten(self.m.pool(features)))


@pytest.fixture
def frozen(bundled_model) -> nn.Module:
    return _FrozenBackbone(bundled_model).eval()


def _messages(call) -> tuple[torch.Tensor, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


def test_grad_cam_inside_the_frozen_part_names_no_grad(frozen, sample_digits):
    x = sample_digits[0][:4]
    maps, messages = _messages(lambda: GradCAM(frozen, "m.features.7").attribute(x))
    assert not maps.any()
    assert any("torch.no_grad()" in m and "frozen backbone" in m for m in messages)


def test_gradtrust_inside_the_frozen_part_warns_that_every_score_is_nan(frozen, sample_digits):
    x = sample_digits[0][:4]
    scores, messages = _messages(lambda: gradtrust(frozen, x, layer="m.features.6", log=True))
    assert torch.isnan(scores).all()
    assert any(m.startswith("gradtrust: every score is NaN") for m in messages)
    # the head still gets its gradients: finite scores, no warning
    scores, messages = _messages(lambda: gradtrust(frozen, x, layer="m.classifier", log=True))
    assert torch.isfinite(scores).all()
    assert not any("every score is NaN" in m for m in messages)


@pytest.fixture
def quantized(bundled_model) -> nn.Module:
    """The bundled model after ``quantize_dynamic`` (int8 linear layers), as deployed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes on eager quantization
        return torch.ao.quantization.quantize_dynamic(bundled_model, {nn.Linear}, torch.qint8)


@pytest.mark.filterwarnings("ignore:.*quantiz:UserWarning")
@pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered:UserWarning")
def test_a_quantized_model_is_named_as_the_cause(quantized, sample_digits):
    """Quantized kernels have no autograd: Grad-CAM's maps are all zero and GradTrust finds
    no linear layer. Before, the warning listed every other cause but this one, and the
    error said to pass a `layer` that does not exist."""
    from captum_ext.attr import VOICE

    x = sample_digits[0][:4]
    said = "The model has quantized layers: classifier (torch.ao.nn.quantized.dynamic"
    for call in (
        lambda: GradCAM(quantized, "features.7").attribute(x),
        lambda: VOICE(GradCAM(quantized, "features.7")).attribute(x).uncertainty,
    ):
        maps, messages = _messages(call)
        assert not maps.any()
        assert any(said in m and "explain the floating-point model" in m for m in messages)
        assert not any("vision transformer" in m for m in messages)  # the cause, not a list
    with pytest.raises(ValueError, match="no linear layer") as raised:
        gradtrust(quantized, x)
    assert said in str(raised.value)


def test_the_float_model_names_no_quantized_layer(frozen, sample_digits):
    from captum_ext._utils.layers import quantized_note

    assert quantized_note(frozen) == "" and quantized_note(None) == ""
