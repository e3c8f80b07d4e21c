"""Hints of the CAMs for models met in model zoos: a model left in train mode with dropout or
stochastic depth (random maps), an ``nn.MultiheadAttention`` layer (a tuple output), and a
``forward`` that takes only keyword arguments (a Hugging Face style ``pixel_values=``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_ext._utils.caller import KeywordOnlyForwardError, keyword_only_forward_error
from captum_ext.attr import ContrastCAM, GradCAM, RandomMapsWarning
from captum_ext.attr._cam import random_in_train_mode_warning

# ------------------------------------------------------------------ models


class StochasticDepth(nn.Module):
    """Stands in for torchvision.ops.StochasticDepth (recognised by its class name): drops
    the whole input of an example with probability ``p`` in train mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1))) >= self.p
        return x * keep / (1 - self.p)


class SmallCNN(nn.Module):
    """conv -> ReLU -> conv -> [random] -> pool -> linear; ``body.2`` is the CAM layer and
    ``body.3`` the random module (or an identity)."""

    def __init__(self, random: nn.Module | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1),
            random if random is not None else nn.Identity(),
        )
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def small_cnn(random: nn.Module | None = None) -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(random)


def random_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "train mode" in str(w.message)]


class AttentionBlock(nn.Module):
    """A torchvision ViT encoder block in small: ``ln_1`` feeds ``self_attention`` its
    query, key and value."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """4 x 4 patches of 8 x 8 images -> a 2 x 2 grid of tokens (no class token) -> a block
    -> mean -> 3 classes."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(AttentionBlock(dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # (N, 4, dim)
        return self.head(self.blocks(tokens).mean(1))


FOLD = lambda t: t.transpose(1, 2).unflatten(2, (2, 2))  # noqa: E731 -- (N, 4, D) -> (N, D, 2, 2)


class KeywordOnly(nn.Module):
    """A model whose forward takes only ``pixel_values=`` (as some Hugging Face ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()

    def forward(self, *, pixel_values):
        return self.net(pixel_values)


# ------------------------------------------------------------------ train mode


@pytest.mark.parametrize(
    "random",
    [nn.Dropout(0.5), nn.Dropout2d(0.3), StochasticDepth(0.5)],
    ids=["dropout", "dropout2d", "stochastic_depth"],
)
def test_train_mode_with_random_modules_warns_once_and_keeps_the_mode(random):
    model = small_cnn(random).train()
    flags = {name: module.training for name, module in model.named_modules()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        GradCAM(model, "body.2").attribute(torch.randn(2, 3, 6, 6), target=[0, 1])
    messages = random_warnings(record)
    assert len(messages) == 1  # once per attribute call
    assert "'body.3'" in messages[0] and "model.eval()" in messages[0]
    assert "differ" in messages[0]
    # the warning does not change the model: every module keeps its mode
    assert {name: module.training for name, module in model.named_modules()} == flags


def test_train_mode_warning_is_given_once_per_model_in_its_own_category():
    """Monte Carlo dropout calls the same model many times on purpose: one warning for it
    (under any filter, also "always"), which its category silences; another model gets its
    own."""
    model, other = small_cnn(nn.Dropout(0.5)).eval(), small_cnn(nn.Dropout(0.5)).eval()
    model.body[3].train()  # MC dropout: only the dropout module in train mode
    other.body[3].train()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            GradCAM(model, "body.2").attribute(x, target=0)
    (warned,) = [w for w in record if "train mode" in str(w.message)]
    assert warned.category is RandomMapsWarning and issubclass(RandomMapsWarning, UserWarning)
    assert "category=RandomMapsWarning" in str(warned.message)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ContrastCAM(other, "body.2").attribute(x, contrast=1)
        GradCAM(other, "body.2").attribute(x, target=0)
    assert len(random_warnings(record)) == 1  # the second model's own, once
    third = small_cnn(nn.Dropout(0.5)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=RandomMapsWarning)  # as the message says
        GradCAM(third, "body.2").attribute(x, target=0)


def test_train_mode_warning_describes_real_randomness():
    """What the warning says: two calls on the same inputs give different maps (dropout
    after the layer changes the gradients), and model.eval() makes them equal."""
    model = small_cnn(nn.Dropout(0.5)).train()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = GradCAM(model, "body.2").attribute(x, target=[0, 1])
        second = GradCAM(model, "body.2").attribute(x, target=[0, 1])
    assert not torch.equal(first, second)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning in eval mode
        assert torch.equal(
            GradCAM(model, "body.2").attribute(x, target=[0, 1]),
            GradCAM(model, "body.2").attribute(x, target=[0, 1]),
        )


def test_contrast_cam_warns_in_train_mode():
    model = small_cnn(nn.Dropout(0.5)).train()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ContrastCAM(model, "body.2").attribute(torch.randn(2, 3, 6, 6), contrast=1)
    messages = random_warnings(record)
    assert len(messages) == 1 and messages[0].startswith("ContrastCAM:")


@pytest.mark.parametrize(
    "model",
    [
        small_cnn(nn.Dropout(0.5)).eval(),  # eval mode
        small_cnn().train(),  # train mode, nothing random
        small_cnn(nn.Dropout(0.0)).train(),  # a dropout that drops nothing
        small_cnn(StochasticDepth(0.0)).train(),
    ],
    ids=["eval", "no_random_modules", "dropout_p0", "stochastic_depth_p0"],
)
def test_no_train_mode_warning_where_maps_are_not_random(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradCAM(model, "body.2").attribute(torch.randn(2, 3, 6, 6), target=[0, 1])


def test_no_train_mode_warning_where_the_model_cannot_be_read():
    """A plain function as forward_func hides its model: nothing to inspect, no warning."""
    model = small_cnn(nn.Dropout(0.5)).train()
    assert random_in_train_mode_warning("GradCAM", None) is None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        GradCAM(lambda x: model(x), model.body[2]).attribute(torch.randn(2, 3, 6, 6), target=0)
    assert random_warnings(record) == []


def test_torchvision_stochastic_depth_warns():
    ops = pytest.importorskip("torchvision.ops")
    model = small_cnn(ops.StochasticDepth(0.5, "row")).train()
    message = random_in_train_mode_warning("GradCAM", model)
    assert message is not None and "'body.3'" in message


# ------------------------------------------------------------------ nn.MultiheadAttention


def test_multihead_attention_layer_names_its_input_and_its_block():
    model = TinyViT().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError) as caught:
        GradCAM(model, "blocks.0.self_attention").attribute(x, target=0, reshape_transform=FOLD)
    message = str(caught.value)
    assert "MultiheadAttention" in message and "tuple" in message
    # the module producing the attention's input, and the block holding it
    assert "'blocks.0.ln_1'" in message and "'blocks.0'" in message
    # why the input route does not give the input's map
    assert "query, key and value" in message and "sum of the three" in message
    assert "or set attribute_to_layer_input=True" not in message
    # the suggested layers work
    for layer in ("blocks.0.ln_1", "blocks.0"):
        maps = GradCAM(model, layer).attribute(x, target=0, reshape_transform=FOLD)
        assert maps.shape == (2, 1, 2, 2)


def test_multihead_attention_without_a_readable_model_keeps_the_general_advice():
    model = TinyViT().eval()
    attention = model.blocks[0].self_attention
    with pytest.raises(TypeError, match="the norm before it") as caught:
        GradCAM(lambda x: model(x), attention).attribute(torch.randn(2, 3, 8, 8), target=0)
    assert "Here:" not in str(caught.value)


def test_other_tuple_output_layers_keep_their_message():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y, y.mean()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.pair(x)[0].mean((2, 3)))

    with pytest.raises(TypeError, match="or set attribute_to_layer_input=True"):
        GradCAM(Net().eval(), "pair").attribute(torch.randn(2, 3, 6, 6), target=0)


# ------------------------------------------------------------------ keyword-only forward


def test_keyword_only_forward_says_to_wrap_the_model():
    model = KeywordOnly().eval()
    with pytest.raises(TypeError) as caught:
        GradCAM(model, "net.body.2").attribute(torch.randn(2, 3, 6, 6), target=0)
    message = str(caught.value)
    assert message.startswith("`forward_func` (KeywordOnly.forward) takes only keyword")
    assert "forward_func=lambda x: model(pixel_values=x)" in message
    assert "model.net.body.2" in message  # the layer, for the wrapping function or module


def test_keyword_only_forward_error_is_given_once_with_the_layer_advice():
    """The model call raises the clear error already; the CAM adds its layer advice to it
    instead of nesting the whole message inside a second copy."""
    with pytest.raises(KeywordOnlyForwardError) as caught:
        GradCAM(KeywordOnly().eval(), "net.body.2").attribute(torch.randn(2, 3, 6, 6), target=0)
    message = str(caught.value)
    assert isinstance(caught.value, TypeError)
    assert message.count("Wrap the model") == 1
    assert message.count("takes only keyword arguments") == 1
    assert "Then give `layer` as the module itself (model.net.body.2)" in message
    assert "(KeywordOnly.forward() takes 1 positional argument but 2 were given)" in message


def test_keyword_only_forward_wrapped_as_suggested_gives_the_plain_maps():
    model = KeywordOnly().eval()
    x = torch.randn(2, 3, 6, 6)
    wrapped = GradCAM(lambda x: model(pixel_values=x), model.net.body[2]).attribute(x, target=0)
    assert torch.equal(wrapped, GradCAM(model.net, "body.2").attribute(x, target=0))


def test_type_errors_of_models_with_positional_inputs_pass_unchanged():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_cnn()

        def forward(self, x):
            return self.net(x) + None  # a bug in the model: its own TypeError

    with pytest.raises(TypeError, match="unsupported operand"):
        GradCAM(Broken().eval(), "net.body.2").attribute(torch.randn(2, 3, 6, 6), target=0)


def test_keyword_only_error_maps_several_inputs_to_their_keywords():
    def forward(*, pixel_values, mask, scale=1.0):
        return pixel_values

    error = TypeError("forward() takes 0 positional arguments but 2 were given")
    two = keyword_only_forward_error(forward, error, 2)
    assert "lambda x0, x1: model(pixel_values=x0, mask=x1)" in str(two)
    one = keyword_only_forward_error(forward, error, 1)
    assert "lambda x: model(pixel_values=x, mask=...)" in str(one)
    assert keyword_only_forward_error(lambda x: x, error, 1) is None


@pytest.mark.parametrize("method", ["gradtrust", "road", "deletion"])
def test_keyword_only_forward_says_to_wrap_the_model_in_every_method(method):
    """The shared model call (``call_model``) gives the same advice as the CAMs do."""
    from captum_ext.metrics import deletion, gradtrust, road

    model = KeywordOnly().eval()
    x = torch.rand(2, 3, 6, 6)
    calls = {
        "gradtrust": lambda: gradtrust(model, x),
        "road": lambda: road(model, x, torch.rand(2, 3, 6, 6), target=0),
        "deletion": lambda: deletion(model, x, torch.rand(2, 3, 6, 6), target=0),
    }
    with pytest.raises(TypeError, match=r"takes only keyword arguments \(pixel_values=\)"):
        calls[method]()


def test_keyword_only_error_survives_pickling_and_copying():
    """A multiprocessing worker sends its exception back pickled: one that cannot be rebuilt
    from its args hung ``Pool.map`` (its result thread died)."""
    import copy
    import pickle

    model = KeywordOnly()
    with pytest.raises(KeywordOnlyForwardError) as caught:
        GradCAM(model.eval(), "net.body.2").attribute(torch.randn(2, 3, 6, 6), target=0)
    for twin in (pickle.loads(pickle.dumps(caught.value)), copy.deepcopy(caught.value)):
        assert type(twin) is KeywordOnlyForwardError
        assert str(twin) == str(caught.value)
        assert str(twin.python_error) == str(caught.value.python_error)
