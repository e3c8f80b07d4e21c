"""``captum-ext report`` and ``score`` on a model of your own: heavy sections that do not fit in
memory, TorchScript models, many classes (issue 19)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from _helpers import importable_module

from captum_ext.cli import main
from captum_ext.viz import build

MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn


    def many_classes():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 1000),
        ).eval()


    class Digits(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
            )
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.features(x), 1))


    def digits():
        torch.manual_seed(0)
        return Digits().eval()


    def no_linear():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 10, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        ).eval()
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``_issue19_models`` on sys.path with a 1000-class tiny CNN factory."""
    yield from importable_module("_issue19_models", MODULE, tmp_path, monkeypatch)


def _low_memory(monkeypatch, free=500):
    import captum_ext.inversion as inv

    monkeypatch.setattr(inv, "available_memory_bytes", lambda device=None: free)


def test_inversion_named_in_sections_that_does_not_fit_exits_2(
    tmp_path, monkeypatch, capsys, user_module
):
    _low_memory(monkeypatch)
    argv = ["report", "--model", f"{user_module}:many_classes", "--limit", "2", "--layer", "2"]
    argv += ["--no-progress", "--sections", "inversion", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "inversion section needs about" in err and "1000 classes" in err
    assert "500 bytes free on cpu" in err
    assert not (tmp_path / "out" / "index.html").exists()


def test_inversion_from_the_default_sections_that_does_not_fit_is_left_out(
    tmp_path, monkeypatch, capsys, user_module
):
    _low_memory(monkeypatch)
    monkeypatch.setattr(build, "USER_MODEL_SECTIONS", ("contrastive", "inversion"))
    out = tmp_path / "out"
    argv = ["report", "--model", f"{user_module}:many_classes", "--limit", "2", "--layer", "2"]
    assert main(argv + ["--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if "inversion" in line]
    assert len(lines) == 1 and "left out" in lines[0] and "500 bytes free" in lines[0]
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "Inversion section" in html and "500 bytes free" in html
    assert "ContrastCAM" in html and "each class looks like" not in html


@pytest.mark.slow
def test_inversion_of_1000_classes_shows_a_sample_of_classes(
    tmp_path, monkeypatch, capsys, user_module
):
    out = tmp_path / "out"
    argv = ["report", "--model", f"{user_module}:many_classes", "--limit", "2", "--layer", "2"]
    argv += ["--no-progress", "--sections", "inversion", "--inversion-steps", "1"]
    assert main(argv + ["--inversion-classes", "3", "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "each class looks like" in html
    assert "The model has 1000 classes; 3 of them, drawn at random" in html


def test_sample_of_a_generator_wider_than_its_matrices(user_module):
    """NetworkInversion.sample_classes builds hot matrices at the generator's working size
    (S = 64 here), not K x K (1000 x 1000 per image)."""
    import importlib

    from captum_ext.inversion import NetworkInversion

    model = importlib.import_module(user_module).many_classes()
    inversion = NetworkInversion(model, input_shape=(1, 28, 28), batch_size=4, seed=0)
    assert inversion.generator.matrix_size < 1000
    seen = []
    hook = inversion.generator.register_forward_pre_hook(
        lambda module, args: seen.append(tuple(args[2].shape))
    )
    try:
        images = inversion.sample(torch.tensor([0, 999, 5]))
    finally:
        hook.remove()
    assert images.shape == (3, 1, 28, 28) and torch.isfinite(images).all()
    s = inversion.generator.matrix_size
    assert seen and all(shape[-2:] == (s, s) for shape in seen), seen


def _save_torchscript(user_module, factory: str, how: str, path):
    import importlib
    import warnings

    from captum_ext.data import load_sample_digits

    model = getattr(importlib.import_module(user_module), factory)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "script":
            compiled = torch.jit.script(model)
        else:
            compiled = torch.jit.trace(model, load_sample_digits()[0][:2])
        torch.jit.save(compiled, str(path))
    return model


@pytest.mark.parametrize("how", ["script", "trace"])
def test_score_reads_the_final_linear_layer_of_a_torchscript_model(
    tmp_path, capsys, user_module, how
):
    import csv

    from captum_ext.data import load_sample_digits
    from captum_ext.metrics import gradtrust

    path = tmp_path / f"digits-{how}.pt"
    eager = _save_torchscript(user_module, "digits", how, path)
    out = tmp_path / "scores.csv"
    argv = ["score", "--model", str(path), "--limit", "4", "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    images = load_sample_digits()[0][:4]
    expected = gradtrust(eager, images, form="topk", log=True)  # the eager model, independently
    got = torch.tensor([float(row["gradtrust"]) for row in rows])
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-5)
    # named explicitly: the same
    assert main(argv[:-1] + [str(tmp_path / "b.csv"), "--final-layer", "fc"]) == 0


def test_score_on_a_torchscript_model_without_a_linear_layer_names_the_option(
    tmp_path, capsys, user_module
):
    path = tmp_path / "conv.pt"
    _save_torchscript(user_module, "no_linear", "script", path)
    argv = ["score", "--model", str(path), "--limit", "2", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`--final-layer`" in err
    assert main(argv + ["--out", str(tmp_path / "t.csv"), "--final-layer", "fcc"]) == 2
    assert "`--final-layer`='fcc' is not a module" in capsys.readouterr().err


def test_score_final_layer_of_an_eager_model(tmp_path, capsys, user_module):
    argv = ["score", "--model", f"{user_module}:no_linear", "--limit", "2", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "pass `--final-layer`" in err and "pass `layer`" not in err
    assert main(argv + ["--out", str(tmp_path / "t.csv"), "--final-layer", "0"]) == 0, (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("how", ["script", "trace"])
def test_report_trust_section_of_a_torchscript_model(tmp_path, capsys, user_module, how):
    path = tmp_path / f"digits-{how}.pt"
    _save_torchscript(user_module, "digits", how, path)
    out = tmp_path / "out"
    argv = ["report", "--model", str(path), "--limit", "2", "--layer", "features.0"]
    argv += ["--no-progress", "--sections", "trust", "--least-trusted", "1", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "Which predictions can I trust?" in html and "left out" not in html


def test_inversion_of_a_torchscript_model_is_one_line_not_a_traceback(
    tmp_path, capsys, user_module
):
    path = tmp_path / "digits.pt"
    _save_torchscript(user_module, "digits", "script", path)
    argv = ["report", "--model", str(path), "--limit", "2", "--layer", "features.0"]
    argv += ["--no-progress", "--sections", "inversion", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'package.module:factory'" in err
