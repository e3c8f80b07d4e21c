"""What the command line's and the loaders' messages say: the current folder as a module's
home, ``--classes`` checked before the folders it names, ``--mask-layers`` without
``--mask-net``, the loaders' Python argument names, ``log_probabilities`` of logits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources

import pytest
import torch
from _helpers import importable_module
from PIL import Image

from captum_ext.cli import main
from captum_ext.data import load_image_folder, load_model, load_state_dict_file, log_probabilities
from captum_ext.data.loading import (
    ImageFolderDataset,
    check_folder_labels,
    read_class_names,
    resolve_inputs,
)

FIVE_CLASSES = """
import torch.nn as nn


def make():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
"""


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------
# a module in the current folder, through the installed `captum-ext` script


def test_console_script_imports_a_factory_module_from_the_current_folder(tmp_path):
    """The error for `--model ./mymodel.py:make` advises 'mymodel:make' "with '.' as the
    current folder": the installed script (which, unlike `python -m`, does not put the
    current folder on sys.path) answered "No module named 'mymodel'"."""
    script = shutil.which("captum-ext")
    if script is None:
        pytest.skip("the captum-ext console script is not on PATH")
    (tmp_path / "mymodel.py").write_text(FIVE_CLASSES)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # the weights file is missing: an error that comes only after the module was imported
    command = [script, "score", "--model", "mymodel:make", "--weights", "nope.pt"]
    result = subprocess.run(
        command + ["--no-progress", "--out", "s.csv"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "`--weights` file not found: 'nope.pt'." in result.stderr, result.stderr
    assert "cannot import" not in result.stderr


def test_a_module_in_the_current_folder_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "_cwd_model_xyz.py").write_text(FIVE_CLASSES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    before = list(sys.path)
    try:
        model = load_model("_cwd_model_xyz:make")
    finally:
        sys.modules.pop("_cwd_model_xyz", None)
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 5)
    assert sys.path == before


# --------------------------------------------------------------------------------------
# report: --classes checked against the model before the folders' labels


@pytest.fixture
def five_classes(tmp_path, monkeypatch):
    yield from importable_module("_five_classes_model", FIVE_CLASSES, tmp_path, monkeypatch)


def test_report_checks_the_number_of_class_names_before_the_folders(tmp_path, capsys, five_classes):
    images = tmp_path / "images"
    (images / "eight").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "eight" / "a.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("zero one two three four five six seven eight nine\n".replace(" ", "\n"))
    code = main(
        ["report", "--model", f"{five_classes}:make", "--layer", "1", "--images", str(images)]
        + ["--transform", "none", "--classes", str(classes), "--out", str(tmp_path / "out")]
        + ["--no-progress"]
    )
    line = _error_line(capsys)
    assert code == 2
    assert line.endswith("`--classes` has 10 names but the model has 5 outputs."), line


def test_folder_label_message_names_the_folder():
    with pytest.raises(ValueError, match=r"'eight/a.png' is in a folder named 'eight' \(class 8\)"):
        check_folder_labels(torch.tensor([8]), ["eight/a.png"], 5)
    with pytest.raises(ValueError, match=r"'12/b.png' is in a folder named 12, but the model"):
        check_folder_labels(torch.tensor([1, 12]), ["1/a.png", "12/b.png"], 10)


# --------------------------------------------------------------------------------------
# report: --mask-layers


def test_mask_layers_without_mask_net_is_refused(tmp_path, capsys):
    code = main(
        ["report", "--sections", "masks", "--mask-layers", "no.such.layer", "--limit", "2"]
        + ["--no-progress", "--out", str(tmp_path / "r")]
    )
    line = _error_line(capsys)
    assert code == 2
    assert "`--mask-layers` needs `--mask-net`" in line, line
    assert not (tmp_path / "r").exists()


def test_bad_mask_layer_is_named_as_the_option(tmp_path, capsys):
    mask_net = resources.files("captum_ext.data") / "bundled_mask_net.pt"
    code = main(
        ["report", "--sections", "masks", "--mask-net", str(mask_net), "--mask-layers"]
        + ["no.such.layer", "--limit", "2", "--no-progress", "--out", str(tmp_path / "r")]
    )
    line = _error_line(capsys)
    assert code == 2
    assert "`--mask-layers`='no.such.layer' is not a module of DigitCNN" in line, line
    assert "`layers`" not in line


# --------------------------------------------------------------------------------------
# the loaders name their Python arguments; the command line its options


@pytest.mark.parametrize(
    ("call", "error", "expected"),
    [
        (lambda p: load_model(str(p / "nope.pt")), FileNotFoundError, "`spec` file not found"),
        (lambda p: load_state_dict_file(p / "nope.pt"), FileNotFoundError, "`weights` file not"),
        (lambda p: load_model("torch.nn:Linear"), ValueError, "point `spec` at it"),
        (lambda p: load_image_folder(p / "nope"), FileNotFoundError, "`directory` not found"),
        (lambda p: load_image_folder(p, limit=0), ValueError, "`limit` must be"),
        (lambda p: load_image_folder(p, "bicubic"), ValueError, "`transform`='bicubic'"),
        (lambda p: ImageFolderDataset(p / "nope"), FileNotFoundError, "`directory` not found"),
        (lambda p: resolve_inputs(p / "nope"), FileNotFoundError, "`images` not found"),
        (lambda p: read_class_names(p / "nope.txt"), FileNotFoundError, "`path` file not"),
    ],
)
def test_loaders_called_from_python_name_their_arguments(tmp_path, call, error, expected):
    with pytest.raises(error) as caught:
        call(tmp_path)
    assert expected in str(caught.value)
    assert "--" not in str(caught.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "nope/missing.pt"], "`--model` (spec) file not found: 'nope/missing.pt'."),
        (["--images", "nope"], "`--images` (directory) not found: 'nope'."),
        (["--classes", "nope.txt"], "`--classes` file not found: 'nope.txt'."),
    ],
)
def test_the_command_line_still_names_its_options(tmp_path, capsys, args, expected):
    code = main(["score", *args, "--out", str(tmp_path / "s.csv"), "--no-progress"])
    assert code == 2
    assert _error_line(capsys).endswith(expected)


# --------------------------------------------------------------------------------------
# log_probabilities


@pytest.mark.parametrize(
    "values", [[[2.0, -1.0, 0.5]], [[0.5, 0.6, -0.1]], [[1.5, 0.0, 0.0]]], ids=str
)
def test_log_probabilities_refuses_values_that_are_not_probabilities(values):
    with pytest.raises(ValueError, match=r"`probabilities` must hold probabilities in \[0, 1\]"):
        log_probabilities(torch.tensor(values))


def test_log_probabilities_allows_rounding():
    p = torch.tensor([[1.0 + 1e-7, 0.0, -1e-8]])
    assert torch.isfinite(log_probabilities(p)).all()
    q = torch.tensor([[0.7, 0.2, 0.1]]).softmax(1)
    torch.testing.assert_close(log_probabilities(q).softmax(1), q)


def test_log_probabilities_type_error_is_unchanged():
    with pytest.raises(TypeError, match="`probabilities`"):
        log_probabilities(torch.tensor([[1, 0]]))
