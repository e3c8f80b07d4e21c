"""Devices without float64 (Apple's MPS): every float64 computation asks
``captum_ext._utils.precision`` which dtype the device holds.

No MPS device runs here, so the tests simulate one: ``has_float64`` is patched to say the CPU
has no float64, and a dispatch mode records every operation that produces a float64 tensor.
On the CPU that would run; on MPS each such operation raises ``TypeError`` from inside torch
(``tensor.double()`` on an MPS tensor). Before the helper, PathwayGradient's thresholds, the
fog corruption's spectrum, LayerIBA's feature statistics and ActivationMatchingMask's
best-mask bookkeeping formed float64 tensors on the input's device.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import captum_ext._utils.precision as precision
from captum_ext.attr import ActivationMatchingMask, LayerIBA, PathwayGradient
from captum_ext.data import BUNDLED_CAM_LAYER
from captum_ext.data.corruptions import corrupt
from captum_ext.introspection.features import introspective_features


class _Float64Ops(TorchDispatchMode):
    """Records the name of every operation whose output holds a float64 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(
            isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_flatten(out)[0]
        ):
            self.names.append(str(func))
        return out


@pytest.fixture
def no_float64(monkeypatch):
    """The CPU treated as a device without float64."""
    monkeypatch.setattr(precision, "has_float64", lambda device: False)


def test_devices_and_dtypes():
    assert precision.has_float64("cpu") and precision.has_float64(torch.device("cuda"))
    assert not precision.has_float64(torch.device("mps"))
    assert precision.precise_dtype("cpu") == torch.float64
    assert precision.precise_dtype("mps") == torch.float32
    half = torch.ones(3, dtype=torch.float16)
    assert precision.precise(half).dtype == torch.float64
    assert precision.float64_here_or_cpu(half).dtype == torch.float64


def test_share_counts_exactly():
    mask = torch.zeros(2**25 + 1, dtype=torch.bool)
    mask[:3] = True
    # a float32 mean of 2^25 + 1 entries would round; the count does not
    assert precision.share(mask) == 3 / (2**25 + 1)
    assert math.isnan(precision.share(torch.zeros(0, dtype=torch.bool)))


def test_float64_here_or_cpu_moves_off_a_device_without_float64(no_float64):
    values = torch.tensor([1.0, 2.0])
    moved = precision.float64_here_or_cpu(values)
    assert moved.dtype == torch.float64 and moved.device.type == "cpu"
    assert precision.precise(values).dtype == torch.float32


def _float64_ops(run) -> list[str]:
    mode = _Float64Ops()
    with mode:
        run()
    return sorted(set(mode.names))


@pytest.fixture(scope="module")
def digits(bundled_digits):
    images, labels = bundled_digits
    return images[:3], labels[:3]


def test_pathway_gradient_forms_no_float64(no_float64, bundled_model, digits):
    x, y = digits
    explainer = PathwayGradient(bundled_model)
    assert _float64_ops(lambda: explainer.attribute(x, target=y)) == []


def test_layer_iba_forms_no_float64(no_float64, bundled_model, digits):
    x, y = digits
    explainer = LayerIBA(bundled_model, BUNDLED_CAM_LAYER)
    assert _float64_ops(lambda: explainer.estimate(x)) == []
    assert _float64_ops(lambda: explainer.attribute(x, target=y, sigma=None)) == []


def test_activation_matching_fit_forms_no_float64(no_float64, bundled_model, digits):
    x, y = digits
    explainer = ActivationMatchingMask(bundled_model, ["features.1", "features.4"])
    fit = lambda: explainer.attribute(x, target=y, mode="per_image", steps=2, progress=False)  # noqa: E731
    assert _float64_ops(fit) == []


def test_introspective_features_form_no_float64(no_float64, bundled_model, digits):
    x, _ = digits
    assert _float64_ops(lambda: introspective_features(bundled_model, x)) == []


@pytest.mark.parametrize("corruption", ["fog", "gaussian_noise", "shot_noise", "elastic"])
def test_corruptions_form_no_float64(no_float64, corruption):
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    run = lambda: corrupt(images, corruption, 3, generator=generator)  # noqa: E731
    assert _float64_ops(run) == []
