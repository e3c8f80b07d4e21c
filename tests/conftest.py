"""Fixtures and hooks shared by the tests (plain helpers live in ``tests/_helpers.py``; the
docstring examples' namespace in the repository's root ``conftest.py``)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from _helpers import CONFIDENT_SCALES, TinyCNN, make_confident_model, make_tiny_cnn
from torch import nn

# ------------------------------------------------------------------ hooks


def pytest_configure(config):
    """One intra-op thread for the whole suite, and for the subprocesses it starts (the CLI,
    sphinx, torchrun workers). The test models are tiny: a second thread gains little on an
    idle machine, and on a busy 2-core machine the threads wait on each other and runs get
    many times slower (a 60-step generator fit: 18 s on one thread, 159 s on two)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------ general fixtures


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many tiny optimisation steps (the test machines share
    2 cores, and oversubscription makes such tests many times slower); restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    return make_tiny_cnn()


@pytest.fixture
def tiny_inputs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 6, 6, generator=generator, dtype=torch.float64)


@pytest.fixture(params=CONFIDENT_SCALES, ids=lambda s: f"x{s:g}")
def confident_model(request) -> nn.Module:
    """The bundled model made confident (median logit gap 29, 290 or 9,700), float32."""
    return make_confident_model(request.param)


# ------------------------------------------------------------------ the bundled demo
#
# Loaded once per session (``_bundled_*``, never handed to a test directly); every fixture a
# test sees is a copy, so a test that changes its model or images cannot change another's.


@pytest.fixture(scope="session")
def _bundled_model_once() -> nn.Module:
    from captum_ext.bundled import load_bundled_model

    return load_bundled_model()


@pytest.fixture(scope="session")
def _sample_digits_once() -> tuple[torch.Tensor, torch.Tensor]:
    from captum_ext.data import load_sample_digits

    return load_sample_digits()


@pytest.fixture(scope="module")
def bundled_model(_bundled_model_once) -> nn.Module:
    """The bundled digit model (eval mode), one copy per test module: the tests of a module
    share it (module-scoped fixtures may use it); each test checks it leaves it unchanged.
    Use :func:`fresh_bundled_model` in a test that changes the model on purpose."""
    return copy.deepcopy(_bundled_model_once).eval()


@pytest.fixture
def fresh_bundled_model(_bundled_model_once) -> nn.Module:
    """The bundled digit model (eval mode), a new copy for this test alone."""
    return copy.deepcopy(_bundled_model_once).eval()


@pytest.fixture
def sample_digits(_sample_digits_once) -> tuple[torch.Tensor, torch.Tensor]:
    """The 40 bundled sample digits (normalised, N x 1 x 28 x 28) and their labels (copies)."""
    images, labels = _sample_digits_once
    return images.clone(), labels.clone()


@pytest.fixture(scope="module")
def bundled_digits(_sample_digits_once) -> tuple[torch.Tensor, torch.Tensor]:
    """Module-scoped copy of the 40 sample digits and labels (for module-scoped fixtures)."""
    images, labels = _sample_digits_once
    return images.clone(), labels.clone()


@pytest.fixture(scope="session")
def bundled_cam_layer() -> str:
    """The bundled model's usual CAM layer (``BUNDLED_CAM_LAYER``)."""
    from captum_ext.data import BUNDLED_CAM_LAYER

    return BUNDLED_CAM_LAYER


@pytest.fixture
def no_drawing(monkeypatch):
    """Any matplotlib figure created while the fixture is active fails the test (for the
    report sections' compute steps, which must return numbers without drawing)."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    def refuse(*args, **kwargs):
        raise AssertionError("a compute_* function drew a matplotlib figure")

    before = plt.get_fignums()
    monkeypatch.setattr(matplotlib.figure.Figure, "__init__", refuse)
    yield
    assert plt.get_fignums() == before
