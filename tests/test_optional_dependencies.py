"""Features that need a package of the `extras` extra say so when it is missing.

Before: a bare ``ModuleNotFoundError`` from inside the package (saving a mask net or an
introspective head as ``.safetensors``, ``road_imputation(solver="direct")``), or, when
reading a valid ``.safetensors`` file, "is not a readable mask net", which blamed the file.
"""

from __future__ import annotations

import sys

import pytest
import torch

from captum_ext.bundled import load_bundled_introspective_network, load_bundled_mask_explainer
from captum_ext.metrics import road_imputation


def _hide(monkeypatch, *modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError


def test_safetensors_files_name_the_missing_package(tmp_path, monkeypatch):
    explainer = load_bundled_mask_explainer()
    head = load_bundled_introspective_network()
    explainer.save(tmp_path / "masks.safetensors")  # valid files, written with the package
    head.save(tmp_path / "head.safetensors")
    _hide(monkeypatch, "safetensors", "safetensors.torch")
    message = r"needs safetensors, which is not installed: pip install 'captum-ext\[extras\]'"
    calls = (
        lambda: explainer.save(tmp_path / "again.safetensors"),
        lambda: explainer.load(tmp_path / "masks.safetensors"),
        lambda: head.save(tmp_path / "again_head.safetensors"),
        lambda: type(head).load(tmp_path / "head.safetensors", head.model),
    )
    for call in calls:
        with pytest.raises(ImportError, match=message):
            call()


def test_the_direct_road_solver_names_scipy(monkeypatch):
    _hide(monkeypatch, "scipy", "scipy.sparse", "scipy.sparse.linalg")
    images = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    removed = torch.zeros(1, 8, 8, dtype=torch.bool)
    removed[0, 2:5, 2:5] = True
    with pytest.raises(ImportError, match=r"solver='direct'\) needs scipy"):
        road_imputation(images, removed, noise=0.0, solver="direct")
