"""CircuitReadout on architectures beyond ResNets: ConvNeXt (channels permuted last around a
LayerNorm and linear layers), DenseNet (concatenations, refused with advice that says no
choice of stages helps), and Hugging Face-style models (output with a ``logits`` field)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import DenseNet
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from captum_ext.circuits import CircuitReadout
from captum_ext.data import LogitsOutput


def _tiny_convnext() -> ConvNeXt:
    """torchvision's ConvNeXt with three stages of one block (8, 16, 24 channels)."""
    torch.manual_seed(0)
    settings = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 24, 1), CNBlockConfig(24, None, 1)]
    return ConvNeXt(settings, num_classes=5).eval()


def _outputs(model: nn.Module, names: list[str], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of the modules ``names`` in one forward pass."""
    recorded: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: recorded.__setitem__(name, output.detach())
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def _channel_energy(tensor: torch.Tensor) -> torch.Tensor:
    """E_c = L2 norm of channel c's map (first example)."""
    return tensor[0].flatten(1).norm(dim=1)


# --------------------------------------------------------------------------------------
# ConvNeXt: permute -> LayerNorm over the channels -> permute back


def test_convnext_stages_connect_through_layer_norm_2d_and_downsampling_convs():
    """ConvNeXt's stages are joined by ``LayerNorm2d`` (a permute, a LayerNorm over the
    channels, the permute back) and a 2 x 2 downsampling convolution; its head is pooling,
    ``LayerNorm2d``, flatten and the classifier. The edge weight is the spec's
    ``(sum_taps |W[d, s]|) * E_s`` of the downsampling convolution; the last stage is tied to
    the pooled features channel for channel."""
    model = _tiny_convnext()
    layers = ["features.1", "features.3", "features.5"]
    readout = CircuitReadout(model, layers=layers)
    assert [c.ingress for c in readout.connections] == [("features.2.1",), ("features.4.1",), ()]

    inputs = torch.randn(1, 3, 32, 32)
    (graph,) = readout.readout(inputs)
    outputs = _outputs(model, layers, inputs)
    taps = model.get_submodule("features.2.1").weight.detach().abs().flatten(2).sum(2)
    energy = _channel_energy(outputs["features.1"])
    edges = [
        (u, v, w)
        for u, v, w in graph.edges(data="weight")
        if u.startswith("features.1:") and v.startswith("features.3:")
    ]
    assert edges
    for u, v, weight in edges:
        s, d = int(u.split(":")[1]), int(v.split(":")[1])
        assert weight == pytest.approx(float(taps[d, s] * energy[s]), rel=1e-5)
    ties = [(u, v) for u, v in graph.edges() if v.startswith("pooled:")]
    assert ties and all(u.split(":")[1] == v.split(":")[1] for u, v in ties)


def test_torchvision_convnext_tiny_reads_out_its_four_stages():
    """The audit's case: torchvision's ``convnext_tiny`` with its four stages listed, and
    with the last stage alone (its head's ``LayerNorm2d`` permutes), in both variants."""
    torch.manual_seed(0)
    from torchvision.models import convnext_tiny

    model = convnext_tiny(weights=None, num_classes=10).eval()
    inputs = torch.randn(1, 3, 32, 32)
    for layers in (["features.1", "features.3", "features.5", "features.7"], ["features.7"]):
        for gradient in (False, True):
            (graph,) = CircuitReadout(model, layers=layers, gradient=gradient).readout(inputs)
            assert {layer for _, layer in graph.nodes(data="layer")} == {
                *layers,
                "pooled",
                "class",
            }


class _ChannelsLastMix(nn.Module):
    """``x.permute(0, 2, 3, 1)``, a LayerNorm and a linear layer on the channels, the
    permute back (a ConvNeXt block's pointwise part)."""

    def __init__(self, channels: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.linear = nn.Linear(channels, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class _PointwiseNet(nn.Module):
    def __init__(self, mix: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.mix = mix
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.act2(self.mix(self.act(self.conv(x)))))))


def test_linear_layer_on_permuted_channels_is_an_ingress_module_like_a_1x1_conv():
    """A linear layer on the channels (permuted last) is a 1 x 1 convolution: ``W[d, s]``
    at every position, so its edge weighs ``|W[d, s]| * E_s``."""
    torch.manual_seed(0)
    model = _PointwiseNet(_ChannelsLastMix(6, 8)).eval()
    readout = CircuitReadout(model, layers=["act", "act2"], top_k=(6, 8, 8))
    assert readout.connections[0].ingress == ("mix.linear",)
    inputs = torch.randn(1, 3, 8, 8)
    (graph,) = readout.readout(inputs)
    energy = _channel_energy(_outputs(model, ["act"], inputs)["act"])
    weight = model.mix.linear.weight.detach().abs()
    edges = [(u, v, w) for u, v, w in graph.edges(data="weight") if u.startswith("act:")]
    assert len(edges) == 8 * 4  # 8 destinations, their 4 strongest edges
    for u, v, w in edges:
        s, d = int(u.split(":")[1]), int(v.split(":")[1])
        assert w == pytest.approx(float(weight[d, s] * energy[s]), rel=1e-5)


class _PermutedThen(nn.Module):
    """Permute the channels last, apply ``inner``, permute back (when ``back``)."""

    def __init__(self, inner: nn.Module, back: bool = True) -> None:
        super().__init__()
        self.inner = inner
        self.back = back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x.permute(0, 2, 3, 1))
        return y.permute(0, 3, 1, 2) if self.back else y


@pytest.mark.parametrize(
    "inner, back",
    [
        (nn.Sequential(nn.BatchNorm2d(6), nn.Linear(6, 8)), True),  # batch norm: dim 1
        (nn.Sequential(nn.LayerNorm((8, 6)), nn.Linear(6, 8)), True),  # over w and C
        (nn.Conv2d(6, 8, 1), True),  # a convolution reading h as channels
    ],
    ids=["batch-norm", "layer-norm-over-two-axes", "conv"],
)
def test_operations_that_are_not_channelwise_on_permuted_channels_are_refused(inner, back):
    """With the channels permuted last, only element-wise operations, a LayerNorm over the
    channels alone and linear layers on them are followed; anything else raises, saying
    that listing more stages cannot help."""
    model = _PointwiseNet(_PermutedThen(inner, back)).eval()
    with pytest.raises(ValueError, match="moved to dimension 3 of 4") as caught:
        CircuitReadout(model, layers=["act", "act2"])
    assert "Listing more stages cannot help" in str(caught.value)


def test_a_stage_inside_a_convnext_block_is_refused_with_its_stages_named():
    """A stage inside a ConvNeXt block (its depthwise convolution) feeds two linear layers
    on permuted channels: refused, naming ConvNeXt's stages rather than the hidden layer,
    whose output (channels last) cannot be read as a stage."""
    model = _tiny_convnext()
    with pytest.raises(ValueError, match="features.1, features.3, features.5") as caught:
        CircuitReadout(model, layers=["features.4", "features.5.0.block.0"])
    assert "after its activation" not in str(caught.value)


# --------------------------------------------------------------------------------------
# DenseNet: concatenations


def test_densenet_concatenation_says_listing_stages_cannot_help():
    """Every connection into a dense block crosses its ``torch.cat``: the error says so,
    whatever the stages (default or listed), rather than advising to list more of them."""
    torch.manual_seed(0)
    model = DenseNet(
        growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=5
    ).eval()
    for layers in (None, ["features.transition1", "features.norm5"]):
        with pytest.raises(ValueError, match="call_function cat") as caught:
            CircuitReadout(model, layers=layers)
        message = str(caught.value)
        assert "Listing more stages cannot help" in message
        assert "concatenation" in message
        assert "list the layers so that" not in message


# --------------------------------------------------------------------------------------
# Hugging Face-style output: a `logits` field


class _LogitsField(dict):
    """A Hugging Face ``ModelOutput``-like dict whose ``logits`` is also an attribute."""

    def __getattr__(self, key: str):
        try:
            return self[key]
        except KeyError as error:
            raise AttributeError(key) from error


class _FieldNet(nn.Module):
    """Returns its logits in a dict (``field="dict"``), in a ``ModelOutput``-like object
    (``"attribute"``) or as they are (None)."""

    def __init__(self, field: str | None) -> None:
        super().__init__()
        self.field = field
        self.conv = nn.Conv2d(3, 6, 3)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor):
        logits = self.fc(self.flat(self.pool(self.act(self.conv(x)))))
        if self.field == "dict":
            return {"logits": logits}
        return _LogitsField(logits=logits) if self.field == "attribute" else logits


@pytest.mark.parametrize("field", ["dict", "attribute"])
def test_output_with_logits_field_names_logits_output(field):
    """A model returning its logits in a field is refused with the remedy, reading it
    through ``captum_ext.data.LogitsOutput``, which then gives the same graph as the
    network returning the logits itself."""
    torch.manual_seed(0)
    model = _FieldNet(field).eval()
    inputs = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"`model`.*`logits` tensor") as caught:
        CircuitReadout(model, layers=["act"]).readout(inputs)
    assert "captum_ext.data.LogitsOutput(model)" in str(caught.value)

    wrapped = CircuitReadout(LogitsOutput(model), layers=["act"]).readout(inputs)
    model.field = None
    plain = CircuitReadout(model, layers=["act"]).readout(inputs)
    for a, b in zip(wrapped, plain, strict=True):
        assert sorted(a.edges(data="weight")) == sorted(b.edges(data="weight"))


class _PermutedMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.linear = nn.Linear(6, 8)

    def forward(self, x):
        return self.linear(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class _MixNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.mix = _PermutedMix()
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.act2(self.mix(self.act(self.conv(x)))).mean((2, 3)))


def test_a_linear_stage_on_permuted_channels_is_refused_for_what_it_is():
    """Listing the permuted linear layer itself as a stage was refused as "does not produce
    the output of 'mix.linear' directly (another linear layer in between)", of itself, and
    with ConvNeXt's stage names for a model that is not a ConvNeXt."""
    torch.manual_seed(0)
    model = _MixNet().eval()
    with pytest.raises(ValueError) as caught:
        CircuitReadout(model, layers=["act", "mix.linear"]).readout(torch.randn(1, 3, 8, 8))
    message = str(caught.value)
    assert "reads channels a permute moved last" in message
    assert "another linear layer" not in message and "ConvNeXt" not in message.split(".")[0]
    assert "features.1" not in message
