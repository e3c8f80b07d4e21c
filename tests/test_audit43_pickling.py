"""Oracles pickle and deep-copy (their samplers are module-level callables, not closures), and
an unfitted IntrospectiveNetwork loads a fitted one's state dict."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from captum_ext.introspection import IntrospectiveNetwork
from captum_ext.testing import dominant_colour_oracle, interaction_oracle, null_region_oracle

ORACLES = {
    "colour": lambda: dominant_colour_oracle(4, colours=4, size=8, seed=2),
    "null": lambda: null_region_oracle(4, size=6, classes=3, seed=1),
    "interaction": lambda: interaction_oracle(4, size=8, patch=3, seed=3),
}


def assert_same_oracle(got, expected):
    assert got.name == expected.name
    for field in ("inputs", "target", "baselines", "ground_truth"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    for a, b in zip(got.sample(6, seed=5), expected.sample(6, seed=5)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    drawn = got.sampler(3, torch.Generator().manual_seed(9))
    for a, b in zip(drawn, expected.sampler(3, torch.Generator().manual_seed(9))):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(got.model(expected.inputs), expected.model(expected.inputs))


@pytest.mark.parametrize("which", sorted(ORACLES))
def test_oracles_pickle_and_draw_the_same_examples(which):
    oracle = ORACLES[which]()
    loaded = pickle.loads(pickle.dumps(oracle))
    assert_same_oracle(loaded, oracle)
    # torch.save (a spawn worker's or a checkpoint's route) too
    buffer = io.BytesIO()
    torch.save(oracle, buffer)
    buffer.seek(0)
    assert_same_oracle(torch.load(buffer, weights_only=False), oracle)


@pytest.mark.parametrize("which", sorted(ORACLES))
def test_a_deep_copy_draws_the_same_examples(which):
    oracle = ORACLES[which]()
    assert_same_oracle(copy.deepcopy(oracle), oracle)


@pytest.mark.parametrize("which", ["colour", "null"])
def test_a_deep_copys_sampler_uses_the_copys_model(which):
    oracle = ORACLES[which]()
    before = oracle.sample(6, seed=1)
    duplicate = copy.deepcopy(oracle)
    with torch.no_grad():  # the copy now predicts the least likely class
        duplicate.model.head.weight.neg_()
        duplicate.model.head.bias.neg_()
    images, target, _ = duplicate.sample(6, seed=1)
    with torch.no_grad():
        assert torch.equal(target, duplicate.model(images).argmax(dim=1))
        assert not torch.equal(target, oracle.model(images).argmax(dim=1))
    for a, b in zip(oracle.sample(6, seed=1), before):  # the original is untouched
        assert torch.equal(a, b)
    pickled = pickle.loads(pickle.dumps(duplicate))  # the tie survives pickling
    assert torch.equal(pickled.sample(6, seed=1)[1], target)


@pytest.fixture(scope="module")
def fitted(bundled_model, bundled_digits):
    images, labels = bundled_digits
    network = IntrospectiveNetwork(bundled_model, hidden_width=8)
    return network.fit(images[:20], labels[:20], epochs=1, batch_size=10, progress=False)


def checkpoint(state):
    """``state`` through torch.save and torch.load(weights_only=True), the usual idiom."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_loads_into_an_unfitted_network(fitted, bundled_model, bundled_digits):
    images, _ = bundled_digits
    state = checkpoint(fitted.state_dict())
    fresh = IntrospectiveNetwork(bundled_model, hidden_width=8)
    rng = torch.get_rng_state()
    result = fresh.load_state_dict(state)
    assert torch.equal(torch.get_rng_state(), rng)  # the head's init drew nothing
    assert not result.missing_keys and not result.unexpected_keys
    assert str(fresh.head) == str(fitted.head) and not fresh.head.training
    for (name, got), (_, expected) in zip(
        fresh.head.state_dict().items(), fitted.head.state_dict().items()
    ):
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
    assert torch.equal(fresh.predict_proba(images), fitted.predict_proba(images))
    assert torch.equal(fresh.predict(images), fitted.predict(images))


def test_state_dict_loads_into_an_unfitted_network_inside_a_parent(
    fitted, bundled_model, bundled_digits
):
    images, _ = bundled_digits
    parent = nn.ModuleDict({"net": IntrospectiveNetwork(bundled_model, hidden_width=8)})
    parent.load_state_dict(checkpoint(nn.ModuleDict({"net": fitted}).state_dict()))
    assert torch.equal(parent["net"].predict_proba(images), fitted.predict_proba(images))


def test_an_unfitted_network_refuses_a_state_it_cannot_hold_and_stays_unfitted(
    fitted, bundled_model
):
    state = checkpoint(fitted.state_dict())
    wide = IntrospectiveNetwork(bundled_model, hidden_width=32)
    with pytest.raises(RuntimeError, match=r"`hidden_width`=32, but .* 8 wide"):
        wide.load_state_dict(state)
    assert wide.head is None
    custom = {"head.weight": torch.zeros(10, 100), "head.bias": torch.zeros(10)}
    network = IntrospectiveNetwork(bundled_model, hidden_width=8)
    with pytest.raises(RuntimeError, match=r"not fitted.*IntrospectiveNetwork\.save\(\)"):
        network.load_state_dict(custom)
    assert network.head is None
    # strict=True still refuses a genuinely unexpected key, and leaves the network unfitted
    with pytest.raises(RuntimeError, match='Unexpected key.*"extra"'):
        network.load_state_dict({**state, "extra": torch.zeros(1)})
    assert network.head is None
    result = network.load_state_dict({**state, "extra": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["extra"] and network.head is not None


def test_strict_false_returns_a_custom_heads_keys_as_unexpected(bundled_model):
    """torch passes strict=True to every _load_from_state_dict: the explanation of a custom
    head's keys must not turn a strict=False load into an error."""
    custom = {
        "head.0.weight": torch.zeros(8, 100),
        "head.0.bias": torch.zeros(8),
        "head.2.weight": torch.zeros(10, 8),
        "head.2.bias": torch.zeros(10),
    }
    network = IntrospectiveNetwork(bundled_model, hidden_width=8)
    result = network.load_state_dict(custom, strict=False)
    assert sorted(result.unexpected_keys) == sorted(custom) and not result.missing_keys
    assert network.head is None
    with pytest.raises(RuntimeError, match=r"not fitted.*IntrospectiveNetwork\.save\(\)"):
        network.load_state_dict(custom)
    assert network.head is None
