"""The namespace of the docstring examples (``python -m pytest --doctest-modules captum_ext``).

Here, at the repository root, because pytest reads a folder's conftest only for the items
below it: ``tests/conftest.py`` does not reach the examples in ``captum_ext/``. Test fixtures
live in ``tests/conftest.py``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from _pytest.doctest import DoctestItem
from torch import nn


@functools.lru_cache(maxsize=1)
def _bundled():
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import (
        BUNDLED_CAM_LAYER,
        DIGIT_CLASSES,
        denormalize_digits,
        load_sample_digits,
    )

    images, labels = load_sample_digits()
    shown = denormalize_digits(images)
    return load_bundled_model(), images, labels, shown, BUNDLED_CAM_LAYER, DIGIT_CLASSES


@pytest.fixture(autouse=True)
def _doctest_names(request):
    """Names a docstring example may use without defining them:

    ``torch``, ``nn``; ``model`` (the bundled digit model, eval mode, a fresh copy per
    example); ``images`` and ``inputs`` (the 40 normalised sample digits, 4 of each class,
    40 x 1 x 28 x 28, as ``load_sample_digits()`` gives them); ``labels`` (their classes);
    ``shown`` (the images for display, in [0, 1]); ``x`` (the first 4 images); ``layer``
    (the bundled model's CAM layer name, ``"features.7"``), ``layer_module`` (that module) and
    ``DIGIT_CLASSES`` (the class names).

    Only doctest items get them, so ordinary tests never load the bundled model for this.
    Each example runs in its own temporary folder (files it writes go there).
    """
    if not isinstance(request.node, DoctestItem):
        return
    # examples that write files (torch.save(..., "r18.pt")) write them in a temporary folder
    request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
    namespace = request.getfixturevalue("doctest_namespace")
    model, images, labels, shown, layer, class_names = _bundled()
    model = copy.deepcopy(model).eval()
    namespace.update(
        torch=torch,
        nn=nn,
        model=model,
        images=images.clone(),
        inputs=images.clone(),
        labels=labels.clone(),
        shown=shown.clone(),
        DIGIT_CLASSES=class_names,
        x=images[:4].clone(),
        layer=layer,
        layer_module=model.get_submodule(layer),
    )
