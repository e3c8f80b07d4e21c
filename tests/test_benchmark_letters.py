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
