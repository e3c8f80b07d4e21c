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
    classifier = inversion.classifier
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
