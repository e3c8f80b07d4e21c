"""captum_ext.data.corrupt: shapes, ranges, severity order, determinism, devices, formulas and
bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_ext.data import CORRUPTIONS, corrupt, denormalize_digits, normalize_digits
from captum_ext.data.corruptions import SEVERITIES

PIXELWISE_MONOTONE = ("gaussian_noise", "contrast", "brightness", "fog")


@pytest.fixture(scope="module")
def digits(bundled_digits):
    """The 40 sample digits in [0, 1]."""
    images, _ = bundled_digits
    return denormalize_digits(images)


def _images(seed: int, shape=(3, 2, 9, 11), dtype=torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_names_and_tables():
    assert CORRUPTIONS == (
        "gaussian_noise",
        "shot_noise",
        "blur",
        "contrast",
        "brightness",
        "affine",
        "elastic",
        "fog",
    )
    assert all(len(SEVERITIES[name]) == 5 for name in CORRUPTIONS)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(CORRUPTIONS),
    severity=st.integers(1, 5),
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(2, 12),
    w=st.integers(2, 12),
    low=st.floats(-3, 3),
    width=st.floats(0.5, 300),
    seed=st.integers(0, 2**31),
)
def test_shape_dtype_and_range(name, severity, n, c, h, w, low, width, seed):
    high = low + width
    images = low + width * _images(seed, (n, c, h, w), torch.float64)
    out = corrupt(images, name, severity, generator=seed, value_range=(low, high))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert bool(torch.isfinite(out).all())
    assert float(out.min()) >= low - 1e-9 * width and float(out.max()) <= high + 1e-9 * width


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_with_a_seed_and_a_generator(name):
    images = _images(0)
    first = corrupt(images, name, 3, generator=7)
    again = corrupt(images, name, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    # the input is not modified
    assert torch.equal(images, _images(0))
    if name in ("blur", "contrast", "brightness"):
        assert torch.equal(first, corrupt(images, name, 3, generator=8))
    else:
        assert not torch.equal(first, corrupt(images, name, 3, generator=8))


def test_global_random_state_without_generator():
    images = _images(1)
    torch.manual_seed(3)
    first = corrupt(images, "gaussian_noise", 2)
    torch.manual_seed(3)
    assert torch.equal(first, corrupt(images, "gaussian_noise", 2))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_increases_the_distance_on_average(name, digits):
    distances = [
        float((corrupt(digits, name, severity, generator=0) - digits).abs().mean())
        for severity in range(1, 6)
    ]
    assert distances[0] > 0
    assert all(b > a for a, b in zip(distances, distances[1:])), distances


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(PIXELWISE_MONOTONE), seed=st.integers(0, 2**31))
def test_severity_increases_the_distance_pixel_by_pixel(name, seed):
    images = _images(seed, (2, 3, 8, 8), torch.float64)
    previous = torch.zeros_like(images)
    for severity in range(1, 6):
        distance = (corrupt(images, name, severity, generator=seed) - images).abs()
        assert bool((distance >= previous - 1e-12).all())
        previous = distance


def test_formulas_of_the_pointwise_corruptions():
    images = _images(2, dtype=torch.float64)
    # contrast: (u - mean) c + mean, the mean over each image
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    expected = ((images - mean) * 0.2 + mean).clamp(0, 1)
    assert torch.allclose(corrupt(images, "contrast", 3), expected, atol=1e-12)
    # brightness: u + b, clipped
    assert torch.allclose(corrupt(images, "brightness", 5), (images + 0.5).clamp(0, 1))
    # gaussian noise: the draws are standard normal, made in float64 from the generator
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    noisy = corrupt(images, "gaussian_noise", 4, generator=4)
    assert torch.allclose(noisy, (images + 0.26 * z).clamp(0, 1), atol=1e-12)


def test_value_range_is_a_change_of_units():
    images = _images(3, dtype=torch.float64)
    for name in CORRUPTIONS:
        unit = corrupt(images, name, 2, generator=5)
        scaled = corrupt(10 + 245 * images, name, 2, generator=5, value_range=(10, 255))
        assert torch.allclose(scaled, 10 + 245 * unit, atol=1e-9), name


def test_normalised_digits_with_their_range(bundled_digits):
    images, _ = bundled_digits
    value_range = tuple(float(v) for v in normalize_digits(torch.tensor([0.0, 255.0])))
    out = corrupt(images, "fog", 2, generator=0, value_range=value_range)
    expected = normalize_digits(255 * corrupt(denormalize_digits(images), "fog", 2, generator=0))
    assert torch.allclose(out, expected, atol=1e-4)


def test_blur_matches_an_independent_convolution():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    images = _images(6, (2, 1, 28, 28), torch.float64)
    for severity in (1, 3, 5):
        sigma = SEVERITIES["blur"][severity - 1]
        out = corrupt(images, "blur", severity)
        for i in range(2):
            expected = scipy_ndimage.gaussian_filter(
                images[i, 0].numpy(), sigma, mode="nearest", truncate=math.ceil(3 * sigma) / sigma
            )
            assert torch.allclose(out[i, 0], torch.from_numpy(expected), atol=1e-12)


def test_fog_noise_is_low_frequency():
    images = torch.zeros(4, 1, 32, 32, dtype=torch.float64)
    fog = corrupt(images, "fog", 5, generator=0) * 2.5 / 1.5  # (0 + t f) / (1 + t), t = 1.5
    spectrum = torch.fft.rfft2(fog - fog.mean(dim=(2, 3), keepdim=True)).abs() ** 2
    # frequencies |ky|, kx <= 3 (of 16) hold most of the power (rows -3..-1 are negative ky)
    low = spectrum[..., :4, :4].sum() + spectrum[..., -3:, :4].sum()
    assert float(low / spectrum.sum()) > 0.9
    assert float(fog.amin()) == pytest.approx(0.0, abs=1e-12)
    assert float(fog.amax()) == pytest.approx(1.0, abs=1e-12)


def test_affine_matches_scipy_on_the_same_draws(digits):
    ndimage = pytest.importorskip("scipy.ndimage")
    images = digits[:6].double()
    severity, seed = 4, 3
    degrees, shear, zoom, shift = SEVERITIES["affine"][severity - 1]
    out = corrupt(images, "affine", severity, generator=seed)
    draws = torch.rand((6, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    n, _, h, w = images.shape
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    for i in range(n):
        s = np.where(draws[i, :3].numpy() < 0.5, -1.0, 1.0)
        a = np.radians(degrees) * s[0]
        rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        shearing = np.array([[1.0, s[1] * shear], [0.0, 1.0]])
        forward_xy = zoom ** s[2] * rotation @ shearing
        direction = float(draws[i, 3]) * 2 * np.pi
        t_xy = shift * min(h, w) * np.array([np.cos(direction), np.sin(direction)])
        # scipy: input[(row, col)] = matrix @ output + offset, rows are y
        inverse_xy = np.linalg.inv(forward_xy)
        swap = np.array([[0, 1], [1, 0]])
        matrix = swap @ inverse_xy @ swap
        offset = centre - matrix @ (centre + swap @ t_xy)
        expected = ndimage.affine_transform(
            images[i, 0].numpy(), matrix, offset=offset, order=1, mode="grid-constant", cval=0.0
        )
        assert np.allclose(out[i, 0].numpy(), np.clip(expected, 0, 1), atol=1e-9)


def test_elastic_matches_scipy_on_the_same_draws(digits):
    ndimage = pytest.importorskip("scipy.ndimage")
    images = digits[:3].double()
    severity, seed = 3, 5
    alpha = SEVERITIES["elastic"][severity - 1]
    out = corrupt(images, "elastic", severity, generator=seed)
    n, _, h, w = images.shape
    # the same draws as corrupt: U(0, 1) in float64 from the seed, mapped to U(-1, 1)
    field = (
        torch.rand((n, 2, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        .mul(2)
        .sub(1)
        .numpy()
    )
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i in range(n):
        dx, dy = (
            alpha * ndimage.gaussian_filter(field[i, k], 4.0, mode="nearest", truncate=3.0)
            for k in (0, 1)
        )
        expected = ndimage.map_coordinates(
            images[i, 0].numpy(), [rows + dy, cols + dx], order=1, mode="grid-constant"
        )
        assert np.allclose(out[i, 0].numpy(), np.clip(expected, 0, 1), atol=1e-9)


def test_geometric_corruptions_of_a_constant_image_inside():
    # a warp of a constant image is the same constant wherever it samples inside the image
    images = torch.full((2, 1, 28, 28), 0.5, dtype=torch.float64)
    out = corrupt(images, "elastic", 1, generator=0)
    centre = out[..., 8:20, 8:20]
    assert torch.allclose(centre, torch.full_like(centre, 0.5), atol=1e-9)


def test_batch_rows_are_independent_for_deterministic_corruptions():
    images = _images(8)
    for name in ("blur", "contrast", "brightness"):
        batch = corrupt(images, name, 4)
        one_by_one = torch.cat([corrupt(images[i : i + 1], name, 4) for i in range(3)])
        assert torch.allclose(batch, one_by_one, atol=1e-6), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    images = _images(9).to(dtype)
    out = corrupt(images, "elastic", 2, generator=0)
    assert out.dtype == dtype and bool(torch.isfinite(out.float()).all())


def test_bad_input_names_the_argument():
    images = _images(0)
    with pytest.raises(ValueError, match="`corruption`"):
        corrupt(images, "snow", 1)
    with pytest.raises(ValueError, match="`corruption`"):
        corrupt(images, 3, 1)
    for severity in (0, 6):
        with pytest.raises(ValueError, match="`severity`"):
            corrupt(images, "blur", severity)
    with pytest.raises(TypeError, match="`severity`"):
        corrupt(images, "blur", 2.0)
    with pytest.raises(TypeError, match="`images`"):
        corrupt(images.numpy(), "blur", 1)
    with pytest.raises(ValueError, match="\\(N, C, H, W\\)"):
        corrupt(images[0], "blur", 1)
    with pytest.raises(TypeError, match="floating point"):
        corrupt((images * 255).to(torch.uint8), "blur", 1)
    with pytest.raises(ValueError, match="NaN"):
        corrupt(images.clone().fill_(float("nan")), "blur", 1)
    with pytest.raises(ValueError, match="`value_range`"):
        corrupt(images * 255, "blur", 1)
    with pytest.raises(ValueError, match="`value_range`"):
        corrupt(images, "blur", 1, value_range=(1, 0))
    with pytest.raises(TypeError, match="`value_range`"):
        corrupt(images, "blur", 1, value_range=1)
    with pytest.raises(TypeError, match="`generator`"):
        corrupt(images, "fog", 1, generator="seed")
    with pytest.raises(ValueError, match="empty"):
        corrupt(images[:0], "fog", 1)


@pytest.mark.cuda
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_result_on_cuda(name):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    images = _images(10, (4, 1, 28, 28))
    cpu = corrupt(images, name, 3, generator=1)
    gpu = corrupt(images.cuda(), name, 3, generator=1)
    assert gpu.device.type == "cuda"
    # shot noise draws integers: equal; the warps interpolate in float32 on each device
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
