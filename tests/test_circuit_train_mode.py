"""CircuitReadout on a model left in train mode: the graphs of a model whose dropout or
stochastic depth is active are random, which a RandomMapsWarning says (once per model), as
the CAMs, VOICE and PathwayGradient do."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_ext.attr import RandomMapsWarning
from captum_ext.circuits import CircuitReadout

torch.set_num_threads(1)


class DropPath(nn.Module):
    """timm's stochastic depth (matched by class name): in train mode each example's residual
    branch is dropped with probability ``drop_prob``."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        keep = torch.empty(x.shape[0], 1, 1, 1, device=x.device).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


class ResidualCNN(nn.Module):
    """conv stem -> BN -> ReLU -> residual conv block (its branch behind ``drop_path``) ->
    global mean -> fc; ``drop_path=0`` leaves batch norm as its only train-mode behaviour."""

    def __init__(self, drop_path: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(x + self.drop_path(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


LAYERS = ["relu1", "relu2"]


def _inputs() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _random_maps_warnings(readout: CircuitReadout, x: torch.Tensor) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        readout.readout(x, target=0)
    return [str(w.message) for w in caught if issubclass(w.category, RandomMapsWarning)]


@pytest.mark.parametrize("gradient", [False, True])
def test_a_train_mode_model_with_drop_path_warns_once_per_model(gradient):
    """DropPath drops a random subset of the examples' residual branches at every forward
    pass, so the stage energies, and the graphs, differ between two calls: the readout warns,
    naming the module, once for the model."""
    model = ResidualCNN(drop_path=0.5).train()
    readout = CircuitReadout(model, layers=LAYERS, gradient=gradient)
    x = _inputs()
    first = _random_maps_warnings(readout, x)
    assert len(first) == 1
    assert first[0].startswith("CircuitReadout:") and "'drop_path'" in first[0]
    assert "graphs" in first[0]
    assert _random_maps_warnings(readout, x) == []  # once per model
    assert model.training  # the mode is left as it is


def test_the_same_model_in_eval_mode_does_not_warn():
    model = ResidualCNN(drop_path=0.5).eval()
    assert _random_maps_warnings(CircuitReadout(model, layers=LAYERS), _inputs()) == []


def test_a_train_mode_model_whose_only_train_behaviour_is_batch_norm_does_not_warn():
    """Batch norm in train mode normalises with the batch's statistics: nothing is drawn at
    random, so two calls on the same batch give the same graphs, and there is no warning."""
    model = ResidualCNN(drop_path=0.0).train()
    readout = CircuitReadout(model, layers=LAYERS)
    x = _inputs()
    assert _random_maps_warnings(readout, x) == []
    again = readout.readout(x, target=0)
    first = readout.readout(x, target=0)
    assert [sorted(g.edges(data="weight")) for g in first] == [
        sorted(g.edges(data="weight")) for g in again
    ]
