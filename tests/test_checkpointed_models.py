"""Models that recompute part of their forward pass in the backward pass
(``torch.utils.checkpoint``: timm's ``set_grad_checkpointing``, Hugging Face's
``gradient_checkpointing_enable``).

Before: per-example gradients (GradTrust at a layer or over all parameters) failed inside
torch.func ("don't yet support saved tensor hooks" / "must override the setup_context
staticmethod"); PathwayGradient blamed the model's "control flow"; the reentrant kind left
the CAMs' maps blank with no hint of why. Results that can be computed must equal the plain
model's; the others must say what to change.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from captum_ext.attr import VOICE, GradCAM, PathwayGradient
from captum_ext.metrics import gradtrust


class _Checkpointed(nn.Module):
    """The bundled DigitCNN with its convolutional features under activation checkpointing."""

    def __init__(self, model: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.model = model
        self.reentrant = reentrant

    def forward(self, x):
        features = checkpoint(self.model.features, x, use_reentrant=self.reentrant)
        return self.model.classifier(self.model.flatten(self.model.pool(features)))


@pytest.fixture
def digits(sample_digits):
    return sample_digits[0][:4], sample_digits[1][:4]


def _checkpointed(model, reentrant):
    return _Checkpointed(copy.deepcopy(model), reentrant).eval()


def test_cams_through_checkpointing_equal_the_plain_model(bundled_model, digits):
    x, y = digits
    wrapped = _checkpointed(bundled_model, reentrant=False)
    expected = GradCAM(bundled_model, "features.7").attribute(x, target=y)
    assert expected.flatten(1).amax(dim=1).gt(0).all()
    torch.testing.assert_close(
        GradCAM(wrapped, "model.features.7").attribute(x, target=y), expected
    )
    torch.testing.assert_close(
        VOICE(GradCAM(wrapped, "model.features.7")).attribute(x, target=y).uncertainty,
        VOICE(GradCAM(bundled_model, "features.7")).attribute(x, target=y).uncertainty,
    )


@pytest.mark.parametrize("layer", ["features.6", "all"])
def test_per_example_gradients_through_checkpointing(bundled_model, digits, layer):
    """torch.func refuses the recomputation's saved-tensor hooks: the gradients are taken one
    example at a time with plain autograd, said once, and equal the batched ones."""
    x, _ = digits
    wrapped = _checkpointed(bundled_model, reentrant=False)
    expected = gradtrust(bundled_model, x, layer=layer)
    with pytest.warns(RuntimeWarning, match="one example at a time") as caught:
        scores = gradtrust(wrapped, x, layer=layer if layer == "all" else "model." + layer)
    assert sum("one example at a time" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(scores, expected)
    assert all(p.grad is None for p in wrapped.parameters())


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
def test_reentrant_checkpointing_is_named_not_read_as_zero_gradients(bundled_model, digits):
    """With use_reentrant=True the segment's parameters get no gradient from autograd.grad:
    scoring them as 0 would be silent wrong output. A layer outside the segment still works."""
    x, _ = digits
    wrapped = _checkpointed(bundled_model, reentrant=True)
    with pytest.warns(RuntimeWarning, match="one example at a time"):
        with pytest.raises(ValueError, match="use_reentrant=True.*use use_reentrant=False"):
            gradtrust(wrapped, x, layer="all")
    with pytest.warns(RuntimeWarning, match="one example at a time"):
        head = gradtrust(wrapped, x, layer="model.classifier", method="autograd")
    torch.testing.assert_close(
        head, gradtrust(bundled_model, x, layer="classifier", method="autograd")
    )
    with pytest.warns(UserWarning, match="exactly zero.*use_reentrant=False"):
        GradCAM(wrapped, "model.features.7").attribute(x, target=digits[1])


def test_pathway_gradient_names_the_recomputation(bundled_model, digits):
    x, y = digits
    wrapped = _checkpointed(bundled_model, reentrant=False)
    with pytest.raises(RuntimeError, match="ran again during the backward pass.*checkpoint"):
        PathwayGradient(wrapped).attribute(x, target=y)
