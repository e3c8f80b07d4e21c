"""VOICE's reference post-processing of CAM maps from low-resolution moments equals the
materialising route (upsample every contrast map, min-max each, variance, min-max)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_confident_model

from captum_ext.attr import VOICE, ContrastCAM, GradCAM, LayerGradCamPlusPlus
from captum_ext.attr import voice as voice_module
from captum_ext.attr._voice_moments import UpsampledMoments, extreme_rows, interpolation_matrix

SIZES = [
    ((7, 7), (224, 224)),  # ResNet at 224
    ((7, 7), (28, 28)),  # the bundled digit model
    ((3, 5), (17, 11)),  # non-square, non-integer factors
    ((5, 4), (13, 9)),
    ((1, 4), (9, 10)),  # h == 1
    ((4, 1), (10, 3)),  # w == 1
    ((1, 1), (5, 6)),
    ((6, 6), (6, 13)),  # one side not upsampled
]


def _materialised(chunks, weights, size):
    """The reference order: ReLU, bilinear upsampling, min-max per map, variance sums."""
    total = total_sq = 0
    for maps, weight in zip(chunks, weights, strict=True):
        up = F.interpolate(torch.relu(maps), size=size, mode="bilinear", align_corners=False)
        flat = up.flatten(2)
        low = flat.amin(-1, keepdim=True)
        span = flat.amax(-1, keepdim=True) - low
        # a constant map upsamples to a constant; F.interpolate's rounding is not a pattern
        low_res = maps.flatten(2)
        constant = (low_res.amax(-1) == low_res.amin(-1))[..., None]
        span = torch.where(constant, 0, span)
        scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1), 0)
        scaled = scaled.view_as(up) * weight[..., None, None]
        total = total + scaled.sum(1)
        total_sq = total_sq + (scaled * scaled).sum(1)  # weights are 0 / 1
    return total, total_sq


def _fast(chunks, weights, low, size):
    moments = UpsampledMoments(low, size, chunks[0].dtype, chunks[0].device)
    for maps, weight in zip(chunks, weights, strict=True):
        moments.add(torch.relu(maps), weight)
    return moments.sums()


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "per-chunk"])
@pytest.mark.parametrize("low, size", SIZES, ids=lambda v: "x".join(map(str, v)))
def test_sums_equal_the_materialising_route(low, size, buffered, monkeypatch):
    if not buffered:  # moments formed at every chunk
        monkeypatch.setattr(UpsampledMoments, "BUFFER_ELEMENTS", 1)
    generator = torch.Generator().manual_seed(sum(low) + sum(size))
    n, per_chunk = 3, (4, 1, 6)
    chunks = [torch.randn(n, b, *low, dtype=torch.float64, generator=generator) for b in per_chunk]
    chunks[0][1, 2] = 0.3  # a constant map (after ReLU: constant positive)
    chunks[1][0, 0] = -1.0  # all negative: zero after ReLU
    weights = [torch.rand(n, b, generator=generator) > 0.3 for b in per_chunk]
    expected = _materialised(chunks, weights, size)
    got = _fast(chunks, weights, low, size)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == (n, *size)
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)


@pytest.mark.parametrize("low, size", SIZES, ids=lambda v: "x".join(map(str, v)))
def test_extremes_of_the_upsampled_maps_lie_on_the_candidate_grid(low, size):
    generator = torch.Generator().manual_seed(7)
    maps = torch.rand(20, 1, *low, dtype=torch.float64, generator=generator)
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]
    a_h = interpolation_matrix(low[0], size[0], torch.float64, "cpu")
    a_w = interpolation_matrix(low[1], size[1], torch.float64, "cpu")
    torch.testing.assert_close(a_h @ maps[:, 0] @ a_w.T, up, atol=1e-12, rtol=0)
    rows, cols = extreme_rows(a_h), extreme_rows(a_w)
    assert len(rows) <= 2 * low[0] and len(cols) <= 2 * low[1]
    grid = up[:, rows][:, :, cols].flatten(1)
    # exact up to the last bit of F.interpolate's own rounding
    torch.testing.assert_close(grid.amax(1), up.flatten(1).amax(1), atol=1e-15, rtol=0)
    torch.testing.assert_close(grid.amin(1), up.flatten(1).amin(1), atol=1e-15, rtol=0)


def test_constant_maps_normalise_to_zero():
    maps = torch.full((2, 3, 4, 5), 0.7, dtype=torch.float64)
    moments = UpsampledMoments((4, 5), (11, 13), torch.float64, "cpu")
    assert torch.equal(moments.normalise(maps), torch.zeros_like(maps))


def _voice_pair(method, x, **kwargs):
    fast = VOICE(method).attribute(x, **kwargs)
    slow_voice = VOICE(method)
    slow_voice._fast_postprocess = False
    return fast, slow_voice.attribute(x, **kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: GradCAM(m, "features.7"),
        lambda m: LayerGradCamPlusPlus(m, "features.7"),
        lambda m: ContrastCAM(m, "features.4", weighting="gradcam++"),  # 14 x 14
    ],
    ids=["gradcam", "gradcam++", "gradcam++14"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_voice_on_the_bundled_model_is_unchanged(make, dtype, sample_digits):
    model = make_confident_model(1.0, dtype)
    x = sample_digits[0][:8].to(dtype)
    for kwargs in ({}, {"contrasts": 4, "max_batch": 3}):
        fast, slow = _voice_pair(make(model), x, **kwargs)
        atol = 1e-6 if dtype == torch.float64 else 1e-4
        for field in ("explanation", "contrast", "uncertainty"):
            torch.testing.assert_close(
                getattr(fast, field), getattr(slow, field), atol=atol, rtol=0
            )
        for field in ("iou", "snr"):
            tol = 1e-6 if dtype == torch.float64 else 1e-3
            torch.testing.assert_close(getattr(fast, field), getattr(slow, field), atol=tol, rtol=0)
        assert torch.equal(fast.n_contrasts, slow.n_contrasts)


def test_only_the_explanation_and_the_contrast_are_upsampled(sample_digits, monkeypatch):
    """Memory: the contrast maps are never materialised at the input size (2 maps/example)."""
    seen = []
    original = voice_module.upsample_maps

    def counting(maps, size, *args, **kwargs):
        seen.append(maps.shape[0] * maps.shape[1])
        return original(maps, size, *args, **kwargs)

    monkeypatch.setattr(voice_module, "upsample_maps", counting)
    x = sample_digits[0][:5]
    result = VOICE(GradCAM(make_confident_model(1.0), "features.7")).attribute(x)
    assert result.uncertainty.shape == (5, 1, 28, 28)
    assert sum(seen) == 2 * 5


def test_float32_uncertainty_is_close_to_float64(sample_digits):
    """The low-resolution moments are formed in float64: E[x^2] - E[x]^2 and the final
    min-max do not magnify float32 rounding (here 4.7e-7; the materialising float32 route
    that it replaced was 3.9e-6 off)."""
    x = sample_digits[0][:8]
    truth = VOICE(LayerGradCamPlusPlus(make_confident_model(1.0, torch.float64), "features.4"))
    truth._fast_postprocess = False
    expected = truth.attribute(x.double())
    got = VOICE(LayerGradCamPlusPlus(make_confident_model(1.0), "features.4")).attribute(x)
    torch.testing.assert_close(got.uncertainty.double(), expected.uncertainty, atol=1e-6, rtol=0)


def test_contrast_columns_have_the_cross_entropy_gradient():
    """The linear stand-in for -log softmax(z)_Q has its gradient p - e_Q at z (float64)."""
    generator = torch.Generator().manual_seed(3)
    logits = (5 * torch.randn(4, 7, dtype=torch.float64, generator=generator)).requires_grad_()
    columns = voice_module._logit_then_cross_entropy(logits)
    reference = torch.cat([logits, -torch.log_softmax(logits, 1)], 1)
    for column in range(14):
        (got,) = torch.autograd.grad(columns[:, column].sum(), logits, retain_graph=True)
        (want,) = torch.autograd.grad(reference[:, column].sum(), logits, retain_graph=True)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_batched_backward_has_no_per_class_log_softmax_backward(sample_digits):
    """The log-softmax backward has no batching rule: under is_grads_batched it ran once per
    class row. The contrast columns avoid it."""
    voice = VOICE(GradCAM(make_confident_model(1.0), "features.7"))
    with torch.profiler.profile() as profile:
        voice.attribute(sample_digits[0][:2])
    names = [event.key for event in profile.key_averages()]
    assert not [name for name in names if "log_softmax_backward" in name]
