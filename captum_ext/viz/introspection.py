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

#: how many images of the page get a picture (the disagreements first)
SHOWN_IMAGES = 12


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
        labels (Tensor, optional): the true classes, when known.
    """

    feed_forward: Tensor
    feed_forward_confidence: Tensor
    introspective: Tensor
    introspective_confidence: Tensor
    order: Tensor
    labels: Tensor | None = None

    @property
    def disagree(self) -> Tensor:
        """Where the two stages predict different classes, ``(N,)`` booleans."""
        return self.feed_forward != self.introspective


def compute_introspection(
    network: Any, images: Tensor, *, labels: Any = None, batch_size: int = 64
) -> IntrospectionSummary:
    """Both predictions of every image, from a fitted
    :class:`~captum_ext.introspection.IntrospectiveNetwork` (its ``model`` is stage 1)."""
    from captum_ext._utils.validation import check_int, model_device

    batch_size = check_int(batch_size, "batch_size")
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
    if labels is not None:
        labels = torch.as_tensor([-1 if v is None else int(v) for v in labels])
    return IntrospectionSummary(ff, ff_conf, inn, in_conf, order, labels)


def render_introspection(
    summary: IntrospectionSummary,
    display_images: Any,
    out_dir: str | Path,
    *,
    class_names: Any = None,
    names: Any = None,
) -> Any:
    """The section of :func:`compute_introspection`'s numbers: a summary table, then the
    first :data:`SHOWN_IMAGES` images in ``summary.order`` with both predictions."""
    from captum_ext.viz.overlay import save_png
    from captum_ext.viz.report import Section, Table, _display_array

    n = summary.feed_forward.shape[0]
    size = (
        tuple(display_images.shape[-2:])
        if isinstance(display_images, Tensor)
        else tuple(np.asarray(display_images).shape[1:3])
    )
    shown = _display_array(display_images, n, size)
    name_of = (lambda c: str(c)) if class_names is None else (lambda c: class_names[int(c)])
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
    for i in summary.order[:SHOWN_IMAGES].tolist():
        label = f"{names[i] if names is not None else f'#{i}'}: feed-forward "
        label += f"{name_of(summary.feed_forward[i])} "
        label += f"({float(summary.feed_forward_confidence[i]):.1%}), introspective "
        label += f"{name_of(summary.introspective[i])} "
        label += f"({float(summary.introspective_confidence[i]):.1%})"
        if bool(disagree[i]):
            label += "; they disagree"
        if known and int(summary.labels[i]) >= 0:
            label += f"; true class {name_of(summary.labels[i])}"
        row = section.add_row(label)
        row.add_figure("Input", save_png(shown[i], folder / f"{i:05d}_input.png"))
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
) -> Any:
    """:func:`compute_introspection` then :func:`render_introspection` (the report section)."""
    summary = compute_introspection(network, images, labels=labels, batch_size=batch_size)
    return render_introspection(
        summary, display_images, out_dir, class_names=class_names, names=names
    )
