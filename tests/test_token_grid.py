"""``expose_token_grid``: a vision transformer's patch tokens as a layer with a grid output, and
``captum-ext report`` on a vision transformer (which failed: "cannot upsample maps of shape
(3, 1, 768)")."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from torchvision.models import VisionTransformer

from captum_ext.attr import ContrastCAM, GradCAM, LayerIBA
from captum_ext.cli import main
from captum_ext.token_grid import TokenGridModel, expose_token_grid, token_grid_shape

LAYER = "encoder.layers.encoder_layer_1.ln_1"  # (N, 1 + 16, 16)


def fold(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_the_wrapper_computes_the_model_and_leaves_no_hook(vit, x):
    before = model_snapshot(vit)
    wrapped = expose_token_grid(vit, LAYER, x[:1])
    assert isinstance(wrapped, TokenGridModel)
    assert (wrapped.leading, wrapped.grid_size) == (1, (4, 4))
    assert not wrapped.training  # the eval model's mode, not nn.Module's default
    torch.testing.assert_close(wrapped(x), vit(x), rtol=0, atol=0)
    layer = dict(vit.named_modules())[LAYER]
    assert not layer._forward_hooks
    assert_model_unchanged(vit, before)


def test_cams_on_the_grid_equal_the_cams_with_reshape_transform(vit, x):
    """Two independent routes to the same maps: the grid module's activations and gradients,
    and the CAM classes' own reshape of the layer's tokens."""
    wrapped = expose_token_grid(vit, LAYER, x[:1])
    target = [0, 3, 4]
    on_grid = GradCAM(wrapped, wrapped.grid).attribute(x, target=target)
    reshaped = GradCAM(vit, LAYER).attribute(x, target=target, reshape_transform=fold)
    torch.testing.assert_close(on_grid, reshaped)
    every = ContrastCAM(wrapped, wrapped.grid).attribute(x, contrast="all")
    every_reshaped = ContrastCAM(vit, LAYER).attribute(x, contrast="all", reshape_transform=fold)
    assert every.shape == (3, 5, 4, 4)
    torch.testing.assert_close(every, every_reshaped)


def test_layer_iba_on_the_grid(vit, x):
    wrapped = expose_token_grid(vit, LAYER, x[:1])
    iba = LayerIBA(wrapped, wrapped.grid)
    iba.estimate(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    bits = iba.attribute(x, target=[0, 1, 2], steps=3, generator=0)
    assert bits.shape == (3, 1, 4, 4) and bool(torch.isfinite(bits).all())
    assert bool((bits >= 0).all())


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (197, (1, (14, 14))),
        (196, (0, (14, 14))),
        (198, (2, (14, 14))),
        (17, (1, (4, 4))),
        (7, None),
    ],
)
def test_token_grid_shape(tokens, expected):
    assert token_grid_shape(tokens) == expected


def test_errors_name_the_argument(vit, x):
    with pytest.raises(ValueError, match=r"not \(N, tokens, D\)"):
        expose_token_grid(vit, "conv_proj", x[:1])
    with pytest.raises(ValueError, match=r"`leading`=2 leaves 15"):
        expose_token_grid(vit, LAYER, x[:1], leading=2)
    with pytest.raises(ValueError, match=r"make 9 tokens, but `layer` outputs 17"):
        expose_token_grid(vit, LAYER, x[:1], leading=1, grid_size=(2, 4))
    wrapped = expose_token_grid(vit, LAYER, x[:1], leading=1, grid_size=(2, 8))
    assert wrapped.grid_size == (2, 8)  # a non-square grid when given
    with pytest.raises(TypeError, match="eager"):
        expose_token_grid(torch.jit.script(torch.nn.Linear(2, 2)), "weight", x[:1])


MODULE = textwrap.dedent(
    """
    import torch
    from torchvision.models import VisionTransformer


    def tiny_vit():
        torch.manual_seed(0)
        return VisionTransformer(224, 56, 1, 2, 16, 32, num_classes=4).eval()
    """
)


@pytest.fixture
def vit_module(tmp_path, monkeypatch):
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "_token_grid_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield "_token_grid_models"
    sys.modules.pop("_token_grid_models", None)


def test_report_on_a_vision_transformer(tmp_path, capsys, vit_module):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(240, 250, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"im{i}.png")
    out = tmp_path / "out"
    argv = ["report", "--model", f"{vit_module}:tiny_vit", "--images", str(images)]
    argv += ["--layer", "encoder.layers.encoder_layer_0", "--sections", "contrastive,voice"]
    assert main(argv + ["--no-progress", "--out", str(out)]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "Explaining the 4 x 4 patch tokens of 'encoder.layers.encoder_layer_0' as a map" in said
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "its 4 x 4 patch tokens as a map" in html and "left out" not in html
