"""captum_ext.viz.inversion: compute_inversion (numbers, no drawing) and render_inversion."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from captum_ext.inversion import (
    NetworkInversion,
    label_consistency,
    mean_confidence,
    within_class_diversity,
)
from captum_ext.viz.inversion import (
    InversionData,
    compute_inversion,
    inversion_section,
    render_inversion,
)

matplotlib = pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def inversion():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).eval()
    fitted = NetworkInversion(model, input_shape=(1, 12, 12), batch_size=16, latent_dim=8)
    fitted.fit(2, progress=False)
    return fitted


def test_compute_draws_nothing_and_equals_the_evaluation_functions(inversion, no_drawing):
    data = compute_inversion(inversion, per_class=3, class_names=["a", "b", "c"], seed=2)
    assert isinstance(data, InversionData)
    images, labels = inversion.sample_classes(3, generator=2)
    torch.testing.assert_close(data.images, images.cpu())
    torch.testing.assert_close(data.labels, labels.cpu())
    model = inversion.model
    assert data.classes == [0, 1, 2] and not data.sampled and data.num_classes == 3
    assert data.consistency == pytest.approx(label_consistency(model, images, labels))
    assert data.confidence == pytest.approx(mean_confidence(model, images, labels))
    diversity = within_class_diversity(model, images, labels)
    assert data.diversity == pytest.approx(diversity.mean)
    assert data.collapsed == (data.diversity > 0.9)
    for k in range(3):
        member = labels == k
        assert data.class_counts[k] == 3
        assert data.class_consistency[k] == pytest.approx(
            label_consistency(model, images[member], labels[member])
        )
        assert data.class_confidence[k] == pytest.approx(
            mean_confidence(model, images[member], labels[member])
        )
        expected = float(diversity.per_class[diversity.classes.tolist().index(k)])
        assert math.isclose(data.class_diversity[k], expected, rel_tol=1e-9)


def test_compute_of_chosen_classes(inversion, no_drawing):
    data = compute_inversion(inversion, per_class=2, classes=[2, 0])
    assert data.classes == [2, 0] and sorted(data.class_counts) == [0, 2]
    assert data.labels.tolist() == [2, 2, 0, 0]
    with pytest.raises(ValueError, match="`per_class` must be an int >= 2"):
        compute_inversion(inversion, per_class=1)


def test_the_no_drawing_check_catches_a_drawing(inversion, tmp_path, monkeypatch):
    data = compute_inversion(inversion, per_class=2)
    import matplotlib.figure

    def refuse(*args, **kwargs):
        raise AssertionError("drawn")

    monkeypatch.setattr(matplotlib.figure.Figure, "__init__", refuse)
    with pytest.raises(AssertionError, match="drawn"):
        render_inversion(data, tmp_path)


def test_render_gives_the_sections_page(inversion, tmp_path):
    section = inversion_section(inversion, tmp_path / "a", per_class=3, seed=1)
    rendered = render_inversion(compute_inversion(inversion, per_class=3, seed=1), tmp_path / "b")
    assert rendered.title == section.title and rendered.intro == section.intro
    assert rendered.rows[0].table.rows == section.rows[0].table.rows
    assert rendered.rows[0].figures[0].caption == section.rows[0].figures[0].caption
    assert (
        rendered.rows[0].figures[0].path == tmp_path / "b" / "images" / "inversion" / "samples.png"
    )
