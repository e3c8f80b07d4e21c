"""captum_ext.viz.uncertainty: compute_* (numbers, no drawing, no files) and render_* (figures)
of the VOICE and the deletion / insertion sections, and the *_section wrappers joining them."""

from __future__ import annotations

import dataclasses

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot

from captum_ext.attr import VOICE, GradCAM
from captum_ext.data import BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits, load_sample_digits
from captum_ext.metrics import deletion, insertion
from captum_ext.viz import Section, explanation_metrics_section, voice_section
from captum_ext.viz.uncertainty import (
    ExplanationMetricsData,
    VoiceData,
    compute_explanation_metrics,
    compute_voice,
    render_explanation_metrics,
    render_voice,
)

METHODS = ("gradcam", "contrast", "counterfactual")


@pytest.fixture(scope="module")
def digits():
    images, labels = load_sample_digits()
    pick = torch.tensor([0, 17, 26])  # 17: a 4 the bundled model reads as a 7
    return images[pick], labels[pick]


@pytest.fixture
def no_drawing(monkeypatch, tmp_path):
    """Fail on any matplotlib figure (pyplot or not) and run in an empty folder, so that a
    test can check that nothing was drawn and no file was written."""

    def refuse(*args, **kwargs):
        raise AssertionError("compute_* drew a matplotlib figure")

    monkeypatch.setattr(matplotlib.figure.Figure, "__init__", refuse)
    monkeypatch.setattr(plt, "figure", refuse)
    monkeypatch.setattr(plt, "subplots", refuse)
    monkeypatch.chdir(tmp_path)
    before = plt.get_fignums()
    yield tmp_path
    assert plt.get_fignums() == before
    assert list(tmp_path.iterdir()) == [], "compute_* wrote files"


def section_text(section: Section) -> list:
    """A section's page content without the figure paths (which depend on out_dir)."""
    rows = []
    for row in section.rows:
        table = None if row.table is None else (row.table.columns, row.table.rows)
        rows.append((row.label, [(f.caption, f.width) for f in row.figures], table))
    return [section.title, section.intro, rows]


# ---------------------------------------------------------------------------------------
# VOICE


def test_compute_voice_draws_nothing_and_equals_voice(no_drawing, bundled_model, digits):
    images, _ = digits
    before = model_snapshot(bundled_model)
    data = compute_voice(bundled_model, BUNDLED_CAM_LAYER, images, contrasts=3, batch_size=2)
    assert_model_unchanged(bundled_model, before)
    assert isinstance(data, VoiceData)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.threshold = 0.5

    expected = VOICE(GradCAM(bundled_model, BUNDLED_CAM_LAYER)).attribute(images, contrasts=3)
    n = len(images)
    assert data.explanation.shape == data.uncertainty.shape == (n, 28, 28)
    assert torch.equal(data.prediction, expected.prediction.long())
    assert torch.equal(data.contrast_class, expected.contrast_class.long())
    assert data.n_contrasts.tolist() == [3] * n
    for field in ("iou", "snr", "log_likelihood"):
        np.testing.assert_allclose(
            getattr(data, field), getattr(expected, field).double().numpy(), rtol=1e-5, atol=1e-6
        )
    for field in ("explanation", "contrast", "uncertainty"):
        np.testing.assert_allclose(
            getattr(data, field), getattr(expected, field)[:, 0].numpy(), atol=1e-5
        )
    # log-likelihood is log softmax of the prediction, from the same probabilities
    chosen = data.probabilities[torch.arange(n), data.prediction]
    np.testing.assert_allclose(data.log_likelihood, chosen.log().double().numpy(), atol=1e-4)
    assert data.class_names == [str(i) for i in range(10)]
    assert data.layer_name == BUNDLED_CAM_LAYER and data.contrasts == 3


def test_compute_voice_batches_agree_and_bad_input(bundled_model, digits):
    images, _ = digits
    one = compute_voice(bundled_model, BUNDLED_CAM_LAYER, images, batch_size=1)
    all_ = compute_voice(bundled_model, BUNDLED_CAM_LAYER, images, batch_size=64)
    np.testing.assert_allclose(one.iou, all_.iou, atol=1e-6)
    np.testing.assert_allclose(one.uncertainty, all_.uncertainty, atol=1e-5)
    assert one.n_contrasts.tolist() == [9] * len(images)
    for kwargs, match in [
        ({"contrasts": 0}, "contrasts"),
        ({"contrasts": 10}, "at most 9"),
        ({"batch_size": 0}, "batch-size"),
        ({"class_names": ["a"]}, "class_names"),
    ]:
        with pytest.raises(ValueError, match=match):
            compute_voice(bundled_model, BUNDLED_CAM_LAYER, images, **kwargs)


def test_voice_section_is_compute_then_render(tmp_path, bundled_model, digits):
    images, labels = digits
    shown = denormalize_digits(images)
    section = voice_section(
        bundled_model,
        BUNDLED_CAM_LAYER,
        images,
        shown,
        DIGIT_CLASSES,
        tmp_path / "a",
        False,
        labels=labels,
    )
    data = compute_voice(bundled_model, BUNDLED_CAM_LAYER, images, class_names=DIGIT_CLASSES)
    rendered = render_voice(data, shown, tmp_path / "b", labels=labels)
    assert section_text(rendered) == section_text(section)
    # the summary's means are the means of the data's read-outs
    summary = {cells[0]: cells for cells in rendered.rows[0].table.rows}
    assert float(summary["all"][2]) == pytest.approx(data.iou.mean(), abs=5e-4)
    wrong = data.prediction.numpy() != labels.numpy()
    assert float(summary["wrongly classified"][3]) == pytest.approx(
        data.snr[wrong].mean(), abs=5e-4
    )
    with pytest.raises(ValueError, match="display_images"):
        render_voice(data, shown[:2], tmp_path / "c")


def test_voice_section_says_why_a_two_class_model_has_no_uncertainty(tmp_path, bundled_model):
    """Two classes: one contrast, whose variance is 0; the page said nothing about the
    empty maps (a binary model read through two_class_logits, as the report does)."""
    from torch import nn

    from captum_ext.data import two_class_logits

    class OneLogit(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, x):
            z = self.m(x)
            return two_class_logits(z[:, 1] - z[:, 0])

    images = load_sample_digits()[0][:3]
    binary = OneLogit(bundled_model).eval()
    data = compute_voice(binary, f"m.{BUNDLED_CAM_LAYER}", images)
    assert (data.n_contrasts == 1).all() and not data.uncertainty.any()
    section = render_voice(data, denormalize_digits(images), tmp_path)
    assert "VOICE needs three classes or more" in section.intro
    full = compute_voice(bundled_model, BUNDLED_CAM_LAYER, images)
    assert "VOICE needs three" not in render_voice(full, denormalize_digits(images), tmp_path).intro


# ---------------------------------------------------------------------------------------
# deletion / insertion


def test_compute_metrics_draws_nothing_and_aucs_are_the_metrics(no_drawing, bundled_model, digits):
    images, _ = digits
    n = len(images)
    before = model_snapshot(bundled_model)
    data = compute_explanation_metrics(
        bundled_model, BUNDLED_CAM_LAYER, images, n_steps=8, batch_size=2, examples=n
    )
    assert_model_unchanged(bundled_model, before)
    assert isinstance(data, ExplanationMetricsData)
    assert data.image_size == (28, 28) and data.fractions.shape == (9,)
    assert data.fractions[0] == 0 and data.fractions[-1] == 1

    top = bundled_model(images).softmax(1).topk(2, dim=1).indices
    assert torch.equal(data.predicted, top[:, 0]) and torch.equal(data.runner_up, top[:, 1])
    for kind in METHODS:
        assert data.maps[kind].shape == (n, 28, 28)
        heat = torch.from_numpy(data.maps[kind])[:, None]
        for metric, function in (("deletion", deletion), ("insertion", insertion)):
            auc = function(bundled_model, images, heat, target=data.predicted, n_steps=8)
            np.testing.assert_allclose(data.auc[metric][kind], auc.numpy(), atol=1e-5)
            assert data.curves[metric][kind].shape == (n, 9)
            assert data.mean_auc[metric][kind] == pytest.approx(float(auc.mean()), abs=1e-5)
    best = data.best_counts
    assert sum(best["deletion"].values()) == sum(best["insertion"].values()) == n
    lowest = np.stack([data.auc["deletion"][k] for k in METHODS]).argmin(0)
    assert best["deletion"]["gradcam"] == int((lowest == 0).sum())


def test_compute_metrics_keeps_example_maps_and_bad_input(bundled_model, digits):
    images, _ = digits
    data = compute_explanation_metrics(
        bundled_model, BUNDLED_CAM_LAYER, images, n_steps=4, examples=0, baselines="blur"
    )
    assert all(data.maps[k].shape == (0, 28, 28) for k in METHODS)
    assert data.baselines == "blur"
    for kwargs, match in [
        ({"n_steps": 0}, "n_steps"),
        ({"examples": -1}, "examples"),
        ({"batch_size": 0}, "batch-size"),
        ({"baselines": "zeros"}, "baselines"),
    ]:
        with pytest.raises(ValueError, match=match):
            compute_explanation_metrics(bundled_model, BUNDLED_CAM_LAYER, images, **kwargs)


def test_metrics_section_is_compute_then_render(tmp_path, bundled_model, digits):
    images, labels = digits
    shown = denormalize_digits(images)
    section = explanation_metrics_section(
        bundled_model,
        BUNDLED_CAM_LAYER,
        images,
        shown,
        DIGIT_CLASSES,
        tmp_path / "a",
        False,
        n_steps=6,
        labels=labels,
        examples=2,
    )
    data = compute_explanation_metrics(
        bundled_model, BUNDLED_CAM_LAYER, images, class_names=DIGIT_CLASSES, n_steps=6, examples=2
    )
    rendered = render_explanation_metrics(data, shown, tmp_path / "b", labels=labels)
    assert section_text(rendered) == section_text(section)
    assert len(rendered.rows) == 2 + 2  # mean, per image, 2 examples
    assert (tmp_path / "b" / "images" / "metrics" / "curves.png").is_file()
    means = {cells[0]: cells for cells in rendered.rows[0].table.rows}
    assert float(means["Grad-CAM"][2]) == pytest.approx(
        data.mean_auc["deletion"]["gradcam"], abs=5e-4
    )
    # without display images: no example rows, whatever maps the data kept
    bare = render_explanation_metrics(data, None, tmp_path / "c")
    assert [row.label for row in bare.rows] == ["Mean over 3 images", "Per image"]
