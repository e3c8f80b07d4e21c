"""captum_ext.circuits: channel-level circuit readout, comparison, JSON and drawing."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter

import matplotlib
import networkx as nx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from torch import nn

from captum_ext.bundled import load_bundled_model
from captum_ext.circuits import (
    CircuitComparison,
    CircuitReadout,
    compare,
    draw,
    from_json,
    to_json,
)
from captum_ext.circuits.connection import find_connections
from captum_ext.data import load_sample_digits

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# tiny models


class TwoConv(nn.Module):
    """conv1 (1 -> 2, 1x1) -> ReLU -> conv2 (2 -> 3, 3x3) -> ReLU -> global mean -> fc."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 1, bias=False)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(3, num_classes, bias=False)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(x)))


def hand_model() -> TwoConv:
    """TwoConv with weights written by hand (float64)."""
    model = TwoConv().double().eval()
    w2 = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    w2[0, 0, 1, 1], w2[0, 0, 0, 0] = 1.0, 0.5  # L1 = 1.5
    w2[0, 1, 1, 1] = -2.0  # L1 = 2
    w2[1, 0, 1, 1] = 0.25  # L1 = 0.25; w2[1, 1] = 0 -> L1 = 0
    w2[2, 0, 1, 1], w2[2, 0, 0, 0] = -1.0, 1.0  # L1 = 2
    w2[2, 1, 1, 1] = 3.0  # L1 = 3
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor([1.0, -1.0], dtype=torch.float64).view(2, 1, 1, 1))
        model.conv2.weight.copy_(w2)
        model.fc.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]))
    return model


# input: A1_0 = relu(x) = [[1, 0], [3, 0]] (energy sqrt(10)); A1_1 = relu(-x) = [[0, 2], [0, 0]] (2)
HAND_INPUT = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]], dtype=torch.float64)


def reference_forward(model: TwoConv, x):
    """The model written with functional ops (an independent computation)."""
    a1 = F.relu(F.conv2d(x, model.conv1.weight))
    a2 = F.relu(F.conv2d(a1, model.conv2.weight, padding=1))
    h = a2.mean(dim=(2, 3))
    return a1, a2, h, h @ model.fc.weight.T


def edge_weights(graph: nx.DiGraph) -> dict[tuple[str, str], float]:
    return {(u, v): w for u, v, w in graph.edges(data="weight")}


# ---------------------------------------------------------------------------------------
# edge weights


def test_default_stages_of_two_conv_model():
    readout = CircuitReadout(hand_model())
    assert readout.layers == ("relu1", "relu2")
    assert readout.classifier == "fc"
    assert [c.ingress for c in readout.connections] == [("conv2",), ()]
    assert readout.stages == ("relu1", "relu2", "pooled", "class")


def test_edge_weights_equal_hand_computation():
    model = hand_model()
    (graph,) = CircuitReadout(model).readout(HAND_INPUT)
    root10 = math.sqrt(10.0)
    assert graph.nodes["relu1:0"]["energy"] == pytest.approx(root10)
    assert graph.nodes["relu1:1"]["energy"] == pytest.approx(2.0)
    weights = edge_weights(graph)
    stage_edges = {e: w for e, w in weights.items() if e[0].startswith("relu1")}
    expected = {
        ("relu1:0", "relu2:0"): 1.5 * root10,
        ("relu1:1", "relu2:0"): 2.0 * 2.0,
        ("relu1:0", "relu2:1"): 0.25 * root10,  # relu1:1 -> relu2:1 has weight 0: no edge
        ("relu1:0", "relu2:2"): 2.0 * root10,
        ("relu1:1", "relu2:2"): 3.0 * 2.0,
    }
    assert stage_edges.keys() == expected.keys()
    for edge, value in expected.items():
        assert stage_edges[edge] == pytest.approx(value, rel=1e-12)
        assert graph.edges[edge]["kind"] == "weight_activation"

    # pooled feature j is tied to relu2 channel j with weight E_j; classes: |W[c, j]| |h_j|
    with torch.no_grad():
        _, a2, h, logits = reference_forward(model, HAND_INPUT)
    energy2 = a2[0].flatten(1).norm(dim=1)
    fc = model.fc.weight.detach()
    for j in range(3):
        assert graph.nodes[f"relu2:{j}"]["energy"] == pytest.approx(float(energy2[j]))
        assert graph.nodes[f"pooled:{j}"]["energy"] == pytest.approx(abs(float(h[0, j])))
        if energy2[j] > 0:
            assert weights[(f"relu2:{j}", f"pooled:{j}")] == pytest.approx(float(energy2[j]))
            assert graph.edges[f"relu2:{j}", f"pooled:{j}"]["kind"] == "weight_activation"
        for c in range(2):
            value = abs(float(fc[c, j])) * abs(float(h[0, j]))
            edge = (f"pooled:{j}", f"class:{c}")
            if value > 0:
                assert weights[edge] == pytest.approx(value, rel=1e-12)
                assert graph.edges[edge]["kind"] == "class"
            else:
                assert edge not in weights
    assert graph.number_of_nodes() == 2 + 3 + 3 + 2
    probabilities = logits.softmax(dim=1)[0]
    assert graph.nodes["class:0"]["energy"] == pytest.approx(float(probabilities[0]))
    assert graph.graph["prediction"] == int(logits.argmax())
    assert graph.graph["target"] == int(logits.argmax())


def test_top_k_and_edges_per_node_keep_the_strongest():
    (graph,) = CircuitReadout(hand_model(), top_k=[1, 3, 3], edges_per_node=1).readout(HAND_INPUT)
    # relu1: channel 0 has the larger energy (sqrt(10) > 2)
    assert [n for n, d in graph.nodes(data=True) if d["layer"] == "relu1"] == ["relu1:0"]
    (graph,) = CircuitReadout(hand_model(), edges_per_node=1).readout(HAND_INPUT)
    incoming = {v: u for u, v in graph.edges if v.startswith("relu2")}
    # relu2:0: 1.5 sqrt(10) = 4.74 > 4; relu2:2: 2 sqrt(10) = 6.32 > 6
    assert incoming == {"relu2:0": "relu1:0", "relu2:1": "relu1:0", "relu2:2": "relu1:0"}


def test_target_is_always_among_the_class_nodes():
    model = load_bundled_model()
    images, _ = load_sample_digits()
    x = images[::10]
    with torch.no_grad():
        logits = model(x)
    least = logits.argmin(dim=1)
    readout = CircuitReadout(model, top_classes=2, edges_per_class=1)
    for graph, cls, logit in zip(readout.readout(x, target=least), least, logits, strict=True):
        classes = sorted(d["channel"] for _, d in graph.nodes(data=True) if d["layer"] == "class")
        assert len(classes) == 2
        assert int(cls) in classes and int(logit.argmax()) in classes
        assert graph.graph["target"] == int(cls)
        assert all(graph.in_degree(f"class:{c}") <= 1 for c in classes)


def test_gradient_variant_matches_autograd():
    torch.manual_seed(3)
    model = TwoConv(num_classes=4).double().eval()
    x = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    target = [2, 0, 3]
    graphs = CircuitReadout(model, gradient=True).readout(x, target=target)

    a1, a2, h, logits = reference_forward(model, x)
    a2 = a2.detach().requires_grad_(True)
    h = a2.mean(dim=(2, 3))
    logits = h @ model.fc.weight.detach().T
    chosen = logits.gather(1, torch.tensor(target).unsqueeze(1)).sum()
    grad_a2, grad_h = torch.autograd.grad(chosen, [a2, h])
    a1, a2, grad_a2, grad_h, h = a1.detach(), a2.detach(), grad_a2, grad_h, h.detach()
    l1 = model.conv2.weight.detach().abs().sum(dim=(2, 3))  # (3, 2)
    fc = model.fc.weight.detach().abs()
    for b, graph in enumerate(graphs):
        e1 = a1[b].flatten(1).norm(dim=1)
        e2 = a2[b].detach().flatten(1).norm(dim=1)
        g2 = grad_a2[b].flatten(1).norm(dim=1)
        expected = {}
        for d in range(3):
            for s in range(2):
                expected[(f"relu1:{s}", f"relu2:{d}")] = float(l1[d, s] * e1[s] * g2[d])
            expected[(f"relu2:{d}", f"pooled:{d}")] = float(e2[d] * grad_h[b, d].abs())
            for c in range(4):
                factor = grad_h[b, d].abs() if c == target[b] else fc[c, d]
                expected[(f"pooled:{d}", f"class:{c}")] = float(factor * h[b, d].abs())
        expected = {e: w for e, w in expected.items() if w > 0}
        # edges_per_class = 3 of the 3 pooled features, edges_per_node = 4 >= 2 sources
        got = edge_weights(graph)
        assert got.keys() == expected.keys()
        for edge, value in expected.items():
            assert got[edge] == pytest.approx(value, rel=1e-10)
        kinds = Counter(kind for _, _, kind in graph.edges(data="kind"))
        assert set(kinds) <= {"gradient", "class"}
        assert graph.graph["target"] == target[b] and graph.graph["gradient"] is True
        assert graph.nodes["relu2:1"]["gradient"] == pytest.approx(float(g2[1]))


def test_gradient_variant_under_no_grad_and_frozen_parameters():
    model = hand_model()
    for p in model.parameters():
        p.requires_grad_(False)
    before = model_snapshot(model)
    with torch.no_grad():
        (graph,) = CircuitReadout(model, gradient=True).readout(HAND_INPUT, target=1)
        assert not torch.is_grad_enabled()
    (reference,) = CircuitReadout(model, gradient=True).readout(HAND_INPUT, target=1)
    assert edge_weights(graph) == pytest.approx(edge_weights(reference))
    assert_model_unchanged(model, before)


def test_batch_gives_the_graphs_of_the_examples_one_by_one():
    model = load_bundled_model()
    images, labels = load_sample_digits()
    x, y = images[::10], labels[::10]
    for gradient in (False, True):
        readout = CircuitReadout(model, gradient=gradient)
        batch = readout.readout(x, target=y)
        assert isinstance(batch, list) and len(batch) == len(x)
        for i in range(len(x)):
            (single,) = readout.readout(x[i : i + 1], target=int(y[i]))
            assert set(single.nodes) == set(batch[i].nodes)
            assert set(single.edges) == set(batch[i].edges)
            a, b = edge_weights(single), edge_weights(batch[i])
            for edge in a:
                assert a[edge] == pytest.approx(b[edge], rel=1e-4)


# ---------------------------------------------------------------------------------------
# discovered stages and node counts


def layer_counts(graph: nx.DiGraph) -> dict[str, int]:
    return dict(Counter(layer for _, layer in graph.nodes(data="layer")))


def test_bundled_model_graph_has_documented_node_count():
    model = load_bundled_model()
    images, labels = load_sample_digits()
    readout = CircuitReadout(model)
    assert readout.layers == ("features.1", "features.4", "features.7")
    assert [c.ingress for c in readout.connections] == [("features.3",), ("features.6",), ()]
    graphs = readout.readout(images[:3], target=labels[:3])
    for graph, label in zip(graphs, labels[:3].tolist(), strict=True):
        assert graph.number_of_nodes() == 130
        assert layer_counts(graph) == {
            "features.1": 16,
            "features.4": 24,
            "features.7": 32,
            "pooled": 48,
            "class": 10,
        }
        for node, layer in graph.nodes(data="layer"):
            limit = 3 if layer == "class" else 4
            assert graph.in_degree(node) <= limit
        assert f"class:{label}" in graph
        for u, v, data in graph.edges(data=True):
            assert data["weight"] > 0
            assert graph.nodes[v]["stage"] == graph.nodes[u]["stage"] + 1
            if data["kind"] == "class":
                assert graph.nodes[v]["layer"] == "class"
        # tied edges join the same channel
        for u, v in graph.edges:
            if v.startswith("pooled:"):
                assert u == "features.7:" + v.split(":")[1]


def test_resnet18_graph_has_documented_node_count():
    model = torchvision.models.resnet18(weights=None).eval()
    readout = CircuitReadout(model)
    assert readout.layers == ("maxpool", "layer1", "layer2", "layer3", "layer4")
    expected_ingress = [
        ("layer1.0.conv1",),
        ("layer2.0.conv1", "layer2.0.downsample.0"),
        ("layer3.0.conv1", "layer3.0.downsample.0"),
        ("layer4.0.conv1", "layer4.0.downsample.0"),
        (),
    ]
    assert [c.ingress for c in readout.connections] == expected_ingress
    assert {c.method for c in readout.connections} == {"fx"}
    by_order = find_connections(model, list(readout.layers), "fc", use_fx=False)
    assert [c.ingress for c in by_order] == expected_ingress
    assert {c.method for c in by_order} == {"module_order"}

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = model_snapshot(model)
    for graph in readout.readout(x):
        assert graph.number_of_nodes() == 186
        assert layer_counts(graph) == {
            "maxpool": 24,
            "layer1": 24,
            "layer2": 24,
            "layer3": 24,
            "layer4": 32,
            "pooled": 48,
            "class": 10,
        }
    assert_model_unchanged(model, before)

    # layer2 edges: (|W_conv1[d, s]|_1 + |W_down[d, s]|_1) * E_s, checked for one edge
    (graph,) = CircuitReadout(model, top_k=64, edges_per_node=64).readout(x[:1])
    acts = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda m, a, o, name=name: acts.__setitem__(name, o.detach())
        )
        for name in ("layer1", "layer2")
    ]
    with torch.no_grad():
        model(x[:1])
    for hook in hooks:
        hook.remove()
    l1 = model.layer2[0].conv1.weight.detach().abs().sum(dim=(2, 3)) + model.layer2[0].downsample[
        0
    ].weight.detach().abs().sum(dim=(2, 3))
    energy = acts["layer1"][0].flatten(1).norm(dim=1)
    edges = [(u, v, w) for u, v, w in graph.edges(data="weight") if v.startswith("layer2:")]
    assert edges
    for u, v, w in edges[:20]:
        s, d = int(u.split(":")[1]), int(v.split(":")[1])
        assert w == pytest.approx(float(l1[d, s] * energy[s]), rel=1e-4)


def test_bottleneck_stage_uses_its_downsample_conv():
    model = torchvision.models.resnet50(weights=None).eval()
    readout = CircuitReadout(model, top_k=[64, 256, 24, 24, 32, 48], edges_per_node=64)
    # layer1.0.conv1 (64 -> 64) does not produce layer1's 256 channels: only downsample does
    assert readout.connections[0].ingress == ("layer1.0.conv1", "layer1.0.downsample.0")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    (graph,) = readout.readout(x)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    energy = stem[0].flatten(1).norm(dim=1)
    l1 = model.layer1[0].downsample[0].weight.detach().abs().sum(dim=(2, 3))
    edges = [(u, v, w) for u, v, w in graph.edges(data="weight") if v.startswith("layer1:")]
    assert len(edges) > 100
    for u, v, w in edges:
        s, d = int(u.split(":")[1]), int(v.split(":")[1])
        assert w == pytest.approx(float(l1[d, s] * energy[s]), rel=1e-4)


def test_data_parallel_wrapper_gives_the_same_graphs():
    model = load_bundled_model()
    images, labels = load_sample_digits()
    wrapped = nn.DataParallel(model)  # on CPU a pass-through; names are the inner model's
    for gradient in (False, True):
        plain = CircuitReadout(model, gradient=gradient).readout(images[:2], target=labels[:2])
        readout = CircuitReadout(wrapped, layers=[model.features[4], "features.7"])
        assert readout.layers == ("features.4", "features.7")
        readout = CircuitReadout(wrapped, gradient=gradient)
        assert readout.layers == ("features.1", "features.4", "features.7")
        for a, b in zip(plain, readout.readout(images[:2], target=labels[:2]), strict=True):
            assert edge_weights(a) == pytest.approx(edge_weights(b))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_untraceable_model_uses_module_order():
    torch.manual_seed(0)
    model = Untraceable().eval()
    readout = CircuitReadout(model)
    assert readout.layers == ("act1", "act2")
    assert [(c.ingress, c.method) for c in readout.connections] == [
        (("conv2",), "module_order"),
        ((), "module_order"),
    ]
    (graph,) = readout.readout(torch.randn(1, 3, 5, 5))
    assert layer_counts(graph) == {"act1": 4, "act2": 6, "pooled": 6, "class": 3}


def test_in_place_relu_residual_block_and_mlp_head():
    model = make_tiny_cnn()
    readout = CircuitReadout(model, gradient=True)
    # stem post-activation (in-place ReLU) before the residual block; MLP head: h is 16-d
    assert readout.layers == ("features.2", "features.3")
    assert [c.ingress for c in readout.connections] == [("features.3.conv",), ("head.1",)]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = model_snapshot(model)
    graphs = readout.readout(x)
    assert_model_unchanged(model, before)
    for graph in graphs:
        assert layer_counts(graph) == {"features.2": 8, "features.3": 8, "pooled": 16, "class": 5}
        # head.1 (a Linear 8 -> 16) connects features.3 to the pooled features
        w = model.head[1].weight.detach().abs()
        assert any(v.startswith("pooled:") for _, v in graph.edges)
        for u, v in graph.edges:
            if v.startswith("pooled:"):
                s, d = int(u.split(":")[1]), int(v.split(":")[1])
                assert w[d, s] > 0


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_stage_followed_by_in_place_relu_keeps_its_own_output():
    torch.manual_seed(2)
    model = InPlace().double().eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    a1 = model.conv1(x).detach()
    a2 = model.conv2(F.relu(a1)).detach().requires_grad_(True)
    logits = model.fc(F.relu(a2).mean(dim=(2, 3)))
    target = logits.argmax(dim=1)
    (grad2,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), [a2])
    for gradient in (False, True):
        readout = CircuitReadout(model, layers=["conv1", "conv2"], gradient=gradient)
        assert [c.ingress for c in readout.connections] == [("conv2",), ()]
        graphs = readout.readout(x)
        for b, graph in enumerate(graphs):
            for c in range(3):  # the pre-activation map, negatives included
                expected = float(a1[b, c].norm())
                assert graph.nodes[f"conv1:{c}"]["energy"] == pytest.approx(expected)
            if gradient:
                for d in range(4):
                    expected = float(grad2[b, d].norm())
                    assert graph.nodes[f"conv2:{d}"]["gradient"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------
# masked input, compare, JSON, draw


def central_mask(images: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(images[:, :1])
    mask[..., 7:21, 7:21] = 1.0
    return mask


def test_readout_of_masked_input_end_to_end(tmp_path):
    model = load_bundled_model()
    images, labels = load_sample_digits()
    x = images[::8]
    mask = central_mask(x)
    background = float(images.min())  # normalised black
    for gradient, masked in ((False, mask * x), (True, mask * x + (1 - mask) * background)):
        readout = CircuitReadout(model, gradient=gradient)
        full, minimal = readout.readout(x), readout.readout(masked)
        for g_x, g_e in zip(full, minimal, strict=True):
            result = compare(g_x, g_e)
            assert isinstance(result, CircuitComparison)
            assert 0.0 <= result.edge_jaccard <= 1.0 and 0.0 <= result.flow_retained <= 1.0
            assert result.flow_a > 0 and result.flow_b > 0
            assert g_e.number_of_nodes() == 130
            loaded = from_json(to_json(g_e, tmp_path / "e.json"))
            assert edge_weights(loaded) == edge_weights(g_e)
    fig, (left, right) = plt.subplots(1, 2)
    assert draw(full[0], ax=left) is left and draw(minimal[0], ax=right) is right
    plt.close(fig)


def hand_graphs() -> tuple[nx.DiGraph, nx.DiGraph]:
    a = nx.DiGraph()
    a.add_node("x:0", layer="x", channel=0, energy=1.0)
    a.add_node("y:0", layer="y", channel=0, energy=2.0)
    a.add_node("z:0", layer="z", channel=0, energy=3.0)
    a.add_edge("x:0", "y:0", weight=2.0, kind="weight_activation")
    a.add_edge("y:0", "z:0", weight=1.0, kind="weight_activation")
    a.add_edge("x:0", "z:0", weight=1.0, kind="weight_activation")
    b = nx.DiGraph()
    b.add_node("x:0", layer="x", channel=0, energy=1.0)
    b.add_node("y:0", layer="y", channel=0, energy=2.0)
    b.add_node("z:1", layer="z", channel=1, energy=3.0)
    b.add_edge("x:0", "y:0", weight=5.0, kind="weight_activation")
    b.add_edge("y:0", "z:1", weight=1.0, kind="weight_activation")
    return a, b


def test_compare_on_hand_made_graphs():
    a, b = hand_graphs()
    result = compare(a, b)
    assert result.shared_nodes == ["x:0", "y:0"]
    assert result.node_jaccard == pytest.approx(2 / 4)
    assert result.shared_edges == [("x:0", "y:0")]
    assert result.edge_jaccard == pytest.approx(1 / 4)
    assert result.flow_a == pytest.approx(4.0) and result.flow_b == pytest.approx(6.0)
    assert result.flow_retained == pytest.approx(2 / 4)
    assert result.flow_retained_by_layer == pytest.approx({"y": 1.0, "z": 0.0})
    reverse = compare(b, a)
    assert reverse.flow_retained == pytest.approx(5 / 6)
    assert reverse.edge_jaccard == result.edge_jaccard
    same = compare(a, a)
    assert same.edge_jaccard == 1.0 and same.node_jaccard == 1.0 and same.flow_retained == 1.0
    empty = compare(nx.DiGraph(), nx.DiGraph())
    assert empty.edge_jaccard == 1.0 and math.isnan(empty.flow_retained)


def test_compare_rejects_bad_graphs():
    a, _ = hand_graphs()
    with pytest.raises(TypeError, match="`graph_b`"):
        compare(a, {"x": 1})
    bad = a.copy()
    bad.edges["x:0", "y:0"]["weight"] = float("nan")
    with pytest.raises(ValueError, match="`graph_a`.*weight"):
        compare(bad, a)


def test_json_round_trip(tmp_path):
    model = load_bundled_model()
    images, _ = load_sample_digits()
    (graph,) = CircuitReadout(model, gradient=True).readout(images[:1])
    path = tmp_path / "circuit.json"
    text = to_json(graph, path)
    assert json.loads(path.read_text()) == json.loads(text)
    for loaded in (from_json(text), from_json(path), from_json(str(path))):
        assert isinstance(loaded, nx.DiGraph)
        assert loaded.graph == graph.graph
        assert dict(loaded.nodes(data=True)) == dict(graph.nodes(data=True))
        assert {(u, v): d for u, v, d in loaded.edges(data=True)} == {
            (u, v): d for u, v, d in graph.edges(data=True)
        }
        assert compare(graph, loaded).edge_jaccard == 1.0
    with pytest.raises(ValueError, match="`source`"):
        from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="`source`"):
        from_json("{not json")
    with pytest.raises(TypeError, match="`graph`"):
        to_json({"nodes": []})


def test_draw_returns_axes():
    from matplotlib.axes import Axes

    a, _ = hand_graphs()
    ax = draw(a)
    assert isinstance(ax, Axes)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]
    assert len(ax.collections) == 3 + 1  # one scatter per layer and the edges
    plt.close(ax.figure)
    (graph,) = CircuitReadout(hand_model()).readout(HAND_INPUT)
    ax = draw(graph)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["relu1", "relu2", "pooled", "class"]
    plt.close(ax.figure)
    with pytest.raises(TypeError, match="`graph`"):
        draw([1, 2])
    with pytest.raises(ValueError, match="`max_edge_width`"):
        draw(a, max_edge_width=0)


def test_draw_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    a, _ = hand_graphs()
    with pytest.raises(ImportError, match=r"captum-ext\[viz\]"):
        draw(a)


# ---------------------------------------------------------------------------------------
# errors and the model left as it was


class Concat(nn.Module):
    """A dense connection (torch.cat) between two stages: not a resolvable connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a = self.act1(self.conv1(x))
        b = self.act2(self.conv2(torch.cat([a, x], dim=1)))
        return self.fc(self.pool(b).flatten(1))


class NoPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


class SharedReLU(nn.Module):
    def __init__(self, traceable: bool = True) -> None:
        super().__init__()
        self.traceable = traceable
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        if not self.traceable and x.sum() > 0:
            x = x * 1.0
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_errors_name_the_argument_or_layer():
    model = load_bundled_model()
    images, _ = load_sample_digits()
    with pytest.raises(TypeError, match="`model`"):
        CircuitReadout(lambda x: x)
    with pytest.raises(ValueError, match="`layers`.*features.9"):
        CircuitReadout(model, layers=["features.1", "features.9"])
    with pytest.raises(TypeError, match="`layers`"):
        CircuitReadout(model, layers=3)
    with pytest.raises(ValueError, match="`layers` is empty"):
        CircuitReadout(model, layers=[])
    with pytest.raises(TypeError, match="`classifier`"):
        CircuitReadout(model, classifier="features.0")
    with pytest.raises(ValueError, match="`top_k` has 2 entries"):
        CircuitReadout(model, top_k=[3, 4])
    with pytest.raises(ValueError, match="`top_k` must be a positive int"):
        CircuitReadout(model, top_k=0)
    with pytest.raises(ValueError, match="`edges_per_node` must be a positive int, got -1"):
        CircuitReadout(model, edges_per_node=-1)
    with pytest.raises(TypeError, match="`gradient`"):
        CircuitReadout(model, gradient=1)
    # a dense (concatenating) connection cannot be resolved
    with pytest.raises(ValueError, match="`layers`.*'act1'.*'act2'"):
        CircuitReadout(Concat())
    readout = CircuitReadout(model)
    with pytest.raises(TypeError, match="`inputs`"):
        readout.readout(images.numpy())
    with pytest.raises(ValueError, match="`target`"):
        readout.readout(images[:2], target=10)
    # skipping a stage: features.3 (16 -> 32) reaches features.7 only through features.6
    # (refused by the constructor, no longer only by readout)
    with pytest.raises(ValueError, match="'features.1'.*'features.7'.*features.3"):
        CircuitReadout(model, layers=["features.1", "features.7"])
    # a flatten of a spatial map into the classifier is resolved (each feature is tied to
    # its channel; checked by hand in test_circuits_flatten.py)
    assert CircuitReadout(NoPool()).readout(torch.randn(1, 1, 4, 4))[0].number_of_edges() > 0
    # a module that runs twice cannot be one stage
    with pytest.raises(ValueError, match="`layers`.*'relu'"):
        CircuitReadout(SharedReLU(), layers=["relu"])
    shared = CircuitReadout(SharedReLU(traceable=False), layers=["relu"])  # module order
    with pytest.raises(ValueError, match="`layers`: layer 'relu' ran 2 times"):
        shared.readout(torch.randn(1, 1, 4, 4))


def test_model_unchanged_also_when_readout_raises():
    model = load_bundled_model()
    model.train()  # any mode is left as it was
    model.classifier.weight.requires_grad_(False)
    model.features[0].weight.grad = torch.ones_like(model.features[0].weight)
    images, _ = load_sample_digits()
    x = images[:2].clone().requires_grad_(False)
    before = model_snapshot(model)
    for gradient in (False, True):
        readout = CircuitReadout(model, gradient=gradient)
        readout.readout(x)
        assert_model_unchanged(model, before)
        with pytest.raises(ValueError, match="`target`"):
            readout.readout(x, target=[1, 99])
        assert_model_unchanged(model, before)
    assert not x.requires_grad

    # batch norm in train mode: the running statistics a forward updates are put back
    tiny = make_tiny_cnn().train()
    before = model_snapshot(tiny)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    CircuitReadout(tiny, gradient=True).readout(x)
    assert_model_unchanged(tiny, before)


# ---------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
def test_cuda_matches_cpu_and_runs_under_autocast():
    model = load_bundled_model()
    images, labels = load_sample_digits()
    x, y = images[:4], labels[:4]
    cpu = CircuitReadout(model, gradient=True).readout(x, target=y)
    gpu_model = load_bundled_model().cuda()
    before = model_snapshot(gpu_model)
    readout = CircuitReadout(gpu_model, gradient=True)
    gpu = readout.readout(x.cuda(), target=y.cuda())
    for a, b in zip(cpu, gpu, strict=True):
        assert set(a.nodes) == set(b.nodes)
        wa, wb = edge_weights(a), edge_weights(b)
        shared = wa.keys() & wb.keys()
        assert len(shared) >= 0.95 * len(wa)
        for edge in shared:
            assert wa[edge] == pytest.approx(wb[edge], rel=1e-3)
    with torch.autocast("cuda", dtype=torch.float16):
        mixed = readout.readout(x.cuda(), target=y.cuda())
    for graph in mixed:
        assert graph.number_of_nodes() == 130
        assert all(math.isfinite(w) and w > 0 for _, _, w in graph.edges(data="weight"))
    assert_model_unchanged(gpu_model, before)


def test_old_discovery_module_warns_and_still_works():
    from captum_ext.circuits import Connection
    from captum_ext.circuits.connection import find_connections as new

    with pytest.warns(DeprecationWarning, match="captum_ext.circuits.connection"):
        from captum_ext.circuits._discovery import find_connections as old
    assert old is new
    with pytest.warns(DeprecationWarning):
        from captum_ext.circuits._discovery import Connection as OldConnection
    assert OldConnection is Connection


def test_class_nodes_of_a_confident_model_are_the_top_logits():
    """With logit gaps of 80-150 the float32 softmax of the other classes is exactly 0, and
    the "top classes by probability" were the lowest class indices (0, 1, 2) instead of the
    next logits. They are now ranked by logit, and their probabilities kept in float64."""
    from _helpers import make_confident_model

    from captum_ext.data import load_sample_digits

    model = make_confident_model(12.0)
    x = load_sample_digits()[0][:4]
    logits = model(x).detach()
    graphs = CircuitReadout(model, top_classes=3).readout(x)
    for graph, row in zip(graphs, logits):
        shown = {d["channel"] for _, d in graph.nodes(data=True) if d["layer"] == "class"}
        assert shown == set(row.topk(3).indices.tolist())
        # a class node's energy is its probability: float64, about 1e-35 here, not 0
        probabilities = [d["energy"] for _, d in graph.nodes(data=True) if d["layer"] == "class"]
        assert 0.0 < min(probabilities)


def test_a_shared_activation_module_is_not_a_default_stage():
    """Two convolutions sharing one nn.ReLU (as torchvision's ResNet stem shares its relu):
    the default discovery picked the shared ReLU as a stage, then refused it ("produces 2
    outputs (or runs twice)"). A stage now ends before a post-activation module that runs
    more than once."""

    class SharedRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
            self.conv2 = nn.Conv2d(6, 12, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(12, 10)

        def forward(self, x):
            x = self.relu(self.conv1(x))
            x = self.relu(self.conv2(x))
            return self.fc(self.pool(x).flatten(1))

    torch.manual_seed(0)
    readout = CircuitReadout(SharedRelu().eval())
    assert readout.layers == ("conv1", "conv2")
    (graph,) = readout.readout(torch.randn(1, 1, 8, 8))
    assert graph.number_of_nodes() > 0


def test_the_gradient_variant_gives_every_stage_its_gradient_and_numpy_ints_are_ints():
    """The first stage's nodes had no `gradient` attribute in the gradient variant (it was
    never differentiated), although the docstring promises it; top_k=np.int64(5) was refused
    while the other integer arguments took numpy ints."""
    import numpy as np

    from captum_ext.data import load_sample_digits

    model = load_bundled_model().eval()
    x = load_sample_digits()[0][:1]
    (graph,) = CircuitReadout(model, gradient=True).readout(x)
    for _, data in graph.nodes(data=True):
        if data["layer"] != "class":
            assert "gradient" in data and data["gradient"] >= 0, data
    first = CircuitReadout(model, gradient=True, top_k=np.int64(5))
    assert first.top_k == CircuitReadout(model, gradient=True, top_k=5).top_k
    assert CircuitReadout(model, top_k=np.array([5, 5, 5, 5])).top_k == (5, 5, 5, 5)
