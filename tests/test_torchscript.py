"""captum_ext.torchscript: the public home of TorchScriptLayerModel and its helpers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_ext import torchscript


def _scripted() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    return torch.jit.script(model.eval())


def test_last_linear_name_follows_the_single_rule():
    model = _scripted()
    assert torchscript.last_linear_name(model) == "3"
    assert torchscript.last_linear_name(torch.jit.script(nn.Sequential(nn.ReLU()))) is None


def test_expose_final_layer_reproduces_the_model():
    model = _scripted()
    x = torch.randn(5, 1, 4, 4)
    wrapper = torchscript.expose_final_layer(model, example=x)
    assert isinstance(wrapper, torchscript.TorchScriptLayerModel)
    torch.testing.assert_close(wrapper(x), model(x))


@pytest.mark.parametrize("score", ["gradtrust", "gradnorm"])
def test_trust_scores_of_a_scripted_model_name_the_wrapper(score):
    """They put a hook on the compiled final linear layer, and torch said only
    "register_forward_hook is not supported on ScriptModules"; now the error names
    expose_final_layer, whose wrapper gives the eager model's scores."""
    from captum_ext import metrics

    torch.manual_seed(0)
    eager = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).eval()
    scripted = torch.jit.script(eager)
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    function = getattr(metrics, score)
    with pytest.raises(TypeError, match="expose_final_layer"):
        function(scripted, x)
    wrapper = torchscript.expose_final_layer(scripted, example=x)
    torch.testing.assert_close(function(wrapper, x), function(eager, x))


def test_old_private_path_still_imports_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from captum_ext._utils.torchscript import (
            TorchScriptLayerModel,
            expose_final_layer,
            expose_layer,
            last_linear_name,
        )
    assert TorchScriptLayerModel is torchscript.TorchScriptLayerModel
    assert expose_layer is torchscript.expose_layer
    assert expose_final_layer is torchscript.expose_final_layer
    assert last_linear_name is torchscript.last_linear_name


class _Asserting(nn.Module):
    """A forward with ``torch._assert`` and an f-string message, as torchvision's ViT has
    (TorchScript compiles the message to ``aten::format``, a vararg operator)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        torch._assert(h == 8, f"Wrong image height {h}, expected {8}")
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_an_assert_with_a_formatted_message_is_evaluated():
    """``aten::format`` failed ("expected at most 1 argument(s) but received 3")."""
    torch.manual_seed(0)
    model = torch.jit.script(_Asserting().eval())
    x = torch.randn(2, 1, 8, 8)
    wrapper, tap = torchscript.expose_layer(model, "conv", x[:1])
    torch.testing.assert_close(wrapper(x), model(x))
    assert tap is wrapper.tap


def test_a_failure_inside_a_compiled_submodule_is_a_clear_error(monkeypatch):
    """A RuntimeError from deep inside a compiled call (a torchvision ViT's attention gave
    "strides() called on an undefined Tensor") names the layer and the way out."""
    torch.manual_seed(0)
    model = torch.jit.script(_Asserting().eval())

    def broken(self, *args):
        raise RuntimeError("strides() called on an undefined Tensor\nmore detail")

    monkeypatch.setattr(torchscript.TorchScriptLayerModel, "forward", broken)
    with pytest.raises(
        ValueError,
        match=r"`layer`='conv': evaluating the TorchScript model "
        r"around this layer failed \(strides\(\) called on an undefined Tensor\)",
    ):
        torchscript.expose_layer(model, "conv", torch.randn(1, 1, 8, 8))


def test_a_scripted_vision_transformer_is_evaluated_around_its_layer():
    """A scripted nn.MultiheadAttention called from Python under no_grad fails in torch's fast
    path ("strides() called on an undefined Tensor"); the interpreter repeats that call with
    gradients enabled, so a scripted torchvision ViT can be explained at a block's norm."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5)
    with torch.no_grad():  # torchvision's fresh ViT head is all zeros
        vit.heads.head.weight.normal_(0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation
        model = torch.jit.script(vit.eval())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    wrapper, tap = torchscript.expose_layer(model, "encoder.layers.encoder_layer_1.ln_1", x[:1])
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), model(x), rtol=1e-5, atol=1e-5)
        assert not wrapper(x).requires_grad
    seen = {}
    handle = tap.register_forward_hook(lambda m, a, out: seen.setdefault("tokens", out))
    try:
        wrapper(x)
    finally:
        handle.remove()
    assert seen["tokens"].shape == (2, 17, 16)


class _Segmenter(nn.Module):
    """The parts of torchvision's segmentation models that TorchScript compiles into list and
    dict operators: `x.shape[-2:]` (a list slice), `F.interpolate` (a compiled function with
    a mangled name) and a dict filled item by item."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        size = x.shape[-2:]
        result = {}
        features = self.head(self.backbone(x))
        result["out"] = nn.functional.interpolate(
            features, size=size, mode="bilinear", align_corners=False
        )
        return result


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_scripted_segmentation_model_gives_the_eager_maps(tmp_path):
    """Before, expose_layer refused it: the mangled name `...___torch_mangle_N.interpolate`
    was "not importable here", and the list slice and dict assignment matched no schema
    (torchvision's scripted fcn_resnet50 failed the same way)."""
    from captum_ext.attr import GradCAM

    torch.manual_seed(0)
    model = _Segmenter().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    head = lambda output: output["out"]  # noqa: E731
    eager = GradCAM(model, "backbone.1", output_transform=head).attribute(x, target=(1, 5, 7))
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, str(tmp_path / "segmenter.pt"))
    for compiled in (scripted, torch.jit.load(str(tmp_path / "segmenter.pt"))):
        forward, tap = torchscript.expose_layer(compiled, "backbone.1", example=x)
        maps = GradCAM(forward, tap, output_transform=head).attribute(x, target=(1, 5, 7))
        torch.testing.assert_close(maps, eager)


def test_python_errors_name_the_python_argument():
    """expose_layer is Python API: its errors said `--layer` (the command line's option) and
    told the caller to use --weights. They name `layer` now; ``captum-ext report`` turns
    `layer`= into `--layer`= (tests/test_cli.py)."""
    model = _scripted()
    with pytest.raises(ValueError, match=r"^`layer`='conv0' is not a module") as error:
        torchscript.expose_layer(model, "conv0")
    assert "--layer" not in str(error.value)
    with pytest.raises(TypeError, match=r"^`layer` must be given by its dotted name"):
        torchscript.expose_layer(model, nn.ReLU())
    eager = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match="`layer`") as error:
        torchscript.expose_layer(eager, "nope")
    assert "--layer" not in str(error.value)


def test_the_fallback_advice_names_the_eager_model(monkeypatch):
    model = torch.jit.script(_Asserting().eval())

    def broken(self, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(torchscript.TorchScriptLayerModel, "forward", broken)
    with pytest.raises(ValueError, match=r"Explain the eager model instead") as error:
        torchscript.expose_layer(model, "conv", torch.randn(1, 1, 8, 8))
    assert "`--layer`" not in str(error.value)


def test_expose_final_layer_checks_the_layer_it_exposes_too():
    """With a mistyped `layer` it built a wrapper whose tap never ran; the report's default
    sections (trust among them) then said "`layer` ran 0 times" instead of naming the
    closest layers."""
    model = _scripted()
    with pytest.raises(ValueError, match=r"^`layer`='0x' is not a module.*Closest names: 0"):
        torchscript.expose_final_layer(model, layer="0x", example=torch.randn(2, 1, 4, 4))


@pytest.mark.parametrize("layer", [nn.ReLU(), 3])
def test_expose_final_layer_names_a_layer_given_otherwise_than_by_name(layer):
    with pytest.raises(TypeError, match=r"^`layer` must be given by its dotted name"):
        torchscript.expose_final_layer(_scripted(), layer=layer)
