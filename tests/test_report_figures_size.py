"""Report figures of large images, progress while figures are drawn, the list of a report's
figures after a run that was killed, and ``captum-ext score`` on a folder with damaged files.

From an audit of the command line on 1600 x 1200 photos (``--transform none``): every figure
was written at the photo's full resolution although the page shows it 168 px wide (90 MB of
PNGs for two photos, seconds per figure); the figures were drawn, and the trust scores
probed, without any output; a report run killed by SIGTERM left its figures unlisted, so the
next run into its folder never removed them; and ``score`` stopped at the first damaged
image, throwing away the scores of all the others.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captum_ext.viz import contrastive_section, explanation_metrics_section, voice_section
from captum_ext.viz.introspection import IntrospectionSummary, render_introspection
from captum_ext.viz.masks import MinimalMaskData, _kept_pixels, _mask_overlay, render_minimal_mask
from captum_ext.viz.report import _FIGURE_WIDTH
from captum_ext.viz.trust import trust_section

#: a photo larger than the figures (600 x 400, drawn at 336 x 224) and one smaller (28 x 28)
LARGE, SMALL = (400, 600), (28, 28)
SHRUNK = (224, 336)  # LARGE with its longer side at FIGURE_PIXELS


class TinyNet(nn.Module):
    """Four classes from a strided convolution: cheap on 400 x 600 inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.ReLU())
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _images(size: tuple[int, int], n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shown = torch.rand(n, 3, *size, generator=generator)
    return shown * 2 - 1, shown  # the model's inputs, and the images in [0, 1]


def _picture_sizes(folder: Path) -> dict[str, tuple[int, int]]:
    """(height, width) of every per-image PNG in ``folder`` (the plots and colour bars,
    drawn at their own size, left out)."""
    sizes = {}
    for path in sorted(folder.glob("*.png")):
        if path.stem[0].isdigit() or path.stem.startswith("least_trusted"):
            with Image.open(path) as image:
                sizes[path.name] = (image.height, image.width)
    assert sizes, f"no figures in {folder}"
    return sizes


def test_the_figure_size_is_twice_the_width_the_page_shows_a_figure():
    from captum_ext.viz.report import FIGURE_PIXELS

    assert FIGURE_PIXELS == 2 * _FIGURE_WIDTH == 336


@pytest.mark.parametrize("size, drawn", [(LARGE, SHRUNK), (SMALL, SMALL)])
def test_contrastive_figures_are_shrunk_to_the_page_never_enlarged(tmp_path, size, drawn):
    """Each of the five figures of a 600 x 400 image was written 600 x 400."""
    model = TinyNet().eval()
    images, shown = _images(size)
    contrastive_section(model, "features", images, shown, None, tmp_path, progress=False)
    sizes = _picture_sizes(tmp_path / "images" / "contrastive")
    assert len(sizes) == 5
    assert set(sizes.values()) == {drawn}


@pytest.mark.parametrize("size, drawn", [(LARGE, SHRUNK), (SMALL, SMALL)])
def test_voice_metrics_and_trust_figures_are_shrunk(tmp_path, size, drawn):
    model = TinyNet().eval()
    images, shown = _images(size, n=2)
    common = (model, "features", images, shown, None, tmp_path)
    voice_section(*common, progress=False, contrasts=2)
    explanation_metrics_section(*common, progress=False, n_steps=2, examples=2)
    trust_section(*common, progress=False, scores="gradtrust,softmax", least_trusted=2)
    for folder, count in (("voice", 2 * 4), ("metrics", 2 * 4), ("trust", 2 * 3)):
        sizes = _picture_sizes(tmp_path / "images" / folder)
        assert len(sizes) == count, folder
        assert set(sizes.values()) == {drawn}, folder


def _mask_data(n: int, size: tuple[int, int]) -> MinimalMaskData:
    mask = np.zeros((n, *size), dtype=np.float32)
    mask[:, : size[0] // 2] = 1.0
    ones = np.ones(n)
    return MinimalMaskData(
        mask=mask,
        active=ones / 2,
        agreement=ones > 0,
        confidence=ones,
        kept_confidence=ones,
        sufficiency=ones,
        necessity=ones,
        target=[0] * n,
        class_names=["a", "b"],
        mode="amortised",
        circuits={},
        comparisons={},
    )


@pytest.mark.parametrize("size, drawn", [(LARGE, SHRUNK), (SMALL, SMALL)])
def test_mask_and_introspection_figures_are_shrunk(tmp_path, size, drawn):
    _, shown = _images(size, n=2)
    render_minimal_mask(_mask_data(2, size), shown, tmp_path)
    summary = IntrospectionSummary(
        feed_forward=torch.tensor([0, 1]),
        feed_forward_confidence=torch.tensor([0.9, 0.8]),
        introspective=torch.tensor([0, 0]),
        introspective_confidence=torch.tensor([0.7, 0.6]),
        order=torch.tensor([1, 0]),
    )
    render_introspection(summary, shown, tmp_path, class_names=["a", "b"])
    for folder, count in (("masks", 2 * 3), ("introspection", 2)):
        sizes = _picture_sizes(tmp_path / "images" / folder)
        assert len(sizes) == count, folder
        assert set(sizes.values()) == {drawn}, folder


def test_shrinking_keeps_the_aspect_ratio_and_the_range_of_the_maps():
    """Area averaging: each pixel the mean of those it covers. A 1200 x 1600 image and its
    map come out 252 x 336; a constant map keeps its value, a 0 / 1 map stays in [0, 1]
    with its mean, uint8 stays uint8, NaN counts as 0 (as ``overlay`` draws it)."""
    from captum_ext.viz.report import _for_figure

    image = np.full((1200, 1600, 3), 200, dtype=np.uint8)
    constant = np.full((1200, 1600), 0.25, dtype=np.float32)
    half = np.zeros((1200, 1600), dtype=np.float32)
    half[:, ::2] = 1.0  # stripes one pixel wide: sampling would keep all or none of them
    holes = np.full((1200, 1600), np.nan, dtype=np.float32)
    shrunk, flat, striped, empty = _for_figure(image, constant, half, holes)
    assert shrunk.shape == (252, 336, 3) and shrunk.dtype == np.uint8
    assert np.all(shrunk == 200)
    assert flat.shape == striped.shape == (252, 336)
    np.testing.assert_allclose(flat, 0.25, atol=1e-6)
    assert 0.0 <= striped.min() and striped.max() <= 1.0
    assert striped.mean() == pytest.approx(0.5, abs=1e-3)
    assert np.all(empty == 0.0)
    small = np.zeros((300, 20, 1), dtype=np.float32)  # not enlarged
    assert _for_figure(small)[0].shape == (300, 20, 1)
    tall = np.zeros((1000, 50), dtype=np.float32)
    assert _for_figure(tall)[0].shape == (336, 17)


def test_mask_pictures_at_full_size_are_unchanged_and_shrunk_ones_blend():
    """A 0 / 1 mask at the image's size draws as before (kept pixels red in the overlay,
    as they are on grey in the kept-pixels picture); a shrunk mask's share blends."""
    image = np.full((2, 2, 3), 0.5, dtype=np.float32)
    mask = np.array([[1.0, 0.0], [0.5, 0.0]], dtype=np.float32)
    kept = _kept_pixels(image, mask)
    np.testing.assert_array_equal(kept[0, 0], [128, 128, 128])  # the image's own grey
    assert kept[0, 1].tolist() == [128, 128, 128]  # left out: mid-grey
    tinted = _mask_overlay(image, mask)
    assert tinted[0, 0, 0] > tinted[0, 0, 1]  # red
    assert tinted[0, 1, 0] == tinted[0, 1, 1]  # grey
    assert tinted[0, 1, 0] < tinted[1, 0, 0] < tinted[0, 0, 0]  # half kept: in between


# --------------------------------------------------------------------------------------
# progress while drawing


def test_drawing_the_figures_shows_progress(tmp_path, capsys):
    """The compute bar reached 100 % and the page came minutes later, with no output."""
    model = TinyNet().eval()
    images, shown = _images(SMALL, n=2)
    common = (model, "features", images, shown, None, tmp_path)
    contrastive_section(*common, progress=True)
    voice_section(*common, progress=True, contrasts=2)
    explanation_metrics_section(*common, progress=True, n_steps=2)
    trust_section(*common, progress=True, scores="gradtrust,softmax", least_trusted=1)
    err = capsys.readouterr().err
    for section in ("contrastive", "VOICE", "metrics", "trust"):
        assert f"drawing {section} figures" in err, err


def _probes(monkeypatch) -> list[int]:
    """The number of images of each call of the trust section's probe of its scores."""
    from captum_ext.viz import trust

    probed: list[int] = []
    runnable_scores = trust._runnable_scores

    def spying(module, probe, *args, **kwargs):
        probed.append(probe.shape[0])
        return runnable_scores(module, probe, *args, **kwargs)

    monkeypatch.setattr(trust, "_runnable_scores", spying)
    return probed


def test_the_trust_scores_are_not_probed_when_they_all_run(monkeypatch, tmp_path):
    """Every trust score ran in full on two images before the scoring, in silence (a third
    of the section on two large photos)."""
    probed = _probes(monkeypatch)
    images, shown = _images(SMALL, n=3)
    scores = "gradtrust,softmax,entropy,margin"
    trust_section(TinyNet().eval(), "features", images, shown, None, tmp_path, False, scores=scores)
    assert probed == []


def test_a_score_that_cannot_run_is_found_by_the_probe_which_says_so(monkeypatch, tmp_path, capsys):
    probed = _probes(monkeypatch)
    images, shown = _images(SMALL, n=3)
    section = trust_section(
        TinyNet().eval(),
        "features",
        images,
        shown,
        None,
        tmp_path,
        True,
        scores="gradtrust,softmax,mc_dropout",
    )
    assert probed == [2]
    assert "Not computed: mc_dropout" in section.intro
    assert "checking which trust scores run (on 2 images)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# the list of a report's figures after a killed run


KILLED_RUN = """
import importlib
import os
import sys

from captum_ext.viz.build import ReportConfig, build_report

report = importlib.import_module("captum_ext.viz.report")  # draws the contrastive figures
save_png = report.save_png
saved = []


def killed_after_seven(array, path):  # image 0's five figures, then two of image 1's
    if len(saved) == 7:
        os._exit(9)  # no clean-up at all, as after SIGKILL or the out-of-memory killer
    saved.append(path)
    return save_png(array, path)


report.save_png = killed_after_seven
build_report(ReportConfig(limit=2, sections=["contrastive"], out=sys.argv[1], progress=False))
"""


def test_a_killed_report_run_has_listed_its_figures_and_the_next_run_removes_them(tmp_path):
    """The figures were listed only in an ``except`` clause, which SIGTERM and SIGKILL never
    reach: a re-run into the same folder left them for good."""
    out = tmp_path / "report"
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_RUN))
    run = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, timeout=300)
    assert run.returncode == 9, run.stderr.decode()
    pngs = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")}
    assert "images/contrastive/00001_gradcam.png" in pngs
    listed = set((out / "images" / ".captum-ext-figures").read_text().split())
    assert pngs <= listed
    from captum_ext.viz.build import ReportConfig, build_report

    build_report(ReportConfig(limit=1, sections=["contrastive"], out=out, progress=False))
    left = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")}
    assert not any(name.startswith("images/contrastive/00001") for name in left)
    assert "images/contrastive/00000_input.png" in left


TERMINATED_RUN = """
import os
import signal
import sys
import time

import captum_ext.cli as cli


def terminated(args):
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the handler raises as soon as the signal arrives
    finally:
        open(sys.argv[1], "w").close()  # clean-up code ran
    return 0


cli._run_score = terminated
status = cli.main(["score", "--no-progress"])
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
sys.exit(status)
"""


def test_sigterm_ends_a_command_as_ctrl_c_does(tmp_path):
    """SIGTERM (and SIGHUP) ended the process at once, skipping every clean-up; now they
    unwind it as Ctrl-C does, with exit status 128 + the signal."""
    script, cleaned = tmp_path / "terminated.py", tmp_path / "cleaned"
    script.write_text(textwrap.dedent(TERMINATED_RUN))
    run = subprocess.run(
        [sys.executable, str(script), str(cleaned)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert cleaned.exists()
    assert run.stderr.strip() == "captum-ext score: stopped by SIGTERM"


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP")
def test_an_ignored_sighup_stays_ignored(monkeypatch):
    """Under ``nohup`` a closed terminal must not stop the command."""
    import captum_ext.cli as cli

    seen = []
    monkeypatch.setattr(
        cli, "_run_score", lambda args: seen.append(signal.getsignal(signal.SIGHUP)) or 0
    )
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert cli.main(["score", "--no-progress"]) == 0
        assert seen == [signal.SIG_IGN]
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


# --------------------------------------------------------------------------------------
# score: damaged files


def _digit_png(path: Path, value: int) -> None:
    pixels = np.full((28, 28), value, dtype=np.uint8)
    pixels[8:20, 12:16] = 255 - value
    Image.fromarray(pixels).save(path)


def _truncated_jpeg(path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 3 // 4])


def _score(folder: Path, out: Path, capsys) -> tuple[int, list[str]]:
    from captum_ext.cli import main

    argv = ["score", "--images", str(folder), "--transform", "digits", "--scores", "softmax"]
    status = main([*argv, "--out", str(out), "--no-progress", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err.strip().splitlines()


def test_score_keeps_the_readable_images_and_lists_every_damaged_one(tmp_path, capsys):
    """A truncated JPEG among good PNGs ended the run when its batch came, with no CSV and
    only that file named."""
    import csv

    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate(["a.png", "c.png", "e.png"]):
        _digit_png(folder / name, 40 * i)
    _truncated_jpeg(folder / "b_truncated.jpg")
    (folder / "d_text.png").write_text("not an image\n")
    out = tmp_path / "s.csv"
    status, lines = _score(folder, out, capsys)
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("captum-ext score: error: `--images`: cannot read images")
    assert "'b_truncated.jpg' (OSError: image file is truncated" in lines[0]
    assert "'d_text.png' (not an image file Pillow can read)" in lines[0]
    assert "the scores of the other 3 images" in lines[0]
    with out.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["index"], row["path"]) for row in rows] == [
        ("0", "a.png"),
        ("2", "c.png"),
        ("4", "e.png"),
    ]


def test_score_with_a_damaged_first_file_lists_every_damaged_one(tmp_path, capsys):
    """The folder reader compares each image with the first file: nothing can be scored
    then, and every unreadable file is named at once, before any scoring."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a_text.png").write_text("not an image\n")
    _digit_png(folder / "b.png", 10)
    _truncated_jpeg(folder / "c_truncated.jpg")
    out = tmp_path / "s.csv"
    status, lines = _score(folder, out, capsys)
    assert status == 2 and len(lines) == 1, lines
    assert "cannot read images (2 files) 'a_text.png'" in lines[0]
    assert "'c_truncated.jpg'" in lines[0] and "nothing was scored" in lines[0]
    assert not out.exists()


def test_score_still_stops_on_an_image_of_another_size(tmp_path, capsys):
    """Only files that cannot be read are left out; other errors stop the run as before."""
    folder = tmp_path / "images"
    folder.mkdir()
    _digit_png(folder / "a.png", 10)
    Image.fromarray(np.zeros((30, 20, 3), dtype=np.uint8)).save(folder / "b.png")
    from captum_ext.cli import main

    argv = ["score", "--images", str(folder), "--transform", "none", "--scores", "softmax"]
    status = main([*argv, "--out", str(tmp_path / "s.csv"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2
    assert "cannot read" not in err and "b.png" in err


def test_score_with_a_damaged_first_file_checks_a_bounded_number_of_files(
    tmp_path, capsys, monkeypatch
):
    """Listing the unreadable files decodes each file: on a large folder that took minutes
    (4 ms a 512 px JPEG), so only the first files are checked, and the message says so."""
    import captum_ext.cli as cli

    monkeypatch.setattr(cli, "_SCAN_ON_FAILURE", 2)
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a_text.png").write_text("not an image\n")
    _digit_png(folder / "b.png", 10)
    _truncated_jpeg(folder / "c_truncated.jpg")
    status, lines = _score(folder, tmp_path / "s.csv", capsys)
    assert status == 2 and len(lines) == 1, lines
    assert "'a_text.png'" in lines[0] and "c_truncated" not in lines[0]
    assert "among the first 2 of 3 files" in lines[0]
