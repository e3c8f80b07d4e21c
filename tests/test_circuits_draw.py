"""captum_ext.circuits.draw: a readable default plot (issue 19)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from captum_ext.bundled import load_bundled_model
from captum_ext.circuits import CircuitReadout, draw  # noqa: E402
from captum_ext.circuits.draw import MAX_NODES_PER_LAYER  # noqa: E402
from captum_ext.data import load_sample_digits  # noqa: E402


@pytest.fixture(scope="module")
def bundled_graph():
    model = load_bundled_model()
    images, labels = load_sample_digits()
    (graph,) = CircuitReadout(model).readout(images[:1], target=int(labels[0]))
    return graph


def _points_per_layer(ax) -> list[int]:
    return [len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)]


def _overlapping_texts(ax) -> list[tuple[str, str]]:
    fig = ax.figure
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in ax.texts if t.get_visible() and t.get_text()]
    texts += [t for t in ax.get_xticklabels() if t.get_text()]
    texts += [ax.xaxis.label, ax.yaxis.label, ax.title]
    legend = ax.get_legend()
    if legend is not None:
        texts += list(legend.get_texts())
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    clashes = []
    page = fig.bbox
    for name, box in boxes:  # nothing cut off at the figure's edges
        if box.x0 < page.x0 - 1 or box.x1 > page.x1 + 1 or box.y0 < page.y0 - 1:
            clashes.append((name, "figure edge"))
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            if box_a.overlaps(box_b):
                clashes.append((a, b))
    return clashes


def _report_axes():
    # the figure the minimal-mask report section draws on (captum_ext.viz.masks)
    figure = Figure(figsize=(6.0, 4.0), dpi=80, layout="constrained")
    return figure.subplots()


def test_default_draws_at_most_the_documented_nodes_per_layer(bundled_graph):
    assert bundled_graph.number_of_nodes() == 130
    ax = draw(bundled_graph, ax=_report_axes())
    counts = _points_per_layer(ax)
    assert len(counts) == 5
    assert max(counts) <= MAX_NODES_PER_LAYER == 8
    # the layers have 16, 24, 32, 48 and 10 nodes: all keep 8
    assert counts == [8, 8, 8, 8, 8]
    # only edges between drawn nodes
    (edges,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    drawn = sum(
        1
        for u, v in bundled_graph.edges
        if u in _drawn_nodes(bundled_graph) and v in _drawn_nodes(bundled_graph)
    )
    assert len(edges.get_segments()) == drawn
    # the caption says what was left out
    assert "top 8 channels per layer by energy" in ax.get_xlabel()
    assert "40 of 130 nodes" in ax.get_xlabel()
    # the target and the prediction are among the drawn class nodes
    class_labels = {t.get_text() for t in ax.texts if t.xy[0] == 4}
    assert str(bundled_graph.graph["target"]) in class_labels
    assert str(bundled_graph.graph["prediction"]) in class_labels


def _drawn_nodes(graph) -> set:
    kept = set()
    for layer in graph.graph["stages"]:
        nodes = [(n, d) for n, d in graph.nodes(data=True) if d["layer"] == layer]
        nodes.sort(key=lambda item: (-item[1]["energy"], item[1]["channel"]))
        kept |= {n for n, _ in nodes[:8]}
    target = f"class:{graph.graph['target']}"
    if target in graph:
        kept.add(target)
    return kept


def test_all_nodes_on_request(bundled_graph):
    fig, ax = plt.subplots()
    draw(bundled_graph, ax=ax, max_nodes_per_layer=None)
    assert _points_per_layer(ax) == [16, 24, 32, 48, 10]
    assert "all 130 nodes" in ax.get_xlabel()
    plt.close(fig)
    with pytest.raises(ValueError, match="`max_nodes_per_layer`"):
        draw(bundled_graph, max_nodes_per_layer=0)
    with pytest.raises(ValueError, match="`max_nodes_per_layer`"):
        draw(bundled_graph, max_nodes_per_layer=2.5)


def test_legend_and_axis_labels(bundled_graph):
    ax = draw(bundled_graph, ax=_report_axes())
    assert ax.get_ylabel() == "rank by energy (highest at top)"
    assert ax.get_xlabel().startswith("layer")
    assert [t.get_text() for t in ax.get_xticklabels()] == bundled_graph.graph["stages"]
    legend = ax.get_legend()
    assert legend is not None
    entries = " ".join(t.get_text() for t in legend.get_texts())
    for words in ("weight x activation", "class logit", "edge width", "node size: energy"):
        assert words in entries
    # channel numbers are written next to the nodes when they fit
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == 40 and all(label.isdigit() for label in labels)


@pytest.mark.parametrize("size", [(6.0, 4.0), (10.0, 5.0)])
def test_labels_do_not_overlap(bundled_graph, size):
    figure = Figure(figsize=size, dpi=80, layout="constrained")
    ax = draw(bundled_graph, ax=figure.subplots())
    assert _overlapping_texts(ax) == []


def test_channel_labels_left_out_where_they_do_not_fit(bundled_graph):
    figure = Figure(figsize=(6.0, 4.0), dpi=80, layout="constrained")
    ax = draw(bundled_graph, ax=figure.subplots(), max_nodes_per_layer=None)
    # 48 channels in 4 inches do not fit: only the class nodes are labelled
    assert len(ax.texts) == 10
    assert _overlapping_texts(ax) == []


def test_target_and_prediction_classes_always_drawn():
    import networkx as nx

    graph = nx.DiGraph(target=9, prediction=8, stages=["h", "class"])
    for c in range(5):
        graph.add_node(f"h:{c}", layer="h", channel=c, energy=10.0 - c)
    for c in range(10):
        graph.add_node(f"class:{c}", layer="class", channel=c, energy=10.0 - c)
        graph.add_edge(f"h:{c % 5}", f"class:{c}", weight=1.0, kind="class")
    ax = draw(graph, max_nodes_per_layer=3)
    assert _points_per_layer(ax) == [3, 3]
    classes = sorted(int(t.get_text()) for t in ax.texts if t.xy[0] == 1)
    assert classes == [0, 8, 9]  # the strongest, the prediction and the target
    assert "6 of 15 nodes" in ax.get_xlabel()
    assert _overlapping_texts(ax) == []
    plt.close(ax.figure)
