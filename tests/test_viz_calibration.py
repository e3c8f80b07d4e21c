"""plot_reliability_diagram: what is drawn is the diagram's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_ext.metrics import reliability_diagram

matplotlib = pytest.importorskip("matplotlib")


def _diagram():
    probabilities = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.35, 0.65], [0.55, 0.45]])
    return reliability_diagram(probabilities, torch.tensor([0, 1, 1, 1]), n_bins=10)


def test_bars_are_the_accuracy_of_the_filled_bins(tmp_path):
    from captum_ext.viz import plot_reliability_diagram

    diagram = _diagram()
    figure = plot_reliability_diagram(diagram, title="toy")
    axis = figure.axes[0]
    assert axis.get_title() == f"toy, ECE = {diagram.calibration_error():.3f}"
    filled = diagram.count > 0
    heights = sorted(round(p.get_height(), 9) for p in axis.containers[0].patches)
    assert heights == sorted(round(float(a), 9) for a in diagram.accuracy[filled])
    # the gap bars span from the accuracy to the mean confidence of each bin
    gaps = axis.containers[1].patches
    got = sorted((round(p.get_y(), 9), round(p.get_y() + p.get_height(), 9)) for p in gaps)
    acc, conf = diagram.accuracy[filled].numpy(), diagram.confidence[filled].numpy()
    expected = sorted(
        (round(float(lo), 9), round(float(hi), 9))
        for lo, hi in zip(np.minimum(acc, conf), np.maximum(acc, conf))
    )
    assert got == expected
    figure.savefig(tmp_path / "diagram.png")
    assert (tmp_path / "diagram.png").stat().st_size > 0


def test_draws_into_given_axes_without_counts():
    from matplotlib.figure import Figure

    from captum_ext.viz import plot_reliability_diagram

    figure = Figure()
    axes = figure.subplots(1, 2)
    assert plot_reliability_diagram(_diagram(), ax=axes[1], show_counts=False) is figure
    assert axes[1].get_title().startswith("ECE = ") and axes[0].get_title() == ""
    assert len(figure.axes) == 2


def test_bad_input_names_the_argument():
    from captum_ext.viz import plot_reliability_diagram

    with pytest.raises(TypeError, match="`diagram`"):
        plot_reliability_diagram(torch.zeros(3))
    with pytest.raises(TypeError, match="`ax`"):
        plot_reliability_diagram(_diagram(), ax="left")
    with pytest.raises(TypeError, match="`title`"):
        plot_reliability_diagram(_diagram(), title=3)
