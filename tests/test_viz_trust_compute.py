"""captum_ext.viz.trust: compute_trust (numbers, no drawing) and render_trust (drawing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot

from captum_ext.attr import ContrastCAM, GradCAM
from captum_ext.data import BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits
from captum_ext.metrics import (
    accuracy_retention_curve,
    auac,
    aufc,
    gradtrust,
    margin,
    misprediction_auroc,
    softmax_confidence,
)
from captum_ext.viz.trust import TrustData, compute_trust, render_trust, trust_section

N = 20  # the first 20 sample digits hold the one the bundled model gets wrong (17)
WRONG = 17


def _no_drawing(monkeypatch) -> None:
    """Make every way of drawing with matplotlib fail."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.figure
    import matplotlib.pyplot as plt

    def refuse(*args, **kwargs):
        raise AssertionError("compute_trust drew with matplotlib")

    monkeypatch.setattr(plt, "figure", refuse)
    monkeypatch.setattr(plt, "subplots", refuse)
    monkeypatch.setattr(matplotlib.figure.Figure, "__init__", refuse)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", refuse)


@pytest.fixture(scope="module")
def digits(bundled_digits):
    images, labels = bundled_digits
    return images[:N], labels[:N]


@pytest.fixture(scope="module")
def data(bundled_model, digits) -> TrustData:
    images, labels = digits
    before = model_snapshot(bundled_model)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _no_drawing(monkeypatch)
        computed = compute_trust(
            bundled_model,
            BUNDLED_CAM_LAYER,
            images,
            labels=labels,
            class_names=DIGIT_CLASSES,
            scores=["margin"],
            least_trusted=3,
        )
    assert_model_unchanged(bundled_model, before)
    return computed


def test_compute_draws_nothing_and_writes_nothing(bundled_model, digits, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    images, labels = digits
    monkeypatch.chdir(tmp_path)
    figures = plt.get_fignums()
    _no_drawing(monkeypatch)
    result = compute_trust(
        bundled_model, BUNDLED_CAM_LAYER, images[:4], labels=labels[:4], least_trusted=1
    )
    assert isinstance(result, TrustData)
    assert plt.get_fignums() == figures
    assert list(tmp_path.iterdir()) == []


def test_scores_equal_the_trust_functions(data, bundled_model, digits):
    images, labels = digits
    assert data.score_names == ["gradtrust", "softmax", "margin"]
    assert data.failed == {} and data.unranked == {}
    table = data.table
    # the gradtrust column is the natural log of GradTrust
    torch.testing.assert_close(
        table["gradtrust"].double(),
        gradtrust(bundled_model, images, log=True).double(),
        rtol=1e-5,
        atol=1e-6,
    )
    torch.testing.assert_close(
        table["softmax"].double(), softmax_confidence(bundled_model, images).double()
    )
    torch.testing.assert_close(table["margin"].double(), margin(bundled_model, images).double())
    with torch.no_grad():
        predictions = bundled_model(images).argmax(1)
    assert torch.equal(table["prediction"], predictions)
    assert torch.equal(table["label"], labels)
    assert torch.equal(table["correct"], predictions == labels)
    assert bool(data.labelled.all())


def test_metrics_equal_the_metric_functions(data, bundled_model, digits):
    images, labels = digits
    with torch.no_grad():
        predictions = bundled_model(images).argmax(1)
    correct = predictions == labels
    assert int((~correct).sum()) == 1  # both kinds: AUROC is defined
    for name in data.score_names:
        values = data.table[name].double()
        assert data.auac[name] == auac(values, correct)
        assert data.aufc[name] == aufc(values, predictions, labels)
        assert data.auroc[name] == misprediction_auroc(values, correct)
        curve = accuracy_retention_curve(values, correct)
        np.testing.assert_array_equal(data.curves[name][0], curve.percentiles.numpy())
        np.testing.assert_array_equal(data.curves[name][1], curve.accuracy.double().numpy())
    # independently of the table: AUAC of GradTrust computed from the trust function
    direct = gradtrust(bundled_model, images, log=True).double()
    assert data.auac["gradtrust"] == pytest.approx(auac(direct, correct), abs=1e-9)


def test_least_trusted_and_their_maps(data, bundled_model, digits):
    images, _ = digits
    expected = torch.argsort(gradtrust(bundled_model, images, log=True).double())[:3]
    assert data.least_trusted.tolist() == expected.tolist()
    assert data.least_trusted[0] == WRONG
    x = images[expected]
    with torch.no_grad():
        probabilities = torch.softmax(bundled_model(x), dim=1)
    top2 = probabilities.topk(2, dim=1).indices
    assert torch.equal(data.predicted, top2[:, 0]) and torch.equal(data.runner_up, top2[:, 1])
    torch.testing.assert_close(data.probabilities, probabilities)
    grad_cam = GradCAM(bundled_model, BUNDLED_CAM_LAYER).attribute(
        x, target=top2[:, 0], upsample_to_input=True, normalize="minmax"
    )
    contrast = ContrastCAM(bundled_model, BUNDLED_CAM_LAYER).attribute(
        x, contrast=top2[:, 1], upsample_to_input=True, normalize="minmax"
    )
    np.testing.assert_allclose(data.maps["gradcam"], grad_cam[:, 0].detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(data.maps["contrast"], contrast[:, 0].detach().numpy(), atol=1e-6)
    assert data.image_size == (28, 28)
    assert data.class_names == list(DIGIT_CLASSES)
    assert data.layer_name == BUNDLED_CAM_LAYER


def test_render_shows_the_computed_numbers(data, digits, tmp_path):
    images, _ = digits
    section = render_trust(data, denormalize_digits(images), tmp_path)
    rows = section.rows[0].table.rows
    assert [row[0] for row in rows] == data.score_names
    for name, area, false, auroc in rows:
        assert area == f"{data.auac[name]:.2f}"
        assert false == f"{data.aufc[name]:.2f}"
        assert auroc == f"{data.auroc[name]:.3f}"
    labels = [row.label for row in section.rows[2:]]
    assert [int(label.split("#")[1].split(":")[0]) for label in labels] == (
        data.least_trusted.tolist()
    )
    assert (tmp_path / "images" / "trust" / "gradtrust_vs_softmax.png").is_file()


def test_section_is_compute_then_render(data, bundled_model, digits, tmp_path):
    """trust_section gives the page of render_trust(compute_trust(...))."""
    images, labels = digits
    shown = denormalize_digits(images)
    common = {"scores": ["margin"], "least_trusted": 3}
    wrapped = trust_section(
        bundled_model,
        BUNDLED_CAM_LAYER,
        images,
        shown,
        DIGIT_CLASSES,
        tmp_path / "a",
        progress=False,
        labels=labels,
        **common,
    )
    rendered = render_trust(data, shown, tmp_path / "b")
    assert wrapped.intro == rendered.intro
    assert [row.label for row in wrapped.rows] == [row.label for row in rendered.rows]
    assert wrapped.rows[0].table.rows == rendered.rows[0].table.rows
    for mine, theirs in zip(wrapped.rows[2:], rendered.rows[2:]):
        for a, b in zip(mine.figures, theirs.figures):
            assert Path(a.path).read_bytes() == Path(b.path).read_bytes()


def test_compute_without_labels_has_no_metrics(bundled_model, digits):
    images, _ = digits
    result = compute_trust(
        bundled_model, BUNDLED_CAM_LAYER, images[:4], scores="softmax", least_trusted=0
    )
    assert not bool(result.labelled.any())
    assert result.auac == {} and result.curves == {} and result.auroc == {}
    assert result.least_trusted.numel() == 0
    assert result.maps["gradcam"].shape == (0, 28, 28)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"least_trusted": -1}, "`least_trusted` must be a non-negative int"),
        ({"scores": ["nope"]}, "`scores`: unknown score name"),
        ({"labels": [1, 2]}, "`labels` has 2 entries for 3 images"),
        ({"batch_size": 0}, "must be a positive int"),
    ],
)
def test_compute_bad_arguments_name_the_argument(bundled_model, digits, options, pattern):
    images, _ = digits
    with pytest.raises(ValueError, match=pattern):
        compute_trust(bundled_model, BUNDLED_CAM_LAYER, images[:3], **options)


def test_compute_leaves_the_global_generator_alone(bundled_model, digits):
    """Iterating its DataLoader drew a base seed from the global generator, and mc_dropout
    (a default score) drew its masks there: a report's numbers depended on what the process
    drew before, and the caller's stream moved."""
    images, labels = digits
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = compute_trust(
        bundled_model, BUNDLED_CAM_LAYER, images[:6], labels=labels[:6], least_trusted=1
    )
    assert torch.equal(torch.rand(1), expected)
    torch.manual_seed(7)  # another state: the same table
    second = compute_trust(
        bundled_model, BUNDLED_CAM_LAYER, images[:6], labels=labels[:6], least_trusted=1
    )
    assert "mc_dropout" in first.score_names
    for name in first.score_names:
        torch.testing.assert_close(first.table[name], second.table[name], rtol=0, atol=0)
