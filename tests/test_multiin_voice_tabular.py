"""VOICE's read-outs on maps without a spatial dimension (what VOICE makes of tabular
(N, F) inputs): the error says what is supported and what was passed."""

import pytest
import torch
from captum.attr import Saliency
from torch import nn

from captum_ext.attr import VOICE
from captum_ext.metrics.explanation import voice_iou, voice_snr

UNSUPPORTED = r"no spatial dimension.*\(N, 1, H, W\).*tabular \(N, F\)"


def test_voice_iou_and_snr_name_maps_without_space():
    maps = torch.rand(4, 1)  # the channel average of (N, F) features
    with pytest.raises(ValueError, match=r"`explanation` has shape \(4, 1\): " + UNSUPPORTED):
        voice_iou(maps, maps)
    with pytest.raises(ValueError, match=r"`uncertainty` has shape \(4, 1\): " + UNSUPPORTED):
        voice_snr(maps)


def test_voice_on_tabular_inputs_says_what_is_supported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with pytest.raises(ValueError, match=r"tabular \(N, F\)"):
        VOICE(Saliency(model)).attribute(torch.randn(4, 10))


def test_spatial_maps_still_read():
    maps = torch.rand(3, 1, 5)  # a signal's (N, 1, L)
    assert voice_iou(maps, maps).shape == (3,)
    assert voice_snr(maps).shape == (3,)
