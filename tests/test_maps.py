"""Map post-processing: min-max normalisation of upsampled maps."""

from __future__ import annotations

import pytest
import torch

from captum_ext._utils.maps import minmax_normalize, upsample_maps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(28, 28), (224, 224), (30, 17)])
def test_an_upsampled_constant_map_normalises_to_zeros(dtype, size):
    # bilinear weights sum to 1 only up to rounding: the upsampled constant differs by a few
    # ulps between pixels, which min-max would stretch into a 0..1 pattern
    for value in (0.3, -7.1, 1e6):
        constant = torch.full((2, 1, 7, 7), value, dtype=dtype)
        normalised = minmax_normalize(upsample_maps(constant, size))
        assert torch.equal(normalised, torch.zeros_like(normalised))


def test_small_but_real_variation_is_still_stretched():
    maps = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    maps[0, 0, 0, 0] = 1e-9  # far above rounding of a map whose largest magnitude is 1e-9
    normalised = minmax_normalize(maps)
    assert normalised.max() == 1 and normalised.min() == 0
    ones = torch.ones(1, 1, 4, 4)
    ones[0, 0, 1, 1] = 1 + 1e-4  # a relative variation of 1e-4 in float32 is real
    assert minmax_normalize(ones)[0, 0, 1, 1] == 1
