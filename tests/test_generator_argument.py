"""``generator`` takes a torch.Generator or an int seed (docs/conventions.md). An int failed
deep inside torch ("randn() received an invalid combination of arguments") in these."""

from __future__ import annotations

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency

from captum_ext.attr import VOICE, ActivationMatchingMask
from captum_ext.data import corrupt
from captum_ext.inversion import (
    pen_strokes,
    pixel_range_noise,
    soft_vectors,
    transformed_inputs,
    vector_matrix,
)
from captum_ext.metrics import road_imputation

IMAGES = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
REMOVED = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(1)) < 0.4
MODEL = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 4))

CALLS = {
    "pixel_range_noise": lambda g: pixel_range_noise(4, (1, 6, 6), generator=g),
    "pen_strokes": lambda g: pen_strokes(2, (1, 12, 12), generator=g),
    "transformed_inputs": lambda g: transformed_inputs(IMAGES, 4, generator=g),
    "soft_vectors": lambda g: soft_vectors(5, 4, generator=g),
    "vector_matrix": lambda g: vector_matrix(5, 4, generator=g)[0],
    "road_imputation": lambda g: road_imputation(IMAGES, REMOVED, generator=g),
    "corrupt": lambda g: corrupt(IMAGES, "elastic", 3, generator=g),
    "ActivationMatchingMask": lambda g: ActivationMatchingMask(MODEL, ["1"]).attribute(
        IMAGES, target=0, mode="per_image", steps=3, generator=g, progress=False
    ),
    "VOICE(NoiseTunnel)": lambda g: (
        VOICE(NoiseTunnel(Saliency(MODEL)))
        .attribute(IMAGES, target=0, nt_samples=2, stdevs=0.1, generator=g)
        .uncertainty
    ),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_an_int_seed_is_a_seeded_generator(name):
    expected = CALLS[name](torch.Generator().manual_seed(7))
    torch.testing.assert_close(CALLS[name](7), expected, atol=0, rtol=0)
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator, an int seed"):
        CALLS[name]("seven")
