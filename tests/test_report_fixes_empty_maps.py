"""Empty maps (every value 0: no evidence at all) are captioned "(empty)" and scored n/a in
every report section, and count for no method: the metrics section gave them the AUCs of
deleting the pixels in raster order (and counted them as the best method), the trust section
showed them uncaptioned, the evaluation section scored them (completeness 0.000 reading as
"passing")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

torch.set_num_threads(1)


def contrast_blind_net() -> nn.Module:
    """A classifier whose ContrastCAM (P = class 0 against Q = class 1) and
    CounterfactualCAM maps are all zero, its Grad-CAM not: the ReLU activations are >= 0,
    and the gradients of y_0 - y_1 (0.1 - 1 per channel) and of -y_0 (-0.1) are negative."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with torch.no_grad():
        model[4].weight.copy_(torch.tensor([[0.1] * 4, [1.0] * 4, [-1.0] * 4]))
        model[4].bias.copy_(torch.tensor([10.0, 0.0, -10.0]))
    return model.eval()


@pytest.fixture(scope="module")
def net_and_images():
    torch.manual_seed(1)
    return contrast_blind_net(), torch.rand(3, 3, 16, 16)


def test_empty_maps_is_every_value_exactly_zero():
    from captum_ext.viz.report import empty_maps, is_empty_map

    maps = torch.zeros(4, 1, 3, 3)
    maps[1, 0, 2, 2] = 1e-30  # tiny evidence is evidence
    maps[2, 0, 0, 0] = float("nan")  # NaN is not 0
    maps[3] = -0.5
    assert empty_maps(maps).tolist() == [True, False, False, False]
    assert empty_maps(maps.numpy()).tolist() == [True, False, False, False]
    assert is_empty_map(np.zeros((5, 5))) and not is_empty_map(torch.eye(2))


def test_metrics_section_scores_empty_maps_na_and_counts_them_for_no_method(
    net_and_images, tmp_path
):
    from captum_ext.viz import compute_explanation_metrics
    from captum_ext.viz.uncertainty import render_explanation_metrics

    model, images = net_and_images
    data = compute_explanation_metrics(model, model[1], images, n_steps=2, examples=1)
    section = render_explanation_metrics(data, None, tmp_path)
    mean_rows = {row[0]: row for row in section.rows[0].table.rows}
    assert mean_rows["ContrastCAM"][2:] == [
        "n/a (every map empty)",
        "n/a (every map empty)",
        "0 / 3",
        "0 / 3",
    ]
    assert mean_rows["Grad-CAM"][4:] == ["3 / 3", "3 / 3"]
    per_image = section.rows[1].table
    column = per_image.columns.index("deletion ContrastCAM")
    assert [row[column] for row in per_image.rows] == ["n/a (empty)"] * 3
    assert "marked 'empty'" in section.intro
    assert data.empty["contrast"].all() and data.empty["counterfactual"].all()
    assert not data.empty["gradcam"].any()
    # left out of the best counts: Grad-CAM, the one method with a map, is best everywhere
    for metric in ("deletion", "insertion"):
        assert data.best_counts[metric] == {"gradcam": 3, "contrast": 0, "counterfactual": 0}
        assert math.isnan(data.mean_auc[metric]["contrast"])
        assert data.mean_auc[metric]["gradcam"] == pytest.approx(
            float(data.auc[metric]["gradcam"].mean())
        )


def test_metrics_example_rows_caption_empty_maps(net_and_images, tmp_path):
    from captum_ext.viz import explanation_metrics_section

    model, images = net_and_images
    shown = images.permute(0, 2, 3, 1).numpy()
    section = explanation_metrics_section(
        model, model[1], images, shown, None, tmp_path, False, n_steps=2, examples=1
    )
    captions = [figure.caption for figure in section.rows[-1].figures]
    assert any(c.startswith("ContrastCAM (empty)") and "AUC n/a" in c for c in captions)
    assert any(c.startswith("Grad-CAM: first") and "(empty)" not in c for c in captions)


def test_trust_section_captions_empty_maps(net_and_images, tmp_path):
    from captum_ext.viz import trust_section

    model, images = net_and_images
    shown = images.permute(0, 2, 3, 1).numpy()
    section = trust_section(
        model, model[1], images, shown, None, tmp_path, progress=False, least_trusted=2
    )
    captions = [f.caption for row in section.rows for f in row.figures]
    contrast = [c for c in captions if c.startswith("ContrastCAM")]
    gradcam = [c for c in captions if c.startswith("Grad-CAM")]
    assert len(contrast) == 2 and all(c.endswith(" (empty)") for c in contrast)
    assert len(gradcam) == 2 and not any("(empty)" in c for c in gradcam)


def test_evaluation_scores_empty_maps_na_not_zero(net_and_images, tmp_path):
    from captum_ext.viz.evaluation import compute_evaluation, render_evaluation

    model, images = net_and_images
    scores = compute_evaluation(model, model[1], images, max_images=2, deletion_steps=2)
    for metric, by_method in scores.scores.items():
        assert math.isnan(by_method["ContrastCAM"]), metric
        assert "ContrastCAM" not in scores.best_methods(metric)
    assert scores.empty["ContrastCAM"] == 2 and scores.empty["GradCAM"] == 0
    assert any(note.startswith("ContrastCAM: every map") for note in scores.notes)
    section = render_evaluation(scores, tmp_path)
    rows = {row[0]: row for row in section.rows[0].table.rows}
    assert rows["ContrastCAM"][1:] == ["n/a (empty)"] * 6
    assert "ContrastCAM: every map (2 images) is empty" in section.intro


def test_evaluation_leaves_out_the_images_whose_map_is_empty():
    """A method with some empty maps is scored on the other images: the same numbers as on
    those images alone. Here the convolution's bias is -0.5 and its weights 0.1: a black
    image has no positive activation, so its Grad-CAM is empty; random ones have."""
    from captum_ext.metrics import deletion
    from captum_ext.viz.evaluation import _explainers, _maps, compute_evaluation
    from captum_ext.viz.report import empty_maps

    model = contrast_blind_net()
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].bias.fill_(-0.5)
    torch.manual_seed(2)
    images = torch.cat([torch.rand(2, 3, 16, 16), torch.zeros(1, 3, 16, 16)])
    explainer = _explainers(model, model[1], images)["GradCAM"](model)
    with torch.no_grad():
        target = model(images).argmax(dim=1)
    maps = _maps(explainer, images, target)
    assert empty_maps(maps).tolist() == [False, False, True]
    scores = compute_evaluation(model, model[1], images, max_images=None, deletion_steps=2)
    expected = deletion(model, images[:2], maps[:2], target=target[:2], n_steps=2).mean()
    assert scores.empty["GradCAM"] == 1
    assert scores.scores["deletion AUC"]["GradCAM"] == pytest.approx(float(expected), abs=1e-6)
    assert "GradCAM: 1 of its 3 maps are empty" in " ".join(scores.remarks)
