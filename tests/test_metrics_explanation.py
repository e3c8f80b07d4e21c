"""Deletion / insertion (pixel and structure-wise), masking and the VOICE read-outs.

Expected values are written out by hand (explicit formulas on tiny inputs) or come from an
independent implementation: a heapq reference of Huffman code lengths, pytorch-grad-cam's
metrics (multiply-by-CAM confidence, ROAD's most/least-relevant-first masking) and, when it is
installed, Quantus' PixelFlipping.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from captum_ext._utils.maps import upsample_keeping_ties
from captum_ext.metrics import (
    PerturbationCurves,
    StructureCurves,
    deletion,
    deletion_curves,
    insertion,
    insertion_curves,
    masking_score,
    structure_deletion,
    structure_insertion,
    voice_iou,
    voice_snr,
)
from captum_ext.metrics._huffman import (
    huffman_bits,
    huffman_bits_of_images,
    huffman_code_lengths,
)
from captum_ext.metrics.explanation import _gaussian_blur

F64 = torch.float64


def sigmoid(z: float) -> float:
    # softmax([z, 0])[0]
    return 1.0 / (1.0 + math.exp(-z))


def trapezoid(xs, ys) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


class LinearTwoClass(nn.Module):
    """logits = [w . x + bias, 0] on the flattened input."""

    def __init__(self, weights, bias: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(weights, dtype=F64))
        self.bias = bias

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.bias
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def tensor(values, shape):
    return torch.tensor(values, dtype=F64).reshape(shape)


# ---------------------------------------------------------------------------------------------
# deletion / insertion by hand


W4 = [1.0, 2.0, 3.0, 4.0]
X4 = [0.5, 1.0, -1.0, 2.0]
A4 = [0.1, 0.4, 0.3, 0.2]  # order: pixel 1, 2, 3, 0


def test_deletion_four_pixels_by_hand():
    model = LinearTwoClass(W4)
    x = tensor(X4, (1, 1, 2, 2))
    attr = tensor(A4, (1, 1, 2, 2))
    # w . x = 0.5 + 2 - 3 + 8 = 7.5; deleting (baseline 0) pixels 1, 2, 3, 0 in turn
    z = [7.5, 7.5 - 2.0, 7.5 - 2.0 + 3.0, 7.5 - 2.0 + 3.0 - 8.0, 0.0]
    expected = [sigmoid(v) for v in z]
    fractions = [0.0, 0.25, 0.5, 0.75, 1.0]
    out = deletion_curves(model, x, attr, target=0, n_steps=4)
    assert isinstance(out, PerturbationCurves)
    torch.testing.assert_close(out.curves, torch.tensor([expected], dtype=F64))
    torch.testing.assert_close(out.fractions, torch.tensor(fractions, dtype=F64))
    torch.testing.assert_close(out.auc, torch.tensor([trapezoid(fractions, expected)], dtype=F64))
    # the default target is the predicted class (0 here: 7.5 > 0)
    torch.testing.assert_close(deletion(model, x, attr, n_steps=4), out.auc)
    # the other class follows 1 - p
    other = deletion_curves(model, x, attr, target=1, n_steps=4)
    torch.testing.assert_close(other.curves, 1 - out.curves)


def test_insertion_four_pixels_by_hand_with_a_baseline_value():
    model = LinearTwoClass(W4)
    x = tensor(X4, (1, 1, 2, 2))
    attr = tensor(A4, (1, 1, 2, 2))
    b = 0.5  # start from all 0.5: w . b = 5; then pixels 1, 2, 3, 0 take their values
    z0 = 5.0
    z = [
        z0,
        z0 + 2.0 * (1.0 - b),
        z0 + 2.0 * (1.0 - b) + 3.0 * (-1.0 - b),
        z0 + 2.0 * (1.0 - b) + 3.0 * (-1.0 - b) + 4.0 * (2.0 - b),
        7.5,
    ]
    expected = [sigmoid(v) for v in z]
    out = insertion_curves(model, x, attr, target=0, baselines=b, n_steps=4)
    torch.testing.assert_close(out.curves, torch.tensor([expected], dtype=F64))
    fractions = [0.0, 0.25, 0.5, 0.75, 1.0]
    torch.testing.assert_close(out.auc, torch.tensor([trapezoid(fractions, expected)], dtype=F64))


def test_steps_round_half_up_and_fractions_follow_the_pixels():
    model = LinearTwoClass(W4)
    x = tensor(X4, (1, 1, 2, 2))
    attr = tensor(A4, (1, 1, 2, 2))
    # n_steps = 3: k_s = floor(4 s / 3 + 1/2) = 0, 1, 3, 4 pixels
    out = deletion_curves(model, x, attr, target=0, n_steps=3)
    torch.testing.assert_close(out.fractions, torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=F64))
    z = [7.5, 5.5, 7.5 - 2.0 + 3.0 - 8.0, 0.0]
    expected = [sigmoid(v) for v in z]
    torch.testing.assert_close(out.curves, torch.tensor([expected], dtype=F64))
    torch.testing.assert_close(
        out.auc, torch.tensor([trapezoid([0, 0.25, 0.75, 1], expected)], dtype=F64)
    )
    # n_steps = 8 > pixels: k_s = 0, 1, 1, 2, 2, 3, 3, 4, 4
    many = deletion_curves(model, x, attr, target=0, n_steps=8)
    counts = (many.fractions * 4).round().long().tolist()
    assert counts == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_ties_are_broken_by_pixel_index_and_one_channel_maps_keep_their_sign():
    model = LinearTwoClass(W4)
    x = tensor([1.0, 1.0, 1.0, 1.0], (1, 1, 2, 2))
    ties = torch.ones(1, 1, 2, 2, dtype=F64)
    out = deletion_curves(model, x, ties, target=0, n_steps=4)
    z = [10.0, 9.0, 7.0, 4.0, 0.0]  # pixels 0, 1, 2, 3 in index order
    torch.testing.assert_close(out.curves, torch.tensor([[sigmoid(v) for v in z]], dtype=F64))
    # a signed one-channel map is ranked by value: -5 comes last, not first
    signed = tensor([-5.0, 1.0, 0.0, 0.5], (1, 1, 2, 2))  # order 1, 3, 2, 0
    out = deletion_curves(model, x, signed, target=0, n_steps=4)
    z = [10.0, 8.0, 4.0, 1.0, 0.0]
    torch.testing.assert_close(out.curves, torch.tensor([[sigmoid(v) for v in z]], dtype=F64))


def test_mean_and_tensor_baselines_by_hand():
    model = LinearTwoClass(W4)
    x = tensor(X4, (1, 1, 2, 2))
    attr = tensor(A4, (1, 1, 2, 2))
    m = (0.5 + 1.0 - 1.0 + 2.0) / 4  # the image's channel mean, 0.625
    z = [
        7.5,
        7.5 + 2.0 * (m - 1.0),
        7.5 + 2.0 * (m - 1.0) + 3.0 * (m + 1.0),
        7.5 + 2.0 * (m - 1.0) + 3.0 * (m + 1.0) + 4.0 * (m - 2.0),
        10.0 * m,
    ]
    expected = torch.tensor([[sigmoid(v) for v in z]], dtype=F64)
    out = deletion_curves(model, x, attr, target=0, baselines="mean", n_steps=4)
    torch.testing.assert_close(out.curves, expected)
    as_tensor = deletion_curves(
        model,
        x,
        attr,
        target=0,
        baselines=torch.full((1, 1, 1, 1), m),
        n_steps=4,
    )
    torch.testing.assert_close(as_tensor.curves, expected)


# ---------------------------------------------------------------------------------------------
# a perfect attribution beats random ones


class KnownPixels(nn.Module):
    """Class 0 is decided by 5 known pixels of an 8 x 8 image only."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(64, dtype=F64)
        mask[[3, 17, 30, 42, 60]] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        z = 2.0 * (x.flatten(1) * self.mask).sum(1) - 4.0
        return torch.stack([z, torch.zeros_like(z), -z], dim=1)


def test_the_true_pixels_beat_random_attributions():
    model = KnownPixels()
    gen = torch.Generator().manual_seed(0)
    x = 0.3 * torch.rand(1, 1, 8, 8, generator=gen, dtype=F64)
    x.view(-1)[[3, 17, 30, 42, 60]] = 1.5  # z = 11 on the clean image: class 0
    truth = model.mask.view(1, 1, 8, 8) + 0.01 * x  # true pixels first
    seeds = range(6)
    randoms = torch.cat(
        [
            torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(s), dtype=F64)
            for s in seeds
        ]
    )
    maps = torch.cat([truth, randoms])
    images = x.expand(len(maps), -1, -1, -1)
    for baselines in (0.0, "mean", "blur"):
        d = deletion(model, images, maps, n_steps=16, baselines=baselines)
        i = insertion(model, images, maps, n_steps=16, baselines=baselines)
        assert bool((d[0] < d[1:]).all()), (baselines, d)
        assert bool((i[0] > i[1:]).all()), (baselines, i)
    sd = structure_deletion(model, images, maps)
    si = structure_insertion(model, images, maps)
    # deleting the true pixels drops the class at every threshold
    assert bool((sd.scores[0] < 0.5).all())
    assert bool((si.scores[0, -1] > si.scores[1:, -1]).all())


# ---------------------------------------------------------------------------------------------
# batching, chunking, resolution and channels


@pytest.fixture
def cnn_case():
    model = make_tiny_cnn()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 6, 6, generator=gen, dtype=F64)
    attr = torch.randn(4, 3, 6, 6, generator=gen, dtype=F64)
    return model, x, attr


@pytest.fixture(params=[1, 4, 5], ids=lambda n: f"batch{n}")
def cnn_batch(request):
    n = request.param
    model = make_tiny_cnn()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 6, 6, generator=gen, dtype=F64)
    attr = torch.randn(n, 3, 6, 6, generator=gen, dtype=F64)
    return model, x, attr


@pytest.mark.parametrize(
    ("metric", "curves_metric"), [(deletion, deletion_curves), (insertion, insertion_curves)]
)
def test_batch_equals_one_by_one_and_chunking_changes_nothing(metric, curves_metric, cnn_batch):
    model, x, attr = cnn_batch
    n = x.shape[0]
    before = model_snapshot(model)
    full = curves_metric(model, x, attr, n_steps=6, baselines="blur")
    assert full.curves.shape == (n, 7) and full.fractions.shape == (7,)
    singles = torch.cat(
        [
            metric(model, x[i : i + 1], attr[i : i + 1], n_steps=6, baselines="blur")
            for i in range(n)
        ]
    )
    # float64: batched and single-example convolutions differ only by summation order
    torch.testing.assert_close(full.auc, singles, rtol=1e-12, atol=1e-12)
    for batch_size in (1, 3, None):
        chunked = curves_metric(model, x, attr, n_steps=6, baselines="blur", batch_size=batch_size)
        torch.testing.assert_close(chunked.curves, full.curves, rtol=1e-12, atol=1e-12)
    assert_model_unchanged(model, before)


def test_model_state_is_restored_also_in_train_mode_and_when_raising(cnn_case):
    model, x, attr = cnn_case
    model.train()
    model.features[0].weight.requires_grad_(False)
    before = model_snapshot(model)
    torch.manual_seed(0)
    deletion(model, x, attr, n_steps=2)
    assert_model_unchanged(model, before)
    with pytest.raises(ValueError, match="target"):
        deletion(model, x, attr, target=9, n_steps=2)
    assert_model_unchanged(model, before)


def test_layer_resolution_attributions_are_upsampled(cnn_case):
    model, x, _ = cnn_case
    small = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    big = F.interpolate(small, size=(6, 6), mode="bilinear", align_corners=False)
    for metric in (deletion, insertion):
        torch.testing.assert_close(
            metric(model, x, small, n_steps=5), metric(model, x, big, n_steps=5)
        )
    # (N, h, w) maps are read as one channel
    torch.testing.assert_close(
        deletion(model, x, small[:, 0], n_steps=5), deletion(model, x, big, n_steps=5)
    )
    sd_small = structure_deletion(model, x, small)
    sd_big = structure_deletion(model, x, big)
    torch.testing.assert_close(sd_small.scores, sd_big.scores)


def test_sum_abs_ranks_pixels_by_the_summed_magnitude(cnn_case):
    model, x, attr = cnn_case
    reduced = attr.abs().sum(1, keepdim=True)
    for metric in (deletion, insertion):
        torch.testing.assert_close(
            metric(model, x, attr, n_steps=4, channel_reduction="sum_abs"),
            metric(model, x, reduced, n_steps=4),
        )


def test_per_channel_and_sum_abs_by_hand():
    # C = 2 channels of 2 pixels; logits [w . x, 0] over (c0p0, c0p1, c1p0, c1p1)
    model = LinearTwoClass([1.0, 2.0, 3.0, 4.0])
    x = tensor([1.0, 1.0, 1.0, 1.0], (1, 2, 1, 2))
    attr = tensor([0.5, -3.0, 2.0, 1.0], (1, 2, 1, 2))
    # per_channel: entries by signed value: c1p0 (2.0), c1p1 (1.0), c0p0 (0.5), c0p1 (-3.0)
    per = deletion_curves(model, x, attr, target=0, n_steps=4, channel_reduction="per_channel")
    z = [10.0, 10.0 - 3.0, 10.0 - 3.0 - 4.0, 10.0 - 3.0 - 4.0 - 1.0, 0.0]
    torch.testing.assert_close(per.curves, torch.tensor([[sigmoid(v) for v in z]], dtype=F64))
    # sum_abs: pixel 1 (|-3| + 1 = 4) before pixel 0 (0.5 + 2 = 2.5), both channels at once
    whole = deletion_curves(model, x, attr, target=0, n_steps=2)
    z = [10.0, 10.0 - 2.0 - 4.0, 0.0]
    torch.testing.assert_close(whole.curves, torch.tensor([[sigmoid(v) for v in z]], dtype=F64))
    torch.testing.assert_close(whole.fractions, torch.tensor([0.0, 0.5, 1.0], dtype=F64))


def test_additional_forward_args_follow_the_rows():
    class Scaled(nn.Module):
        def forward(self, x, scale):
            z = x.flatten(1).sum(1) * scale
            return torch.stack([z, -z], dim=1)

    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    attr = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    scale = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    got = deletion(Scaled(), x, attr, n_steps=4, batch_size=4, additional_forward_args=(scale,))
    for i in range(3):
        one = deletion(
            Scaled(),
            x[i : i + 1],
            attr[i : i + 1],
            n_steps=4,
            additional_forward_args=scale[i : i + 1],
        )
        torch.testing.assert_close(got[i : i + 1], one)


def test_blur_is_a_separable_gaussian_with_replicate_padding():
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1), dtype=F64)
    size, sigma = 5, 1.3
    g = [math.exp(-((i - 2) ** 2) / (2 * sigma**2)) for i in range(size)]
    g = torch.tensor(g, dtype=F64) / sum(g)
    kernel2d = torch.outer(g, g).expand(3, 1, size, size)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    expected = F.conv2d(padded, kernel2d, groups=3)
    torch.testing.assert_close(_gaussian_blur(x, size, sigma), expected)
    model = make_tiny_cnn()
    x6 = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    attr = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    by_name = deletion(model, x6, attr, baselines="blur", blur_kernel_size=3, blur_sigma=0.7)
    by_tensor = deletion(model, x6, attr, baselines=_gaussian_blur(x6, 3, 0.7))
    torch.testing.assert_close(by_name, by_tensor)


# ---------------------------------------------------------------------------------------------
# Huffman code lengths against an independent reference


def reference_huffman_bits(counts) -> int:
    """Depth bookkeeping: every merge puts each symbol of both groups one level deeper."""
    groups = [(c, i, [i]) for i, c in enumerate(counts) if c > 0]
    if not groups:
        return 0
    if len(groups) == 1:
        return groups[0][0]
    depth = dict.fromkeys(range(len(counts)), 0)
    heapq.heapify(groups)
    tie = len(counts)
    while len(groups) > 1:
        wa, _, sa = heapq.heappop(groups)
        wb, _, sb = heapq.heappop(groups)
        for symbol in sa + sb:
            depth[symbol] += 1
        heapq.heappush(groups, (wa + wb, tie, sa + sb))
        tie += 1
    return sum(c * depth[i] for i, c in enumerate(counts))


def test_huffman_known_case():
    counts = [5, 9, 12, 13, 16, 45]  # a..f, the textbook example
    assert huffman_bits(counts) == 224
    assert reference_huffman_bits(counts) == 224
    lengths = huffman_code_lengths(counts)
    assert lengths == [4, 4, 3, 3, 3, 1]
    assert sum(c * n for c, n in zip(counts, lengths)) == 224


def test_huffman_single_symbol_and_empty():
    assert huffman_bits([0, 7, 0]) == 7  # 1 bit per occurrence by convention
    assert huffman_code_lengths([0, 7, 0]) == [0, 1, 0]
    assert huffman_bits([]) == 0 and huffman_bits([0, 0]) == 0
    assert huffman_code_lengths([0, 0]) == [0, 0]
    assert huffman_bits([3, 5]) == 8
    with pytest.raises(ValueError, match="non-negative"):
        huffman_bits([1, -1])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1000), max_size=300))
def test_huffman_matches_the_reference(counts):
    expected = reference_huffman_bits(counts)
    assert huffman_bits(counts) == expected
    lengths = huffman_code_lengths(counts)
    assert sum(c * n for c, n in zip(counts, lengths)) == expected
    used = [n for c, n in zip(counts, lengths) if c]
    assert all(n == 0 for c, n in zip(counts, lengths) if not c)
    if len(used) >= 2:  # a full binary tree: Kraft's sum is exactly 1
        assert sum(2.0**-n for n in used) == 1.0


def test_huffman_bits_of_images_counts_each_row():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 256, (5, 3, 4, 4), generator=gen)
    values[1] = 17
    got = huffman_bits_of_images(values)
    for row, bits in zip(values, got.tolist()):
        counts = np.bincount(row.flatten().numpy(), minlength=256).tolist()
        assert bits == reference_huffman_bits(counts)
    assert got[1] == 48


# ---------------------------------------------------------------------------------------------
# structure-wise deletion / insertion by hand

X6 = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # to 8 bits: 0, 51, 102, 153, 204, 255
W6 = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
A6 = [0.0, 1.0, 0.1, 0.5, 0.7, 0.3]  # already min-max normalised
T3 = (0.0, 0.2, 0.6)


def test_structure_deletion_by_hand():
    model = LinearTwoClass(W6, bias=-7.0)  # w . x = 14: z = 7, class 0
    x = tensor(X6, (1, 1, 2, 3))
    attr = tensor(A6, (1, 1, 2, 3))
    # original: 6 distinct values once each: Huffman lengths 2, 2, 3, 3, 3, 3 = 16 bits
    # t = 0.0: delete 1..5 -> all 0: one symbol, 6 bits
    # t = 0.2: delete 1, 3, 4, 5 -> (0, 0, .4, 0, 0, 0): {5, 1}: 6 bits
    # t = 0.6: delete 1, 4 -> (0, 0, .4, .6, 0, 1): {3, 1, 1, 1}: 2 + 3 + 6 = 11 bits
    ratios = [6 / 16, 6 / 16, 11 / 16]
    z = [-7.0, 3 * 0.4 - 7.0, 3 * 0.4 + 4 * 0.6 + 6 * 1.0 - 7.0]
    scores = [sigmoid(v) for v in z]
    out = structure_deletion(model, x, attr, thresholds=T3)
    assert isinstance(out, StructureCurves)
    torch.testing.assert_close(out.ratios, torch.tensor([ratios], dtype=F64))
    torch.testing.assert_close(out.scores, torch.tensor([scores], dtype=F64))
    area = (11 / 16 - 6 / 16) * (scores[1] + scores[2]) / 2  # the two 6/16 points add 0
    torch.testing.assert_close(out.area, torch.tensor([area], dtype=F64))
    accuracy = structure_deletion(model, x, attr, thresholds=T3, score="accuracy")
    torch.testing.assert_close(accuracy.scores, torch.tensor([[0.0, 0.0, 1.0]], dtype=F64))
    torch.testing.assert_close(accuracy.area, torch.tensor([(11 / 16 - 6 / 16) * 0.5], dtype=F64))


def test_structure_insertion_by_hand():
    model = LinearTwoClass(W6, bias=-7.0)
    x = tensor(X6, (1, 1, 2, 3))
    attr = tensor(A6, (1, 1, 2, 3))
    # t = 0.0: keep 1..5 -> the image itself: 16 bits
    # t = 0.2: keep 1, 3, 4, 5 -> (0, .2, 0, .6, .8, 1): {2, 1, 1, 1, 1}: 2+2+4+6 = 14 bits
    # t = 0.6: keep 1, 4 -> (0, .2, 0, 0, .8, 0): {4, 1, 1}: 2 + 6 = 8 bits
    ratios = [1.0, 14 / 16, 8 / 16]
    z = [7.0, 2 * 0.2 + 4 * 0.6 + 5 * 0.8 + 6 * 1.0 - 7.0, 2 * 0.2 + 5 * 0.8 - 7.0]
    scores = [sigmoid(v) for v in z]
    out = structure_insertion(model, x, attr, thresholds=T3, target=0)
    torch.testing.assert_close(out.ratios, torch.tensor([ratios], dtype=F64))
    torch.testing.assert_close(out.scores, torch.tensor([scores], dtype=F64))
    area = trapezoid([0.5, 14 / 16, 1.0], [scores[2], scores[1], scores[0]])
    torch.testing.assert_close(out.area, torch.tensor([area], dtype=F64))
    # a to_uint8 that maps everything to one value: every image costs 1 bit per pixel
    flat = structure_insertion(model, x, attr, thresholds=T3, to_uint8=torch.zeros_like)
    torch.testing.assert_close(flat.ratios, torch.ones(1, 3, dtype=F64))
    # the default quantisation uses the original's range: a baseline below it clamps to 0
    low = structure_insertion(model, x, attr, thresholds=T3, baselines=-5.0)
    torch.testing.assert_close(low.ratios, out.ratios)


def test_structure_chunking_and_batch(cnn_batch):
    model, x, attr = cnn_batch
    n = x.shape[0]
    full = structure_deletion(model, x, attr, baselines="mean")
    assert full.ratios.shape == (n, 10) and full.scores.shape == (n, 10)
    for batch_size in (1, 3):
        chunked = structure_deletion(model, x, attr, baselines="mean", batch_size=batch_size)
        torch.testing.assert_close(chunked.ratios, full.ratios)
        torch.testing.assert_close(chunked.scores, full.scores, rtol=1e-12, atol=1e-12)
    last = n - 1
    one = structure_deletion(model, x[last:], attr[last:], baselines="mean")
    torch.testing.assert_close(one.ratios, full.ratios[last:])


# ---------------------------------------------------------------------------------------------
# masking


def test_masking_score_by_hand():
    model = LinearTwoClass(W4)
    x = tensor(X4, (1, 1, 2, 2))
    heat = tensor([1.0, 0.5, 0.0, 0.25], (1, 1, 2, 2))
    z = 1.0 * 0.5 * 1.0 + 2.0 * 1.0 * 0.5 + 3.0 * -1.0 * 0.0 + 4.0 * 2.0 * 0.25  # 3.5
    got = masking_score(model, x, heat)
    torch.testing.assert_close(got, torch.tensor([sigmoid(z)], dtype=F64))
    torch.testing.assert_close(
        masking_score(model, x, heat, target=1), torch.tensor([1 - sigmoid(z)], dtype=F64)
    )
    # a low-resolution constant heatmap is upsampled (still 0.4 everywhere)
    half = torch.full((1, 1, 1, 1), 0.4, dtype=F64)
    torch.testing.assert_close(
        masking_score(model, x, half), torch.tensor([sigmoid(0.4 * 7.5)], dtype=F64)
    )
    # correctness of the original prediction (class 0): flips when the heatmap keeps pixel 2
    flip = tensor([0.0, 0.0, 1.0, 0.0], (1, 1, 2, 2))  # z = -3
    assert masking_score(model, x, flip, score="correct").tolist() == [0.0]
    assert masking_score(model, x, heat, score="correct").tolist() == [1.0]


# ---------------------------------------------------------------------------------------------
# VOICE read-outs


def test_voice_iou_by_hand():
    a = tensor([0.0, 0.05, 0.5, 1.0], (1, 2, 2))  # mask: pixels 2, 3
    b = tensor([2.0, 4.0, 6.0, 10.0], (1, 2, 2))  # normalised 0, .25, .5, 1: pixels 1, 2, 3
    s = 1e-6
    torch.testing.assert_close(voice_iou(a, b), torch.tensor([(2 + s) / (3 + s)], dtype=F64))
    # batched, (N, 1, H, W) like (N, H, W)
    both = voice_iou(torch.stack([a, b]), torch.stack([b, b]))
    torch.testing.assert_close(both, torch.tensor([(2 + s) / (3 + s), 1.0], dtype=F64))
    # constant maps: empty masks, no NaN
    flat = torch.full((1, 2, 2), 0.3, dtype=F64)
    torch.testing.assert_close(voice_iou(flat, flat), torch.tensor([1.0], dtype=F64))
    torch.testing.assert_close(voice_iou(flat, b), torch.tensor([s / (3 + s)], dtype=F64))
    assert voice_iou(a, b, threshold=0.6).tolist() == pytest.approx([(1 + s) / (1 + s)])


def test_voice_snr_by_hand():
    u = tensor([0.0, 1.0, 1.0, 2.0], (1, 1, 2, 2))  # mean 1, population std sqrt(1/2)
    torch.testing.assert_close(voice_snr(u), torch.tensor([math.sqrt(2.0)], dtype=F64))
    v = tensor([1.0, 2.0, 3.0, 4.0], (1, 2, 2))  # mean 2.5, std sqrt(1.25)
    maps = torch.stack(
        [u[:, 0], v, torch.full((1, 2, 2), 0.1, dtype=F64), torch.zeros(1, 2, 2, dtype=F64)]
    )[:, 0]
    got = voice_snr(maps)
    expected = [math.sqrt(2.0), 2.5 / math.sqrt(1.25), 0.0, 0.0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64))
    assert not bool(torch.isnan(got).any())
    # a constant 0.1 map on many pixels: the mean is not exactly 0.1, the answer is still 0
    assert voice_snr(torch.full((2, 1, 7, 9), 0.1)).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# cross-checks with peers


def test_masking_score_equals_pytorch_grad_cam_cam_mult_image():
    """pytorch-grad-cam 1.5: CamMultImageConfidenceChange(return_diff=False) is the softmax
    score of the target on input * cam. Its scores are cast to float32: tolerance 1e-6."""
    cam_mult = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, gen = make_tiny_cnn(), torch.Generator().manual_seed(11)
    x = torch.randn(5, 3, 6, 6, generator=gen, dtype=F64)
    cams = torch.rand(5, 6, 6, generator=gen, dtype=F64)
    targets = [0, 3, 1, 4, 2]
    theirs = cam_mult.CamMultImageConfidenceChange()(
        x,
        cams.numpy(),
        [ClassifierOutputSoftmaxTarget(t) for t in targets],
        model,
        return_diff=False,
    )
    ours = masking_score(model, x, cams, target=targets)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("percentile", [25, 50, 75])
def test_deletion_and_insertion_points_equal_pytorch_grad_cam_road_masking(percentile):
    """pytorch-grad-cam 1.5's ROAD removes pixels above (most relevant first) or keeps pixels
    above (least relevant first) a percentile of the CAM. With an imputer that writes the
    baseline (instead of ROAD's noisy linear infill) these are our deletion / insertion steps:
    36 distinct values, percentile p -> (100 - p) / 25 or p / 25 steps of n_steps = 4.
    Scores are cast to float32 there: tolerance 1e-6."""
    pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, gen = make_tiny_cnn(), torch.Generator().manual_seed(12)
    x = torch.randn(3, 3, 6, 6, generator=gen, dtype=F64)
    cams = torch.rand(3, 6, 6, generator=gen, dtype=F64)
    baseline = 0.25
    targets = [2, 0, 4]

    def impute(image, keep):  # keep: 1 where the pixel stays
        return image * keep + baseline * (1 - keep)

    wrapped = [ClassifierOutputSoftmaxTarget(t) for t in targets]
    morf = PerturbationConfidenceMetric(RemoveMostRelevantFirst(percentile, impute))
    lerf = PerturbationConfidenceMetric(RemoveLeastRelevantFirst(percentile, impute))
    removed = morf(x, cams.numpy(), wrapped, model, return_diff=False)
    kept = lerf(x, cams.numpy(), wrapped, model, return_diff=False)
    kw = dict(target=targets, baselines=baseline, n_steps=4)
    ours_del = deletion_curves(model, x, cams[:, None], **kw)
    ours_ins = insertion_curves(model, x, cams[:, None], **kw)
    np.testing.assert_allclose(ours_del.curves[:, (100 - percentile) // 25], removed, atol=1e-6)
    np.testing.assert_allclose(ours_ins.curves[:, percentile // 25], kept, atol=1e-6)


def test_deletion_curve_equals_quantus_pixel_flipping():
    """Quantus 0.6 PixelFlipping (optional: skipped when quantus is not installed) flips
    ``features_in_step`` pixels per step, most relevant first, and reads the softmax of the
    label: our deletion curve without its step 0. Its "black" baseline is the minimum of the
    image being perturbed, which replacing pixels by it leaves unchanged, so it equals our
    tensor baseline of each image's minimum ("mean" would not match: Quantus recomputes it on
    the already perturbed image at every step). float32 throughout: tolerance 1e-5."""
    quantus = pytest.importorskip("quantus")

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)
    ).eval()
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 1, 6, 6, generator=gen)
    a = torch.rand(4, 1, 6, 6, generator=gen)
    y = model(x).argmax(1)
    metric = quantus.PixelFlipping(
        features_in_step=4,
        perturb_baseline="black",
        abs=False,
        normalise=False,
        disable_warnings=True,
    )
    theirs = np.asarray(
        metric(
            model=model,
            x_batch=x.numpy(),
            y_batch=y.numpy(),
            a_batch=a.numpy(),
            device="cpu",
            channel_first=True,
        )
    )
    lowest = x.amin(dim=(1, 2, 3), keepdim=True)
    ours = deletion_curves(model, x, a, target=y, baselines=lowest, n_steps=9)
    np.testing.assert_allclose(ours.curves[:, 1:].detach().numpy(), theirs, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_argument(cnn_case):
    model, x, attr = cnn_case
    with pytest.raises(ValueError, match="`attributions` has 3 examples"):
        deletion(model, x, attr[:3])
    with pytest.raises(ValueError, match="`attributions` has 2 channels"):
        insertion(model, x, attr[:, :2])
    with pytest.raises(ValueError, match="`n_steps`"):
        deletion(model, x, attr, n_steps=0)
    with pytest.raises(ValueError, match="`baselines`='zeros'"):
        deletion(model, x, attr, baselines="zeros")
    with pytest.raises(ValueError, match="`baselines` has shape"):
        deletion(model, x, attr, baselines=torch.zeros(2, 3, 6, 6))
    with pytest.raises(ValueError, match="`target`"):
        insertion(model, x, attr, target=5)
    with pytest.raises(ValueError, match="`target` must give one class"):
        deletion(model, x, attr, target="all")
    with pytest.raises(ValueError, match="`channel_reduction`"):
        deletion(model, x, attr, channel_reduction="max")
    with pytest.raises(ValueError, match="`batch_size`"):
        deletion(model, x, attr, batch_size=0)
    with pytest.raises(ValueError, match="`blur_kernel_size`"):
        deletion(model, x, attr, baselines="blur", blur_kernel_size=4)
    with pytest.raises(ValueError, match="`inputs`"):
        deletion(model, x[:, 0], attr)
    with pytest.raises(ValueError, match="`thresholds`"):
        structure_deletion(model, x, attr, thresholds=())
    with pytest.raises(ValueError, match="`score`"):
        structure_insertion(model, x, attr, score="f1")
    with pytest.raises(ValueError, match="`target`"):
        structure_insertion(model, x, attr, target=-6)
    with pytest.raises(ValueError, match="`to_uint8`"):
        structure_deletion(model, x, attr, to_uint8=lambda z: z.flatten())
    with pytest.raises(ValueError, match="`attributions` \\(the heatmaps\\) must lie in"):
        masking_score(model, x, attr[:, :1])
    with pytest.raises(ValueError, match="`attributions` has 3 examples"):
        masking_score(model, x, attr[:3, :1].sigmoid())
    with pytest.raises(ValueError, match="`target`"):
        masking_score(model, x, attr[:, :1].sigmoid(), target=[0, 1, 2, 7])
    with pytest.raises(ValueError, match="same shape"):
        voice_iou(torch.rand(2, 4, 4), torch.rand(2, 5, 5))
    with pytest.raises(ValueError, match="`uncertainty` has shape"):
        voice_snr(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="`uncertainty` contains NaN"):
        voice_snr(torch.full((1, 2, 2), float("nan")))


@pytest.mark.cuda
def test_cuda_results_stay_on_the_device_and_equal_cpu(cnn_case):
    model, x, attr = cnn_case
    expected = deletion_curves(model, x, attr, n_steps=4, baselines="blur")
    gpu = make_tiny_cnn().cuda()
    got = deletion_curves(gpu, x.cuda(), attr.cuda(), n_steps=4, baselines="blur")
    assert got.auc.device.type == "cuda" and got.fractions.device.type == "cuda"
    torch.testing.assert_close(got.curves.cpu(), expected.curves, rtol=1e-9, atol=1e-9)
    sd = structure_insertion(gpu, x.cuda(), attr.cuda())
    torch.testing.assert_close(sd.ratios.cpu(), structure_insertion(model, x, attr).ratios)
    assert masking_score(gpu, x.cuda(), attr[:, :1].sigmoid().cuda()).device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# captum.metrics-style signatures: deprecated positional use, old keywords, return_curves


def test_old_positional_arguments_warn_and_still_work(cnn_case):
    model, x, attr = cnn_case
    expected = deletion(model, x, attr, target=0, baselines=0.5, n_steps=4)
    with pytest.warns(DeprecationWarning, match="by keyword"):
        got = deletion(model, x, attr, 0, 0.5, 4)
    torch.testing.assert_close(got, expected)
    with pytest.warns(DeprecationWarning, match="by keyword"):
        sd = structure_insertion(model, x, attr, 1)
    torch.testing.assert_close(sd.area, structure_insertion(model, x, attr, target=1).area)
    heat = attr[:, :1].sigmoid()
    with pytest.warns(DeprecationWarning, match="by keyword"):
        got = masking_score(model, x, heat, 2, "correct")
    torch.testing.assert_close(got, masking_score(model, x, heat, target=2, score="correct"))
    a, b = torch.rand(2, 4, 4), torch.rand(2, 4, 4)
    with pytest.warns(DeprecationWarning, match="by keyword"):
        torch.testing.assert_close(voice_iou(a, b, 0.3), voice_iou(a, b, threshold=0.3))
    with pytest.raises(TypeError, match="multiple values"), pytest.warns(DeprecationWarning):
        deletion(model, x, attr, 0, target=0)


@pytest.mark.parametrize(
    "metric", [deletion, insertion, deletion_curves, structure_deletion, structure_insertion]
)
def test_max_batch_is_renamed_batch_size(metric, cnn_case):
    model, x, attr = cnn_case
    kw = {} if "structure" in metric.__name__ else {"n_steps": 3}
    with pytest.warns(DeprecationWarning, match="`max_batch` is renamed `batch_size`"):
        old = metric(model, x, attr, max_batch=2, **kw)
    new = metric(model, x, attr, batch_size=2, **kw)
    if isinstance(new, Tensor):
        torch.testing.assert_close(old, new)
    else:
        torch.testing.assert_close(old[0], new[0])
    with pytest.raises(TypeError, match="both"):
        metric(model, x, attr, max_batch=2, batch_size=2, **kw)


def test_masking_heatmaps_is_renamed_attributions(cnn_case):
    model, x, attr = cnn_case
    heat = attr[:, :1].sigmoid()
    with pytest.warns(DeprecationWarning, match="`heatmaps` is renamed `attributions`"):
        old = masking_score(model, x, heatmaps=heat)
    torch.testing.assert_close(old, masking_score(model, x, attributions=heat))


def test_return_types_do_not_switch_on_flags(cnn_case):
    model, x, attr = cnn_case
    for metric, curves in ((deletion, deletion_curves), (insertion, insertion_curves)):
        auc = metric(model, x, attr, n_steps=4)
        out = curves(model, x, attr, n_steps=4)
        assert isinstance(auc, Tensor) and isinstance(out, PerturbationCurves)
        torch.testing.assert_close(out.auc, auc)
        with pytest.warns(DeprecationWarning, match="return_curves"):
            old = metric(model, x, attr, n_steps=4, return_curves=True)
        assert isinstance(old, PerturbationCurves)
        torch.testing.assert_close(old.curves, out.curves)


def test_old_module_path_imports_without_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from captum_ext.metrics import explanation

        assert explanation.deletion is deletion
        assert explanation.StructureCurves is StructureCurves
        assert explanation.SCORES == ("probability", "correct", "accuracy")


def test_masking_batch_equals_one_by_one(cnn_batch):
    model, x, attr = cnn_batch
    heat = attr[:, :1].sigmoid()
    full = masking_score(model, x, heat)
    singles = torch.cat(
        [masking_score(model, x[i : i + 1], heat[i : i + 1]) for i in range(len(x))]
    )
    torch.testing.assert_close(full, singles, rtol=1e-12, atol=1e-12)
    correct = masking_score(model, x, heat, target=0, score="correct")
    assert correct.shape == (len(x),) and set(correct.tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("side", [1, 5, 12, 13])
def test_masking_takes_a_normalised_map_of_any_size(bundled_model, sample_digits, side):
    """Bilinear resizing of a [0, 1] map to 28 x 28 gave 1.0000001 at some pixels and the
    check after it refused the map ("got values in [1, 1]"). The range is checked on the
    map as given; the score equals that of the same map resized beforehand."""
    x = sample_digits[0][:2]
    generator = torch.Generator().manual_seed(side)
    heat = torch.rand(2, 1, side, side, generator=generator)
    heat = (heat - heat.amin(dim=(2, 3), keepdim=True)) / heat.amax(dim=(2, 3), keepdim=True).sub(
        heat.amin(dim=(2, 3), keepdim=True)
    ).clamp_min(1e-12)
    if side == 1:
        heat = torch.ones(2, 1, 1, 1)
    score = masking_score(bundled_model, x, heat)
    resized = F.interpolate(heat, size=(28, 28), mode="bilinear", align_corners=False)
    expected = masking_score(bundled_model, x, resized.clamp(0, 1))
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got values in \[.*, 1.5\]"):
        masking_score(bundled_model, x, heat * 1.5)


@pytest.mark.parametrize("curves", [deletion_curves, insertion_curves])
def test_a_low_resolution_plateau_is_ranked_by_pixel_index_as_at_full_size(
    bundled_model, sample_digits, curves
):
    """A constant 1 x 1 map resized by F.interpolate became 552 values an ulp apart, so the
    pixels were removed in the order of that rounding noise, not by index: deletion curves
    of the same constant map given at 1 x 1 and at 28 x 28 differed by up to 0.35."""
    x, y = sample_digits[0][:4], sample_digits[1][:4]
    small = torch.full((4, 1, 1, 1), 0.37)
    full = torch.full((4, 1, 28, 28), 0.37)
    a = curves(bundled_model, x, small, target=y, n_steps=28)
    b = curves(bundled_model, x, full, target=y, n_steps=28)
    torch.testing.assert_close(a.curves, b.curves, rtol=0, atol=0)
    # a 7 x 7 map with a plateau ranks the plateau's pixels exactly alike at any size
    plateau = torch.rand(4, 1, 7, 7, generator=torch.Generator().manual_seed(3))
    plateau[:, :, 2:5, 2:5] = 0.9
    resized = upsample_keeping_ties(plateau, (28, 28))
    assert bool((resized[:, :, 10:18, 10:18] == 0.9).all())
    torch.testing.assert_close(
        resized, F.interpolate(plateau, size=(28, 28), mode="bilinear"), rtol=0, atol=1e-6
    )
    c = curves(bundled_model, x, plateau, target=y, n_steps=28)
    d = curves(bundled_model, x, resized, target=y, n_steps=28)
    torch.testing.assert_close(c.curves, d.curves, rtol=0, atol=0)


def test_float64_maps_are_ranked_in_float64(bundled_model, sample_digits):
    """Maps were cast to the images' float32 before ranking: values differing in the 9th
    digit became ties ranked by index (AUC 0.50 where the map's own order gives 0.31),
    values below float32's range became 0, and finite maps above it were refused as
    "NaN or infinite"."""
    x, y = sample_digits[0][:2], sample_digits[1][:2]
    base = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = deletion_curves(bundled_model, x, base, target=y, n_steps=28).auc
    for scaled in (1 + 1e-9 * base, base * 1e-50, base * 1e300):
        got = deletion_curves(bundled_model, x, scaled, target=y, n_steps=28).auc
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        deletion_curves(bundled_model, x, base * float("inf"), target=y, n_steps=28)
