"""Layered plot of a circuit graph (needs matplotlib, the ``viz`` extra)."""

from __future__ import annotations

from typing import Any

import networkx as nx

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


def draw(
    graph: nx.DiGraph,
    ax: Any = None,
    *,
    max_edge_width: float = 3.0,
    max_node_size: float = 80.0,
    label_classes: bool = True,
):
    r"""Plot a circuit graph in layers: one column per stage, strongest nodes on top.

    Node ``(layer, channel)`` is drawn in its layer's column at a height given by its energy
    rank within the layer; its area is proportional to its energy divided by the largest
    energy of the layer. Edge width is proportional to the edge's weight divided by the
    largest weight among the edges into the same layer (weights of different stages have
    different scales); colour by ``kind`` (blue ``weight_activation``, orange ``gradient``,
    green ``class``). Class nodes are labelled with their index.

    Args:
        graph (networkx.DiGraph): a graph from :meth:`CircuitReadout.readout` (or
            :func:`from_json`): nodes with ``layer``, ``channel`` and ``energy``, edges with
            ``weight`` and ``kind``.
        ax (matplotlib.axes.Axes, optional): where to draw. Default: a new figure.
        max_edge_width (float, optional): line width of the strongest edge per layer.
            Default: 3.0
        max_node_size (float, optional): marker area of the strongest node per layer.
            Default: 80.0
        label_classes (bool, optional): write the class index next to class nodes.
            Default: True

    Returns:
        matplotlib.axes.Axes: the axes drawn on.

    Examples::

        >>> import matplotlib.pyplot as plt
        >>> fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
        >>> draw(graph_x, ax=left); draw(graph_mask, ax=right)
    """
    try:
        import matplotlib.pyplot as plt
        from matplotlib.collections import LineCollection
    except ImportError:
        raise ImportError("draw() needs matplotlib: pip install 'captum-ext[viz]'") from None
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"`graph` must be a networkx.DiGraph, got {type(graph).__name__}.")
    for name, value in (("max_edge_width", max_edge_width), ("max_node_size", max_node_size)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
    for node, data in graph.nodes(data=True):
        if "layer" not in data or "energy" not in data:
            raise ValueError(
                f"`graph`: node {node!r} lacks the `layer` / `energy` attributes of a circuit."
            )
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 5))

    order = _stage_order(graph)
    position: dict[Any, tuple[float, float]] = {}
    for column, layer in enumerate(order):
        nodes = [(n, d) for n, d in graph.nodes(data=True) if d["layer"] == layer]
        nodes.sort(key=lambda item: (-float(item[1]["energy"]), item[1].get("channel", 0)))
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
            if label_classes and layer == "class":
                ax.annotate(
                    str(data.get("channel", node)),
                    (column, y),
                    xytext=(5, 0),
                    textcoords="offset points",
                    fontsize=7,
                    va="center",
                )
        ax.scatter(xs, ys, s=sizes, color="0.25", zorder=3)

    strongest: dict[str, float] = {}
    for _, v, w in graph.edges(data="weight", default=0.0):
        layer = graph.nodes[v]["layer"]
        strongest[layer] = max(strongest.get(layer, 0.0), float(w))
    segments, widths, colors = [], [], []
    for u, v, data in graph.edges(data=True):
        if u not in position or v not in position:
            continue
        top = strongest.get(graph.nodes[v]["layer"], 0.0)
        share = float(data.get("weight", 0.0)) / top if top > 0 else 0.0
        segments.append([position[u], position[v]])
        widths.append(0.2 + max_edge_width * share)
        colors.append(EDGE_COLORS.get(data.get("kind"), "0.5"))
    if segments:
        ax.add_collection(
            LineCollection(segments, linewidths=widths, colors=colors, alpha=0.6, zorder=2)
        )
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=30, ha="right")
    ax.set_yticks([])
    ax.set_xlim(-0.5, max(len(order), 1) - 0.5)
    ax.set_ylim(-0.08, 1.08)
    ax.set_ylabel("rank by energy")
    ax.set_title(
        f"circuit (target {graph.graph.get('target', '?')}, "
        f"prediction {graph.graph.get('prediction', '?')})"
    )
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return ax
