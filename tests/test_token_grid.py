"""``expose_token_grid``: a vision transformer's patch tokens as a layer with a grid output, and
``captum-ext report`` on a vision transformer (which failed: "cannot upsample maps of shape
(3, 1, 768)")."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from _helpers import assert_model_unchanged, importable_module, model_snapshot
from torchvision.models import SwinTransformer, VisionTransformer

from captum_ext.attr import VOICE, ContrastCAM, GradCAM, LayerIBA
from captum_ext.cli import main
from captum_ext.token_grid import (
    TokenGridModel,
    expose_token_grid,
    grid_reaches_output,
    looks_channels_last,
    token_grid_shape,
)

LAYER = "encoder.layers.encoder_layer_1.ln_1"  # (N, 1 + 16, 16)


def fold(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)


def with_head(model: VisionTransformer) -> VisionTransformer:
    """torchvision zero-initialises a ViT's head: every logit, gradient and map would be 0."""
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 1)
        model.heads.head.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return with_head(VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5)).eval()


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
    assert bool((on_grid.flatten(1) > 0).any(dim=1).all())  # a map in every row, not zeros
    torch.testing.assert_close(on_grid, reshaped)
    every = ContrastCAM(wrapped, wrapped.grid).attribute(x, contrast="all")
    every_reshaped = ContrastCAM(vit, LAYER).attribute(x, contrast="all", reshape_transform=fold)
    assert every.shape == (3, 5, 4, 4) and bool((every > 0).any())
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
    with pytest.raises(ValueError, match=r"reads as \(N, C, h, w\) already"):
        expose_token_grid(vit, "conv_proj", x[:1])
    with pytest.raises(ValueError, match=r"not \(N, tokens, D\)"):
        expose_token_grid(vit, "heads", x[:1])
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
    from torchvision.models import SwinTransformer, VisionTransformer


    def tiny_vit():
        torch.manual_seed(0)
        model = VisionTransformer(224, 56, 1, 2, 16, 32, num_classes=4)
        with torch.no_grad():  # torchvision's fresh ViT head is all zeros
            model.heads.head.weight.normal_(0, 1)
        return model.eval()


    def tiny_vit_without_head():
        torch.manual_seed(0)
        return VisionTransformer(224, 56, 1, 2, 16, 32, num_classes=4).eval()


    def tiny_swin():
        from torchvision.models import SwinTransformer

        torch.manual_seed(0)
        return SwinTransformer([4, 4], 8, [1, 1, 1, 1], [1, 1, 1, 1], [2, 2], num_classes=5).eval()
    """
)


@pytest.fixture
def vit_module(tmp_path, monkeypatch):
    yield from importable_module("_token_grid_models", MODULE, tmp_path, monkeypatch)


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
    argv += ["--layer", "encoder.layers.encoder_layer_0.ln_1", "--sections", "contrastive,voice"]
    assert main(argv + ["--no-progress", "--out", str(out)]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert (
        "Explaining the 4 x 4 patch tokens of 'encoder.layers.encoder_layer_0.ln_1' as a map"
        in said
    )
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "its 4 x 4 patch tokens as a map" in html and "left out" not in html
    # the captions name the user's layer, not the wrapper's "grid"
    assert "at layer encoder.layers.encoder_layer_0.ln_1 (its 4 x 4 patch tokens" in html
    assert "at layer grid" not in html


# ------------------------------------------------------------ channels-last stages (Swin)


@pytest.fixture(scope="module")
def swin() -> SwinTransformer:
    torch.manual_seed(0)
    return SwinTransformer([4, 4], 8, [1, 1], [1, 1], [2, 2], num_classes=3).eval()


def test_a_channels_last_stage_is_read_as_a_grid(swin, x):
    """features.3 outputs (N, 4, 4, 16): the CAM of the grid equals the CAM with the
    permutation as ``reshape_transform``."""
    before = model_snapshot(swin)
    wrapped = expose_token_grid(swin, "features.3", x[:1])
    assert (wrapped.layout, wrapped.leading, wrapped.grid_size) == ("channels_last", 0, (4, 4))
    torch.testing.assert_close(wrapped(x), swin(x), rtol=0, atol=0)
    on_grid = GradCAM(wrapped, wrapped.grid).attribute(x, target=[0, 1, 2])
    permuted = GradCAM(swin, "features.3").attribute(
        x, target=[0, 1, 2], reshape_transform=lambda t: t.permute(0, 3, 1, 2)
    )
    assert on_grid.shape == (3, 1, 4, 4)
    torch.testing.assert_close(on_grid, permuted)
    assert_model_unchanged(swin, before)


@pytest.mark.parametrize(
    ("shape", "size", "expected"),
    [
        ((2, 7, 7, 768), (224, 224), True),  # Swin
        ((2, 512, 7, 7), (224, 224), False),  # ResNet
        ((2, 7, 10, 768), (224, 320), True),
        ((2, 512, 7, 10), (224, 320), False),
        ((2, 7, 7, 7), (224, 224), False),  # ambiguous: channels first
        ((2, 17, 16), (32, 32), False),
    ],
)
def test_looks_channels_last(shape, size, expected):
    assert looks_channels_last(shape, size) is expected


def test_report_on_a_swin_transformer(tmp_path, capsys, vit_module):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    pixels = torch.rand(240, 250, 3, generator=torch.Generator().manual_seed(0)) * 255
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(images / "im.png")
    argv = ["report", "--model", f"{vit_module}:tiny_swin", "--images", str(images)]
    argv += ["--sections", "contrastive", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert "Explaining layer 'permute', the last stage (after its norm)" in capsys.readouterr().out
    assert main(argv + ["--layer", "features.7", "--out", str(tmp_path / "b")]) == 0
    said = capsys.readouterr().out
    assert "Reading the channels-last output of 'features.7' as N x C x 7 x 7." in said
    html = (tmp_path / "b" / "index.html").read_text(encoding="utf-8")
    assert "features.7 (channels last: read as N x C x 7 x 7)" in html


def test_exposing_leaves_a_model_of_mixed_modes_as_it_was(x):
    """The layer's shape is read in eval mode; a model in train mode with one block kept in
    eval by the user (a frozen part) comes back with exactly those modes."""
    torch.manual_seed(0)
    model = with_head(VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5)).train()
    model.encoder.layers.encoder_layer_0.eval()
    modes = {name: module.training for name, module in model.named_modules()}
    before = model_snapshot(model)
    expose_token_grid(model, LAYER, x[:1])
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert_model_unchanged(model, before)


# ------------------------------------------- layers whose patch tokens never reach the output


LAST_BLOCK = "encoder.layers.encoder_layer_1"  # only its class token is read after it


def test_grid_reaches_output_tells_the_last_block_from_its_first_norm(vit, x):
    """After the last block the head reads the class token alone: the patch tokens of the
    block's output have exactly zero gradients, those of its first norm do not."""
    before = model_snapshot(vit)
    reaching = expose_token_grid(vit, LAYER, x[:1])
    assert grid_reaches_output(reaching, x[:1]) is True and reaching.reaches_output is True
    with pytest.warns(UserWarning, match="do not reach the model's output"):
        blind = expose_token_grid(vit, LAST_BLOCK, x[:1])
    assert grid_reaches_output(blind, x[:1]) is False and blind.reaches_output is False
    assert all(p.grad is None for p in vit.parameters())  # the check leaves no gradients
    assert not reaching.grid._forward_hooks and not blind.grid._forward_hooks
    assert_model_unchanged(vit, before)
    # the definition: the patch tokens' gradient of the output, by hand
    store = {}
    block = dict(vit.named_modules())[LAST_BLOCK]

    def keep(module, args, output):
        store["tokens"] = output.detach().requires_grad_()
        return store["tokens"]

    handle = block.register_forward_hook(keep)
    try:
        (gradient,) = torch.autograd.grad(vit(x[:1]).sum(), store["tokens"])
    finally:
        handle.remove()
    assert bool(gradient[:, 0].ne(0).any()) and not bool(gradient[:, 1:].ne(0).any())


def test_cams_and_voice_warn_when_every_gradient_at_the_layer_is_zero(vit, x):
    blind = GradCAM(vit, LAST_BLOCK)
    with pytest.warns(UserWarning, match="exactly zero for every input") as caught:
        maps = blind.attribute(x, target=[0, 1, 2], reshape_transform=fold)
    assert not bool(maps.ne(0).any())
    assert caught[0].filename == __file__  # points at the caller, not at captum_ext
    with pytest.warns(UserWarning, match="ViT has an all-zero head"):
        VOICE(GradCAM(vit, LAST_BLOCK)).attribute(x, target=[0, 1, 2], reshape_transform=fold)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layer that reaches the output: no warning
        GradCAM(vit, LAYER).attribute(x, target=[0, 1, 2], reshape_transform=fold)
        VOICE(GradCAM(vit, LAYER)).attribute(x, target=[0, 1, 2], reshape_transform=fold)


def test_the_default_layer_of_a_vit_is_its_last_blocks_first_norm(vit):
    from captum_ext.data import default_cam_layer

    assert default_cam_layer(vit) == LAYER
    deeper = VisionTransformer(32, 8, 12, 2, 16, 32, num_classes=5)
    assert default_cam_layer(deeper) == "encoder.layers.encoder_layer_11.ln_1"


def _two_images(folder):
    from PIL import Image

    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(240, 250, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"im{i}.png")
    return folder


def test_report_refuses_a_layer_whose_tokens_never_reach_the_output(tmp_path, capsys, vit_module):
    images = _two_images(tmp_path / "images")
    argv = ["report", "--images", str(images), "--sections", "contrastive", "--no-progress"]
    argv += ["--out", str(tmp_path / "out")]
    last = ["--model", f"{vit_module}:tiny_vit", "--layer", "encoder.layers.encoder_layer_0"]
    assert main(argv + last) == 2
    said = capsys.readouterr().err
    assert "'encoder.layers.encoder_layer_0': its patch tokens do not reach" in said
    assert "encoder_layer_<last>.ln_1" in said
    assert main(argv + ["--model", f"{vit_module}:tiny_vit_without_head"]) == 2
    assert "all-zero head" in capsys.readouterr().err


def test_report_on_a_vit_without_layer_explains_the_last_blocks_first_norm(
    tmp_path, capsys, vit_module
):
    images = _two_images(tmp_path / "images")
    argv = ["report", "--model", f"{vit_module}:tiny_vit", "--images", str(images)]
    argv += ["--sections", "contrastive", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "encoder.layers.encoder_layer_0.ln_1" in said


def test_a_channels_last_stage_without_the_permutation_is_refused(swin, x):
    """Before, (N, 4, 4, 16) was read as 4 channels of 4 x 16 maps: the CAMs and VOICE
    returned maps over (w, features), and upsampling stretched them to a plausible image."""
    from captum.attr import LayerGradCam

    from captum_ext.attr import CounterfactualCAM, FinerCAM, LayerGradCamPlusPlus

    calls = {
        "GradCAM": lambda: GradCAM(swin, "features.3").attribute(x, target=0),
        "ContrastCAM": lambda: ContrastCAM(swin, "features.3").attribute(x, upsample_to_input=True),
        "CounterfactualCAM": lambda: CounterfactualCAM(swin, "features.3").attribute(x),
        "LayerGradCamPlusPlus": lambda: LayerGradCamPlusPlus(swin, "features.3").attribute(x),
        "FinerCAM": lambda: FinerCAM(swin, "features.3").attribute(x),
        "VOICE": lambda: VOICE(GradCAM(swin, "features.3")).attribute(x),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"channels-last grid \(4 x 4 positions of 16") as info:
            call()
        assert "t.permute(0, 3, 1, 2)" in str(info.value), name
    # Captum's own LayerGradCam is not ours to change; the permuted CAM is the grid's
    assert LayerGradCam(swin, swin.features[3]).attribute(x, target=0).shape == (3, 1, 4, 16)


class _PatchTransformer(torch.nn.Module):
    """A pre-norm ViT of 8-pixel patches and a class token, for any grid of rows x columns."""

    def __init__(self, rows: int, columns: int, width: int = 16, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv2d(3, width, 8, stride=8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, width) * 0.1)
        self.pos = torch.nn.Parameter(torch.randn(1, 1 + rows * columns, width) * 0.1)
        block = torch.nn.TransformerEncoderLayer(
            width, 2, 32, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(block, 1, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, images):
        tokens = self.patch(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1) + self.pos
        return self.head(self.encoder(tokens)[:, 0])


def test_tokens_of_non_square_images_are_refused_with_their_grid():
    """The token check took only square images: on 32 x 64 images (4 x 8 patches) the CAMs
    returned (N, 1, D) maps over the embedding without a word. The fold the message names
    gives the patch grid's map, the map of the token-grid wrapper."""
    import re

    model = _PatchTransformer(4, 8).eval()
    layer = "encoder.layers.0.norm1"
    images = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"a class token and 4 x 8 patches") as info:
        GradCAM(model, layer).attribute(images, target=[0, 1])
    with pytest.raises(ValueError, match=r"a class token and 4 x 8 patches"):
        ContrastCAM(model, layer).attribute(images)
    fold = eval(re.search(r"reshape_transform=(lambda t: [^`]*)`", str(info.value)).group(1))
    maps = GradCAM(model, layer).attribute(images, target=[0, 1], reshape_transform=fold)
    wrapped = expose_token_grid(model, layer, images[:1], leading=1, grid_size=(4, 8))
    assert maps.shape == (2, 1, 4, 8)
    torch.testing.assert_close(
        maps, GradCAM(wrapped, wrapped.grid).attribute(images, target=[0, 1])
    )
