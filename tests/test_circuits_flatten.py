"""CircuitReadout on conv -> flatten -> linear networks (VGG, AlexNet and hand-written ones):
a flattened feature f = c * h * w + i * w + j belongs to channel c, so the edge from channel
c to a linear unit d weighs sum_{i, j} |W[d, c * h * w + i * w + j]| * E_c (the L1 norm of
the taps of the equivalent whole-map convolution), checked against loops written here."""

from __future__ import annotations

import pytest
import torch
import torchvision
from _helpers import assert_model_unchanged, model_snapshot
from torch import nn

from captum_ext.circuits import CircuitReadout

torch.set_num_threads(1)

H, W = 3, 4  # the tiny networks' input size: P = h * w = 12 positions per channel


class ConvFlatMLP(nn.Module):
    """conv (1 -> 2, 3x3, padding 1) -> ReLU -> flatten -> fc1 (24 -> 4) -> ReLU -> fc2."""

    def __init__(self, traceable: bool = True) -> None:
        super().__init__()
        self.traceable = traceable
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * H * W, 4)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        if not self.traceable and x.sum() > 1e9:  # data-dependent: torch.fx cannot trace
            x = x * 1.0
        return self.fc2(self.relu(self.fc1(self.flatten(self.act(self.conv(x))))))


class ConvPoolTwoHidden(nn.Module):
    """VGG in small: conv -> ReLU -> max-pool -> flatten -> fc1 -> ReLU -> fc2 -> ReLU -> fc3."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Linear(3 * 2 * 2, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class ConvFlatClassifier(nn.Module):
    """conv -> ReLU -> flatten -> the classifier (no pooling, no hidden layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2 * H * W, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for parameter in model.parameters():
        nn.init.normal_(parameter)
    return model.double().eval()


def inputs(n: int = 3, h: int = H, w: int = W) -> torch.Tensor:
    return torch.randn(n, 1, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def edges(graph, source_layer: str, destination_layer: str) -> dict[tuple[int, int], float]:
    found = {}
    for u, v, data in graph.edges(data=True):
        if u.rsplit(":", 1)[0] == source_layer and v.rsplit(":", 1)[0] == destination_layer:
            found[int(u.rsplit(":", 1)[1]), int(v.rsplit(":", 1)[1])] = data["weight"]
    return found


def flattened_tap_norm(weight: torch.Tensor, d: int, c: int, h: int, w: int) -> float:
    """sum over positions (i, j) of |W[d, c * h * w + i * w + j]|, by loops."""
    return sum(abs(float(weight[d, c * h * w + i * w + j])) for i in range(h) for j in range(w))


# --------------------------------------------------------------------------------------
# hand computations


@pytest.mark.parametrize("gradient", [False, True])
def test_conv_flatten_linear_edges_equal_a_hand_computation(gradient):
    model = seeded(ConvFlatMLP())
    readout = CircuitReadout(model, gradient=gradient, edges_per_node=2, top_classes=3)
    assert readout.layers == ("act",)
    assert [c.ingress for c in readout.connections] == [("fc1",)]
    x = inputs()
    before = model_snapshot(model)
    graphs = readout.readout(x)
    assert_model_unchanged(model, before)

    weight1, weight2 = model.fc1.weight.detach(), model.fc2.weight.detach()
    maps = model.act(model.conv(x)).detach()  # (N, 2, 3, 4)
    xg = x.clone().requires_grad_(True)
    hidden = model.relu(model.fc1(model.flatten(model.act(model.conv(xg)))))
    hidden.retain_grad()
    logits = model.fc2(hidden)
    targets = logits.argmax(1)
    logits.gather(1, targets[:, None]).sum().backward()
    for b, graph in enumerate(graphs):
        energy = [float(maps[b, c].pow(2).sum().sqrt()) for c in range(2)]
        found = edges(graph, "act", "pooled")
        expected = {}
        for d in range(4):
            for c in range(2):
                value = flattened_tap_norm(weight1, d, c, H, W) * energy[c]
                if gradient:
                    value *= abs(float(hidden.grad[b, d]))
                if value > 0:
                    expected[c, d] = value
        assert found.keys() == expected.keys()
        for key, value in expected.items():
            assert found[key] == pytest.approx(value, rel=1e-12)
        # pooled -> class: |W_fc[y, j]| * |h_j| (the gradient for the target, same here)
        for (j, y), value in edges(graph, "pooled", "class").items():
            expected_class = abs(float(weight2[y, j] * hidden[b, j].detach()))
            assert value == pytest.approx(expected_class, rel=1e-12)


def test_module_order_gives_the_traced_graph():
    traced = seeded(ConvFlatMLP())
    untraced = seeded(ConvFlatMLP(traceable=False))
    a = CircuitReadout(traced)
    b = CircuitReadout(untraced)
    assert [c.method for c in b.connections] == ["module_order"]
    assert [c.ingress for c in b.connections] == [("fc1",)]
    x = inputs()
    for g, h in zip(a.readout(x), b.readout(x), strict=True):
        assert dict(g.edges) == dict(h.edges)


def test_two_hidden_layers_become_a_stage_with_pooled_flatten_edges():
    """conv -> max-pool -> flatten (3 x 2 x 2) -> fc1 -> fc2 -> fc3: fc1's post-activation
    is a stage; the pooled features are fc2's output (the classifier's input)."""
    model = seeded(ConvPoolTwoHidden())
    readout = CircuitReadout(model, edges_per_node=5, top_classes=3)
    assert readout.layers == ("features.1", "classifier.1")
    assert [c.ingress for c in readout.connections] == [("classifier.0",), ("classifier.2",)]
    x = inputs(2, 4, 4)
    graphs = readout.readout(x)
    fc1, fc2 = model.classifier[0].weight.detach(), model.classifier[2].weight.detach()
    maps = model.features[1](model.features[0](x)).detach()  # (N, 3, 4, 4): the stage
    with torch.no_grad():
        hidden = model.classifier[1](model.classifier[0](torch.flatten(model.features(x), 1)))
    for b, graph in enumerate(graphs):
        energy = maps[b].flatten(1).norm(dim=1)
        # the flatten comes after the max-pool: 2 x 2 positions per channel
        for (c, d), value in edges(graph, "features.1", "classifier.1").items():
            assert value == pytest.approx(flattened_tap_norm(fc1, d, c, 2, 2) * float(energy[c]))
        assert len(edges(graph, "features.1", "classifier.1")) == 5 * 3 - sum(
            1 for d in range(5) for c in range(3) if float(energy[c]) == 0
        )
        for (s, d), value in edges(graph, "classifier.1", "pooled").items():
            assert value == pytest.approx(abs(float(fc2[d, s])) * abs(float(hidden[b, s])))


def test_flatten_straight_into_the_classifier_ties_each_feature_to_its_channel():
    model = seeded(ConvFlatClassifier())
    readout = CircuitReadout(model, edges_per_node=2)
    assert [c.ingress for c in readout.connections] == [()]
    x = inputs()
    maps = model.act(model.conv(x)).detach()
    for b, graph in enumerate(readout.readout(x)):
        found = edges(graph, "act", "pooled")
        energy = maps[b].flatten(1).norm(dim=1)
        expected = {(f // (H * W), f): float(energy[f // (H * W)]) for f in range(2 * H * W)}
        # every kept pooled feature f has exactly one incoming edge, from channel f // 12
        kept = [int(n.split(":")[1]) for n in graph if n.startswith("pooled:")]
        assert sorted(found) == sorted(
            (f // (H * W), f) for f in kept if float(energy[f // (H * W)]) > 0
        )
        for key, value in found.items():
            assert value == pytest.approx(expected[key], rel=1e-12)


def test_skipping_a_hidden_linear_layer_names_it():
    model = seeded(ConvPoolTwoHidden())
    with pytest.raises(ValueError, match=r"`layers`.*'features.1'.*'classifier.0'.*stage"):
        CircuitReadout(model, layers=["features.1"])


# --------------------------------------------------------------------------------------
# torchvision


def _tap_check(model, readout, graph, last_stage, first_linear, stage_maps):
    """Every edge last_stage -> first hidden stage against the aggregated weights."""
    linear = model.get_submodule(first_linear)
    channels = stage_maps.shape[1]
    positions = linear.in_features // channels
    per_channel = linear.weight.detach().abs().reshape(linear.out_features, channels, positions)
    energy = stage_maps[0].flatten(1).norm(dim=1)
    found = edges(graph, last_stage, readout.layers[-1])
    assert found
    for (c, d), value in list(found.items())[:50]:
        expected = float(per_channel[d, c].double().sum()) * float(energy[c])
        assert value == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("name", "size", "last_stage", "hidden_stage", "first_linear"),
    [
        # ~10 s on one thread, mostly building vgg11's 25088 x 4096 layer
        pytest.param(
            "vgg11", 32, "features.19", "classifier.2", "classifier.0", marks=pytest.mark.slow
        ),
        ("alexnet", 64, "features.11", "classifier.3", "classifier.1"),
    ],
)
def test_torchvision_vgg_and_alexnet(name, size, last_stage, hidden_stage, first_linear):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    readout = CircuitReadout(model)
    assert readout.layers[-2:] == (last_stage, hidden_stage)
    assert readout.connections[-2].ingress == (first_linear,)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    stage_maps = []
    handle = model.get_submodule(last_stage).register_forward_hook(
        lambda m, a, out: stage_maps.append(out.detach())
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    before = model_snapshot(model)
    (graph,) = readout.readout(x)
    assert_model_unchanged(model, before)
    # the flatten sees 512 x 7 x 7 (VGG, AdaptiveAvgPool2d(7)) or 256 x 6 x 6 (AlexNet)
    assert model.get_submodule(first_linear).in_features == stage_maps[0].shape[1] * (
        49 if name == "vgg11" else 36
    )
    _tap_check(model, readout, graph, last_stage, first_linear, stage_maps[0])
    layers = {data["layer"] for _, data in graph.nodes(data=True)}
    assert layers == {*readout.layers, "pooled", "class"}
    assert any(v.startswith("class:") for _, v in graph.edges)
