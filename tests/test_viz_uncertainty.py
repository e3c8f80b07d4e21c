"""captum_ext.viz.uncertainty: the VOICE and the deletion / insertion report sections."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from PIL import Image

from captum_ext.attr import VOICE, ContrastCAM, CounterfactualCAM, GradCAM
from captum_ext.bundled import load_bundled_model
from captum_ext.data import BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits, load_sample_digits
from captum_ext.metrics import deletion, insertion
from captum_ext.viz import (
    Figure,
    Report,
    Row,
    Section,
    Table,
    explanation_metrics_section,
    overlay,
    voice_section,
)

IMG_SRC = re.compile(r'<img src="([^"]+)"')
UNCERTAINTY = re.compile(
    r"Uncertainty \(VOICE, (\d+) contrasts\): IoU ([-\d.]+), SNR ([-\d.]+), "
    r"log-likelihood ([-+\d.e]+)"
)
WRONG = 17  # the bundled model reads sample digit 17, a 4, as a 7


@pytest.fixture(scope="module")
def digits():
    images, labels = load_sample_digits()
    pick = torch.tensor([0, 9, WRONG, 26, 35])
    return images[pick], labels[pick]


def assert_png_not_blank(path) -> None:
    assert Path(path).is_file(), path
    with Image.open(path) as image:
        assert np.asarray(image, dtype=float).std() > 0, f"{path} is blank"


def uncertainty_numbers(section: Section) -> list[tuple[int, float, float, float]]:
    values = []
    for row in section.rows[1:]:
        match = UNCERTAINTY.fullmatch(row.figures[3].caption)
        assert match, row.figures[3].caption
        k, iou, snr, ll = match.groups()
        values.append((int(k), float(iou), float(snr), float(ll)))
    return values


# ---------------------------------------------------------------------------------------
# VOICE section


def test_voice_section_rows_pictures_and_numbers(tmp_path, bundled_model, digits, capsys):
    images, labels = digits
    shown = denormalize_digits(images)
    before = model_snapshot(bundled_model)
    section = voice_section(
        bundled_model,
        BUNDLED_CAM_LAYER,
        images,
        shown,
        DIGIT_CLASSES,
        tmp_path,
        progress=False,
        labels=labels,
        batch_size=2,
    )
    assert_model_unchanged(bundled_model, before)
    assert capsys.readouterr().err == ""
    assert "VOICE" in section.intro and "IoU" in section.intro and "SNR" in section.intro
    assert len(section.rows) == 1 + len(images)

    expected = VOICE(GradCAM(bundled_model, BUNDLED_CAM_LAYER)).attribute(images)
    numbers = uncertainty_numbers(section)
    for i, row in enumerate(section.rows[1:]):
        p, q = int(expected.prediction[i]), int(expected.contrast_class[i])
        assert f"predicted {p}" in row.label and f"runner-up {q}" in row.label
        verdict = "correct" if p == int(labels[i]) else "wrong"
        assert f"true class {int(labels[i])} ({verdict})" in row.label
        captions = [f.caption for f in row.figures]
        assert captions[0] == "Input"
        assert captions[1] == f"Explanation (Grad-CAM): Why {p}?"
        assert captions[2] == f"Contrast: Why {p}, rather than {q}?"
        k, iou, snr, ll = numbers[i]
        assert k == 9
        assert iou == pytest.approx(float(expected.iou[i]), abs=5e-4)
        assert snr == pytest.approx(float(expected.snr[i]), abs=5e-4)
        assert ll == pytest.approx(float(expected.log_likelihood[i]), rel=1e-3, abs=1e-12)
        for figure in row.figures:
            assert_png_not_blank(figure.path)
    assert "wrong" in section.rows[1 + 2].label  # sample 17

    # the uncertainty PNG is the overlay of VOICE's uncertainty map, in the section's
    # default colour map: the perceptually uniform "inferno" (issue 19; was "jet")
    picture = overlay(
        shown[2].permute(1, 2, 0).numpy(), expected.uncertainty[2, 0].numpy(), cmap="inferno"
    )
    with Image.open(section.rows[3].figures[3].path) as image:
        assert np.abs(np.asarray(image).astype(int) - picture).max() <= 1

    # summary table: all, correct, wrong
    table = section.rows[0].table
    assert isinstance(table, Table)
    # one colour bar per section, beside the summary (issue 19; was no figure there)
    (bar,) = section.rows[0].figures
    assert bar.caption == "Colour scale of the maps" and Path(bar.path).is_file()
    assert "see the colour bar" in section.intro and "red: high" not in section.intro
    by_group = {cells[0]: cells for cells in table.rows}
    wrong = by_group["wrongly classified"]
    assert wrong[1] == "1" and float(wrong[2]) == pytest.approx(float(expected.iou[2]), abs=5e-4)
    correct = by_group["correctly classified"]
    keep = torch.tensor([0, 1, 3, 4])
    assert correct[1] == "4"
    assert float(correct[2]) == pytest.approx(float(expected.iou[keep].mean()), abs=5e-4)
    assert float(correct[3]) == pytest.approx(float(expected.snr[keep].mean()), abs=5e-4)
    assert float(by_group["all"][2]) == pytest.approx(float(expected.iou.mean()), abs=5e-4)

    report = Report("voice")
    report.add_section(section)
    html = report.write(tmp_path).read_text(encoding="utf-8")
    assert html.count('<table class="data">') == 1 and "wrongly classified" in html
    sources = IMG_SRC.findall(html)
    assert len(sources) == 1 + 4 * len(images)  # the colour bar, then 4 per image
    assert sources[0].endswith("colorbar.png")
    for src in sources:
        assert_png_not_blank(tmp_path / urllib.parse.unquote(src))


def test_voice_section_top_k_contrasts_and_batching(tmp_path, bundled_model, digits):
    images, _ = digits
    shown = denormalize_digits(images).permute(0, 2, 3, 1).numpy()  # N x H x W x C arrays
    sections = [
        voice_section(
            bundled_model,
            BUNDLED_CAM_LAYER,
            images,
            shown,
            None,
            tmp_path / str(b),
            False,
            contrasts=3,
            batch_size=b,
        )
        for b in (1, 64)
    ]
    expected = VOICE(GradCAM(bundled_model, BUNDLED_CAM_LAYER)).attribute(images, contrasts=3)
    assert uncertainty_numbers(sections[0]) == uncertainty_numbers(sections[1])
    for i, (k, iou, snr, _) in enumerate(uncertainty_numbers(sections[0])):
        assert k == 3
        assert iou == pytest.approx(float(expected.iou[i]), abs=5e-4)
        assert snr == pytest.approx(float(expected.snr[i]), abs=5e-4)
    assert "3 most likely classes" in sections[0].intro
    # no labels: the summary has the "all" line only
    assert [cells[0] for cells in sections[0].rows[0].table.rows] == ["all"]


def test_voice_section_progress_bar_on_stderr(tmp_path, bundled_model, digits, capsys):
    images, _ = digits
    voice_section(
        bundled_model, BUNDLED_CAM_LAYER, images[:2], denormalize_digits(images[:2]), None, tmp_path
    )
    captured = capsys.readouterr()
    assert "VOICE uncertainty" in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"contrasts": 0}, ValueError, "contrasts"),
        ({"contrasts": "some"}, ValueError, "contrasts"),
        ({"contrasts": True}, ValueError, "contrasts"),
        ({"contrasts": 10}, ValueError, "at most 9"),
        ({"batch_size": 0}, ValueError, "batch-size"),
        ({"labels": [1, 2]}, ValueError, "labels"),
        ({"labels": [0, 0, 0, 0, 12]}, ValueError, "labels"),
        ({"class_names": ["a", "b"]}, ValueError, "class_names"),
    ],
)
def test_voice_section_bad_input(tmp_path, bundled_model, digits, kwargs, error, match):
    images, _ = digits
    arguments = {"class_names": None, **kwargs}
    class_names = arguments.pop("class_names")
    with pytest.raises(error, match=match):
        voice_section(
            bundled_model,
            BUNDLED_CAM_LAYER,
            images,
            denormalize_digits(images),
            class_names,
            tmp_path,
            False,
            **arguments,
        )


# ---------------------------------------------------------------------------------------
# deletion / insertion section


def test_metrics_section_tables_plot_and_numbers(tmp_path, bundled_model, digits, capsys):
    images, labels = digits
    shown = denormalize_digits(images)
    before = model_snapshot(bundled_model)
    section = explanation_metrics_section(
        bundled_model,
        BUNDLED_CAM_LAYER,
        images,
        shown,
        DIGIT_CLASSES,
        tmp_path,
        progress=False,
        n_steps=10,
        labels=labels,
        batch_size=2,
        examples=2,
    )
    assert_model_unchanged(bundled_model, before)
    assert capsys.readouterr().err == ""
    assert "Lower deletion AUC is better" in section.intro
    assert "higher insertion AUC is better" in section.intro
    assert len(section.rows) == 2 + 2

    probabilities = bundled_model(images).softmax(1)
    top = probabilities.topk(2, dim=1).indices
    maps = {
        "Grad-CAM": GradCAM(bundled_model, BUNDLED_CAM_LAYER).attribute(
            images, target=top[:, 0], upsample_to_input=True, normalize="minmax"
        ),
        "ContrastCAM": ContrastCAM(bundled_model, BUNDLED_CAM_LAYER).attribute(
            images, contrast=top[:, 1], upsample_to_input=True, normalize="minmax"
        ),
        "CounterfactualCAM": CounterfactualCAM(bundled_model, BUNDLED_CAM_LAYER).attribute(
            images, target=top[:, 0], upsample_to_input=True, normalize="minmax"
        ),
    }
    expected = {
        (metric.__name__, name): metric(bundled_model, images, heat, target=top[:, 0], n_steps=10)
        for metric in (deletion, insertion)
        for name, heat in maps.items()
    }

    mean_row = section.rows[0]
    assert mean_row.label == f"Mean over {len(images)} images"
    (plot,) = mean_row.figures
    assert plot.width is not None and plot.width > 168
    assert_png_not_blank(plot.path)
    with Image.open(plot.path) as image:
        assert image.size[0] > 400
    means = {cells[0]: cells for cells in mean_row.table.rows}
    assert list(means) == ["Grad-CAM", "ContrastCAM", "CounterfactualCAM"]
    for name, cells in means.items():
        assert float(cells[2]) == pytest.approx(float(expected["deletion", name].mean()), abs=5e-4)
        assert float(cells[3]) == pytest.approx(float(expected["insertion", name].mean()), abs=5e-4)
    best = sum(int(cells[4].split(" / ")[0]) for cells in means.values())
    assert best == len(images)

    per_image = section.rows[1].table
    assert per_image.columns[:4] == ["image", "predicted P", "runner-up Q", "true class"]
    assert len(per_image.rows) == len(images)
    for i, cells in enumerate(per_image.rows):
        assert cells[:4] == [f"#{i}", str(int(top[i, 0])), str(int(top[i, 1])), str(int(labels[i]))]
        for column, cell in zip(per_image.columns[4:], cells[4:]):
            metric, name = column.split(" ", 1)
            assert float(cell) == pytest.approx(float(expected[metric, name][i]), abs=5e-4)

    for row in section.rows[2:]:
        assert row.label.startswith("Example") and len(row.figures) == 4
        for figure in row.figures:
            assert_png_not_blank(figure.path)

    report = Report("metrics")
    report.add_section(section)
    page = report.write(tmp_path).read_text(encoding="utf-8")
    assert page.count('<table class="data">') == 2
    assert 'style="width: ' in page and "CounterfactualCAM" in page


def test_metrics_section_without_display_images_and_other_baselines(
    tmp_path, bundled_model, digits
):
    images, _ = digits
    section = explanation_metrics_section(
        bundled_model,
        BUNDLED_CAM_LAYER,
        images[:2],
        None,
        None,
        tmp_path,
        False,
        n_steps=5,
        baselines="blur",
    )
    assert [row.label for row in section.rows] == ["Mean over 2 images", "Per image"]
    assert "true class" not in section.rows[1].table.columns
    assert "blurred" in section.intro
    heat = GradCAM(bundled_model, BUNDLED_CAM_LAYER).attribute(
        images[:2], upsample_to_input=True, normalize="minmax"
    )
    auc = deletion(bundled_model, images[:2], heat, n_steps=5, baselines="blur")
    assert float(section.rows[1].table.rows[1][3]) == pytest.approx(float(auc[1]), abs=5e-4)


def test_metrics_section_bad_input(tmp_path, bundled_model, digits):
    images, _ = digits
    shown = denormalize_digits(images)
    for kwargs, match in [
        ({"n_steps": 0}, "n_steps"),
        ({"examples": -1}, "examples"),
        ({"batch_size": 0}, "batch-size"),
        ({"baselines": "zeros"}, "baselines"),
    ]:
        with pytest.raises(ValueError, match=match):
            explanation_metrics_section(
                bundled_model, BUNDLED_CAM_LAYER, images, shown, None, tmp_path, False, **kwargs
            )
    with pytest.raises(ValueError, match="display_images"):
        explanation_metrics_section(
            bundled_model, BUNDLED_CAM_LAYER, images, shown[:2], None, tmp_path, False
        )


# ---------------------------------------------------------------------------------------
# report additions: tables and figure widths


def test_table_and_figure_width_in_report(tmp_path):
    picture = tmp_path / "p.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(picture)
    table = Table(["name", "value"], [["a <b>", 1]], caption="numbers & more")
    table.add_row(["c", 2.5])
    assert table.rows == [["a <b>", "1"], ["c", "2.5"]]
    section = Section("S")
    section.add_row("with table", [Figure("wide", picture, width=400)], table=table)
    section.rows.append(Row("plain", [("narrow", picture)]))
    report = Report("t")
    report.add_section(section)
    html = report.write(tmp_path / "out").read_text(encoding="utf-8")
    assert "<td>a &lt;b&gt;</td>" in html and "numbers &amp; more" in html
    assert html.count('style="width: 400px"') == 2  # the figure and its image
    assert html.count("<figure>") == 1  # the narrow one keeps the default width
    with pytest.raises(ValueError, match="cells"):
        table.add_row(["only one"])
    with pytest.raises(TypeError, match="sequence"):
        Table("ab")
    with pytest.raises(ValueError, match="width"):
        Figure("x", picture, width=0)
    with pytest.raises(TypeError, match="Table"):
        Row("r", [], table=[["a"]])


# ---------------------------------------------------------------------------------------
# command line


def run_cli(*args: str, cwd: Path):
    return subprocess.run(
        [sys.executable, "-m", "captum_ext", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_voice_section_end_to_end(tmp_path):
    out = tmp_path / "voice-report"
    result = run_cli(
        "report",
        "--sections",
        "voice",
        "--voice-contrasts",
        "4",
        "--limit",
        "3",
        "--no-progress",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "VOICE" in html and "4 contrasts" in html
    assert "CounterfactualCAM" not in html  # only the VOICE section
    sources = IMG_SRC.findall(html)
    assert len(sources) == 1 + 3 * 4  # the colour bar, then 4 per image
    for src in sources:
        assert_png_not_blank(out / urllib.parse.unquote(src))
    images, _ = load_sample_digits()
    expected = VOICE(GradCAM(load_bundled_model(), BUNDLED_CAM_LAYER)).attribute(
        images[:3], contrasts=4
    )
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", html)
    matches = [m for m in map(UNCERTAINTY.fullmatch, captions) if m]
    assert len(matches) == 3
    for i, match in enumerate(matches):
        assert int(match.group(1)) == 4
        assert float(match.group(2)) == pytest.approx(float(expected.iou[i]), abs=5e-4)
        assert float(match.group(3)) == pytest.approx(float(expected.snr[i]), abs=5e-4)


@pytest.mark.parametrize("value", ["bogus", "voice,bogus", ""])
def test_cli_bad_sections_exit_2_with_one_line(tmp_path, value):
    result = run_cli("report", "--sections", value, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--sections" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
