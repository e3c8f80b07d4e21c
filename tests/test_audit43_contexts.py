"""Models whose forward pass runs in a context that changes what the methods see: input
gradients that are exactly zero (a forward that rounds its input, or runs its backbone under
``torch.no_grad()``), activation checkpointing, and torch's default dtype.

Before: VOICE with a gradient technique returned all-zero maps and IoU 1.0 ("untrustworthy")
without a word; LayerIBA through ``torch.utils.checkpoint(use_reentrant=False)`` failed with
torch's "Recomputed values ... have different metadata"; ``odin`` on a linear probe said only
that "the differentiated Tensor ... appears to not have been used in the graph";
``bundled_generator()`` under ``set_default_dtype(torch.float64)`` gave a float64 generator
with other initial weights for the same seed.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from captum.attr import GuidedBackprop, NoiseTunnel, Saliency
from torch import nn
from torch.utils.checkpoint import checkpoint

from captum_ext.attr import VOICE, GradCAM, LayerIBA
from captum_ext.bundled import bundled_generator
from captum_ext.metrics import odin

pytestmark = pytest.mark.usefixtures("one_thread")


class _Rounded(nn.Module):
    """Quantises its input: the logits change with it, the input gradient is exactly 0."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 8) / 8)


class _Probe(nn.Module):
    """A linear probe on a frozen backbone that runs under torch.no_grad() in forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.no_grad():
            features = self.model.features(x)
        return self.model.classifier(self.model.flatten(self.model.pool(features)))


class _Checkpointed(nn.Module):
    """The bundled model with its features under non-reentrant activation checkpointing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        features = checkpoint(self.model.features, x, use_reentrant=False)
        return self.model.classifier(self.model.flatten(self.model.pool(features)))


class _HalfRounded(nn.Module):
    """Rounds its input for the first ``k`` examples only (per example: rows >= k keep it)."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = k

    def forward(self, x):
        rows = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1, 1)
        # the same values for every row, but the first k are cut off from autograd
        x = torch.where(rows < self.k, x.detach(), x)
        return self.model(x)


@pytest.fixture
def digits(sample_digits):
    return sample_digits[0][:4], sample_digits[1][:4]


def _methods(model):
    return {
        "Saliency": (Saliency(model), {}),
        "GuidedBackprop": (GuidedBackprop(model), {}),
        "SmoothGrad": (NoiseTunnel(Saliency(model)), {"generator": 0, "nt_samples": 2}),
    }


@pytest.mark.parametrize("wrapper", [_Rounded, _Probe], ids=["rounded", "probe"])
@pytest.mark.parametrize("name", ["Saliency", "GuidedBackprop", "SmoothGrad"])
def test_voice_gradient_methods_warn_of_zero_input_gradients(
    fresh_bundled_model, digits, wrapper, name
):
    x, _ = digits
    model = wrapper(fresh_bundled_model).eval()
    method, options = _methods(model)[name]
    with pytest.warns(UserWarning, match="input gradients of every class are exactly zero") as w:
        result = VOICE(method).attribute(x, **options)
    message = next(str(i.message) for i in w if "exactly zero" in str(i.message))
    assert "for every input" in message
    assert "IoU reads 1.0 only because both masks are empty" in message
    assert "torch.no_grad()" in message
    # the documented read-out stays: voice_iou gives two empty masks 1 (never NaN)
    assert float(result.explanation.abs().sum()) == 0.0
    assert float(result.uncertainty.abs().sum()) == 0.0
    assert result.iou.tolist() == [1.0] * 4


def test_voice_names_only_the_examples_without_input_gradient(fresh_bundled_model, digits):
    x, _ = digits
    model = _HalfRounded(fresh_bundled_model, k=1).eval()
    with pytest.warns(UserWarning, match=r"for 1 of the 4 examples \(rows 0\)"):
        result = VOICE(Saliency(model)).attribute(x)
    assert result.iou[0] == 1.0
    assert bool((result.explanation[1:].flatten(1).abs().sum(1) > 0).all())


def test_voice_gradient_methods_do_not_warn_on_a_plain_model(bundled_model, digits):
    x, _ = digits
    for method, options in _methods(bundled_model).values():
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*exactly zero.*")
            VOICE(method).attribute(x, **options)


def test_voice_cam_on_a_rounding_model_does_not_warn(fresh_bundled_model, digits):
    """The layer's gradients exist: a CAM explains the rounding model."""
    x, _ = digits
    model = _Rounded(fresh_bundled_model).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*exactly zero.*")
        result = VOICE(GradCAM(model, "model.features.7")).attribute(x)
    assert float(result.explanation.abs().sum()) > 0


def test_layer_iba_names_activation_checkpointing(fresh_bundled_model, digits):
    x, y = digits
    model = _Checkpointed(fresh_bundled_model).eval()
    iba = LayerIBA(model, "model.features.6")
    iba.estimate(x)
    with pytest.raises(RuntimeError, match="ran again during the backward pass.*checkpoint"):
        iba.attribute(x, target=y, steps=3, generator=0)
    # the model is left as it was: no hook remains, and the plain forward still works
    assert not model.model.features[6]._forward_hooks
    torch.testing.assert_close(model(x), fresh_bundled_model(x))


def test_layer_iba_after_the_checkpointed_segment_equals_the_plain_model(
    fresh_bundled_model, digits
):
    """A layer the backward pass does not recompute is explained as on the plain model."""
    x, y = digits
    plain = copy.deepcopy(fresh_bundled_model)
    model = _Checkpointed(fresh_bundled_model).eval()
    maps = []
    for net, layer in ((model, "model.pool"), (plain, "pool")):
        iba = LayerIBA(net, layer)
        iba.estimate(x)
        maps.append(iba.attribute(x, target=y, steps=3, sigma=None, generator=0))
    torch.testing.assert_close(maps[0], maps[1])
    assert float(maps[0].sum()) > 0


def test_odin_says_the_output_does_not_depend_on_the_input(fresh_bundled_model, digits):
    x, _ = digits
    with pytest.raises(ValueError, match="reaches its output through autograd"):
        odin(_Probe(fresh_bundled_model).eval(), x)


def test_odin_warns_when_the_input_gradient_is_zero(fresh_bundled_model, digits):
    x, _ = digits
    model = _Rounded(fresh_bundled_model).eval()
    with pytest.warns(UserWarning, match="exactly zero for every example"):
        scores = odin(model, x)
    with torch.no_grad():
        expected = torch.softmax(model(x) / 100.0, 1).amax(1)
    torch.testing.assert_close(scores, expected)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*exactly zero.*")
        odin(model, x, epsilon=0.0)  # no perturbation asked for: nothing to warn of


def test_odin_leaves_an_unused_float_input_as_it_is(fresh_bundled_model, digits):
    """A float input the output does not depend on through autograd (a mask compared with a
    threshold) has a zero gradient: the image is perturbed, the mask kept."""
    x, _ = digits

    class Masked(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, image, mask):
            return self.model(image * (mask > 0.5))

    model = Masked(fresh_bundled_model).eval()
    mask = torch.ones_like(x)
    torch.testing.assert_close(odin(model, (x, mask)), odin(fresh_bundled_model, x))


def test_bundled_generator_is_float32_whatever_the_default_dtype():
    expected = bundled_generator(3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = bundled_generator(3)
        assert torch.get_default_dtype() == torch.float64  # left as the caller set it
    finally:
        torch.set_default_dtype(previous)
    state, expected_state = got.state_dict(), expected.state_dict()
    assert state.keys() == expected_state.keys()
    for key, value in state.items():
        assert value.dtype == expected_state[key].dtype, key
        torch.testing.assert_close(value, expected_state[key], rtol=0, atol=0, msg=key)
