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
        (_dominant_colour_counter, TypeError, r"`palette` must be a \(colours, channels\)"),
        (_mnist_split, ValueError, "`seed` must be a non-negative int"),
    ],
)
def test_wrong_types_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()
