"""The ground-truth metrics' errors for maps of another size advise the bilinear resizing
the package itself uses (a CAM's upsample_to_input=True, or LayerAttribution.interpolate
with interpolate_mode='bilinear'), not LayerAttribution.interpolate's nearest default."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from captum_ext.metrics import attribution_f1, energy_pointing_game, pointing_game

ADVICE = re.compile(
    r"upsample_to_input=True.*LayerAttribution\.interpolate\(maps, size, "
    r"interpolate_mode='bilinear'\)",
    re.S,
)


def _refusal(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    return str(error.value)


def test_every_resize_message_advises_bilinear():
    small = torch.rand(2, 1, 7, 7)
    masks = torch.zeros(2, 28, 28, dtype=torch.bool)
    masks[:, 10:20, 10:20] = True
    image_boxes = torch.tensor([[0.0, 0.0, 28.0, 28.0]] * 2)  # image pixels, 7 x 7 maps
    messages = [
        _refusal(lambda: attribution_f1(small, masks)),
        _refusal(lambda: pointing_game(small, masks)),
        _refusal(lambda: energy_pointing_game(small, image_boxes)),
    ]
    for message in messages:
        assert ADVICE.search(message), message


def test_the_advised_resizing_is_the_bilinear_one():
    """What the message names equals F.interpolate(mode='bilinear'), the resizing of the
    package's own upsample_to_input, deletion and ROAD."""
    from captum.attr import LayerAttribution

    small = torch.rand(2, 1, 7, 7, dtype=torch.float64)
    advised = LayerAttribution.interpolate(small, (28, 28), interpolate_mode="bilinear")
    bilinear = F.interpolate(small, (28, 28), mode="bilinear", align_corners=False)
    torch.testing.assert_close(advised, bilinear, rtol=0, atol=0)
