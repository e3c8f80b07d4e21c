"""LayerIBA(upsample_to_input=True) reads the size from ``inputs[0]``: a 1-D signal or a
model whose image is not its first input is refused before the optimisation, naming
``upsample_to_input`` and ``inputs[0]`` (not upsample_bits' ``size``)."""

import pytest
import torch
from torch import nn

from captum_ext.attr import LayerIBA


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv1d(4, 4, 3, padding=1, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(2))


class MetaFirst(nn.Module):
    """forward(meta, image): the image is the second input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.meta_head = nn.Linear(4, 3)

    def forward(self, meta, image):
        return self.head(torch.relu(self.conv(image)).mean((2, 3))) + self.meta_head(meta)


def _counting(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("return_type", ["bits", "lambda", "capacity"])
def test_signal_refused_before_optimising(return_type):
    torch.manual_seed(0)
    model = Net1d().eval()
    iba = LayerIBA(model, "conv2")
    iba.estimate(torch.randn(16, 2, 12))
    calls = _counting(model)
    with pytest.raises(ValueError, match=r"upsample_to_input.*inputs\[0\].*\(4, 2, 12\)"):
        iba.attribute(
            torch.randn(4, 2, 12),
            target=0,
            reshape_transform=lambda t: t.unsqueeze(2),
            sigma=None,
            upsample_to_input=True,
            steps=2,
            return_type=return_type,
        )
    assert not calls  # the model never ran: refused before the optimisation


def test_image_not_first_input_refused_before_optimising():
    torch.manual_seed(0)
    model = MetaFirst().eval()
    iba = LayerIBA(model, "conv")
    iba.estimate((torch.randn(16, 4), torch.randn(16, 3, 6, 6)))
    calls = _counting(model)
    with pytest.raises(ValueError, match=r"upsample_to_input.*inputs\[0\].*\(4, 4\)"):
        iba.attribute(
            (torch.randn(4, 4), torch.randn(4, 3, 6, 6)), target=0, upsample_to_input=True
        )
    assert not calls


class ImageFirst(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, image, meta):
        return self.inner(meta, image)


def test_image_first_input_still_upsamples():
    torch.manual_seed(0)
    model = ImageFirst(MetaFirst()).eval()
    iba = LayerIBA(model, "inner.conv")
    iba.estimate((torch.randn(16, 3, 6, 6), torch.randn(16, 4)))
    bits = iba.attribute(
        (torch.randn(2, 3, 6, 6), torch.randn(2, 4)), target=0, upsample_to_input=True, steps=2
    )
    assert bits.shape == (2, 1, 6, 6)
