"""The caller's random streams: seeded helpers leave them as they were.

``torch.manual_seed`` seeds every CUDA device too (lazily, when CUDA is not initialised yet),
and ``fork_rng(devices=[])`` only gives the CPU state back: seeding a model's initialisation
that way reset a CUDA user's random stream for good (model_randomisation, NetworkInversion,
TIE, the introspective head, the bundled generator, the oracles). The package seeds only the
generators it forks now; without a GPU the CUDA side is checked by recording the calls that
would reach it.
"""

from __future__ import annotations

import pytest
import torch

from captum_ext._utils.seeding import seed_generators, seeded_rng
from captum_ext.attr import GradCAM
from captum_ext.introspection import IntrospectiveNetwork
from captum_ext.inversion import NetworkInversion
from captum_ext.metrics import model_randomisation
from captum_ext.testing import dominant_colour_oracle, interaction_oracle, null_region_oracle


def _no_cuda_seeding(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    return calls


CALLS = {
    "model_randomisation": lambda model, x: model_randomisation(
        lambda m: GradCAM(m, "features.7"), model, x, target=0, layers=["classifier"]
    ),
    "NetworkInversion": lambda model, x: NetworkInversion(model, batch_size=2, seed=0),
    "IntrospectiveNetwork.fit": lambda model, x: IntrospectiveNetwork(
        model, layer="classifier", hidden_width=4
    ).fit(x, torch.arange(len(x)) % 10, epochs=1, batch_size=4, progress=False, seed=0),
    "dominant_colour_oracle": lambda model, x: dominant_colour_oracle(seed=3),
    "null_region_oracle": lambda model, x: null_region_oracle(seed=3),
    "interaction_oracle": lambda model, x: interaction_oracle(),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_seeded_calls_leave_the_callers_streams(name, monkeypatch, bundled_model, sample_digits):
    cuda_calls = _no_cuda_seeding(monkeypatch)
    x = sample_digits[0][:4]
    torch.random.default_generator.manual_seed(123)
    expected = torch.rand(3)
    torch.random.default_generator.manual_seed(123)
    CALLS[name](bundled_model, x)
    assert torch.equal(torch.rand(3), expected)  # the CPU stream goes on where it was
    assert cuda_calls == []  # and no CUDA device was seeded


def test_seeded_rng_seeds_the_cpu_and_gives_the_state_back():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    with seeded_rng(11, cuda_devices=()):
        inside = torch.rand(4)
    assert torch.equal(torch.random.get_rng_state(), before)
    seed_generators(11)
    assert torch.equal(torch.rand(4), inside)
