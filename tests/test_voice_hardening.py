"""VOICE hardening: output_transform, vision transformers, train mode, one forward pass,
refused inputs, read-outs tied to the returned maps, confident models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from captum.attr import GuidedBackprop, LayerGradCam, NoiseTunnel, Saliency
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from captum_ext.attr import VOICE, GradCAM
from captum_ext.metrics import voice_iou, voice_snr


def _inputs(n=3, size=8, seed=2, channels=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, dtype=torch.float64, generator=generator)


def _minmax(m):
    low, high = m.min(), m.max()
    return (m - low) / (high - low) if high > low else torch.zeros_like(m)


class DictOutput(nn.Module):
    """A model whose forward returns a dict, as Hugging Face models do."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"logits": self.net(x), "extra": x.mean()}


class TestOutputTransform:
    def test_reduces_the_output_like_on_the_cams(self):
        model = make_tiny_cnn(num_classes=6)
        x = _inputs()
        plain = VOICE(GradCAM(model, "features.3")).attribute(x)
        wrapped = DictOutput(model)
        pick = lambda out: out["logits"]  # noqa: E731
        for voice in (
            VOICE(GradCAM(wrapped, "net.features.3"), output_transform=pick),
            VOICE(GradCAM(wrapped, "net.features.3", output_transform=pick)),
            VOICE(GradCAM(wrapped, "net.features.3", output_transform=pick), output_transform=pick),
            VOICE(LayerGradCam(wrapped, model.features[3]), output_transform=pick),
        ):
            got = voice.attribute(x)
            for field in ("explanation", "contrast", "uncertainty", "iou", "snr"):
                torch.testing.assert_close(getattr(got, field), getattr(plain, field))
        saliency = VOICE(Saliency(wrapped), output_transform=pick).attribute(x)
        torch.testing.assert_close(
            saliency.uncertainty, VOICE(Saliency(model)).attribute(x).uncertainty
        )

    def test_without_it_the_error_names_it(self):
        wrapped = DictOutput(make_tiny_cnn())
        with pytest.raises(ValueError, match="output_transform"):
            VOICE(GradCAM(wrapped, "net.features.3")).attribute(_inputs())

    def test_two_different_transforms_and_non_callables_are_refused(self):
        wrapped = DictOutput(make_tiny_cnn())
        cam = GradCAM(wrapped, "net.features.3", output_transform=lambda out: out["logits"])
        with pytest.raises(ValueError, match="output_transform.*give it once"):
            VOICE(cam, output_transform=lambda out: out["logits"])
        with pytest.raises(TypeError, match="output_transform"):
            VOICE(GradCAM(wrapped, "net.features.3"), output_transform="logits")


def tiny_vit(num_classes=6):
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=8,
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        num_classes=num_classes,
    )
    with torch.no_grad():  # torchvision initialises the head to zeros: all logits 0
        model.heads.head.weight.normal_(0, 1)
        model.heads.head.bias.normal_(0, 0.1)
    return model.double().eval()


def tokens_to_maps(tokens, side=2):
    """(N, 1 + h*w, d) tokens -> (N, d, h, w): drop the class token (pytorch-grad-cam's)."""
    return tokens[:, 1:].reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def _vit_cam(tokens, scalar, size):
    (g,) = torch.autograd.grad(scalar, tokens, retain_graph=True)
    acts, grads = tokens_to_maps(tokens.detach())[0], tokens_to_maps(g)[0]
    weights = grads.mean(dim=(1, 2))
    raw = torch.relu((weights[:, None, None] * acts).sum(0))
    return _minmax(F.interpolate(raw[None, None], size=size, mode="bilinear")[0])


def vit_reference(model, layer, x):
    """The published procedure by hand on a ViT: one example and one class at a time."""
    results = []
    for i in range(x.shape[0]):
        store = {}
        handle = layer.register_forward_hook(lambda m, a, out: store.update(a=out))  # noqa: B023
        try:
            logits = model(x[i : i + 1])
        finally:
            handle.remove()

        def cam(scalar, tokens=store["a"]):
            return _vit_cam(tokens, scalar, x.shape[2:])

        p = int(logits[0].argmax())
        log_p = torch.log_softmax(logits[0], 0)
        contrasts = [cam(-log_p[q]) for q in range(logits.shape[1]) if q != p]
        variance = torch.stack(contrasts).var(dim=0, unbiased=False)
        results.append((_minmax(variance), cam(logits[0, p])))
    return results


def test_vision_transformer_with_reshape_transform_equals_the_per_class_loop():
    model = tiny_vit()
    layer = model.encoder.layers[-1].ln_1
    x = _inputs(3, 8, seed=5)
    before = model_snapshot(model)
    result = VOICE(GradCAM(model, layer)).attribute(
        x, reshape_transform=tokens_to_maps, max_batch=4
    )
    assert_model_unchanged(model, before)
    assert result.uncertainty.shape == (3, 1, 8, 8)
    for i, (uncertainty, explanation) in enumerate(vit_reference(model, layer, x)):
        torch.testing.assert_close(result.uncertainty[i], uncertainty, atol=1e-9, rtol=0)
        torch.testing.assert_close(result.explanation[i], explanation, atol=1e-9, rtol=0)
    assert result.uncertainty.amax() > 0
    explanation = GradCAM(model, layer).attribute(
        x, reshape_transform=tokens_to_maps, upsample_to_input=True, normalize="minmax"
    )
    torch.testing.assert_close(result.explanation, explanation)


def test_reshape_transform_is_checked():
    model = make_tiny_cnn()
    x = _inputs()
    with pytest.raises(TypeError, match="reshape_transform"):
        VOICE(GradCAM(model, "features.3")).attribute(x, reshape_transform="tokens")
    with pytest.raises(ValueError, match="reshape_transform.*CAM"):
        VOICE(Saliency(model)).attribute(x, reshape_transform=tokens_to_maps)


TECHNIQUES = {
    "gradcam": lambda m: GradCAM(m, "features.3"),
    "layer_gradcam": lambda m: LayerGradCam(m, m.features[3]),
    "guided": lambda m: GuidedBackprop(m),
    "saliency": lambda m: Saliency(m),
    "smoothgrad": lambda m: NoiseTunnel(Saliency(m)),
}


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_train_mode_model_comes_back_unchanged(name):
    model = make_tiny_cnn(num_classes=5).train()
    before = model_snapshot(model)
    VOICE(TECHNIQUES[name](model)).attribute(_inputs(), nt_samples=2)
    assert_model_unchanged(model, before)
    assert all(m.training for m in model.modules())


class CountForwards:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_hook(self._count)
        return self

    def _count(self, module, args, output):
        self.calls += 1

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("name", ["gradcam", "layer_gradcam", "guided", "saliency"])
def test_one_forward_pass(name):
    """Before: a forward to find the classes, then the engine's forward (2). Now the classes
    are read off the engine's own forward (1), whether or not they are given."""
    model = make_tiny_cnn(num_classes=6)
    x = _inputs()
    voice = VOICE(TECHNIQUES[name](model))
    for kwargs in ({}, {"target": [0, 1, 2], "contrasts": [1, 3, 5]}, {"contrasts": 3}):
        with CountForwards(model) as counter:
            voice.attribute(x, **kwargs)
        assert counter.calls == 1, kwargs


def test_smoothgrad_runs_one_clean_and_one_noisy_forward():
    model = make_tiny_cnn(num_classes=6)
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0]))
    try:
        VOICE(NoiseTunnel(Saliency(model))).attribute(_inputs(), nt_samples=4)
    finally:
        handle.remove()
    assert seen == [3, 12]


def test_one_output_model_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 1),
    ).double()
    for method in (GradCAM(model, "0"), Saliency(model), NoiseTunnel(Saliency(model))):
        before = model_snapshot(model)
        with pytest.raises(ValueError, match="at least 2 classes.*only 1 output"):
            VOICE(method).attribute(_inputs())
        assert_model_unchanged(model, before)


@pytest.mark.parametrize(
    "num_classes, contrasts, said",
    [(2, "all", "a two-class model has one"), (5, [[1], [2], [3]], "Give `contrasts` at least")],
)
def test_one_contrast_per_example_warns_that_the_uncertainty_is_empty(num_classes, contrasts, said):
    """One contrast class: its variance is 0, so the maps are zeros whatever the input (the
    top-k form already refuses k = 1; a two-class model or one explicit class did not)."""
    model = make_tiny_cnn(num_classes=num_classes)
    with pytest.warns(UserWarning, match="fewer than 2 contrast classes") as caught:
        result = VOICE(GradCAM(model, "features.3")).attribute(_inputs(), contrasts=contrasts)
    assert any(said in str(w.message) for w in caught)
    assert not result.uncertainty.any() and (result.n_contrasts == 1).all()


def test_two_contrasts_do_not_warn():
    model = make_tiny_cnn(num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = VOICE(GradCAM(model, "features.3")).attribute(_inputs())
    assert (result.n_contrasts == 2).all()


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -float("inf"), -0.1, 1.0, 2.0])
def test_threshold_outside_0_1_is_refused(threshold):
    """The maps are min-max normalised to [0, 1]: a threshold below 0 marks every pixel and
    one of 1 or more none, so the IoU was 1 whatever the maps (a read-out of nothing)."""
    model = make_tiny_cnn(num_classes=5)
    with pytest.raises(ValueError, match=r"threshold.*finite number >= 0 and < 1"):
        VOICE(GradCAM(model, "features.3")).attribute(_inputs(), threshold=threshold)
    maps = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"threshold.*finite number >= 0 and < 1"):
        voice_iou(maps, maps, threshold=threshold)
    with pytest.raises(TypeError, match="threshold"):
        VOICE(GradCAM(model, "features.3")).attribute(_inputs(), threshold="0.1")


@pytest.mark.parametrize("name", ["gradcam", "guided"])
@pytest.mark.parametrize("threshold", [0.1, 0.3])
def test_read_outs_are_those_of_the_returned_maps(name, threshold):
    """iou / snr recomputed from the returned explanation and uncertainty (channel mean for
    gradient techniques); computing them from the contrast map instead would differ."""
    model = make_tiny_cnn(num_classes=7)
    x = _inputs(4, 9, seed=3)
    result = VOICE(TECHNIQUES[name](model)).attribute(x, threshold=threshold)
    explanation = result.explanation.mean(1)
    uncertainty = result.uncertainty.mean(1)
    torch.testing.assert_close(result.iou, voice_iou(explanation, uncertainty, threshold=threshold))
    torch.testing.assert_close(result.snr, voice_snr(uncertainty))
    mutant = voice_iou(result.contrast.mean(1), uncertainty, threshold=threshold)
    assert not torch.allclose(mutant, result.iou), "the test cannot tell the maps apart"

    # and by hand, from the definition (min-max, threshold, smoothed IoU)
    def mask(m):
        low, high = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
        return (m - low) / torch.where(high > low, high - low, 1) > threshold

    a, b = mask(explanation), mask(uncertainty)
    by_hand = ((a & b).sum((1, 2)) + 1e-6) / ((a | b).sum((1, 2)) + 1e-6)
    torch.testing.assert_close(result.iou, by_hand.to(result.iou.dtype))


@pytest.mark.parametrize("name", ["gradcam", "guided"])
def test_confident_model_is_finite_and_equals_float64(confident_model, sample_digits, name):
    images = sample_digits[0][:6]
    make = {
        "gradcam": lambda m: GradCAM(m, "features.7"),
        "guided": lambda m: GuidedBackprop(m),
    }[name]
    got = VOICE(make(confident_model)).attribute(images, max_batch=5)
    reference = copy.deepcopy(confident_model).double()
    expected = VOICE(make(reference)).attribute(images.double(), max_batch=5)
    for field in ("explanation", "contrast", "uncertainty", "iou", "snr", "log_likelihood"):
        value = getattr(got, field)
        assert torch.isfinite(value).all(), field
    for field in ("prediction", "target", "contrast_class", "n_contrasts"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    for field in ("explanation", "contrast", "uncertainty"):
        torch.testing.assert_close(
            getattr(got, field).double(), getattr(expected, field), atol=1e-4, rtol=0
        )
    torch.testing.assert_close(got.log_likelihood, expected.log_likelihood, rtol=1e-5, atol=1e-7)


def test_gradient_methods_refuse_several_input_tensors_instead_of_dropping_them():
    """VOICE(Saliency) on inputs (x, v) returned maps of x only, without a word (Captum's
    Saliency returns one map per input). One tensor is mapped; the others belong in
    additional_forward_args, which works."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.side = nn.Linear(2, 4)
            self.head = nn.Linear(4, 5)

        def forward(self, x, v):
            return self.head(self.conv(x).mean(dim=(2, 3)) + self.side(v))

    torch.manual_seed(0)
    model = TwoInputs().eval()
    x, v = torch.randn(3, 3, 6, 6), torch.randn(3, 2)
    for method in (Saliency(model), NoiseTunnel(Saliency(model))):
        with pytest.raises(ValueError, match="maps one input tensor, and `inputs` holds 2"):
            VOICE(method).attribute((x, v))
    result = VOICE(Saliency(model)).attribute(x, additional_forward_args=(v,))
    assert result.uncertainty.shape == x.shape


def test_a_numpy_or_tensor_integer_is_a_top_k_number_of_contrasts():
    """contrasts=np.int64(3) (e.g. from a config read with numpy) raised "must be a non-empty
    1-D or 2-D integer list"; it means top-3, as a plain 3 does."""
    import numpy as np

    model = make_tiny_cnn()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    voice = VOICE(GradCAM(model, model.features[3]))
    expected = voice.attribute(x, contrasts=3)
    for k in (np.int64(3), torch.tensor(3)):
        got = voice.attribute(x, contrasts=k)
        torch.testing.assert_close(got.uncertainty, expected.uncertainty)
        assert torch.equal(got.n_contrasts, expected.n_contrasts)
