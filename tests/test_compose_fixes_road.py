"""ROAD, completeness and soundness: ``channel_reduction`` ("sum", the signed default, or
deletion's "sum_abs"), and the documented relation of ``road(seed=...)``'s noise to
``road_imputation``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_ext._utils.seeding import combined_keys, content_keys, example_normal
from captum_ext.metrics import (
    ROAD,
    Completeness,
    Soundness,
    completeness,
    road,
    road_imputation,
    soundness,
)

PERCENTAGES = (0.2, 0.5, 0.8)
RATIOS = (0.75, 0.5, 0.25)


@pytest.fixture(scope="module")
def rgb_case():
    """A small RGB CNN, images and signed float64 three-channel maps whose channels often
    differ in sign (as integrated gradients' do)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, 5),
    ).eval()
    images = torch.randn(3, 3, 12, 12)
    maps = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    return net, images, maps


def _removal_order(pixel_map: torch.Tensor) -> torch.Tensor:
    """Most relevant first, ties by index: road's morf order of an (N, H, W) map."""
    return (-pixel_map.flatten(1)).argsort(dim=1, stable=True)


def test_sum_abs_ranks_as_the_map_summed_with_abs_first(rgb_case):
    net, images, maps = rgb_case
    summed_abs = maps.abs().sum(dim=1, keepdim=True)
    signed = maps.sum(dim=1, keepdim=True)
    # the two conventions order these pixels differently: the test can tell them apart
    assert not torch.equal(_removal_order(summed_abs[:, 0]), _removal_order(signed[:, 0]))
    options = {"noise": 0.0}
    curve = {"percentages": PERCENTAGES, **options}
    by_abs = road(net, images, maps, channel_reduction="sum_abs", **curve)
    by_hand = road(net, images, summed_abs, **curve)
    assert torch.equal(by_abs.probability, by_hand.probability)
    default = road(net, images, maps, **curve)  # unchanged: the signed sum
    assert torch.equal(default.probability, road(net, images, signed, **curve).probability)
    assert not torch.equal(default.probability, by_abs.probability)

    kept = completeness(net, images, maps, channel_reduction="sum_abs", **options)
    kept_by_hand = completeness(net, images, summed_abs, **options)
    assert torch.equal(kept.drop, kept_by_hand.drop)
    assert torch.equal(kept.removed_fraction, kept_by_hand.removed_fraction)

    steps = {"removed_fractions": RATIOS, **options}
    sound = soundness(net, images, maps, channel_reduction="sum_abs", **steps)
    sound_by_hand = soundness(net, images, summed_abs, **steps)
    assert torch.equal(sound.soundness, sound_by_hand.soundness)
    assert torch.equal(sound.false_mass, sound_by_hand.false_mass)


def test_accumulators_take_channel_reduction(rgb_case):
    net, images, maps = rgb_case
    summed_abs = maps.abs().sum(dim=1, keepdim=True)
    for kind, options in (
        (ROAD, {"percentages": PERCENTAGES}),
        (Completeness, {}),
        (Soundness, {"removed_fractions": RATIOS}),
    ):
        by_abs = kind(net, noise=0.0, channel_reduction="sum_abs", **options)
        by_hand = kind(net, noise=0.0, **options)
        by_abs.update(images, maps)
        by_hand.update(images, summed_abs)
        assert torch.equal(by_abs.per_example(), by_hand.per_example()), kind.__name__


@pytest.mark.parametrize("value", ["abs", "per_channel", None, 1])
def test_bad_channel_reduction_is_refused_by_name(rgb_case, value):
    net, images, maps = rgb_case
    for call in (
        lambda: road(net, images, maps, channel_reduction=value),
        lambda: completeness(net, images, maps, channel_reduction=value),
        lambda: soundness(net, images, maps, channel_reduction=value),
        lambda: ROAD(net, channel_reduction=value),
        lambda: Completeness(net, channel_reduction=value),
        lambda: Soundness(net, channel_reduction=value),
    ):
        with pytest.raises(ValueError, match="`channel_reduction`"):
            call()


def test_road_noise_is_keyed_by_seed_itself_not_by_road_imputation_generator(rgb_case):
    """road's docstring: each image is road_imputation(image, removed, noise=0) plus
    noise * removed * z, z keyed by `seed` itself, the example's pixels and the mask;
    road_imputation(generator=seed) draws other noise (it first draws a seed)."""
    net, images, maps = rgb_case
    seed, noise = 3, 0.05
    n, _, h, w = images.shape
    order = _removal_order(maps.sum(dim=1))
    position = torch.empty_like(order).scatter_(1, order, torch.arange(h * w).expand(n, -1))
    with torch.no_grad():
        target = net(images).argmax(dim=1)
    by_hand, by_generator = [], []
    for fraction in PERCENTAGES:
        removed = (position < round(fraction * h * w)).view(n, h, w)
        keys = combined_keys(content_keys(images, seed), content_keys(removed, seed))
        z = example_normal(keys, 1, tuple(images.shape[1:]), images.dtype)
        image = road_imputation(images, removed, noise=0.0) + noise * removed[:, None] * z
        other = road_imputation(images, removed, noise=noise, generator=seed)
        with torch.no_grad():
            by_hand.append(net(image).softmax(1).gather(1, target[:, None])[:, 0])
            by_generator.append(net(other).softmax(1).gather(1, target[:, None])[:, 0])
    curves = road(net, images, maps, percentages=PERCENTAGES, noise=noise, seed=seed)
    torch.testing.assert_close(curves.probability, torch.stack(by_hand, dim=1))
    assert not torch.allclose(curves.probability, torch.stack(by_generator, dim=1))
    plain = road(net, images, maps, percentages=PERCENTAGES, noise=0.0, seed=seed)
    with torch.no_grad():
        exact = [
            net(road_imputation(images, (position < round(f * h * w)).view(n, h, w), noise=0.0))
            .softmax(1)
            .gather(1, target[:, None])[:, 0]
            for f in PERCENTAGES
        ]
    torch.testing.assert_close(plain.probability, torch.stack(exact, dim=1))
