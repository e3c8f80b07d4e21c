"""The one figure-saving helper of the report sections (and the one way to size a figure to
the width it is shown at, so that its text is drawn at the size it is read)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: dots per inch of the report's figures: a figure of ``w`` inches is ``w * DPI`` pixels wide
DPI = 100


def new_figure(width_px: float, height_px: float, *, dpi: int = DPI, **kwargs: Any):
    """A matplotlib ``Figure`` (no pyplot state) exactly ``width_px x height_px`` pixels,
    with ``layout="constrained"`` unless given: draw it at the width the page shows it."""
    from matplotlib.figure import Figure as PlotFigure

    kwargs.setdefault("layout", "constrained")
    return PlotFigure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, **kwargs)


def save_figure(figure: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write a matplotlib figure as PNG to ``path`` (creating its folder) and return the
    path; ``kwargs`` go to ``Figure.savefig``."""
    from captum_ext._utils.training import atomic_path

    target = Path(path)
    with atomic_path(target) as temp:  # never a truncated PNG where a figure was
        figure.savefig(temp, format="png", **kwargs)
    return target
