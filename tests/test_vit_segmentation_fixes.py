"""Vision transformers laid out tokens-first, Contrastive on segmentation outputs, and the
messages around token layers.

- A transformer built on ``nn.TransformerEncoderLayer``'s default layout (``batch_first=False``:
  tokens ``(T, N, D)``) was read batch-first: ``expose_token_grid`` inferred a 1 x 1 grid of
  the batch axis and GradCAM returned 17 "maps" for one image, without an error.
- ``Contrastive`` refused the per-pixel ``contrast=(q, h, w)`` that ContrastCAM takes on a
  segmentation output, saying the model returns (N, C) logits.
- The "no spatial dimensions" error for a ViT's head suggested ``encoder`` and
  ``encoder.ln``, whose patch tokens never reach the output (all-zero maps).
- ``expose_token_grid`` on a tuple output said "`layer` outputs ()"; a ``reshape_transform``
  that returned tokens got the advice to pass a ``reshape_transform``.
"""

from __future__ import annotations

import re

import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from captum.attr import DeepLift, LayerGradCam, Saliency
from torch import nn
from torchvision.models import VisionTransformer

from captum_ext.attr import VOICE, ContrastCAM, Contrastive, GradCAM, LayerGradCamPlusPlus
from captum_ext.token_grid import expose_token_grid, layer_output_shape, token_grid_shape

NORM = "encoder.layers.1.norm1"  # the last block's first norm: (N, 17, 32) or (17, N, 32)


class TinyViT(nn.Module):
    """Patch convolution, class token, ``nn.TransformerEncoder`` of 2 pre-norm layers, and a
    head on the class token; ``batch_first=False`` runs the encoder on (tokens, N, D)."""

    def __init__(self, batch_first: bool = True, d: int = 32, classes: int = 5):
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, d, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, 2, 64, dropout=0.0, activation="gelu", batch_first=batch_first, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        if not self.batch_first:
            t = t.transpose(0, 1)
        t = self.encoder(t)
        if not self.batch_first:
            t = t.transpose(0, 1)
        return self.head(self.norm(t[:, 0]))


def tiny_vit(batch_first: bool = True) -> TinyViT:
    torch.manual_seed(0)  # the same weights for both layouts
    return TinyViT(batch_first=batch_first).eval()


def fold(tokens: torch.Tensor) -> torch.Tensor:
    """Batch-first (N, 1 + 16, D) tokens -> (N, D, 4, 4)."""
    return tokens[:, 1:].reshape(len(tokens), 4, 4, -1).permute(0, 3, 1, 2)


def fold_tokens_first(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens-first (1 + 16, N, D) tokens -> (N, D, 4, 4)."""
    return fold(tokens.transpose(0, 1))


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def torchvision_vit() -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=5)
    nn.init.normal_(vit.heads.head.weight)  # torchvision's fresh head is all zeros
    return vit.eval()


@pytest.fixture(scope="module")
def fcn() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 4, 1),  # 4 classes per pixel
        )
        .double()
        .eval()
    )


# --------------------------------------------------------------------------------------------
# D1: tokens-first layers


@pytest.mark.parametrize("n", [1, 3])
def test_expose_token_grid_refuses_a_tokens_first_layer(n):
    """Was: a "1 x 1 grid" (n=1: the batch axis read as the tokens) without an error."""
    model = tiny_vit(batch_first=False)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="tokens-first") as info:
        expose_token_grid(model, NORM, images(n))
    message = str(info.value)
    assert f"(17, {n}, 32)" in message and "batch_first=True" in message
    assert "`layer`" in message
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("cam", [GradCAM, ContrastCAM, LayerGradCamPlusPlus])
def test_cams_refuse_a_tokens_first_layer(cam, n):
    """Was: 17 maps for one image (the tokens read as examples), no error."""
    model = tiny_vit(batch_first=False)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="tokens-first") as info:
        cam(model, NORM).attribute(images(n))
    message = str(info.value)
    assert f"`layer` '{NORM}' (LayerNorm) output has shape (17, {n}, 32)" in message
    assert "batch_first=True" in message and "reshape_transform" in message
    assert_model_unchanged(model, before)


def test_voice_refuses_a_tokens_first_layer():
    model = tiny_vit(batch_first=False)
    with pytest.raises(ValueError, match="tokens-first"):
        VOICE(GradCAM(model, NORM)).attribute(images(2))


@pytest.mark.parametrize("n", [1, 3, 17])
def test_a_transposing_reshape_transform_explains_a_tokens_first_layer(n):
    """The remedy the message gives works: the maps of the tokens-first model equal those of
    the same weights run batch-first. n=17 (the token count) cannot be told from the shape,
    and the transform written for the layer's layout still gives the right maps."""
    batch_first, tokens_first = tiny_vit(), tiny_vit(batch_first=False)
    x = images(n)
    torch.testing.assert_close(tokens_first(x), batch_first(x), rtol=1e-5, atol=1e-6)
    target = [i % 5 for i in range(n)]
    for cam, kwargs in (
        (GradCAM, {"target": target}),
        (ContrastCAM, {"contrast": "all"}),
        (LayerGradCamPlusPlus, {"target": target}),
        (GradCAM, {"target": target, "attr_dim_summation": False}),
    ):
        expected = cam(batch_first, NORM).attribute(x, reshape_transform=fold, **kwargs)
        got = cam(tokens_first, NORM).attribute(x, reshape_transform=fold_tokens_first, **kwargs)
        assert got.shape == expected.shape and got.shape[0] == n
        assert bool((expected != 0).any())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_reshape_transform_must_put_the_examples_first():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"`reshape_transform` returned a tensor of shape "):
        GradCAM(model, NORM).attribute(
            images(3), target=0, reshape_transform=lambda t: fold(t).transpose(0, 1)
        )


@pytest.mark.parametrize("n", [1, 3])
def test_layers_with_the_examples_first_are_never_refused(n, torchvision_vit):
    x = images(n)
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    assert GradCAM(cnn, "1").attribute(x, target=0).shape == (n, 1, 30, 30)
    assert GradCAM(cnn, "1").attribute(x, target=0, attribute_to_layer_input=True).shape == (
        n,
        1,
        30,
        30,
    )
    layer = "encoder.layers.encoder_layer_1.ln_1"
    assert GradCAM(torchvision_vit, layer).attribute(x, target=0, reshape_transform=fold).shape == (
        n,
        1,
        4,
        4,
    )
    wrapped = expose_token_grid(torchvision_vit, layer, x)
    assert (wrapped.leading, wrapped.grid_size) == (1, (4, 4))
    assert GradCAM(wrapped, wrapped.grid).attribute(x, target=0).shape == (n, 1, 4, 4)
    model = tiny_vit()
    assert layer_output_shape(model, model.get_submodule(NORM), x) == (n, 17, 32)
    # a tuple output (nn.MultiheadAttention's) reads as () as before
    assert layer_output_shape(model, model.get_submodule("encoder.layers.1.self_attn"), x) == ()


def test_layer_output_shape_refuses_a_tokens_first_layer():
    model = tiny_vit(batch_first=False)
    with pytest.raises(ValueError, match="tokens-first"):
        layer_output_shape(model, model.get_submodule(NORM), images(2))


@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_no_grid_of_fewer_than_two_patches_is_inferred(tokens):
    assert token_grid_shape(tokens) is None
    assert token_grid_shape(4) == (0, (2, 2)) and token_grid_shape(5) == (1, (2, 2))


class OneToken(nn.Module):
    """A batch-first token layer of one token per example: ``tokens`` outputs (N, 1, 6)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3 * 4 * 4, 6)
        self.tokens = nn.Identity()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.tokens(self.embed(x.flatten(1)).unsqueeze(1))[:, 0])


def test_expose_token_grid_infers_no_one_by_one_grid():
    model, x = OneToken().eval(), torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"at least 2 x 2 patches"):
        expose_token_grid(model, "tokens", x)
    with pytest.raises(ValueError, match=r"at least 2 x 2 patches"):
        expose_token_grid(model, "tokens", x, leading=0)
    wrapped = expose_token_grid(model, "tokens", x, leading=0, grid_size=(1, 1))  # explicit
    assert wrapped.grid_size == (1, 1)


# --------------------------------------------------------------------------------------------
# minor messages


def test_expose_token_grid_names_a_tuple_output():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"outputs a tuple of a \(1, 17, 32\) tensor and None"):
        expose_token_grid(model, "encoder.layers.1.self_attn", images(1))


def test_a_reshape_transform_that_returns_tokens_is_named(torchvision_vit):
    layer = "encoder.layers.encoder_layer_1.ln_1"
    with pytest.raises(ValueError) as info:
        GradCAM(torchvision_vit, layer).attribute(
            images(3), target=0, reshape_transform=lambda t: t[:, 1:]
        )
    message = str(info.value)
    assert message.startswith("`reshape_transform` returned a tensor of shape (3, 16, 32)")
    assert "(3, 17, 32)" in message and "(3, 32, 4, 4)" in message
    assert "`layer` outputs" not in message and "Pass `reshape_transform`" not in message
    with pytest.raises(ValueError, match=r"`reshape_transform` returned .* end it with"):
        GradCAM(torchvision_vit, layer).attribute(
            images(3), target=0, reshape_transform=lambda t: fold(t).permute(0, 2, 3, 1)
        )


# --------------------------------------------------------------------------------------------
# D3: Contrastive on a segmentation output


def _pixel_cross_entropy_gradient(model, x, pixels):
    """float64 autograd: d sum_n CE(model(x)[n, :, h_n, w_n], q_n) / d x."""
    x = x.detach().clone().requires_grad_()
    cross_entropy = -torch.log_softmax(model(x), dim=1)
    score = sum(cross_entropy[n, q, h, w] for n, (q, h, w) in enumerate(pixels))
    return torch.autograd.grad(score, x)[0]


def test_contrastive_explains_a_pixel_as_contrast_cam_does(fcn):
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = model_snapshot(fcn)
    saliency = Contrastive(Saliency, fcn)
    got = saliency.attribute(x, contrast=(1, 5, 7), abs=False)
    expected = _pixel_cross_entropy_gradient(fcn, x, [(1, 5, 7)] * 2)
    assert bool((expected != 0).any())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-15)
    per_example = saliency.attribute(x, contrast=[(1, 5, 7), (0, -1, 2)], abs=False)
    expected = _pixel_cross_entropy_gradient(fcn, x, [(1, 5, 7), (0, 15, 2)])
    torch.testing.assert_close(per_example, expected, rtol=1e-10, atol=1e-15)
    # the documented equality with ContrastCAM holds on segmentation outputs too
    cam = Contrastive(LayerGradCam, fcn, fcn[3]).attribute(
        x, contrast=[(2, 3, 4), (0, 8, 8)], relu_attributions=True
    )
    reference = ContrastCAM(fcn, "3").attribute(x, contrast=[(2, 3, 4), (0, 8, 8)])
    assert bool((reference > 0).any())
    torch.testing.assert_close(cam, reference, rtol=1e-10, atol=1e-14)
    # DeepLift's rescale rule for the per-pixel cross-entropy: attributions sum to the change
    _, delta = Contrastive(DeepLift, fcn).attribute(
        x, contrast=(2, 3, 4), return_convergence_delta=True
    )
    assert float(delta.abs().max()) < 1e-10
    assert_model_unchanged(fcn, before)


@pytest.mark.parametrize("contrast", [1, [0, 1], "all", None, torch.tensor([[0, 1]])])
def test_contrastive_names_the_forms_a_segmentation_output_takes(fcn, contrast):
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        Contrastive(Saliency, fcn).attribute(x, contrast=contrast)
    message = str(info.value)
    assert "(N, 4, 16, 16)" in message
    assert "returns (N, C) logits" not in message
    assert "h, w" in message


def test_a_pixel_contrast_on_class_logits_still_says_so():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    with pytest.raises(ValueError, match=r"forward_func returns \(N, C\) logits"):
        Contrastive(Saliency, model).attribute(torch.randn(2, 3, 2, 2).double(), contrast=(1, 2))


# --------------------------------------------------------------------------------------------
# D4: the layers suggested for a ViT's head


def _suggested(message: str) -> list[str]:
    tail = message.split("reach the output): ")[1].split(". A token layer")[0]
    return re.findall(r"'([^']+)'", tail)


def test_the_head_error_suggests_token_layers_that_reach_the_output(torchvision_vit):
    x = images(2)
    for parameter in torchvision_vit.parameters():
        parameter.requires_grad_(False)  # frozen: the check turns gradients on, then back off
    try:
        before = model_snapshot(torchvision_vit)
        with pytest.raises(ValueError, match="without spatial dimensions") as info:
            GradCAM(torchvision_vit, "heads.head").attribute(x, target=0)
        assert_model_unchanged(torchvision_vit, before)
    finally:
        for parameter in torchvision_vit.parameters():
            parameter.requires_grad_(True)
    suggested = _suggested(str(info.value))
    assert suggested[0] == "encoder.layers.encoder_layer_1.ln_1"
    assert "encoder" not in suggested and "encoder.ln" not in suggested
    assert "t[:, 1:].transpose(1, 2).unflatten(2, (4, 4))" in str(info.value)
    for name in suggested:  # every suggested layer gives maps, not zeros
        transform = fold if name != "conv_proj" else None
        maps = GradCAM(torchvision_vit, name).attribute(
            x, target=0, reshape_transform=transform, relu_attributions=False
        )
        assert bool((maps != 0).any()), name


def test_the_head_error_of_a_transformer_encoder_suggests_the_last_norm():
    with pytest.raises(ValueError, match="without spatial dimensions") as info:
        GradCAM(tiny_vit(), "head").attribute(images(2), target=0)
    suggested = _suggested(str(info.value))
    assert suggested[0] == NORM and "encoder" not in suggested
