"""The code works with the oldest versions pyproject.toml admits: names a newer release added
are looked up through a fallback, and the pins are raised where the code needs a newer
release (checked against those releases when the pins were set; see CHANGELOG)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_OLD_TORCH = textwrap.dedent(
    """
    import torch
    torch.set_num_threads(1)
    del torch.OutOfMemoryError  # torch 2.1 to 2.4 have only torch.cuda.OutOfMemoryError
    import torch.nn as nn
    from captum_ext.attr import GradCAM
    from captum_ext._utils.maps import upsample_maps

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    try:
        GradCAM(model, model[0]).attribute(torch.randn(2, 1, 8, 8), target=0)
    except RuntimeError as error:
        print("model:", type(error).__name__, "channels" in str(error))
    try:
        upsample_maps(torch.rand(2, 1, 5), (10,), mode="bicubic")
    except ValueError as error:
        print("maps:", type(error).__name__, "interpolate_mode" in str(error))
    """
)


def test_errors_pass_through_on_a_torch_without_torch_out_of_memory_error():
    """`except torch.OutOfMemoryError` turned every error of the user's model into
    "AttributeError: module 'torch' has no attribute 'OutOfMemoryError'" on torch 2.1-2.4,
    which pyproject admits (emulated by deleting the name before the import)."""
    result = subprocess.run(
        [sys.executable, "-c", _OLD_TORCH], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["model: RuntimeError True", "maps: ValueError True"]


def test_no_module_names_torch_out_of_memory_error_directly():
    import ast

    for path in (ROOT / "captum_ext").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "OutOfMemoryError":
                owner = ast.unparse(node.value)
                assert owner != "torch", f"{path}: use _utils.validation.OutOfMemoryError"


@pytest.mark.parametrize("requirement", ["networkx>=3.4", "grad-cam>=1.5.7", "pytest>=8.0"])
def test_pins_admit_only_releases_the_code_was_checked_with(requirement):
    """networkx 3.0-3.3 have no `edges=` in node_link_data (circuits.to_json failed),
    grad-cam before 1.5.7 no FinerCAM context manager (the peer cross-check), pytest before 8
    does not match `pytest.raises(match=)` against exception notes."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    name = requirement.split(">=")[0]
    pins = [line.strip().strip('",') for line in text.splitlines() if f'"{name}>=' in line]
    assert pins and all(pin.startswith(requirement) for pin in pins), pins
