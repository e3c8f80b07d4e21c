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
from captum.attr import GuidedBackprop, LayerGradCam
from torch import nn

import captum_ext
from captum_ext._utils.hooks import InertHook, call_hook, registered_hooks
from captum_ext.attr import Contrastive, GradCAM, LayerIBA, PathwayGradient
from captum_ext.attr.voice import VOICE

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


class _CopyingModel(nn.Module):
    """``model`` behind a module (for the methods that take an ``nn.Module``): each forward
    deep-copies ``model`` and predicts with the copy, then runs ``model``
    (:func:`_copying_forward`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.copying_forward, self.twins, self.predictions = _copying_forward(model)

    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):  # traced for its structure (CircuitReadout)
            return self.model(x)
        return self.copying_forward(x)


def _live_package_hooks(module: nn.Module) -> list:
    """The forward hooks and pre-hooks of the package left on ``module`` and its submodules
    that are not inert stand-ins (Captum's own hooks, inside a Captum method, are not ours)."""
    return [
        hook
        for m in module.modules()
        for hook in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        if not isinstance(hook, InertHook)
        and str(getattr(hook, "__module__", "")).startswith("captum_ext")
    ]


def _check_twins_are_clean(twins, predictions, clean, x, *, pickles=True):
    """``pickles=False`` where a Captum method's own hook (a local closure) sits on the
    copy too: Captum registers its layer hooks as plain closures, which is not ours to
    change."""
    assert twins and len(predictions) == len(twins)
    for twin in twins:  # only inert stand-ins of the method's hooks
        assert _live_package_hooks(twin) == []
    for inputs, prediction in predictions:  # predicted during the call: the model's own
        torch.testing.assert_close(prediction, clean(inputs).detach())
    for twin in twins:
        torch.testing.assert_close(twin(x), clean(x))
        # gradients reach the first layer (a live capture hook would cut the graph there)
        twin.zero_grad(set_to_none=True)
        clean.zero_grad(set_to_none=True)
        twin(x).sum().backward()
        clean(x).sum().backward()
        for copied, original in zip(twin.parameters(), clean.parameters(), strict=True):
            assert copied.grad is not None
            torch.testing.assert_close(copied.grad, original.grad)
        if pickles:
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


def test_call_hook_with_kwargs_passes_keywords_and_is_inert_in_a_copy():
    attention = nn.MultiheadAttention(4, 1, batch_first=True).double()
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    seen, twins = [], []

    def on_attention(module, args, kwargs):
        seen.append(sorted(kwargs))
        twins.append(copy.deepcopy(module))

    with registered_hooks(call_hook(attention, on_attention, pre=True, with_kwargs=True)):
        attention(x, key=x, value=x, need_weights=False)
    assert seen == [["key", "need_weights", "value"]]
    assert not attention._forward_pre_hooks and not attention._forward_pre_hooks_with_kwargs
    twin = twins[0]
    assert [type(h) for h in twin._forward_pre_hooks.values()] == [InertHook]
    twin(x, key=x, value=x)  # the stand-in takes the keywords and does nothing
    assert len(seen) == 1


def test_pathway_gradient_copy_made_during_the_call_has_no_live_hook(tiny_cnn, tiny_inputs):
    model = tiny_cnn.eval()
    clean = copy.deepcopy(model)
    expected = PathwayGradient(copy.deepcopy(model)).attribute(tiny_inputs, target=0)
    copying = _CopyingModel(model)
    got = PathwayGradient(copying).attribute(tiny_inputs, target=0)
    torch.testing.assert_close(got, expected)
    _check_twins_are_clean(copying.twins, copying.predictions, clean, tiny_inputs)


def test_voice_guided_copy_made_during_the_call_has_no_live_hook(tiny_cnn, tiny_inputs):
    model = tiny_cnn.eval()
    clean = copy.deepcopy(model)
    expected = VOICE(GuidedBackprop(copy.deepcopy(model))).attribute(tiny_inputs, target=0)
    copying = _CopyingModel(model)
    got = VOICE(GuidedBackprop(copying)).attribute(tiny_inputs, target=0)
    torch.testing.assert_close(got.explanation, expected.explanation)
    _check_twins_are_clean(copying.twins, copying.predictions, clean, tiny_inputs)


def test_contrastive_layer_cam_copy_made_during_the_call_has_no_live_hook(tiny_cnn, tiny_inputs):
    model = tiny_cnn.eval()
    clean = copy.deepcopy(model)
    contrast = [1, 0, 3, 2]
    expected = Contrastive(LayerGradCam, model, model.features[3]).attribute(tiny_inputs, contrast)
    forward, twins, predictions = _copying_forward(model)
    got = Contrastive(LayerGradCam, forward, model.features[3]).attribute(tiny_inputs, contrast)
    torch.testing.assert_close(got, expected)
    # Captum's LayerGradCam hook is on the copies too (Captum's, not the package's)
    _check_twins_are_clean(twins, predictions, clean, tiny_inputs, pickles=False)


def test_circuit_readout_copy_made_during_the_call_has_no_live_hook(fresh_bundled_model):
    from captum_ext.circuits import CircuitReadout
    from captum_ext.data import load_sample_digits

    model = fresh_bundled_model
    x = load_sample_digits()[0][:2]
    clean = copy.deepcopy(model)
    expected = CircuitReadout(copy.deepcopy(model), top_k=3).readout(x)
    copying = _CopyingModel(model)
    got = CircuitReadout(copying, top_k=3).readout(x)
    unprefixed = [  # the copying wrapper holds the model as `model`
        sorted(
            (a.removeprefix("model."), b.removeprefix("model."), d)
            for a, b, d in g.edges(data=True)
        )
        for g in got
    ]
    assert unprefixed == [sorted(g.edges(data=True)) for g in expected]
    _check_twins_are_clean(copying.twins, copying.predictions, clean, x)


@pytest.mark.parametrize("layer", [None, "classifier"])
def test_gradtrust_copy_made_during_the_call_has_no_live_hook(tiny_cnn, tiny_inputs, layer):
    from captum_ext.metrics import gradtrust

    model = tiny_cnn.eval()
    clean = copy.deepcopy(model)
    expected = gradtrust(copy.deepcopy(model), tiny_inputs, layer=layer)
    copying = _CopyingModel(model)
    got = gradtrust(copying, tiny_inputs, layer=None if layer is None else "model." + layer)
    torch.testing.assert_close(got, expected)
    _check_twins_are_clean(copying.twins, copying.predictions, clean, tiny_inputs)


def test_activation_matching_loss_copy_made_during_the_call_has_no_live_hook(tiny_cnn, tiny_inputs):
    from captum_ext.attr import ActivationMatchingMask

    model = tiny_cnn.eval()
    clean = copy.deepcopy(model)
    layers = ["features.1", "features.3"]
    expected = ActivationMatchingMask(copy.deepcopy(model), layers)._reference(tiny_inputs)
    copying = _CopyingModel(model)
    got = ActivationMatchingMask(copying, ["model." + name for name in layers])._reference(
        tiny_inputs
    )
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.activations, expected.activations)
    _check_twins_are_clean(copying.twins, copying.predictions, clean, tiny_inputs)


@pytest.mark.parametrize("feature_layer", [None, "features.3"])
def test_inversion_features_copy_made_during_the_call_has_no_live_hook(
    tiny_cnn, tiny_inputs, feature_layer
):
    from captum_ext.inversion._features import _feature_tap

    model = tiny_cnn.eval()
    clean = copy.deepcopy(model)
    copying = _CopyingModel(model)
    name = None if feature_layer is None else "model." + feature_layer
    tap = _feature_tap(copying, name, tiny_inputs, layer_input=False)
    with tap.active():
        copying(tiny_inputs)
        features = tap.pop()
    reference = _feature_tap(model, feature_layer, tiny_inputs, layer_input=False)
    with reference.active():
        model(tiny_inputs)
        torch.testing.assert_close(features, reference.pop())
    _check_twins_are_clean(copying.twins, copying.predictions, clean, tiny_inputs)


def test_introspection_features_copy_made_during_the_call_has_no_live_hook(tiny_cnn, tiny_inputs):
    from captum_ext.introspection import IntrospectiveNetwork

    model = tiny_cnn.eval()
    clean = copy.deepcopy(model)
    x = tiny_inputs.requires_grad_(True)
    expected = IntrospectiveNetwork(copy.deepcopy(model))._differentiable_features(x)
    copying = _CopyingModel(model)
    got = IntrospectiveNetwork(copying)._differentiable_features(x)
    torch.testing.assert_close(got, expected)
    # the graph pass runs the model with its parameters swapped for frozen tensors
    # (functional_call), so the copies made there hold no parameters to differentiate:
    # their hooks and outputs are checked
    assert copying.twins
    for twin in copying.twins:
        assert _live_package_hooks(twin) == []
        torch.testing.assert_close(twin(x.detach()), clean(x.detach()))
        torch.save(twin, io.BytesIO())


def _tiny_vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(8, 4, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8)
    vit.heads = nn.Linear(8, 3)
    return vit.double().eval()


def test_token_grid_copy_made_during_the_call_has_no_live_hook():
    from captum_ext.token_grid import expose_token_grid, grid_reaches_output, layer_output_shape

    vit = _tiny_vit()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layer = "encoder.layers.encoder_layer_0.ln_1"
    wrapped = expose_token_grid(vit, layer, x)
    twins = []
    with registered_hooks(  # the user's hook: a copy of the wrapper made during its forward
        lambda: vit.heads.register_forward_hook(lambda *_: twins.append(copy.deepcopy(wrapped)))
    ):
        expected = wrapped(x)
        assert grid_reaches_output(wrapped, x) is True
        assert layer_output_shape(vit, vit.get_submodule(layer), x) == (2, 5, 8)
    assert len(twins) == 3 and all(_live_package_hooks(twin) == [] for twin in twins)
    twin = twins[0]
    through_grid = []
    with registered_hooks(
        lambda: twin.grid.register_forward_hook(lambda *_: through_grid.append(1))
    ):
        torch.testing.assert_close(twin(x), expected)
        assert through_grid == [1]  # once: the copy's own forward, not a leftover hook
        torch.testing.assert_close(twin.model(x), vit(x))
        assert through_grid == [1]  # the bare model does not pass through the grid


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
