"""Messages and defaults met on torchvision's model zoo (audit 43): the train-mode advice of
per-example gradients (in-place randomness, a batch norm given one value per channel),
PathwayGradient's warning on a network with activations other than ReLU, CircuitReadout's
default stages on RegNet and its refusals of ShuffleNetV2 and vision transformers, and the
documented eval mode of the perturbation metrics behind a plain function."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

from captum_ext.attr import PathwayGradient
from captum_ext.circuits import CircuitReadout
from captum_ext.metrics import deletion, gradtrust, insertion

# ------------------------------------------------------------ per-example gradients, train mode


def test_in_place_randomness_in_train_mode_names_train_mode_not_equal_results():
    """Stochastic depth (EfficientNet, ConvNeXt) draws its mask in place, which torch.func
    cannot batch; the warning said "The results are the same, only slower" and blamed
    checkpointing, while the cause is train mode and two calls give different scores."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        StochasticDepth(0.2, "row"),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).train()
    x = torch.randn(3, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="one example at a time") as caught:
        gradtrust(model, x, layer="0")
    message = " ".join(str(w.message) for w in caught)
    assert "train mode" in message and "model.eval()" in message
    assert "results are the same" not in message
    assert "checkpointing" not in message
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        torch.testing.assert_close(gradtrust(model, x, layer="0"), gradtrust(model, x, layer="0"))


def test_a_batch_norm_on_a_one_by_one_map_is_named_as_it_is():
    """Inception's auxiliary head normalises a (1, 768, 1, 1) map: the error claimed a
    BatchNorm1d on (1, C)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).train()
    with pytest.raises(ValueError, match=r"cannot normalise a single example") as caught:
        gradtrust(model, torch.randn(3, 3, 8, 8), layer="0")
    message = str(caught.value)
    assert "BatchNorm1d" not in message
    assert "torch.Size([1, 4, 1, 1])" in message and "model.eval()" in message


# ------------------------------------------------------------ PathwayGradient's default layers


class _Mixed(nn.Module):
    """ReLU and Hardswish, with a Hardsigmoid gate (MobileNetV3 in small)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 6, 3, padding=1), nn.Hardswish()
        self.conv2, self.act2 = nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 6, 1), nn.Hardsigmoid())
        self.conv3, self.act3 = nn.Conv2d(6, 8, 3, padding=1), nn.Hardswish()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        x = x * self.gate(x)
        return self.head(self.act3(self.conv3(x)))


def test_pathway_gradient_warns_that_other_activations_are_not_scored():
    torch.manual_seed(0)
    model = _Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"1 nn\.ReLU .* \(2 Hardswish\)") as caught:
        PathwayGradient(model).attribute(x, target=0)
    message = str(caught[0].message)
    assert "`layers`" in message and "Hardsigmoid" not in message
    assert caught[0].filename == __file__  # points at the caller's line
    # the suggested layers: every activation, without the warning
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.Hardswish))]
    assert layers == ["act1", "act2", "act3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = PathwayGradient(model).attribute(x, target=0, layers=layers, return_pathway=True)
    assert result.sites == ("act1", "act2", "act3")


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3), nn.Sigmoid()
        ),
        lambda: torchvision.models.resnet18(num_classes=3),
        lambda: torchvision.models.vgg11(num_classes=3),
    ],
    ids=["relu-with-sigmoid-head", "resnet18", "vgg11"],
)
def test_pathway_gradient_pure_relu_networks_do_not_warn(build):
    torch.manual_seed(0)
    model = build().eval()
    size = 8 if isinstance(model, nn.Sequential) else 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PathwayGradient(model).attribute(torch.randn(1, 3, size, size), target=0)


def test_pathway_gradient_bundled_model_does_not_warn():
    from captum_ext.bundled import load_bundled_model

    model = load_bundled_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PathwayGradient(model).attribute(torch.rand(2, 1, 28, 28), target=0)


# ------------------------------------------------------------ CircuitReadout on the zoo


def test_regnet_default_stages_are_its_trunk_blocks():
    """``trunk_output`` holds the stages ``block1`` .. ``block4``; as one stage the
    connection from the stem did not resolve ("list every convolutional stage")."""
    torch.manual_seed(0)
    model = torchvision.models.regnet_y_400mf(weights=None, num_classes=10).eval()
    readout = CircuitReadout(model)
    blocks = tuple(f"trunk_output.block{i}" for i in range(1, 5))
    assert readout.layers == ("stem.2", *blocks)
    graphs = readout.readout(torch.randn(2, 3, 32, 32))
    assert len(graphs) == 2 and graphs[0].number_of_nodes() == 186


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return torch.relu(self.conv(x) + self.skip(x))


def test_a_container_of_block_containers_is_opened_into_its_stages():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    trunk = nn.Sequential()
    trunk.add_module("s1", nn.Sequential(_Block(4, 6), _Block(6, 6)))
    trunk.add_module("s2", nn.Sequential(_Block(6, 8)))
    model.add_module("trunk", trunk)
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(8, 3))
    readout = CircuitReadout(model.eval())
    assert readout.layers == ("stem.1", "trunk.s1", "trunk.s2")
    assert len(readout.readout(torch.randn(2, 3, 10, 10))) == 2


def test_shufflenet_says_listing_stages_cannot_help():
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    for layers in (None, ["conv1", "stage2", "stage3", "stage4", "conv5"]):
        with pytest.raises(ValueError, match="concatenates branches") as caught:
            CircuitReadout(model, layers=layers).readout(x)
        assert "Listing more stages cannot" in str(caught.value)
        assert "list every convolutional stage" not in str(caught.value)
    # the hooks are gone: the model runs as before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_vision_transformers_get_the_documented_refusal(kind):
    torch.manual_seed(0)
    if kind == "vit":
        model = torchvision.models.VisionTransformer(
            image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
            num_classes=10,
        )  # fmt: skip
    else:
        model = torchvision.models.SwinTransformer(
            patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
            window_size=[2, 2], num_classes=10,
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Swin's blocks as a single stage
        with pytest.raises(ValueError, match="vision transformers are not supported"):
            CircuitReadout(model.eval())


# ------------------------------------------------------------ the metrics' eval mode


def test_perturbation_metrics_document_eval_mode_behind_a_plain_function():
    """The docstrings said eval mode applied to an nn.Module or a bound method only; the
    modules a lambda runs are switched too, and inception_v3's output changes with it."""
    for metric in (deletion, insertion):
        doc = " ".join(metric.__doc__.split())
        assert "when it is an ``nn.Module`` (or a bound method of one), in eval mode" not in doc
        assert "the modules a plain function calls" in doc
        assert "inception_v3" in doc
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.9), nn.Flatten(), nn.Linear(72, 3))
    model.train()
    seen = []

    def f(t):
        out = model(t)
        seen.append(model.training)
        return out

    x, attr = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    first = deletion(f, x, attr, n_steps=3)
    torch.testing.assert_close(first, deletion(f, x, attr, n_steps=3))  # no dropout
    assert seen and not any(seen) and model.training


class ChannelAttention(nn.Module):
    """CBAM's channel attention: an MLP on the pooled channels (no heads, no convolution)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels // 2), nn.ReLU(), nn.Linear(channels // 2, channels)
        )

    def forward(self, x):
        return x * torch.sigmoid(self.mlp(x.mean((2, 3))))[:, :, None, None]


class _DenseWithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.att = ChannelAttention(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        s = self.stem(x)
        h = torch.cat([s, self.conv(s)], 1)  # a dense connection the readout cannot follow
        return self.fc(self.pool(self.att(h)).flatten(1))


def test_a_cnn_with_an_attention_gate_is_not_called_a_vision_transformer():
    model = _DenseWithGate().eval()
    with pytest.raises(ValueError) as caught:
        CircuitReadout(model).readout(torch.randn(1, 3, 16, 16))
    assert "vision transformer" not in str(caught.value)
    assert "cannot resolve the connection" in str(caught.value)


class _NoisyInEval(nn.Module):
    """Noise of its own in eval mode (randomized smoothing): torch.func refuses to batch it."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.f(x + 0.1 * torch.empty(x.shape[-1]).normal_())


def test_the_fallback_warning_does_not_blame_train_mode_on_an_eval_model():
    model = _NoisyInEval().eval()
    with pytest.warns(RuntimeWarning, match="draws random numbers in place") as caught:
        gradtrust(model, torch.randn(3, 8), layer="f.0", log=True)
    text = " ".join(str(w.message) for w in caught)
    assert "train mode" not in text and "model.eval()" not in text


# a vision transformer with Hugging Face's attribute names (num_attention_heads)
class ViTSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, h):
        n, t, d = h.shape
        q, k, v = (
            f(h).view(n, t, self.num_attention_heads, -1).transpose(1, 2)
            for f in (self.query, self.key, self.value)
        )
        weights = torch.softmax(
            q @ k.transpose(-1, -2) / (d // self.num_attention_heads) ** 0.5, -1
        )
        return (weights @ v).transpose(1, 2).reshape(n, t, d)


class _HFLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = ViTSelfAttention(width, 2)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, h):
        h = h + self.attention(self.norm(h))
        return h + self.mlp(self.norm(h))


class _HFViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, 8, 8, stride=8)
        self.layer = nn.Sequential(_HFLayer(8), _HFLayer(8))
        self.classifier = nn.Linear(8, 10)

    def forward(self, x):
        h = self.projection(x).flatten(2).transpose(1, 2)
        return self.classifier(self.layer(h)[:, 0])


def test_hugging_face_style_attention_is_called_a_vision_transformer():
    model = _HFViT().eval()
    with pytest.raises(ValueError, match="vision transformers are not supported"):
        CircuitReadout(model).readout(torch.randn(2, 3, 32, 32))
