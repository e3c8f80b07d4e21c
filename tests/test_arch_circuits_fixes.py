"""CircuitReadout on architectures an audit found mishandled: a backbone with a separate head,
GroupNorm, LayerNorm2d, padding and BlurPool between stages, and a 1 x 1 convolution head."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_ext.circuits import CircuitReadout


def _graph_data(graph):
    nodes = {
        n: (d["layer"], d["channel"], round(d["energy"], 5)) for n, d in graph.nodes(data=True)
    }
    edges = {(u, v): round(d["weight"], 5) for u, v, d in graph.edges(data=True)}
    return nodes, edges


def _strip(graph, prefix):
    """Node names without ``prefix`` (the backbone's), to compare with the inline model."""
    nodes, edges = _graph_data(graph)
    cut = lambda name: name[len(prefix) :] if name.startswith(prefix) else name  # noqa: E731
    return (
        {cut(n): (cut(layer), c, e) for n, (layer, c, e) in nodes.items()},
        {(cut(u), cut(v)): w for (u, v), w in edges.items()},
    )


# --------------------------------------------------------------- backbone + separate head


class _Backbone(nn.Module):
    """timm's ``num_classes=0``: returns the pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.bn2, self.act2 = nn.BatchNorm2d(12), nn.ReLU()
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten(1)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        return self.flatten(self.pool(self.act2(self.bn2(self.conv2(x)))))


class _Inline(_Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(super().forward(x))


class _Wrapped(nn.Module):
    def __init__(self, inline: _Inline) -> None:
        super().__init__()
        self.backbone, self.fc = _Backbone(), nn.Linear(12, 5)
        self.backbone.load_state_dict(inline.state_dict(), strict=False)
        self.fc.load_state_dict(inline.fc.state_dict())

    def forward(self, x):
        return self.fc(self.backbone(x))


def test_backbone_with_separate_head_gets_the_inline_models_stages():
    torch.manual_seed(0)
    inline = _Inline().eval()
    wrapped = _Wrapped(inline).eval()
    x = torch.randn(2, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = CircuitReadout(inline), CircuitReadout(wrapped)
    assert a.layers == ("act1", "act2")
    assert b.layers == ("backbone.act1", "backbone.act2")
    for g_a, g_b in zip(a.readout(x, target=0), b.readout(x, target=0), strict=True):
        assert _graph_data(g_a) == _strip(g_b, "backbone.")


class _OneBlockBackbone(nn.Module):
    """A module holding every convolution whose inner stages do not connect (the second
    convolution's output is added to the input: no stage-to-classifier path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(self.act1(self.conv1(x))))


class _OneBlockModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.fc = _OneBlockBackbone(), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.block(x).mean((2, 3)))


def test_lone_module_stage_whose_inside_does_not_connect_warns():
    with pytest.warns(UserWarning, match=r"the only stage found in _OneBlockModel is 'block'"):
        readout = CircuitReadout(_OneBlockModel().eval())
    assert readout.layers == ("block",)


# --------------------------------------------------------- normalisations and padding


class _LayerNorm2d(nn.LayerNorm):
    """ConvNeXt / timm style: LayerNorm over the channels of an N x C x h x w map."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias)
        return x.permute(0, 3, 1, 2)


class _BlurPool(nn.Module):
    """Reflection padding and a fixed depthwise blur, stride 2 (timm's BlurPool2d)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        self.register_buffer("filt", k[None, None].repeat(channels, 1, 1, 1))
        self.channels = channels

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt, stride=2, groups=self.channels)


def _norm(kind: str, channels: int) -> nn.Module:
    return {
        "bn": lambda: nn.BatchNorm2d(channels),
        "gn": lambda: nn.GroupNorm(2, channels),
        "ln2d": lambda: _LayerNorm2d(channels),
    }[kind]()


class _Plain(nn.Module):
    def __init__(self, norm: str, blur: bool = False) -> None:
        super().__init__()
        self.c1, self.n1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), _norm(norm, 8), nn.GELU()
        self.blur = _BlurPool(8) if blur else None
        self.c2, self.n2, self.a2 = nn.Conv2d(8, 12, 3, padding=1), _norm(norm, 12), nn.GELU()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.a1(self.n1(self.c1(x)))
        if self.blur is not None:
            x = self.blur(x)
        x = self.a2(self.n2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("norm", ["bn", "gn", "ln2d"])
@pytest.mark.parametrize("blur", [False, True])
def test_stages_end_after_the_normalisation_and_edges_follow_the_definition(norm, blur):
    torch.manual_seed(0)
    model = _Plain(norm, blur).eval()
    x = torch.randn(2, 3, 12, 12)
    readout = CircuitReadout(model, top_k=100, edges_per_node=100)
    # stages end at the post-activation, whatever the normalisation (GroupNorm and a
    # LayerNorm2d normalise each channel's map by shared statistics: no channel-to-channel
    # weight), and padding plus a per-channel blur between stages is followed
    assert readout.layers == ("a1", "a2")
    assert readout.connections[0].ingress == ("c2",)
    graph = readout.readout(x[:1], target=0)[0]
    # the definition: weight(s -> d) = sum_taps |W_c2[d, s]| * ||A^a1_s||_2
    with torch.no_grad():
        a1 = model.a1(model.n1(model.c1(x[:1])))[0]
    taps = model.c2.weight.detach().abs().flatten(2).sum(2)
    energy = a1.flatten(1).norm(dim=1)
    for d in range(12):
        for s in range(8):
            expected = (taps[d, s] * energy[s]).item()
            weight = graph.edges[f"a1:{s}", f"a2:{d}"]["weight"]
            assert weight == pytest.approx(expected, rel=1e-5)


class _Gated(nn.Module):
    """A channel-mixing operation between stages (each channel scaled by the channel sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.c2, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.a1(self.c1(x))
        x = x * torch.sigmoid(x.sum(1, keepdim=True))
        return self.fc(self.a2(self.c2(x)).mean((2, 3)))


def test_an_operation_not_followed_is_named_as_unsupported():
    with pytest.raises(
        ValueError, match=r"call_method sum is not supported by CircuitReadout between stages"
    ):
        CircuitReadout(_Gated().eval(), layers=["a1", "a2"])


# --------------------------------------------------------------- 1 x 1 convolution head


class _Head(nn.Module):
    def __init__(self, conv_head: bool) -> None:
        super().__init__()
        self.c1, self.n1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.n2, self.a2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = conv_head
        self.head = nn.Conv2d(12, 5, 1) if conv_head else nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool(self.a2(self.n2(self.c2(self.a1(self.n1(self.c1(x)))))))
        return self.head(x).flatten(1) if self.conv_head else self.head(x.flatten(1))


def test_default_classifier_names_a_1x1_convolution_head():
    with pytest.raises(ValueError, match=r"`classifier`.*1 x 1 convolution.*here perhaps 'head'"):
        CircuitReadout(_Head(conv_head=True).eval())


def test_larger_kernel_convolution_classifier_is_refused_naming_the_argument():
    model = _Head(conv_head=True).eval()
    with pytest.raises(TypeError, match=r"`classifier` must be an nn.Linear .* or a 1 x 1"):
        CircuitReadout(model, classifier=model.c2)


@pytest.mark.parametrize("gradient", [False, True])
def test_1x1_convolution_head_reads_out_as_the_linear_head_with_its_weights(gradient):
    torch.manual_seed(0)
    conv = _Head(conv_head=True).eval()
    linear = _Head(conv_head=False).eval()
    state = conv.state_dict()
    state["head.weight"] = state["head.weight"].view(5, 12)  # weight.view(out, in)
    linear.load_state_dict(state)
    x = torch.randn(3, 3, 10, 10)
    torch.testing.assert_close(conv(x), linear(x))
    a = CircuitReadout(conv, classifier="head", gradient=gradient)
    b = CircuitReadout(linear, gradient=gradient)
    assert a.layers == b.layers == ("a1", "a2")
    for g_a, g_b in zip(a.readout(x), b.readout(x), strict=True):
        assert _graph_data(g_a) == _graph_data(g_b)
        assert g_a.graph["prediction"] == g_b.graph["prediction"]


def test_wrapped_torchvision_resnet_gets_the_inline_models_stages():
    """A ResNet whose stages hold several blocks each (layer1..layer4), wrapped as a backbone
    returning pooled features plus a separate head, gets the stages of the same ResNet with
    its head inline (the check of the stages inside the backbone was the strict one of
    single-block stages, so it fell back to one stage with a warning)."""

    import torchvision

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torchvision.models.resnet18(num_classes=10)
            self.backbone.fc = nn.Identity()
            self.head = nn.Linear(512, 10)

        def forward(self, x):
            return self.head(self.backbone(x))

    inline = CircuitReadout(torchvision.models.resnet18(num_classes=10).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = CircuitReadout(Wrapped().eval())
    assert wrapped.layers == tuple(f"backbone.{name}" for name in inline.layers)
    assert len(inline.layers) > 1


class _ConvStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = nn.ReLU()

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))))


class _PooledHead(nn.Module):
    """A backbone returning its feature map, pooling outside it, then a head: a Linear or
    the same weights as a 1 x 1 convolution."""

    def __init__(self, conv_head: bool) -> None:
        super().__init__()
        self.backbone = _ConvStack()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Conv2d(16, 5, 1) if conv_head else nn.Linear(16, 5)
        self.conv_head = conv_head

    def forward(self, x):
        pooled = self.pool(self.backbone(x))
        return self.head(pooled).flatten(1) if self.conv_head else self.head(pooled.flatten(1))


def test_a_1x1_convolution_head_outside_the_backbone_gets_the_linear_heads_stages():
    """The 1 x 1 convolution head is the classifier, not a convolution the backbone lacks:
    the stages inside the backbone are found as with a Linear head (it was one stage,
    ['backbone'], silently)."""
    torch.manual_seed(0)
    linear = _PooledHead(conv_head=False).eval()
    conv = _PooledHead(conv_head=True).eval()
    conv.backbone.load_state_dict(linear.backbone.state_dict())
    with torch.no_grad():
        conv.head.weight.copy_(linear.head.weight.view(5, 16, 1, 1))
        conv.head.bias.copy_(linear.head.bias)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(conv(x), linear(x))
    expected = CircuitReadout(linear).readout(x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = CircuitReadout(conv, classifier="head").readout(x)[0]
    assert graph.graph["stages"] == expected.graph["stages"]
    assert "backbone.act1" in graph.graph["stages"]
    assert set(graph.nodes) == set(expected.nodes) and set(graph.edges) == set(expected.edges)
