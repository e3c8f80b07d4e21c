"""A model in train mode behind a plain-function ``forward_func`` (``lambda x: model(x)``):
no method can name it, so ``preserved_state`` alone cannot put its BatchNorm statistics
back. The CAMs, masks and LayerIBA already restored the buffers of every module that ran;
the metrics, the trust baselines, GradTrust at a layer, Contrastive, VOICE's smoothing and
PathwayGradient left them changed (``num_batches_tracked`` 0 -> 1 or 2), also when the
model raised midway."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Saliency
from torch import nn

from captum_ext.attr import VOICE, Contrastive, PathwayGradient
from captum_ext.metrics import (
    deletion,
    energy,
    gradnorm,
    gradtrust,
    masking_score,
    odin,
    road,
    softmax_confidence,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class _Interrupt(nn.Module):
    """Raises KeyboardInterrupt at its ``at``-th call (never when ``at`` is None)."""

    def __init__(self):
        super().__init__()
        self.at, self.calls = None, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return x


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            _Interrupt(),
            nn.Linear(4, 5),
        )
        .double()
        .train()
    )


X = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
MAPS = torch.rand(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

CALLS = {
    "deletion": lambda f, m: deletion(f, X, MAPS, target=0, n_steps=4),
    "road": lambda f, m: road(f, X, MAPS, target=0, percentages=(0.5,)),
    "masking_score": lambda f, m: masking_score(f, X, MAPS, target=0),
    "softmax_confidence": lambda f, m: softmax_confidence(f, X),
    "energy": lambda f, m: energy(f, X),
    "odin": lambda f, m: odin(f, X),
    "gradnorm at a layer": lambda f, m: gradnorm(f, X, layer=m[6]),
    "gradtrust at a layer": lambda f, m: gradtrust(f, X, layer=m[6]),
    "Contrastive(Saliency)": lambda f, m: Contrastive(Saliency, f).attribute(X, contrast=1),
    "VOICE(Saliency), smoothed": lambda f, m: VOICE(Saliency(f)).attribute(
        X, target=0, nt_samples=2, stdevs=0.1
    ),
    "PathwayGradient": lambda f, m: PathwayGradient(f).attribute(
        X, target=0, n_steps=3, layers=[m[0]]
    ),
}


@pytest.mark.parametrize("interrupted", [False, True], ids=["returns", "interrupted"])
@pytest.mark.parametrize("name", list(CALLS))
def test_batchnorm_statistics_of_a_hidden_model_come_back(name, interrupted):
    model = _model()

    def forward(x):
        return model(x)

    buffers = {key: value.clone() for key, value in model.state_dict().items()}
    model[5].at = 1 if interrupted else None
    try:
        CALLS[name](forward, model)
    except KeyboardInterrupt:
        assert interrupted
    else:
        assert not interrupted
    assert model[5].calls >= 1  # the model ran
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert all(module.training for module in model.modules())


def test_a_compiled_model_behind_a_function_gets_no_warning_about_our_hook():
    import warnings

    model = _model().eval()
    compiled = torch.compile(model, backend="eager")
    compiled(X)  # compiled outside any method
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        softmax_confidence(lambda x: compiled(x), X)
    assert not [w for w in caught if "global hooks" in str(w.message)]
