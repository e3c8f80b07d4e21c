"""The OOD benchmark's MNIST-style normaliser (``benchmarks/ood.py --letters mnist``): it
leaves MNIST's own digits as they are and gives rendered letters MNIST's geometry, so the
letters set tests shape rather than preprocessing (benchmarks/RESULTS.md)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
ood = pytest.importorskip("ood")


def _longer_side_and_centre(image: np.ndarray) -> tuple[int, float, float]:
    rows, cols = np.nonzero(image)
    side = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    mass = image.sum()
    return int(side), float((image * yy).sum() / mass), float((image * xx).sum() / mass)


def test_mnist_digits_come_back_unchanged():
    from captum_ext.data._mnist_split import load_mnist_split

    digits = load_mnist_split().train_images[:100]
    out = np.asarray(ood.mnist_normalise(digits))
    np.testing.assert_array_equal(out, np.asarray(digits, dtype=out.dtype))


def test_rendered_letters_get_mnist_geometry():
    raw = np.asarray(ood.letters(40, np.random.default_rng(0)))
    out = np.asarray(ood.mnist_normalise(raw))
    assert out.shape == raw.shape and out.min() >= 0 and out.max() <= 255
    np.testing.assert_array_equal(out, np.round(out))  # bytes, as MNIST's pixels
    geometry = np.array([_longer_side_and_centre(image) for image in out])
    raw_sides = np.array([_longer_side_and_centre(image)[0] for image in raw])
    assert (raw_sides == 20).mean() < 0.25  # as rendered, most letters are not 20 px
    assert (geometry[:, 0] >= 19).all() and (geometry[:, 0] == 20).mean() >= 0.9
    assert np.abs(geometry[:, 1:] - 14).max() <= 1.0


def test_json_ready_rounds_inside_lists_and_drops_non_finite():
    value = {"rows": [{"a": 0.123456789, "b": float("nan")}, (1.0 / 3.0, 2)], "n": 3}
    assert ood.json_ready(value) == {"rows": [{"a": 0.1235, "b": None}, [0.3333, 2]], "n": 3}


def test_ceiling_scores_follow_their_definitions():
    """``max digit p`` is the largest of the ten digit probabilities and ``1 - p_letter``
    the complement of the eleventh, both from the model's softmax (checked in float64 by
    hand on a model with fixed logits)."""
    import torch

    ceiling = pytest.importorskip("ood_ceiling")
    logits = torch.tensor([[0.0] * 10 + [5.0], [9.0] + [0.0] * 10, [1.0, 2.0] + [0.0] * 8 + [2.0]])

    def model(x):
        return logits[x[:, 0, 0, 0].long()]

    x = torch.arange(3.0).view(3, 1, 1, 1)
    scores = ceiling.ceiling_scores(model, x)
    p = logits.double().softmax(dim=1)
    # the scores are the float32 softmax's: float32's tolerance (CPUs' softmax kernels round
    # its last bits differently)
    float32 = {"rtol": 1.3e-6, "atol": 1e-6}
    got = scores["max digit p"].double()
    torch.testing.assert_close(got, p[:, :10].max(dim=1).values, **float32)
    torch.testing.assert_close(scores["1 - p_letter"].double(), 1 - p[:, 10], **float32)
    y = torch.tensor([0, 0, 1])  # the letter logit of row 2 ties digit 1: argmax of digits only
    assert ceiling.digit_accuracy(model, x, y) == pytest.approx(1.0)


@pytest.mark.parametrize("text", ["400", "0x20", "ax3", "400x-1"])
def test_ceiling_config_is_checked(text):
    import argparse

    ceiling = pytest.importorskip("ood_ceiling")
    with pytest.raises(argparse.ArgumentTypeError, match="400x20|positive"):
        ceiling.parse_config(text)
    assert ceiling.parse_config("400X20") == (400, 20)
