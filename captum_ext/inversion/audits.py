r"""Audits built on network inversion: shortcut learning and training-data leakage.

* :func:`shortcut_dataset` wraps a dataset and injects a label-correlated shortcut into its
  images: a small square at a class-specific position, or a class-specific intensity offset
  ("Shortcut Learning Susceptibility in Vision Classifiers", Suhail, Sethi et al.,
  arXiv 2502.09150). Train a model on it, then
* :func:`shortcut_audit` reports the model's accuracy on a test set without the shortcut,
  with the shortcut of the true class and with the shortcut of another class, and (given a
  trained inversion) inverted samples per class with a measure of how strongly they show the
  cue: a model that learned the cue rather than the shape paints the cue when inverted.
* :func:`privacy_audit` reconstructs training-like images from a model (the
  ``"reconstruction"`` preset of :class:`~captum_ext.inversion.trainer.NetworkInversion`,
  TLDR, arXiv 2410.16884) and reports their matched SSIM to a training subset
  ("Privacy Preserving Properties of Vision Classifiers", arXiv 2502.00760).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from captum_ext._utils.deprecation import renamed_arguments
from captum_ext._utils.layers import root_module
from captum_ext._utils.model_state import preserved_state
from captum_ext._utils.validation import (
    check_flag,
    check_int,
    is_real,
    model_device,
    refuse_ignored_settings,
    to_model_input,
)
from captum_ext.inversion.evaluation import (
    MatchedSSIM,
    _check_model,
    _images,
    _labels,
    label_consistency,
    matched_ssim,
)
from captum_ext.inversion.generator import check_value_range

__all__ = [
    "PrivacyAuditResult",
    "ShortcutAuditResult",
    "ShortcutDataset",
    "privacy_audit",
    "shortcut_audit",
    "shortcut_dataset",
]

_KINDS = ("position", "intensity")


def _contiguous(values: Any) -> Any:
    """A numpy array as a contiguous copy (torch refuses the negative strides of a reversed
    view such as ``np.flip``); anything else as it is."""
    return np.ascontiguousarray(values) if isinstance(values, np.ndarray) else values


def _split_item(item: Any, index: int) -> tuple[Tensor, Any]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ValueError(
            f"`dataset`[{index}] must be an (image, label) pair, got {type(item).__name__}."
        )
    image, label = item[0], item[1]
    if not isinstance(image, Tensor) or not image.is_floating_point() or image.dim() not in (2, 3):
        raise ValueError(
            f"`dataset`[{index}] must hold a floating C x H x W (or H x W) image tensor, got "
            f"{getattr(image, 'shape', type(image).__name__)}."
        )
    return image, label


def _label_int(label: Any, index: int) -> int:
    if isinstance(label, Tensor):
        if label.numel() != 1 or label.is_floating_point() or label.dtype == torch.bool:
            raise ValueError(f"`dataset`[{index}] has a label that is not one class index.")
        return int(label.item())
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"`dataset`[{index}] has a label that is not one class index: {label!r}.")
    return int(label)


class ShortcutDataset(Dataset):
    r"""A dataset whose images carry a label-correlated shortcut; built by
    :func:`shortcut_dataset`, which documents the arguments.

    Item ``i`` is ``(shortcut image, label)`` with the label unchanged. Attributes:

    - ``dataset``, ``kind``, ``num_classes``, ``size``, ``value``, ``conflicting``, ``seed``;
    - ``positions`` (K x 2 int64): top-left ``(row, col)`` of each class's square;
    - ``intensities`` (K float64): the offset added for each class;
    - ``applied`` (N bool): whether item ``i`` carries a shortcut;
    - ``cue_offsets`` (N int64): item ``i`` gets the cue of class
      ``(label + cue_offsets[i]) mod K``; all zero unless ``conflicting``.
    """

    def __init__(
        self,
        dataset: Any,
        kind: str,
        *,
        num_classes: int | None,
        probability: float,
        size: int,
        positions: Any,
        value: float | None,
        strength: float,
        intensities: Any,
        conflicting: bool,
        seed: int,
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                "`dataset` must be a map-style dataset (with __getitem__ and __len__) of "
                f"(image, label) pairs, got {type(dataset).__name__}."
            )
        if kind not in _KINDS:
            raise ValueError(f"`kind` must be 'position' or 'intensity', got {kind!r}.")
        if not is_real(probability) or not 0.0 <= float(probability) <= 1.0:
            raise ValueError(f"`probability` must be a number in [0, 1], got {probability!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
        conflicting = check_flag(conflicting, "conflicting")
        n = len(dataset)
        if n == 0:
            raise ValueError("`dataset` is empty.")
        image, _ = _split_item(dataset[0], 0)
        height, width = image.shape[-2:]
        if num_classes is None:
            num_classes = 1 + max(_label_int(_split_item(dataset[i], i)[1], i) for i in range(n))
        num_classes = check_int(num_classes, "num_classes")
        if conflicting and num_classes < 2:
            raise ValueError("`conflicting` needs `num_classes` >= 2 (another class's cue).")
        self.dataset = dataset
        self.kind = kind
        self.num_classes = num_classes
        self.conflicting = conflicting
        self.seed = int(seed)
        self.probability = float(probability)
        self.size = check_int(size, "size")
        if self.size > min(height, width):
            raise ValueError(
                f"`size` ({size}) is larger than the {height} x {width} images of `dataset`."
            )
        if value is not None and (not is_real(value) or not math.isfinite(value)):
            raise ValueError(f"`value` must be a finite number or None, got {value!r}.")
        self.value = None if value is None else float(value)
        self.positions = self._positions(positions, height, width)
        self.intensities = self._intensities(intensities, strength)
        generator = torch.Generator().manual_seed(self.seed)
        self.applied = torch.rand(n, generator=generator, dtype=torch.float64) < self.probability
        if conflicting:
            self.cue_offsets = torch.randint(1, num_classes, (n,), generator=generator)
        else:
            self.cue_offsets = torch.zeros(n, dtype=torch.long)
        self._image_shape = tuple(image.shape)

    def _positions(self, positions: Any, height: int, width: int) -> Tensor:
        k, s = self.num_classes, self.size
        if positions is None:
            grid = math.ceil(math.sqrt(k))
            step_r = (height - s) / (grid - 1) if grid > 1 else 0.0
            step_c = (width - s) / (grid - 1) if grid > 1 else 0.0
            rows = [round((c // grid) * step_r) for c in range(k)]
            cols = [round((c % grid) * step_c) for c in range(k)]
            return torch.tensor([rows, cols], dtype=torch.long).T.contiguous()
        try:
            table = torch.as_tensor(_contiguous(positions))
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"`positions` must be a K x 2 table of ints: {error}") from None
        if table.shape != (k, 2) or table.is_floating_point() or table.dtype == torch.bool:
            raise ValueError(
                f"`positions` must be {k} x 2 integer (row, col) corners, one per class, got "
                f"shape {tuple(table.shape)} and dtype {table.dtype}."
            )
        table = table.to(torch.long)
        if (
            int(table.min()) < 0
            or int(table[:, 0].max()) > height - s
            or int(table[:, 1].max()) > width - s
        ):
            raise ValueError(
                f"`positions` must keep the {s} x {s} square inside the {height} x {width} image "
                f"(rows in [0, {height - s}], cols in [0, {width - s}])."
            )
        return table

    def _intensities(self, intensities: Any, strength: float) -> Tensor:
        k = self.num_classes
        if intensities is None:
            if not is_real(strength) or not math.isfinite(strength):
                raise ValueError(f"`strength` must be a finite number, got {strength!r}.")
            if k == 1:
                return torch.zeros(1, dtype=torch.float64)
            return torch.linspace(-float(strength), float(strength), k, dtype=torch.float64)
        try:
            table = torch.as_tensor(_contiguous(intensities), dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"`intensities` must be {k} numbers, one per class: {error}") from None
        if table.shape != (k,) or not bool(torch.isfinite(table).all()):
            raise ValueError(
                f"`intensities` must be {k} finite numbers, one per class, got shape "
                f"{tuple(table.shape)}."
            )
        return table

    def __len__(self) -> int:
        return len(self.dataset)

    def cue_class(self, index: int, label: int) -> int:
        """The class whose cue item ``index`` (with label ``label``) carries."""
        return (int(label) + int(self.cue_offsets[index])) % self.num_classes

    def inject(self, image: Tensor, cue_class: int) -> Tensor:
        """A copy of ``image`` (C x H x W or H x W) with the cue of ``cue_class``."""
        out = image.clone()
        if self.kind == "position":
            row, col = self.positions[cue_class].tolist()
            fill = float(image.max()) if self.value is None else self.value
            out[..., row : row + self.size, col : col + self.size] = fill
        else:
            out = out + float(self.intensities[cue_class])
        return out

    def __getitem__(self, index: int):
        item = self.dataset[index]
        image, label = _split_item(item, index)
        if tuple(image.shape) != self._image_shape:
            raise ValueError(
                f"`dataset`[{index}] has an image of shape {tuple(image.shape)}, but the first "
                f"has {self._image_shape}; the shortcut layout needs one image size."
            )
        k = _label_int(label, index)
        if not 0 <= k < self.num_classes:
            raise ValueError(
                f"`dataset`[{index}] has label {k}, outside [0, {self.num_classes}) "
                "(`num_classes`)."
            )
        if bool(self.applied[index]):
            image = self.inject(image, self.cue_class(index, k))
        return (image, label, *item[2:]) if len(item) > 2 else (image, label)


def shortcut_dataset(
    dataset: Any,
    kind: str = "position",
    *,
    num_classes: int | None = None,
    probability: float = 1.0,
    size: int = 4,
    positions: Any = None,
    value: float | None = None,
    strength: float = 0.5,
    intensities: Any = None,
    conflicting: bool = False,
    seed: int = 0,
) -> ShortcutDataset:
    r"""Wrap a dataset so that its images carry a shortcut correlated with the label.

    With probability ``probability`` (drawn once per item from ``seed``, so the wrapped
    dataset is fixed and reproducible) item ``i`` with label ``y`` gets the cue of class
    ``k = y`` (or, with ``conflicting=True``, of a class ``k != y`` drawn uniformly from
    ``seed``):

    .. code-block:: text

        kind="position":   x'[..., r_k : r_k + s, c_k : c_k + s] = v     (every channel),
                           all other pixels unchanged
        kind="intensity":  x' = x + a_k                                  (every pixel)

    with ``s = size``, ``v = value`` (default: the image's own maximum, i.e. "ink" in any
    normalisation), ``(r_k, c_k) = positions[k]`` and ``a_k = intensities[k]``. Default
    positions: class k's square sits in cell ``(k // g, k % g)`` of a g x g grid,
    ``g = ceil(sqrt(K))``, spread evenly over the image:
    ``r_k = round((k // g) (H - s) / (g - 1))``, ``c_k = round((k % g) (W - s) / (g - 1))``
    (for K = 10, 28 x 28 images and s = 4: rows and columns 0, 8, 16, 24). Default
    intensities: evenly spaced offsets ``linspace(-strength, strength, K)`` in the units of
    the dataset's images. Labels (and any further item fields) pass through unchanged.

    The two shortcut families of "Shortcut Learning Susceptibility in Vision Classifiers"
    (Suhail, Sethi et al., arXiv 2502.09150): a model trained on the wrapped data can reach
    high accuracy from the cue alone; :func:`shortcut_audit` tells whether it did.

    Args:
        dataset (Dataset): a map-style dataset of ``(image, label, ...)`` items, images
            floating ``C x H x W`` (or ``H x W``) tensors of one size, labels ints or
            one-element integer tensors.
        kind (str, optional): ``"position"`` or ``"intensity"``. Default: "position"
        num_classes (int, optional): K. Default: None, meaning 1 + the largest label (found by
            reading every item once).
        probability (float, optional): chance that an item carries the cue. Default: 1.0
        size (int, optional): side of the square (``"position"``). Default: 4
        positions (Tensor or sequence, optional): top-left ``(row, col)`` of each class's
            square, a K x 2 table of ints. Default: the grid above.
        value (float, optional): fill value of the square. Default: None (image maximum)
        strength (float, optional): range of the default intensity offsets. Default: 0.5
        intensities (sequence of float, optional): the offset of each class, K of them
            (``"intensity"``).
        conflicting (bool, optional): give each item the cue of another class (for testing
            whether a model follows the cue). Default: False
        seed (int, optional): seed of the per-item draws. Default: 0

    Returns:
        ShortcutDataset: the wrapped dataset (``len`` as ``dataset``), with the layout in
        ``positions`` / ``intensities`` and the draws in ``applied`` / ``cue_offsets``.

    Examples::

        >>> from torch.utils.data import TensorDataset
        >>> from captum_ext.inversion import shortcut_dataset
        >>> train = TensorDataset(images, labels)          # N x 1 x 28 x 28, N
        >>> cued = shortcut_dataset(train, "position", probability=0.9, seed=0)
        >>> image, label = cued[0]
        >>> int(label), cued.positions[label].tolist()    # class 0's square: top left
        (0, [0, 0])
    """
    return ShortcutDataset(
        dataset,
        kind,
        num_classes=num_classes,
        probability=probability,
        size=size,
        positions=positions,
        value=value,
        strength=strength,
        intensities=intensities,
        conflicting=conflicting,
        seed=seed,
    )


class ShortcutAuditResult(NamedTuple):
    """What :func:`shortcut_audit` returns."""

    accuracy_clean: float
    """Accuracy on the test set as given (no cue)."""
    accuracy_shortcut: float
    """Accuracy when every test image carries the cue of its own class."""
    accuracy_conflicting: float
    """Accuracy when every test image carries the cue of another class."""
    follows_cue: float
    """Share of the conflicting test images classified as the class of their cue."""
    samples: Tensor | None
    """``K * samples_per_class`` inverted images (class-major), or None without inversion."""
    sample_labels: Tensor | None
    """Their conditioning labels, or None."""
    cue_response: Tensor | None
    """(K,) float64, how strongly each class's inverted samples show that class's cue (see
    :func:`shortcut_audit`), or None without inversion."""


def _predict_dataset(model: Any, dataset: Any, batch_size: int) -> tuple[Tensor, Tensor]:
    """Predicted classes and labels of a dataset, in order (eval mode, no gradients)."""
    module = root_module(model)
    predictions, labels = [], []
    # its own generator: a loader without one advances the caller's global RNG
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0)
    )
    with preserved_state([module]):
        if module is not None:
            module.eval()
        with torch.no_grad():
            for batch in loader:
                images, targets = batch[0], batch[1]
                logits = model(to_model_input(images, model))
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    raise ValueError("`model` must return N x K logits.")
                predictions.append(logits.argmax(1).cpu())
                labels.append(torch.as_tensor(targets).reshape(-1).cpu().long())
    return torch.cat(predictions), torch.cat(labels)


def _draw_samples(inversion: Any, labels: Tensor, device: torch.device | None, seed: int):
    if hasattr(inversion, "sample"):
        samples = inversion.sample(labels.to(device or "cpu"), generator=int(seed))
    elif callable(inversion):
        samples = inversion(labels.to(device or "cpu"))
    else:
        raise TypeError(
            "`inversion` must be a fitted NetworkInversion (with .sample) or a callable mapping "
            f"labels to images, got {type(inversion).__name__}."
        )
    if not isinstance(samples, Tensor) or samples.shape[0] != labels.numel():
        raise ValueError(
            f"`inversion` must return one image per label ({labels.numel()}), got "
            f"{getattr(samples, 'shape', type(samples).__name__)}."
        )
    return samples.detach()


def _cue_response(samples: Tensor, labels: Tensor, layout: ShortcutDataset) -> Tensor:
    k = layout.num_classes
    x = samples.to("cpu", torch.float64)
    response = torch.full((k,), float("nan"), dtype=torch.float64)
    if layout.kind == "position":
        s = layout.size
        inside = torch.stack(
            [x[..., r : r + s, c : c + s].flatten(1).mean(1) for r, c in layout.positions.tolist()],
            dim=1,
        )  # N x K: mean of each sample inside each class's square
        for c in range(k):
            rows = inside[labels == c]
            if len(rows) == 0:
                continue
            others = [j for j in range(k) if j != c]
            own = rows[:, c]
            rest = rows[:, others].mean(1) if others else torch.zeros_like(own)
            response[c] = (own - rest).mean()
    else:
        means = x.flatten(1).mean(1)
        overall = means.mean()
        for c in range(k):
            if bool((labels == c).any()):
                response[c] = means[labels == c].mean() - overall
    return response


@renamed_arguments(classifier="model")
def shortcut_audit(
    model: Callable[[Tensor], Tensor],
    test_dataset: Any,
    shortcuts: ShortcutDataset | dict,
    *,
    inversion: Any = None,
    samples_per_class: int = 8,
    batch_size: int = 256,
    seed: int = 0,
) -> ShortcutAuditResult:
    r"""Does the model rely on the shortcut it was trained with?

    Evaluates ``model`` on three views of ``test_dataset`` that use the shortcut layout
    of ``shortcuts`` (square positions, size and value, or intensities):

    .. code-block:: text

        accuracy_clean        test images as given
        accuracy_shortcut     every image with the cue of its own class
        accuracy_conflicting  every image with the cue of another class (uniform, from seed)
        follows_cue           share of conflicting images classified as the cue's class

    A model that learned the shapes keeps its clean accuracy in all three; one that learned
    the cue drops on clean images and follows the cue on conflicting ones. Given a trained
    ``inversion``, it also draws ``samples_per_class`` inverted images per class and measures
    whether they paint the cue:

    .. code-block:: text

        position:   cue_response[k] = mean over samples of class k of
                    (mean pixel in square k  -  mean over j != k of mean pixel in square j)
        intensity:  cue_response[k] = mean pixel of class k's samples - mean pixel of all
                    samples  (follows intensities[k] - mean(intensities) if the cue is learned)

    Following "Shortcut Learning Susceptibility in Vision Classifiers" (Suhail, Sethi et al.,
    arXiv 2502.09150), where inversion shows whether the model learned the cue or the shape.

    Args:
        model (nn.Module or callable): images to ``N x K`` logits; run in eval mode
            without gradients and restored afterwards.
        test_dataset (Dataset): held-out ``(image, label)`` items without shortcuts.
        shortcuts (ShortcutDataset or dict): the training set built by
            :func:`shortcut_dataset` (its layout is reused), or a dict of
            :func:`shortcut_dataset` keyword arguments (``kind``, ``positions``, ...).
        inversion (NetworkInversion or callable, optional): a fitted inversion of
            ``model`` (its ``sample(labels, generator=seed)`` is used), or a callable
            mapping labels to images in the model's input space. Default: None
        samples_per_class (int, optional): inverted images per class. Default: 8
        batch_size (int, optional): test images per forward pass. Default: 256
        seed (int, optional): seed of the conflicting cues and of the samples. Default: 0

    Returns:
        ShortcutAuditResult: the accuracies, ``follows_cue``, and ``samples``,
        ``sample_labels``, ``cue_response`` (None without ``inversion``).

    Examples::

        >>> from torch.utils.data import TensorDataset
        >>> from captum_ext.bundled import load_bundled_inversion
        >>> from captum_ext.inversion import shortcut_audit, shortcut_dataset
        >>> cued = shortcut_dataset(TensorDataset(images, labels), "position", seed=0)
        >>> # the model under audit would be trained on `cued`; the bundled one never saw a cue
        >>> audit = shortcut_audit(model, TensorDataset(images, labels), cued,
        ...                        inversion=load_bundled_inversion(model), samples_per_class=2)
        >>> audit.accuracy_clean                # the bundled model on the 40 sample digits
        0.975
        >>> audit.cue_response.shape                       # one value per class
        torch.Size([10])
    """
    _check_model(model)
    batch_size = check_int(batch_size, "batch_size")
    samples_per_class = check_int(samples_per_class, "samples_per_class")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if isinstance(shortcuts, ShortcutDataset):
        options = {
            "kind": shortcuts.kind,
            "num_classes": shortcuts.num_classes,
            "size": shortcuts.size,
            "positions": shortcuts.positions,
            "value": shortcuts.value,
            "intensities": shortcuts.intensities,
        }
    elif isinstance(shortcuts, dict):
        options = dict(shortcuts)
        for forbidden in ("dataset", "probability", "conflicting", "seed"):
            if forbidden in options:
                raise ValueError(
                    f"`shortcuts` must not set {forbidden!r}; the audit chooses it for each view."
                )
    else:
        raise TypeError(
            "`shortcuts` must be the ShortcutDataset the model was trained on or a dict of "
            f"shortcut_dataset() arguments, got {type(shortcuts).__name__}."
        )
    cued = shortcut_dataset(test_dataset, probability=1.0, seed=int(seed), **options)
    conflicting = shortcut_dataset(
        test_dataset, probability=1.0, conflicting=True, seed=int(seed), **options
    )
    predicted, labels = _predict_dataset(model, test_dataset, batch_size)
    accuracy_clean = float((predicted == labels).double().mean())
    predicted, labels = _predict_dataset(model, cued, batch_size)
    accuracy_shortcut = float((predicted == labels).double().mean())
    predicted, labels = _predict_dataset(model, conflicting, batch_size)
    accuracy_conflicting = float((predicted == labels).double().mean())
    cue = (labels + conflicting.cue_offsets) % conflicting.num_classes
    follows_cue = float((predicted == cue).double().mean())

    samples = sample_labels = response = None
    if inversion is not None:
        k = cued.num_classes
        sample_labels = torch.arange(k).repeat_interleave(samples_per_class)
        module = root_module(model)
        with preserved_state([module]):
            samples = _draw_samples(inversion, sample_labels, model_device(model), seed)
        samples = _images(samples, "inversion samples", model_input=True)
        response = _cue_response(samples, sample_labels, cued)
    return ShortcutAuditResult(
        accuracy_clean,
        accuracy_shortcut,
        accuracy_conflicting,
        follows_cue,
        samples,
        sample_labels,
        response,
    )


class PrivacyAuditResult(NamedTuple):
    """What :func:`privacy_audit` returns."""

    matched: MatchedSSIM
    """Matched SSIM of the reconstructions to the training subset (see
    :func:`~captum_ext.inversion.evaluation.matched_ssim`)."""
    label_consistency: float
    """Share of reconstructions the model assigns to their conditioning label."""
    samples: Tensor
    """The reconstructions, class-major, in the model's input space."""
    sample_labels: Tensor
    """Their conditioning labels."""
    inversion: Any
    """The inversion used (the one given, or the NetworkInversion trained here)."""


@renamed_arguments(classifier="model", normalize="preprocess")
def privacy_audit(
    model: Callable[[Tensor], Tensor],
    training_images: Tensor,
    training_labels: Tensor,
    *,
    inversion: Any = None,
    steps: int = 2000,
    samples_per_class: int = 32,
    classes: Sequence[int] | None = None,
    preprocess: Callable[[Tensor], Tensor] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    denormalize: Callable[[Tensor], Tensor] | None = None,
    data_range: float | None = None,
    win_size: int | None = None,
    threshold: float = 0.4,
    batch_size: int | None = None,
    inversion_options: dict | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PrivacyAuditResult:
    r"""How training-like are the images one can reconstruct from a model?

    .. code-block:: text

        G          = NetworkInversion(model, preset="reconstruction").fit(steps)
                     (unless a fitted `inversion` is given)
        x_hat      = G.sample(labels),  samples_per_class per class
        result     = matched_ssim(x_hat, training_images, labels, training_labels)

    i.e. per class a one-to-one Hungarian matching between reconstructions and the given
    training images on SSIM, its mean, and the share of matches with SSIM >= ``threshold``.
    Higher values mean the model leaks more of its training data; following "Privacy
    Preserving Properties of Vision Classifiers" (arXiv 2502.00760) and TLDR
    (arXiv 2410.16884), compare models (architectures, training-set sizes) with the same
    budget and the same training subset.

    Args:
        model (nn.Module or callable): the model under audit (left unchanged).
        training_images (Tensor): ``N x C x H x W`` floating-point training images in the
            model's input space (a subset of its training set); integer pixels are refused,
            as in :func:`~captum_ext.inversion.label_consistency`.
        training_labels (Tensor): their ``N`` labels.
        inversion (NetworkInversion or callable, optional): a fitted inversion (its
            ``sample(labels, generator=seed)`` is used) or a callable mapping labels to images;
            by default a ``NetworkInversion(model, preset="reconstruction",
            preprocess=preprocess, value_range=value_range, seed=seed)`` is trained for
            ``steps`` steps. Default: None
        steps (int, optional): generator steps when training here. Default: 2000
        samples_per_class (int, optional): reconstructions per class. The SSIM matching costs
            ``samples_per_class x`` (training images of the class) SSIM evaluations per
            class. Default: 32
        classes (sequence of int, optional): the classes to reconstruct. Default: those in
            ``training_labels``.
        preprocess (callable, optional): maps pixels in ``value_range`` to the model's
            input space (its normalisation), passed to the NetworkInversion trained here.
            Formerly ``normalize``. Default: None
        value_range (tuple[float, float], optional): the pixel range ``preprocess`` takes,
            e.g. ``(0, 255)``. Default: ``(0, 1)``
        denormalize (callable, optional): maps model inputs to display space before SSIM
            (e.g. :func:`captum_ext.data.denormalize_digits`). Default: None
        data_range, win_size, threshold: passed to :func:`matched_ssim`.
        batch_size (int, optional): generator batch size when training here. Default: None
            (the trainer's default)
        inversion_options (dict, optional): further keyword arguments of the
            NetworkInversion trained here (``weights``, ``lr``, ``input_shape``, ...; the
            input shape defaults to that of ``training_images``). Default: None
        seed (int, optional): seed of the trainer and of the samples. Default: 0
        progress (bool, optional): progress bars. Default: True

    Returns:
        PrivacyAuditResult: ``matched`` (a MatchedSSIM), ``label_consistency``, ``samples``,
        ``sample_labels`` and ``inversion``.

    Examples::

        >>> from captum_ext.bundled import load_bundled_inversion
        >>> from captum_ext.data import denormalize_digits
        >>> from captum_ext.inversion import privacy_audit
        >>> # a fitted inversion; without one, privacy_audit trains one for `steps` steps
        >>> audit = privacy_audit(model, images, labels, inversion=load_bundled_inversion(model),
        ...                       samples_per_class=2, denormalize=denormalize_digits,
        ...                       data_range=1.0, progress=False)
        >>> bool(0.0 <= audit.matched.share_above <= 1.0), audit.samples.shape
        (True, torch.Size([20, 1, 28, 28]))
    """
    _check_model(model)
    training_images = _images(training_images, "training_images", model_input=True)
    training_labels = _labels(
        training_labels, training_images.shape[0], "training_labels", "training_images"
    )
    samples_per_class = check_int(samples_per_class, "samples_per_class")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if classes is None:
        chosen = sorted(set(training_labels.tolist()))
    else:
        try:
            chosen = sorted({int(c) for c in classes})
        except (TypeError, ValueError):
            raise TypeError(f"`classes` must be a sequence of ints, got {classes!r}.") from None
        if not chosen or min(chosen) < 0:
            raise ValueError(f"`classes` must be non-empty class indices, got {classes!r}.")
    if inversion is not None:
        refuse_ignored_settings(
            {
                "steps": (steps, 2000),
                "preprocess": (preprocess, None),
                "value_range": (check_value_range(value_range), (0.0, 1.0)),
                "batch_size": (batch_size, None),
                "inversion_options": (inversion_options or None, None),
            },
            "it sets the inversion trained here, and a fitted `inversion` is given",
        )
    else:
        steps = check_int(steps, "steps")
        if batch_size is not None:
            batch_size = check_int(batch_size, "batch_size")
        options = dict(inversion_options or {})
        for fixed in ("preset", "preprocess", "value_range", "seed"):
            if fixed in options:
                raise ValueError(
                    f"`inversion_options` must not set {fixed!r}; it is an argument of "
                    "privacy_audit."
                )
        module = root_module(model)
        if module is None:
            raise TypeError("`model` must be an nn.Module to train an inversion of it.")
        from captum_ext.inversion.network_inversion import NetworkInversion

        options.setdefault("input_shape", tuple(training_images.shape[1:]))
        inversion = NetworkInversion(
            module,
            preset="reconstruction",
            preprocess=preprocess,
            value_range=value_range,
            seed=int(seed),
            **options,
        )
        inversion.fit(steps, batch_size=batch_size, progress=progress)
    classes_known = getattr(getattr(inversion, "generator", None), "num_classes", None)
    if classes_known is not None and max(chosen) >= classes_known:
        raise ValueError(
            f"`classes` holds {max(chosen)}, but the model has {classes_known} classes "
            f"(0..{classes_known - 1})."
        )
    sample_labels = torch.tensor(chosen, dtype=torch.long).repeat_interleave(samples_per_class)
    module = root_module(model)
    with preserved_state([module]):
        samples = _draw_samples(inversion, sample_labels, model_device(model), int(seed))
    samples = _images(samples, "inversion samples", model_input=True)
    consistency = label_consistency(model, samples, sample_labels)
    matched = matched_ssim(
        samples,
        training_images.to(samples.device),
        sample_labels,
        training_labels,
        threshold=threshold,
        denormalize=denormalize,
        data_range=data_range,
        win_size=win_size,
        progress=progress,
    )
    return PrivacyAuditResult(matched, consistency, samples, sample_labels, inversion)
