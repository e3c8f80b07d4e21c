"""Upsampling keeps ties; a tiny blur sigma is the identity.

* ``upsample_to_input=True`` of the CAMs resized with ``F.interpolate``: a constant map (a CAM
  at a 1 x 1 layer, e.g. the bundled model's global ``pool``) came back as 3 to 5 values an
  ulp apart, and deletion ranked the pixels by that noise: curves of the same map upsampled
  and at 1 x 1 differed by up to 0.34.
* ``baselines="blur"`` with a tiny but accepted ``blur_sigma`` built the kernel as
  ``offsets**2 / (2 sigma**2)`` in float32: ``2 sigma**2`` underflowed to 0, the centre tap
  was 0 / 0 and the scores NaN (with a warning that blamed the model).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_tiny_cnn
from captum.attr import LayerAttribution

from captum_ext._utils.maps import upsample_keeping_ties, upsample_maps
from captum_ext.attr import GradCAM
from captum_ext.data import BUNDLED_CAM_LAYER
from captum_ext.metrics import deletion, deletion_curves
from captum_ext.metrics._perturbation import gaussian_blur

F32, F64 = torch.float32, torch.float64
MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


# ------------------------------------------------------------------ CAM upsampling


def test_gradcam_at_a_pooled_layer_upsamples_to_one_constant(bundled_model, sample_digits):
    x, y = sample_digits[0][:8], sample_digits[1][:8]
    cam = GradCAM(bundled_model, "pool")
    small = cam.attribute(x, target=y)
    big = cam.attribute(x, target=y, upsample_to_input=True)
    assert small.shape == (8, 1, 1, 1) and big.shape == (8, 1, 28, 28)
    assert big.dtype == small.dtype
    torch.testing.assert_close(big, small.expand_as(big), rtol=0, atol=0)
    a = deletion_curves(bundled_model, x, small, target=y, n_steps=20)
    b = deletion_curves(bundled_model, x, big, target=y, n_steps=20)
    torch.testing.assert_close(a.curves, b.curves, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F32, F64, torch.float16])
@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_a_constant_map_stays_constant_in_every_linear_mode(dtype, spatial):
    for value in (0.37, -7.1, 3e4):
        for old, new in ((1, 28), (7, 28), (5, 13), (13, 5)):
            maps = torch.full((2, 3) + (old,) * spatial, value, dtype=dtype)
            up = upsample_maps(maps, (new,) * spatial)
            assert up.dtype == dtype and up.shape == (2, 3) + (new,) * spatial
            assert bool((up == maps.flatten()[0]).all()), (value, old, new)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("old,new", [(7, 28), (5, 13), (6, 17), (3, 7), (14, 224), (13, 5)])
def test_mirror_symmetric_maps_stay_exactly_symmetric(dtype, old, new):
    """Pixels equal in exact arithmetic (mirror images of each other) stay equal: with
    F.interpolate thousands of them differed by an ulp."""
    g = torch.Generator().manual_seed(old * 100 + new)
    maps = torch.rand(8, 1, old, old, generator=g, dtype=dtype)
    maps = maps + maps.flip(-1)  # exactly symmetric (a + b == b + a)
    maps = maps + maps.flip(-2)
    up = upsample_maps(maps, (new, new))
    assert torch.equal(up, up.flip(-1)) and torch.equal(up, up.flip(-2))
    assert torch.equal(
        upsample_keeping_ties(maps, (new, new)).flip(-1), upsample_keeping_ties(maps, (new, new))
    )


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("old,new", [(7, 28), (5, 13), (13, 5), (1, 9), (6, 6), (3, 11)])
def test_equals_f_interpolate_up_to_rounding(dtype, spatial, old, new):
    g = torch.Generator().manual_seed(old + 31 * new + spatial)
    maps = torch.randn((3, 2) + (old,) * spatial, generator=g, dtype=dtype)
    mode = MODES[spatial]
    expected = F.interpolate(maps, size=(new,) * spatial, mode=mode, align_corners=False)
    got = upsample_maps(maps, (new,) * spatial)
    assert got.dtype == dtype
    # F.interpolate's own rounding: a few ulps of the largest value
    atol = 16 * torch.finfo(dtype).eps * float(maps.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_float32_maps_are_within_rounding_of_float64_and_chunked_alike():
    """The float32 result is computed in float32 (F.interpolate's cost; the metrics resize in
    float64 themselves): within a few ulps of the float64 interpolation, and the same
    whatever the chunk size of the N x C maps (a chunk of one map, or all at once)."""
    import captum_ext._utils.maps as maps_module

    g = torch.Generator().manual_seed(5)
    maps = torch.randn(4, 3, 7, 7, generator=g)
    got = upsample_maps(maps, (28, 28))
    assert got.dtype == torch.float32
    exact = upsample_keeping_ties(maps.double(), (28, 28))
    scale = float(maps.abs().max())
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=4 * scale * 2**-24)
    original = maps_module._UPSAMPLE_CHUNK_BYTES
    try:
        maps_module._UPSAMPLE_CHUNK_BYTES = 1  # one map per chunk
        one_by_one = upsample_maps(maps, (28, 28))
    finally:
        maps_module._UPSAMPLE_CHUNK_BYTES = original
    assert torch.equal(one_by_one, got)
    half = upsample_maps(maps.half(), (28, 28))
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), exact.float(), rtol=0, atol=2e-3 * scale)


def test_the_other_modes_are_still_f_interpolate():
    g = torch.Generator().manual_seed(6)
    maps = torch.randn(2, 1, 7, 7, generator=g)
    for mode in ("nearest", "nearest-exact", "bicubic", "area"):
        expected = F.interpolate(
            maps, size=(28, 28), mode=mode, align_corners=False if mode == "bicubic" else None
        )
        torch.testing.assert_close(upsample_maps(maps, (28, 28), mode), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="interpolate_mode"):
        upsample_maps(maps, (28, 28), "trilinear")
    with pytest.raises(ValueError, match="interpolate_mode"):
        upsample_maps(maps, (0, 28))


def test_cam_upsampling_matches_layer_attribution_interpolate(bundled_model, sample_digits):
    x, y = sample_digits[0][:8], sample_digits[1][:8]
    cam = GradCAM(bundled_model, BUNDLED_CAM_LAYER)
    raw = cam.attribute(x, target=y)
    up = cam.attribute(x, target=y, upsample_to_input=True)
    expected = LayerAttribution.interpolate(raw, (28, 28), interpolate_mode="bilinear")
    atol = 4 * torch.finfo(F32).eps * float(raw.abs().max())
    torch.testing.assert_close(up, expected, rtol=0, atol=atol)


# ------------------------------------------------------------------ blur kernel


def _reference_blur(x, size, sigma):
    half = size // 2
    g = torch.tensor([math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(size)], dtype=F64)
    g = g / g.sum()
    c = x.shape[1]
    padded = F.pad(x.double(), (half,) * 4, mode="replicate")
    return F.conv2d(padded, torch.outer(g, g).expand(c, 1, size, size), groups=c)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5, 5.0, 1e3])
def test_blur_of_ordinary_sigmas_equals_a_float64_gaussian(sigma):
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(7))
    got = gaussian_blur(x, 5, sigma)
    assert got.dtype == F32
    # float32 images: the float64 taps rounded once, the sums in float32 (a few ulps of 1)
    torch.testing.assert_close(got, _reference_blur(x, 5, sigma).float(), rtol=0, atol=5e-7)
    x64 = x.double()
    torch.testing.assert_close(gaussian_blur(x64, 5, sigma), _reference_blur(x64, 5, sigma))


@pytest.mark.parametrize("sigma", [1e-3, 1e-25, 1e-45, 1e-300, 5e-324])
@pytest.mark.parametrize("dtype", [F32, F64, torch.float16])
def test_a_tiny_blur_sigma_is_the_identity(sigma, dtype):
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(8)).to(dtype)
    torch.testing.assert_close(gaussian_blur(x, 11, sigma), x, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,sigma", [(F32, 1e-25), (F64, 1e-200)])
def test_deletion_with_a_tiny_blur_sigma_is_finite(dtype, sigma):
    model = make_tiny_cnn(dtype=dtype)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(9), dtype=dtype)
    a = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(10), dtype=dtype)
    reference = deletion(model, x, a, baselines="blur", blur_sigma=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = deletion(model, x, a, baselines="blur", blur_sigma=sigma)
    assert bool(torch.isfinite(tiny).all())
    torch.testing.assert_close(tiny, reference, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(20, 20), (20, 5), (7, 20)])
def test_maps_that_need_gradients_get_f_interpolates_gradients(dtype, size):
    """The chunked result is written with ``torch.lerp(..., out=)`` where it can be, which
    autograd refuses: maps that require gradients (LayerIBA's ``upsample_bits``) failed
    whenever the first spatial axis was resized. Their gradients equal F.interpolate's."""
    g = torch.Generator().manual_seed(7)
    maps = torch.rand(2, 3, 7, 5, generator=g, dtype=dtype).requires_grad_(True)
    weights = torch.rand(2, 3, *size, generator=g, dtype=dtype)
    (upsample_maps(maps, size) * weights).sum().backward()
    ours = maps.grad.clone()
    maps.grad = None
    expected = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours, maps.grad)
