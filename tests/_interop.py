"""Shared pieces of the ``test_interop_*`` files: our methods as Captum citizens (one group of
tests per point of CAPTUM_INTEROP.md, split by topic).

Every comparison is against an independent computation: the examples one by one, Captum's own
LayerGradCam, the gradient by hand, or a loop that draws NoiseTunnel's noise the way
NoiseTunnel draws it.
"""

from __future__ import annotations

import torch
from _helpers import make_tiny_cnn
from torch import nn

from captum_ext.attr import ContrastCAM, CounterfactualCAM, LayerGradCamPlusPlus

LAYER = "features.3"
NUM_CLASSES = 5
PER_EXAMPLE = [1, 0, 4, 2]  # one class per example of the 4-example tiny batch

CAM_CLASSES = {
    "contrast": ContrastCAM,
    "counterfactual": CounterfactualCAM,
    "gradcam++": LayerGradCamPlusPlus,
}


def class_keyword(method) -> str:
    return "contrast" if isinstance(method, ContrastCAM) else "target"


def make_inputs(n: int = 4, size: int = 6, seed: int = 1, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=generator, dtype=torch.float64)


def pooled_model() -> nn.Module:
    """Average-pool by 2, then the tiny CNN: the layer ``1.features.3`` is half the input size."""
    return nn.Sequential(nn.AvgPool2d(2), make_tiny_cnn()).eval()


def cross_entropy_rows(model, x):
    return -torch.log_softmax(model(x), dim=1)


def saliency_of_cross_entropy(model, row: torch.Tensor, q: int) -> torch.Tensor:
    """|d CE(f(x), q) / dx| by hand, for one example."""
    leaf = row.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(cross_entropy_rows(model, leaf)[0, q], leaf)
    return grad.abs()


#: Batch sizes the method tests run at: one example, the usual 4, and an odd 5.
BATCH_SIZES = (1, 4, 5)

#: One class per example for up to 5 examples (the first 4 are PER_EXAMPLE).
CLASSES_5 = [*PER_EXAMPLE, 3]

#: Two classes per example for up to 5 examples.
PAIRS_5 = [[1, 3], [0, 0], [4, 2], [2, 1], [3, 4]]


def per_example(n: int) -> list[int]:
    """One class per example of an n-example batch (n <= 5)."""
    return CLASSES_5[:n]


def tiny_batch(n: int) -> torch.Tensor:
    """n tiny-CNN inputs; ``tiny_batch(4)`` equals the ``tiny_inputs`` fixture."""
    return make_inputs(n, 6, seed=1)


class TwoInputNet(nn.Module):
    """Two image inputs, a scalar factor and an optional per-example shift: f(x1, x2, s, b)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, NUM_CLASSES)

    def forward(self, x1, x2, scale, shift=None):
        h = torch.cat([torch.tanh(self.a(x1)), torch.tanh(self.b(x2))], dim=1)
        h = self.act(self.mix(h))
        logits = self.fc(h.mean(dim=(2, 3))) * scale
        return logits if shift is None else logits + shift * torch.arange(NUM_CLASSES)
