r"""A modular HTML report: a :class:`Report` is a list of independent :class:`Section`\ s.

Each section is built by its own function (one per explanation family) that computes its
maps, writes its PNGs under ``out_dir/images/<section>/`` and returns a :class:`Section`;
:meth:`Report.write` renders ``out_dir/index.html`` from a Jinja2 template (all text is
escaped) with relative links to the PNGs. New kinds of sections (trust scores, VOICE, ...)
are new functions returning a :class:`Section`; nothing else changes.

Example::

    >>> from captum_ext.bundled import load_bundled_model
    >>> from captum_ext.data import (BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits,
    ...                              load_sample_digits)
    >>> from captum_ext.viz import Report, contrastive_section
    >>> model = load_bundled_model()
    >>> images, labels = load_sample_digits()
    >>> shown = denormalize_digits(images)                 # N x 1 x 28 x 28 in [0, 1]
    >>> report = Report("Digits")
    >>> section = report.add_section(contrastive_section(model, BUNDLED_CAM_LAYER, images, shown,
    ...                                                  DIGIT_CLASSES, "out", labels=labels))
    >>> report.write("out").name                           # out/index.html
    'index.html'
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captum_ext._utils.layers import resolve_layer, root_module
from captum_ext._utils.training import atomic_path, progress_bar
from captum_ext._utils.validation import runner_up_classes

from ._checks import _check_names_labels, _check_overlay_options, _true_class
from .overlay import DEFAULT_CMAP, _image_values, overlay, save_colorbar, save_png

__all__ = [
    "ContrastiveMaps",
    "Figure",
    "Report",
    "Row",
    "Section",
    "Table",
    "compute_contrastive",
    "contrastive_section",
    "render_contrastive",
]

_FIGURE_WIDTH = 168  # CSS pixels per figure in the page
_TEMPLATE = "report.html.j2"

#: the longest side, in pixels, of an image or map drawn as a figure: twice the width the page
#: shows it (sharp on screens with two pixels per CSS pixel). Larger images are shrunk to it
#: before they are drawn: a 1600 x 1200 photo made 3 MB PNGs, and took seconds per figure, to
#: be shown 168 px wide. The page links to no larger view.
FIGURE_PIXELS = 2 * _FIGURE_WIDTH


#: width in the page (CSS pixels) of a section's colour bar
_COLORBAR_WIDTH = 320

#: what every section appends to the caption of an empty map (:func:`empty_maps`)
EMPTY_CAPTION = " (empty)"


def empty_maps(maps: Any) -> np.ndarray:
    """Which of the ``N`` maps (``maps``: a tensor or array whose first dimension is ``N``)
    are empty: every value exactly 0, no evidence at all (e.g. ContrastCAM where the
    evidence for the prediction never exceeds that for the runner-up, as on an untrained
    network). An empty map ranks no pixel above another, so a metric that intervenes in its
    order (deletion, insertion, ROAD, completeness) would score the raster order of the
    pixels, and a sanity check would compare constants: every section captions such a map
    "(empty)" and scores it n/a. A NaN value is not 0 (such a map is not empty).

    Returns:
        numpy.ndarray: ``N`` bools, True where the map is empty.
    """
    if isinstance(maps, Tensor):
        nonzero = (maps.detach() != 0).reshape(maps.shape[0], -1).any(dim=1).cpu().numpy()
    else:
        values = np.asarray(maps)
        nonzero = (values != 0).reshape(values.shape[0], -1).any(axis=1)
    return ~np.asarray(nonzero, dtype=bool)


def is_empty_map(heat: Any) -> bool:
    """Whether one map (a tensor or array) is empty: every value exactly 0 (:func:`empty_maps`)."""
    return bool(empty_maps(heat[None])[0])


@dataclass
class Figure:
    """One picture of a row: a caption and the PNG file (absolute, or relative to the cwd).

    ``width``: its width in the page in CSS pixels (e.g. for a plot); None, the default,
    gives the common width of the images and maps.
    """

    caption: str
    path: str | os.PathLike
    width: int | None = None

    def __post_init__(self) -> None:
        if self.width is not None and (
            isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1
        ):
            raise ValueError(f"a figure's `width` must be a positive int, got {self.width!r}.")


@dataclass
class Table:
    """A small table of text (numbers already formatted), shown under a row's figures.

    Args:
        columns (Sequence[str]): the header.
        rows (Sequence[Sequence]): the body, one sequence of cells per line, as many cells as
            columns; cells are converted with ``str`` (format numbers first).
        caption (str, optional): a line above the table. Default: "".
    """

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.columns, str):
            raise TypeError("`columns` must be a sequence of column names, not a str.")
        self.columns = [str(c) for c in self.columns]
        self.rows = [self._cells(r) for r in self.rows]
        self.caption = str(self.caption)

    def add_row(self, cells: Sequence[Any]) -> None:
        """Append a line of cells (converted with ``str``)."""
        self.rows.append(self._cells(cells))

    def _cells(self, cells: Any) -> list[str]:
        if isinstance(cells, str) or not isinstance(cells, Sequence):
            raise TypeError(f"a table row must be a sequence of cells, got {cells!r}.")
        if len(cells) != len(self.columns):
            raise ValueError(
                f"a table row has {len(cells)} cells for {len(self.columns)} columns: {cells!r}."
            )
        return [str(c) for c in cells]


@dataclass
class Row:
    """A labelled line of figures (typically one input image and its explanations).

    ``figures`` may be given as :class:`Figure`\\ s or as ``(caption, path)`` pairs. An
    optional :class:`Table` is shown under the figures (e.g. the numbers behind a plot).

    ``per_image``: whether the row shows one image (its input and maps) rather than a
    summary of the section (a table, a curve, a colour scale). The page shows a section's
    summary rows first and folds its per-image rows into a closed ``<details>`` element.
    None, the default, infers it: a row without a table that has a figure of the common
    image width (no explicit ``width``: plots and colour bars set one) is per-image.
    """

    label: str
    figures: list[Figure] = field(default_factory=list)
    table: Table | None = None
    per_image: bool | None = None

    def __post_init__(self) -> None:
        self.figures = [_as_figure(f) for f in self.figures]
        if self.table is not None and not isinstance(self.table, Table):
            raise TypeError(f"a row's `table` must be a Table, got {type(self.table).__name__}.")
        if self.per_image is not None and not isinstance(self.per_image, bool):
            raise TypeError(f"a row's `per_image` must be a bool or None, got {self.per_image!r}.")

    @property
    def is_per_image(self) -> bool:
        """``per_image`` if given, else inferred (see the class docstring)."""
        if self.per_image is not None:
            return self.per_image
        return self.table is None and any(figure.width is None for figure in self.figures)

    def add_figure(self, caption: str, path: str | os.PathLike, width: int | None = None) -> Figure:
        figure = Figure(caption, path, width)
        self.figures.append(figure)
        return figure


@dataclass
class Section:
    """A titled part of the report: an intro paragraph and rows of figures."""

    title: str
    intro: str = ""
    rows: list[Row] = field(default_factory=list)

    def add_row(
        self,
        label: str,
        figures: Iterable[Figure | tuple[str, Any]] = (),
        table: Table | None = None,
        per_image: bool | None = None,
    ) -> Row:
        row = Row(label, list(figures), table, per_image)
        self.rows.append(row)
        return row


def _as_figure(item: Any) -> Figure:
    if isinstance(item, Figure):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Figure(str(item[0]), item[1])
    raise TypeError(f"a row's figures must be Figure or (caption, png path) pairs, got {item!r}.")


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}-{k}", k + 1
    taken.add(slug)
    return slug


def require_jinja2():
    """The ``jinja2`` module that writes the page, or an ImportError naming the extra (checked
    before a report's sections are computed, not after)."""
    try:
        import jinja2
    except ImportError:
        raise ImportError(
            "writing the report's HTML page needs jinja2: pip install 'captum-ext[report]'"
        ) from None
    return jinja2


class Report:
    """An HTML report made of independent sections.

    Args:
        title (str): the page title.
        metadata (Mapping[str, str] or Sequence[tuple[str, str]], optional): shown as a
            small table under the title (model, layer, images, ...). Default: None.

    Examples::

        >>> import numpy as np
        >>> from captum_ext.viz import Report, Section, save_png
        >>> _ = save_png(np.zeros((28, 28, 3), np.uint8), "a.png")
        >>> _ = save_png(np.full((28, 28, 3), 255, np.uint8), "b.png")
        >>> report = Report("My model")
        >>> section = Section("Notes", "Two pictures.")
        >>> row = section.add_row("first image", [("input", "a.png"), ("map", "b.png")])
        >>> section = report.add_section(section)
        >>> index = report.write("out")  # out/index.html, PNGs copied to out/images/
        >>> index.name
        'index.html'
    """

    def __init__(
        self, title: str = "captum-ext report", metadata: Mapping[str, Any] | None = None
    ) -> None:
        self.title = str(title)
        items = metadata.items() if isinstance(metadata, Mapping) else (metadata or [])
        self.metadata: list[tuple[str, str]] = [(str(k), str(v)) for k, v in items]
        self.sections: list[Section] = []

    def add_section(self, section: Section) -> Section:
        """Append a section (returned, for chaining)."""
        if not isinstance(section, Section):
            raise TypeError(f"`section` must be a Section, got {type(section).__name__}.")
        self.sections.append(section)
        return section

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Render ``out_dir/index.html``; returns its path.

        Figures already under ``out_dir`` are linked where they are; others are copied to
        ``out_dir/images/``. Every link is relative, so the folder can be moved or zipped.
        The page is written atomically (temporary file, then rename).

        The figures under ``out_dir/images/`` that the page links to are listed in
        ``out_dir/images/.captum-ext-figures``; writing a report again into the same folder
        deletes the figures the previous report listed there and the new one no longer
        uses (e.g. after a run on fewer images), and only those: nothing else in
        ``out_dir`` is ever deleted. A report run that was stopped part-way has listed there
        the figures it wrote (``figure_noter``), which are removed the same way.

        Raises:
            FileNotFoundError: a figure's PNG does not exist.
        """
        jinja2 = require_jinja2()
        from captum_ext import __version__

        out = Path(out_dir).resolve()
        (out / "images").mkdir(parents=True, exist_ok=True)
        anchors: set[str] = set()
        copied: set[Path] = set()
        sections = []
        for section in self.sections:
            anchor = _slug(section.title, anchors)
            rows, per_image = [], []
            for row in section.rows:
                figures = [self._place(f, out, anchor, copied) for f in row.figures]
                table = None
                if row.table is not None:
                    table = {
                        "caption": row.table.caption,
                        "columns": row.table.columns,
                        "rows": row.table.rows,
                    }
                rendered = {"label": row.label, "figures": figures, "table": table}
                (per_image if row.is_per_image else rows).append(rendered)
            sections.append(
                {
                    "title": section.title,
                    "intro": section.intro,
                    "anchor": anchor,
                    "rows": rows,
                    "per_image": per_image,
                }
            )
        environment = jinja2.Environment(
            loader=jinja2.PackageLoader("captum_ext.viz", "templates"),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
            finalize=_bidi_controls_shown,
        )
        html = environment.get_template(_TEMPLATE).render(
            title=self.title,
            metadata=self.metadata,
            sections=sections,
            version=__version__,
            generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            figure_width=_FIGURE_WIDTH,
        )
        images = out / "images"
        used = sorted(
            {
                urllib.parse.unquote(figure["src"])
                for section in sections
                for row in [*section["rows"], *section["per_image"]]
                for figure in row["figures"]
                if (out / urllib.parse.unquote(figure["src"])).resolve().is_relative_to(images)
            }
        )
        previous = _read_manifest(images)
        # the manifest first lists old and new figures, so that a run killed before the old
        # ones are deleted leaves none untracked
        _write_manifest(images, sorted(set(previous) | set(used)))
        index = out / "index.html"
        with atomic_path(index) as temporary:
            temporary.write_text(html, encoding="utf-8")
        _remove_figures(out, images, set(previous) - set(used))
        _write_manifest(images, used)
        return index

    @staticmethod
    def _place(figure: Figure, out: Path, anchor: str, copied: set[Path]) -> dict[str, Any]:
        from PIL import Image

        source = Path(figure.path).resolve()
        if not source.is_file():
            raise FileNotFoundError(
                f"figure {figure.caption!r}: PNG file not found: {str(figure.path)!r}."
            )
        if not source.is_relative_to(out):
            target = out / "images" / anchor / source.name
            stem, k = target.stem, 2
            while target in copied or (target.exists() and not _same_file(target, source)):
                target, k = target.with_name(f"{stem}-{k}{target.suffix}"), k + 1
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied.add(target)
            source = target
        with Image.open(source) as image:
            width = image.size[0]
        relative = source.relative_to(out).as_posix()
        shown_width = _FIGURE_WIDTH if figure.width is None else int(figure.width)
        return {
            "caption": figure.caption,
            "src": urllib.parse.quote(relative),
            "pixelated": width < shown_width,
            "width": None if figure.width is None else shown_width,
        }


_MANIFEST = ".captum-ext-figures"

#: characters that change the direction of the text after them (overrides, embeddings,
#: isolates, marks): in a file or class name they would reverse the page's own words
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_BIDI_SHOWN = {ord(c): f"\\u{ord(c):04x}" for c in _BIDI_CONTROLS}


def _bidi_controls_shown(value: Any) -> Any:
    """Every text the page prints, with direction controls written out as ``\\u202e``
    (visible, and inert): a name holding U+202E otherwise reverses the rest of its line,
    the report's words and numbers included, and can disguise a file's extension. Markup
    (a rendered row) was made of texts already passed through here."""
    from markupsafe import Markup

    if isinstance(value, str) and not isinstance(value, Markup):
        return value.translate(_BIDI_SHOWN)
    return value


def _read_manifest(images: Path) -> list[str]:
    try:
        text = (images / _MANIFEST).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [line for line in text.splitlines() if line.strip()]


def _write_manifest(images: Path, paths: Iterable[str]) -> None:
    with atomic_path(images / _MANIFEST) as temporary:
        temporary.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")


def figure_noter(out_dir: str | os.PathLike) -> Callable[[str | os.PathLike], None]:
    """A function that adds the path of a figure about to be written under
    ``out_dir/images`` to the list in ``out_dir/images/.captum-ext-figures``, at once (a
    line appended), so that a report run killed at any point (SIGTERM, SIGKILL, out of
    memory) has listed every figure it wrote, and the next report written into ``out_dir``
    removes those it does not use (see :meth:`Report.write`). Paths outside
    ``out_dir/images`` and paths already listed are skipped; a list that cannot be written
    (a full disk) is left as it is, the figure's own write then fails with its error. Give
    it to :func:`captum_ext.viz._figures.recording_figures` as ``on_write``."""
    out = Path(out_dir).resolve()
    images = out / "images"
    listed = set(_read_manifest(images))
    manifest = images / _MANIFEST
    try:  # a list edited by hand may lack its last line break
        with manifest.open("rb") as file:
            file.seek(-1, os.SEEK_END)
            line_break = file.read(1) != b"\n"
    except OSError:  # none yet, or empty
        line_break = False

    def note(path: str | os.PathLike) -> None:
        nonlocal line_break
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(images):
            return
        relative = resolved.relative_to(out).as_posix()
        if relative in listed or "\n" in relative or "\r" in relative:
            return
        try:
            images.mkdir(parents=True, exist_ok=True)
            with manifest.open("a", encoding="utf-8") as file:
                file.write(("\n" if line_break else "") + relative + "\n")
        except (OSError, UnicodeEncodeError):
            return
        line_break = False
        listed.add(relative)

    return note


def list_written_figures(out_dir: str | os.PathLike, written: Iterable[str | os.PathLike]) -> None:
    """Add the figures of a report run that failed part-way (``written``: the PNG files it
    wrote, see :func:`captum_ext.viz._figures.recording_figures`) to the list in
    ``out_dir/images/.captum-ext-figures``, so that the next report written there removes
    those it does not use, as it does a finished report's. Files outside ``out_dir/images``
    are not listed. Best effort: a list that cannot be written (full disk) is left as it was,
    and the run's own error is the one the user sees."""
    out = Path(out_dir).resolve()
    images = out / "images"
    new = []
    for path in written:
        resolved = Path(path).resolve()
        if resolved.is_relative_to(images) and resolved.is_file():
            new.append(resolved.relative_to(out).as_posix())
    if not new:
        return
    previous = _read_manifest(images)
    try:
        _write_manifest(images, sorted(set(previous) | set(new)))
    except OSError:
        pass


def _remove_figures(out: Path, images: Path, stale: Iterable[str]) -> None:
    """Delete the listed figures (paths relative to ``out``) that lie under ``images``, then
    the folders under ``images`` that this left empty."""
    folders = set()
    for relative in stale:
        path = out / relative
        if path.is_symlink() or not path.resolve().is_relative_to(images) or not path.is_file():
            continue
        try:
            path.unlink()
        except OSError:
            continue
        folders.add(path.parent)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        while folder != images and folder.resolve().is_relative_to(images):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
            folder = folder.parent


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# sections


def _display_array(display_images: Any, n: int, size: tuple[int, int]) -> np.ndarray:
    """``display_images`` as an N x H x W x C array: uint8 (0..255) kept as it is, booleans
    as uint8 black and white, floats clipped to [0, 1] (tensors as float32; a warning when
    they go above 1: images on a 0..255 scale); other integer dtypes are refused with a
    ``TypeError`` (see :func:`~captum_ext.viz.overlay.to_uint8_rgb`)."""
    if isinstance(display_images, Tensor):
        shown = display_images.detach().cpu()
        if shown.dim() != 4:
            raise ValueError(
                f"`display_images` must be N x C x H x W (tensor) or N x H x W x C (array), got "
                f"shape {tuple(shown.shape)}."
            )
        if shown.is_floating_point():
            shown = shown.to(torch.float32)  # bfloat16 has no numpy dtype
        array = shown.permute(0, 2, 3, 1).numpy()
    else:
        array = np.asarray(display_images)
        if array.ndim == 3:
            array = array[..., None]
    if array.ndim != 4 or array.shape[0] != n or tuple(array.shape[1:3]) != tuple(size):
        raise ValueError(
            f"`display_images` must hold {n} images of {size[0]} x {size[1]} (the inputs' size), "
            f"got shape {array.shape}."
        )
    array = _image_values(array, "display_images")
    if array.dtype != np.uint8:  # clipped here once: no warning per image when drawn
        array = np.clip(array, 0.0, 1.0)
    return array


def _figure_shape(height: int, width: int) -> tuple[int, int]:
    """The size (H, W) at which an ``height x width`` image is drawn as a figure: shrunk,
    keeping its aspect ratio, so that its longer side is at most ``FIGURE_PIXELS``;
    never enlarged (a small image is drawn at its size, and the page scales it up)."""
    longest = max(height, width)
    if longest <= FIGURE_PIXELS:
        return height, width
    scale = FIGURE_PIXELS / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def _shrunk(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An H x W or H x W x C array resized to ``size`` by area averaging (each pixel the mean
    of the pixels it covers, so values stay within their range and a thin line fades rather
    than vanishing); uint8 stays uint8 (rounded), other arrays come back as float32."""
    values = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    planes = values.permute(2, 0, 1) if values.dim() == 3 else values[None]
    resized = torch.nn.functional.interpolate(planes[None], size=size, mode="area")[0]
    resized = resized.permute(1, 2, 0) if values.dim() == 3 else resized[0]
    out = resized.numpy()
    if array.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out


def _for_figure(image: np.ndarray, *maps: Any) -> tuple[np.ndarray, ...]:
    """``image`` and ``maps`` at the size they are drawn in the report, shrunk together.

    Every section draws its images and maps through here, before overlaying them: an image
    whose longer side is over ``FIGURE_PIXELS`` (the page shows figures
    ``_FIGURE_WIDTH`` CSS pixels wide) is shrunk to it, keeping its aspect ratio, by area
    averaging; smaller ones are returned as they are.

    Args:
        image (numpy.ndarray): one image of :func:`_display_array`, H x W x C, uint8 or float
            in [0, 1].
        maps (numpy.ndarray): H x W maps in [0, 1] (heat maps, or 0 / 1 masks), read as
            :func:`~captum_ext.viz.overlay.overlay` reads them: NaN as 0, values outside
            [0, 1] clipped. Shrunk, a 0 / 1 mask gives the share of each pixel it covers.

    Returns:
        tuple: the image, then each map, all of the same height and width.
    """
    height, width = image.shape[:2]
    size = _figure_shape(height, width)
    if size == (height, width):
        return (image, *maps)
    shrunk_maps = []
    for heat in maps:
        heat = np.asarray(heat, dtype=np.float32)
        if heat.shape != (height, width):
            raise ValueError(
                f"a map is {heat.shape[0]} x {heat.shape[1]} but its image is {height} x {width}."
            )
        heat = np.clip(np.nan_to_num(heat, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        shrunk_maps.append(_shrunk(heat, size))
    return (_shrunk(image, size), *shrunk_maps)


def _model_device(model: Any, images: Tensor) -> torch.device:
    module = root_module(model)
    if module is not None:
        for tensor in module.parameters():
            return tensor.device
        for tensor in module.buffers():
            return tensor.device
    return images.device


def _layer_name(model: Any, layer: Any, module: Any) -> str:
    if isinstance(layer, str):
        return layer
    # a TorchScript layer tap, or the report's token grid: the name of the user's layer
    if isinstance(getattr(module, "layer_name", None), str):
        return module.layer_name
    owner = root_module(model)
    if owner is not None:
        for name, candidate in owner.named_modules():
            if candidate is module:
                return name
    return ""


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`--batch-size` must be a positive int, got {batch_size!r}.")
    return batch_size


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_bar(total: int, description: str, enabled: bool, unit: str = "image"):
    """A tqdm bar over images (or ``unit``) on stderr, a few plain lines when stderr is not a
    terminal (see :func:`captum_ext._utils.training.progress_bar`), or an object that does
    nothing."""
    bar = progress_bar(total, enabled, desc=description, unit=unit)
    return _NoProgress() if bar is None else bar


def _probabilities(model: Callable, x: Tensor) -> Tensor:
    return torch.softmax(_logits(model, x).float(), dim=1)


def _predicted_and_runner_up(model: Callable, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The softmax probabilities, the prediction P and the runner-up Q of ``x``, P and Q
    read from the logits (a confident float32 softmax rounds every other class to 0, so
    ``probabilities.topk(2)`` would name any of them)."""
    logits = _logits(model, x)
    predicted = logits.argmax(dim=1)
    runner_up = runner_up_classes(logits, predicted)
    return torch.softmax(logits.float(), dim=1), predicted, runner_up


def _logits(model: Callable, x: Tensor) -> Tensor:
    """The model's (N, classes) logits of ``x``, with errors that name the likely cause."""
    from captum_ext.data.loading import model_failed_on_images

    with torch.no_grad():
        try:
            logits = model(x)
        except (RuntimeError, ValueError, AssertionError, IndexError) as error:
            raise model_failed_on_images(model, x.shape, error) from None
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"the model must return (N, classes) logits for inputs of shape {tuple(x.shape)}, "
            f"got {got}."
        )
    if logits.shape[1] < 2:
        raise ValueError(
            "the model has a single output; contrastive maps need two classes. A binary "
            "classifier with one logit z has the two-class logits [-z/2, z/2] "
            "(captum_ext.data.two_class_logits; `captum-ext report` reads such a model that way "
            "itself)."
        )
    return logits


def contrastive_section(
    model: Callable,
    layer: Any,
    images: Tensor,
    display_images: Any,
    class_names: Sequence[str] | None,
    out_dir: str | os.PathLike,
    progress: bool = True,
    *,
    labels: Sequence[Any] | Tensor | None = None,
    names: Sequence[str] | None = None,
    batch_size: int = 64,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    title: str = "Contrastive explanations",
) -> Section:
    r"""The section "Why P? Why P, rather than Q? What if not P?" for each image.

    For every image: the prediction P and its probability, the runner-up class Q, and four
    maps at ``layer``, each upsampled to the input size, min-max normalised to [0, 1] and
    drawn over the image:

    - Grad-CAM (:class:`~captum_ext.attr.GradCAM`) for P: "Why P?"
    - :class:`~captum_ext.attr.ContrastCAM` against Q: "Why P, rather than Q?"
    - :class:`~captum_ext.attr.CounterfactualCAM` for P: "What if not P?", the regions
      speaking against P.
    - :class:`~captum_ext.attr.FinerCAM` for P: "What sets P apart from its look-alikes?",
      against the three classes with the closest logits (empty on a prediction so confident
      that their probabilities underflow).

    Maps are computed in batches of ``batch_size`` (one call per method per batch) on the
    model's device; the PNGs go to ``out_dir/images/contrastive/``.

    Args:
        model (Callable): the classifier (``nn.Module``), returning (N, C) logits, in eval mode.
        layer (nn.Module or str): the layer to explain, or its dotted name.
        images (Tensor): N x C x H x W inputs, normalised as the model expects.
        display_images (Tensor or numpy.ndarray): the same images for display, float in
            [0, 1] or uint8 (0..255), N x C x H x W (tensor) or N x H x W x C (array); other
            integer dtypes raise a ``TypeError`` (convert them first).
        class_names (Sequence[str] or None): one name per model output. None: the indices.
        out_dir (str or PathLike): the report folder.
        progress (bool, optional): tqdm progress bar on stderr. Default: True.
        labels (optional): true class per image (indices, or None where unknown), shown in
            the row label. Default: None.
        names (Sequence[str], optional): a name per image (e.g. file names). Default: ``#i``.
        batch_size (int, optional): images per attribution call. Default: 64.
        alpha (float, optional): heat-map opacity in the overlays. Default: 0.5.
        cmap (str, optional): matplotlib colormap of the overlays. Default:
            :data:`~captum_ext.viz.DEFAULT_CMAP` (``"inferno"``).
        title (str, optional): the section title.

    Returns:
        Section: a first row with the colour bar of the maps
        (:func:`~captum_ext.viz.save_colorbar`), then one row per image, five
        figures per row (input and four overlays: Grad-CAM, ContrastCAM,
        CounterfactualCAM, Finer-CAM).
    """

    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`images` must be an N x C x H x W tensor, got {got}.")
    batch_size = _check_batch_size(batch_size)
    _check_overlay_options(alpha, cmap, "contrastive_section()")
    n = images.shape[0]
    shown = _display_array(display_images, n, (images.shape[2], images.shape[3]))
    labels = _check_names_labels(names, labels, n)
    data = compute_contrastive(
        model, layer, images, class_names=class_names, batch_size=batch_size, progress=progress
    )
    return render_contrastive(
        data,
        shown,
        out_dir,
        labels=labels,
        names=names,
        alpha=alpha,
        cmap=cmap,
        title=title,
        progress=progress,
    )


@dataclass(frozen=True)
class ContrastiveMaps:
    """What :func:`compute_contrastive` returns (numbers only; :func:`render_contrastive`
    draws them).

    Attributes:
        probabilities (Tensor): ``N x C`` softmax of the model's outputs (CPU).
        predicted (Tensor): ``N`` predicted classes P.
        runner_up (Tensor): ``N`` runner-up classes Q (second most likely).
        maps (dict[str, numpy.ndarray]): ``"gradcam"``, ``"contrast"``, ``"counterfactual"``
            and ``"finer"`` -> ``N x H x W`` maps upsampled to the input and min-max scaled to
            [0, 1] (a kind left out is not drawn).
        class_names (list[str]): one name per model output.
        layer_name (str): the layer explained ("" when unknown).
        compared (Tensor, optional): ``N x 3`` classes Finer-CAM compared P with (the closest
            logits, ``captum_ext.attr.finer_cam.comparison_classes``). Default: None.
    """

    probabilities: Tensor
    predicted: Tensor
    runner_up: Tensor
    maps: dict[str, np.ndarray]
    class_names: list[str]
    layer_name: str
    compared: Tensor | None = None


#: the maps of the contrastive section, in the order they are drawn
_MAP_KINDS = ("gradcam", "contrast", "counterfactual", "finer")


def compute_contrastive(
    model: Callable,
    layer: Any,
    images: Tensor,
    *,
    class_names: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> ContrastiveMaps:
    r"""The numbers of :func:`contrastive_section`, without drawing: for each image the
    prediction P, the runner-up Q and the maps Grad-CAM(P), ContrastCAM(P vs Q),
    CounterfactualCAM(P) and Finer-CAM(P against the three classes with the closest logits)
    at ``layer``, upsampled and min-max scaled to [0, 1].

    Args:
        model (Callable): the classifier, returning (N, C) logits, in eval mode.
        layer (nn.Module or str): the layer to explain, or its dotted name.
        images (Tensor): N x C x H x W inputs, normalised as the model expects.
        class_names (Sequence[str], optional): one name per output. None: the indices.
        batch_size (int, optional): images per attribution call. Default: 64.
        progress (bool, optional): progress bar on stderr. Default: False.

    Returns:
        :class:`ContrastiveMaps`.
    """
    from captum_ext.attr import ContrastCAM, CounterfactualCAM, FinerCAM, GradCAM
    from captum_ext.attr.finer_cam import comparison_classes

    batch_size = _check_batch_size(batch_size)
    n = images.shape[0]
    module = resolve_layer(model, layer)
    layer_name = _layer_name(model, layer, module)
    device = _model_device(model, images)
    gradcam = GradCAM(model, module)
    contrast_cam = ContrastCAM(model, module)
    counterfactual_cam = CounterfactualCAM(model, module)
    finer_cam = FinerCAM(model, module)
    chunks: dict[str, list[Any]] = {
        k: [] for k in ("probabilities", "predicted", "runner_up", "compared", *_MAP_KINDS)
    }
    with _progress_bar(n, "contrastive maps", progress) as bar:
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size].to(device)
            logits = _logits(model, x)
            probabilities = torch.softmax(logits.float(), dim=1)
            if class_names is None:
                class_names = [str(i) for i in range(probabilities.shape[1])]
            elif len(class_names) != probabilities.shape[1]:
                raise ValueError(
                    f"`class_names` (--classes) has {len(class_names)} names but the model has "
                    f"{probabilities.shape[1]} outputs."
                )
            # from the logits: a confident float32 softmax rounds every other class to 0
            predicted = logits.detach().argmax(dim=1)
            runner_up = runner_up_classes(logits, predicted)
            maps = {
                "gradcam": gradcam.attribute(
                    x, target=predicted, upsample_to_input=True, normalize="minmax"
                ),
                "contrast": contrast_cam.attribute(
                    x, contrast=runner_up, upsample_to_input=True, normalize="minmax"
                ),
                "counterfactual": counterfactual_cam.attribute(
                    x, target=predicted, upsample_to_input=True, normalize="minmax"
                ),
            }
            with warnings.catch_warnings():
                # a map that vanishes on a confident prediction is captioned "empty" below
                warnings.filterwarnings("ignore", message="FinerCAM:", category=RuntimeWarning)
                maps["finer"] = finer_cam.attribute(
                    x, target=predicted, upsample_to_input=True, normalize="minmax"
                )
            for kind, heat in maps.items():
                chunks[kind].append(heat.detach().to("cpu", torch.float32)[:, 0].numpy())
            chunks["probabilities"].append(probabilities.detach().cpu())
            chunks["predicted"].append(predicted.cpu())
            chunks["runner_up"].append(runner_up.cpu())
            chunks["compared"].append(comparison_classes(logits, predicted).cpu())
            bar.update(x.shape[0])
    probabilities = torch.cat(chunks["probabilities"])
    return ContrastiveMaps(
        probabilities=probabilities,
        predicted=torch.cat(chunks["predicted"]),
        runner_up=torch.cat(chunks["runner_up"]),
        maps={k: np.concatenate(chunks[k]) for k in _MAP_KINDS},
        class_names=list(class_names),
        layer_name=layer_name,
        compared=torch.cat(chunks["compared"]),
    )


def render_contrastive(
    data: ContrastiveMaps,
    display_images: Any,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[Any] | None = None,
    names: Sequence[str] | None = None,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    title: str = "Contrastive explanations",
    progress: bool = False,
) -> Section:
    """Draw :func:`compute_contrastive`'s maps over ``display_images`` (N x H x W x C in
    [0, 1], or a tensor) into ``out_dir/images/contrastive/`` and return the Section.

    Images larger than the page shows them are drawn shrunk to at most
    ``FIGURE_PIXELS`` on their longer side. ``progress``: a bar on stderr while the
    figures are drawn. Default: False."""
    _check_overlay_options(alpha, cmap, "render_contrastive()")
    n = data.probabilities.shape[0]
    size = next(iter(data.maps.values())).shape[1:]
    shown = _display_array(display_images, n, (size[0], size[1]))
    class_names = data.class_names
    folder = Path(out_dir) / "images" / "contrastive"
    folder.mkdir(parents=True, exist_ok=True)
    explained_at = f" at layer {data.layer_name}" if data.layer_name else ""
    section = Section(
        title,
        intro=(
            f"For each image: the predicted class P, and {_count_words(data.maps)} "
            f"maps{explained_at}, each "
            "upsampled to the image and scaled to [0, 1] (the colour bar below gives the "
            "scale). "
            "Grad-CAM answers 'Why P?' (evidence for P). "
            "ContrastCAM answers 'Why P, rather than Q?' against the runner-up class Q: the "
            "regions that make the network prefer P over Q. "
            "CounterfactualCAM answers 'What if not P?': the regions that speak against P, "
            "whose removal would make the network more confident in P. "
            + (
                "Finer-CAM answers 'What sets P apart from its look-alikes?' (the three "
                "classes whose logits are closest to P's, weighted by their probabilities); "
                "on a very confident prediction their probabilities underflow and the map is "
                "empty. "
                if "finer" in data.maps
                else ""
            )
            + "A map with no evidence at all is marked 'empty'."
        ),
    )
    colour_bar = save_colorbar(
        folder / "colorbar.png",
        cmap=cmap,
        alpha=alpha,
        label="each map scaled to [0, 1] (as overlaid on the images)",
    )
    section.add_row(
        "Colour scale", [Figure("Colour scale of the maps", colour_bar, _COLORBAR_WIDTH)]
    )
    kinds = [k for k in _MAP_KINDS if k in data.maps]
    with _progress_bar(n, "drawing contrastive figures", progress) as bar:
        for i in range(n):
            p, q = int(data.predicted[i]), int(data.runner_up[i])
            name_p, name_q = class_names[p], class_names[q]
            label = f"{names[i] if names is not None else f'#{i}'}: predicted {name_p} "
            label += f"({float(data.probabilities[i, p]):.1%}), runner-up {name_q} "
            label += f"({float(data.probabilities[i, q]):.1%})"
            true = _true_class(labels, i, class_names)
            if true is not None:
                verdict = "correct" if true == p else "wrong"
                label += f"; true class {class_names[true]} ({verdict})"
            row = section.add_row(label)
            stem = folder / f"{i:05d}"
            image, *heats = _for_figure(shown[i], *(data.maps[kind][i] for kind in kinds))
            row.add_figure("Input", save_png(image, f"{stem}_input.png"))
            captions = {
                "gradcam": f"Grad-CAM: Why {name_p}?",
                "contrast": f"ContrastCAM: Why {name_p}, rather than {name_q}?",
                "counterfactual": f"CounterfactualCAM: What if not {name_p}?",
                "finer": f"Finer-CAM: What sets {name_p} apart from its look-alikes?",
            }
            if data.compared is not None:
                looks = ", ".join(class_names[int(c)] for c in data.compared[i])
                captions["finer"] = f"Finer-CAM: What sets {name_p} apart from {looks}?"
            for kind, heat in zip(kinds, heats, strict=True):
                caption = captions[kind]
                if is_empty_map(data.maps[kind][i]):  # the map itself, not its shrunk picture
                    caption += EMPTY_CAPTION
                picture = overlay(image, heat, alpha=alpha, cmap=cmap)
                row.add_figure(caption, save_png(picture, f"{stem}_{kind}.png"))
            bar.update(1)
    return section


def _count_words(maps: dict[str, Any]) -> str:
    """'three', 'four', ...: how many maps a row shows, for the section's intro."""
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    return words.get(len(maps), str(len(maps)))
