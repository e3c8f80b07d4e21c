"""compare: node_jaccard runs over the layers both graphs have, so a node-only pathway graph
is not penalised for a readout circuit's "pooled" and "class" nodes."""

from __future__ import annotations

import networkx as nx
import pytest

from captum_ext.circuits import CircuitReadout, compare, pathway_graphs


def _node_only_copy(graph: nx.DiGraph, layers: set[str]) -> nx.DiGraph:
    """The nodes of ``graph`` on ``layers``, without edges (as pathway_graphs builds them)."""
    copy = nx.DiGraph()
    for node, data in graph.nodes(data=True):
        if data["layer"] in layers:
            copy.add_node(node, **data)
    copy.graph["stages"] = sorted(layers)
    return copy


def test_node_only_graph_of_the_readout_channels_scores_one(bundled_model, bundled_digits):
    images, _ = bundled_digits
    readout = CircuitReadout(bundled_model).readout(images[:1])[0]
    stages = {d["layer"] for _, d in readout.nodes(data=True)} - {"pooled", "class"}
    assert stages and readout.number_of_nodes() > sum(
        d["layer"] in stages for _, d in readout.nodes(data=True)
    )
    same_channels = _node_only_copy(readout, stages)
    for a, b in ((same_channels, readout), (readout, same_channels)):
        result = compare(a, b)
        assert result.node_jaccard == 1.0
        assert result.node_layers == sorted(stages)
        assert result.edge_jaccard == 0.0  # only one graph has edges


def test_node_jaccard_equals_the_hand_jaccard_on_shared_layers(bundled_model, bundled_digits):
    from captum_ext.attr import PathwayGradient

    images, _ = bundled_digits
    result = PathwayGradient(bundled_model).attribute(images[:1], sparsity=0.9, return_pathway=True)
    pathway = pathway_graphs(result)[0]
    readout = CircuitReadout(bundled_model).readout(images[:1])[0]
    pathway_layers = {d["layer"] for _, d in pathway.nodes(data=True)}
    readout_layers = {d["layer"] for _, d in readout.nodes(data=True)}
    shared = pathway_layers & readout_layers
    assert shared and readout_layers - shared == {"pooled", "class"}
    on_shared = [
        {v for v, d in graph.nodes(data=True) if d["layer"] in shared}
        for graph in (pathway, readout)
    ]
    by_hand = len(on_shared[0] & on_shared[1]) / len(on_shared[0] | on_shared[1])
    comparison = compare(pathway, readout)
    assert comparison.node_jaccard == pytest.approx(by_hand, abs=0)
    assert comparison.node_layers == sorted(shared)
    # shared_nodes still lists every node both graphs hold
    assert comparison.shared_nodes == sorted(set(pathway.nodes) & set(readout.nodes))


def test_hand_graphs_with_and_without_stages():
    a = nx.DiGraph()
    a.add_nodes_from([("x:0", {"layer": "x"}), ("x:1", {"layer": "x"}), ("y:0", {"layer": "y"})])
    b = nx.DiGraph()
    b.add_nodes_from([("x:0", {"layer": "x"})])
    # no stages attribute: every node ({x:0} of {x:0, x:1, y:0})
    assert compare(a, b).node_jaccard == pytest.approx(1 / 3)
    assert compare(a, b).node_layers == ["x", "y"]
    # the same stages, one graph without a node on "y": still every node (a layer a graph
    # leaves empty is not dropped from the other)
    a.graph["stages"] = b.graph["stages"] = ["x", "y"]
    assert compare(a, b).node_jaccard == pytest.approx(1 / 3)
    # b, node-only, read out at "x" alone against a circuit (with edges): only "x" is
    # compared ({x:0} of {x:0, x:1})
    a.add_edge("x:0", "y:0", weight=1.0)
    b.graph["stages"] = ["x"]
    assert compare(a, b).node_jaccard == pytest.approx(1 / 2)
    assert compare(a, b).node_layers == ["x"]
    plain = nx.DiGraph()
    plain.add_edge("p", "q", weight=1.0)
    other = nx.DiGraph()
    other.add_edge("p", "r", weight=1.0)
    assert compare(plain, other).node_jaccard == pytest.approx(1 / 3)  # no layer attribute
