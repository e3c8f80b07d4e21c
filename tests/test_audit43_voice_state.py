"""VOICE follows its `method` at each call (a replaced method, a CAM's changed layer or
output_transform) and pickles around gradient methods (Saliency, GuidedBackprop, SmoothGrad)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from captum.attr import GuidedBackprop, NoiseTunnel, Saliency

from captum_ext.attr import VOICE, CounterfactualCAM, GradCAM
from captum_ext.bundled import load_bundled_model
from captum_ext.data import load_sample_digits

FIELDS = ("explanation", "contrast", "uncertainty", "iou", "snr", "log_likelihood")
FIELDS += ("prediction", "target", "contrast_class", "n_contrasts")


@pytest.fixture(scope="module")
def setup():
    model = load_bundled_model()
    other = load_bundled_model()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(-1.0)  # a clearly different model
    images, _ = load_sample_digits()
    return model, other, images[::8][:3]  # three digits of different classes


def _equal(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def _close(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        torch.testing.assert_close(x, y, equal_nan=True, msg=f"VOICEResult.{f} differs")


def test_replaced_method_is_the_one_explained(setup):
    model, other, x = setup
    voice = VOICE(GradCAM(model, "features.7"))
    old = voice.attribute(x, contrasts=3)
    voice.method = GradCAM(other, "features.7")
    new = voice.attribute(x, contrasts=3)
    _close(new, VOICE(GradCAM(other, "features.7")).attribute(x, contrasts=3))
    assert not _equal(new, old)
    assert voice.forward_func is other


def test_changed_cam_layer_is_the_one_explained(setup):
    model, _, x = setup
    cam = GradCAM(model, "features.7")
    voice = VOICE(cam, postprocess="raw")
    assert voice.attribute(x, contrasts=3).explanation.shape[-1] == 7
    cam.layer = model.features[4]
    changed = voice.attribute(x, contrasts=3)
    assert changed.explanation.shape[-1] == 14  # the 14 x 14 maps of features.4
    _close(
        changed, VOICE(GradCAM(model, "features.4"), postprocess="raw").attribute(x, contrasts=3)
    )
    assert voice.plan.layer is model.features[4]


def test_changed_output_transform_of_the_method_is_used(setup):
    model, _, x = setup
    cam = GradCAM(model, "features.7")
    voice = VOICE(cam)
    cam.output_transform = flip  # the classes in reverse order
    changed = voice.attribute(x, contrasts=3)
    fresh = VOICE(GradCAM(model, "features.7", output_transform=flip)).attribute(x, contrasts=3)
    _close(changed, fresh)
    assert torch.equal(changed.prediction, model(x).argmax(1).sub(9).neg())


def test_replaced_noise_tunnel_attribution_method_is_used(setup):
    model, other, x = setup
    tunnel = NoiseTunnel(Saliency(model))
    voice = VOICE(tunnel)
    tunnel.attribution_method = Saliency(other)
    kwargs = dict(contrasts=3, nt_samples=2, generator=0)
    _close(voice.attribute(x, **kwargs), VOICE(NoiseTunnel(Saliency(other))).attribute(x, **kwargs))


def test_method_replaced_by_one_voice_cannot_take_names_method(setup):
    model, _, x = setup
    voice = VOICE(GradCAM(model, "features.7"))
    voice.method = model
    with pytest.raises(TypeError, match="`method`"):
        voice.attribute(x)
    voice.method = CounterfactualCAM(model, "features.7")
    with pytest.raises(TypeError, match="`method`"):
        voice.attribute(x)
    with pytest.raises(TypeError, match="`method`"):  # still refused at construction
        VOICE(CounterfactualCAM(model, "features.7"))


def test_output_transform_given_to_voice_and_a_changed_method_clash(setup):
    model, _, x = setup
    cam = GradCAM(model, "features.7")
    voice = VOICE(cam, output_transform=flip)
    assert voice.output_transform is flip
    cam.output_transform = torch.neg
    with pytest.raises(ValueError, match="`output_transform`"):
        voice.attribute(x)


def flip(out):
    return out.flip(1)


def _roundtrips(voice):
    yield pickle.loads(pickle.dumps(voice))
    yield copy.deepcopy(voice)
    buffer = io.BytesIO()
    torch.save(voice, buffer)
    buffer.seek(0)
    yield torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "make",
    [Saliency, GuidedBackprop, lambda model: NoiseTunnel(Saliency(model))],
    ids=["Saliency", "GuidedBackprop", "NoiseTunnel(Saliency)"],
)
def test_voice_of_gradient_methods_pickles(setup, make):
    model, _, x = setup
    voice = VOICE(make(model))
    kwargs = dict(contrasts=3, nt_samples=2, generator=0)
    expected = voice.attribute(x, **kwargs)
    for copied in _roundtrips(voice):
        assert copied.forward_func is not model
        _close(copied.attribute(x, **kwargs), expected)
    pickle.dumps(voice.plan)  # the plan itself holds no local function


def test_state_pickled_with_copies_of_the_plan_still_loads(setup):
    model, _, x = setup
    voice = VOICE(GradCAM(model, "features.7"))
    old = {
        "method": voice.method,
        "plan": voice.plan,
        "postprocess": "reference",
        "forward_func": model,
        "output_transform": None,
    }
    restored = VOICE.__new__(VOICE)
    restored.__setstate__(old)
    _close(restored.attribute(x, contrasts=3), voice.attribute(x, contrasts=3))
