"""The amortised mask net shipped for the bundled digit classifier (private module).

Public entry point: :func:`captum_ext.data.load_bundled_mask_explainer`. The weights are
written by ``scripts/train_bundled_mask_net.py``.
"""

from __future__ import annotations

from typing import Any

#: the layers whose activations the bundled mask net was trained to match (a_l = 1 each)
BUNDLED_MASK_LAYERS: tuple[str, ...] = ("features.1", "features.4", "features.7", "flatten")
#: the explainer's options the bundled mask net was trained with
MASK_OPTIONS: dict[str, Any] = {"weights": "mnist", "baseline": 0.0}


def load_bundled_mask_explainer(model: Any = None):
    r"""An :class:`~captum_ext.attr.ActivationMatchingMask` of the bundled digit classifier,
    with its trained amortised mask net.

    The mask net (a 2-level U-Net of width 16) was trained by
    ``scripts/train_bundled_mask_net.py`` on the 4,000 training digits with the "mnist"
    weights, masked pixels set to 0 in normalised space (the mean grey) and the activations
    of ``features.1``, ``features.4``, ``features.7`` and ``flatten`` matched. What it
    achieves on the 1,000 held-out digits (active-pixel fraction, label agreement,
    confidences) is recorded next to the weights, in ``captum_ext/data/bundled_mask_net.json``.
    One forward pass explains a batch: ``explainer.attribute(images)``.

    Args:
        model (nn.Module, optional): the classifier; it must be the bundled model (or a copy
            of it). Default: a fresh :func:`~captum_ext.data.load_bundled_model`.

    Returns:
        ActivationMatchingMask: ready for ``attribute(images)`` in the amortised mode.

    Examples::

        >>> from captum_ext.data import load_bundled_mask_explainer, load_sample_digits
        >>> explainer = load_bundled_mask_explainer()
        >>> images, _ = load_sample_digits()
        >>> masks = explainer.attribute(images)          # 40 x 1 x 28 x 28, binary
    """
    from importlib import resources

    from captum_ext.attr import ActivationMatchingMask
    from captum_ext.data import load_bundled_model

    if model is None:
        model = load_bundled_model()
    explainer = ActivationMatchingMask(model, list(BUNDLED_MASK_LAYERS), **MASK_OPTIONS)
    with resources.as_file(resources.files("captum_ext.data") / "bundled_mask_net.pt") as path:
        explainer.load(path)
    return explainer
