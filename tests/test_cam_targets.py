"""Captum's target forms for the CAM methods: tuple targets on (N, C, H, W) and (N, C, k)
outputs (segmentation), negative indices, attr_dim_summation, grad_kwargs, interpolate_mode,
public names in error messages, train-mode models and confident models.

References: Captum 0.9's LayerGradCam on the same model, and float64 autograd by hand.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, make_confident_model, make_tiny_cnn, model_snapshot
from captum.attr import LayerAttribution, LayerGradCam, NoiseTunnel
from torch import nn

from captum_ext.attr import ContrastCAM, CounterfactualCAM, GradCAM, LayerGradCamPlusPlus

TARGET_METHODS = {
    "GradCAM": GradCAM,
    "CounterfactualCAM": CounterfactualCAM,
    "LayerGradCamPlusPlus": LayerGradCamPlusPlus,
}
ALL_METHODS = {**TARGET_METHODS, "ContrastCAM": ContrastCAM}


def keyword(method) -> str:
    return "contrast" if isinstance(method, ContrastCAM) else "target"


# ------------------------------------------------------------------ models


class TinyFCN(nn.Module):
    """A tiny fully convolutional segmentation net: (N, 3, 6, 6) -> (N, 4, 6, 6) logits."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(8, classes, 3, padding=1)

    def forward(self, x):
        return self.head(self.features(x))


class TinySequenceNet(nn.Module):
    """(N, 2, 7) sequences -> (N, 3, 7) per-position logits: an (N, C, k) output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 5, 3, padding=1), nn.Tanh())
        self.head = nn.Conv1d(5, 3, 3, padding=1)

    def forward(self, x):
        return self.head(self.body(x))


def make_fcn(seed: int = 0) -> TinyFCN:
    torch.manual_seed(seed)
    return TinyFCN().double().eval()


@pytest.fixture
def fcn() -> TinyFCN:
    return make_fcn()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 6, 6, dtype=torch.float64)


LAYER = "features.3"
PER_EXAMPLE = [(1, 2, 3), (0, 0, 0), (3, 5, 5), (2, 4, 1)]


def captum_maps(model, layer, x, target, **kwargs) -> torch.Tensor:
    return LayerGradCam(model, layer).attribute(x, target=target, **kwargs).detach()


def layer_gradients_by_hand(model, layer, x, score_fn):
    """float64 autograd, independent of the engine: (A, d sum_n score_n / dA)."""
    store = {}

    def hook(module, args, output):
        output.retain_grad()
        store["A"] = output

    handle = layer.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        handle.remove()
    score_fn(out).sum().backward()
    return store["A"].detach(), store["A"].grad.detach()


def gradcam_by_hand(acts, grads, sign=1.0):
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return sign * (weights * acts).sum(dim=1, keepdim=True)


def element(out, rows):
    """out[n, *rows[n]] for each example."""
    return torch.stack([out[(n, *row)] for n, row in enumerate(rows)])


# ------------------------------------------------------------------ tuple targets on (N, C, H, W)


TUPLE_FORMS = {
    "tuple": ((1, 2, 3), [(1, 2, 3)] * 4),
    "negative-tuple": ((-1, -2, 0), [(3, 4, 0)] * 4),
    "list-of-tuples": (PER_EXAMPLE, PER_EXAMPLE),
    "list-of-negative-tuples": ([(-3, 2, -3), (0, 0, 0), (-1, -1, -1), (2, -2, 1)], PER_EXAMPLE),
    "one-tuple-in-a-list": ([(2, 1, 1)], [(2, 1, 1)] * 4),
}


@pytest.mark.parametrize("form", list(TUPLE_FORMS))
@pytest.mark.parametrize("name", ["GradCAM", "CounterfactualCAM"])
def test_tuple_targets_equal_captum_layer_gradcam(name, form, fcn, images):
    value, rows = TUPLE_FORMS[form]
    sign = -1.0 if name == "CounterfactualCAM" else 1.0
    method = TARGET_METHODS[name](fcn, LAYER)
    got = method.attribute(images, target=value, relu_attributions=False)
    captum_target = rows if isinstance(value, list) else value
    expected = sign * captum_maps(fcn, fcn.features[3], images, captum_target)
    assert got.shape == (4, 1, 6, 6)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    relu = method.attribute(images, target=value)
    torch.testing.assert_close(relu, torch.relu(expected), rtol=1e-10, atol=1e-13)


def test_tuple_targets_equal_hand_autograd(fcn, images):
    acts, grads = layer_gradients_by_hand(
        fcn, fcn.features[3], images, lambda out: element(out, PER_EXAMPLE)
    )
    got = GradCAM(fcn, LAYER).attribute(images, target=PER_EXAMPLE, relu_attributions=False)
    torch.testing.assert_close(got, gradcam_by_hand(acts, grads), rtol=1e-10, atol=1e-13)


def test_gradcam_plus_plus_tuple_target_by_hand(fcn, images):
    acts, grads = layer_gradients_by_hand(
        fcn, fcn.features[3], images, lambda out: element(out, PER_EXAMPLE)
    )
    sum_acts = acts.sum(dim=(2, 3), keepdim=True)
    denominator = 2 * grads**2 + sum_acts * grads**3
    alpha = torch.where(grads != 0, grads**2 / torch.where(grads != 0, denominator, 1), 0)
    weights = (alpha * torch.relu(grads)).sum(dim=(2, 3), keepdim=True)
    expected = torch.relu((weights * acts).sum(dim=1, keepdim=True))
    got = LayerGradCamPlusPlus(fcn, LAYER).attribute(images, target=PER_EXAMPLE)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


def test_contrast_cam_tuple_is_cross_entropy_at_the_pixel(fcn, images):
    """contrast=(q, h, w): the gradient of CE(output[n, :, h, w], q); dim 1 is the class axis."""
    contrasts = [(0, 2, 3), (3, 0, 0), (1, 5, 5), (2, 4, 1)]

    def cross_entropy(out):
        logits = torch.stack([out[n, :, h, w] for n, (_, h, w) in enumerate(contrasts)])
        labels = torch.tensor([q for q, _, _ in contrasts])
        return F.cross_entropy(logits, labels, reduction="none")

    acts, grads = layer_gradients_by_hand(fcn, fcn.features[3], images, cross_entropy)
    got = ContrastCAM(fcn, LAYER).attribute(images, contrast=contrasts, relu_attributions=False)
    torch.testing.assert_close(got, gradcam_by_hand(acts, grads), rtol=1e-10, atol=1e-13)
    # the spec's identity at that pixel: sum_c p_c GradCAM_c - GradCAM_q (Captum's maps)
    probs = torch.softmax(fcn(images), dim=1).detach()
    identity = []
    for n, (q, h, w) in enumerate(contrasts):
        per_class = torch.cat(
            [captum_maps(fcn, fcn.features[3], images[n : n + 1], (c, h, w)) for c in range(4)]
        )
        identity.append((probs[n, :, h, w, None, None, None] * per_class).sum(0) - per_class[q])
    torch.testing.assert_close(got, torch.stack(identity), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(ALL_METHODS))
def test_list_of_tuples_batch_equals_one_by_one(name, fcn, images):
    method = ALL_METHODS[name](fcn, LAYER)
    key = keyword(method)
    got = method.attribute(images, **{key: PER_EXAMPLE}, relu_attributions=False)
    rows = [
        method.attribute(images[n : n + 1], **{key: row}, relu_attributions=False)
        for n, row in enumerate(PER_EXAMPLE)
    ]
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", list(ALL_METHODS))
def test_tuple_targets_inside_noise_tunnel(name, fcn, images):
    """NoiseTunnel expands a list of tuples like the inputs; zero noise gives the plain maps."""
    method = ALL_METHODS[name](fcn, LAYER)
    key = keyword(method)
    plain = method.attribute(images, **{key: PER_EXAMPLE})
    # NoiseTunnel expands `target` itself; ContrastCAM expands its own `contrast`
    smoothed = NoiseTunnel(method).attribute(
        images, nt_samples=3, nt_samples_batch_size=2, stdevs=0.0, **{key: PER_EXAMPLE}
    )
    torch.testing.assert_close(smoothed, plain, rtol=1e-10, atol=1e-13)


def test_sequence_output_with_class_and_position_tuples():
    """(N, C, k) outputs: the tuple (c, k) as in Captum."""
    torch.manual_seed(2)
    model = TinySequenceNet().double().eval()
    x = torch.randn(3, 2, 7, dtype=torch.float64)
    rows = [(2, 6), (0, 0), (1, 3)]
    for value, captum_target in [((1, -1), (1, 6)), (rows, rows)]:
        got = GradCAM(model, "body.1").attribute(x, target=value, relu_attributions=False)
        expected = captum_maps(model, model.body[1], x, captum_target)
        assert got.shape == (3, 1, 7)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


class TestMultiDimensionalOutputErrors:
    @pytest.mark.parametrize("name", list(ALL_METHODS))
    def test_no_target_names_the_tuple_form_and_output_transform(self, name, fcn, images):
        method = ALL_METHODS[name](fcn, LAYER)
        with pytest.raises(ValueError, match=rf"`{keyword(method)}` is required.*output_transform"):
            method.attribute(images)

    @pytest.mark.parametrize(
        "value", [1, [1, 2, 0, 3], torch.tensor([1, 2, 0, 3]), "all", (1, 2), [(1, 2)] * 4]
    )
    def test_forms_that_do_not_select_one_element(self, value, fcn, images):
        with pytest.raises(ValueError, match=r"\(N, 4, 6, 6\)"):
            GradCAM(fcn, LAYER).attribute(images, target=value)

    @pytest.mark.parametrize("value", [(4, 0, 0), (0, 6, 0), (-5, 0, 0), [(0, 0, 0), (0, 0, -7)]])
    def test_index_out_of_range(self, value, fcn, images):
        with pytest.raises(ValueError, match="target.*dimension"):
            GradCAM(fcn, LAYER).attribute(images, target=value)

    def test_model_left_alone_after_a_bad_tuple(self, fcn, images):
        before = model_snapshot(fcn)
        with pytest.raises(ValueError):
            ContrastCAM(fcn, LAYER).attribute(images, contrast=(9, 0, 0))
        assert_model_unchanged(fcn, before)


# ------------------------------------------------------------------ segmentation: a pixel mask


def test_segmentation_class_score_over_a_pixel_mask(fcn, images):
    """The score of class c is the sum of its logit over a mask (the docs' example), through
    `output_transform`; equals Captum's LayerGradCam on the same reduced forward and a float64
    autograd computation."""
    mask = torch.zeros(6, 6, dtype=torch.float64)
    mask[1:4, 2:5] = 1

    def masked_scores(out):  # (N, C, H, W) -> (N, C)
        return (out * mask).sum(dim=(2, 3))

    cam = GradCAM(fcn, LAYER, output_transform=masked_scores)
    got = cam.attribute(images, target=2, relu_attributions=False)
    reduced = lambda x: masked_scores(fcn(x))  # noqa: E731
    expected = captum_maps(reduced, fcn.features[3], images, 2)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    acts, grads = layer_gradients_by_hand(
        fcn, fcn.features[3], images, lambda out: masked_scores(out)[:, 2]
    )
    torch.testing.assert_close(got, gradcam_by_hand(acts, grads), rtol=1e-10, atol=1e-13)
    # all classes at once = one call per class
    every = cam.attribute(images, target="all", relu_attributions=False)
    for c in range(4):
        torch.testing.assert_close(
            every[:, c : c + 1], cam.attribute(images, target=c, relu_attributions=False)
        )
    # the mask score is the sum of the pixel scores: Grad-CAM is linear in the score
    pixels = [(2, h, w) for h in range(1, 4) for w in range(2, 5)]
    summed = sum(
        GradCAM(fcn, LAYER).attribute(images, target=p, relu_attributions=False) for p in pixels
    )
    torch.testing.assert_close(got, summed, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ (N, C) logits


@pytest.mark.parametrize("name", list(ALL_METHODS))
def test_list_of_multi_index_tuples_is_never_several_classes(name, tiny_cnn, tiny_inputs):
    """[(0, 1)] * N is Captum's per-example index into a 3-D output, not classes 0 and 1."""
    method = ALL_METHODS[name](tiny_cnn, "features.3")
    with pytest.raises(ValueError, match=r"tuple.*\(N, C\) logits.*2-D tensor"):
        method.attribute(tiny_inputs, **{keyword(method): [(0, 1)] * 4})


@pytest.mark.parametrize("name", list(ALL_METHODS))
def test_two_dimensional_selection_is_the_unambiguous_form(name, tiny_cnn, tiny_inputs):
    method = ALL_METHODS[name](tiny_cnn, "features.3")
    key = keyword(method)
    got = method.attribute(tiny_inputs, **{key: torch.tensor([[0, 1]])})
    assert got.shape == (4, 2, 6, 6)
    for j in range(2):
        torch.testing.assert_close(got[:, j : j + 1], method.attribute(tiny_inputs, **{key: j}))


NEGATIVE_FORMS = {
    "int": (-1, 4),
    "0-dim-tensor": (torch.tensor(-2), 3),
    "1-tuple": ((-5,), 0),
    "list": ([-1, -2, 0, 1], [4, 3, 0, 1]),
    "list-of-1-tuples": ([(-1,), (-2,), (0,), (1,)], [4, 3, 0, 1]),
    "tensor": (torch.tensor([-1, -2, 0, 1]), [4, 3, 0, 1]),
    "2-d": (torch.tensor([[-1, 0]]), torch.tensor([[4, 0]])),
}


@pytest.mark.parametrize("form", list(NEGATIVE_FORMS))
@pytest.mark.parametrize("name", list(ALL_METHODS))
def test_negative_indices_count_from_the_last_class(name, form, tiny_cnn, tiny_inputs):
    method = ALL_METHODS[name](tiny_cnn, "features.3")
    key = keyword(method)
    negative, positive = NEGATIVE_FORMS[form]
    torch.testing.assert_close(
        method.attribute(tiny_inputs, **{key: negative}),
        method.attribute(tiny_inputs, **{key: positive}),
        rtol=0,
        atol=0,
    )


def test_negative_int_target_equals_captum(tiny_cnn, tiny_inputs):
    got = GradCAM(tiny_cnn, "features.3").attribute(tiny_inputs, -1, relu_attributions=False)
    expected = captum_maps(tiny_cnn, tiny_cnn.features[3], tiny_inputs, -1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("value", [-6, [0, -6, 0, 0], torch.tensor([[5, 0]])])
def test_indices_beyond_either_end_are_refused(value, tiny_cnn, tiny_inputs):
    with pytest.raises(ValueError, match=r"target.*\[-5, 5\)"):
        GradCAM(tiny_cnn, "features.3").attribute(tiny_inputs, target=value)


# ------------------------------------------------------------------ attr_dim_summation


@pytest.mark.parametrize("relu", [False, True])
def test_attr_dim_summation_false_equals_captum(relu, tiny_cnn, tiny_inputs):
    target = [1, 0, 4, 2]
    got = GradCAM(tiny_cnn, "features.3").attribute(
        tiny_inputs, target, relu_attributions=relu, attr_dim_summation=False
    )
    expected = captum_maps(
        tiny_cnn,
        tiny_cnn.features[3],
        tiny_inputs,
        target,
        relu_attributions=relu,
        attr_dim_summation=False,
    )
    assert got.shape == (4, 8, 6, 6)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    counterfactual = CounterfactualCAM(tiny_cnn, "features.3").attribute(
        tiny_inputs, target, relu_attributions=False, attr_dim_summation=False
    )
    torch.testing.assert_close(
        counterfactual,
        -captum_maps(tiny_cnn, tiny_cnn.features[3], tiny_inputs, target, attr_dim_summation=False),
        rtol=1e-10,
        atol=1e-13,
    )


def test_attr_dim_summation_false_with_a_tuple_target(fcn, images):
    got = GradCAM(fcn, LAYER).attribute(
        images, PER_EXAMPLE, relu_attributions=False, attr_dim_summation=False
    )
    expected = captum_maps(fcn, fcn.features[3], images, PER_EXAMPLE, attr_dim_summation=False)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", list(ALL_METHODS))
def test_per_channel_maps_sum_to_the_map(name, tiny_cnn, tiny_inputs):
    """Per-channel maps (several classes: N x C' x K x h x w) sum over K to the usual maps,
    and their post-processing applies to each channel map."""
    method = ALL_METHODS[name](tiny_cnn, "features.3")
    key = keyword(method)
    for value in (3, "all"):
        summed = method.attribute(tiny_inputs, **{key: value}, relu_attributions=False)
        channels = method.attribute(
            tiny_inputs, **{key: value}, relu_attributions=False, attr_dim_summation=False
        )
        axis = 1 if value == 3 else 2
        assert channels.shape[axis] == 8
        torch.testing.assert_close(
            channels.sum(axis), summed.squeeze(1) if value == 3 else summed, rtol=1e-10, atol=1e-13
        )
    upsampled = method.attribute(
        tiny_inputs, **{key: "all"}, attr_dim_summation=False, upsample_to_input=True
    )
    assert upsampled.shape == (4, 5, 8, 6, 6)
    normalised = method.attribute(
        tiny_inputs, **{key: 3}, attr_dim_summation=False, normalize="minmax"
    )
    flat = normalised.flatten(2)
    assert flat.shape == (4, 8, 36)
    assert bool(((flat.amax(-1) == 1) | (flat.amax(-1) == 0)).all())


def test_attr_dim_summation_must_be_a_bool(tiny_cnn, tiny_inputs):
    with pytest.raises(TypeError, match="attr_dim_summation"):
        GradCAM(tiny_cnn, "features.3").attribute(tiny_inputs, attr_dim_summation="no")


# ------------------------------------------------------------------ grad_kwargs


@pytest.mark.parametrize("name", list(ALL_METHODS))
def test_grad_kwargs_that_apply_change_nothing(name, tiny_cnn, tiny_inputs):
    method = ALL_METHODS[name](tiny_cnn, "features.3")
    key = keyword(method)
    plain = method.attribute(tiny_inputs, **{key: "all"}, max_batch=2)
    for grad_kwargs in (
        {"retain_graph": True},
        {"allow_unused": False},
        {"materialize_grads": True},
        {"create_graph": False},
    ):
        got = method.attribute(tiny_inputs, **{key: "all"}, max_batch=2, grad_kwargs=grad_kwargs)
        torch.testing.assert_close(got, plain, rtol=0, atol=0)


class SideBranch(nn.Module):
    """A model whose `side` layer runs but does not reach the output."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Conv2d(3, 2, 1)
        self.main = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        self.side(x)
        return self.main(x)


def test_allow_unused_false_raises_like_captum(tiny_inputs):
    model = SideBranch().double()
    with pytest.warns(UserWarning, match="exactly zero for every input"):
        zeros = GradCAM(model, "side").attribute(tiny_inputs, target=1, relu_attributions=False)
    assert bool((zeros == 0).all())
    with pytest.raises(RuntimeError, match="not have been used"):
        LayerGradCam(model, model.side).attribute(
            tiny_inputs, target=1, grad_kwargs={"allow_unused": False}
        )
    with pytest.raises(RuntimeError, match="not have been used"):
        GradCAM(model, "side").attribute(tiny_inputs, target=1, grad_kwargs={"allow_unused": False})


@pytest.mark.parametrize(
    "grad_kwargs, error, match",
    [
        ({"create_graph": True}, ValueError, "create_graph.*GradCAM.*LayerGradCam"),
        ({"grad_outputs": None}, ValueError, "grad_outputs.*engine"),
        ({"is_grads_batched": False}, ValueError, "is_grads_batched"),
        ({"retain_grph": True}, TypeError, "retain_grph"),
        ([("retain_graph", True)], TypeError, "grad_kwargs.*dict"),
    ],
)
def test_grad_kwargs_that_cannot_apply_are_refused(
    grad_kwargs, error, match, tiny_cnn, tiny_inputs
):
    before = model_snapshot(tiny_cnn)
    with pytest.raises(error, match=match):
        GradCAM(tiny_cnn, "features.3").attribute(tiny_inputs, grad_kwargs=grad_kwargs)
    assert_model_unchanged(tiny_cnn, before)


# ------------------------------------------------------------------ public names in messages


@pytest.mark.parametrize("name", list(TARGET_METHODS))
def test_argument_errors_name_the_public_class(name, tiny_cnn, tiny_inputs):
    method = TARGET_METHODS[name](tiny_cnn, "features.3")
    for call in (
        lambda: method.attribute(tiny_inputs, contrast=1),
        lambda: method.attribute(target=1),
    ):
        with pytest.raises(TypeError) as caught:
            call()
        assert f"{name}.attribute()" in str(caught.value)
        assert "Base" not in str(caught.value)


def test_contrast_cam_given_target_says_it_takes_contrast(tiny_cnn, tiny_inputs):
    cam = ContrastCAM(tiny_cnn, "features.3")
    with pytest.raises(TypeError, match="ContrastCAM.*`contrast`"):
        cam.attribute(tiny_inputs, target=3)
    with pytest.raises(TypeError, match="ContrastCAM.*`contrast`"):
        NoiseTunnel(cam).attribute(tiny_inputs, nt_samples=2, target=3)


# ------------------------------------------------------------------ upsampling mode


def test_interpolate_mode_matches_layer_attribution_interpolate(sample_digits):
    model = make_confident_model(1.0, torch.float64)
    x = sample_digits[0][:8].double()
    cam = ContrastCAM(model, "features.7")
    raw = cam.attribute(x)
    nearest = cam.attribute(x, upsample_to_input=True, interpolate_mode="nearest")
    torch.testing.assert_close(nearest, LayerAttribution.interpolate(raw, (28, 28)), rtol=0, atol=0)
    bilinear = cam.attribute(x, upsample_to_input=True)
    torch.testing.assert_close(
        bilinear,
        LayerAttribution.interpolate(raw, (28, 28), interpolate_mode="bilinear"),
        rtol=0,
        atol=1e-14,
    )
    assert not torch.allclose(bilinear, nearest)


def test_interpolate_mode_needs_upsampling_and_a_valid_mode(tiny_cnn, tiny_inputs):
    cam = GradCAM(tiny_cnn, "features.3")
    with pytest.raises(ValueError, match="interpolate_mode.*upsample_to_input"):
        cam.attribute(tiny_inputs, interpolate_mode="nearest")
    with pytest.raises(ValueError, match="interpolate_mode"):
        cam.attribute(tiny_inputs, upsample_to_input=True, interpolate_mode="cubic")
    with pytest.raises(ValueError, match="interpolate_mode"):
        cam.attribute(tiny_inputs, upsample_to_input=True, interpolate_mode="trilinear")


# ------------------------------------------------------------------ train-mode models


@pytest.mark.parametrize("name", list(ALL_METHODS))
@pytest.mark.parametrize("wrap", ["module", "function"])
def test_train_mode_batchnorm_statistics_come_back_unchanged(name, wrap, tiny_inputs):
    model = make_tiny_cnn().train()
    before = model_snapshot(model)
    forward = model if wrap == "module" else (lambda x: model(x))
    layer = model.features[3]
    method = ALL_METHODS[name](forward, layer)
    method.attribute(tiny_inputs, **{keyword(method): "all"})
    assert_model_unchanged(model, before)
    assert model.training and model.features[1].training


# ------------------------------------------------------------------ confident models


def _map_scale(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).abs().amax(1).clamp_min(1e-30)[:, None, None, None]


def test_confident_model_logit_gradcam_scales_exactly(confident_model, sample_digits):
    """'logit' Grad-CAM and CounterfactualCAM are linear in the logits: the maps of a model
    whose logits are scaled by s are s times the float64 maps of the bundled model."""
    reference = make_confident_model(1.0).classifier.weight.detach()
    scale = float(confident_model.classifier.weight.detach()[0, 0] / reference[0, 0])
    x = sample_digits[0][:8]
    base = make_confident_model(1.0, torch.float64)
    for cls in (GradCAM, CounterfactualCAM):
        for target in (sample_digits[1][:8], "all"):
            got = cls(confident_model, "features.7").attribute(x, target=target)
            expected = scale * cls(base, "features.7").attribute(x.double(), target=target)
            assert bool(torch.isfinite(got).all())
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("cls", [ContrastCAM, LayerGradCamPlusPlus])
def test_confident_model_maps_equal_float64(cls, confident_model, sample_digits):
    """Non-linear signals (cross-entropy, the Grad-CAM++ closed form): float32 maps of a
    confident model are finite and equal the float64 maps of the same model."""
    x = sample_digits[0][:8]
    model64 = make_confident_model(1.0, torch.float64)
    model64.load_state_dict({k: v.double() for k, v in confident_model.state_dict().items()})
    key = "contrast" if cls is ContrastCAM else "target"
    for value in (None, "all"):
        got = cls(confident_model, "features.7").attribute(x, **{key: value})
        expected = cls(model64, "features.7").attribute(x.double(), **{key: value})
        assert bool(torch.isfinite(got).all())
        tolerance = 1e-4 * _map_scale(expected).expand_as(expected)
        assert bool(((got.double() - expected).abs() <= tolerance + 1e-30).all()), float(
            ((got.double() - expected).abs() / _map_scale(expected)).max()
        )


def test_segmentation_page_examples_run():
    """The ```python blocks of docs/segmentation.md run in order, as a reader pastes them."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "segmentation.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f"segmentation.md, example {number + 1}", "exec"), namespace)
    assert torch.allclose(
        namespace["pixel"],
        namespace["LayerGradCam"](namespace["fcn"], namespace["fcn"][3]).attribute(
            namespace["images"], target=(2, 5, 7)
        ),
        atol=1e-6,
    )
    assert namespace["every"].shape == (2, 4, 16, 16)


# --- a CAM layer without spatial dimensions (issue 19: `--layer fc`) ---


@pytest.mark.parametrize("method", [GradCAM, ContrastCAM, LayerGradCamPlusPlus])
def test_layer_without_spatial_dims_names_layer_and_closest_conv_layers(method):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()  # random weights, no download
    snapshot = model_snapshot(model)
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError) as info:
        method(model, "fc").attribute(x, upsample_to_input=True)
    message = str(info.value)
    assert "`layer`='fc'" in message and "N x K x h x w" in message
    assert "'layer4', 'layer4.1', 'layer4.1.conv2'" in message
    assert "cannot upsample" not in message
    assert_model_unchanged(model, snapshot)
    # also without upsampling: a CAM of a layer without spatial dimensions is no map
    with pytest.raises(ValueError, match="without spatial dimensions"):
        method(model, model.fc).attribute(x)
    assert_model_unchanged(model, snapshot)


def test_bundled_model_classifier_layer_suggests_features():
    from captum_ext.bundled import load_bundled_model

    model = load_bundled_model()
    snapshot = model_snapshot(model)
    x = torch.randn(3, 1, 28, 28)
    with pytest.raises(ValueError) as info:
        GradCAM(model, "classifier").attribute(x, target=1, upsample_to_input=True)
    message = str(info.value)
    assert "`layer`='classifier'" in message
    assert "'features', 'features.7', 'features.6'" in message
    assert_model_unchanged(model, snapshot)


# ------------------------------------------------------------------ batch sizes 1, 4, 5


def _batch(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(n), dtype=torch.float64)


@pytest.mark.parametrize("batch", [1, 4, 5])
@pytest.mark.parametrize(
    "name", ["GradCAM", "LayerGradCamPlusPlus", "CounterfactualCAM", "ContrastCAM"]
)
def test_batch_sizes_with_per_example_classes(name, batch):
    model = make_tiny_cnn().eval()
    classes = [(3 * i + 1) % 5 for i in range(batch)]
    x = _batch(batch)
    method = {**TARGET_METHODS, "ContrastCAM": ContrastCAM}[name](model, "features.3")
    keyword = "contrast" if name == "ContrastCAM" else "target"
    maps = method.attribute(x, **{keyword: classes})
    assert maps.shape == (batch, 1, 6, 6)
    for i in range(batch):
        single = method.attribute(x[i : i + 1], **{keyword: classes[i]})
        torch.testing.assert_close(maps[i : i + 1], single)
    if name == "GradCAM":
        captum = LayerGradCam(model, model.features[3]).attribute(
            x, target=classes, relu_attributions=True
        )
        torch.testing.assert_close(maps, captum)


def test_counterfactual_cam_still_imports_from_contrast_cam():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from captum_ext.attr.contrast_cam import CounterfactualCAM as from_old_home
        from captum_ext.attr.counterfactual_cam import CounterfactualCAM as from_new_home
    assert from_old_home is from_new_home is CounterfactualCAM


def test_template_attribute_shows_the_full_signature_and_docs():
    import inspect

    for cls in (GradCAM, LayerGradCamPlusPlus, CounterfactualCAM):
        parameters = list(inspect.signature(cls.attribute).parameters)
        assert parameters[:3] == ["self", "inputs", "target"]
        assert "interpolate_mode" in parameters and "max_batch" in parameters
        assert cls.attribute.__qualname__ == f"{cls.__name__}.attribute"
        assert "{" not in cls.attribute.__doc__ and "Returns:" in cls.attribute.__doc__
        assert "forward_func (Callable" in cls.__doc__ and "{init_args}" not in cls.__doc__


def test_every_contrast_map_of_a_confident_model_equals_float64_map_by_map(
    confident_model, sample_digits
):
    """Q == P ("why not even more confident in P?"): d CE(z, P)/dz = p - e_P, and on a
    confident prediction p_P rounds to 1 in float32, so its entry p_P - 1 was 0 instead of
    about -1e-8 and the map was noise (relative error 1.5 at a logit gap of 18.5). The test
    above scales its tolerance by the largest map of each example, which hid it; here each
    class's map is held to its own maximum, wherever float32 can represent it (at the two
    larger scales the own-class maps are below 1e-100 in float64: float32 gives 0). The
    engine's probability score, d p_c / dz = p_c (e_c - p), had the same entry."""
    from captum_ext._utils.batched_grad import class_gradients

    x = sample_digits[0][:8]
    model64 = make_confident_model(1.0, torch.float64)
    model64.load_state_dict({k: v.double() for k, v in confident_model.state_dict().items()})
    own = (torch.arange(8), confident_model(x).argmax(1))
    pairs = (
        (
            ContrastCAM(confident_model, "features.7").attribute(x, contrast="all"),
            ContrastCAM(model64, "features.7").attribute(x.double(), contrast="all"),
        ),
        (
            class_gradients(
                confident_model, (x,), "all", layer=confident_model.features[7],
                score="probability",
            ).result[0],
            class_gradients(
                model64, (x.double(),), "all", layer=model64.features[7], score="probability"
            ).result[0],
        ),
    )  # fmt: skip
    for got, expected in pairs:
        largest = expected.flatten(2).abs().amax(2)  # (8, 10): each map's own scale
        error = (got.double() - expected).abs().flatten(2).amax(2) / largest.clamp_min(1e-300)
        representable = largest > 1e-30
        assert float(torch.where(representable, error, 0.0)[own].max()) < 1e-4, error[own]
        tiny = torch.where(representable, 0.0, got.double().abs().flatten(2).amax(2))
        assert float(tiny.max()) < 1e-30
        if confident_model.classifier.weight.abs().max() < 10:  # the x3 model: gaps ~29
            assert bool(representable[own].all())  # the own-class maps were compared


@pytest.mark.parametrize("name", ["GradCAM", "CounterfactualCAM", "LayerGradCamPlusPlus",
                                  "FinerCAM", "LayerIBA", "VOICE"])  # fmt: skip
def test_a_target_list_shorter_than_the_batch_is_refused(name, bundled_model, sample_digits):
    """target=[3, 1] for 4 images was read as [3, 3, 1, 1] (the repetition that `contrast`
    needs inside Captum's NoiseTunnel, which expands `target` itself); Captum's own
    LayerGradCam refuses it. Now a ValueError naming `target`; NoiseTunnel with one target
    per example still works, and `contrast` keeps its repetition."""
    from captum_ext.attr import VOICE, FinerCAM, LayerIBA

    x = sample_digits[0][:4]
    build = {
        "GradCAM": GradCAM, "CounterfactualCAM": CounterfactualCAM,
        "LayerGradCamPlusPlus": LayerGradCamPlusPlus, "FinerCAM": FinerCAM,
        "LayerIBA": LayerIBA, "VOICE": lambda model, layer: VOICE(GradCAM(model, layer)),
    }[name]  # fmt: skip
    method = build(bundled_model, "features.7")
    if name == "LayerIBA":
        method.estimate(sample_digits[0])
    for target in ([3, 1], torch.tensor([3, 1])):
        with pytest.raises(ValueError, match="`target` has 2 entries but the inputs have 4"):
            method.attribute(x, target=target)
    if name in ("VOICE", "LayerIBA"):
        return
    labels = sample_digits[1][:4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Finer-CAM's vanishing maps
        smoothed = NoiseTunnel(method).attribute(
            x, target=labels, nt_type="smoothgrad", nt_samples=2, stdevs=0.0
        )
        torch.testing.assert_close(smoothed, method.attribute(x, target=labels))
    if name == "GradCAM":
        # ContrastCAM's `contrast` is repeated only where Captum's wrappers expand the inputs
        # and pass it through unchanged; in a direct call [3, 1] for 4 images was read as
        # [3, 3, 1, 1] without a word, and is refused now as `target` is
        contrast = ContrastCAM(bundled_model, "features.7")
        with pytest.raises(ValueError, match="`contrast` has 2 entries but the inputs have 4"):
            contrast.attribute(x, contrast=[3, 1])
        smoothed = NoiseTunnel(contrast).attribute(
            x, contrast=[3, 1, 2, 5], nt_type="smoothgrad", nt_samples=2, stdevs=0.0
        )
        torch.testing.assert_close(smoothed, contrast.attribute(x, contrast=[3, 1, 2, 5]))


def test_interpolate_mode_without_upsampling_names_the_default_modes(tiny_cnn, tiny_inputs):
    """The refusal of `interpolate_mode` without `upsample_to_input` points to captum's
    LayerAttribution.interpolate and says its default mode differs from ours."""
    from captum_ext.attr import GradCAM

    with pytest.raises(ValueError, match="interpolate_mode") as error:
        GradCAM(tiny_cnn, "features.3").attribute(tiny_inputs, target=0, interpolate_mode="bicubic")
    assert "'nearest'" in str(error.value) and "'bilinear'" in str(error.value)
