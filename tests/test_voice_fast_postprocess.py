"""VOICE's reference post-processing of CAM maps from low-resolution moments equals the
materialising route (upsample every contrast map, min-max each, variance, min-max)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_confident_model

from captum_ext._utils.maps import minmax_normalize, upsample_maps
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
    """The reference order: ReLU, bilinear upsampling, min-max per map, variance sums; the
    min-max of the materialising route (VOICE's ``_fast_postprocess=False``), which reads a
    span of at most 8 eps max|m| as a constant map (zeros)."""
    total = total_sq = 0
    for maps, weight in zip(chunks, weights, strict=True):
        up = upsample_maps(torch.relu(maps), size)
        scaled = minmax_normalize(up).double() * weight[..., None, None]
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ulps", [1, 2, 4])
def test_maps_constant_up_to_rounding_normalise_to_zero(dtype, ulps):
    """A map whose values differ by a few units in the last place (what a constant
    activation map picks up on its way through a model) is constant for the materialising
    route's min-max (span <= 8 eps max|m|): the moments must not stretch it to [0, 1]."""
    eps = torch.finfo(dtype).eps
    maps = torch.full((2, 3, 4, 5), 0.7, dtype=dtype)
    maps[0, 1, 0, 0] *= 1 + ulps * eps
    maps[1, 2, 3, 4] *= 1 - ulps * eps / 2
    maps[1, 0, 2, 2] = 0.7 + 2 * ulps * eps * 0.7  # one value, a few ulps up
    assert bool((maps.flatten(2).amax(-1) > maps.flatten(2).amin(-1)).any())
    moments = UpsampledMoments((4, 5), (11, 13), dtype, "cpu")
    assert torch.equal(moments.normalise(maps), torch.zeros_like(maps, dtype=torch.float64))
    weights = [torch.ones(2, 3, dtype=torch.bool)]
    expected = _materialised([maps], weights, (11, 13))
    for e, g in zip(expected, _fast([maps], weights, (4, 5), (11, 13)), strict=True):
        assert torch.equal(e, torch.zeros_like(e))
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maps_just_above_rounding_are_still_normalised(dtype):
    """The tolerance is rounding only: a span of 64 ulps is a (faint) pattern, normalised as
    the materialising route normalises it (up to the materialising route's own rounding of
    the upsampled map, and the moments' own in float64: an ulp in 64, 1.6% of the
    normalised range)."""
    eps = torch.finfo(dtype).eps
    maps = torch.full((1, 2, 4, 5), 0.7, dtype=dtype)
    maps[0, 0, 1, 2] *= 1 + 64 * eps
    maps[0, 1] = torch.linspace(0, 1, 20, dtype=dtype).view(4, 5)
    weights = [torch.ones(1, 2, dtype=torch.bool)]
    expected = _materialised([maps], weights, (9, 10))
    got = _fast([maps], weights, (4, 5), (9, 10))
    assert float(expected[0].amax()) > 1  # both maps were normalised (each peaks at 1)
    assert float(got[0].amax()) > 1
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=4 / 64, rtol=0)


class _Wobble(torch.nn.Module):
    """Scales one position of the activations by 1 + 2**-22 (two float32 ulps): maps
    constant up to rounding downstream."""

    def __init__(self, wobble: bool) -> None:
        super().__init__()
        self.wobble = wobble

    def forward(self, a):
        if not self.wobble:
            return a
        bump = torch.zeros_like(a)
        bump[..., 0, 0] = 1.0
        return a * (1 + 2**-22 * bump)


def _circular_model(wobble: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, stride=2, padding_mode="circular"),
        torch.nn.ReLU(),
        _Wobble(wobble),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 6),
    ).eval()


@pytest.mark.parametrize(
    "inputs",
    ["constant", "random"],
    ids=["constant-up-to-rounding", "ordinary"],
)
@pytest.mark.parametrize("wobble", [True, False], ids=["wobble", "plain"])
def test_voice_fast_equals_slow_on_rounding_level_maps(inputs, wobble):
    """A constant image through a circular convolution gives contrast maps that are
    constant (exactly, or up to 2 ulps with the wobble): the fast route read the ulps as a
    pattern, a full [0, 1] uncertainty map (IoU 2.5e-7, SNR 0.169) where the materialising
    route gives zeros (IoU 1, SNR 0). Random images give ordinary maps: unchanged."""
    if inputs == "constant":
        x = torch.full((2, 3, 12, 12), 0.7)
    else:
        x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    model = _circular_model(wobble)
    fast, slow = _voice_pair(GradCAM(model, "2"), x)
    if inputs == "constant":
        assert torch.equal(slow.uncertainty, torch.zeros_like(slow.uncertainty))
    for field in ("explanation", "contrast", "uncertainty", "iou", "snr"):
        torch.testing.assert_close(getattr(fast, field), getattr(slow, field), atol=1e-4, rtol=0)


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
