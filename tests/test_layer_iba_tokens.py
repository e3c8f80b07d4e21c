"""LayerIBA on layers that are not N x C x h x w: vision transformers' (N, tokens, D) through
``reshape_transform``, the convention of the CAM classes.

The bottleneck runs in the layer's own layout (one alpha, mean and standard deviation per
token feature, no blur: a blur needs a grid), and the capacity or lambda is folded into
(N, D, h, w) maps at the end. Checked against the KL formula of the spec written out by hand
on the layer's activations, and, on a convolutional layer, against the plain 4-D path.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from torchvision.models import VisionTransformer

from captum_ext.attr import LayerIBA

LAYER = "encoder.layers.encoder_layer_1.ln_1"  # (N, 1 + 16 tokens, 16): reaches the head


def fold(tokens: torch.Tensor) -> torch.Tensor:
    """(N, 1 + 16, D) -> (N, D, 4, 4): the class token dropped, the patches on their grid."""
    return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )  # fmt: skip
    with torch.no_grad():  # torchvision zero-initialises the head: all gradients would be 0
        model.heads.head.weight.normal_(0, 1)
        model.heads.head.bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def estimated(vit, images) -> LayerIBA:
    iba = LayerIBA(vit, LAYER)
    iba.estimate(images)
    return iba


def _tokens(model, x) -> torch.Tensor:
    store = {}
    module = dict(model.named_modules())[LAYER]
    handle = module.register_forward_hook(lambda m, a, out: store.setdefault("out", out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return store["out"]


def test_first_step_capacity_is_the_kl_of_the_spec_folded(vit, images, estimated):
    """steps=1: the map is the capacity at alpha = init_alpha, before any update."""
    x = images[:3]
    init_alpha = 2.0
    capacity = estimated.attribute(
        x, target=[0, 1, 2], steps=1, sigma=None, init_alpha=init_alpha,
        reshape_transform=fold, return_type="capacity",
    )  # fmt: skip
    tokens = _tokens(vit, x).double()
    lam = 1.0 / (1.0 + math.exp(-init_alpha))
    std = estimated.std.double().clamp_min(0.01)
    r = (tokens - estimated.mean.double()) / std
    kl = -0.5 * (1 + math.log((1 - lam) ** 2) - (lam * r) ** 2 - (1 - lam) ** 2)
    expected_bits = fold(kl * estimated.active.double()) / math.log(2)
    assert capacity.shape == (3, 16, 4, 4)
    torch.testing.assert_close(capacity.double(), expected_bits, rtol=1e-5, atol=1e-6)


def test_token_maps_bits_capacity_lambda_and_upsampling(vit, images, estimated):
    before = model_snapshot(vit)
    x = images[:3]
    common = dict(target=[0, 1, 2], sigma=None, steps=4, reshape_transform=fold)
    bits = estimated.attribute(x, generator=5, **common)
    capacity = estimated.attribute(x, generator=5, return_type="capacity", **common)
    lam = estimated.attribute(x, generator=5, return_type="lambda", **common)
    assert bits.shape == (3, 1, 4, 4) and lam.shape == (3, 16, 4, 4)
    torch.testing.assert_close(bits, capacity.sum(dim=1, keepdim=True))
    assert bool(((lam > 0) & (lam < 1)).all()) and bool((bits >= 0).all())
    upsampled = estimated.attribute(x, generator=5, upsample_to_input=True, **common)
    assert upsampled.shape == (3, 1, 32, 32)
    torch.testing.assert_close(upsampled.sum(dim=(2, 3)), bits.sum(dim=(2, 3)))
    # optimising moved the map: the information term lowers the bits below the first step's
    first = estimated.attribute(x, generator=5, **{**common, "steps": 1})
    assert bool((bits.sum(dim=(1, 2, 3)) < first.sum(dim=(1, 2, 3))).all())
    assert_model_unchanged(vit, before)


def test_token_layer_errors_name_the_argument(images, estimated):
    x = images[:2]
    with pytest.raises(ValueError, match=r"\(2, 17, 16\).*`reshape_transform`"):
        estimated.attribute(x, target=0, sigma=None)
    with pytest.raises(ValueError, match=r"`sigma`.*sigma=None"):
        estimated.attribute(x, target=0, reshape_transform=fold)
    with pytest.raises(ValueError, match="`reshape_transform` returned"):
        estimated.attribute(x, target=0, sigma=None, reshape_transform=lambda t: t[:, 1:])
    with pytest.raises(TypeError, match="`reshape_transform` must be callable"):
        estimated.attribute(x, target=0, sigma=None, reshape_transform="fold")


def test_identity_reshape_on_a_convolutional_layer_equals_the_plain_path(
    bundled_model, sample_digits, bundled_cam_layer
):
    """A 4-D layer given an identity ``reshape_transform``: the same bottleneck, the same
    noise draws, so the same maps as without it (both unblurred)."""
    x = sample_digits[0][:4]
    iba = LayerIBA(bundled_model, bundled_cam_layer)
    iba.estimate(sample_digits[0])
    plain = iba.attribute(x, sigma=None, steps=3, generator=0)
    through = iba.attribute(x, sigma=None, steps=3, generator=0, reshape_transform=lambda t: t)
    torch.testing.assert_close(through, plain, rtol=0, atol=0)


def test_a_bottleneck_the_loss_does_not_depend_on_is_said(vit, images):
    """After the last block only the class token reaches the head: a bottleneck on its patch
    tokens trades nothing against the information cost, and the user is told (at their own
    line); on the block's first norm the loss depends on the patch tokens and nothing is said."""
    import warnings

    blind = LayerIBA(vit, "encoder.layers.encoder_layer_1")
    blind.estimate(images)
    with pytest.warns(UserWarning, match="does not depend on the bottleneck") as caught:
        blind.attribute(images[:2], target=[0, 1], steps=2, sigma=None, reshape_transform=fold)
    assert caught[0].filename == __file__
    seeing = LayerIBA(vit, LAYER)
    seeing.estimate(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seeing.attribute(images[:2], target=[0, 1], steps=2, sigma=None, reshape_transform=fold)
