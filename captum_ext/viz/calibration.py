"""The reliability diagram as a figure: accuracy against confidence per bin, with the gap to
the diagonal and the share of predictions in each bin."""

from __future__ import annotations

from typing import Any

import torch

from captum_ext.metrics.calibration import ReliabilityDiagram

__all__ = ["plot_reliability_diagram"]


def plot_reliability_diagram(
    diagram: ReliabilityDiagram,
    *,
    ax: Any = None,
    title: str | None = None,
    show_counts: bool = True,
    color: str = "tab:blue",
) -> Any:
    r"""Draw a :class:`~captum_ext.metrics.ReliabilityDiagram`.

    One bar per non-empty bin, as high as the bin's accuracy and as wide as the bin; the gap
    between the bar and the bin's mean confidence is hatched in red (below the diagonal: the
    model is over-confident there); the dashed diagonal is perfect calibration. With
    ``show_counts``, a strip under the diagram shows the share of predictions in each bin
    (on a log scale, since confident models put nearly all of them in the top bin). The
    title gives the ECE of the diagram
    (:meth:`~captum_ext.metrics.ReliabilityDiagram.calibration_error`).

    Papers: Niculescu-Mizil & Caruana, ICML 2005; Guo, Pleiss, Sun & Weinberger, ICML 2017.

    Args:
        diagram (ReliabilityDiagram): from :func:`captum_ext.metrics.reliability_diagram`.
        ax (matplotlib.axes.Axes, optional): the axes to draw in (the count strip is then
            added as an inset under them); ``None`` makes a new figure. Default: None.
        title (str, optional): text before the ECE in the title, drawn as given (``$`` does
            not start mathtext). Default: None.
        show_counts (bool, optional): draw the share of predictions per bin. Default: True.
        color (str, optional): colour of the accuracy bars. Default: ``"tab:blue"``.

    Returns:
        matplotlib.figure.Figure: the figure drawn in (``ax.figure`` when ``ax`` is given).

    Examples::

        >>> from captum_ext.metrics import reliability_diagram
        >>> from captum_ext.viz import plot_reliability_diagram
        >>> diagram = reliability_diagram(model(images).softmax(dim=1), labels, n_bins=10)
        >>> figure = plot_reliability_diagram(diagram, title="bundled model")
        >>> figure.axes[0].get_title()
        'bundled model, ECE = ...'
    """
    if not isinstance(diagram, ReliabilityDiagram):
        raise TypeError(
            "`diagram` must be a ReliabilityDiagram (from "
            f"captum_ext.metrics.reliability_diagram), got {type(diagram).__name__}."
        )
    if title is not None and not isinstance(title, str):
        raise TypeError(f"`title` must be a string or None, got {type(title).__name__}.")
    if ax is None:
        from captum_ext.viz._figures import new_figure

        figure = new_figure(380, 380 if show_counts else 320)
        ax = figure.add_subplot(1, 1, 1)
    else:
        if not hasattr(ax, "bar") or not hasattr(ax, "figure"):
            raise TypeError(f"`ax` must be a matplotlib Axes or None, got {type(ax).__name__}.")
        figure = ax.figure

    edges = diagram.bin_edges.double().cpu()
    left, width = edges[:-1], edges[1:] - edges[:-1]
    filled = diagram.count.cpu() > 0
    accuracy = diagram.accuracy.cpu()[filled].numpy()
    confidence = diagram.confidence.cpu()[filled].numpy()
    left, width = left[filled].numpy(), width[filled].numpy()

    ax.bar(
        left,
        accuracy,
        width=width,
        align="edge",
        color=color,
        edgecolor="black",
        linewidth=0.5,
        label="accuracy",
    )
    bottom = torch.minimum(torch.from_numpy(accuracy), torch.from_numpy(confidence)).numpy()
    ax.bar(
        left,
        abs(confidence - accuracy),
        bottom=bottom,
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.25,
        edgecolor="tab:red",
        hatch="//",
        linewidth=0.5,
        label="gap to the mean confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=6, framealpha=0.9)
    ece = diagram.calibration_error("l1")
    from captum_ext.viz._figures import literal_text

    # the title is drawn as given ("model_$10 vs model_$20" is not mathtext)
    literal_text(ax.set_title(f"{title + ', ' if title else ''}ECE = {ece:.3f}", fontsize=9))
    if show_counts:
        strip = ax.inset_axes([0.0, -0.42, 1.0, 0.16])
        share = diagram.count.double().cpu() / max(int(diagram.count.sum()), 1)
        strip.bar(
            edges[:-1].numpy(),
            share.numpy(),
            width=(edges[1:] - edges[:-1]).numpy(),
            align="edge",
            color="grey",
        )
        strip.set_xlim(0, 1)
        strip.set_yscale("log")
        strip.set_ylim(min(0.5 / max(int(diagram.count.sum()), 1), 0.1), 1.0)
        strip.set_ylabel("share", fontsize=7)
        strip.tick_params(labelsize=6)
        strip.set_xticklabels([])
    return figure
