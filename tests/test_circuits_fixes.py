"""captum_ext.circuits: fixes of the circuit-readout audit.

Gradient readout inside inference mode, stages registered out of run order, comparing
graphs of different stages, MobileNetV2's blocks as stages, exact self-comparison, the class
nodes and literal text of ``draw``, and numpy / tensor edge weights in ``compare``.
"""

from __future__ import annotations

import io
import math
import re

import matplotlib
import networkx as nx
import numpy as np
import pytest
import torch
import torchvision
from _helpers import assert_model_unchanged, model_snapshot
from torch import nn

from captum_ext.bundled import load_bundled_model
from captum_ext.circuits import CircuitReadout, compare, draw, from_json, pathway_graphs, to_json
from captum_ext.data import load_sample_digits

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

torch.set_num_threads(1)


def _weights(graph: nx.DiGraph) -> dict[tuple[str, str], float]:
    return {(u, v): w for u, v, w in graph.edges(data="weight")}


# ---------------------------------------------------------------------------------------
# 1. the gradient readout inside torch.inference_mode()


@pytest.mark.parametrize("gradient", [True, False])
def test_readout_inside_inference_mode_equals_the_one_outside(gradient):
    """Before: "Inference tensors cannot be saved for backward" (the predicted class,
    computed inside the block, was gathered in the backward)."""
    model = load_bundled_model()
    images, _ = load_sample_digits()
    readout = CircuitReadout(model, gradient=gradient)
    expected = readout.readout(images[:3])  # target: the prediction
    before = model_snapshot(model)
    with torch.inference_mode():
        inside = readout.readout(images[:3])
        made_there = images[:3] * 1.0
        assert not torch.is_grad_enabled()
    assert_model_unchanged(model, before)
    with torch.inference_mode():
        both = readout.readout(made_there, target=torch.tensor([1, 2, 3]))
    outside = readout.readout(images[:3], target=torch.tensor([1, 2, 3]))
    assert not torch.is_inference_mode_enabled()
    for got, reference in [*zip(inside, expected, strict=True), *zip(both, outside, strict=True)]:
        assert nx.utils.graphs_equal(got, reference)
        assert _weights(got) == _weights(reference)
        assert got.graph == reference.graph


# ---------------------------------------------------------------------------------------
# 2. a model whose modules are registered in another order than they run


class Swapped(nn.Module):
    """Untraceable (data-dependent branch); conv_b is registered before conv_a but runs
    after it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3)
        self.relu0 = nn.ReLU()
        self.conv_b = nn.Conv2d(4, 4, 3)
        self.relu_b = nn.ReLU()
        self.conv_a = nn.Conv2d(4, 4, 3)
        self.relu_a = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > -1e9:  # torch.fx cannot trace this
            x = self.relu0(self.stem(x))
        x = self.relu_a(self.conv_a(x))
        x = self.relu_b(self.conv_b(x))
        return self.fc(self.pool(x).flatten(1))


class SwappedThree(nn.Module):
    """Untraceable; registered stem, b, a, c, run stem, a, b, c: listing the stages in their
    run order still gives module-order connections through the wrong convolutions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.relu_b = nn.ReLU()
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.relu_a = nn.ReLU()
        self.conv_c = nn.Conv2d(4, 4, 3, padding=1)
        self.relu_c = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > -1e9:
            x = self.relu0(self.stem(x))
        x = self.relu_a(self.conv_a(x))
        x = self.relu_b(self.conv_b(x))
        x = self.relu_c(self.conv_c(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_stages_registered_out_of_run_order_are_refused():
    """Before: stages relu0, relu_b, relu_a (registration order) and a graph whose edges
    into relu_b ran through conv_b from relu0, though conv_b reads relu_a."""
    model = Swapped().eval()
    readout = CircuitReadout(model)
    assert readout.layers == ("relu0", "relu_b", "relu_a")
    assert {c.method for c in readout.connections} == {"module_order"}
    before = model_snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"`layers`: the stages do not run in the order listed\. As registered .*"
        r"\['relu0', 'relu_b', 'relu_a'\]; as run in the forward pass: "
        r"\['relu0', 'relu_a', 'relu_b'\]",
    ):
        readout.readout(torch.randn(1, 3, 12, 12))
    assert_model_unchanged(model, before)


def test_module_order_ingress_that_runs_elsewhere_is_refused():
    model = SwappedThree().eval()
    readout = CircuitReadout(model, layers=["relu0", "relu_a", "relu_b", "relu_c"])
    # module order: the first conv registered after relu0 is conv_b, which reads relu_a
    assert readout.connections[0].ingress == ("conv_b",)
    with pytest.raises(
        ValueError, match=r"from layer 'relu0' to layer 'relu_a'.*'conv_b' does not run between"
    ):
        readout.readout(torch.randn(1, 3, 6, 6))


def test_stages_listed_out_of_run_order_are_refused():
    model = SwappedThree().eval()
    # module order: relu0 -> conv_b -> relu_b -> conv_a -> relu_a, all registered so
    readout = CircuitReadout(model, layers=["relu0", "relu_b", "relu_a"])
    with pytest.raises(
        ValueError,
        match=r"As listed: \['relu0', 'relu_b', 'relu_a'\]; as run in the forward pass: "
        r"\['relu0', 'relu_a', 'relu_b'\]",
    ):
        readout.readout(torch.randn(1, 3, 6, 6))


class InOrder(nn.Module):
    """Untraceable, registered in run order: the module-order graph is right."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if x.sum() > -1e9:
            x = x * 1.0
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_models_in_run_order_read_out_as_before():
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    untraceable = InOrder().eval()
    graphs = CircuitReadout(untraceable).readout(x)
    assert {c.method for c in CircuitReadout(untraceable).connections} == {"module_order"}
    assert all(g.number_of_edges() > 0 for g in graphs)
    # the traced bundled model, and its DataParallel wrapper, are not affected
    model = load_bundled_model()
    images, labels = load_sample_digits()
    for gradient in (False, True):
        plain = CircuitReadout(model, gradient=gradient).readout(images[:2], target=labels[:2])
        wrapped = CircuitReadout(nn.DataParallel(model), gradient=gradient)
        for a, b in zip(plain, wrapped.readout(images[:2], target=labels[:2]), strict=True):
            assert _weights(a) == pytest.approx(_weights(b))


def test_data_parallel_replicas_are_checked_one_device_at_a_time():
    """Replicas run side by side: their hook calls interleave, each device in order."""
    readout = CircuitReadout(load_bundled_model())  # 3 stages, the classifier is index 3
    a, b = torch.device("cuda", 0), torch.device("cuda", 1)
    interleaved = [(a, 0), (b, 0), (b, 1), (a, 1), (b, 2), (a, 2), (a, 3), (b, 3)]
    readout._check_run_order(interleaved)
    swapped = [(a, 0), (b, 0), (b, 2), (a, 1), (b, 1), (a, 2), (a, 3), (b, 3)]
    with pytest.raises(ValueError, match=r"as run in the forward pass: \['features.1', "):
        readout._check_run_order(swapped)
    # a model split over devices (one call per stage): one order across the devices
    readout._check_run_order([(a, 0), (a, 1), (b, 2), (b, 3)])


# ---------------------------------------------------------------------------------------
# 3. compare() refuses graphs of different stages


def _plain():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    ).eval()


def test_compare_refuses_graphs_of_different_stages():
    """Before: a plain number (flow_retained 0.121) for graphs read out at other layers."""
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = _plain()
    (full,) = CircuitReadout(model).readout(x)
    (last,) = CircuitReadout(model, layers=["3"]).readout(x)
    with pytest.raises(
        ValueError,
        match=r"`graph_a` has stages \['1', '3', 'pooled', 'class'\], `graph_b` has "
        r"\['3', 'pooled', 'class'\]",
    ):
        compare(full, last)
    with pytest.raises(ValueError, match="different stages"):
        compare(last, full)
    with pytest.raises(ValueError, match="different stages"):  # also after a JSON round trip
        compare(from_json(to_json(full)), last)
    # same stages, graphs of JSON, graphs without the attribute: as before
    assert compare(full, from_json(to_json(full))).edge_jaccard == 1.0
    bare_a, bare_b = nx.DiGraph(full), nx.DiGraph(last)
    del bare_a.graph["stages"], bare_b.graph["stages"]
    assert 0.0 < compare(bare_a, bare_b).node_jaccard < 1.0
    # a node-only pathway graph of some of the stages against the circuit: documented use
    masks = {"3": torch.ones(1, 12, 4, 4)}
    (pathway,) = pathway_graphs(masks)
    assert compare(full, pathway).node_jaccard > 0
    assert compare(pathway, full).node_jaccard > 0
    with pytest.raises(ValueError, match="different stages"):  # a layer the circuit lacks
        compare(last, pathway_graphs({"1": torch.ones(1, 8, 4, 4)})[0])


# ---------------------------------------------------------------------------------------
# 4. MobileNetV2: its blocks are the stages


def _l1(conv: nn.Conv2d) -> torch.Tensor:
    """(out, in) tap L1 norms, block-diagonal across groups (written independently)."""
    w = conv.weight.detach().abs().flatten(2).sum(2)
    out = torch.zeros(conv.out_channels, conv.in_channels)
    per_out, per_in = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    for g in range(conv.groups):
        rows = slice(g * per_out, (g + 1) * per_out)
        out[rows, g * per_in : (g + 1) * per_in] = w[rows]
    return out


def test_mobilenet_v2_blocks_are_stages_with_composed_inverted_residual_edges():
    """Before: one stage (``features``, 90 nodes); listing the blocks failed with "none of
    its ingress modules ... produces 16 channels"."""
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10, width_mult=0.25)
    model.eval()
    readout = CircuitReadout(model, top_k=1000, edges_per_node=1000)
    assert readout.layers == tuple(f"features.{i}" for i in range(19))
    assert readout.classifier == "classifier.1"
    assert readout.connections[1].paths == (
        ("features.2.conv.0.0", "features.2.conv.1.0", "features.2.conv.2"),
    )
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = model_snapshot(model)
    (graph,) = readout.readout(x)
    assert_model_unchanged(model, before)
    acts = {}
    hooks = [
        model.features[i].register_forward_hook(
            lambda m, a, o, i=i: acts.__setitem__(i, o.detach())
        )
        for i in range(19)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    # a block without residual (features.2: stride 2) and one with (features.3: x + conv(x))
    for index in (2, 3):
        block = model.features[index].conv
        composed = _l1(block[2]) @ _l1(block[1][0]) @ _l1(block[0][0])
        energy = acts[index - 1][0].flatten(1).norm(dim=1)
        edges = [
            (u, v, w)
            for u, v, w in graph.edges(data="weight")
            if v.startswith(f"features.{index}:")
        ]
        assert len(edges) == composed.shape[0] * composed.shape[1]
        for u, v, w in edges:
            s, d = int(u.split(":")[1]), int(v.split(":")[1])
            assert w == pytest.approx(float(composed[d, s] * energy[s]), rel=1e-5)
    # the gradient variant and the default sizes run; explicit blocks work as well
    (default,) = CircuitReadout(model, gradient=True).readout(x)
    assert {layer for _, layer in default.nodes(data="layer")} >= set(readout.layers)
    explicit = CircuitReadout(model, layers=["features.16", "features.17", "features.18"])
    assert explicit.readout(x)[0].number_of_edges() > 0
    # the last block listed must be the one before the classifier
    with pytest.raises(ValueError, match=r"'features.2' to layer 'classifier.1'.*features.3"):
        CircuitReadout(model, layers=["features.0", "features.1", "features.2"])


def test_mobilenet_v2_skipped_blocks_are_refused_by_the_constructor():
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10, width_mult=0.25)
    with pytest.raises(
        ValueError,
        match=r"from layer 'features.1' to layer 'features.3'.*'features.2.conv.0.0'.*"
        "list every convolutional stage in between",
    ):
        CircuitReadout(model.eval(), layers=["features.0", "features.1", "features.3"])


def test_skipped_plain_stage_is_refused_by_the_constructor():
    with pytest.raises(ValueError, match=r"'features.1'.*'features.7'.*features.3"):
        CircuitReadout(load_bundled_model(), layers=["features.1", "features.7"])


def test_a_container_whose_blocks_do_not_connect_stays_one_stage_with_a_warning():
    """EfficientNet's squeeze-and-excitation gate (a product) is not followed."""
    model = torchvision.models.efficientnet_b0(weights=None, num_classes=10).eval()
    with pytest.warns(UserWarning) as record:
        readout = CircuitReadout(model)
    assert readout.layers == ("features",)
    assert len(record) == 1
    assert re.search(
        r"only stage found in EfficientNet is 'features', a container of blocks.*"
        r"'features.0' to layer 'features.1'.*single stage, \['features'\].*"
        r"pass the blocks as `layers` explicitly",
        str(record[0].message),
    )
    assert CircuitReadout(model, layers=["features"]).layers == ("features",)


class _Concat(nn.Module):
    """An Inception-style block: two branches (4 + 4 channels) concatenated."""

    def __init__(self, channels: int):
        super().__init__()
        self.a = nn.Conv2d(channels, 4, 1)
        self.b = nn.Conv2d(channels, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(torch.cat([self.a(x), self.b(x)], 1))


class _ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.features = nn.Sequential(stem, _Concat(8), _Concat(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_a_container_of_concatenating_blocks_stays_one_stage_with_a_warning():
    """No ingress module of a concatenating block produces its channels: the blocks pass
    the structural check but not the readout's channel check, so the default keeps the
    container as one stage (as before blocks were opened) and warns once."""
    torch.manual_seed(0)
    model = _ConcatNet().eval()
    with pytest.warns(UserWarning) as record:
        readout = CircuitReadout(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "'features.0' to layer 'features.1' (8 channels" in message
    assert "['features.1.a', 'features.1.b']" in message
    assert "single stage, ['features']" in message
    assert record[0].filename == __file__
    assert readout.layers == ("features",)
    (graph,) = readout.readout(torch.randn(1, 3, 16, 16))
    assert {layer for _, layer in graph.nodes(data="layer")} >= {"features"}
    assert graph.number_of_edges() > 0


# ---------------------------------------------------------------------------------------
# 5. a graph against itself retains exactly all its flow


def test_flow_retained_of_a_graph_against_itself_is_exactly_one():
    """Before: 1.0000000000000009 and the like for float64 readouts (the kept flow was summed
    in set order, the total in edge order)."""
    model = load_bundled_model().double()
    images, _ = load_sample_digits()
    graphs = CircuitReadout(model).readout(images[:8].double())
    for graph in graphs:
        result = compare(graph, graph)
        assert result.flow_retained == 1.0
        assert set(result.flow_retained_by_layer.values()) == {1.0}
    # one large weight first, many tiny ones after: any other summation order than the
    # edge order gives a kept flow above the total
    graph = nx.DiGraph()
    graph.add_edge("a:0", "b:0", weight=1.0)
    for c in range(1, 1001):
        graph.add_edge(f"a:{c}", "b:0", weight=1e-16)
    assert compare(graph, graph).flow_retained == 1.0
    generator = np.random.default_rng(0)
    for _ in range(20):
        sub = graph.edge_subgraph(
            [e for e in graph.edges if generator.random() < 0.9] + [("a:0", "b:0")]
        )
        assert compare(graph, sub).flow_retained <= 1.0


# ---------------------------------------------------------------------------------------
# 6. draw: target and prediction always drawn; text drawn literally


def test_draw_keeps_target_and_prediction_with_one_node_per_layer():
    """Before: with max_nodes_per_layer=1, target 3 and prediction 0, only class 3."""
    graph = nx.DiGraph(target=3, prediction=0, stages=["h", "class"])
    graph.add_node("h:0", layer="h", channel=0, energy=1.0)
    for c in range(5):
        graph.add_node(f"class:{c}", layer="class", channel=c, energy=1.0 - 0.1 * c)
        graph.add_edge("h:0", f"class:{c}", weight=1.0, kind="class")
    ax = draw(graph, max_nodes_per_layer=1)
    classes = sorted(int(t.get_text()) for t in ax.texts if t.xy[0] == 1)
    assert classes == [0, 3]
    plt.close(ax.figure)
    # the bundled model's readout with a target other than its prediction
    model = load_bundled_model()
    images, _ = load_sample_digits()
    (real,) = CircuitReadout(model).readout(images[:1], target=3)
    assert real.graph["prediction"] != 3
    ax = draw(real, max_nodes_per_layer=1)
    column = len(real.graph["stages"]) - 1
    drawn = sorted(int(t.get_text()) for t in ax.texts if t.xy[0] == column)
    assert drawn == sorted({3, real.graph["prediction"]})
    plt.close(ax.figure)


def test_draw_writes_layer_names_and_title_literally():
    """Before: a layer named ``conv$\\x$`` failed at savefig (ParseFatalException)."""
    name = "conv$\\x$"
    graph = nx.DiGraph(stages=[name, "class"], target="$\\y$", prediction=0)
    graph.add_node(f"{name}:0", layer=name, channel=0, energy=1.0)
    graph.add_node("class:0", layer="class", channel=0, energy=1.0)
    graph.add_edge(f"{name}:0", "class:0", weight=1.0, kind="class")
    ax = draw(graph)
    ax.figure.savefig(io.BytesIO(), format="png")
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels] == [name, "class"]
    assert not any(t.get_parse_math() for t in [*labels, ax.title])
    assert "$\\y$" in ax.get_title()
    plt.close(ax.figure)


# ---------------------------------------------------------------------------------------
# 7. compare() takes numpy and 0-d tensor weights


def _graph(weights) -> nx.DiGraph:
    graph = nx.DiGraph()
    for i, w in enumerate(weights):
        graph.add_node(f"a:{i}", layer="a")
        graph.add_node("b:0", layer="b")
        graph.add_edge(f"a:{i}", "b:0", weight=w)
    return graph


@pytest.mark.parametrize(
    "convert",
    [np.float32, np.float64, np.int64, torch.tensor, lambda w: torch.tensor(w).double()],
    ids=["np.float32", "np.float64", "np.int64", "tensor", "tensor64"],
)
def test_compare_takes_numpy_and_tensor_weights(convert):
    """Before: "has weight 1.0; circuit edges need a finite non-negative weight"."""
    plain = _graph([1.0, 2.0, 4.0])
    other = _graph([convert(w) for w in (1.0, 2.0, 4.0)])
    expected = compare(plain, _graph([1.0, 2.0]))
    result = compare(other, _graph([1.0, 2.0]))
    assert result.flow_a == expected.flow_a
    assert result.flow_retained == expected.flow_retained
    assert isinstance(result.flow_a, float)
    assert compare(other, other).flow_retained == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        -1.0,
        math.inf,
        np.float32("nan"),
        np.float32(-0.5),
        torch.tensor(float("inf")),
        torch.tensor([0.5]),
        True,
        np.bool_(True),
        "1.0",
        None,
    ],
    ids=repr,
)
def test_compare_still_refuses_weights_that_are_not_finite_non_negative_reals(bad):
    with pytest.raises(ValueError, match="circuit edges need a finite non-negative `weight`"):
        compare(_graph([bad]), _graph([1.0]))
