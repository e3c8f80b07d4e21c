"""The patch metrics of "Do explanations explain?", against loops written from the formulas."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from captum_ext.metrics.patches import (
    null_player,
    patch_class_sensitivity,
    saturation,
    single_patch,
)


def _box_sum(values, box):
    x0, y0, x1, y1 = box
    return sum(values[r][c] for r in range(y0, y1) for c in range(x0, x1))


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_patch_metrics_match_loops(batch):
    generator = torch.Generator().manual_seed(batch)
    maps_a = torch.randn(batch, 3, 12, 12, generator=generator, dtype=torch.float64)
    maps_b = torch.randn(batch, 3, 12, 12, generator=generator, dtype=torch.float64)
    boxes_a = torch.tensor([[0, 0, 4, 4]] * batch)
    boxes_b = torch.tensor([[7, 6, 11, 10]] * batch)
    np_player, np_sensitivity, np_single = [], [], []
    for i in range(batch):
        h_a = maps_a[i].sum(0).tolist()
        h_b = maps_b[i].sum(0).tolist()
        np_player.append(_box_sum(h_a, boxes_b[i].tolist()) / _box_sum(h_a, boxes_a[i].tolist()))
        abs_a = [[abs(v) for v in row] for row in h_a]
        abs_b = [[abs(v) for v in row] for row in h_b]
        low = [[min(u, v) for u, v in zip(ra, rb)] for ra, rb in zip(abs_a, abs_b)]
        shared = _box_sum(low, boxes_a[i].tolist()) + _box_sum(low, boxes_b[i].tolist())
        own = _box_sum(abs_a, boxes_a[i].tolist()) + _box_sum(abs_b, boxes_b[i].tolist())
        np_sensitivity.append(shared / own)
        inside = _box_sum(abs_a, boxes_a[i].tolist())
        total = sum(map(sum, abs_a))
        np_single.append((inside / 16) / ((total - inside) / (144 - 16)))
    np.testing.assert_allclose(null_player(maps_a, boxes_a, boxes_b).numpy(), np_player, rtol=1e-9)
    np.testing.assert_allclose(
        patch_class_sensitivity(maps_a, maps_b, boxes_a, boxes_b).numpy(), np_sensitivity, rtol=1e-9
    )
    np.testing.assert_allclose(single_patch(maps_a, boxes_a).numpy(), np_single, rtol=1e-9)


def test_ideal_and_blind_maps():
    boxes_a = torch.tensor([[0, 0, 3, 3]])
    boxes_b = torch.tensor([[5, 5, 8, 8]])
    ideal_a = torch.zeros(1, 1, 8, 8)
    ideal_a[..., :3, :3] = 1.0
    ideal_b = torch.zeros(1, 1, 8, 8)
    ideal_b[..., 5:, 5:] = 1.0
    assert null_player(ideal_a, boxes_a, boxes_b).item() == 0.0
    assert patch_class_sensitivity(ideal_a, ideal_b, boxes_a, boxes_b).item() == 0.0
    blind = ideal_a + ideal_b
    assert patch_class_sensitivity(blind, blind, boxes_a, boxes_b).item() == 1.0


def test_saturation_correlates_across_images():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(10, 1, 10, 10, generator=generator, dtype=torch.float64)
    first, second = torch.tensor([[0, 0, 3, 3]] * 10), torch.tensor([[6, 6, 9, 9]] * 10)
    expected = stats.spearmanr(
        maps[:, 0, :3, :3].sum((1, 2)), maps[:, 0, 6:9, 6:9].sum((1, 2))
    ).statistic
    assert saturation(maps, first, second) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="first_boxes"):
        saturation(maps, torch.zeros(3, 4), second)


def test_a_zero_denominator_warns_and_says_which_rows():
    """A whole-image box gave single_patch inf and all-zero maps nan from all three metrics,
    silently (one such example made a dataset mean nan)."""
    maps = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    maps[1] = 0
    box_a = torch.tensor([[0, 0, 3, 3]] * 3)
    box_b = torch.tensor([[4, 4, 8, 8]] * 3)
    with pytest.warns(RuntimeWarning, match=r"null_player: 1 of 3 examples .* \(rows 1\)"):
        values = null_player(maps, box_a, box_b)
    assert torch.isnan(values[1]) and torch.isfinite(values[[0, 2]]).all()
    with pytest.warns(RuntimeWarning, match="patch_class_sensitivity: 1 of 3"):
        assert torch.isnan(patch_class_sensitivity(maps, maps, box_a, box_b)[1])
    inside_only = torch.zeros(3, 1, 8, 8)
    inside_only[:, :, :3, :3] = 1.0
    with pytest.warns(RuntimeWarning, match="single_patch: 3 of 3"):
        assert torch.isinf(single_patch(inside_only, box_a)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where every ratio is defined
        single_patch(maps[[0, 2]], box_a[:2])


def test_single_patch_refuses_a_box_covering_the_whole_image():
    with pytest.raises(ValueError, match="`boxes`: the box of example 1 covers the whole"):
        single_patch(torch.rand(2, 1, 6, 6), torch.tensor([[0, 0, 3, 3], [0, 0, 6, 6]]))


def test_saturation_of_maps_without_mass_is_nan_with_a_warning():
    """Both copies' masses constant across images (all-zero maps) read 1.0 ("no
    saturation") through the constant-map rule of the map similarities."""
    first = torch.tensor([[0, 0, 3, 3]] * 4)
    second = torch.tensor([[4, 4, 7, 7]] * 4)
    with pytest.warns(RuntimeWarning, match="saturation: .* undefined"):
        assert np.isnan(saturation(torch.zeros(4, 1, 8, 8), first, second))
    maps = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert -1 <= saturation(maps, first, second) <= 1
