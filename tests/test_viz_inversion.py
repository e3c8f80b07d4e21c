"""captum_ext.viz.inversion: the network-inversion report section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captum_ext.inversion import (
    NetworkInversion,
    label_consistency,
    mean_confidence,
    within_class_diversity,
)
from captum_ext.viz import Report, inversion_section


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).eval()


@pytest.fixture(scope="module")
def inversion():
    fitted = NetworkInversion(_classifier(), input_shape=(1, 12, 12), batch_size=16, latent_dim=8)
    fitted.fit(3, progress=False)
    return fitted


def test_table_equals_the_evaluation_functions(inversion, tmp_path):
    section = inversion_section(inversion, tmp_path, per_class=4, class_names=["a", "b", "c"])
    images, labels = inversion.sample_classes(4, generator=0)
    classifier = inversion.model
    table = section.rows[0].table
    assert table.columns[:3] == ["class", "images", "label consistency"]
    assert table.rows[0] == [
        "all",
        "12",
        f"{label_consistency(classifier, images, labels):.1%}",
        f"{mean_confidence(classifier, images, labels):.3f}",
        f"{within_class_diversity(classifier, images, labels).mean:.3f}",
    ]
    for k, row in enumerate(table.rows[1:]):
        member = labels == k
        assert row[0] == "abc"[k] and row[1] == "4"
        assert row[2] == f"{label_consistency(classifier, images[member], labels[member]):.1%}"
    grid = section.rows[0].figures[0].path
    with Image.open(grid) as picture:
        assert np.asarray(picture, dtype=float).std() > 0
    report = Report("inversion")
    report.add_section(section)
    assert "each class looks like" in report.write(tmp_path / "r").read_text(encoding="utf-8")


def test_bad_arguments_name_the_argument(inversion, tmp_path):
    with pytest.raises(TypeError, match="`inversion` must be a NetworkInversion"):
        inversion_section("nope", tmp_path)
    with pytest.raises(ValueError, match="`per_class` must be an int >= 2"):
        inversion_section(inversion, tmp_path, per_class=1)
    with pytest.raises(ValueError, match="`class_names`"):
        inversion_section(inversion, tmp_path, class_names=["a"])


# --- many classes, and the diversity caveat (issue 19) ---


def _wide_classifier(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    ).eval()


@pytest.mark.slow
def test_many_classes_are_sampled_with_the_seed_and_the_page_says_so(tmp_path):
    from captum_ext.viz.inversion import COLLAPSE_COSINE, DEFAULT_MAX_CLASSES

    model = _wide_classifier(50)
    inv = NetworkInversion(model, input_shape=(1, 12, 12), batch_size=8, latent_dim=8)
    section = inversion_section(inv, tmp_path, per_class=3, seed=4)
    expected = sorted(
        torch.randperm(50, generator=torch.Generator().manual_seed(4))[:DEFAULT_MAX_CLASSES]
    )
    table = section.rows[0].table
    assert len(table.rows) == 1 + DEFAULT_MAX_CLASSES
    assert [row[0] for row in table.rows[1:]] == [str(int(k)) for k in expected]
    assert table.rows[0][1] == str(3 * DEFAULT_MAX_CLASSES)
    assert "50 classes; 20 of them, drawn at random (seed 4)" in section.intro
    # the numbers are those of the evaluation functions on the same samples
    labels = torch.tensor([int(k) for k in expected]).repeat_interleave(3)
    images = inv.sample(labels, generator=4)
    diversity = within_class_diversity(model, images, labels)
    assert table.rows[0][4] == f"{diversity.mean:.3f}"
    for position, row in enumerate(table.rows[1:]):
        assert row[4] == f"{float(diversity.per_class[position]):.3f}"
    # the diversity is printed beside the grid; an untrained generator is collapsed
    caption = section.rows[0].figures[0].caption
    assert f"{diversity.mean:.3f}" in caption
    assert diversity.mean > COLLAPSE_COSINE and "Caveat: the samples are nearly identical" in (
        section.intro
    )
    # explicit classes, in the order given
    explicit = inversion_section(inv, tmp_path, per_class=2, classes=[7, 3])
    assert [row[0] for row in explicit.rows[0].table.rows[1:]] == ["7", "3"]
    assert "2 of the model's 50 classes are shown" in explicit.intro
    with pytest.raises(ValueError, match="`classes`"):
        inversion_section(inv, tmp_path, classes=[50])
    with pytest.raises(ValueError, match="`max_classes`"):
        inversion_section(inv, tmp_path, max_classes=0)


@pytest.mark.slow
def test_caveat_only_when_the_diversity_says_collapse(inversion, tmp_path, monkeypatch):
    import captum_ext.inversion.evaluation as evaluation
    from captum_ext.inversion.evaluation import DiversityResult

    def fake(per_class):
        def within(source, images, labels, **kwargs):
            values = torch.tensor(per_class, dtype=torch.float64)
            classes = torch.arange(len(per_class))
            return DiversityResult(float(values.mean()), values, classes, classes * 0 + 4)

        return within

    # every sample classified as requested (the consistency caveat is tested on its own)
    monkeypatch.setattr(evaluation, "label_consistency", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(evaluation, "within_class_diversity", fake([0.2, 0.3, 0.4]))
    diverse = inversion_section(inversion, tmp_path, per_class=4, class_names=["a", "b", "c"])
    assert "Caveat" not in diverse.intro and "Nearly identical" not in diverse.intro
    assert "0.300" in diverse.rows[0].figures[0].caption
    monkeypatch.setattr(evaluation, "within_class_diversity", fake([0.2, 0.95, 0.4]))
    one = inversion_section(inversion, tmp_path, per_class=4, class_names=["a", "b", "c"])
    assert "Caveat" not in one.intro and "feature cosine > 0.9) in: b." in one.intro
    monkeypatch.setattr(evaluation, "within_class_diversity", fake([0.97, 0.95, 0.99]))
    collapsed = inversion_section(inversion, tmp_path, per_class=4)
    assert "Caveat: the samples are nearly identical within classes" in collapsed.intro
    assert "nearly identical samples" in collapsed.rows[0].figures[0].caption


def test_a_generator_that_has_not_inverted_the_model_is_said(inversion, tmp_path, monkeypatch):
    """Label consistency below 90 %: the section says which classes the generator has not
    inverted, and the collapse caveat no longer claims the classifier accepts the rows."""
    import captum_ext.inversion.evaluation as evaluation
    from captum_ext.inversion.evaluation import DiversityResult

    per_class = {0: 1.0, 1: 0.0, 2: 0.25}

    def consistency(classifier, images, labels, **kwargs):
        return sum(per_class[int(k)] for k in labels) / len(labels)

    def collapsed(source, images, labels, **kwargs):
        values = torch.tensor([0.99, 0.98, 0.97], dtype=torch.float64)
        classes = torch.arange(3)
        return DiversityResult(float(values.mean()), values, classes, classes * 0 + 4)

    monkeypatch.setattr(evaluation, "label_consistency", consistency)
    monkeypatch.setattr(evaluation, "within_class_diversity", collapsed)
    section = inversion_section(inversion, tmp_path, per_class=4, class_names=["a", "b", "c"])
    assert "assigns only 41.7% of the samples to the class they were generated for" in (
        section.intro
    )
    assert "has not inverted the classifier for b, c, so those rows" in section.intro
    assert "each row shows one image, not the variety" in section.intro
    assert "the classifier accepts, not" not in section.intro
    monkeypatch.setattr(evaluation, "label_consistency", lambda *args, **kwargs: 0.95)
    fine = inversion_section(inversion, tmp_path, per_class=4, class_names=["a", "b", "c"])
    assert "has not inverted" not in fine.intro
    assert "each row shows one image the classifier accepts, not" in fine.intro


def test_rows_nearly_identical_across_classes_are_said(inversion, tmp_path, monkeypatch):
    """The cosine over all pairs of samples, whatever their class, is the within-class
    diversity of the samples taken as one class; above 0.9 the section says the rows are
    nearly identical across classes too (a ViT trained on digits: 0.993 after 300 steps)."""
    import captum_ext.inversion.evaluation as evaluation
    from captum_ext.inversion.evaluation import DiversityResult
    from captum_ext.viz.inversion import compute_inversion

    data = compute_inversion(inversion, per_class=4, seed=0)
    images, labels = inversion.sample_classes(4, generator=0)
    one_group = within_class_diversity(inversion.model, images, torch.zeros_like(labels))
    assert data.similarity_across == pytest.approx(one_group.mean)

    real = evaluation.within_class_diversity

    def across(value):
        def fake(source, images, labels, **kwargs):
            if bool((labels == labels[0]).all()):  # all samples as one group
                return DiversityResult(value, torch.tensor([value]), labels[:1], labels[:1] * 0)
            return real(source, images, labels, **kwargs)

        return fake

    monkeypatch.setattr(evaluation, "label_consistency", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(evaluation, "within_class_diversity", across(0.97))
    same = inversion_section(inversion, tmp_path, per_class=4, class_names=["a", "b", "c"])
    assert (
        "nearly identical across classes too (mean feature cosine over all pairs of samples, "
        "whatever their class, 0.970): the classifier puts the rows in different classes"
    ) in same.intro
    monkeypatch.setattr(evaluation, "within_class_diversity", across(0.5))
    apart = inversion_section(inversion, tmp_path, per_class=4, class_names=["a", "b", "c"])
    assert "across classes" not in apart.intro
