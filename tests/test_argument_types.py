"""Arguments of the wrong type are refused by name, not by an AttributeError or a numpy
error from inside (found by fuzzing each public entry point with wrong types)."""

from __future__ import annotations

import networkx as nx
import pytest


def _score_table():
    from captum_ext.metrics import ScoreTable

    ScoreTable("x")


def _draw():
    pytest.importorskip("matplotlib")
    from captum_ext.circuits import draw

    draw(nx.DiGraph(), ax="x")


def _dominant_colour_counter():
    from captum_ext.testing import DominantColourCounter

    DominantColourCounter("x")


def _mnist_split():
    from captum_ext.data import load_mnist_split

    load_mnist_split(seed=-1)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (_score_table, TypeError, "`columns` must be a mapping"),
        (_draw, TypeError, "`ax` must be a matplotlib Axes or None"),
        (_dominant_colour_counter, TypeError, r"`palette` must be a real \(colours, channels\)"),
        (_mnist_split, ValueError, "`seed` must be a non-negative int"),
    ],
)
def test_wrong_types_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_an_integer_palette_and_a_seed_of_the_wrong_type():
    """Integer colours (0 / 1) counted like the same float palette before the type check and
    must still; a seed given as text is a TypeError."""
    import torch

    from captum_ext.data import load_mnist_split
    from captum_ext.testing import DominantColourCounter

    image = torch.zeros(1, 3, 4, 4)
    image[0, 1, :2] = 1.0  # eight green pixels
    colours = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    by_int = DominantColourCounter(torch.tensor(colours))(image)
    by_float = DominantColourCounter(torch.tensor(colours, dtype=torch.float32))(image)
    torch.testing.assert_close(by_int, by_float)
    with pytest.raises(TypeError, match="`seed` must be a non-negative int, got str"):
        load_mnist_split(seed="3")
