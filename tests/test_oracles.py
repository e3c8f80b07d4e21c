"""Designed oracle networks (captum_ext.testing) and the ground-truth metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, Occlusion, Saliency, ShapleyValues

from captum_ext.metrics.ground_truth import (
    attribution_f1,
    attribution_precision_recall,
    energy_pointing_game,
    pointing_game,
)
from captum_ext.testing import dominant_colour_oracle, interaction_oracle, null_region_oracle


@pytest.mark.parametrize("colours", [2, 3, 5, 8])
def test_colour_counter_logits_equal_the_analytic_counts(colours):
    oracle = dominant_colour_oracle(5, colours=colours, size=12, seed=colours)
    palette = oracle.model.palette
    # count each colour by exact pixel comparison, independently of the network
    pixels = oracle.inputs.permute(0, 2, 3, 1).reshape(5, -1, 3)
    counts = torch.stack(
        [(pixels == palette[k]).all(dim=2).sum(dim=1) for k in range(colours)], dim=1
    ).double()
    expected = counts - (counts.sum(dim=1, keepdim=True) - counts) / (colours - 1)
    with torch.no_grad():
        logits = oracle.model(oracle.inputs).double()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    assert torch.equal(oracle.target, counts.argmax(dim=1))


def test_colour_ground_truth_is_the_exact_effect_of_each_pixel():
    oracle = dominant_colour_oracle(2, colours=3, size=8, seed=1)
    x, t = oracle.inputs[:1], oracle.target[:1]
    with torch.no_grad():
        base = oracle.model(x)[0, t].item()
        for index in [(0, 0), (3, 5), (7, 7), (4, 2)]:
            blacked = x.clone()
            blacked[0, :, index[0], index[1]] = 0.0
            effect = base - oracle.model(blacked)[0, t].item()
            assert effect == pytest.approx(oracle.ground_truth[0, 0, index[0], index[1]].item())


def test_exact_methods_reach_f1_one_on_the_colour_oracle():
    oracle = dominant_colour_oracle(6, colours=4, seed=2)
    ig = IntegratedGradients(oracle.model).attribute(
        oracle.inputs, baselines=oracle.baselines, target=oracle.target, n_steps=64
    )
    occlusion = Occlusion(oracle.model).attribute(
        oracle.inputs, sliding_window_shapes=(3, 1, 1), baselines=0.0, target=oracle.target
    )
    for maps in (ig, occlusion):
        for sign in ("positive", "negative", "absolute"):
            assert bool((attribution_f1(maps, oracle.ground_truth, sign=sign) >= 0.99).all())


def test_random_maps_score_low_on_the_colour_oracle():
    oracle = dominant_colour_oracle(6, colours=4, seed=3)
    noise = torch.rand(oracle.inputs.shape, generator=torch.Generator().manual_seed(0))
    assert float(attribution_f1(noise, oracle.ground_truth).mean()) < 0.7


def test_null_region_receives_no_gradient_and_occlusion_mass():
    oracle = null_region_oracle(4, seed=5)
    saliency = Saliency(oracle.model).attribute(oracle.inputs.clone(), target=oracle.target)
    occlusion = Occlusion(oracle.model).attribute(
        oracle.inputs, sliding_window_shapes=(3, 2, 2), strides=(3, 2, 2), target=oracle.target
    )
    null = oracle.ground_truth == 0
    for maps in (saliency, occlusion):
        assert float(maps.sum(1, keepdim=True)[null].abs().max()) == 0.0
        scores = attribution_precision_recall(
            maps, oracle.ground_truth, sign="absolute", selection="nonzero"
        )
        assert bool((scores.precision == 1).all())


def test_interaction_ground_truth_is_the_shapley_value_of_each_patch():
    oracle = interaction_oracle(16, size=8, patch=2, seed=4)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.long)  # 0 = outside, 1 = patch A, 2 = patch B
    mask[..., :2, :2], mask[..., 6:, 6:] = 1, 2
    shapley = ShapleyValues(oracle.model).attribute(
        oracle.inputs,
        baselines=oracle.baselines,
        target=oracle.target,
        feature_mask=mask,
    )
    # Shapley values of the three features, spread evenly over each patch's 4 pixels
    per_pixel = torch.where(mask > 0, shapley / 4.0, 0.0)
    torch.testing.assert_close(per_pixel, oracle.ground_truth, atol=1e-6, rtol=0)


def test_interaction_table_cases():
    oracle = interaction_oracle(64, seed=0)
    lit_a = oracle.inputs[:, 0, 0, 0] == 1
    lit_b = oracle.inputs[:, 0, -1, -1] == 1
    patch_a_value = oracle.ground_truth[:, 0, 0, 0] * 16
    both_and = lit_a & lit_b & (oracle.target == 0)
    both_xor = lit_a & lit_b & (oracle.target == 1)
    assert both_and.any() and both_xor.any()
    assert torch.allclose(patch_a_value[both_and], torch.tensor(0.5))
    assert torch.allclose(patch_a_value[both_xor], torch.tensor(0.0))


def test_sample_is_reproducible_and_fresh():
    oracle = dominant_colour_oracle(3)
    a = oracle.sample(3, seed=7)
    b = oracle.sample(3, seed=7)
    c = oracle.sample(3, seed=8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def _f1_numpy(maps, truth):
    """Independent top-k F1 for sign="positive" in numpy (maps and truth (H, W))."""
    relevant = truth.ravel() > 0
    k = int(relevant.sum())
    score = maps.ravel()
    order = np.argsort(-score, kind="stable")[:k]
    marked = np.zeros_like(relevant)
    marked[order[score[order] > 0]] = True
    hits = (marked & relevant).sum()
    precision = hits / marked.sum() if marked.sum() else float(k == 0)
    recall = hits / k if k else 1.0
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_f1_matches_an_independent_computation(batch):
    generator = torch.Generator().manual_seed(batch)
    maps = torch.randn(batch, 2, 6, 6, generator=generator)
    truth = (torch.rand(batch, 1, 6, 6, generator=generator) > 0.7).double()
    ours = attribution_f1(maps, truth)
    expected = [_f1_numpy(maps[i].sum(0).numpy(), truth[i, 0].numpy()) for i in range(batch)]
    np.testing.assert_allclose(ours.numpy(), expected)


def test_f1_edge_cases_and_errors():
    empty = torch.zeros(1, 1, 3, 3)
    scores = attribution_precision_recall(empty, empty)
    assert scores.precision.item() == 1.0 and scores.recall.item() == 1.0
    with pytest.raises(ValueError, match="sign"):
        attribution_f1(empty, empty, sign="both")
    with pytest.raises(ValueError, match="ground_truth"):
        attribution_f1(torch.zeros(1, 1, 4, 4), empty)
    with pytest.raises(ValueError, match="threshold"):
        attribution_f1(empty, empty, selection="threshold", threshold=0.0)


def test_pointing_games():
    maps = torch.zeros(3, 1, 10, 10)
    maps[0, 0, 2, 2] = 1.0  # inside the box
    maps[1, 0, 9, 9] = 1.0  # far outside
    maps[2, 0, 5, 6] = 1.0  # one pixel right of the box
    boxes = torch.tensor([[1, 1, 6, 6]] * 3)  # x0, y0, x1, y1 (exclusive)
    assert pointing_game(maps, boxes).tolist() == [True, False, False]
    # TorchRay's rule: a hit within squared distance < tolerance^2 of the object, so the
    # neighbouring pixel (distance 1) needs tolerance 2, and tolerance 1 is the object only
    assert pointing_game(maps, boxes, tolerance=1).tolist() == [True, False, False]
    assert pointing_game(maps, boxes, tolerance=2).tolist() == [True, False, True]
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[:, 1:6, 1:6] = True
    assert pointing_game(maps, masks).tolist() == pointing_game(maps, boxes).tolist()
    spread = torch.ones(1, 1, 10, 10)
    spread[0, 0, 0, 0] = -5.0
    assert energy_pointing_game(spread, boxes[:1]).item() == pytest.approx(25 / 99)
    with pytest.raises(ValueError, match="objects"):
        pointing_game(maps, torch.zeros(3, 5, 5))


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        # boxes in the coordinates of a larger original image: outside the 10 x 10 maps
        (torch.tensor([[1, 1, 6, 6], [12, 12, 20, 20]]), r"example\(s\) \[1\] reaches past"),
        (torch.tensor([[1, 1, 6, 6], [3, 3, 3, 8]]), r"zero area"),
        (torch.tensor([[1.0, 1, 6, 6], [float("nan"), 1, 6, 6]]), "NaN"),
        # a soft (probability) mask, not a 0/1 one
        (torch.full((2, 10, 10), 0.3), "0 and 1"),
        (torch.zeros(2, 10, 10, dtype=torch.bool), r"example\(s\) \[0, 1\] covers no pixel"),
    ],
)
def test_pointing_games_refuse_objects_that_cover_nothing(objects, message):
    """An object with no pixel on the maps made every game a silent miss (a box scaled for the
    original image, an empty mask), and a soft mask counted every non-zero pixel as object."""
    maps = torch.rand(2, 1, 10, 10)
    for game in (pointing_game, energy_pointing_game):
        with pytest.raises(ValueError, match=message):
            game(maps, objects)


def test_pointing_game_takes_0_1_masks_of_any_dtype():
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 1, 1] = 1.0
    mask = torch.zeros(1, 4, 4)
    mask[0, 1, 1] = 1.0
    assert pointing_game(maps, mask).tolist() == [True]
    assert pointing_game(maps, mask.long()).tolist() == [True]


def test_deeplift_runs_on_the_interaction_cell_and_matches_its_shapley_values():
    from captum.attr import DeepLift

    oracle = interaction_oracle(16, size=8, patch=2, seed=6)
    maps = DeepLift(oracle.model).attribute(
        oracle.inputs.clone(), baselines=oracle.baselines, target=oracle.target
    )
    torch.testing.assert_close(maps, oracle.ground_truth, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size, fill", [(4, 0.03), (1, 0.4)])
def test_a_fill_that_colours_no_pixel_is_refused(size, fill):
    """Every image was black, every logit 0 and the target class 0 by an argmax tie."""
    with pytest.raises(ValueError, match="rounds to no coloured pixel"):
        dominant_colour_oracle(2, size=size, fill=fill)
    assert dominant_colour_oracle(2, size=1, fill=0.6).inputs.abs().sum() > 0  # rounds to 1


def test_channel_sums_are_formed_in_float64():
    """float16 maps whose channel sum passes 65,504 were refused as "NaN or infinite", and
    float32 sums merged maxima 2**24 + 1 and 2**24 (pointing game miss instead of hit)."""
    half = torch.full((1, 3, 4, 4), 30000.0, dtype=torch.float16)
    half[0, :, 1, 1] = 30010.0
    boxes = torch.tensor([[1, 1, 2, 2]])
    assert pointing_game(half, boxes).tolist() == [True]
    single = torch.zeros(1, 2, 4, 4)
    single[0, 0] = 2.0**24
    single[0, 1, 2, 2] = 1.0  # the channel sum 2**24 + 1 there: the one maximum
    assert pointing_game(single, torch.tensor([[2, 2, 3, 3]])).tolist() == [True]
    with pytest.raises(TypeError, match="`attributions` must hold real values"):
        pointing_game(torch.ones(1, 1, 4, 4, dtype=torch.complex64), boxes)
