"""Arguments of the fits refused by name, not by torch deep inside a training step nor by a
silently wrong result: IntrospectiveNetwork's head and labels, ActivationMatchingMask's
baseline and flags, NetworkInversion after the model moved to float64."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from torch import nn

from captum_ext.attr import ActivationMatchingMask
from captum_ext.introspection import IntrospectiveNetwork, make_head
from captum_ext.inversion import ConditionedGenerator, NetworkInversion

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# IntrospectiveNetwork: the given head and the labels


def _toy(n: int = 24):
    """A random stage-1 MLP with 3 classes on 2-D points and its own predictions."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    points = torch.randn(n, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        labels = model(points).argmax(1)
    return model, points, labels


def _feature_size(model, points) -> int:
    return IntrospectiveNetwork(model).features(points[:1]).shape[1]


@pytest.mark.parametrize(
    "sizes, numbers",
    [
        (lambda f: (f, 2), ("2", "3")),  # too few outputs: fitted and predicted 2 classes
        (lambda f: (f, 5), ("5", "3")),  # too many outputs: fitted and predicted 5 classes
        (lambda f: (7, 3), ("7",)),  # wrong input size: torch's "mat1 and mat2" error
    ],
    ids=["fewer_outputs", "more_outputs", "in_features"],
)
def test_a_head_that_does_not_fit_the_model_is_refused_by_name(sizes, numbers):
    model, points, labels = _toy()
    before = model_snapshot(model)
    size = _feature_size(model, points)
    in_features, outputs = sizes(size)
    head = make_head(in_features, outputs, hidden_width=8)
    head_before = copy.deepcopy(head.state_dict())
    network = IntrospectiveNetwork(model, head=head)
    with pytest.raises(ValueError, match="`head`") as raised:
        network.fit(points, labels, epochs=1, progress=False)
    message = str(raised.value)
    for number in (*numbers, str(size) if in_features != size else "3"):
        assert number in message, message
    assert network.head is head  # left as it was
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, head_before[key], rtol=0, atol=0)
    assert_model_unchanged(model, before)


def test_a_custom_head_with_the_wrong_number_of_outputs_is_refused():
    """Not an nn.Sequential starting with a Linear: found by running the head once."""
    model, points, labels = _toy()
    size = _feature_size(model, points)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(size, 4)

        def forward(self, features):
            return self.inner(features)

    with pytest.raises(ValueError, match=r"`head` gives 4 outputs.*3 classes"):
        IntrospectiveNetwork(model, head=Head()).fit(points, labels, epochs=1, progress=False)


def test_a_correct_head_and_numpy_integer_labels_still_fit():
    model, points, labels = _toy()
    size = _feature_size(model, points)

    def head():
        torch.manual_seed(5)
        return make_head(size, 3, hidden_width=8)

    given = head()
    network = IntrospectiveNetwork(model, head=given)
    network.fit(points, labels.numpy().astype(np.int64), epochs=1, progress=False)
    assert network.head is given
    assert network.predict_proba(points[:4]).shape == (4, 3)
    # numpy labels are read as they are: the same head as with the tensor
    reference = IntrospectiveNetwork(model, head=head()).fit(
        points, labels, epochs=1, progress=False
    )
    for key, value in reference.head.state_dict().items():
        torch.testing.assert_close(given.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make_labels",
    [
        lambda y: y.float() + 0.7,  # 3.7 was truncated to class 3
        lambda y: y.double(),  # floats, even whole ones, are not class indices
        lambda y: y.numpy() + 0.5,  # a numpy float array
        lambda y: [float(v) + 0.2 for v in y],  # a list of floats
        lambda y: y > 0,  # booleans
    ],
    ids=["float_tensor", "whole_float64", "numpy_float", "float_list", "bool"],
)
def test_labels_that_are_not_integer_class_indices_are_refused(make_labels):
    model, points, labels = _toy()
    network = IntrospectiveNetwork(model, hidden_width=8)
    with pytest.raises(TypeError, match="`labels` must hold integer class indices"):
        network.fit(points, make_labels(labels), epochs=1, progress=False)
    assert network.head is None


def test_float_labels_from_a_loader_are_refused():
    model, points, labels = _toy()
    loader = [(points[:12], labels[:12].float() + 0.7), (points[12:], labels[12:].float())]
    with pytest.raises(TypeError, match="`labels`"):
        IntrospectiveNetwork(model, hidden_width=8).fit(loader, epochs=1, progress=False)


@pytest.mark.parametrize("bad", [-1, 3])
def test_out_of_range_labels_are_refused(bad):
    model, points, labels = _toy()
    labels = labels.clone()
    labels[0] = bad
    with pytest.raises(ValueError, match=r"`labels` must be class indices in \[0, 2\]"):
        IntrospectiveNetwork(model, hidden_width=8).fit(points, labels, epochs=1, progress=False)


# ---------------------------------------------------------------------------------------------
# ActivationMatchingMask: baseline, flags, sufficiency_samples=0

TINY_LAYERS = ["features.1", "features.3", "head"]


def _tiny_images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize(
    "baseline",
    [
        float("nan"),
        float("inf"),
        -math.inf,
        torch.tensor([float("nan"), 0.0, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1),
        torch.full((1, 3, 1, 1), float("inf"), dtype=torch.float64),
    ],
    ids=["nan", "inf", "-inf", "tensor_nan", "tensor_inf"],
)
def test_a_non_finite_baseline_is_refused_by_name(baseline):
    with pytest.raises(ValueError, match="`baseline`.*finite"):
        ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS, baseline=baseline)


def test_a_non_finite_baseline_set_afterwards_is_refused_before_the_fit():
    explainer = ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS)
    explainer.baseline = float("nan")
    with pytest.raises(ValueError, match="`baseline`"):
        explainer.attribute(_tiny_images(), mode="per_image", steps=1, progress=False)


@pytest.mark.parametrize("flag", ["broadcast", "return_details", "progress"])
@pytest.mark.parametrize("value", ["x", "False", 1, None])
def test_attribute_flags_must_be_bools(flag, value):
    explainer = ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS)
    options = {"mode": "per_image", "steps": 1, "progress": False, flag: value}
    with pytest.raises(TypeError, match=f"`{flag}` must be True or False"):
        explainer.attribute(_tiny_images(), **options)


@pytest.mark.parametrize("flag", ["progress", "resume"])
def test_fit_flags_must_be_bools(flag):
    from torch.utils.data import TensorDataset

    explainer = ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS)
    options = {"progress": False, flag: "no"}
    with pytest.raises(TypeError, match=f"`{flag}` must be True or False"):
        explainer.fit(TensorDataset(_tiny_images(4)), **options)
    assert explainer.mask_net is None


def test_valid_baseline_and_broadcast_still_work():
    model = make_tiny_cnn()
    before = model_snapshot(model)
    x = _tiny_images()
    baseline = torch.full((1, 3, 1, 1), -0.3, dtype=torch.float64)
    explainer = ActivationMatchingMask(model, TINY_LAYERS, baseline=baseline)
    mask = explainer.attribute(x, mode="per_image", steps=2, progress=False, broadcast=True)
    assert mask.shape == x.shape
    details = explainer.attribute(
        x, mode="per_image", steps=2, progress=False, return_details=np.bool_(True)
    )
    assert bool(torch.isfinite(details.explanation).all())
    assert bool(torch.isfinite(details.sufficiency).all())
    assert_model_unchanged(model, before)


def test_zero_sufficiency_samples_skips_the_read_out_and_says_so():
    """0 is kept as "skip the sufficiency read-out" (NaN): documented in the argument and in
    the result's field, the rest of the details as with samples."""
    from captum_ext.attr import ActivationMatchingResult

    x = _tiny_images()
    explainer = ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS)
    options = {"mode": "per_image", "steps": 2, "progress": False, "return_details": True}
    skipped = explainer.attribute(x, sufficiency_samples=0, **options)
    full = explainer.attribute(x, sufficiency_samples=2, **options)
    assert bool(torch.isnan(skipped.sufficiency).all())
    torch.testing.assert_close(skipped.mask, full.mask)
    assert "sufficiency_samples=0" in ActivationMatchingResult.__doc__
    assert "NaN" in ActivationMatchingMask.attribute.__doc__.split("sufficiency_samples (int")[1]


# ---------------------------------------------------------------------------------------------
# NetworkInversion: the model moved to float64 after the generator was built


SHAPE, CLASSES = (3, 8, 8), 5


def _inversion() -> tuple[NetworkInversion, nn.Module]:
    model = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES)
    torch.manual_seed(0)
    generator = ConditionedGenerator(CLASSES, SHAPE, latent_dim=8, width=8, preprocess=(0.5, 0.25))
    return NetworkInversion(model, generator, batch_size=4, seed=1), model


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_that_casts_its_input_itself_is_not_refused(dtype):
    """A low- or high-precision model behind ``x.to(dtype)`` with a float32 generator (mixed
    precision) trained before the dtype check and must still."""

    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
            self.body.to(dtype)

        def forward(self, x):
            return self.body(x.to(dtype)).float()

    torch.manual_seed(0)
    generator = ConditionedGenerator(3, (1, 8, 8), latent_dim=8, width=8)
    inversion = NetworkInversion(Casting(), generator_net=generator, batch_size=4)
    inversion.fit(2, progress=False)
    assert len(inversion.history["loss"]) == 2


def test_fit_after_model_double_names_both_dtypes():
    inversion, model = _inversion()
    inversion.fit(1, progress=False)
    model.double()
    generator_before = copy.deepcopy(inversion.generator.state_dict())
    with pytest.raises(ValueError, match=r"torch\.float64.*torch\.float32") as raised:
        inversion.fit(1, progress=False)
    assert "inversion.generator.to(torch.float64)" in str(raised.value)
    assert "input_shape" not in str(raised.value)
    for key, value in inversion.generator.state_dict().items():
        torch.testing.assert_close(value, generator_before[key], rtol=0, atol=0)
    assert len(inversion.history["step"]) == 1  # nothing recorded by the refused call


def test_model_setter_names_the_dtype_not_input_shape():
    inversion, model = _inversion()
    with pytest.raises(ValueError, match=r"`model` is in torch\.float64") as raised:
        inversion.model = copy.deepcopy(model).double()
    assert "input_shape" not in str(raised.value)
    assert inversion.model is model


def test_following_the_advice_fits_in_float64():
    """After a float32 fit, model.double() and generator.to(float64) fit on (the optimiser's
    moment estimates follow the generator's dtype)."""
    inversion, model = _inversion()
    inversion.fit(1, progress=False)
    model.double()
    inversion.generator.to(torch.float64)
    history = inversion.fit(2, progress=False)
    assert all(math.isfinite(v) for v in history["loss"])
    assert inversion.sample(torch.arange(3)).dtype == torch.float64


def test_float32_fits_are_unchanged_by_the_check():
    first, _ = _inversion()
    second, _ = _inversion()
    assert first.fit(2, progress=False)["loss"] == second.fit(2, progress=False)["loss"]
