"""LayerIBA.estimate refuses a layer that runs more than once per forward pass, as attribute
does (its first call's statistics would not be those of the activation replaced)."""

import pytest
import torch
from torch import nn

from captum_ext.attr import LayerIBA


class _Tied(nn.Module):
    """A convolution applied twice (tied weights): ``shared`` runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.shared(torch.relu(self.shared(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def test_estimate_refuses_a_layer_run_twice_before_gathering_statistics():
    torch.manual_seed(0)
    model = _Tied().eval()
    iba = LayerIBA(model, model.shared)
    calls = []
    model.stem.register_forward_hook(lambda *args: calls.append(1))
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    with pytest.raises(ValueError, match=r"`layer` ran 2 times in one forward pass"):
        iba.estimate(batches)
    assert len(calls) == 1  # refused on the first batch, not after spending the samples
    assert iba.mean is None


def test_estimate_of_a_layer_run_once_matches_the_definition():
    torch.manual_seed(0)
    model = _Tied().eval()
    iba = LayerIBA(model, model.stem)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    iba.estimate(batches)
    with torch.no_grad():
        acts = torch.cat([model.stem(b) for b in batches]).double()
    torch.testing.assert_close(iba.mean.double(), acts.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(iba.std.double(), acts.std(0), rtol=1e-5, atol=1e-6)
