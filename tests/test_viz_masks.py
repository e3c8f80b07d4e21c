"""captum_ext.viz.masks: the minimal-mask and circuit report section."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import assert_model_unchanged, model_snapshot
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from captum_ext.attr import ActivationMatchingMask
from captum_ext.circuits import CircuitReadout, compare
from captum_ext.data import DIGIT_CLASSES, denormalize_digits, load_sample_digits
from captum_ext.viz import Report, minimal_mask_section

LAYERS = ["features.1", "features.4", "features.7"]


@pytest.fixture(scope="module")
def digits():
    images, labels = load_sample_digits()
    return images[:5], labels[:5]


@pytest.fixture(scope="module")
def explainer(bundled_model):
    images, _ = load_sample_digits()
    fitted = ActivationMatchingMask(bundled_model, LAYERS)
    fitted.fit(DataLoader(TensorDataset(images), batch_size=20), epochs=1, progress=False)
    return fitted


@pytest.fixture(scope="module")
def section(bundled_model, digits, explainer, tmp_path_factory):
    images, labels = digits
    before = model_snapshot(bundled_model)
    built = minimal_mask_section(
        bundled_model,
        images,
        denormalize_digits(images),
        DIGIT_CLASSES,
        tmp_path_factory.mktemp("masks"),
        progress=False,
        explainer=explainer,
        labels=labels,
        circuit_rows=2,
        seed=3,
    )
    assert_model_unchanged(bundled_model, before)
    return built


def test_summary_equals_the_explainer_details(section, digits, explainer):
    images, _ = digits
    details = explainer.attribute(images, seed=3, return_details=True, progress=False)
    summary = section.rows[0].table
    assert summary.columns[:3] == ["images", "count", "active pixels"]
    row = summary.rows[0]
    assert row[:2] == ["all", "5"]
    assert row[2] == f"{100 * details.active_fraction.mean():.1f}%"
    assert row[3] == f"{100 * details.agreement.float().mean():.0f}%"
    assert row[4] == (
        f"{details.confidence.mean():.3f} -> {details.explanation_confidence.mean():.3f}"
    )
    assert row[5] == f"{100 * details.sufficiency.mean():.0f}%"
    assert row[6] == f"{details.necessity.mean():.2f}"
    image_rows = section.rows[2:]
    assert len(image_rows) == 5
    for i, image_row in enumerate(image_rows):
        active = float(details.mask[i].float().mean())
        assert image_row.figures[1].caption == f"Mask: {100 * active:.1f}% of the pixels"


def test_circuit_table_equals_a_direct_comparison(section, bundled_model, digits, explainer):
    images, _ = digits
    details = explainer.attribute(images[:2], seed=3, return_details=True, progress=False)
    readout = CircuitReadout(bundled_model)
    graphs_x = readout.readout(images[:2], target=details.target)
    graphs_e = readout.readout(details.explanation, target=details.target)
    table = section.rows[1].table
    assert table.columns == ["image", "node Jaccard", "edge Jaccard", "flow retained"]
    for row, graph_x, graph_e in zip(table.rows, graphs_x, graphs_e):
        expected = compare(graph_x, graph_e)
        assert row[1:] == [
            f"{expected.node_jaccard:.3f}",
            f"{expected.edge_jaccard:.3f}",
            f"{expected.flow_retained:.1%}",
        ]


def test_figures_are_drawn_and_only_the_first_rows_get_circuits(section, tmp_path):
    image_rows = section.rows[2:]
    assert [len(row.figures) for row in image_rows] == [5, 5, 3, 3, 3]
    assert "Circuits are drawn for the first 2 of the 5 images." in section.intro
    for row in image_rows[:2]:
        for figure in row.figures:
            with Image.open(figure.path) as picture:
                assert np.asarray(picture, dtype=float).std() > 0, figure.path
    report = Report("masks")
    report.add_section(section)
    html = report.write(tmp_path / "report").read_text(encoding="utf-8")
    assert "What is the least this image needs?" in html


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"explainer": "nope"}, TypeError, "`explainer` must be an ActivationMatchingMask"),
        ({"mode": "fast"}, ValueError, "`mode`='fast'"),
        ({"circuit_rows": -1}, ValueError, "`circuit_rows` must be a non-negative int"),
        ({"circuit": 3}, TypeError, "`circuit` must be a CircuitReadout"),
        ({"labels": [1]}, ValueError, "`labels` has 1 entries for 2 images"),
    ],
)
def test_bad_arguments_name_the_argument(
    bundled_model, digits, explainer, tmp_path, options, error, pattern
):
    images, _ = digits
    arguments = {"explainer": explainer, "progress": False, **options}
    with pytest.raises(error, match=pattern):
        minimal_mask_section(
            bundled_model, images[:2], denormalize_digits(images[:2]), None, tmp_path, **arguments
        )


def test_unfitted_explainer_in_amortised_mode_is_refused(bundled_model, digits, tmp_path):
    images, _ = digits
    fresh = ActivationMatchingMask(bundled_model, LAYERS)
    with pytest.raises((ValueError, RuntimeError), match="fit|load"):
        minimal_mask_section(
            bundled_model,
            images[:2],
            denormalize_digits(images[:2]),
            None,
            tmp_path,
            progress=False,
            explainer=fresh,
        )


def test_kept_pixels_are_shown_on_mid_grey(section, digits, explainer):
    """Issue 19: the left-out pixels are mid-grey (128), not dimmed image pixels, so a
    scattered mask does not read as noise on black; the kept pixels are the image's."""
    images, _ = digits
    details = explainer.attribute(images, seed=3, return_details=True, progress=False)
    for i, image_row in enumerate(section.rows[2:]):
        assert image_row.figures[2].caption.startswith("Kept pixels (grey: left out): ")
        with Image.open(image_row.figures[0].path) as picture:
            shown = np.asarray(picture.convert("RGB")).astype(int)
        with Image.open(image_row.figures[2].path) as picture:
            kept = np.asarray(picture.convert("RGB")).astype(int)
        mask = details.mask[i].reshape(kept.shape[:2]).numpy() > 0
        assert 0 < mask.sum() < mask.size
        assert (kept[~mask] == 128).all()
        assert (kept[mask] == shown[mask]).all()
    assert "mid-grey background" in section.intro
