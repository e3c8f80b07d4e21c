"""Figures a person can read (issue 19): a perceptually uniform colour map by default and a
colour bar with the scale."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from captum_ext.viz import overlay
from captum_ext.viz.overlay import DEFAULT_CMAP, save_colorbar

matplotlib = pytest.importorskip("matplotlib")


def test_sections_default_to_the_documented_perceptually_uniform_map():
    import inspect

    from matplotlib import colormaps

    from captum_ext.viz import voice_section

    assert DEFAULT_CMAP == "inferno"
    assert inspect.signature(voice_section).parameters["cmap"].default == DEFAULT_CMAP
    heat = np.linspace(0.0, 1.0, 64).reshape(8, 8)
    black = np.zeros((8, 8, 3))
    got = overlay(black, heat, alpha=1.0, cmap=DEFAULT_CMAP)
    expected = np.round(colormaps["inferno"](heat)[:, :, :3] * 255).astype(np.uint8)
    assert np.array_equal(got, expected)
    # inferno's brightness grows with the value (jet's does not)
    grey = got.astype(float).mean(axis=2).reshape(-1)
    assert (np.diff(grey) >= -1).all()
    jet = overlay(black, heat, alpha=1.0, cmap="jet").astype(float).mean(axis=2).reshape(-1)
    assert (np.diff(jet) < -1).any()


@pytest.mark.parametrize("cmap, alpha", [("inferno", 1.0), ("viridis", 0.5)])
def test_colour_bar_shows_the_colour_map_from_low_to_high(tmp_path, cmap, alpha):
    from matplotlib import colormaps

    path = save_colorbar(tmp_path / "bar" / "colorbar.png", cmap=cmap, alpha=alpha, label="u")
    with Image.open(path) as picture:
        rgb = np.asarray(picture.convert("RGB")).astype(float)
    # the row through the middle of the bar: the bar is the widest run of non-white pixels
    rows = [(np.abs(rgb[r] - 255).sum(axis=1) > 30).sum() for r in range(rgb.shape[0])]
    widest = np.flatnonzero(np.array(rows) >= 0.9 * max(rows))
    bar_row = rgb[int(np.median(widest))]  # the middle of the bar, away from its outline
    coloured = np.flatnonzero(np.abs(bar_row - 255).sum(axis=1) > 30)
    start, stop = coloured[0] + 4, coloured[-1] - 4  # inside the bar's outline
    steps = np.linspace(0.0, 1.0, 256)
    palette = 255 * ((1 - alpha) * 0.5 + alpha * colormaps[cmap](steps)[:, :3])
    found = []
    for x in np.linspace(start, stop, 12).round().astype(int):
        distance = np.abs(palette - bar_row[x]).max(axis=1)
        assert distance.min() < 12, (x, bar_row[x])  # a colour of the map
        found.append(steps[int(np.argmin(distance))])
    assert found[0] < 0.1 and found[-1] > 0.9  # low on the left, high on the right
    assert all(b >= a - 0.02 for a, b in zip(found, found[1:]))  # in order


def test_colour_bar_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="`cmap`"):
        save_colorbar(tmp_path / "x.png", cmap="no-such-map")
    with pytest.raises(ValueError, match="`alpha`"):
        save_colorbar(tmp_path / "x.png", alpha=2)
