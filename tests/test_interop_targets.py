"""Targets and contrasts in every form Captum accepts, several classes per example, tuple
inputs with ``additional_forward_args``, and ``torch.no_grad``: each against the examples one
by one or Captum's LayerGradCam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _interop import (
    BATCH_SIZES,
    CAM_CLASSES,
    LAYER,
    NUM_CLASSES,
    PAIRS_5,
    TwoInputNet,
    class_keyword,
    make_inputs,
    per_example,
    tiny_batch,
)
from captum.attr import (
    IntegratedGradients,
    LayerGradCam,
    Saliency,
)

from captum_ext.attr import (
    ContrastCAM,
    Contrastive,
    CounterfactualCAM,
    LayerGradCamPlusPlus,
)

# ------------------------------------------------------------------ 2. no_grad


#: Each method and its arguments; ``CLASSES`` is replaced by one class per example.
CLASSES = object()

NO_GRAD_METHODS = {
    "contrast": (lambda m: ContrastCAM(m, LAYER), {"contrast": CLASSES}),
    "contrast-all": (lambda m: ContrastCAM(m, LAYER), {"contrast": "all"}),
    "contrast++": (lambda m: ContrastCAM(m, LAYER, weighting="gradcam++"), {"contrast": 2}),
    "counterfactual": (lambda m: CounterfactualCAM(m, LAYER), {"target": CLASSES}),
    "gradcam++": (lambda m: LayerGradCamPlusPlus(m, LAYER), {"target": "all"}),
    "contrastive-saliency": (lambda m: Contrastive(Saliency, m), {"contrast": CLASSES}),
    "contrastive-ig": (
        lambda m: Contrastive(IntegratedGradients, m),
        {"contrast": "all", "n_steps": 4},
    ),
    "contrastive-gradcam": (
        lambda m: Contrastive(LayerGradCam, m, m.features[3]),
        {"contrast": CLASSES},
    ),
}


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("name", list(NO_GRAD_METHODS))
def test_no_grad_gives_the_same_result(name, n, tiny_cnn):
    build, kwargs = NO_GRAD_METHODS[name]
    kwargs = {k: per_example(n) if v is CLASSES else v for k, v in kwargs.items()}
    x = tiny_batch(n)
    method = build(tiny_cnn)
    outside = method.attribute(x, **kwargs)
    with torch.no_grad():
        inside = method.attribute(x, **kwargs)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------ 4. targets in every form


def target_forms(n: int) -> dict:
    """Each form of a class selection for an n-example batch: (value, class per example)."""
    classes = per_example(n)
    return {
        "int": (3, [3] * n),
        "list": (classes, classes),
        "list-of-1-tuples": ([(q,) for q in classes], classes),
        "1-tuple": ((3,), [3] * n),
        "0-dim-tensor": (torch.tensor(3), [3] * n),
        "1-element-tensor": (torch.tensor([3]), [3] * n),
        "per-example-tensor": (torch.tensor(classes), classes),
        "per-example-int32-tensor": (torch.tensor(classes, dtype=torch.int32), classes),
        # labels from numpy (a dataset's array, or one of its np.int64 entries)
        "numpy-int64-scalar": (np.int64(3), [3] * n),
        "numpy-array": (np.array(classes), classes),
        "numpy-int32-array": (np.array(classes, dtype=np.int32), classes),
    }


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("form", list(target_forms(4)))
@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_every_target_form_equals_examples_one_by_one(name, form, n, tiny_cnn):
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    key = class_keyword(method)
    value, classes = target_forms(n)[form]
    x = tiny_batch(n)
    got = method.attribute(x, **{key: value}, relu_attributions=False)
    rows = [
        method.attribute(x[i : i + 1], **{key: c}, relu_attributions=False)
        for i, c in enumerate(classes)
    ]
    assert got.shape == (n, 1, 6, 6)
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("value", [np.full(3, 1.0), np.ones(3, dtype=bool), np.array(["a"] * 3)])
def test_numpy_values_that_are_not_class_indices_are_refused(value, tiny_cnn):
    method = ContrastCAM(tiny_cnn, LAYER)
    with pytest.raises(TypeError, match="`contrast`"):
        method.attribute(tiny_batch(3), contrast=value)


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_multi_index_tuple_target_is_a_clear_error(name, tiny_cnn, tiny_inputs):
    """A tuple of several ints indexes outputs with more than two dimensions in Captum;
    these methods need (N, classes) logits and say so."""
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    with pytest.raises(ValueError, match="tuple"):
        method.attribute(tiny_inputs, **{class_keyword(method): (1, 2)})


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_one_by_one_counterfactual_equals_negated_captum_gradcam(n, tiny_cnn):
    x = tiny_batch(n)
    captum = LayerGradCam(tiny_cnn, tiny_cnn.features[3]).attribute(
        x, target=torch.tensor(per_example(n)), relu_attributions=False
    )
    ours = CounterfactualCAM(tiny_cnn, LAYER).attribute(
        x, target=per_example(n), relu_attributions=False
    )
    torch.testing.assert_close(ours, -captum.detach(), rtol=1e-10, atol=1e-13)


def selections(n: int) -> dict:
    """Each form of a several-classes selection for n examples: (value, classes per example)."""
    pairs = PAIRS_5[:n]
    return {
        "all": ("all", [list(range(NUM_CLASSES))] * n),
        "2d-tensor": (torch.tensor(pairs), pairs),
        "list-of-lists": ([list(p) for p in pairs], pairs),
        "one-row": (torch.tensor([[4, 0, 2]]), [[4, 0, 2]] * n),
    }


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("selection", list(selections(4)))
@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_several_classes_equal_single_class_calls_stacked(name, selection, n, tiny_cnn):
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    key = class_keyword(method)
    value, classes = selections(n)[selection]
    x = tiny_batch(n)
    got = method.attribute(x, **{key: value}, max_batch=2)
    width = len(classes[0])
    expected = torch.stack(
        [
            torch.cat(
                [method.attribute(x[i : i + 1], **{key: classes[i][j]}) for j in range(width)],
                dim=1,
            )[0]
            for i in range(n)
        ]
    )
    assert got.shape == (n, width, 6, 6)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ tuple inputs, extra args


def test_tuple_inputs_and_additional_forward_args_against_captum_gradcam():
    model = TwoInputNet().double().eval()
    x1, x2 = make_inputs(3, 5, seed=2), make_inputs(3, 5, seed=3, channels=2)
    contrast = torch.tensor([4, 1, 0])
    for extra in [(2.5,), 2.5]:
        extra_tuple = extra if isinstance(extra, tuple) else (extra,)
        got = ContrastCAM(model, "mix").attribute(
            (x1, x2), contrast=contrast, additional_forward_args=extra, relu_attributions=False
        )
        gradcam = LayerGradCam(model, model.mix)
        per_class = torch.cat(
            [
                gradcam.attribute(
                    (x1, x2),
                    target=c,
                    additional_forward_args=extra_tuple,
                    relu_attributions=False,
                ).detach()
                for c in range(NUM_CLASSES)
            ],
            dim=1,
        )
        probs = torch.softmax(model(x1, x2, *extra_tuple), dim=1).detach()
        expected = (probs[:, :, None, None] * per_class).sum(1, keepdim=True) - per_class[
            torch.arange(3), contrast
        ].unsqueeze(1)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    # the scalar argument changes the map (it scales the logits inside the softmax)
    other = ContrastCAM(model, "mix").attribute(
        (x1, x2), contrast=contrast, additional_forward_args=0.5, relu_attributions=False
    )
    assert not torch.allclose(other, got)


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_tuple_inputs_with_per_example_args_equal_one_by_one(name):
    model = TwoInputNet().double().eval()
    x1, x2 = make_inputs(3, 5, seed=2), make_inputs(3, 5, seed=3, channels=2)
    shift = torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64)
    method = CAM_CLASSES[name](model, "mix")
    key = class_keyword(method)
    classes = [4, 1, 0]
    got = method.attribute((x1, x2), **{key: classes}, additional_forward_args=(1.5, shift))
    rows = [
        method.attribute(
            (x1[i : i + 1], x2[i : i + 1]),
            **{key: classes[i]},
            additional_forward_args=(1.5, shift[i : i + 1]),
        )
        for i in range(3)
    ]
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-10, atol=1e-13)
