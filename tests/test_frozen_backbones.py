"""Models that run a frozen backbone under ``torch.no_grad()`` inside ``forward`` (fine-tuning
only the head is common). No gradient reaches a layer of the backbone.

Before: Grad-CAM's warning listed other causes only (a ViT's last block, reentrant
checkpointing), and GradTrust at such a layer returned NaN for every example without a word.
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
