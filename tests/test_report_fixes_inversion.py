"""``--sections inversion`` on a model of your own trained its generator (hours for a
ResNet-18 at 224 px on a CPU) without a word of its own estimate; the estimate is now said
on stderr before the training starts (also with --no-progress) and written on the page."""

from __future__ import annotations

import torch

import captum_ext.inversion as inv
from captum_ext.cli import main

torch.set_num_threads(1)


def test_inversion_estimate_is_said_before_training_and_on_the_page(tmp_path, capsys, monkeypatch):
    said_before_fit = []
    fit = inv.NetworkInversion.fit

    def noting_fit(self, *args, **kwargs):  # what stderr held when the training started
        said_before_fit.append(capsys.readouterr().err)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(inv.NetworkInversion, "fit", noting_fit)
    argv = ["report", "--model", "captum_ext.bundled:load_bundled_model", "--limit", "2"]
    argv += ["--no-progress", "--layer", "features.7", "--sections", "inversion"]
    code = main(argv + ["--inversion-steps", "1", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    (err,) = said_before_fit
    (line,) = [text for text in err.splitlines() if "inversion generator" in text]
    assert line.startswith("captum-ext report: training the inversion generator on cpu: ")
    assert "estimated about " in line and "for 1 steps at batch 64 (10 classes)" in line
    html = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "The generator was trained here on cpu: estimated beforehand about " in html
    assert "; it took " in html
