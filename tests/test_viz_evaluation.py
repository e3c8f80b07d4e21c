"""The report's evaluation section: numbers tied to the metric functions, then the page."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from captum.attr import Saliency

from captum_ext.metrics import deletion, road
from captum_ext.viz.build import SECTION_REGISTRY, ReportConfig, default_sections
from captum_ext.viz.evaluation import (
    METRIC_DIRECTIONS,
    EvaluationScores,
    compute_evaluation,
    render_evaluation,
)


@pytest.fixture(scope="module")
def scores_and_inputs(request):
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits

    model = load_bundled_model()
    images, _ = load_sample_digits()
    images = images[:6]
    before = model_snapshot(model)
    scores = compute_evaluation(model, BUNDLED_CAM_LAYER, images, max_images=5)
    assert_model_unchanged(model, before)
    return scores, model, images


def test_scores_are_the_metric_functions_on_the_same_maps(scores_and_inputs):
    scores, model, all_images = scores_and_inputs
    images = all_images[:5]
    assert scores.n_images == 5
    assert scores.methods == [
        "Saliency",
        "Integrated Gradients",
        "Guided Backprop",
        "GradCAM",
        "ContrastCAM",
        "FinerCAM",
        "LayerIBA",
        "PathwayGradient",
    ]
    with torch.no_grad():
        target = model(images).argmax(dim=1)
    maps = Saliency(model).attribute(images.clone(), target=target).sum(1, keepdim=True)
    expected = deletion(model, images, maps, target=target, n_steps=10).mean().item()
    assert scores.scores["deletion AUC"]["Saliency"] == pytest.approx(expected, abs=1e-6)
    curve = road(model, images, maps, target=target, percentages=(0.25, 0.5))
    assert scores.scores["ROAD (MoRF)"]["Saliency"] == pytest.approx(
        curve.probability.double().mean().item(), abs=1e-6
    )
    torch.testing.assert_close(
        scores.road_curves["Saliency"], curve.probability.double().mean(0), atol=1e-6, rtol=0
    )


def test_layer_iba_is_estimated_on_all_images_and_scored_like_the_others(scores_and_inputs):
    """LayerIBA's statistics come from every image given (6), its maps of the 5 scored ones
    are upsampled bits (seed 0 for each image), and its deletion AUC is deletion of those
    maps."""
    from captum_ext.attr import LayerIBA
    from captum_ext.data import BUNDLED_CAM_LAYER

    scores, model, all_images = scores_and_inputs
    images = all_images[:5]
    with torch.no_grad():
        target = model(images).argmax(dim=1)
    iba = LayerIBA(model, BUNDLED_CAM_LAYER)
    iba.estimate(all_images)
    bits = iba.attribute(images, target=target, generator=[0] * len(images))
    maps = torch.nn.functional.interpolate(bits, size=images.shape[-2:], mode="bilinear")
    expected = deletion(model, images, maps, target=target, n_steps=10).mean().item()
    assert scores.scores["deletion AUC"]["LayerIBA"] == pytest.approx(expected, abs=1e-6)
    assert not math.isnan(scores.scores["randomisation"]["LayerIBA"])


def test_pathway_gradient_is_scored_on_its_own_maps(scores_and_inputs):
    from captum_ext.attr import PathwayGradient

    scores, model, all_images = scores_and_inputs
    images = all_images[:5]
    with torch.no_grad():
        target = model(images).argmax(dim=1)
    maps = PathwayGradient(model).attribute(images.clone(), target=target).sum(1, keepdim=True)
    expected = deletion(model, images, maps, target=target, n_steps=10).mean().item()
    assert scores.scores["deletion AUC"]["PathwayGradient"] == pytest.approx(expected, abs=1e-6)


def test_sanity_checks_separate_guided_backprop_from_the_gradient(scores_and_inputs):
    scores, _, _ = scores_and_inputs
    randomised = scores.scores["randomisation"]
    assert randomised["Guided Backprop"] > randomised["Saliency"] + 0.2
    assert math.isnan(scores.scores["class sensitivity"]["ContrastCAM"])
    assert scores.best("randomisation") != "Guided Backprop"


def test_best_follows_each_metrics_direction():
    table = {metric: {"a": 0.2, "b": 0.8, "c": float("nan")} for metric in METRIC_DIRECTIONS}
    scores = EvaluationScores(["a", "b", "c"], 1, table, torch.zeros(1), {}, [])
    assert scores.best("insertion AUC") == "b" and scores.best("deletion AUC") == "a"


def test_render_marks_the_best_and_writes_the_curves(scores_and_inputs, tmp_path):
    scores, _, _ = scores_and_inputs
    section = render_evaluation(scores, tmp_path)
    (row,) = section.rows
    assert (tmp_path / "images" / "evaluation" / "road.png").is_file()
    column = row.table.columns.index("deletion AUC (lower is better)")
    starred = [cells[0] for cells in row.table.rows if cells[column].endswith(" *")]
    assert starred == [scores.best("deletion AUC")]
    assert "5 images" in section.intro


def test_the_section_is_registered_but_only_built_when_asked():
    assert "evaluation" in SECTION_REGISTRY
    assert "evaluation" not in default_sections(ReportConfig())
    assert "evaluation" not in default_sections(ReportConfig(model="torchvision.models:resnet18"))


def test_progress_reports_the_methods_on_stderr(scores_and_inputs, capsys):
    """The section takes minutes at 224 x 224 on a CPU: with ``progress`` it says how far it
    is (plain lines when stderr is not a terminal, as under pytest), and the same numbers."""
    from captum_ext.data import BUNDLED_CAM_LAYER

    _, model, images = scores_and_inputs
    quiet = compute_evaluation(model, BUNDLED_CAM_LAYER, images, max_images=1)
    assert capsys.readouterr().err == ""
    loud = compute_evaluation(model, BUNDLED_CAM_LAYER, images, max_images=1, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    total = len(loud.methods)
    assert lines[0] == f"evaluation:   0% (0/{total} method)"
    assert lines[-1].startswith(f"evaluation: 100% ({total}/{total} method)")
    for metric in METRIC_DIRECTIONS:
        for method in loud.methods:
            a, b = loud.scores[metric][method], quiet.scores[metric][method]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6)


def test_notes_of_methods_not_computed_read_as_one_sentence(scores_and_inputs, tmp_path):
    """Errors end with a full stop already: the intro must not print ".." after them."""
    scores, _, _ = scores_and_inputs
    noted = dataclasses.replace(
        scores,
        notes=[
            "PathwayGradient: ValueError: no nn.ReLU module to score.",
            "randomisation: no layer",
        ],
    )
    intro = render_evaluation(noted, tmp_path).intro
    assert intro.endswith(
        "Not computed: PathwayGradient: ValueError: no nn.ReLU module to score; "
        "randomisation: no layer."
    )


def test_scores_do_not_depend_on_the_order_of_the_images(scores_and_inputs):
    """LayerIBA drew one noise block for the batch: its six numbers moved when the same
    images came in another order (completeness 0.43 against 0.66)."""
    from captum_ext.data import BUNDLED_CAM_LAYER

    _, model, all_images = scores_and_inputs
    images = all_images[:3]
    forward = compute_evaluation(model, BUNDLED_CAM_LAYER, images, max_images=None)
    backward = compute_evaluation(model, BUNDLED_CAM_LAYER, images.flip(0), max_images=None)
    _assert_same_scores(forward, backward, abs=1e-5)


def _assert_same_scores(first, second, *, abs):
    """Every (metric, method) score equal to ``abs``, NaN where the other is NaN."""
    for metric in METRIC_DIRECTIONS:
        for method in first.methods:
            a, b = first.scores[metric][method], second.scores[metric][method]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=abs), (
                metric,
                method,
            )


def test_contrastcam_keeps_its_contrast_class_on_the_randomised_copy(scores_and_inputs):
    """The adapter took the runner-up of whatever model it was given, so after randomising
    the last layer it explained other contrast classes (Q [6, 2, 6, 6] became [2, 7, 5, 5])
    and the sanity check compared maps of different questions."""
    import copy

    from captum_ext.attr import ContrastCAM
    from captum_ext.data import BUNDLED_CAM_LAYER
    from captum_ext.viz.evaluation import _explainers

    _, model, all_images = scores_and_inputs
    images = all_images[:4]
    randomised = copy.deepcopy(model)
    torch.manual_seed(0)
    randomised.classifier.reset_parameters()
    with torch.no_grad():
        target = model(images).argmax(1)
        runner_up = model(images).topk(2, 1).indices[:, 1]
        assert not torch.equal(randomised(images).topk(2, 1).indices[:, 1], runner_up)
    layer = model.get_submodule(BUNDLED_CAM_LAYER)
    adapter = _explainers(model, layer, images)["ContrastCAM"](randomised)
    expected = ContrastCAM(randomised, BUNDLED_CAM_LAYER).attribute(
        images, contrast=runner_up, upsample_to_input=True
    )
    torch.testing.assert_close(adapter.attribute(images, target), expected)


def test_every_tied_best_method_is_starred(tmp_path):
    """Only the first of two equal values was starred (Saliency and PathwayGradient are
    bit-identical in both sanity columns on the bundled model)."""
    table = {metric: {"a": 0.9, "b": 0.9, "c": 0.5} for metric in METRIC_DIRECTIONS}
    scores = EvaluationScores(["a", "b", "c"], 1, table, torch.zeros(1), {}, [])
    assert scores.best_methods("insertion AUC") == ["a", "b"]
    assert scores.best_methods("deletion AUC") == ["c"]
    assert scores.best("insertion AUC") == "a"
    (row,) = render_evaluation(scores, tmp_path).rows
    column = row.table.columns.index("insertion AUC (higher is better)")
    assert [cells[0] for cells in row.table.rows if cells[column].endswith(" *")] == ["a", "b"]


def test_inside_inference_mode_every_method_is_scored_as_outside(scores_and_inputs):
    """Inside a serving block Saliency, Integrated Gradients and Guided Backprop failed on
    "does not require grad" and were reported as NaN rows with a torch message."""
    from captum_ext.data import BUNDLED_CAM_LAYER

    _, model, all_images = scores_and_inputs
    images = all_images[:2]
    outside = compute_evaluation(model, BUNDLED_CAM_LAYER, images, max_images=None)
    with torch.inference_mode():
        inside = compute_evaluation(model, BUNDLED_CAM_LAYER, images.clone(), max_images=None)
    assert inside.notes == outside.notes
    _assert_same_scores(outside, inside, abs=1e-6)
