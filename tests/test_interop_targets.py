"""Targets and contrasts in every form Captum accepts, several classes per example, tuple
inputs with ``additional_forward_args``, and ``torch.no_grad``: each against the examples one
by one or Captum's LayerGradCam."""

from __future__ import annotations

import pytest
import torch
from _interop import (
    CAM_CLASSES,
    LAYER,
    NUM_CLASSES,
    PER_EXAMPLE,
    TwoInputNet,
    class_keyword,
    make_inputs,
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


NO_GRAD_METHODS = {
    "contrast": (lambda m: ContrastCAM(m, LAYER), {"contrast": PER_EXAMPLE}),
    "contrast-all": (lambda m: ContrastCAM(m, LAYER), {"contrast": "all"}),
    "contrast++": (lambda m: ContrastCAM(m, LAYER, weighting="gradcam++"), {"contrast": 2}),
    "counterfactual": (lambda m: CounterfactualCAM(m, LAYER), {"target": PER_EXAMPLE}),
    "gradcam++": (lambda m: LayerGradCamPlusPlus(m, LAYER), {"target": "all"}),
    "contrastive-saliency": (lambda m: Contrastive(Saliency, m), {"contrast": PER_EXAMPLE}),
    "contrastive-ig": (
        lambda m: Contrastive(IntegratedGradients, m),
        {"contrast": "all", "n_steps": 4},
    ),
    "contrastive-gradcam": (
        lambda m: Contrastive(LayerGradCam, m, m.features[3]),
        {"contrast": PER_EXAMPLE},
    ),
}


@pytest.mark.parametrize("name", list(NO_GRAD_METHODS))
def test_no_grad_gives_the_same_result(name, tiny_cnn, tiny_inputs):
    build, kwargs = NO_GRAD_METHODS[name]
    method = build(tiny_cnn)
    outside = method.attribute(tiny_inputs, **kwargs)
    with torch.no_grad():
        inside = method.attribute(tiny_inputs, **kwargs)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------ 4. targets in every form


TARGET_FORMS = {
    "int": (3, [3, 3, 3, 3]),
    "list": (PER_EXAMPLE, PER_EXAMPLE),
    "list-of-1-tuples": ([(q,) for q in PER_EXAMPLE], PER_EXAMPLE),
    "1-tuple": ((3,), [3, 3, 3, 3]),
    "0-dim-tensor": (torch.tensor(3), [3, 3, 3, 3]),
    "1-element-tensor": (torch.tensor([3]), [3, 3, 3, 3]),
    "per-example-tensor": (torch.tensor(PER_EXAMPLE), PER_EXAMPLE),
    "per-example-int32-tensor": (torch.tensor(PER_EXAMPLE, dtype=torch.int32), PER_EXAMPLE),
}


@pytest.mark.parametrize("form", list(TARGET_FORMS))
@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_every_target_form_equals_examples_one_by_one(name, form, tiny_cnn, tiny_inputs):
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    key = class_keyword(method)
    value, per_example = TARGET_FORMS[form]
    got = method.attribute(tiny_inputs, **{key: value}, relu_attributions=False)
    rows = [
        method.attribute(tiny_inputs[i : i + 1], **{key: c}, relu_attributions=False)
        for i, c in enumerate(per_example)
    ]
    assert got.shape == (4, 1, 6, 6)
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_multi_index_tuple_target_is_a_clear_error(name, tiny_cnn, tiny_inputs):
    """A tuple of several ints indexes outputs with more than two dimensions in Captum;
    these methods need (N, classes) logits and say so."""
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    with pytest.raises(ValueError, match="tuple"):
        method.attribute(tiny_inputs, **{class_keyword(method): (1, 2)})


def test_one_by_one_counterfactual_equals_negated_captum_gradcam(tiny_cnn, tiny_inputs):
    target = torch.tensor(PER_EXAMPLE)
    captum = LayerGradCam(tiny_cnn, tiny_cnn.features[3]).attribute(
        tiny_inputs, target=target, relu_attributions=False
    )
    ours = CounterfactualCAM(tiny_cnn, LAYER).attribute(
        tiny_inputs, target=PER_EXAMPLE, relu_attributions=False
    )
    torch.testing.assert_close(ours, -captum.detach(), rtol=1e-10, atol=1e-13)


SELECTIONS = {
    "all": ("all", [list(range(NUM_CLASSES))] * 4),
    "2d-tensor": (torch.tensor([[1, 3], [0, 0], [4, 2], [2, 1]]), [[1, 3], [0, 0], [4, 2], [2, 1]]),
    "list-of-lists": ([[1, 3], [0, 0], [4, 2], [2, 1]], [[1, 3], [0, 0], [4, 2], [2, 1]]),
    "one-row": (torch.tensor([[4, 0, 2]]), [[4, 0, 2]] * 4),
}


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("name", list(CAM_CLASSES))
def test_several_classes_equal_single_class_calls_stacked(name, selection, tiny_cnn, tiny_inputs):
    method = CAM_CLASSES[name](tiny_cnn, LAYER)
    key = class_keyword(method)
    value, per_example = SELECTIONS[selection]
    got = method.attribute(tiny_inputs, **{key: value}, max_batch=2)
    width = len(per_example[0])
    expected = torch.stack(
        [
            torch.cat(
                [
                    method.attribute(tiny_inputs[i : i + 1], **{key: per_example[i][j]})
                    for j in range(width)
                ],
                dim=1,
            )[0]
            for i in range(4)
        ]
    )
    assert got.shape == (4, width, 6, 6)
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
