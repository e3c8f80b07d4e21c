"""Audit 41: ground-truth metrics, the oracles, the token grid of non-square images, saturation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, ShapleyValues
from torch import nn

from captum_ext.attr import GradCAM
from captum_ext.metrics import (
    AttributionF1,
    attribution_f1,
    attribution_precision_recall,
    saturation,
)
from captum_ext.testing import (
    DominantColourCounter,
    PatchInteractionCell,
    dominant_colour_oracle,
    interaction_oracle,
    null_region_oracle,
)
from captum_ext.token_grid import expose_token_grid

# --------------------------------------------------------------------------------------------
# 1. selection="threshold" with threshold=1


def test_threshold_one_marks_the_maximum():
    """threshold=1 was accepted but selected `score > top`: nothing, so a perfect map had
    F1 0."""
    truth = torch.zeros(1, 1, 4, 4)
    truth[..., :2, :2] = 1.0
    scores = attribution_precision_recall(truth, truth, selection="threshold", threshold=1.0)
    assert scores.precision.item() == scores.recall.item() == scores.f1.item() == 1.0
    metric = AttributionF1(selection="threshold", threshold=1.0)
    metric.update(truth, truth)
    assert float(metric.compute()) == 1.0


def test_threshold_marks_scores_at_the_threshold_and_nothing_else_changes():
    maps = torch.tensor([[[[1.0, 0.5, 0.25, 0.0]]]])
    truth = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])
    scores = attribution_precision_recall(maps, truth, selection="threshold", threshold=0.5)
    assert scores.precision.item() == scores.recall.item() == 1.0  # 0.5 >= 0.5 * 1 marked
    # without ties at the threshold, the same marks as the strict rule of before
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 2, 7, 7, generator=generator)
    truth = (torch.rand(6, 1, 7, 7, generator=generator) > 0.6).double()
    for threshold in (0.1, 0.5, 0.9):
        score = maps.double().sum(1).flatten(1)
        top = score.max(1, keepdim=True).values.clamp_min(0)
        marked = (score > threshold * top) & (score > 0)
        relevant = truth.flatten(1) > 0
        hits = (marked & relevant).sum(1).double()
        expected = 2 * hits / (marked.sum(1) + relevant.sum(1)).double()
        ours = attribution_f1(maps, truth, selection="threshold", threshold=threshold)
        torch.testing.assert_close(ours, expected)


# --------------------------------------------------------------------------------------------
# 2. the interaction oracle's baselines serve sampled inputs


def test_interaction_baselines_serve_inputs_of_any_batch_size():
    oracle = interaction_oracle(8, size=8, patch=2)
    assert tuple(oracle.baselines.shape) == (1, 1, 8, 8)
    x, target, truth = oracle.sample(12, seed=1)  # not the 8 of the constructor
    patches = torch.zeros(1, 1, 8, 8)
    patches[..., :2, :2] = patches[..., 6:, 6:] = 1.0
    with torch.no_grad():  # the black baseline is each image with its patches dark
        torch.testing.assert_close(
            oracle.model(oracle.baselines.expand_as(x)), oracle.model(x * (1 - patches))
        )
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    mask[..., :2, :2], mask[..., 6:, 6:] = 1, 2
    shapley = ShapleyValues(oracle.model).attribute(
        x, baselines=oracle.baselines, target=target, feature_mask=mask
    )
    torch.testing.assert_close(torch.where(mask > 0, shapley / 4.0, 0.0), truth, atol=1e-6, rtol=0)
    ig = IntegratedGradients(oracle.model).attribute(
        x, baselines=oracle.baselines, target=target, n_steps=64
    )
    assert float(ig[(mask == 0).expand_as(ig)].abs().max()) == 0.0
    torch.testing.assert_close(ig, truth, atol=0.02, rtol=0)
    assert bool((attribution_f1(ig, truth, sign="absolute") == 1).all())


# --------------------------------------------------------------------------------------------
# 3. the public cells check their arguments


def test_colour_counter_refuses_a_palette_its_detectors_cannot_separate():
    with pytest.raises(ValueError, match=r"`palette`: colour 0 \(0\.2, 0, 0\) is 0\.2 from"):
        DominantColourCounter(torch.tensor([[0.2, 0.0, 0.0], [0.4, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="`palette`.*black"):
        DominantColourCounter(torch.tensor([[1.0, 0.0, 0.0], [0.1, 0.2, 0.1]]))
    with pytest.raises(ValueError, match="`palette` must hold at least 2 colours"):
        DominantColourCounter(torch.tensor([[1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="`palette` contains NaN"):
        DominantColourCounter(torch.tensor([[1.0, 0.0, 0.0], [float("nan"), 1.0, 0.0]]))
    # 0.5 apart (red and orange) is enough: each detector is exactly 0 on the other colour
    palette = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    image = torch.zeros(1, 3, 2, 2)
    image[0, :, 0, 0] = palette[1]
    image[0, 0] = 1.0  # three red pixels, one orange
    with torch.no_grad():
        assert DominantColourCounter(palette)(image).tolist() == [[2.0, -2.0]]


def test_interaction_cell_refuses_an_empty_patch():
    patch = torch.zeros(1, 1, 4, 4)
    patch[..., :2, :2] = 1.0
    with pytest.raises(ValueError, match="`patch_a` is all zero"):
        PatchInteractionCell(torch.zeros(1, 1, 4, 4), patch)
    with pytest.raises(ValueError, match="`patch_b` has negative values"):
        PatchInteractionCell(patch, -patch)
    with pytest.raises(TypeError, match="`patch_b` must be a real tensor"):
        PatchInteractionCell(patch, [[1.0]])
    cell = PatchInteractionCell(patch.bool(), patch.flip(-1).flip(-2))
    with torch.no_grad():
        assert cell(torch.ones(1, 1, 4, 4)).tolist() == [[1.0, 0.0]]


# --------------------------------------------------------------------------------------------
# 4. seeds


@pytest.mark.parametrize("oracle", [dominant_colour_oracle, interaction_oracle, null_region_oracle])
def test_oracle_seeds_are_checked(oracle):
    for seed in (1.5, "a", None):
        with pytest.raises(TypeError, match="`seed` must be an int >= 0"):
            oracle(2, seed=seed)
    with pytest.raises(ValueError, match="`seed` must be an int >= 0, got -1"):
        oracle(2, seed=-1)
    made = oracle(2, seed=np.int64(3))
    assert torch.equal(made.inputs, oracle(2, seed=3).inputs)
    for seed in (None, 2.0, "1"):
        with pytest.raises(TypeError, match="`seed` must be an int >= 0"):
            made.sample(2, seed=seed)
    assert torch.equal(made.sample(2, seed=np.int32(4))[0], made.sample(2, seed=4)[0])


# --------------------------------------------------------------------------------------------
# 5. / 6. expose_token_grid on non-square images, and its grid arguments


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, width)

    def forward(self, tokens):
        return tokens + self.mlp(self.norm1(tokens))


class _TinyViT(nn.Module):
    """A class token and the row-major patch tokens of ``patch`` x ``patch`` patches."""

    def __init__(self, patch: int = 4, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(
            torch.randn(1, 1, width, generator=torch.Generator().manual_seed(1))
        )
        self.blocks = nn.Sequential(_Block(width), _Block(width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1)
        return self.head(self.blocks(tokens)[:, 1:].mean(1))


class _Tokens(nn.Module):
    """``tokens`` outputs (N, count, 4) for any image, however it is shaped."""

    def __init__(self, count: int, pixels: int) -> None:
        super().__init__()
        self.count = count
        self.embed = nn.Linear(pixels, count * 4)
        self.tokens = nn.Identity()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(
            self.tokens(self.embed(x.flatten(1)).unflatten(1, (self.count, 4))).mean(1)
        )


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return _TinyViT().eval()


def test_the_grid_of_non_square_images_follows_the_image(tiny_vit):
    """16 x 64 images of 4-px patches: 1 + 4 x 16 = 65 tokens, which the token count alone
    read as 1 + 8 x 8."""
    x = torch.randn(2, 3, 16, 64, generator=torch.Generator().manual_seed(0))
    layer = "blocks.1.norm1"
    wrapped = expose_token_grid(tiny_vit, layer, x[:1])
    assert (wrapped.leading, wrapped.grid_size) == (1, (4, 16))
    assert expose_token_grid(tiny_vit, layer, x[:1], leading=1).grid_size == (4, 16)
    maps = GradCAM(wrapped, wrapped.grid).attribute(x, target=[0, 1])
    fold = lambda t: t[:, 1:].transpose(1, 2).unflatten(2, (4, 16))  # noqa: E731
    expected = GradCAM(tiny_vit, layer).attribute(x, target=[0, 1], reshape_transform=fold)
    torch.testing.assert_close(maps, expected)
    # square images as before
    square = expose_token_grid(tiny_vit, layer, torch.randn(1, 3, 32, 32))
    assert (square.leading, square.grid_size) == (1, (8, 8))


def test_no_or_several_fitting_grids_are_refused():
    x = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match=r"20 tokens: no grid of square patches .* 4 x 8"):
        expose_token_grid(_Tokens(20, 96).eval(), "tokens", x)
    with pytest.raises(ValueError, match=r"`leading`=1 leaves 19 of the layer's 20 tokens"):
        expose_token_grid(_Tokens(20, 96).eval(), "tokens", x, leading=1)
    wide = torch.randn(1, 3, 16, 64)
    with pytest.raises(ValueError, match=r"several grids fit .*\(0 leading and 2 x 6, 2 leading"):
        expose_token_grid(_Tokens(12, 3 * 16 * 64).eval(), "tokens", wide)
    wrapped = expose_token_grid(_Tokens(12, 3 * 16 * 64).eval(), "tokens", wide, grid_size=(2, 6))
    assert (wrapped.leading, wrapped.grid_size) == (0, (2, 6))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"grid_size": (4,)}, ValueError, r"`grid_size` must be a pair \(h, w\)"),
        ({"grid_size": 16}, TypeError, r"`grid_size` must be a pair \(h, w\)"),
        ({"grid_size": (2.5, 6.4)}, TypeError, r"`grid_size\[0\]` must be an int"),
        ({"grid_size": (4, 0)}, ValueError, r"`grid_size\[1\]` must be a positive int"),
        ({"leading": "1"}, TypeError, r"`leading` must be an int >= 0"),
        ({"leading": -1, "grid_size": (3, 6)}, ValueError, r"`leading` must be an int >= 0"),
    ],
)
def test_grid_arguments_are_checked(tiny_vit, options, error, message):
    with pytest.raises(error, match=message):
        expose_token_grid(tiny_vit, "blocks.1.norm1", torch.randn(1, 3, 16, 16), **options)


# --------------------------------------------------------------------------------------------
# 7. saturation with one constant copy


def test_saturation_with_one_constant_copy_is_nan_with_a_warning():
    maps = torch.rand(6, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    maps[:, :, 6:9, 6:9] = 0.0  # the second copy never gets any mass
    first = torch.tensor([[0, 0, 3, 3]] * 6)
    second = torch.tensor([[6, 6, 9, 9]] * 6)
    with pytest.warns(RuntimeWarning, match="saturation: the mass on the second copy .* undefined"):
        assert np.isnan(saturation(maps, first, second))
    with pytest.warns(RuntimeWarning, match="saturation: the mass on the first copy"):
        assert np.isnan(saturation(maps, second, first))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert -1 <= saturation(torch.rand(6, 1, 10, 10), first, second) <= 1
