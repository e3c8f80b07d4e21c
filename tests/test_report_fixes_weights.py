"""A ``torchvision.models`` builder given no ``--weights`` has random weights: ``report``
and ``score`` explained an untrained network without a word. They now warn on stderr (and
the report on its page), naming torchvision's checkpoint file to pass as ``--weights``."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from captum_ext.cli import main
from captum_ext.data.loading import load_model

torchvision = pytest.importorskip("torchvision")
torch.set_num_threads(1)


def write_photos(folder, count=1, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return folder


def test_report_warns_on_stderr_and_on_the_page(tmp_path, capsys):
    images = write_photos(tmp_path / "photos")
    out = tmp_path / "out"
    argv = ["report", "--model", "torchvision.models:resnet18", "--images", str(images)]
    argv += ["--transform", "none", "--sections", "contrastive", "--no-progress"]
    assert main(argv + ["--out", str(out)]) == 0
    err = capsys.readouterr().err
    (line,) = [text for text in err.splitlines() if "random weights" in text]
    assert line.startswith("captum-ext report: warning: `--model` 'torchvision.models:resnet18'")
    # the way to pretrained weights from a local file, as the CLI takes them
    checkpoint = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    assert f"--weights {torch.hub.get_dir()}/checkpoints/{checkpoint}" in line
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "random weights: no --weights" in html  # the Model line
    assert "without `--weights`: torchvision builds resnet18 with random weights" in html


def test_score_warns_on_stderr(tmp_path, capsys):
    images = write_photos(tmp_path / "photos")
    argv = ["score", "--model", "torchvision.models:resnet18", "--images", str(images)]
    argv += ["--transform", "none", "--scores", "softmax", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "s.csv")]) == 0
    err = capsys.readouterr().err
    assert "captum-ext score: warning: `--model` 'torchvision.models:resnet18' without " in err
    assert "random weights" in err


def test_no_warning_with_weights_or_for_other_factories(tmp_path):
    """Only a torchvision builder is known to build random weights; another factory may load
    trained ones itself (the bundled model's does)."""
    from captum_ext.data.loading import RandomWeightsWarning

    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        load_model("torchvision.models:resnet18", weights)
        load_model("captum_ext.bundled:load_bundled_model")
    with pytest.warns(RandomWeightsWarning, match=r"`weights`='.*resnet18-\w+\.pth'"):
        load_model("torchvision.models:resnet18")  # the Python API names its own parameter


def test_help_says_what_a_factory_without_weights_gets(capsys):
    from captum_ext.cli import build_parser

    for command in ("report", "score"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "torchvision.models builder's are random" in text, command
