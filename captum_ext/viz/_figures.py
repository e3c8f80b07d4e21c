"""The one figure-saving helper of the report sections (and the one way to size a figure to
the width it is shown at, so that its text is drawn at the size it is read)."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: dots per inch of the report's figures: a figure of ``w`` inches is ``w * DPI`` pixels wide
DPI = 100


#: while :func:`recording_figures` is active: the figures written so far, and the function
#: told of each one (None: not recording)
_WRITTEN: contextvars.ContextVar[tuple[list[Path], Callable[[Path], None] | None] | None] = (
    contextvars.ContextVar("captum_ext_written_figures", default=None)
)


@contextmanager
def recording_figures(
    on_write: Callable[[Path], None] | None = None,
) -> Iterator[list[Path]]:
    """Collect the path of every PNG that :func:`save_figure` and
    :func:`captum_ext.viz.overlay.save_png` write inside the block, in order (the report
    lists them for removal by a later run when its own run fails part-way).

    ``on_write``: called with each path *before* the file is written, so that a run killed
    at any point (SIGKILL, out of memory) has noted every figure it left; the report adds
    each one to the list of its folder's figures (see
    :func:`captum_ext.viz.report.note_figure`). Default: None."""
    written: list[Path] = []
    token = _WRITTEN.set((written, on_write))
    try:
        yield written
    finally:
        _WRITTEN.reset(token)


def record_written(path: Path) -> Path:
    """Note ``path`` as written, when :func:`recording_figures` is active; returns it. The
    savers call it just before they write the file (a path noted but never written is
    harmless: the report removes only files that exist)."""
    recording = _WRITTEN.get()
    if recording is not None:
        written, on_write = recording
        written.append(path)
        if on_write is not None:
            on_write(path)
    return path


def new_figure(width_px: float, height_px: float, *, dpi: int = DPI, **kwargs: Any):
    """A matplotlib ``Figure`` (no pyplot state) exactly ``width_px x height_px`` pixels,
    with ``layout="constrained"`` unless given: draw it at the width the page shows it."""
    from matplotlib.figure import Figure as PlotFigure

    kwargs.setdefault("layout", "constrained")
    return PlotFigure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, **kwargs)


def literal_text(*artists: Any) -> None:
    """Have matplotlib draw user-supplied text exactly as given.

    Matplotlib reads text between two ``$`` as mathtext (and all text as TeX under
    ``rcParams["text.usetex"]``): a class name ``"bin_$0_to_$5"`` fails to parse at
    ``savefig`` and a name that happens to be valid mathtext is drawn mangled. Every class
    name, title, label and set name a user gives goes through here once its ``Text`` artist
    exists (``literal_text(ax.set_title(title))``). ``artists``: ``Text`` artists, or
    ``Legend`` objects (their entries and title); ``None`` is skipped. ``get_text()`` still
    returns the string as given.
    """
    for artist in artists:
        if artist is None:
            continue
        if hasattr(artist, "get_texts"):  # a Legend
            literal_text(*artist.get_texts(), artist.get_title())
            continue
        artist.set_parse_math(False)
        artist.set_usetex(False)


def legend_as_given(axis: Any, handles: list, names: list[str], **kwargs: Any) -> Any:
    """``axis.legend(handles, names, **kwargs)`` with every name listed and drawn as given:
    literal text (:func:`literal_text`), and a name starting with ``"_"`` listed too.
    Matplotlib before 3.10 drops such names even when they are passed explicitly (with only
    a warning), so the legend is built with placeholder labels and then given the names."""
    legend = axis.legend(handles, [f"entry {i}" for i in range(len(names))], **kwargs)
    for text, name in zip(legend.get_texts(), names, strict=True):
        text.set_text(name)
    literal_text(legend)
    return legend


def save_figure(figure: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write a matplotlib figure as PNG to ``path`` (creating its folder) and return the
    path; ``kwargs`` go to ``Figure.savefig``."""
    from captum_ext._utils.training import atomic_path

    target = record_written(Path(path))  # noted first: a run killed while writing left it
    with atomic_path(target) as temp:  # never a truncated PNG where a figure was
        figure.savefig(temp, format="png", **kwargs)
    return target
