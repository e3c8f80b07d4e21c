r"""Evaluating a network inversion: label consistency, confidence, diversity, matched SSIM.

The measures of Suhail, Sethi et al. ("Network Inversion of Convolutional Neural Nets",
arXiv 2407.18002; "Network Inversion for Training-Like Data Reconstruction", TLDR,
arXiv 2410.16884; "Network Inversion for Generating Confidently Classified Counterfeits",
arXiv 2503.20187), as plain functions on a model and tensors of images:

* :func:`label_consistency`: share of generated images the model assigns to the label
  they were generated for;
* :func:`mean_confidence`: mean softmax probability (of the predicted or of the given class);
* :func:`within_class_diversity`: mean pairwise cosine similarity of penultimate features
  within each class (lower = more diverse);
* :func:`matched_ssim`: per class, a one-to-one (Hungarian) matching of generated to training
  images that maximises the total SSIM; the mean matched SSIM and the share of matches with
  SSIM >= 0.4 say how training-like the reconstructions are;
* :func:`sample_grid`: a matplotlib figure with one row of samples per class.

Images are batches ``N x C x H x W`` (``N x H x W`` is read as one channel) in the
model's input space; functions that compare pixels take a ``denormalize`` callable that
maps them to display space first. The model is run in eval mode under ``torch.no_grad``
and is left exactly as it was (train/eval flags, ``requires_grad``, ``.grad``, hooks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from captum_ext._utils.deprecation import renamed_arguments
from captum_ext._utils.hooks import capture_layer
from captum_ext._utils.layers import resolve_layer, root_module
from captum_ext._utils.model_state import preserved_state
from captum_ext._utils.optional import import_optional
from captum_ext._utils.training import progress_bar
from captum_ext._utils.validation import check_int, check_number, to_model_input
from captum_ext.inversion._features import final_linear

__all__ = [
    "DiversityResult",
    "MatchedSSIM",
    "label_consistency",
    "matched_ssim",
    "mean_confidence",
    "sample_grid",
    "within_class_diversity",
]


# ---------------------------------------------------------------- argument checks


def _images(images: Any, argument: str, *, model_input: bool = False) -> Tensor:
    """A floating ``N x C x H x W`` tensor (``N x H x W`` gets a channel axis).

    Integer pixels are converted to float32 where only pixels are compared; images that
    go to the model (``model_input``) must already be floating point, as TIE's inputs:
    uint8 pixels (0..255) run through a model that expects normalised inputs give a
    number without an error."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise TypeError(
            f"`{argument}` must be a torch.Tensor of images (N x C x H x W), got "
            f"{type(images).__name__}."
        )
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(
            f"`{argument}` must be N x C x H x W (or N x H x W), got shape {tuple(images.shape)}."
        )
    if images.shape[0] == 0:
        raise ValueError(f"`{argument}` is empty; expected at least one image.")
    if model_input and not images.is_floating_point():
        raise TypeError(
            f"`{argument}` must be floating point (the model's inputs), got {images.dtype}."
        )
    if images.dtype == torch.bool or images.is_complex():
        raise TypeError(f"`{argument}` must hold real pixel values, got {images.dtype}.")
    if not images.is_floating_point():
        images = images.to(torch.float32)
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"`{argument}` contains NaN or infinite values.")
    return images.detach()


def _labels(labels: Any, n: int, argument: str, images_argument: str) -> Tensor:
    """A 1-D int64 CPU tensor of ``n`` class indices."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(np.ascontiguousarray(labels))
    elif isinstance(labels, (list, tuple)):
        try:
            labels = torch.tensor(labels)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"`{argument}` must be a 1-D tensor of class indices: {error}"
            ) from None
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"`{argument}` must be a 1-D tensor of class indices, got {type(labels).__name__}."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`{argument}` must hold integer class indices, got {labels.dtype}.")
    if labels.dim() != 1:
        raise ValueError(
            f"`{argument}` must be 1-D (one class per image), got shape {tuple(labels.shape)}."
        )
    if labels.numel() != n:
        raise ValueError(
            f"`{argument}` has {labels.numel()} entries but `{images_argument}` has {n} images; "
            "give one label per image."
        )
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"`{argument}` holds negative class indices.")
    return labels.detach().to(device="cpu", dtype=torch.long)


def _check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(
            f"`model` must be an nn.Module or a callable returning logits, got "
            f"{type(model).__name__}."
        )


def _apply_denormalize(images: Tensor, denormalize: Callable | None, argument: str) -> Tensor:
    if denormalize is None:
        return images
    if not callable(denormalize):
        raise TypeError(
            f"`denormalize` must be a callable mapping images to display space, got "
            f"{type(denormalize).__name__}."
        )
    shown = denormalize(images)
    if not isinstance(shown, Tensor) or shown.shape != images.shape:
        raise ValueError(
            f"`denormalize` must return a tensor of the same shape as `{argument}` "
            f"{tuple(images.shape)}."
        )
    return shown.detach()


# ---------------------------------------------------------------- model outputs


def _forward_batches(
    model: Any,
    images: Tensor,
    batch_size: int,
    *,
    feature_layer: nn.Module | None = None,
    layer_input: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits (and the features of ``feature_layer``) in eval mode, without gradients.

    Batches go to the model's device; results come back on ``images``' device.
    """
    module = root_module(model)
    logits, features = [], []
    with preserved_state([module]):
        if module is not None:
            module.eval()
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = to_model_input(images[start : start + batch_size], model)
                if feature_layer is None:
                    out = model(batch)
                else:
                    with capture_layer(feature_layer, layer_input=layer_input) as capture:
                        out = model(batch)
                    captured = capture.single_call("feature_layer")[0]
                    features.append(captured.detach().flatten(1).to(images.device))
                if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != len(batch):
                    raise ValueError(
                        "`model` must return N x K logits for N images, got "
                        f"{getattr(out, 'shape', type(out).__name__)}."
                    )
                logits.append(out.detach().to(images.device))
    return torch.cat(logits), (torch.cat(features) if features else None)


def _check_label_range(labels: Tensor, num_classes: int, argument: str) -> None:
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(
            f"`{argument}` holds class indices outside [0, {num_classes}) for a model with "
            f"{num_classes} outputs."
        )


@renamed_arguments(classifier="model")
def label_consistency(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 256,
) -> float:
    r"""Share of images that the model assigns to the label they were generated for.

    .. code-block:: text

        consistency = (1 / N) sum_i [ argmax_k f(x_i)_k == y_i ]

    The measure of "Network Inversion of Convolutional Neural Nets" (Suhail and Sethi,
    arXiv 2407.18002): a conditioned generator is consistent when the model it inverts
    recognises the requested class in what it generates.

    Args:
        model (nn.Module or callable): maps ``N x C x H x W`` images to ``N x K`` logits.
            An ``nn.Module`` is run in eval mode under ``torch.no_grad`` and restored after.
        images (Tensor): ``N x C x H x W`` floating-point images in the model's input
            space (for example the output of ``NetworkInversion.sample``); integer pixels
            (uint8 0..255) are refused, normalise them as the model expects first.
        labels (Tensor): ``N`` conditioning labels, one per image.
        batch_size (int, optional): images per forward pass. Default: 256

    Returns:
        float: the share in [0, 1].

    Examples::

        >>> from captum_ext.bundled import load_bundled_inversion
        >>> from captum_ext.inversion import label_consistency
        >>> inversion = load_bundled_inversion(model)      # a trained NetworkInversion
        >>> labels = torch.arange(10).repeat(20)
        >>> samples = inversion.sample(labels, generator=0)
        >>> label_consistency(model, samples, labels)     # share classified as conditioned
        1.0
    """
    _check_model(model)
    images = _images(images, "images", model_input=True)
    labels = _labels(labels, images.shape[0], "labels", "images")
    batch_size = check_int(batch_size, "batch_size")
    logits, _ = _forward_batches(model, images, batch_size)
    _check_label_range(labels, logits.shape[1], "labels")
    predicted = logits.argmax(dim=1).cpu()
    return float((predicted == labels).double().mean())


@renamed_arguments(classifier="model")
def mean_confidence(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor | None = None,
    *,
    batch_size: int = 256,
) -> float:
    r"""Mean softmax probability the model gives to the images.

    .. code-block:: text

        labels None:   confidence = (1 / N) sum_i max_k softmax(f(x_i))_k
        labels given:  confidence = (1 / N) sum_i softmax(f(x_i))_{y_i}

    Counterfeits ("Network Inversion for Generating Confidently Classified Counterfeits",
    arXiv 2503.20187) are images the model assigns with confidence near 1 although they
    resemble no training image; with ``labels`` the probability of the requested class is
    averaged instead of that of the predicted class (the two agree when every image is
    classified as its label).

    Args:
        model (nn.Module or callable): maps images to ``N x K`` logits (run in eval mode,
            without gradients; an ``nn.Module`` is restored afterwards).
        images (Tensor): ``N x C x H x W`` floating-point images in the model's input
            space; integer pixels (uint8 0..255) are refused, normalise them as the model
            expects first.
        labels (Tensor, optional): ``N`` class indices; see above. Default: None
        batch_size (int, optional): images per forward pass. Default: 256

    Returns:
        float: the mean probability in [0, 1].

    Examples::

        >>> from captum_ext.bundled import BUNDLED_INVERSION_OPTIONS
        >>> from captum_ext.inversion import NetworkInversion, mean_confidence
        >>> counterfeit = NetworkInversion(model, preset="counterfeit", batch_size=16,
        ...                                **BUNDLED_INVERSION_OPTIONS)
        >>> history = counterfeit.fit(5, progress=False)   # a real run takes ~1000 steps
        >>> labels = torch.arange(10).repeat(2)
        >>> confidence = mean_confidence(model, counterfeit.sample(labels, generator=0))
        >>> 0.0 <= confidence <= 1.0
        True
    """
    _check_model(model)
    images = _images(images, "images", model_input=True)
    batch_size = check_int(batch_size, "batch_size")
    if labels is not None:
        labels = _labels(labels, images.shape[0], "labels", "images")
    logits, _ = _forward_batches(model, images, batch_size)
    probs = torch.softmax(logits.cpu().double(), dim=1)
    if labels is None:
        return float(probs.max(dim=1).values.mean())
    _check_label_range(labels, probs.shape[1], "labels")
    return float(probs.gather(1, labels.unsqueeze(1)).mean())


class DiversityResult(NamedTuple):
    """What :func:`within_class_diversity` returns."""

    mean: float
    """Mean of ``per_class`` over the classes with at least two images (lower = more
    diverse); NaN, with a RuntimeWarning, when no class has two images."""
    per_class: Tensor
    """(C',) float64, mean pairwise cosine similarity within each class of ``classes``; NaN
    for a class with a single image."""
    classes: Tensor
    """(C',) int64, the distinct labels, ascending."""
    counts: Tensor
    """(C',) int64, images per class."""


def _penultimate_layer(source: Any, images: Tensor) -> nn.Module:
    """The last nn.Linear to run (the same rule as the trainer's feature tap)."""
    module = root_module(source)
    if module is None:
        raise TypeError(
            "`source` is not an nn.Module (nor a bound method of one), so its penultimate "
            "features cannot be found; pass `feature_layer`, or the features themselves."
        )
    return final_linear(module, to_model_input(images[:1], source))


def within_class_diversity(
    source: Any,
    images: Tensor | None,
    labels: Tensor,
    *,
    feature_layer: Any = None,
    batch_size: int = 256,
) -> DiversityResult:
    r"""Mean pairwise cosine similarity of features within each class (lower = more diverse).

    .. code-block:: text

        D_k  = 1 / (n_k (n_k - 1)) sum_{i != j, y_i = y_j = k} cos(phi_i, phi_j)
        mean = average of D_k over the classes with n_k >= 2

    where ``phi`` are the features of the images: by default the *penultimate features* of
    the model, i.e. the input of the last ``nn.Linear`` to run in a forward pass
    (checked to produce the logits; the features the trainer's cosine and orthogonality
    losses use), flattened; with ``feature_layer`` the (flattened) output of that layer.
    This is the signed pairwise cosine that the inversion loss of Suhail and Sethi
    (arXiv 2407.18002) pushes down, measured per class: identical samples give 1,
    orthogonal ones 0. Compare generators at the same budget; a collapsed generator scores
    near 1.

    An all-zero feature vector (a blank image, or features behind ReLUs that are all off)
    has no direction; it counts as identical to another all-zero vector (cosine 1) and as
    orthogonal to any non-zero one (cosine 0). So identical samples give 1 also when their
    features are zero, and a generator collapsed to blank images scores 1, not 0.

    Args:
        source (nn.Module, callable or Tensor): the model (its features are computed in
            eval mode without gradients, and it is restored afterwards), or a precomputed
            ``N x D`` (or ``N x ...``, flattened) tensor of features, in which case
            ``images`` is ignored and may be None. To measure diversity in pixel space, pass
            the images themselves as ``source``.
        images (Tensor or None): ``N x C x H x W`` floating-point images in the model's
            input space (integer pixels are refused, as in :func:`label_consistency`).
        labels (Tensor): ``N`` class indices.
        feature_layer (nn.Module or str, optional): the layer whose output is used instead
            of the penultimate features (a module or its dotted name). Default: None
        batch_size (int, optional): images per forward pass. Default: 256

    Returns:
        DiversityResult: ``mean``, ``per_class`` (float64, CPU), ``classes``, ``counts``.
        ``per_class`` is NaN for a class with a single image; ``mean`` is NaN, with a
        RuntimeWarning, when no class has two or more images.

    Examples::

        >>> from captum_ext.bundled import load_bundled_inversion
        >>> from captum_ext.inversion import within_class_diversity
        >>> inversion = load_bundled_inversion(model)
        >>> labels = torch.arange(10).repeat(20)
        >>> result = within_class_diversity(model, inversion.sample(labels, generator=0), labels)
        >>> bool(0.0 <= result.mean <= 1.0), result.per_class.shape
        (True, torch.Size([10]))
    """
    batch_size = check_int(batch_size, "batch_size")
    if isinstance(source, Tensor):
        if source.dim() < 2 or source.shape[0] == 0:
            raise ValueError(
                f"`source` given as features must be N x D with N >= 1, got shape "
                f"{tuple(source.shape)}."
            )
        if not source.is_floating_point():
            raise TypeError(
                f"`source` given as features must be floating point, got {source.dtype}."
            )
        features = source.detach().flatten(1)
        if not bool(torch.isfinite(features).all()):
            raise ValueError("`source` contains NaN or infinite values.")
        labels = _labels(labels, features.shape[0], "labels", "source")
    else:
        if not callable(source):
            raise TypeError(
                "`source` must be the model (an nn.Module or a callable returning logits) or "
                f"an N x D tensor of features, got {type(source).__name__}."
            )
        if images is None:
            raise ValueError("`images` is None; give the images when `source` is a model.")
        images = _images(images, "images", model_input=True)
        labels = _labels(labels, images.shape[0], "labels", "images")
        if feature_layer is None:
            layer, layer_input = _penultimate_layer(source, images), True
        else:
            layer, layer_input = (
                resolve_layer(source, feature_layer, argument="feature_layer"),
                False,
            )
        _, features = _forward_batches(
            source, images, batch_size, feature_layer=layer, layer_input=layer_input
        )
    features = features.cpu().to(torch.float64)
    norms = features.norm(dim=1, keepdim=True)
    # an all-zero feature vector has no direction: cos(0, 0) = 1 (identical samples), cos(0,
    # phi) = 0 for phi != 0; F.normalize's 0 for both scored blank samples "perfectly diverse"
    blank = (norms[:, 0] == 0).to(torch.float64)
    unit = features / torch.where(norms > 0, norms, torch.ones_like(norms))
    classes, counts = torch.unique(labels, return_counts=True)
    per_class = torch.full((classes.numel(),), float("nan"), dtype=torch.float64)
    for i, k in enumerate(classes.tolist()):
        members = unit[labels == k]
        n = members.shape[0]
        if n < 2:
            continue
        zero = blank[labels == k]
        gram = members @ members.T + torch.outer(zero, zero)
        per_class[i] = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    valid = ~torch.isnan(per_class)
    if bool(valid.any()):
        mean = float(per_class[valid].mean())
    else:
        warnings.warn(
            f"within_class_diversity: no class has two or more images (the {labels.numel()} "
            f"labels hold {classes.numel()} distinct classes), so there is no pair to compare; "
            "returning mean=nan. Give several images per class.",
            RuntimeWarning,
            stacklevel=2,
        )
        mean = float("nan")
    return DiversityResult(mean, per_class, classes, counts)


# ---------------------------------------------------------------- matched SSIM


class MatchedSSIM(NamedTuple):
    """What :func:`matched_ssim` returns. Pairs are ordered by class, then generated index."""

    ssim: Tensor
    """(M,) float64, SSIM of each matched (generated, training) pair."""
    generated_index: Tensor
    """(M,) int64, index of the pair's image in ``generated``."""
    training_index: Tensor
    """(M,) int64, index of the pair's image in ``training``."""
    labels: Tensor
    """(M,) int64, the class of each pair."""
    mean: float
    """Mean matched SSIM over all pairs."""
    share_above: float
    """Share of pairs with SSIM >= ``threshold``."""
    threshold: float
    """The threshold used for ``share_above``."""
    per_class_mean: dict[int, float]
    """Mean matched SSIM of each class that has pairs."""
    data_range: float
    """The ``data_range`` passed to scikit-image."""
    win_size: int
    """The ``win_size`` passed to scikit-image."""


def _real_number(value: Any, argument: str, **bounds: Any) -> float:
    """:func:`check_number` of ``value``, a 0-d tensor or array first read as its number
    (``images.max() - images.min()`` of a tensor or an array is one)."""
    if isinstance(value, Tensor) and value.dim() == 0:
        if not (value.is_complex() or value.dtype == torch.bool):
            value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()
    return check_number(value, argument, **bounds)


def _default_win_size(height: int, width: int) -> int:
    side = min(height, width, 7)
    return side if side % 2 == 1 else side - 1


def _ssim_function():
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        raise ImportError(
            "matched_ssim() needs scikit-image: pip install 'captum-ext[extras]'"
        ) from None
    return structural_similarity


def matched_ssim(
    generated: Tensor,
    training: Tensor,
    labels_generated: Tensor,
    labels_training: Tensor,
    *,
    threshold: float = 0.4,
    denormalize: Callable[[Tensor], Tensor] | None = None,
    data_range: float | None = None,
    win_size: int | None = None,
    progress: bool = True,
) -> MatchedSSIM:
    r"""Per class, match generated to training images one-to-one by SSIM (Hungarian).

    .. code-block:: text

        for each class k present in both sets:
            S_k[i, j] = SSIM(g_i, t_j)   for generated g_i and training t_j of class k
            pairs_k   = argmax over one-to-one assignments of sum S_k[i, j]
                        (min(n_gen_k, n_train_k) pairs; scipy linear_sum_assignment)
        mean        = mean of S over all matched pairs
        share_above = share of matched pairs with S >= threshold

    The evaluation of "Network Inversion for Training-Like Data Reconstruction" (TLDR,
    Suhail and Sethi, arXiv 2410.16884): the higher the matched SSIM, the more the inverted
    images look like (and leak) the training data; a share of matches with SSIM >= 0.4 is
    their summary of how many reconstructions are recognisably training-like.

    SSIM is scikit-image's ``skimage.metrics.structural_similarity`` (Wang et al. 2004),
    called on each pair with the given ``data_range`` and ``win_size`` (uniform window);
    multi-channel images are compared with ``channel_axis=0`` (SSIM averaged over channels).
    The cost is one SSIM per (generated, training) pair of the same class, roughly 0.3 ms
    each for 28 x 28 images on one CPU core.

    Args:
        generated (Tensor): ``N_g x C x H x W`` generated images (``N x H x W`` is one
            channel).
        training (Tensor): ``N_t x C x H x W`` training images, same ``C x H x W``.
        labels_generated (Tensor): ``N_g`` class indices of ``generated``.
        labels_training (Tensor): ``N_t`` class indices of ``training``.
        threshold (float, optional): SSIM threshold of ``share_above``, in [-1, 1]; any
            real number (a Python or numpy scalar, or a 0-d tensor or array). Default: 0.4
        denormalize (callable, optional): applied to both sets before SSIM, e.g.
            :func:`captum_ext.data.denormalize_digits` to compare in [0, 1] pixel space
            images given in the model's input space. Default: None (compare as given)
        data_range (float, optional): scikit-image's ``data_range`` (max minus min possible
            value), a finite number > 0 (a Python or numpy scalar, or a 0-d tensor or
            array). Default: None, meaning max minus min over both sets (after
            ``denormalize``); pass 1.0 for images in [0, 1].
        win_size (int, optional): odd side of the SSIM window, at most the smaller image
            side. Default: None, meaning 7, or the largest odd size that fits smaller images.
        progress (bool, optional): show a progress bar over the SSIM pairs. Default: True

    Returns:
        MatchedSSIM: per-pair ``ssim``, ``generated_index``, ``training_index``, ``labels``,
        and ``mean``, ``share_above``, ``threshold``, ``per_class_mean``, ``data_range``,
        ``win_size``.

    Raises:
        ValueError: no class is present in both sets (there is nothing to match).

    Examples::

        >>> from captum_ext.bundled import load_bundled_inversion
        >>> from captum_ext.data import denormalize_digits
        >>> from captum_ext.inversion import matched_ssim
        >>> inversion = load_bundled_inversion(model)
        >>> generated = torch.arange(10).repeat_interleave(4)
        >>> result = matched_ssim(inversion.sample(generated, generator=0), images, generated,
        ...                       labels, denormalize=denormalize_digits, data_range=1.0)
        >>> bool(-1.0 <= result.mean <= 1.0), bool(0.0 <= result.share_above <= 1.0)
        (True, True)
    """
    generated = _images(generated, "generated")
    training = _images(training, "training")
    if generated.shape[1:] != training.shape[1:]:
        raise ValueError(
            f"`generated` images are {tuple(generated.shape[1:])} but `training` images are "
            f"{tuple(training.shape[1:])}; SSIM compares images of the same shape."
        )
    labels_generated = _labels(
        labels_generated, generated.shape[0], "labels_generated", "generated"
    )
    labels_training = _labels(labels_training, training.shape[0], "labels_training", "training")
    threshold = _real_number(threshold, "threshold", minimum=None)
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"`threshold` must lie in [-1, 1] (the range of SSIM), got {threshold}.")
    generated = _apply_denormalize(generated, denormalize, "generated")
    training = _apply_denormalize(training, denormalize, "training")
    channels, height, width = generated.shape[1:]
    if win_size is None:
        win_size = _default_win_size(height, width)
        if win_size < 3:
            raise ValueError(
                f"images of {height} x {width} are too small for SSIM (a window of at least "
                "3 x 3 is needed)."
            )
    elif (
        isinstance(win_size, bool)
        or not isinstance(win_size, (int, np.integer))
        or win_size < 3
        or win_size % 2 == 0
        or win_size > min(height, width)
    ):
        raise ValueError(
            f"`win_size` must be an odd int in [3, {min(height, width)}] for {height} x {width} "
            f"images, got {win_size!r}."
        )
    gen_np = generated.to(device="cpu", dtype=torch.float64).numpy()
    train_np = training.to(device="cpu", dtype=torch.float64).numpy()
    if data_range is None:
        low = min(gen_np.min(), train_np.min())
        high = max(gen_np.max(), train_np.max())
        data_range = float(high - low) if high > low else 1.0
    else:
        data_range = _real_number(data_range, "data_range")  # finite and > 0
    if channels == 1:
        gen_np, train_np = gen_np[:, 0], train_np[:, 0]
        channel_kwargs: dict[str, Any] = {}
    else:
        channel_kwargs = {"channel_axis": 0}

    structural_similarity = _ssim_function()  # its message names scikit-image first
    linear_sum_assignment = import_optional(
        "scipy.optimize", "matched_ssim() (its optimal matching)"
    ).linear_sum_assignment
    shared = sorted(set(labels_generated.tolist()) & set(labels_training.tolist()))
    if not shared:
        raise ValueError(
            "`labels_generated` and `labels_training` share no class, so no image can be matched."
        )
    groups = [
        (
            k,
            torch.nonzero(labels_generated == k).flatten(),
            torch.nonzero(labels_training == k).flatten(),
        )
        for k in shared
    ]
    total = sum(len(g) * len(t) for _, g, t in groups)
    bar = progress_bar(total, progress, desc="matched SSIM", unit="pair")
    ssim_values, gen_index, train_index, pair_labels = [], [], [], []
    per_class_mean: dict[int, float] = {}
    try:
        for k, gen_rows, train_rows in groups:
            scores = np.empty((len(gen_rows), len(train_rows)), dtype=np.float64)
            for a, i in enumerate(gen_rows.tolist()):
                for b, j in enumerate(train_rows.tolist()):
                    scores[a, b] = structural_similarity(
                        gen_np[i],
                        train_np[j],
                        data_range=data_range,
                        win_size=int(win_size),
                        **channel_kwargs,
                    )
                if bar:
                    bar.update(len(train_rows))
            rows, cols = linear_sum_assignment(scores, maximize=True)
            matched = scores[rows, cols]
            ssim_values.append(torch.from_numpy(matched.copy()))
            gen_index.append(gen_rows[torch.from_numpy(rows)])
            train_index.append(train_rows[torch.from_numpy(cols)])
            pair_labels.append(torch.full((len(rows),), k, dtype=torch.long))
            per_class_mean[int(k)] = float(matched.mean())
    finally:
        if bar:
            bar.close()
    values = torch.cat(ssim_values)
    return MatchedSSIM(
        ssim=values,
        generated_index=torch.cat(gen_index),
        training_index=torch.cat(train_index),
        labels=torch.cat(pair_labels),
        mean=float(values.mean()),
        share_above=float((values >= float(threshold)).double().mean()),
        threshold=float(threshold),
        per_class_mean=per_class_mean,
        data_range=data_range,
        win_size=int(win_size),
    )


# ---------------------------------------------------------------- sample grid

#: the longest row name :func:`sample_grid` draws whole; longer ones end in an ellipsis, so
#: that the figure stays a bounded width (the names come from the user, e.g. ``--classes``)
_MAX_ROW_NAME = 24
#: points between a row name and the first image of its row
_ROW_NAME_PAD = 6.0


def _row_name(name: str) -> str:
    return name if len(name) <= _MAX_ROW_NAME else name[: _MAX_ROW_NAME - 1] + "\u2026"


def _text_width_inches(text: Any) -> float:
    """The width of a matplotlib ``Text`` drawn literally, from its font's glyph metrics
    (no renderer needed; the widest line of a multi-line text)."""
    from matplotlib.textpath import TextToPath

    measure, font = TextToPath(), text.get_fontproperties()
    widths = [
        measure.get_text_width_height_descent(line, font, ismath=False)[0]
        for line in text.get_text().split("\n")
    ]
    return max(widths, default=0.0) / 72.0  # points -> inches


def sample_grid(
    images: Tensor,
    labels: Tensor,
    *,
    per_class: int = 8,
    classes: Sequence[int] | None = None,
    denormalize: Callable[[Tensor], Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    cmap: str = "gray",
    cell_size: float = 0.8,
    title: str | None = None,
    colorbar: bool = True,
):
    r"""A matplotlib figure with one row per class and up to ``per_class`` samples in each.

    Row ``r`` shows, left to right, the first ``per_class`` images (in the order given) whose
    label is ``classes[r]``; missing cells stay blank. Images are shown after
    ``denormalize`` with a fixed [0, 1] scale (values outside are clipped); without
    ``denormalize`` all shown images share one linear scale from their global minimum
    (black) to their global maximum (white). One-channel images use ``cmap``; three-channel
    images are shown as RGB.

    The figure is built with :class:`matplotlib.figure.Figure` (no pyplot state is touched);
    save it with ``figure.savefig(path)``. Needs the ``viz`` extra (matplotlib).

    Args:
        images (Tensor): ``N x C x H x W`` (C is 1 or 3) or ``N x H x W`` images.
        labels (Tensor): ``N`` class indices.
        per_class (int, optional): columns of the grid. Default: 8
        classes (sequence of int, optional): the rows, in order. Default: the distinct labels,
            ascending.
        denormalize (callable, optional): maps images to [0, 1] display space, e.g.
            :func:`captum_ext.data.denormalize_digits`. Default: None
        class_names (sequence of str, optional): row titles, indexed by class, drawn as
            given (``$`` does not start mathtext) and right-aligned left of the row; the left
            margin grows to fit the longest, and names longer than 24 characters are cut to
            23 and an ellipsis. Default: the class indices.
        cmap (str, optional): matplotlib colormap for one-channel images. Default: "gray"
        cell_size (float, optional): inches per image. Default: 0.8
        title (str, optional): figure title, drawn as given. Default: None
        colorbar (bool, optional): for one-channel images, a grey-scale bar on the right
            with the scale of the pixels (``0`` to ``1`` after ``denormalize``, otherwise the
            global minimum and maximum it was stretched from). Default: True

    Returns:
        matplotlib.figure.Figure: the grid.

    Examples::

        >>> from captum_ext.bundled import load_bundled_inversion
        >>> from captum_ext.data import denormalize_digits
        >>> from captum_ext.inversion import sample_grid
        >>> inversion = load_bundled_inversion(model)
        >>> labels = torch.arange(10).repeat_interleave(8)
        >>> figure = sample_grid(inversion.sample(labels, generator=0), labels,
        ...                      denormalize=denormalize_digits)
        >>> figure.savefig("samples.png")
    """
    images = _images(images, "images")
    labels = _labels(labels, images.shape[0], "labels", "images")
    per_class = check_int(per_class, "per_class")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"`images` must have 1 or 3 channels, got {images.shape[1]}.")
    if isinstance(cell_size, bool) or not isinstance(cell_size, (int, float)) or cell_size <= 0:
        raise ValueError(f"`cell_size` must be a positive number, got {cell_size!r}.")
    if classes is None:
        rows = sorted(set(labels.tolist()))
    else:
        try:
            rows = [int(c) for c in classes]
        except (TypeError, ValueError):
            raise TypeError(f"`classes` must be a sequence of ints, got {classes!r}.") from None
        if not rows:
            raise ValueError("`classes` is empty; give at least one class to show.")
    if class_names is not None:
        if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
            raise TypeError("`class_names` must be a sequence of str, indexed by class.")
        if max(rows) >= len(class_names) or min(rows) < 0:
            raise ValueError(
                f"`class_names` has {len(class_names)} names but the classes shown go up to "
                f"{max(rows)}."
            )
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("sample_grid() needs matplotlib: pip install 'captum-ext[viz]'") from None
    if cmap not in colormaps:
        raise ValueError(f"`cmap`={cmap!r} is not a matplotlib colormap.")
    shown = _apply_denormalize(images, denormalize, "images").to("cpu", torch.float64)
    picks = {k: torch.nonzero(labels == k).flatten()[:per_class].tolist() for k in rows}
    low, high = 0.0, 1.0
    if denormalize is None:
        used = [i for k in rows for i in picks[k]]
        if used:
            low, high = float(shown[used].min()), float(shown[used].max())
            shown = (shown - low) / (high - low) if high > low else shown * 0.0
    shown = shown.clamp(0.0, 1.0).numpy()
    with_bar = bool(colorbar) and shown.shape[1] == 1
    bar_room = 1.1 if with_bar else 0.0

    from captum_ext.viz._figures import literal_text

    height = cell_size * len(rows) + (0.5 if title is not None else 0.1)
    figure = Figure(figsize=(cell_size * per_class + 0.6 + bar_room, height))
    axes = figure.subplots(len(rows), per_class, squeeze=False)
    for r, k in enumerate(rows):
        for c in range(per_class):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(picks[k]):
                picture = shown[picks[k][c]]
                if picture.shape[0] == 1:
                    ax.imshow(picture[0], cmap=cmap, vmin=0.0, vmax=1.0)
                else:
                    ax.imshow(np.transpose(picture, (1, 2, 0)))
        name = _row_name(class_names[k] if class_names is not None else str(k))
        # right-aligned, ending _ROW_NAME_PAD points left of the row's first image
        literal_text(
            axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", labelpad=_ROW_NAME_PAD)
        )
    # the left margin holds the widest name, its gap to the images and some slack: 10 % of
    # the name, for the renderers' glyph hinting (a few pixels over 24 characters), and
    # 0.1 inch (0.5 inch at least, the margin of short names)
    widest = max(_text_width_inches(axes[r][0].yaxis.label) for r in range(len(rows)))
    left = max(0.5, 1.1 * widest + _ROW_NAME_PAD / 72.0 + 0.1)
    width = left + cell_size * per_class + 0.1 + bar_room
    figure.set_size_inches(width, height)
    if title is not None:
        literal_text(figure.suptitle(title, y=1.0 - 0.1 / height, va="top"))
    figure.subplots_adjust(
        left=left / width,
        right=1.0 - (0.1 + bar_room) / width,
        bottom=0.05 / height,
        top=1.0 - (0.45 if title is not None else 0.05) / height,
        wspace=0.05,
        hspace=0.05,
    )
    if with_bar:
        from matplotlib import colormaps as _maps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        top = 1.0 - (0.45 if title is not None else 0.05) / height
        bottom = 0.05 / height
        cax = figure.add_axes(
            (1.0 - (bar_room - 0.15) / width, bottom, 0.15 / width, max(top - bottom, 0.05))
        )
        bar = figure.colorbar(
            ScalarMappable(Normalize(low, high), _maps[cmap]), cax=cax, orientation="vertical"
        )
        bar.ax.tick_params(labelsize=7)
        bar.set_label(
            "pixel value" if denormalize is not None else "value (stretched min to max)",
            fontsize=7,
        )
    return figure
