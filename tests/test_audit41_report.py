"""The contrastive report section reads ``labels`` by the report sections' shared rule:
integer class indices or None, floats refused before any map is computed (they were
truncated: 0.7 became class 0)."""

import numpy as np
import pytest
import torch

from captum_ext.bundled import load_bundled_model
from captum_ext.data import denormalize_digits, load_sample_digits
from captum_ext.viz.report import contrastive_section

CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def digits():
    images, labels = load_sample_digits()
    return load_bundled_model(), images[:2], labels[:2]


def _section(model, images, out, labels):
    shown = denormalize_digits(images)
    return contrastive_section(
        model, "features.6", images, shown, CLASSES, out, False, labels=labels
    )


@pytest.mark.parametrize("labels", [[0.7, 1.0], torch.tensor([0.0, 1.0]), [True, 0]])
def test_contrastive_section_refuses_float_labels_before_computing(digits, labels, tmp_path):
    model, images, _ = digits
    with pytest.raises(
        TypeError,
        match=r"`labels`(\[0\] must be an integer class index| must hold integer class indices)",
    ):
        _section(model, images, tmp_path, labels)
    assert not any(tmp_path.iterdir())


def test_contrastive_section_keeps_integer_labels_and_none(digits, tmp_path):
    model, images, labels = digits
    true = int(labels[1])
    section = _section(model, images, tmp_path, [None, true])
    _, first, second = section.rows
    assert "true class" not in first.label
    assert f"true class {CLASSES[true]} (" in second.label


class _PatchTokens(torch.nn.Module):
    """A class token and 4 x 4-pixel patch tokens of the image, one linear block, a head on
    the mean of the tokens (so the patch tokens reach the output)."""

    def __init__(self, keep=None):
        super().__init__()
        self.keep = keep
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(1, 6, 4, stride=4)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 6))
        self.block = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)[:, : self.keep]
        return self.head(torch.relu(self.block(tokens)).mean(1))


def test_report_takes_the_token_grid_of_non_square_images():
    """16 x 32 images make 1 + 4 x 8 = 33 tokens: no square grid, but one grid that tiles the
    image. The report's check refused it before reading the image's shape."""
    from captum_ext.viz.build import _token_grid

    model = _PatchTokens().eval()
    wrapped = _token_grid(model, model.block, "block", torch.rand(2, 1, 16, 32))
    assert wrapped is not None and tuple(wrapped.grid_size) == (4, 8)


def test_report_names_the_layer_when_tokens_fit_no_grid():
    from captum_ext.viz.build import _token_grid

    model = _PatchTokens(keep=31).eval()  # 31 of the 33 tokens: no grid fits 16 x 32
    with pytest.raises(ValueError, match="`--layer` 'block' outputs"):
        _token_grid(model, model.block, "block", torch.rand(2, 1, 16, 32))


# --------------------------------------------------------------------------------------------
# review of the fixes above


@pytest.mark.parametrize(
    ("tokens", "image", "expected"),
    [
        (50, (480, 640), (1, (7, 7))),  # ViT-B/32 that resizes to 224 inside: the square grid
        (50, (224, 320), (1, (7, 7))),
        (197, (480, 640), (1, (14, 14))),
        (65, (16, 64), (1, (4, 16))),  # the image's own 4-pixel patches
        (281, (224, 320), (1, (14, 20))),  # ViT-B/16 on 224 x 320
        (282, (224, 320), (2, (14, 20))),  # DeiT's distillation token
        (253, (230, 300), (1, (14, 18))),  # 16-pixel patches, the remainder dropped
        (197, (224, 224), (1, (14, 14))),
    ],
)
def test_grid_inference_prefers_plausible_patches_then_the_square_grid(tokens, image, expected):
    """A grid of 80-pixel patches (2 leading + 6 x 8 on 480 x 640) is no ViT's; the square
    reading of a model that resizes its input is taken where no grid of patches of at most
    32 pixels tiles the image."""
    from captum_ext.token_grid import _infer_grid

    assert _infer_grid(tokens, torch.zeros(1, 3, *image), None) == expected


@pytest.mark.parametrize(
    "labels",
    [
        [torch.tensor([3]), torch.tensor([1])],  # a DataLoader with batch_size=1
        [np.array(3), np.int64(1)],
        np.array([3, 1]),
        np.array([3, None], dtype=object),
    ],
)
def test_report_labels_take_one_element_integer_tensors_and_arrays(labels):
    from captum_ext.viz._checks import _check_names_labels

    expected = [3, None] if isinstance(labels, np.ndarray) and labels.dtype == object else [3, 1]
    assert _check_names_labels(None, labels, 2) == expected


def test_report_labels_name_the_float_dtype():
    from captum_ext.viz._checks import _check_names_labels

    with pytest.raises(TypeError, match=r"got a torch.float32 Tensor"):
        _check_names_labels(None, torch.tensor([3.0, 1.0]), 2)
    with pytest.raises(TypeError, match=r"`labels`\[0\] .* of shape \(2,\)"):
        _check_names_labels(None, [torch.tensor([3, 1]), 1], 2)


def test_grid_inference_refuses_a_rounded_grid_that_a_resizing_model_could_also_be():
    """145 tokens on 112 x 256 images: 1 + 8 x 18 patches of 14 pixels with the remainder
    dropped (256 / 14 = 18.3), or the 1 + 12 x 12 grid of a model that resizes its input.
    No exact tiling tells them apart, so the choice is the user's."""
    from captum_ext.token_grid import _infer_grid

    with pytest.raises(ValueError, match=r"several grids fit .*1 leading and 12 x 12"):
        _infer_grid(145, torch.zeros(1, 3, 112, 256), None)  # 8 x 18 of 14 px, or a 12 x 12


@pytest.mark.parametrize(
    ("labels", "expected"),
    [(torch.tensor([[3], [1]]), [3, 1]), (np.array([[3], [1]]), [3, 1])],
)
def test_report_labels_take_a_column_of_labels(labels, expected):
    from captum_ext.viz._checks import _check_names_labels

    assert _check_names_labels(None, labels, 2) == expected


def test_report_labels_refuse_a_scalar_and_word_bools_as_bools():
    from captum_ext.viz._checks import _check_names_labels

    with pytest.raises(ValueError, match=r"sequence of N = 1 class indices .* shape \(\)"):
        _check_names_labels(None, torch.tensor(3), 1)
    with pytest.raises(TypeError, match=r"got bool True\.$"):
        _check_names_labels(None, [True, 0], 2)
