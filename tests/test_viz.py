"""captum_ext.viz: overlays, PNG output, the HTML report and the contrastive section."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from PIL import Image

from captum_ext.attr import ContrastCAM
from captum_ext.bundled import load_bundled_model
from captum_ext.data import BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits, load_sample_digits
from captum_ext.viz import Figure, Report, Row, Section, contrastive_section, overlay, save_png

IMG_SRC = re.compile(r'<img src="([^"]+)"')


def image_sources(index: Path) -> list[Path]:
    html = index.read_text(encoding="utf-8")
    return [index.parent / urllib.parse.unquote(src) for src in IMG_SRC.findall(html)]


# ---------------------------------------------------------------------------------------
# overlay and PNGs


@pytest.mark.parametrize("shape", [(12, 10), (12, 10, 1), (12, 10, 3)])
def test_overlay_shape_and_dtype(shape):
    rng = np.random.default_rng(0)
    image = rng.random(shape)
    heat = rng.random((12, 10))
    out = overlay(image, heat)
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8


def test_overlay_blends_image_and_colormap():
    from matplotlib import colormaps

    image = np.full((4, 5, 3), 0.2)
    heat = np.linspace(0, 1, 20).reshape(4, 5)
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), np.full((4, 5, 3), 51))
    colours = np.round(colormaps["viridis"](heat)[:, :, :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(overlay(image, heat, alpha=1.0, cmap="viridis"), colours)
    half = overlay(image, heat, alpha=0.5).astype(float)
    expected = 0.5 * 0.2 * 255 + 0.5 * colormaps["inferno"](heat)[:, :, :3] * 255  # default
    assert np.abs(half - expected).max() <= 0.5 + 1e-9


def test_overlay_is_not_transposed_or_flipped():
    heat = np.zeros((6, 9))
    heat[0, 8] = 1.0  # top right corner
    out = overlay(np.zeros((6, 9)), heat, alpha=1.0)
    red = out[:, :, 0].astype(int) - out[:, :, 2].astype(int)
    assert np.unravel_index(red.argmax(), red.shape) == (0, 8)


def test_overlay_accepts_tensors_and_uint8():
    image = torch.rand(1, 8, 8).permute(1, 2, 0)
    heat = torch.rand(1, 8, 8)
    assert overlay(image, heat).shape == (8, 8, 3)
    assert overlay((image.numpy() * 255).astype(np.uint8), heat[0]).shape == (8, 8, 3)


def test_overlay_rejects_bad_input():
    image = np.zeros((8, 8, 3))
    with pytest.raises(ValueError, match="heatmap_01_hw.*upsample"):
        overlay(image, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, np.zeros((8, 8)), alpha=1.5)
    with pytest.raises(ValueError, match="cmap"):
        overlay(image, np.zeros((8, 8)), cmap="no-such-map")
    with pytest.raises(ValueError, match="image_01_hwc"):
        overlay(np.zeros((8, 8, 2)), np.zeros((8, 8)))


def test_save_png_round_trip(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = save_png(array, tmp_path / "sub" / "x.png")
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), array)
    grey = save_png(np.linspace(0, 1, 12).reshape(3, 4), tmp_path / "grey.png")
    with Image.open(grey) as image:
        assert image.mode == "RGB" and image.size == (4, 3)


# ---------------------------------------------------------------------------------------
# report


def test_report_links_every_png_relatively(tmp_path):
    out = tmp_path / "out"
    inside = save_png(np.zeros((4, 4, 3), np.uint8), out / "images" / "mine" / "a.png")
    elsewhere = save_png(np.full((300, 300, 3), 200, np.uint8), tmp_path / "elsewhere" / "a.png")
    report = Report("Title <b>&", metadata={"Model": "<script>alert(1)</script>"})
    section = report.add_section(Section("First", "Intro with <tags> & ampersands."))
    section.add_row("row <1>", [("inside", inside), Figure("outside", elsewhere)])
    report.add_section(Section("First", rows=[Row("second", [("again", elsewhere)])]))
    index = report.write(out)
    assert index == out.resolve() / "index.html"
    html = index.read_text(encoding="utf-8")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Title &lt;b&gt;&amp;" in html and "row &lt;1&gt;" in html
    sources = IMG_SRC.findall(html)
    assert len(sources) == 3
    assert all(not src.startswith(("/", "file:")) for src in sources)
    assert sources[0] == "images/mine/a.png"
    for path in image_sources(index):
        assert path.is_file() and path.resolve().is_relative_to(out.resolve())
    assert 'id="first"' in html and 'id="first-2"' in html  # same titles, distinct anchors
    assert 'class="pixelated"' in html  # the 4 x 4 PNG is scaled up without blurring


def test_report_missing_figure(tmp_path):
    report = Report("t")
    report.add_section(Section("s")).add_row("r", [("missing", tmp_path / "none.png")])
    with pytest.raises(FileNotFoundError, match="missing"):
        report.write(tmp_path / "out")
    with pytest.raises(TypeError, match="Section"):
        report.add_section("not a section")
    with pytest.raises(TypeError, match="caption, png path"):
        Row("r", ["just a path"])


# ---------------------------------------------------------------------------------------
# contrastive section


@pytest.fixture(scope="module")
def digits():
    images, labels = load_sample_digits()
    pick = torch.tensor([0, 5, 13, 22, 31, 38])
    return images[pick], labels[pick]


def test_contrastive_section_rows_figures_and_maps(tmp_path, digits, capsys):
    model = load_bundled_model()
    images, labels = digits
    shown = denormalize_digits(images)
    before = model_snapshot(model)
    section = contrastive_section(
        model,
        BUNDLED_CAM_LAYER,
        images,
        shown,
        DIGIT_CLASSES,
        tmp_path,
        progress=False,
        labels=labels,
        batch_size=4,
    )
    assert_model_unchanged(model, before)
    assert capsys.readouterr().err == ""  # progress=False: no bar
    # first the one colour bar of the section's maps, then one row per image
    bar, *rows = section.rows
    assert bar.label == "Colour scale" and len(bar.figures) == 1
    assert Path(bar.figures[0].path).name == "colorbar.png"
    with Image.open(bar.figures[0].path) as image:
        assert np.asarray(image).std() > 0
    assert len(rows) == 6
    assert "ContrastCAM" in section.intro and "CounterfactualCAM" in section.intro
    predicted = model(images).topk(2, dim=1).indices
    for i, row in enumerate(rows):
        p, q = (int(c) for c in predicted[i])
        assert f"predicted {p}" in row.label and f"true class {int(labels[i])}" in row.label
        captions = [f.caption for f in row.figures]
        assert captions[0] == "Input"
        assert captions[1].startswith(f"Grad-CAM: Why {p}?")
        assert captions[2].startswith(f"ContrastCAM: Why {p}, rather than {q}?")
        assert captions[3].startswith(f"CounterfactualCAM: What if not {p}?")
        for figure in row.figures:
            assert Path(figure.path).is_file()
    # the ContrastCAM PNG is exactly the overlay of the method's map
    maps = ContrastCAM(model, BUNDLED_CAM_LAYER).attribute(
        images, contrast=predicted[:, 1], upsample_to_input=True, normalize="minmax"
    )
    for i in (0, 5):
        expected = overlay(
            shown[i].permute(1, 2, 0).numpy(), maps[i, 0].detach().numpy(), cmap="inferno"
        )
        with Image.open(rows[i].figures[2].path) as image:
            np.testing.assert_array_equal(np.asarray(image), expected)
    # Grad-CAM PNGs are the overlay of Captum's map, and that map sits on the digit's ink
    from captum.attr import LayerGradCam

    from captum_ext._utils.maps import minmax_normalize, upsample_maps

    raw = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER)).attribute(
        images, target=predicted[:, 0], relu_attributions=True
    )
    heat = minmax_normalize(upsample_maps(raw.detach(), (28, 28)))[:, 0]
    ink = shown[:, 0] > 0.5
    ratios = []
    for i in range(len(images)):
        expected = overlay(shown[i].permute(1, 2, 0).numpy(), heat[i].numpy(), cmap="inferno")
        with Image.open(rows[i].figures[1].path) as image:
            assert np.abs(np.asarray(image).astype(int) - expected).max() <= 1
        ratios.append(float(heat[i][ink[i]].mean() / heat[i][~ink[i]].mean()))
    assert min(ratios) > 1.0 and np.mean(ratios) > 1.5, ratios
    report = Report("digits")
    report.add_section(section)
    index = report.write(tmp_path)
    for path in image_sources(index):
        with Image.open(path) as image:
            assert np.asarray(image).std() > 0


def test_contrastive_section_batching_does_not_change_pictures(tmp_path, digits):
    model = load_bundled_model()
    images, _ = digits
    shown = denormalize_digits(images).permute(0, 2, 3, 1).numpy()  # N x H x W x C arrays
    pictures = []
    for batch_size in (1, 64):
        out = tmp_path / str(batch_size)
        section = contrastive_section(
            model, BUNDLED_CAM_LAYER, images, shown, None, out, False, batch_size=batch_size
        )
        pictures.append(
            [np.asarray(Image.open(f.path)) for row in section.rows for f in row.figures]
        )
    # batch 1 and batch 64 run different convolution kernels, so the maps differ by float
    # rounding (~1e-7); a heat value on the edge of one of the colour map's 256 levels then
    # moves to the next level, which changes a channel by up to a few units in rare pixels
    for a, b in zip(*pictures):
        difference = np.abs(a.astype(int) - b.astype(int))
        assert difference.max() <= 8 and (difference > 1).mean() < 0.01


def test_contrastive_section_progress_bar_on_stderr(tmp_path, digits, capsys):
    images, _ = digits
    contrastive_section(
        load_bundled_model(),
        BUNDLED_CAM_LAYER,
        images[:2],
        denormalize_digits(images[:2]),
        DIGIT_CLASSES,
        tmp_path,
    )
    captured = capsys.readouterr()
    assert "contrastive maps" in captured.err and captured.out == ""


def test_contrastive_section_bad_input(tmp_path, digits):
    model = load_bundled_model()
    images, labels = digits
    shown = denormalize_digits(images)
    with pytest.raises(ValueError, match="class_names"):
        contrastive_section(model, BUNDLED_CAM_LAYER, images, shown, ["a", "b"], tmp_path, False)
    with pytest.raises(ValueError, match="display_images"):
        contrastive_section(model, BUNDLED_CAM_LAYER, images, shown[:2], None, tmp_path, False)
    with pytest.raises(ValueError, match="batch-size"):
        contrastive_section(
            model, BUNDLED_CAM_LAYER, images, shown, None, tmp_path, False, batch_size=0
        )
    with pytest.raises(ValueError, match="model failed"):
        contrastive_section(
            model,
            BUNDLED_CAM_LAYER,
            torch.zeros(1, 3, 28, 28),
            torch.zeros(1, 3, 28, 28),
            None,
            tmp_path,
            False,
        )


def test_report_folds_per_image_rows_after_the_summary(tmp_path):
    """Per-image rows (figures at the common width, no table) go into one closed <details>
    after the section's summary rows (tables, plots, colour scale), whatever the order they
    were added in; ``per_image`` overrides the inference."""
    from captum_ext.viz import Table

    png = save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
    section = Section("S")
    section.add_row("image one", [("Input", png), ("map", png)])
    section.add_row("Colour scale", [Figure("scale", png, 320)])
    section.add_row("image two", [("Input", png), Figure("its plot", png, 400)])
    section.add_row("Summary", table=Table(["a"], [["1"]]))
    section.add_row("forced summary", [("Input", png)], per_image=False)
    section.add_row("forced image", [Figure("plot", png, 400)], per_image=True)
    assert [row.is_per_image for row in section.rows] == [True, False, True, False, False, True]
    report = Report("t")
    report.add_section(section)
    report.add_section(Section("Only a summary", rows=[Row("Summary", table=Table(["b"]))]))
    html = report.write(tmp_path / "out").read_text(encoding="utf-8")
    labels = re.findall(r'<div class="row-label">(.*?)</div>', html)
    assert labels == [
        "Colour scale",
        "Summary",
        "forced summary",
        "image one",
        "image two",
        "forced image",
        "Summary",
    ]
    assert html.count("<details") == 1  # only the section with per-image rows folds
    details = re.search(r"<details[^>]*>(.*?)</details>", html, re.S)
    assert " open" not in html[details.start() : details.start() + 30]
    assert "<summary>Per-image maps (3 images)</summary>" in details.group(1)
    inside = re.findall(r'<div class="row-label">(.*?)</div>', details.group(1))
    assert inside == ["image one", "image two", "forced image"]
    with pytest.raises(TypeError, match="per_image"):
        Row("x", per_image="yes")


def test_report_manifest_lists_the_folded_figures(tmp_path):
    """Figures of folded per-image rows count as used: a second, smaller page removes the
    first page's stale per-image figures and keeps its own."""
    out = tmp_path / "out"
    pngs = [
        save_png(np.zeros((4, 4, 3), np.uint8), out / "images" / "s" / f"{i}.png") for i in range(3)
    ]

    def write(paths):
        report = Report("t")
        section = Section("S")
        for i, path in enumerate(paths):
            section.add_row(f"image {i}", [("Input", path)])
        report.add_section(section)
        return report.write(out)

    html = write(pngs).read_text(encoding="utf-8")
    assert "<details" in html
    manifest = (out / "images" / ".captum-ext-figures").read_text(encoding="utf-8")
    assert all(f"s/{i}.png" in manifest for i in range(3))
    write(pngs[:1])
    assert pngs[0].is_file() and not pngs[1].exists() and not pngs[2].exists()


def test_direction_controls_in_names_are_shown_not_obeyed(tmp_path):
    """U+202E (right-to-left override) in a file or class name reversed the rest of its line
    on the page, the report's own words and numbers included."""
    import numpy as np

    from captum_ext.viz import Report, Section, save_png

    png = save_png(np.zeros((4, 4, 3)), tmp_path / "out" / "images" / "a.png")
    report = Report("names \u202eevil")
    section = Section("Maps", "intro \u2067isolated")
    section.add_row("nine\u202e/photo.png: predicted zero (53.7%)", [("caption \u200f", png)])
    report.add_section(section)
    html = report.write(tmp_path / "out").read_text(encoding="utf-8")
    assert not any(c in html for c in "\u202e\u2067\u200f")
    assert "nine\\u202e/photo.png: predicted zero (53.7%)" in html
    assert "names \\u202eevil" in html and "caption \\u200f" in html
