"""Audit 42: metrics fed by Captum pipelines (pointing game boxes vs layer-sized maps)."""

import pytest
import torch

from captum_ext.metrics import energy_pointing_game, pointing_game


def _cams() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 1, 7, 7)  # a layer-resolution map, as LayerGradCam gives


@pytest.mark.parametrize("game", [pointing_game, energy_pointing_game])
def test_boxes_in_image_pixels_on_layer_sized_maps_are_refused(game):
    """Boxes of a 28 x 28 image on 7 x 7 CAMs were read as map pixels and clipped: a
    quarter of the image became the whole map and every map 'hit'."""
    boxes = torch.tensor([[0, 0, 14, 14]] * 3)
    with pytest.raises(ValueError, match=r"example\(s\) \[0, 1, 2\] reaches past the 7 x 7") as e:
        game(_cams(), boxes)
    assert "LayerAttribution.interpolate" in str(e.value)
    with pytest.raises(ValueError, match=r"example\(s\) \[1\]"):
        game(_cams(), torch.tensor([[0, 0, 7, 7], [-1, 0, 3, 3], [2, 2, 4, 4]]))


def test_boxes_inside_the_maps_still_score_as_before():
    maps = torch.zeros(2, 7, 7)
    maps[0, 6, 6] = 1.0  # maximum in the last pixel: a box with x1 = y1 = 7 (exclusive) holds it
    maps[1, 0, 0] = 1.0
    boxes = torch.tensor([[5, 5, 7, 7], [1, 1, 7, 7]])
    assert pointing_game(maps, boxes).tolist() == [True, False]
    assert energy_pointing_game(maps, boxes).tolist() == [1.0, 0.0]


def test_image_sized_masks_on_layer_sized_maps_say_to_upsample():
    masks = torch.zeros(3, 28, 28, dtype=torch.bool)
    masks[:, :14, :14] = True
    with pytest.raises(ValueError, match=r"the maps are 7 x 7: give them at the masks' size"):
        pointing_game(_cams(), masks)
