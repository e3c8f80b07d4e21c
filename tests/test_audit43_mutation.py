"""Public attributes assigned after construction: the next call behaves as an object built
with the new value, or refuses it with an error naming the attribute (never a silently
different result). Also the compact repr of PathwayGradientResult."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from captum_ext.attr import (
    VOICE,
    ActivationMatchingMask,
    ContrastCAM,
    Contrastive,
    FinerCAM,
    LayerIBA,
    PathwayGradient,
)
from captum_ext.bundled import load_bundled_model
from captum_ext.circuits import CircuitReadout
from captum_ext.data import load_sample_digits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_bundled_model().eval()


@pytest.fixture(scope="module")
def digits():
    return load_sample_digits()


# ---------------------------------------------------------------- FinerCAM


def test_finer_cam_comparison_positions_assigned_after_default(model, digits):
    x = digits[0][:4]
    finer = FinerCAM(model, "features.7")
    default = finer.attribute(x)
    finer.comparison_positions = [1]
    fresh = FinerCAM(model, "features.7", comparison_positions=(1,)).attribute(x)
    assert not torch.equal(fresh, default)
    assert torch.equal(finer.attribute(x), fresh)
    assert finer.comparison_positions == (1,)
    finer.comparison_positions = None  # back to the default
    assert torch.equal(finer.attribute(x), default)


def test_finer_cam_comparison_positions_assignment_is_checked(model):
    finer = FinerCAM(model, "features.7")
    with pytest.raises(TypeError, match="comparison_positions"):
        finer.comparison_positions = "12"
    with pytest.raises(ValueError, match="comparison_positions"):
        finer.comparison_positions = ()
    assert finer.comparison_positions is None  # the default, derived per model


def test_finer_cam_copies_keep_the_positions(model, digits):
    x = digits[0][:2]
    finer = FinerCAM(model, "features.7", comparison_positions=(2,))
    for other in (copy.deepcopy(finer), pickle.loads(pickle.dumps(finer))):
        assert other.comparison_positions == (2,)
        assert torch.equal(other.attribute(x), finer.attribute(x))


def test_finer_cam_shallow_copies_use_their_own_positions(model, digits):
    """Contrastive copies the method (copy.copy): the copy's score read the original's
    positions, so an assignment on either leaked into the other or was ignored."""
    x = digits[0][:4]
    finer = FinerCAM(model, "features.7")
    wrapped = Contrastive(finer)
    base = wrapped.attribute(x, contrast=1)
    wrapped.method.comparison_positions = (1,)
    one = FinerCAM(model, "features.7", comparison_positions=(1,))
    torch.testing.assert_close(
        wrapped.attribute(x, contrast=1), Contrastive(one).attribute(x, contrast=1)
    )
    wrapped.method.comparison_positions = None
    finer.comparison_positions = (1,)
    torch.testing.assert_close(wrapped.attribute(x, contrast=1), base)
    shallow = copy.copy(finer)
    shallow.comparison_positions = (2,)
    two = FinerCAM(model, "features.7", comparison_positions=(2,))
    torch.testing.assert_close(shallow.attribute(x), two.attribute(x))
    torch.testing.assert_close(finer.attribute(x), one.attribute(x))


def test_objects_pickled_with_the_former_attributes_load(model, digits):
    x = digits[0][:2]
    finer = FinerCAM(model, "features.7")
    state = {k: v for k, v in finer.__dict__.items() if k != "_comparison_positions"}
    state.update(comparison_positions=(1, 2, 3), _default_positions=True)
    old = FinerCAM.__new__(FinerCAM)
    old.__setstate__(state)
    assert old.comparison_positions is None and torch.equal(old.attribute(x), finer.attribute(x))
    explainer = ActivationMatchingMask(model, ["features.4"])
    state = {k: v for k, v in explainer.__dict__.items() if k != "_layers"}
    state["layers"] = [model.features[4]]
    old = ActivationMatchingMask.__new__(ActivationMatchingMask)
    old.__setstate__(state)
    assert old.layers == [model.features[4]] and old.layer_weights == [1.0]


# ---------------------------------------------------------------- ActivationMatchingMask


def _masks(explainer, x):
    return explainer.attribute(x, mode="per_image", steps=3, restarts=1, seed=0, progress=False)


def test_activation_matching_appended_layer_without_weight_is_refused(model, digits):
    explainer = ActivationMatchingMask(model, ["features.1", "features.4"])
    explainer.layers.append(model.features[7])
    with pytest.raises(ValueError, match=r"`layers` has 3 entries but `layer_weights` has 2"):
        _masks(explainer, digits[0][:1])
    explainer.layer_weights.append(1.0)  # both lists changed: as a fresh 3-layer explainer
    fresh = ActivationMatchingMask(model, ["features.1", "features.4", "features.7"])
    assert torch.equal(_masks(explainer, digits[0][:1]), _masks(fresh, digits[0][:1]))


def test_activation_matching_layers_assigned_as_names(model, digits):
    x = digits[0][:1]
    explainer = ActivationMatchingMask(model, ["features.1", "features.4"])
    explainer.layers = ["features.7"]
    assert explainer.layers == [model.features[7]] and explainer.layer_weights == [1.0]
    fresh = ActivationMatchingMask(model, ["features.7"])
    assert torch.equal(_masks(explainer, x), _masks(fresh, x))
    explainer.layers = {"features.4": 2.0, "features.7": 0.5}  # the dict form sets the weights
    assert explainer.layer_weights == [2.0, 0.5]
    with pytest.raises(ValueError, match="layers"):
        explainer.layers = ["features.99"]


def test_activation_matching_name_put_into_the_list_is_resolved(model, digits):
    x = digits[0][:1]
    explainer = ActivationMatchingMask(model, ["features.1", "features.4"])
    explainer.layers[1] = "features.7"
    fresh = ActivationMatchingMask(model, ["features.1", "features.7"])
    assert torch.equal(_masks(explainer, x), _masks(fresh, x))
    assert explainer.layers[1] is model.features[7]
    explainer.layer_weights[0] = -1.0
    with pytest.raises(ValueError, match="layer_weights"):
        _masks(explainer, x)


# ---------------------------------------------------------------- LayerIBA


def test_layer_iba_refuses_statistics_of_another_layer(model, digits):
    images, labels = digits
    x, y = images[:2], labels[:2]
    iba = LayerIBA(model, "features.7")
    iba.estimate(images)
    iba.layer = model.features[6]  # same (64, 7, 7) output, other statistics
    with pytest.raises(ValueError, match=r"estimated on the layer 'features.7'.*estimate"):
        iba.attribute(x, target=y, steps=2, n_noise=2, generator=0)
    iba.estimate(images)
    fresh = LayerIBA(model, "features.6")
    fresh.estimate(images)
    got = iba.attribute(x, target=y, steps=2, n_noise=2, generator=0)
    assert torch.equal(got, fresh.attribute(x, target=y, steps=2, n_noise=2, generator=0))


def test_layer_iba_set_statistics_ties_them_to_the_layer(model, digits):
    x, y = digits[0][:2], digits[1][:2]
    shape = (64, 7, 7)
    iba = LayerIBA(model, "features.7", mean=torch.zeros(shape), std=torch.ones(shape))
    iba.layer = model.features[6]
    with pytest.raises(ValueError, match="set_statistics"):
        iba.attribute(x, target=y, steps=2, n_noise=2, generator=0)
    iba.set_statistics(torch.zeros(shape), torch.ones(shape))
    assert iba.attribute(x, target=y, steps=2, n_noise=2, generator=0).shape == (2, 1, 7, 7)


# ---------------------------------------------------------------- ContrastCAM weighting


def test_contrast_cam_unknown_weighting_assigned_is_refused(model, digits):
    x = digits[0][:2]
    cam = ContrastCAM(model, "features.7")
    cam.weighting = "gradcam++"
    fresh = ContrastCAM(model, "features.7", weighting="gradcam++")
    assert torch.equal(cam.attribute(x, contrast=1), fresh.attribute(x, contrast=1))
    cam.weighting = "bogus"
    with pytest.raises(ValueError, match=r"`weighting`='bogus'.*gradcam\+\+"):
        cam.attribute(x, contrast=1)
    with pytest.raises(ValueError, match="weighting"):
        VOICE(cam).attribute(x)


# ---------------------------------------------------------------- CircuitReadout


def test_circuit_readout_top_k_assigned_as_int(model, digits):
    x = digits[0][:2]
    readout = CircuitReadout(model)
    readout.top_k = 3
    got = readout.readout(x)
    expected = CircuitReadout(model, top_k=3).readout(x)
    assert [g.number_of_nodes() for g in got] == [22, 22]
    for a, b in zip(got, expected, strict=True):
        assert dict(a.nodes(data=True)) == dict(b.nodes(data=True))
        assert sorted(a.edges(data=True)) == sorted(b.edges(data=True))
    readout.top_k = None  # the default again
    assert readout.readout(x)[0].number_of_nodes() == 130
    readout.top_k = (1, 2)
    with pytest.raises(ValueError, match="top_k"):
        readout.readout(x)


def test_circuit_readout_layers_assigned_are_refused(model, digits):
    readout = CircuitReadout(model)
    readout.layers = ("features.4", "features.7")
    with pytest.raises(ValueError, match=r"`layers` was changed after construction"):
        readout.readout(digits[0][:1])
    readout.layers = ["features.1", "features.4", "features.7"]  # the same stages: fine
    assert readout.readout(digits[0][:1])[0].number_of_nodes() == 130


# ---------------------------------------------------------------- PathwayGradientResult repr


def test_pathway_gradient_result_repr_is_compact(model, digits):
    x, y = digits[0][:2], digits[1][:2]
    result = PathwayGradient(model).attribute(x, target=y, sparsity=0.7, return_pathway=True)
    text = repr(result)
    assert text.startswith("PathwayGradientResult(")
    assert "tensor(" not in text and len(text) < 1500  # shapes and dtypes, not values
    assert "attributions=Tensor(shape=(2, 1, 28, 28), dtype=float32)" in text
    assert f"<{len(result.sites)} sites: " in text
    assert "dtype=bool" in text and "threshold=Tensor(shape=(2,), dtype=float64)" in text
    many = dict.fromkeys((f"site{i}" for i in range(50)), torch.zeros(2, 3, dtype=torch.bool))
    result.masks = many
    result.sites = tuple(many)
    text = repr(result)
    assert "<50 sites: 'site0': Tensor(shape=(2, 3), dtype=bool), 'site1'" in text
    assert "site25" not in text and "'site49'" in text


def test_layer_iba_pickled_before_the_layer_was_recorded_keeps_the_check(model, digits):
    """An object pickled by the former code has no record of the statistics' layer: they
    belong to the layer it had then, not to the one assigned after loading."""
    images, labels = digits
    iba = LayerIBA(model, "features.7")
    iba.estimate(images[:32])
    former = dict(iba.__dict__)
    del former["_statistics_layer"]  # as the former code pickled it
    old = LayerIBA.__new__(LayerIBA)
    old.__setstate__(former)
    loaded = pickle.loads(pickle.dumps(old))
    loaded.attribute(images[:2], target=labels[:2], steps=2, n_noise=2, generator=0)
    loaded.layer = loaded.forward_func.features[6]
    with pytest.raises(ValueError, match="estimated on the layer"):
        loaded.attribute(images[:2], target=labels[:2], steps=2, n_noise=2, generator=0)
