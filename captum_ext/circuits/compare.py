"""Comparing two circuit graphs, and saving them as JSON."""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import torch


@dataclass(frozen=True)
class CircuitComparison:
    """What two circuits share; see :func:`compare` for the definitions.

    Attributes:
        shared_nodes (list of str): nodes in both graphs, sorted.
        node_jaccard (float): ``|V_a & V_b| / |V_a | V_b|`` over the nodes of the stages
            both graphs were read out at (``node_layers``): a pathway graph, which has no
            ``"pooled"`` or ``"class"`` nodes, is not penalised for the readout's.
        shared_edges (list of (str, str)): edges in both graphs, sorted.
        edge_jaccard (float): ``|E_a & E_b| / |E_a | E_b|``.
        flow_a (float): total edge weight of ``graph_a``.
        flow_b (float): total edge weight of ``graph_b``.
        flow_retained (float): share of ``graph_a``'s flow carried by edges ``graph_b`` also
            has; NaN when ``graph_a`` has no edges (a node-only graph, such as a pathway's)
            and, with a RuntimeWarning, when all its edges weigh 0.
        flow_retained_by_layer (dict[str, float]): the same, per destination layer
            (NaN, with a RuntimeWarning, for a layer whose edges in ``graph_a`` all weigh 0).
        node_layers (list of str): the layers ``node_jaccard`` ran over, sorted (every
            layer of either graph's nodes where both are compared whole).
    """

    shared_nodes: list[str]
    node_jaccard: float
    shared_edges: list[tuple[str, str]]
    edge_jaccard: float
    flow_a: float
    flow_b: float
    flow_retained: float
    flow_retained_by_layer: dict[str, float] = field(default_factory=dict)
    node_layers: list[str] = field(default_factory=list)


def _real(value) -> float | None:
    """``value`` as a Python float when it is a real number: a Python or numpy int / float,
    or a 0-d tensor or array of a real dtype (not a bool); None otherwise."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value)
    if isinstance(value, np.ndarray):
        if value.ndim != 0 or value.dtype.kind not in "iuf":
            return None
        return float(value)
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _weights(graph, argument: str) -> list[tuple[object, object, float]]:
    """The graph's edges ``(u, v, weight)`` in edge order, the weights as Python floats;
    a ``ValueError`` names the first edge whose weight is not a finite non-negative real."""
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(
            f"`{argument}` must be a networkx.DiGraph (from CircuitReadout.readout), got "
            f"{type(graph).__name__}."
        )
    edges = []
    for u, v, data in graph.edges(data=True):
        weight = data.get("weight")
        value = _real(weight)
        if value is None or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"`{argument}`: edge {u!r} -> {v!r} has weight {weight!r}; circuit edges need a "
                "finite non-negative `weight` attribute."
            )
        edges.append((u, v, value))
    return edges


def _check_stages(graph_a: nx.DiGraph, graph_b: nx.DiGraph) -> None:
    """Refuse graphs read out at different stages (their ``stages`` attributes differ).

    Graphs without the attribute (built by hand) are not checked. A node-only graph (no
    edges, e.g. from :func:`pathway_graphs`) may be compared with a circuit whose stages
    include all of its own: its node keys then mean the same channels.
    """
    if "stages" not in graph_a.graph or "stages" not in graph_b.graph:
        return
    stages_a, stages_b = list(graph_a.graph["stages"]), list(graph_b.graph["stages"])
    if stages_a == stages_b:
        return
    for small, large, other in (
        (graph_a, stages_b, graph_b),
        (graph_b, stages_a, graph_a),
    ):
        if (
            small.number_of_edges() == 0
            and other.number_of_edges() > 0
            and set(small.graph["stages"]) <= set(large)
        ):
            return
    raise ValueError(
        f"`graph_a` and `graph_b` come from different stages: `graph_a` has stages "
        f"{stages_a}, `graph_b` has {stages_b}; compare circuits read out at the same stages "
        "(the same `layers` of the same model), where their node and edge keys mean the same "
        "channels and connections."
    )


def _jaccard(a: set, b: set) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def _node_layer(graph: nx.DiGraph, node) -> str:
    """A node's ``layer`` attribute as text (``""`` for a hand-made node without one)."""
    return str(graph.nodes[node].get("layer", ""))


def _nodes_on_shared_stages(graph_a: nx.DiGraph, graph_b: nx.DiGraph) -> tuple[set, set, list[str]]:
    """The nodes of each graph on the stages both graphs were read out at (their ``stages``
    attributes), and the layers compared (sorted).

    Where a graph lacks the attribute, or the stages are the same, every node of each graph
    (and every layer of either). A readout circuit's stages include ``"pooled"`` and
    ``"class"``; a node-only pathway graph's are its layers alone.
    """
    nodes_a, nodes_b = set(graph_a.nodes), set(graph_b.nodes)
    layers = {_node_layer(graph_a, n) for n in nodes_a} | {_node_layer(graph_b, n) for n in nodes_b}
    if "stages" not in graph_a.graph or "stages" not in graph_b.graph:
        return nodes_a, nodes_b, sorted(layers)
    shared = {str(s) for s in graph_a.graph["stages"]} & {str(s) for s in graph_b.graph["stages"]}
    if shared >= layers:
        return nodes_a, nodes_b, sorted(layers)
    nodes_a = {node for node in nodes_a if _node_layer(graph_a, node) in shared}
    nodes_b = {node for node in nodes_b if _node_layer(graph_b, node) in shared}
    return nodes_a, nodes_b, sorted(shared)


def compare(graph_a: nx.DiGraph, graph_b: nx.DiGraph) -> CircuitComparison:
    r"""How much of circuit ``graph_a`` circuit ``graph_b`` uses (e.g. x against its mask).

    Nodes and edges are matched by their keys (``"<layer>:<channel>"``), so both graphs
    must come from the same model and layers: graphs whose ``stages`` attributes differ
    (read out at different ``layers``) are refused with a ``ValueError`` naming both lists.
    Graphs without that attribute (built by hand) are not checked, and a node-only graph
    (:func:`pathway_graphs`') may be compared with a circuit whose stages include its own.
    Edge weights may be any finite non-negative real number (Python, numpy, or a 0-d tensor).
    With ``w_a(e)`` the ``weight`` of edge ``e`` in ``graph_a``:

    - ``node_jaccard = |V_a & V_b| / |V_a | V_b|``, where ``V_a`` and ``V_b`` hold the
      nodes whose ``layer`` is one of the stages both graphs were read out at (their
      ``stages`` attributes; ``node_layers``). Graphs of the same stages, and graphs
      without the attribute, are compared over all their nodes; a node-only pathway graph
      (:func:`pathway_graphs`, whose stages are its layers) against a readout circuit
      (whose stages add ``"pooled"`` and ``"class"``) over the pathway's stages, so a
      pathway holding exactly the readout's channels of those stages scores 1.0;
    - ``edge_jaccard = |E_a & E_b| / |E_a | E_b|`` over all edges (0.0 when only one graph
      has edges, such as a node-only graph against a readout circuit). Both are 1.0 when the
      two sets are empty;
    - ``flow_a = sum_{e in E_a} w_a(e)``, ``flow_b`` likewise;
    - ``flow_retained = sum_{e in E_a & E_b} w_a(e) / flow_a``: the share of ``graph_a``'s
      flow that runs through connections ``graph_b`` also uses, in [0, 1] (both sums run in
      ``graph_a``'s edge order, so a graph against itself gives exactly 1.0). It is not
      symmetric. NaN
      when ``flow_a`` is 0: silently when ``graph_a`` has no edges (node-only graphs such as
      ``pathway_graphs``' are compared by ``node_jaccard``), with a RuntimeWarning when
      it has edges that all weigh 0.
    - ``flow_retained_by_layer[l]``: the same restricted to edges whose destination node has
      ``layer`` attribute ``l`` (``"class"`` for feature-to-class edges), because edge
      weights of different stages have different scales (NaN, with a RuntimeWarning, for a
      layer whose edges in ``graph_a`` all weigh 0).

    From "Minimalist Explanation Generation and Circuit Discovery" (Suhail, Anand, Sethi,
    arXiv 2509.25686), where the circuit of a minimal explanation is compared with that of
    the full image.

    Args:
        graph_a (networkx.DiGraph): the reference circuit (e.g. of the image x).
        graph_b (networkx.DiGraph): the circuit compared with it (e.g. of m * x).

    Returns:
        CircuitComparison

    Examples::

        >>> from captum_ext.circuits import CircuitReadout, compare
        >>> readout = CircuitReadout(model)  # the bundled digit model
        >>> image = x[:1]
        >>> mask = torch.zeros_like(image); mask[..., 7:21, 7:21] = 1  # keep the centre
        >>> result = compare(readout.readout(image)[0], readout.readout(mask * image)[0])
        >>> 0.0 < result.edge_jaccard < 1.0, 0.0 < result.flow_retained < 1.0
        (True, True)
        >>> sorted(result.flow_retained_by_layer)
        ['class', 'features.4', 'features.7', 'pooled']
        >>> same = compare(readout.readout(image)[0], readout.readout(image)[0])
        >>> same.edge_jaccard, same.flow_retained  # a circuit against itself
        (1.0, 1.0)
    """
    weights_a = _weights(graph_a, "graph_a")
    weights_b = _weights(graph_b, "graph_b")
    _check_stages(graph_a, graph_b)
    nodes_a, nodes_b = set(graph_a.nodes), set(graph_b.nodes)
    compared_a, compared_b, node_layers = _nodes_on_shared_stages(graph_a, graph_b)
    edges_a, edges_b = set(graph_a.edges), set(graph_b.edges)
    shared_edges = edges_a & edges_b
    flow_b = float(sum(w for _, _, w in weights_b))
    # the flow and its kept part summed in the same (edge) order: the kept share of a
    # graph against itself is exactly 1, and never above 1 (each partial sum of the kept
    # weights is at most the same partial sum of all weights, also after rounding)
    flow_a = kept = 0.0
    by_layer_total: dict[str, float] = {}
    by_layer_kept: dict[str, float] = {}
    for u, v, w in weights_a:
        layer = str(graph_a.nodes[v].get("layer", ""))
        flow_a += w
        by_layer_total[layer] = by_layer_total.get(layer, 0.0) + w
        if (u, v) in shared_edges:
            kept += w
            by_layer_kept[layer] = by_layer_kept.get(layer, 0.0) + w
    by_layer = {
        layer: (by_layer_kept.get(layer, 0.0) / total if total > 0 else math.nan)
        for layer, total in by_layer_total.items()
    }
    if flow_a <= 0 and edges_a:
        warnings.warn(
            "compare: the edges of `graph_a` all weigh 0, so it has no flow for `graph_b` to "
            "retain; flow_retained is nan.",
            RuntimeWarning,
            stacklevel=2,
        )
    elif flow_a > 0:
        empty_layers = sorted(layer for layer, total in by_layer_total.items() if total <= 0)
        if empty_layers:
            warnings.warn(
                f"compare: in `graph_a` the edges into layer(s) {empty_layers} all weigh 0, so "
                "they have no flow to retain; their flow_retained_by_layer is nan.",
                RuntimeWarning,
                stacklevel=2,
            )
    return CircuitComparison(
        shared_nodes=sorted(nodes_a & nodes_b, key=str),
        node_jaccard=_jaccard(compared_a, compared_b),
        shared_edges=sorted(shared_edges, key=lambda e: (str(e[0]), str(e[1]))),
        edge_jaccard=_jaccard(edges_a, edges_b),
        flow_a=flow_a,
        flow_b=flow_b,
        flow_retained=kept / flow_a if flow_a > 0 else math.nan,
        flow_retained_by_layer=by_layer,
        node_layers=node_layers,
    )


def to_json(graph: nx.DiGraph, path: str | os.PathLike | None = None) -> str:
    """A circuit graph as JSON text (networkx node-link format, edges under ``"edges"``).

    Args:
        graph (networkx.DiGraph): a graph from :meth:`CircuitReadout.readout`.
        path (str or PathLike, optional): also write the text to this file (UTF-8).

    Returns:
        str: the JSON text; :func:`from_json` turns it back into an equal graph.

    Examples::

        >>> import networkx as nx
        >>> from captum_ext.circuits import CircuitReadout, from_json, to_json
        >>> graph = CircuitReadout(model).readout(x[:1])[0]
        >>> text = to_json(graph, "circuit.json")  # also writes the file
        >>> nx.utils.graphs_equal(from_json(text), graph)
        True
        >>> nx.utils.graphs_equal(from_json("circuit.json"), graph)
        True
    """
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"`graph` must be a networkx.DiGraph, got {type(graph).__name__}.")
    try:
        text = json.dumps(nx.node_link_data(graph, edges="edges"))
    except TypeError as error:
        raise TypeError(f"`graph` holds attributes that JSON cannot store: {error}") from None
    if path is not None:  # atomically: a full disk must not truncate an earlier good file
        from captum_ext._utils.training import atomic_path

        with atomic_path(path) as temp:
            temp.write_text(text, encoding="utf-8")
    return text


def from_json(source: str | os.PathLike) -> nx.DiGraph:
    """Read a circuit graph written by :func:`to_json`.

    Args:
        source (str or PathLike): the JSON text, or the path of a file holding it.

    Returns:
        networkx.DiGraph: nodes, edges and all attributes as they were saved.
    """
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and not source.lstrip().startswith("{")
    ):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"`source` is neither JSON text nor an existing file: {source!s}.")
        source = path.read_text(encoding="utf-8")
    if not isinstance(source, str):
        raise TypeError(f"`source` must be JSON text or a path, got {type(source).__name__}.")
    try:
        data = json.loads(source)
    except json.JSONDecodeError as error:
        raise ValueError(f"`source` is not valid JSON: {error}") from None
    if not isinstance(data, dict) or "nodes" not in data:
        raise ValueError("`source` is not a node-link graph (no 'nodes' key).")
    edges = "edges" if "edges" in data else "links"
    return nx.node_link_graph(data, directed=True, multigraph=False, edges=edges)
