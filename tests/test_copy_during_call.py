"""A copy of the model made while a method explains it (``copy.deepcopy(model)`` or
``torch.save(model)`` from another thread, or from inside the call) carries none of the
method's live hooks: its outputs and gradients are the model's own, it stores nothing into
the call, and it pickles. The copy is made from inside ``forward_func`` here, so the
"mid-call" moment is exact rather than a race between threads."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch

import captum_ext
from captum_ext.attr import GradCAM, LayerIBA

LAYER = "features.3"


def _copying_forward(model):
    """A forward_func that, on each call, deep-copies the model and predicts with the copy
    (while the method's hooks sit on ``model``), then runs ``model`` itself."""
    twins, predictions = [], []

    def forward(x):
        twin = copy.deepcopy(model)
        twins.append(twin)
        predictions.append((x.detach(), twin(x).detach()))
        return model(x)

    return forward, twins, predictions


def _check_twins_are_clean(twins, predictions, clean, x):
    assert twins and len(predictions) == len(twins)
    for inputs, prediction in predictions:  # predicted during the call: the model's own
        torch.testing.assert_close(prediction, clean(inputs).detach())
    for twin in twins:
        torch.testing.assert_close(twin(x), clean(x))
        # gradients reach the first layer (a live capture hook would cut the graph there)
        twin.zero_grad(set_to_none=True)
        clean.zero_grad(set_to_none=True)
        twin(x).sum().backward()
        clean(x).sum().backward()
        assert twin.features[0].weight.grad is not None
        torch.testing.assert_close(twin.features[0].weight.grad, clean.features[0].weight.grad)
        torch.save(twin, io.BytesIO())  # no local closure left on it


def test_gradcam_copy_made_during_the_call_has_no_live_hook(tiny_cnn, tiny_inputs):
    model = tiny_cnn.eval()
    clean = copy.deepcopy(model)
    expected = GradCAM(model, LAYER).attribute(tiny_inputs, target=0)
    forward, twins, predictions = _copying_forward(model)
    maps = GradCAM(forward, model.features[3]).attribute(tiny_inputs, target=0)
    torch.testing.assert_close(maps, expected)  # the copy's forward stored nothing in the call
    _check_twins_are_clean(twins, predictions, clean, tiny_inputs)
    torch.testing.assert_close(GradCAM(twins[0], LAYER).attribute(tiny_inputs, target=0), expected)


def test_layer_iba_copy_made_during_the_call_has_no_live_hook(tiny_cnn, tiny_inputs):
    model = tiny_cnn.eval()
    clean = copy.deepcopy(model)
    statistics = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    reference = LayerIBA(model, LAYER)
    reference.estimate(statistics.double())
    expected = reference.attribute(tiny_inputs, target=0, steps=3, generator=0)

    forward, twins, predictions = _copying_forward(model)
    iba = LayerIBA(forward, model.features[3])
    iba.estimate(statistics.double())  # its hook stops the forward pass at the layer
    maps = iba.attribute(tiny_inputs, target=0, steps=3, generator=0)  # clean pass, bottleneck
    torch.testing.assert_close(maps, expected)
    _check_twins_are_clean(twins, predictions, clean, tiny_inputs)


def test_model_lock_holds_off_calls_and_yields_the_model(tiny_cnn, tiny_inputs):
    model = tiny_cnn.eval()
    done = threading.Event()

    def explain():
        GradCAM(model, LAYER).attribute(tiny_inputs, target=0)
        done.set()

    with captum_ext.model_lock(model) as locked:
        assert locked is model
        thread = threading.Thread(target=explain)
        thread.start()
        assert not done.wait(0.5)  # the call waits for the block
        twin = copy.deepcopy(model)
        GradCAM(model, LAYER).attribute(tiny_inputs, target=0)  # re-entrant on this thread
    thread.join()
    assert done.is_set()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.modules())


def test_model_lock_names_its_argument():
    with pytest.raises(TypeError, match="`model`"), captum_ext.model_lock(lambda x: x):
        pass
