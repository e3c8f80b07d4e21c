"""The inversion generator shipped for the bundled digit classifier (private module).

Public entry point: :func:`captum_ext.data.load_bundled_inversion`. The weights are written
by ``scripts/train_bundled_generator.py``.
"""

from __future__ import annotations

from typing import Any

import torch

#: how the bundled generator is built (the trainer script records these in its JSON file)
GENERATOR_OPTIONS: dict[str, Any] = {
    "num_classes": 10,
    "out_shape": (1, 28, 28),
    "latent_dim": 100,
    "conditioning": "vector_matrix",
    "dropout": 0.1,
    "width": 32,
}


def bundled_generator(seed: int = 0):
    """A fresh (untrained) generator with the bundled architecture, initialised from ``seed``."""
    from captum_ext.data import normalize_digits
    from captum_ext.inversion import ConditionedGenerator

    options = dict(GENERATOR_OPTIONS)
    num_classes, out_shape = options.pop("num_classes"), options.pop("out_shape")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConditionedGenerator(num_classes, out_shape, normalize=normalize_digits, **options)


def load_bundled_inversion(model: Any = None):
    r"""The bundled digit classifier's network inversion, with its trained generator.

    A :class:`~captum_ext.inversion.NetworkInversion` (preset ``"inversion"``) of ``model``
    whose :class:`~captum_ext.inversion.ConditionedGenerator` (width 32, vector-matrix
    conditioning, 327k parameters) was trained by ``scripts/train_bundled_generator.py``
    against :func:`~captum_ext.data.load_bundled_model`; the steps, seed and the label
    consistency it reached are recorded next to the weights, in the package file
    ``captum_ext/data/bundled_generator.json``. Call ``sample`` to see what the classifier
    thinks each digit looks like, or ``fit`` to train further.

    Args:
        model (nn.Module, optional): the classifier; it must be the bundled model (or a copy
            of it). Default: a fresh :func:`~captum_ext.data.load_bundled_model`.

    Returns:
        NetworkInversion: ready to ``sample``.

    Examples::

        >>> import torch
        >>> from captum_ext.data import load_bundled_inversion
        >>> inversion = load_bundled_inversion()
        >>> sevens = inversion.sample(torch.full((8,), 7))   # 8 x 1 x 28 x 28, normalised
    """
    from importlib import resources

    from captum_ext.data import load_bundled_model
    from captum_ext.inversion import NetworkInversion

    if model is None:
        model = load_bundled_model()
    generator = bundled_generator()
    with resources.as_file(resources.files("captum_ext.data") / "bundled_generator.pt") as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    generator.load_state_dict(state)
    device = next(model.parameters()).device
    return NetworkInversion(model, generator.to(device), batch_size=64, seed=0)
