"""Sanity checks on constant and small maps, and SSIM with a tiny window sigma.

- ``model_randomisation`` and ``class_sensitivity`` resized maps smaller than the input
  (a CAM at a 1 x 1 layer after global pooling) with ``F.interpolate``, which turned a
  constant map into values an ulp apart; SSIM then stretched that rounding noise to [0, 1].
  A blind explainer (constant maps) scored Spearman 0.2-0.4 and SSIM 0.4-0.6 instead of 1
  ("fails the check"), which the measures give the same maps called directly.
- ``ssim_similarity(sigma=1e-200)`` was NaN: ``2 sigma**2`` underflowed to 0 (0 / 0 at the
  window's centre). The sigma -> 0 limit is a one-tap (identity) window.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_ext.metrics.sanity import (
    class_sensitivity,
    model_randomisation,
    spearman_similarity,
    ssim_similarity,
)

pytestmark = pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")


class _PooledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class _OneByOne:
    """A blind explainer: one positive value per example, a 1 x 1 map (a CAM at a layer
    after global pooling), so every map is constant once resized to the input."""

    def __init__(self, model):
        self.model = model

    def attribute(self, inputs, target=None, **kwargs):
        with torch.no_grad():
            value = self.model(inputs).softmax(1).gather(1, target.view(-1, 1))
        return value.view(-1, 1, 1, 1).float()


class _Small:
    """A fixed varying 7 x 7 map per example, for the resizing check."""

    def __init__(self, model):
        self.model = model

    def attribute(self, inputs, target=None, **kwargs):
        generator = torch.Generator().manual_seed(3)
        return torch.rand(inputs.shape[0], 2, 7, 7, generator=generator)


def _model_and_inputs():
    torch.manual_seed(0)
    model = _PooledNet().eval()
    inputs = torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    return model, inputs


def _measures():
    try:
        import skimage  # noqa: F401
    except ImportError:
        return ("spearman_abs", "spearman", "ssim")
    return ("spearman_abs", "spearman", "ssim", "hog")


def test_blind_one_by_one_explainer_fails_the_randomisation_check():
    model, inputs = _model_and_inputs()
    result = model_randomisation(_OneByOne, model, inputs, similarity=_measures())
    # each resized map is exactly constant, as the 1 x 1 map it came from
    for maps in (result.original, *result.randomised):
        flat = maps.flatten(1)
        assert bool((flat == flat[:, :1]).all())
    # two constant maps: the documented similarity 1 (what the measures give directly)
    a, b = result.original, result.randomised[0]
    torch.testing.assert_close(spearman_similarity(a, b), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(ssim_similarity(a, b), torch.ones(4, dtype=torch.float64))
    for measure, values in result.similarity.items():
        torch.testing.assert_close(
            values, torch.ones_like(values), msg=f"{measure}: {values.tolist()}"
        )


def test_blind_one_by_one_explainer_is_blind_to_the_class():
    model, inputs = _model_and_inputs()
    result = class_sensitivity(_OneByOne, model, inputs, similarity=_measures())
    for measure, values in result.similarity.items():
        torch.testing.assert_close(
            values, torch.ones(4, dtype=torch.float64), msg=f"{measure}: {values.tolist()}"
        )


def test_small_maps_are_resized_bilinearly_in_float64():
    """The resized maps are bilinear (F.interpolate's sample positions, align_corners=False)
    computed in float64: equal to an independent float64 F.interpolate up to rounding."""
    model, inputs = _model_and_inputs()
    result = model_randomisation(_Small, model, inputs, layers=["fc"])
    small = torch.rand(4, 2, 7, 7, generator=torch.Generator().manual_seed(3))
    expected = F.interpolate(
        small.double().sum(1, keepdim=True), size=(28, 28), mode="bilinear", align_corners=False
    )
    assert result.original.dtype == torch.float64
    torch.testing.assert_close(result.original, expected, rtol=0, atol=1e-14)


def test_ssim_reads_a_constant_map_with_rounding_noise_as_constant():
    """A constant map bilinearly resized by F.interpolate (values an ulp apart) is constant
    for SSIM, as minmax_normalize reads it: SSIM with another constant map is 1 (hand:
    mu = var = cov = 0 gives C1 C2 / (C1 C2)), and with a varying map the formula for a
    zero map, (C1 / (mu_b^2 + C1)) (C2 / (var_b + C2)) averaged."""
    noisy = F.interpolate(
        torch.full((3, 1, 1, 1), 0.1309), size=(28, 28), mode="bilinear", align_corners=False
    )
    assert noisy.unique().numel() > 1  # the rounding noise this is about
    constant = torch.full((3, 1, 28, 28), 0.7)
    torch.testing.assert_close(ssim_similarity(noisy, constant), torch.ones(3).double())
    metrics = pytest.importorskip("skimage.metrics")
    varying = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)).double()
    varying[:, :, 0, :2] = torch.tensor([0.0, 1.0])  # already in [0, 1]
    expected = [
        metrics.structural_similarity(
            np.zeros((28, 28)),
            varying[i, 0].numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(ssim_similarity(noisy, varying).numpy(), expected, atol=1e-10)


def test_ssim_keeps_a_small_genuine_range():
    """The rounding tolerance is relative (8 eps max|m|): a map varying by 1e-9 around 1
    is still scaled to [0, 1], as skimage computes on the scaled maps."""
    metrics = pytest.importorskip("skimage.metrics")
    generator = torch.Generator().manual_seed(5)
    a = torch.rand(2, 1, 16, 16, generator=generator, dtype=torch.float64)
    b = torch.rand(2, 1, 16, 16, generator=generator, dtype=torch.float64)
    a[:, :, 0, :2] = torch.tensor([0.0, 1.0])
    b[:, :, 0, :2] = torch.tensor([0.0, 1.0])
    ours = ssim_similarity(1 + 1e-9 * a, 1 + 1e-9 * b)
    expected = [
        metrics.structural_similarity(
            a[i, 0].numpy(),
            b[i, 0].numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for i in range(2)
    ]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6)


def _identity_window_ssim(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """Mean of the per-pixel SSIM of a one-tap window over the positions where a window of
    ``size`` fits (the sigma -> 0 limit), on maps already in [0, 1]: mu = the pixel,
    var = cov = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
    c1 = 0.01**2
    r = (size - 1) // 2
    a, b = a[r:-r, r:-r], b[r:-r, r:-r]
    return float(((2 * a * b + c1) / (a * a + b * b + c1)).mean())


@pytest.mark.parametrize("sigma", [1e-3, 1e-160, 1e-200, 5e-324])
def test_ssim_tiny_sigma_is_the_identity_window(sigma):
    generator = torch.Generator().manual_seed(7)
    a = torch.rand(3, 1, 16, 16, generator=generator, dtype=torch.float64)
    b = torch.rand(3, 1, 16, 16, generator=generator, dtype=torch.float64)
    a[:, :, 0, :2] = torch.tensor([0.0, 1.0])
    b[:, :, 0, :2] = torch.tensor([0.0, 1.0])
    ours = ssim_similarity(a, b, sigma=sigma)
    assert bool(torch.isfinite(ours).all()), ours
    expected = [_identity_window_ssim(a[i, 0].numpy(), b[i, 0].numpy(), 11) for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.7, 1.5, 3.0])
def test_ssim_ordinary_sigmas_match_scikit_image(sigma):
    """skimage's window: radius int(3.5 sigma + 0.5) (its truncate=3.5); ours the same
    side, ``window``."""
    metrics = pytest.importorskip("skimage.metrics")
    generator = torch.Generator().manual_seed(11)
    a = torch.rand(2, 1, 32, 32, generator=generator, dtype=torch.float64)
    b = (a + 0.4 * torch.rand(2, 1, 32, 32, generator=generator, dtype=torch.float64)).clamp(0, 1)
    a[:, :, 0, :2] = torch.tensor([0.0, 1.0])
    b[:, :, 0, :2] = torch.tensor([0.0, 1.0])
    window = 2 * int(3.5 * sigma + 0.5) + 1
    ours = ssim_similarity(a, b, window=window, sigma=sigma)
    expected = [
        metrics.structural_similarity(
            a[i, 0].numpy(),
            b[i, 0].numpy(),
            gaussian_weights=True,
            sigma=sigma,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for i in range(2)
    ]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-10)
