"""Regressions a review found in the day's fixes, each with what it broke.

- The examples-first check of a CAM layer refused models that fold frames or crops into
  the batch ((N, T, C, H, W) reshaped to (N * T, C, H, W)), whose per-frame maps were right
  (equal to Captum's LayerGradCam), and a block's broadcast input ``pos`` of shape
  (1, C, h, w) with ``attribute_to_layer_input=True``, with a message saying "output" for
  an input.
- The calibration metrics' row-sum check (tolerance 1e-4) refused probabilities that are
  distributions up to rounding (the float32 mean of float16 softmaxes, a softmax written
  with 4 decimals), and ExpectedCalibrationError took such batches at ``update`` and
  raised at ``compute``.
- ``introspection_section`` refused display images of another size than the inputs.
- The "0..255 scale" warning of the figures fired for a bicubic-resized [0, 1] image.
- The CAMs called ``reshape_transform`` once per class on the gradients (GradCAM with
  ``target="all"`` on a token layer 1.3-1.8x slower).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, model_snapshot
from captum.attr import LayerGradCam
from torch import nn

from captum_ext.attr import GradCAM, LayerGradCamPlusPlus
from captum_ext.metrics import ExpectedCalibrationError, expected_calibration_error
from captum_ext.metrics.calibration import reliability_diagram
from captum_ext.viz import overlay, to_uint8_rgb

# --------------------------------------------------------------------------------------------
# examples-first check: frames folded into the batch


class Video(nn.Module):
    """Folds the T frames of (N, T, 3, H, W) clips into the batch for its convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[:2]
        h = torch.relu(self.conv(x.flatten(0, 1)))  # (N * T, 8, H, W)
        return self.fc(h.mean((2, 3)).unflatten(0, (n, t)).mean(1))


def video() -> Video:
    torch.manual_seed(0)
    return Video().eval()


def clips(n: int, frames: int = 4) -> torch.Tensor:
    return torch.randn(n, frames, 3, 8, 8, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_folded_frames_give_one_map_per_frame_as_captum_does(n):
    """Was: ValueError "its first dimension is not the batch" (refused since the
    tokens-first check); before it, N * T maps equal to Captum's LayerGradCam."""
    model = video()
    x = clips(n)
    before = model_snapshot(model)
    for target in (1, [i % 5 for i in range(n)]):
        got = GradCAM(model, model.conv).attribute(x, target=target)
        expected = LayerGradCam(model, model.conv).attribute(
            x, target=target, relu_attributions=True
        )
        assert got.shape == (4 * n, 1, 8, 8)
        assert bool((expected != 0).any())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert LayerGradCamPlusPlus(model, model.conv).attribute(x, target=1).shape == (4 * n, 1, 8, 8)
    assert_model_unchanged(model, before)


class TokenVideo(nn.Module):
    """A tiny patch-token model folding frames into the batch: (N * T, 1 + 16, D) tokens."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.block = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[:2]
        tokens = self.patch(x.flatten(0, 1)).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1)
        tokens = self.block(tokens)
        return self.head(tokens.mean(1).unflatten(0, (n, t)).mean(1))


def fold(tokens: torch.Tensor) -> torch.Tensor:
    """(rows, 1 + 16, D) tokens -> (rows, D, 4, 4)."""
    return tokens[:, 1:].transpose(1, 2).unflatten(2, (4, 4))


def test_folded_frames_through_a_reshape_transform_give_one_map_per_frame():
    """The same rule after ``reshape_transform``: (N * T, D, 4, 4) is per-frame maps."""
    torch.manual_seed(0)
    model = TokenVideo().eval()
    x = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = GradCAM(model, model.block).attribute(x, target=[1, 3], reshape_transform=fold)
    seen = {}
    handle = model.block.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    out = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(out[0, 1] + out[1, 3], seen["a"])
    weights = fold(grad).mean((2, 3), keepdim=True)
    expected = torch.relu((weights * fold(seen["a"])).sum(1, keepdim=True)).detach()
    assert got.shape == (6, 1, 4, 4) and bool((expected != 0).any())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "n", "refused"),
    [
        ((8, 8, 8, 8), 2, None),  # 4 frames per example
        ((4, 8, 8, 8), 1, None),  # one clip of 4 frames
        ((3, 8, 8, 8), 3, None),
        ((17, 1, 32), 1, "tokens-first"),  # batch of one, tokens-first
        ((17, 3, 32), 3, "tokens-first"),
        ((18, 3, 32), 3, "tokens-first"),  # a multiple of N, but dimension 1 is N
        ((7, 8, 4, 4), 2, "no whole number of rows per example"),
        ((1, 8, 4, 4), 3, "no whole number of rows per example"),
        ((), 2, "is a scalar"),
        # found by the second review: a layer without its batch axis (squeezed for one
        # example) and token-major flattened tokens were read as folded rows
        ((6, 8, 8), 1, "has lost its batch axis"),
        ((8, 32), 2, "has lost its batch axis"),
        ((6, 8), 3, "has lost its batch axis"),
    ],
)
def test_the_examples_first_rule(shape, n, refused):
    from captum_ext._utils.validation import check_examples_first, rows_read_as_examples

    assert rows_read_as_examples(shape, n) is (refused is None)
    if refused is None:
        check_examples_first(shape, n, what="`layer` output")
        return
    with pytest.raises(ValueError, match=refused):
        check_examples_first(shape, n, what="`layer` output")


# --------------------------------------------------------------------------------------------
# examples-first check: a block's inputs


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x + pos))


class WithPosition(nn.Module):
    """A block taking ``(x, pos)``, ``pos`` a (1, 8, 8, 8) positional map shared by the
    batch; ``extra_row`` runs the block on one more row than the examples."""

    def __init__(self, extra_row: bool = False) -> None:
        super().__init__()
        self.extra_row = extra_row
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 8, 8) * 0.1)
        self.block = Block()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([x, x[:1]]) if self.extra_row else x
        h = self.block(self.stem(rows), self.pos)
        return self.fc(h[: len(x)].mean((2, 3)))


def test_a_broadcast_layer_input_gets_its_one_row_map_as_captum_gives():
    """Was: ValueError "`layer` 'block' (Block) input 1 has shape (1, 8, 8, 8) ... Explain a
    layer whose output has the examples first"."""
    torch.manual_seed(0)
    model = WithPosition().eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = GradCAM(model, model.block).attribute(x, target=1, attribute_to_layer_input=True)
    expected = LayerGradCam(model, model.block).attribute(
        x, target=1, attribute_to_layer_input=True, relu_attributions=True
    )
    assert [tuple(t.shape) for t in got] == [(3, 1, 8, 8), (1, 1, 8, 8)]
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_a_refused_layer_input_is_called_an_input():
    """Was: "... input 1 has shape ...: Explain a layer whose output has the examples
    first" for an input."""
    torch.manual_seed(0)
    model = WithPosition(extra_row=True).eval()  # 4 rows of x for 3 examples
    with pytest.raises(ValueError) as info:
        GradCAM(model, model.block).attribute(
            torch.randn(3, 3, 8, 8), target=1, attribute_to_layer_input=True
        )
    message = str(info.value)
    assert "`layer` 'block' (Block) input 0 has shape (4, 8, 8, 8) for N=3 examples" in message
    assert "whose input has the examples first" in message and "output" not in message


# --------------------------------------------------------------------------------------------
# calibration: rows that sum to 1 up to rounding


def _logits(n: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randn(n, classes, generator=torch.Generator().manual_seed(seed)) * 4


def _rounding_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    logits = _logits(512, 10, 0)
    labels = torch.randint(0, 10, (512,), generator=generator)
    noise = torch.randn(8, 512, 10, generator=generator)
    samples = torch.stack([torch.softmax((logits + 0.3 * e).half(), 1) for e in noise])
    big = torch.randn(256, 1000, generator=generator) * 3
    big_labels = torch.randint(0, 1000, (256,), generator=generator)
    rounded = torch.from_numpy(np.round(torch.softmax(big, 1).numpy(), 4))
    bf16 = torch.stack([torch.softmax((logits + 0.3 * e).bfloat16(), 1) for e in noise])
    return {
        "float32 mean of 8 float16 softmaxes": (samples.float().mean(0), labels),
        "float32 mean of 8 bfloat16 softmaxes": (bf16.float().mean(0), labels),
        "1000-class softmax written with 4 decimals": (rounded, big_labels),
        "10-class softmax written with 3 decimals": (
            torch.from_numpy(np.round(torch.softmax(logits, 1).numpy(), 3)),
            labels,
        ),
    }


@pytest.mark.parametrize("case", list(_rounding_cases()))
def test_probabilities_off_by_rounding_are_taken(case):
    """Was: ValueError "rows must sum to 1 ... (tolerance 0.0001)"."""
    probabilities, labels = _rounding_cases()[case]
    assert float((probabilities.double().sum(1) - 1).abs().max()) > 1e-4  # what was refused
    ece = expected_calibration_error(probabilities, labels)
    assert reliability_diagram(probabilities, labels).calibration_error() == pytest.approx(ece)
    metric = ExpectedCalibrationError()
    metric.update(probabilities[:100], labels[:100])
    metric.update(probabilities[100:], labels[100:])
    assert metric.compute() == pytest.approx(ece, abs=1e-12)


def test_the_accumulator_does_not_take_at_update_what_compute_refuses():
    """Was: a float16 batch then a float32 batch were taken by ``update`` (the float16
    batch alone had the half-precision tolerance) and ``compute`` raised."""
    generator = torch.Generator().manual_seed(0)
    logits = _logits(512, 10, 1)
    labels = torch.randint(0, 10, (512,), generator=generator)
    half = torch.softmax(logits[:256].half(), 1)
    full = torch.softmax(logits[256:], 1)
    metric = ExpectedCalibrationError()
    metric.update(half, labels[:256])
    metric.update(full, labels[256:])
    together = torch.cat([half.double(), full.double()])
    assert metric.compute() == pytest.approx(
        expected_calibration_error(together, labels), abs=1e-12
    )
    # and a batch the function refuses is refused at update, not at compute
    sigmoids = torch.sigmoid(logits[:4])
    with pytest.raises(ValueError, match="`probabilities_or_confidences` rows must sum to 1"):
        expected_calibration_error(sigmoids, labels[:4])
    metric = ExpectedCalibrationError()
    with pytest.raises(ValueError, match="`probabilities_or_confidences` rows must sum to 1"):
        metric.update(sigmoids, labels[:4])


@pytest.mark.parametrize("classes", [2, 3, 10, 1000, 10000])
def test_what_is_no_distribution_is_still_refused(classes):
    """The check was for per-class sigmoids (rows summing to about C / 2) and scores that
    happen to lie in [0, 1]; the wider tolerance still refuses them."""
    labels = torch.zeros(64, dtype=torch.long)
    sigmoids = torch.sigmoid(_logits(64, classes, classes)).clamp(0.05, 0.95)
    sigmoids[:, 0] = 0.9  # rows summing to at least 0.9 + 0.05 (C - 1), never 1
    with pytest.raises(ValueError, match="`probabilities_or_confidences` rows must sum to 1"):
        expected_calibration_error(sigmoids, labels)
    # rows summing to 0.35 or 2.4 for any C; within 10 % of 1 for up to 200 classes
    # (the tolerance grows by 5e-5 a class beyond, for 4-decimal rounding)
    totals = (0.35, 0.9, 1.1, 2.4) if classes <= 200 else (0.35, 2.4)
    for total in (t for t in totals if t / classes <= 1):
        row = torch.full((1, classes), total / classes, dtype=torch.float64)
        with pytest.raises(ValueError, match="rows must sum to 1"):
            expected_calibration_error(row, labels[:1])


# --------------------------------------------------------------------------------------------
# introspection section: display images of their own size


def test_the_introspection_section_takes_display_images_of_another_size(tmp_path):
    """Was: ValueError "`display_images` must hold 6 images of 28 x 28 (the inputs' size)"
    for 56 x 56 thumbnails, which render_introspection takes."""
    from PIL import Image

    from captum_ext.bundled import load_bundled_introspective_network, load_bundled_model
    from captum_ext.data import denormalize_digits, load_sample_digits
    from captum_ext.viz.introspection import introspection_section

    network = load_bundled_introspective_network(load_bundled_model())
    images, labels = load_sample_digits()
    images, labels = images[:6], labels[:6]
    shown = F.interpolate(denormalize_digits(images).clamp(0, 1), scale_factor=2)
    introspection_section(network, images, shown, None, tmp_path, labels=labels)
    pictures = sorted((tmp_path / "images" / "introspection").glob("*_input.png"))
    assert len(pictures) == 6
    assert all(Image.open(p).size == (56, 56) for p in pictures)
    # the number of display images is still checked
    with pytest.raises(ValueError, match="`display_images` must hold 6 images"):
        introspection_section(network, images, shown[:5], None, tmp_path / "b", labels=labels)


# --------------------------------------------------------------------------------------------
# figures: resampled [0, 1] images


def test_a_resampled_float_image_draws_without_the_0_255_warning():
    """Was: "`image_01_hwc` holds float values up to 1.17, but float images are drawn on a
    [0, 1] scale" for a bicubic upsampling of a [0, 1] image."""
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    up = F.interpolate(image[None], size=64, mode="bicubic", align_corners=False)[0]
    up = up.permute(1, 2, 0)
    assert 1.0 < float(up.max()) < 1.5
    heat = np.random.default_rng(0).random((64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = overlay(up, heat)
        rgb = to_uint8_rgb(up)
    assert drawn.shape == (64, 64, 3)
    # still clipped as before: above 1 is white
    np.testing.assert_array_equal(rgb, to_uint8_rgb(np.clip(up.numpy(), 0.0, 1.0)))
    # the worst bicubic overshoot of a [0, 1] image (a checkerboard) does not warn either
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    up = F.interpolate(board[None, None].float(), size=32, mode="bicubic")[0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_uint8_rgb(up)


@pytest.mark.parametrize("largest", [2.2, 2.64, 200.0, 255.0])
def test_images_on_another_scale_still_warn(largest):
    """A 0..255 image, or an ImageNet-normalised one that was not denormalised (up to
    2.25-2.64 at a white pixel), still warns."""
    image = np.linspace(0.0, largest, 48).reshape(4, 4, 3)
    with pytest.warns(UserWarning, match=r"`picture` holds float values up to"):
        rgb = to_uint8_rgb(image, "picture")
    assert rgb.max() == 255


# --------------------------------------------------------------------------------------------
# reshape_transform: once per chunk of classes


class Tokens(nn.Module):
    def __init__(self, d: int = 16, classes: int = 12) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.block = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1)
        return self.head(self.block(tokens).mean(1))


def test_a_row_wise_reshape_transform_runs_once_per_chunk_of_classes():
    """Was: one call per class on the gradients (12 classes: 12 calls, GradCAM target="all"
    on a token layer 1.3-1.8x slower than before); the maps equal the per-class ones."""
    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = []

    def counted(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(tokens.shape))
        return fold(tokens)

    def strict(tokens: torch.Tensor) -> torch.Tensor:  # only N rows: per class
        if len(tokens) != len(x):
            raise RuntimeError("written for N rows")
        return fold(tokens)

    for cam in (GradCAM, LayerGradCamPlusPlus):
        calls.clear()
        got = cam(model, model.block).attribute(x, target="all", reshape_transform=counted)
        assert got.shape == (3, 12, 4, 4)
        # the check, the activations, all 12 classes' gradients, and the first and the
        # last class again (the stacked call must give what their own calls give)
        assert len(calls) <= 5
        assert (36, 17, 16) in calls
        expected = cam(model, model.block).attribute(x, target="all", reshape_transform=strict)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        # a chunk of classes at a time: one call per chunk
        calls.clear()
        chunked = cam(model, model.block).attribute(
            x, target="all", reshape_transform=counted, max_batch=5
        )
        torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-6)
        assert sum(shape[0] > 3 for shape in calls) == 3  # chunks of 5, 5 and 2 classes


def test_a_reshape_transform_that_is_not_row_wise_gives_the_per_class_maps():
    """Found by the second review: a transform that keeps the row count without being
    row-wise (here: it normalises over the rows it is given) gave other maps when called
    once on all classes' gradients stacked; the stacked call is now checked against the
    first and the last class's own calls."""
    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def batch_normalised(tokens: torch.Tensor) -> torch.Tensor:
        folded = fold(tokens)
        return folded / folded.flatten(1).norm(dim=1).mean().clamp_min(1e-12)

    def strict(tokens: torch.Tensor) -> torch.Tensor:  # only N rows: per class
        if len(tokens) != len(x):
            raise RuntimeError("written for N rows")
        return batch_normalised(tokens)

    for cam in (GradCAM, LayerGradCamPlusPlus):
        got = cam(model, model.block).attribute(x, target="all", reshape_transform=batch_normalised)
        expected = cam(model, model.block).attribute(x, target="all", reshape_transform=strict)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
