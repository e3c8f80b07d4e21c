"""captum_ext.viz.trust: the "Which predictions can I trust?" report section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from PIL import Image

from captum_ext.attr import ContrastCAM
from captum_ext.cli import main
from captum_ext.data import BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits
from captum_ext.metrics import auac, aufc, gradtrust, misprediction_auroc, softmax_confidence
from captum_ext.viz import Report, trust_section

WRONG = 17  # the bundled model reads sample digit 17, a 4, as a 7


@pytest.fixture(scope="module")
def section(bundled_model, bundled_digits, tmp_path_factory):
    images, labels = bundled_digits
    out = tmp_path_factory.mktemp("trust")
    before = model_snapshot(bundled_model)
    built = trust_section(
        bundled_model,
        BUNDLED_CAM_LAYER,
        images,
        denormalize_digits(images),
        DIGIT_CLASSES,
        out,
        progress=False,
        labels=labels,
        scores=["margin", "gradtrust_reference"],
        least_trusted=4,
    )
    assert_model_unchanged(bundled_model, before)
    return built, out


def _png_is_drawn(path) -> bool:
    with Image.open(path) as image:
        return float(np.asarray(image, dtype=float).std()) > 0


def test_table_equals_the_metrics_computed_directly(section, bundled_model, bundled_digits):
    built, _ = section
    images, labels = bundled_digits
    with torch.no_grad():
        predictions = bundled_model(images).argmax(1)
    correct = predictions == labels
    table = built.rows[0].table
    assert table.columns == ["score", "AUAC (%)", "AUFC (%)", "misprediction AUROC"]
    assert [row[0] for row in table.rows] == [
        "gradtrust",
        "softmax",
        "margin",
        "gradtrust_reference",
    ]
    direct = {
        "gradtrust": gradtrust(bundled_model, images),
        "softmax": softmax_confidence(bundled_model, images),
    }
    for row in table.rows[:2]:
        scores = direct[row[0]].double()
        assert row[1] == f"{auac(scores, correct):.2f}"
        assert row[2] == f"{aufc(scores, predictions, labels):.2f}"
        assert row[3] == f"{misprediction_auroc(scores, correct):.3f}"


def test_plots_and_least_trusted_rows(section, bundled_model, bundled_digits):
    built, out = section
    images, labels = bundled_digits
    captions = [figure.caption for figure in built.rows[0].figures]
    assert captions == [
        "GradTrust vs softmax confidence",
        "Accuracy retention curves (AUAC in the legend)",
    ]
    for figure in built.rows[0].figures:
        assert _png_is_drawn(figure.path)
    assert Path(figure.path).parent == out / "images" / "trust"
    # the least-trusted rows, lowest GradTrust first, equal an independent ranking
    scores = gradtrust(bundled_model, images).double()
    expected = torch.argsort(scores)[:4].tolist()
    # one colour bar for the maps of the section, in the default colour map
    assert built.rows[1].label == "Colour scale"
    assert [f.caption for f in built.rows[1].figures] == ["Colour scale of the maps"]
    assert _png_is_drawn(built.rows[1].figures[0].path)
    rows = built.rows[2:]
    assert len(rows) == 4
    shown = [int(row.label.split(":")[0].split("#")[1]) for row in rows]
    assert shown == expected
    assert expected[0] == WRONG and "(wrong)" in rows[0].label
    # the ContrastCAM of each row is against the runner-up class, as the caption says
    with torch.no_grad():
        top2 = bundled_model(images[expected]).topk(2, dim=1).indices
    for row, (p, q) in zip(rows, top2.tolist()):
        assert [f.caption for f in row.figures] == [
            "Input",
            f"Grad-CAM: Why {p}?",
            f"ContrastCAM: Why {p}, rather than {q}?",
        ]
        for figure in row.figures:
            assert _png_is_drawn(figure.path)
    contrast = ContrastCAM(bundled_model, BUNDLED_CAM_LAYER).attribute(
        images[expected], contrast=top2[:, 1], upsample_to_input=True, normalize="minmax"
    )
    assert contrast.shape == (4, 1, 28, 28)
    from captum_ext.viz.overlay import DEFAULT_CMAP, overlay

    shown_images = denormalize_digits(images[expected]).permute(0, 2, 3, 1).numpy()
    with Image.open(rows[0].figures[2].path) as image:
        drawn = np.asarray(image)
    assert DEFAULT_CMAP == "inferno"
    np.testing.assert_array_equal(
        drawn, overlay(shown_images[0], contrast[0, 0].detach().numpy(), cmap="inferno")
    )


def test_report_page_renders_the_section(section, tmp_path):
    built, _ = section
    report = Report("trust")
    report.add_section(built)
    html = report.write(tmp_path / "report").read_text(encoding="utf-8")
    assert "Which predictions can I trust?" in html
    assert "misprediction AUROC" in html


def test_without_labels_shows_the_scatter_and_the_images(bundled_model, bundled_digits, tmp_path):
    images, _ = bundled_digits
    built = trust_section(
        bundled_model,
        BUNDLED_CAM_LAYER,
        images[:6],
        denormalize_digits(images[:6]),
        None,
        tmp_path,
        progress=False,
        scores="softmax",
        least_trusted=2,
    )
    assert built.rows[0].table is None
    assert [f.caption for f in built.rows[0].figures] == ["GradTrust vs softmax confidence"]
    assert len(built.rows) == 4 and "true class" not in built.rows[2].label


def test_optional_score_that_cannot_run_is_reported_not_fatal(bundled_digits, tmp_path):
    images, labels = bundled_digits
    no_dropout = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
    torch.manual_seed(0)
    built = trust_section(
        no_dropout,
        "1",
        images[:8],
        denormalize_digits(images[:8]),
        DIGIT_CLASSES,
        tmp_path,
        progress=False,
        labels=labels[:8],
        scores=["mc_dropout"],
        least_trusted=0,
    )
    assert "Not computed: mc_dropout" in built.intro
    assert [row[0] for row in built.rows[0].table.rows] == ["gradtrust", "softmax"]
    assert len(built.rows) == 1


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"least_trusted": -1}, "`least_trusted` must be a non-negative int"),
        ({"scores": ["softmax", "nope"]}, "`scores`: unknown score name"),
        ({"labels": [1, 2]}, "`labels` has 2 entries for 3 images"),
        ({"batch_size": 0}, "must be a positive int"),
    ],
)
def test_bad_arguments_name_the_argument(bundled_model, bundled_digits, tmp_path, options, pattern):
    images, _ = bundled_digits
    with pytest.raises(ValueError, match=pattern):
        trust_section(
            bundled_model,
            BUNDLED_CAM_LAYER,
            images[:3],
            denormalize_digits(images[:3]),
            DIGIT_CLASSES,
            tmp_path,
            progress=False,
            **options,
        )


def test_cli_trust_section(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["report", "--limit", "5", "--out", str(out), "--no-progress"]
    code = main(argv + ["--sections", "trust", "--least-trusted", "2"])
    assert code == 0, capsys.readouterr().err
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "Which predictions can I trust?" in html
    assert html.count("<img") == 2 + 1 + 2 * 3  # plots, colour bar, 2 least-trusted rows
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--least-trusted", "-1"])
    assert exit_info.value.code == 2
    assert "expected a non-negative integer" in capsys.readouterr().err


def test_one_wrong_prediction_is_too_few_to_rank_the_scores(section):
    """The 40 sample digits have one wrong prediction (WRONG): the section says the labelled
    sample cannot rank the scores, in the introduction and the table's caption."""
    built, _ = section
    assert "Only 1 of the 40 labelled predictions is wrong: too few to rank" in built.intro
    assert "too small to rank the scores" in built.rows[0].table.caption


def test_enough_of_both_outcomes_has_no_sample_note():
    from captum_ext.viz.trust import _sample_note

    assert _sample_note(30, 5) is None
    assert "Only 4 of the 34 labelled predictions are correct" in _sample_note(4, 30)


def test_retention_legend_is_outside_the_axes():
    from captum_ext.viz.trust import _retention_figure

    x = np.linspace(0, 100, 11)
    curves = {f"score{i}": (x, np.full(11, 0.9), 90.0) for i in range(8)}
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = _retention_figure(curves)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # lay out
    renderer = canvas.get_renderer()
    ax = figure.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    axes = ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1  # to the right of the plot, hiding no curve


def test_a_score_below_chance_is_explained(bundled_model, bundled_digits, tmp_path):
    images, labels = bundled_digits
    built = trust_section(
        bundled_model,
        BUNDLED_CAM_LAYER,
        images,
        denormalize_digits(images),
        DIGIT_CLASSES,
        tmp_path,
        progress=False,
        labels=labels,
        scores=["purview"],
        least_trusted=0,
    )
    from captum_ext.metrics import purview

    correct = bundled_model(images).argmax(1) == labels
    auroc = misprediction_auroc(purview(bundled_model, images).detach(), correct)
    assert auroc < 0.5  # independently: purview ranks below chance on these digits
    assert f"purview ranks below chance here (misprediction AUROC {auroc:.3f} < 0.5)" in (
        built.intro
    )
    assert "features" in built.intro.split("purview ranks below chance")[1].split("\n")[0]
    assert "gradtrust ranks below chance" not in built.intro
