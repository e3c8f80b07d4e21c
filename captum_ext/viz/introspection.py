"""The report's introspection section: does the network agree with itself?

:func:`compute_introspection` returns numbers only (testable without matplotlib);
:func:`render_introspection` draws them; :func:`introspection_section` does both
(``captum-ext report --sections introspection``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import _check_images, _check_names_labels, _class_names, _image_name, _true_class

#: how many images of the page get a picture (the disagreements first)
SHOWN_IMAGES = 12


def _display_size(display_images: Any) -> tuple[int, int]:
    """The H x W of ``display_images`` as :func:`~captum_ext.viz.report._display_array`
    reads them (tensor N x C x H x W, array N x H x W [x C])."""
    if isinstance(display_images, Tensor):
        return tuple(display_images.shape[-2:])
    return tuple(np.asarray(display_images).shape[1:3])


@dataclasses.dataclass(frozen=True)
class IntrospectionSummary:
    """Feed-forward and introspective predictions of each image (CPU tensors, ``N``).

    Attributes:
        feed_forward (Tensor): stage 1's predicted classes.
        feed_forward_confidence (Tensor): its softmax probability.
        introspective (Tensor): stage 2's predicted classes.
        introspective_confidence (Tensor): its probability.
        order (Tensor): the images ordered with the disagreements first (then by the
            introspective confidence, lowest first).
        labels (Tensor, optional): the true classes (``-1`` where unknown), when given.
        num_classes (int, optional): the number of classes of the network (what
            ``class_names`` must name). Default: None (not known).
    """

    feed_forward: Tensor
    feed_forward_confidence: Tensor
    introspective: Tensor
    introspective_confidence: Tensor
    order: Tensor
    labels: Tensor | None = None
    num_classes: int | None = None

    @property
    def disagree(self) -> Tensor:
        """Where the two stages predict different classes, ``(N,)`` booleans."""
        return self.feed_forward != self.introspective


def compute_introspection(
    network: Any, images: Tensor, *, labels: Any = None, batch_size: int = 64
) -> IntrospectionSummary:
    """Both predictions of every image, from a fitted
    :class:`~captum_ext.introspection.IntrospectiveNetwork` (its ``model`` is stage 1).

    ``labels``: the true class of each image (None where unknown), one per image, each a
    class index of the network; a ``ValueError`` names what does not fit."""
    from captum_ext._utils.validation import check_int, model_device

    images = _check_images(images)
    batch_size = check_int(batch_size, "batch_size")
    labels = _check_names_labels(None, labels, images.shape[0])
    device = model_device(network.model) if isinstance(network.model, torch.nn.Module) else None
    forward, intro = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        x = x.to(device) if device is not None else x
        with torch.no_grad():
            forward.append(torch.softmax(network.model(x).float(), dim=1).cpu())
        intro.append(network.predict_proba(x).cpu())
    forward_p, intro_p = torch.cat(forward), torch.cat(intro)
    ff_conf, ff = forward_p.max(dim=1)
    in_conf, inn = intro_p.max(dim=1)
    disagree = (ff != inn).double()
    # disagreements first, then the least confident introspective predictions
    order = torch.from_numpy(np.lexsort((in_conf.double().numpy(), -disagree.numpy())))
    num_classes = int(forward_p.shape[1])
    if labels is not None:
        indices = [str(c) for c in range(num_classes)]
        known = [_true_class(labels, i, indices) for i in range(len(labels))]
        labels = torch.as_tensor([-1 if v is None else v for v in known], dtype=torch.int64)
    return IntrospectionSummary(ff, ff_conf, inn, in_conf, order, labels, num_classes)


def _summary_class_names(summary: IntrospectionSummary, class_names: Any) -> list[str]:
    """One name per class of the network (``class_names`` checked against it)."""
    if summary.num_classes is not None:
        return _class_names(class_names, summary.num_classes)
    # a summary built by hand: the names must cover every class it mentions
    used = [summary.feed_forward, summary.introspective]
    if summary.labels is not None:
        used.append(summary.labels)
    largest = max((int(t.max()) for t in used if t.numel()), default=-1)
    if class_names is None:
        return [str(c) for c in range(largest + 1)]
    if len(class_names) <= largest:
        raise ValueError(
            f"`class_names` (--classes) has {len(class_names)} names but the predictions and "
            f"labels go up to class {largest}."
        )
    return [str(name) for name in class_names]


def render_introspection(
    summary: IntrospectionSummary,
    display_images: Any,
    out_dir: str | Path,
    *,
    class_names: Any = None,
    names: Any = None,
    progress: bool = False,
) -> Any:
    """The section of :func:`compute_introspection`'s numbers: a summary table, then the
    first :data:`SHOWN_IMAGES` images in ``summary.order`` with both predictions.

    ``display_images``: the N images for display (N x C x H x W tensor or N x H x W x C array;
    uint8, or float in [0, 1]; drawn at their size, shrunk to at most
    ``FIGURE_PIXELS`` on the longer side when larger);
    ``class_names``: one name per class of the network (None: the indices); ``names``: one
    name per image (None: ``#i``); ``progress``: a bar on stderr while the figures are drawn
    (default: False). A ``ValueError`` names the argument that does not fit."""
    from captum_ext.viz.overlay import save_png
    from captum_ext.viz.report import Section, Table, _display_array, _for_figure, _progress_bar

    n = summary.feed_forward.shape[0]
    shown = _display_array(display_images, n, _display_size(display_images))
    _check_names_labels(names, None, n)
    class_names = _summary_class_names(summary, class_names)

    def name_of(c: Any) -> str:
        return class_names[int(c)]

    disagree = summary.disagree
    table = Table(["", "feed-forward", "introspective"])
    table.add_row(
        [
            "mean confidence",
            f"{summary.feed_forward_confidence.mean():.3f}",
            f"{summary.introspective_confidence.mean():.3f}",
        ]
    )
    known = summary.labels is not None and bool((summary.labels >= 0).any())
    if known:
        keep = summary.labels >= 0
        table.add_row(
            [
                "accuracy (labelled images)",
                f"{(summary.feed_forward[keep] == summary.labels[keep]).double().mean():.3f}",
                f"{(summary.introspective[keep] == summary.labels[keep]).double().mean():.3f}",
            ]
        )
    intro = (
        "Introspective learning (Prabhushankar & AlRegib, NeurIPS 2022): a second stage asks, "
        "for every class Q, how the last layer would have to change if Q were the label, and "
        "predicts from those gradients. The two stages disagree on "
        f"{int(disagree.sum())} of {n} images; they come first below, then the images the "
        "introspective stage is least sure of"
        + (f" (the first {SHOWN_IMAGES} of the {n} are pictured)." if n > SHOWN_IMAGES else ".")
    )
    section = Section("Does the network agree with itself? (introspection)", intro)
    section.add_row("Summary", [], table=table, per_image=False)
    folder = Path(out_dir) / "images" / "introspection"
    folder.mkdir(parents=True, exist_ok=True)
    pictured = summary.order[:SHOWN_IMAGES].tolist()
    with _progress_bar(len(pictured), "drawing introspection figures", progress) as bar:
        for i in pictured:
            label = f"{_image_name(names, i)}: feed-forward "
            label += f"{name_of(summary.feed_forward[i])} "
            label += f"({float(summary.feed_forward_confidence[i]):.1%}), introspective "
            label += f"{name_of(summary.introspective[i])} "
            label += f"({float(summary.introspective_confidence[i]):.1%})"
            if bool(disagree[i]):
                label += "; they disagree"
            if known and int(summary.labels[i]) >= 0:
                label += f"; true class {name_of(summary.labels[i])}"
            row = section.add_row(label)
            (image,) = _for_figure(shown[i])
            row.add_figure("Input", save_png(image, folder / f"{i:05d}_input.png"))
            bar.update(1)
    return section


def introspection_section(
    network: Any,
    images: Tensor,
    display_images: Any,
    class_names: Any,
    out_dir: str | Path,
    *,
    labels: Any = None,
    names: Any = None,
    batch_size: int = 64,
    progress: bool = False,
) -> Any:
    """:func:`compute_introspection` then :func:`render_introspection` (the report section).

    The arguments are checked before anything is computed, as in the other sections:
    ``display_images`` must hold the N images (at any size: thumbnails larger or smaller
    than ``images`` are drawn at their own size, as :func:`render_introspection` draws
    them), ``labels`` and ``names`` one entry per image (``class_names`` is checked against
    the network's number of classes, which its predictions give). ``progress``: a bar on
    stderr while the figures are drawn (default: False)."""
    from captum_ext.viz.report import _check_batch_size, _display_array

    images = _check_images(images)
    n = images.shape[0]
    batch_size = _check_batch_size(batch_size)
    # only N is checked: the section draws the display images, never the inputs, at their size
    shown = _display_array(display_images, n, _display_size(display_images))
    labels = _check_names_labels(names, labels, n)
    summary = compute_introspection(network, images, labels=labels, batch_size=batch_size)
    return render_introspection(
        summary, shown, out_dir, class_names=class_names, names=names, progress=progress
    )
