"""Leave nothing behind: the model's state (hooks, flags, ``.grad``, modes), the inputs'
``requires_grad``, grad mode and default dtype after success and after every failure, and
no tensors kept alive (no reference cycles, nothing accumulating over 200 calls)."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from _interop import (
    CAM_CLASSES,
    LAYER,
    PER_EXAMPLE,
    class_keyword,
)
from captum.attr import (
    GuidedBackprop,
    IntegratedGradients,
    Saliency,
)
from torch import nn

from captum_ext.attr import (
    ContrastCAM,
    Contrastive,
    CounterfactualCAM,
    LayerGradCamPlusPlus,
)

# ------------------------------------------------------------------ 7. leave nothing behind


class Explode(nn.Module):
    """Raises in forward (optionally only when gradients are being recorded)."""

    def __init__(self, only_with_grad: bool = False) -> None:
        super().__init__()
        self.only_with_grad = only_with_grad

    def forward(self, x):
        if not self.only_with_grad or torch.is_grad_enabled():
            raise RuntimeError("boom")
        return x


def model_raising_after_the_layer(only_with_grad: bool = False):
    model = make_tiny_cnn()
    model.head.insert(0, Explode(only_with_grad))
    return model


def model_whose_layer_raises():
    model = make_tiny_cnn()
    model.features[3].bn.register_forward_hook(lambda m, a, o: Explode()(o))
    return model


def _user_hooks_and_flags(model):
    """Give the model a state a user might have: hooks, a frozen part, a .grad, train mode."""
    model.features[0].register_forward_hook(lambda m, a, o: None)
    model.classifier.register_full_backward_hook(lambda m, gi, go: None)
    model.features[1].weight.requires_grad_(False)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    model.head[3].train()  # one dropout in train mode: a "mixed" state to restore exactly
    return model


FAILURES = {
    "bad contrast": (make_tiny_cnn, {"contrast": 99}, {"target": 99}, ValueError),
    "bad contrast length": (
        make_tiny_cnn,
        {"contrast": [1, 2, 3]},
        {"target": [1, 2, 3]},
        ValueError,
    ),
    "raises after the layer": (
        model_raising_after_the_layer,
        {"contrast": 1},
        {"target": 1},
        (RuntimeError, ValueError),
    ),
    "layer raises": (
        model_whose_layer_raises,
        {"contrast": 1},
        {"target": 1},
        (RuntimeError, ValueError),
    ),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_nothing_left_behind_after_a_failure(name, failure, tiny_inputs):
    factory, contrast_kwargs, target_kwargs, error = FAILURES[failure]
    model = _user_hooks_and_flags(factory())
    method = CAM_CLASSES[name](model, LAYER)
    kwargs = contrast_kwargs if name == "contrast" else target_kwargs
    for requires_grad in (False, True):
        x = tiny_inputs.clone().requires_grad_(requires_grad)
        before = model_snapshot(model)
        with pytest.raises(error):
            method.attribute(x, **kwargs)
        assert_model_unchanged(model, before)
        assert x.requires_grad is requires_grad and x.grad is None


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_nothing_left_behind_after_non_finite_input(name, tiny_inputs):
    model = _user_hooks_and_flags(make_tiny_cnn())
    method = CAM_CLASSES[name](model, LAYER)
    x = tiny_inputs.clone()
    x[1, 0, 2, 2] = float("nan")
    x.requires_grad_(True)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="inputs"):
        method.attribute(x)
    assert_model_unchanged(model, before)
    assert x.requires_grad and x.grad is None


def test_nothing_left_behind_when_reshape_transform_raises(tiny_inputs):
    model = _user_hooks_and_flags(make_tiny_cnn())
    before = model_snapshot(model)

    def bad_transform(tensor):
        raise ValueError("cannot fold")

    with pytest.raises(ValueError, match="cannot fold"):
        ContrastCAM(model, LAYER).attribute(tiny_inputs, reshape_transform=bad_transform)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_nothing_left_behind_after_success(name, tiny_inputs):
    model = _user_hooks_and_flags(make_tiny_cnn())
    method = CAM_CLASSES[name](model, LAYER)
    for requires_grad in (False, True):
        x = tiny_inputs.clone().requires_grad_(requires_grad)
        before = model_snapshot(model)
        method.attribute(x, **{class_keyword(method): "all"})
        method.attribute(x)
        assert_model_unchanged(model, before)
        assert x.requires_grad is requires_grad and x.grad is None


@pytest.mark.parametrize(
    "build",
    [
        lambda m: Contrastive(Saliency, m),
        lambda m: Contrastive(IntegratedGradients, m),
        lambda m: Contrastive(GuidedBackprop, m),
    ],
    ids=["saliency", "integrated_gradients", "guided_backprop"],
)
def test_contrastive_leaves_inputs_and_model_alone_when_the_gradient_pass_fails(build, tiny_inputs):
    """CAPTUM_INTEROP 7: Captum's Saliency leaves requires_grad=True on the inputs after a
    failure; we do not. The model fails only while gradients are recorded (as an
    out-of-memory error in the backward-ready forward would)."""
    model = model_raising_after_the_layer(only_with_grad=True)
    method = build(model)
    x = tiny_inputs.clone()
    before = model_snapshot(model)
    with pytest.raises((RuntimeError, ValueError), match="boom"):
        method.attribute(x, contrast=PER_EXAMPLE)
    assert_model_unchanged(model, before)
    assert x.requires_grad is False and x.grad is None


def test_grad_mode_and_default_dtype_are_restored(tiny_inputs):
    model = make_tiny_cnn()
    cam = ContrastCAM(model, LAYER)
    original = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        for grad_mode in (False, True):
            with torch.set_grad_enabled(grad_mode):
                cam.attribute(tiny_inputs, contrast="all")
                with pytest.raises(ValueError):
                    cam.attribute(tiny_inputs, contrast=99)
                assert torch.is_grad_enabled() is grad_mode
                assert torch.get_default_dtype() is torch.float64
    finally:
        torch.set_default_dtype(original)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch module attributes
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _tracked_tensors() -> int:
    """Tensors the cycle collector tracks, counted WITHOUT collecting first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch module attributes
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_activations_are_freed_without_the_garbage_collector(tiny_cnn, tiny_inputs):
    """No reference cycle keeps activations (or any other tensor) alive after a call: with the
    cycle collector off, reference counting alone must free everything."""
    seen: list[weakref.ref] = []
    handle = tiny_cnn.features[3].register_forward_hook(lambda m, a, o: seen.append(weakref.ref(o)))
    cam = ContrastCAM(tiny_cnn, LAYER)

    def calls():
        for kwargs in ({"contrast": 1}, {"contrast": "all"}):
            cam.attribute(tiny_inputs, **kwargs)
        try:
            cam.attribute(tiny_inputs, contrast=99)
        except ValueError:
            pass
        else:
            raise AssertionError("contrast=99 should raise")

    try:
        calls()  # warm up
        gc.collect()
        gc.disable()
        before = _tracked_tensors()
        for _ in range(5):
            calls()
        after = _tracked_tensors()
        alive = [ref() is not None for ref in seen]
    finally:
        gc.enable()
        handle.remove()
    assert len(seen) == 18 and not any(alive)
    assert after - before <= 2, f"{after - before} tensors kept alive by reference cycles"


def test_two_hundred_calls_accumulate_nothing(tiny_cnn, tiny_inputs):
    cams = [
        (ContrastCAM(tiny_cnn, LAYER), {"contrast": "all"}),
        (CounterfactualCAM(tiny_cnn, LAYER), {"target": PER_EXAMPLE}),
        (LayerGradCamPlusPlus(tiny_cnn, LAYER), {"target": None}),
        (Contrastive(Saliency, tiny_cnn), {"contrast": PER_EXAMPLE}),
    ]
    failing = ContrastCAM(model_raising_after_the_layer(), LAYER)
    before_state = model_snapshot(tiny_cnn)

    def run(calls: int) -> None:
        for i in range(calls):
            method, kwargs = cams[i % len(cams)]
            method.attribute(tiny_inputs, **kwargs)
            if i % 10 == 0:
                with pytest.raises((RuntimeError, ValueError)):
                    failing.attribute(tiny_inputs)

    run(20)  # warm up caches (Captum's, autograd's)
    before = _live_tensors()
    run(200)
    after = _live_tensors()
    assert after - before <= 5, f"{after - before} tensors more after 200 calls"
    assert_model_unchanged(tiny_cnn, before_state)
