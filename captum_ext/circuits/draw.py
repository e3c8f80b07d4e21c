"""Layered plot of a circuit graph (needs matplotlib, the ``viz`` extra)."""

from __future__ import annotations

from typing import Any

import networkx as nx

from captum_ext._utils.validation import check_int, check_number

#: Edge colours by ``kind``.
EDGE_COLORS = {"weight_activation": "tab:blue", "gradient": "tab:orange", "class": "tab:green"}


def _stage_order(graph: nx.DiGraph) -> list[str]:
    stages = graph.graph.get("stages")
    layers = {data.get("layer") for _, data in graph.nodes(data=True)}
    if isinstance(stages, list) and layers <= set(stages):
        return [s for s in stages if s in layers]
    by_stage: dict[str, int] = {}
    for _, data in graph.nodes(data=True):
        by_stage.setdefault(data.get("layer"), data.get("stage", len(by_stage)))
    return sorted(by_stage, key=lambda layer: by_stage[layer])


#: Default number of channels drawn per layer: the strongest by energy.
MAX_NODES_PER_LAYER = 8

#: Legend text of the edge kinds.
_KIND_LABELS = {
    "weight_activation": "weight x activation",
    "gradient": "gradient x activation",
    "class": "into a class logit",
}


def _kept_nodes(graph: nx.DiGraph, layer: str, limit: int | None) -> tuple[list, int]:
    """The nodes of ``layer`` drawn (strongest first) and the layer's node count.

    In the class layer the target and the predicted class are always kept, also where that
    makes more than ``limit`` nodes (``limit=1`` with a prediction other than the target)."""
    nodes = [(n, d) for n, d in graph.nodes(data=True) if d["layer"] == layer]
    nodes.sort(key=lambda item: (-float(item[1]["energy"]), item[1].get("channel", 0)))
    if limit is None or len(nodes) <= limit:
        return nodes, len(nodes)
    if layer != "class":
        return nodes[:limit], len(nodes)
    wanted = {graph.graph.get("target"), graph.graph.get("prediction")}
    always = {n for n, d in nodes if d.get("channel") in wanted}
    others = [n for n, _ in nodes if n not in always][: max(limit - len(always), 0)]
    drawn = always | set(others)
    return [item for item in nodes if item[0] in drawn], len(nodes)


def _literal(*texts: Any) -> None:
    """Have matplotlib draw the texts as given, not as mathtext / TeX (a layer named
    ``"conv$x$"``). ``captum_ext.viz._figures.literal_text`` does the same for the figures
    of ``viz``, which the circuits package (a lower import layer) may not import."""
    for text in texts:
        text.set_parse_math(False)
        text.set_usetex(False)


def draw(
    graph: nx.DiGraph,
    ax: Any = None,
    *,
    max_nodes_per_layer: int | None = MAX_NODES_PER_LAYER,
    max_edge_width: float = 3.0,
    max_node_size: float = 80.0,
    label_classes: bool = True,
    label_channels: bool = True,
    legend: bool = True,
):
    r"""Plot a circuit graph in layers: one column per stage, strongest nodes on top.

    Only the ``max_nodes_per_layer`` strongest channels of each layer (by energy) are drawn,
    with the edges between them; the x-axis label says how many were left out (for the
    bundled digit CNN, 8 of 16-48 channels per layer, 130 nodes in the full graph). In the
    class layer the target and the predicted class are always drawn, also where that makes
    one more class than ``max_nodes_per_layer`` (1, with a prediction other than the target).

    Node ``(layer, channel)`` is drawn in its layer's column at a height given by its energy
    rank within the layer (y axis "rank by energy": the channel with the highest energy at
    the top); its area is proportional to its energy divided by the largest energy of the
    layer. Edge width is proportional to the edge's weight divided by the largest weight
    among the drawn edges into the same layer (weights of different stages have different
    scales); colour by ``kind`` (blue ``weight_activation``, orange ``gradient``, green
    ``class``). Nodes are labelled with their channel (class nodes with the class index)
    where the labels fit (at least about 9 points between neighbouring nodes). A legend
    explains the colours and sizes. Layer names, labels and the title are drawn as given
    (a ``$`` in a layer name is not read as mathtext).

    Args:
        graph (networkx.DiGraph): a graph from :meth:`CircuitReadout.readout` (or
            :func:`from_json`): nodes with ``layer``, ``channel`` and ``energy``, edges with
            ``weight`` and ``kind``.
        ax (matplotlib.axes.Axes, optional): where to draw. Default: a new figure.
        max_nodes_per_layer (int or None, optional): how many channels (the strongest by
            energy) to draw per layer; ``None`` draws all. Default: 8
        max_edge_width (float, optional): line width of the strongest edge per layer.
            Default: 3.0
        max_node_size (float, optional): marker area of the strongest node per layer.
            Default: 80.0
        label_classes (bool, optional): write the class index next to class nodes.
            Default: True
        label_channels (bool, optional): write the channel number next to the other nodes,
            where it fits. Default: True
        legend (bool, optional): add the legend of edge colours and node sizes.
            Default: True

    Returns:
        matplotlib.axes.Axes: the axes drawn on.

    Examples::

        >>> import matplotlib.pyplot as plt
        >>> from captum_ext.circuits import CircuitReadout, draw
        >>> readout = CircuitReadout(model)  # the bundled digit model
        >>> image = x[:1]
        >>> mask = torch.zeros_like(image); mask[..., 7:21, 7:21] = 1
        >>> graph_x = readout.readout(image)[0]
        >>> graph_mask = readout.readout(mask * image)[0]
        >>> fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
        >>> ax = draw(graph_x, ax=left)
        >>> ax = draw(graph_mask, ax=right, max_nodes_per_layer=None)  # every channel
        >>> ax is right
        True
        >>> plt.close(fig)
    """
    try:
        import matplotlib.pyplot as plt
        from matplotlib.collections import LineCollection
        from matplotlib.lines import Line2D
    except ImportError:
        raise ImportError("draw() needs matplotlib: pip install 'captum-ext[viz]'") from None
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"`graph` must be a networkx.DiGraph, got {type(graph).__name__}.")
    max_edge_width = check_number(max_edge_width, "max_edge_width")
    max_node_size = check_number(max_node_size, "max_node_size")
    if max_nodes_per_layer is not None:
        max_nodes_per_layer = check_int(max_nodes_per_layer, "max_nodes_per_layer")
    for node, data in graph.nodes(data=True):
        if "layer" not in data or "energy" not in data:
            raise ValueError(
                f"`graph`: node {node!r} lacks the `layer` / `energy` attributes of a circuit."
            )
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    elif not isinstance(ax, plt.Axes):
        raise TypeError(f"`ax` must be a matplotlib Axes or None, got {type(ax).__name__}.")

    order = _stage_order(graph)
    columns = [_kept_nodes(graph, layer, max_nodes_per_layer) for layer in order]
    most = max((len(kept) for kept, _ in columns), default=0)
    # vertical room per node, in points, to decide whether channel labels fit
    height_pt = ax.get_position().height * ax.figure.get_figheight() * 72.0
    fontsize = 7
    labels_fit = most <= 1 or 0.85 * height_pt / (most - 1) >= 1.3 * fontsize
    position: dict[Any, tuple[float, float]] = {}
    for column, (layer, (nodes, _)) in enumerate(zip(order, columns, strict=True)):
        top = max((float(d["energy"]) for _, d in nodes), default=0.0)
        count = len(nodes)
        xs, ys, sizes = [], [], []
        for rank, (node, data) in enumerate(nodes):
            y = 1.0 - rank / (count - 1) if count > 1 else 0.5
            position[node] = (float(column), y)
            xs.append(float(column))
            ys.append(y)
            share = float(data["energy"]) / top if top > 0 else 0.0
            sizes.append(4.0 + max_node_size * share)
            wanted = label_classes if layer == "class" else label_channels
            if wanted and (labels_fit or layer == "class"):
                label = ax.annotate(
                    str(data.get("channel", node)),
                    (column, y),
                    xytext=(6, 0),
                    textcoords="offset points",
                    fontsize=fontsize,
                    va="center",
                    zorder=4,
                )
                _literal(label)
        ax.scatter(xs, ys, s=sizes, color="0.25", zorder=3)

    strongest: dict[str, float] = {}
    for u, v, w in graph.edges(data="weight", default=0.0):
        if u in position and v in position:
            layer = graph.nodes[v]["layer"]
            strongest[layer] = max(strongest.get(layer, 0.0), float(w))
    segments, widths, colors, kinds = [], [], [], set()
    for u, v, data in graph.edges(data=True):
        if u not in position or v not in position:
            continue
        top = strongest.get(graph.nodes[v]["layer"], 0.0)
        share = float(data.get("weight", 0.0)) / top if top > 0 else 0.0
        segments.append([position[u], position[v]])
        widths.append(0.2 + max_edge_width * share)
        colors.append(EDGE_COLORS.get(data.get("kind"), "0.5"))
        kinds.add(data.get("kind"))
    if segments:
        ax.add_collection(
            LineCollection(segments, linewidths=widths, colors=colors, alpha=0.6, zorder=2)
        )
    ax.set_xticks(range(len(order)))
    # layer names and the title are drawn as given, never read as mathtext
    _literal(*ax.set_xticklabels(order, rotation=30, ha="right", fontsize=8))
    ax.set_yticks([])
    # a little room at the right for the labels of the last column
    ax.set_xlim(-0.5, max(len(order), 1) - 0.5 + 0.3)
    ax.set_ylim(-0.08, 1.08)
    total = graph.number_of_nodes()
    shown = len(position)
    if shown < total:
        note = (
            f"layer\n(top {max_nodes_per_layer} channels per layer by energy; "
            f"{shown} of {total} nodes drawn)"
        )
    else:
        note = f"layer\n(all {total} nodes)"
    ax.set_xlabel(note, fontsize=8)
    ax.set_ylabel("rank by energy (highest at top)", fontsize=8)
    _literal(
        ax.set_title(
            f"circuit (target {graph.graph.get('target', '?')}, "
            f"prediction {graph.graph.get('prediction', '?')})"
        )
    )
    if legend:
        handles = [
            Line2D([], [], color=EDGE_COLORS[kind], lw=2, label=_KIND_LABELS[kind])
            for kind in EDGE_COLORS
            if kind in kinds
        ]
        handles.append(
            Line2D([], [], color="0.5", lw=2, label="edge width: weight\n(vs layer's strongest)")
        )
        handles.append(
            Line2D(
                [], [], ls="", marker="o", color="0.25", label="node size: energy\n(vs layer's top)"
            )
        )
        # outside the axes, at the right: clear of the nodes and their labels
        ax.legend(
            handles=handles,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
            frameon=False,
        )
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return ax
