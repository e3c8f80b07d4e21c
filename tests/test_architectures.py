"""ContrastCAM and friends on torchvision architectures (random weights, eval mode).

For each network: the maps of the last convolutional block (given by its dotted name) have the
expected shapes; ContrastCAM satisfies the identity of the spec,

    ContrastCAM_Q = sum_c p_c * GradCAM_c - GradCAM_Q      (ReLU off: maps are linear in the
                                                            channel weights)

against Captum's LayerGradCam class by class (CNNs) or a Grad-CAM written by hand (vision
transformers, through a ``reshape_transform`` written here); and row Q of ``contrast="all"``
equals the single call with Q. Layers followed by in-place operations (ResNet's and VGG's
``ReLU(inplace=True)``, DenseNet's functional in-place ReLU) are compared with a reference that
has no in-place operation.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, model_snapshot
from captum.attr import LayerGradCam
from torch import nn

from captum_ext.attr import ContrastCAM, CounterfactualCAM, LayerGradCamPlusPlus

torchvision = pytest.importorskip("torchvision")

NUM_CLASSES = 10

#: name -> (last convolutional block, input size, map size, slow)
CNNS = {
    "resnet18": ("layer4", 64, (2, 2), False),
    "vgg11": ("features.18", 64, (4, 4), False),
    "mobilenet_v3_small": ("features.12", 64, (2, 2), False),
    "densenet121": ("features.denseblock4", 64, (2, 2), False),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)
    if name == "vit_b_16":
        # torchvision zero-initialises the ViT head: every logit would be 0 and every map 0
        nn.init.normal_(model.heads.head.weight, std=0.05)
    return model.eval()


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def zoo():
    """Each network built once per module (the tests check that none is changed)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    yield get
    cache.clear()


def assert_maps_close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """float32 through deep networks: tolerance relative to the size of the maps."""
    assert got.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0, "degenerate test: all reference maps are zero"
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * scale)


def spec_identity(per_class: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) Grad-CAM maps per class, (N, C) probabilities -> ContrastCAM for every Q."""
    mixed = (probs[:, :, None, None] * per_class).sum(dim=1, keepdim=True)
    return mixed - per_class


def gradcam_by_hand(
    activations: torch.Tensor, logits: torch.Tensor, score, reshape=None
) -> torch.Tensor:
    """Grad-CAM maps (ReLU off) of score(logits)[:, c] for every class c, one backward each."""
    maps = []
    for c in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(score(logits)[:, c].sum(), activations, retain_graph=True)
        act, grad = activations.detach(), grad
        if reshape is not None:
            act, grad = reshape(act), reshape(grad)
        weights = grad.mean(dim=(2, 3))
        maps.append(torch.einsum("nk,nkhw->nhw", weights, act))
    return torch.stack(maps, dim=1)


def cnn_params():
    return [
        pytest.param(name, marks=pytest.mark.slow) if slow else name
        for name, (_, _, _, slow) in CNNS.items()
    ]


# ------------------------------------------------------------------ CNNs


@pytest.mark.parametrize("name", cnn_params())
def test_cnn_shapes(name, zoo):
    model = zoo(name)
    layer, size, map_size, _ = CNNS[name]
    x = images(2, size)
    before = model_snapshot(model)
    cam = ContrastCAM(model, layer)
    assert cam.layer is dict(model.named_modules())[layer]
    maps = cam.attribute(x)
    assert maps.shape == (2, 1, *map_size)
    assert bool((maps >= 0).all()) and bool(torch.isfinite(maps).all())
    published = cam.attribute(x, contrast=[3, 7], upsample_to_input=True, normalize="minmax")
    assert published.shape == (2, 1, size, size)
    assert float(published.min()) >= 0 and float(published.max()) <= 1
    counterfactual = CounterfactualCAM(model, layer).attribute(x, target=torch.tensor([0, 9]))
    assert counterfactual.shape == (2, 1, *map_size)
    plus_plus = LayerGradCamPlusPlus(model, layer).attribute(x, target=[[1, 2, 5]])
    assert plus_plus.shape == (2, 3, *map_size)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("name", cnn_params())
def test_cnn_spec_identity_against_captum_and_all_equals_single(name, zoo):
    model = zoo(name)
    layer_name, size, map_size, _ = CNNS[name]
    layer = dict(model.named_modules())[layer_name]
    x = images(2, size)
    before = model_snapshot(model)
    every = ContrastCAM(model, layer_name).attribute(x, contrast="all", relu_attributions=False)
    assert every.shape == (2, NUM_CLASSES, *map_size)

    gradcam = LayerGradCam(model, layer)
    per_class = torch.cat(
        [
            gradcam.attribute(x, target=c, relu_attributions=False).detach()
            for c in range(NUM_CLASSES)
        ],
        dim=1,
    )
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    assert_maps_close(every, spec_identity(per_class, probs))

    cam = ContrastCAM(model, layer_name)
    for q in (0, 7):
        single = cam.attribute(x, contrast=q, relu_attributions=False)
        assert_maps_close(single, every[:, q : q + 1], rel=1e-5)
    per_example = cam.attribute(x, contrast=[4, 9], relu_attributions=False)
    assert_maps_close(per_example, every[[0, 1], [4, 9]].unsqueeze(1), rel=1e-5)
    assert_model_unchanged(model, before)


@contextlib.contextmanager
def _without_inplace(model: nn.Module):
    """The same model with every ``inplace=True`` module switched off for the block."""
    switched = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    try:
        for module in switched:
            module.inplace = False
        yield model
    finally:
        for module in switched:
            module.inplace = True


def _contrast_cam_via_retained_output(model, layer_name, x, contrast):
    """ContrastCAM by hand on a model without in-place ops: keep the layer's output tensor."""
    store = {}
    layer = dict(model.named_modules())[layer_name]
    handle = layer.register_forward_hook(lambda m, a, o: store.update(out=o))
    try:
        ce = -torch.log_softmax(model(x), dim=1)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(ce[torch.arange(len(x)), contrast].sum(), store["out"])
    weights = grad.mean(dim=(2, 3))
    return torch.relu(torch.einsum("nk,nkhw->nhw", weights, store["out"].detach())).unsqueeze(1)


@pytest.mark.parametrize(
    "name, layer_name",
    [("resnet18", "layer4.1.bn1"), ("vgg11", "features.18")],
    ids=["resnet18-bn-then-inplace-relu", "vgg11-conv-then-inplace-relu"],
)
def test_layer_followed_by_inplace_relu_module(name, layer_name, zoo):
    model = zoo(name)
    x = images(2, 64)
    contrast = torch.tensor([2, 5])
    with torch.no_grad():
        logits_before = model(x)
    before = model_snapshot(model)
    got = ContrastCAM(model, layer_name).attribute(x, contrast=contrast)
    assert_model_unchanged(model, before)
    with _without_inplace(model) as reference:
        expected = _contrast_cam_via_retained_output(reference, layer_name, x, contrast)
    assert_maps_close(got, expected)
    assert_model_unchanged(model, before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits_before, rtol=0, atol=0)


@pytest.mark.parametrize("layer_name", ["features", "features.norm5"])
def test_densenet_layer_followed_by_functional_inplace_relu(layer_name, zoo):
    """DenseNet's forward applies F.relu(features, inplace=True) right after the layer."""
    model = zoo("densenet121")
    x = images(2, 64)
    contrast = torch.tensor([1, 8])
    before = model_snapshot(model)
    got = ContrastCAM(model, layer_name).attribute(x, contrast=contrast)
    every = ContrastCAM(model, layer_name).attribute(x, contrast="all")
    # by hand: the head of DenseNet.forward, without the in-place ReLU
    with torch.no_grad():
        features = model.features(x)
    features.requires_grad_(True)
    pooled = F.adaptive_avg_pool2d(F.relu(features), (1, 1))
    logits = model.classifier(torch.flatten(pooled, 1))
    ce = -torch.log_softmax(logits, dim=1)
    (grad,) = torch.autograd.grad(ce[torch.arange(2), contrast].sum(), features)
    expected = torch.relu(
        torch.einsum("nk,nkhw->nhw", grad.mean(dim=(2, 3)), features.detach())
    ).unsqueeze(1)
    assert_maps_close(got, expected)
    assert_maps_close(every[[0, 1], [1, 8]].unsqueeze(1), expected)
    assert_model_unchanged(model, before)


# ------------------------------------------------------------------ vision transformers


def vit_tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(N, 1 + h*w, K) tokens -> (N, K, h, w): drop the class token, fold the patches."""
    n, count, channels = tokens.shape
    side = int(round((count - 1) ** 0.5))
    assert side * side == count - 1, f"{count - 1} patch tokens do not form a square"
    return tokens[:, 1:, :].reshape(n, side, side, channels).permute(0, 3, 1, 2)


def swin_to_map(features: torch.Tensor) -> torch.Tensor:
    """(N, h, w, K) channels-last Swin features -> (N, K, h, w)."""
    return features.permute(0, 3, 1, 2)


TRANSFORMERS = {
    # name: (layer, reshape_transform, raw activation shape for one image, map size)
    "vit_b_16": ("encoder.layers.encoder_layer_11.ln_1", vit_tokens_to_map, (197, 768), (14, 14)),
    "swin_t": ("features.7", swin_to_map, (7, 7, 768), (7, 7)),
}


def test_reshape_transforms_on_synthetic_tensors():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    folded = vit_tokens_to_map(tokens)
    assert folded.shape == (2, 3, 2, 2)
    # patch token 1 + (i * 2 + j), channel k, lands at [k, i, j]
    assert folded[1, 2, 1, 0] == tokens[1, 1 + 2, 2]
    channels_last = torch.randn(2, 3, 4, 5)
    assert torch.equal(swin_to_map(channels_last)[:, :, 2, 3], channels_last[:, 2, 3, :])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformer_shapes_identity_and_all_equals_single(name, zoo):
    model = zoo(name)
    layer_name, reshape, raw_shape, map_size = TRANSFORMERS[name]
    layer = dict(model.named_modules())[layer_name]
    x = images(2, 224)
    before = model_snapshot(model)

    # by hand: the layer's output (checked against the documented raw shape) and the logits
    store = {}
    handle = layer.register_forward_hook(lambda m, a, o: store.update(out=o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    assert store["out"].shape == (2, *raw_shape)
    per_class = gradcam_by_hand(store["out"], logits, lambda z: z, reshape)
    probs = torch.softmax(logits.detach(), dim=1)
    expected = spec_identity(per_class, probs)

    cam = ContrastCAM(model, layer_name)
    every = cam.attribute(x, contrast="all", relu_attributions=False, reshape_transform=reshape)
    assert every.shape == (2, NUM_CLASSES, *map_size)
    assert_maps_close(every, expected)

    single = cam.attribute(x, contrast=[3, 6], relu_attributions=False, reshape_transform=reshape)
    assert_maps_close(single, every[[0, 1], [3, 6]].unsqueeze(1), rel=1e-5)

    upsampled = cam.attribute(x, reshape_transform=reshape, upsample_to_input=True)
    assert upsampled.shape == (2, 1, 224, 224)
    assert bool((upsampled >= 0).all()) and bool(torch.isfinite(upsampled).all())

    counterfactual = CounterfactualCAM(model, layer_name).attribute(
        x, target=[0, 9], reshape_transform=reshape, relu_attributions=False
    )
    assert_maps_close(counterfactual, -per_class[[0, 1], [0, 9]].unsqueeze(1))
    assert_model_unchanged(model, before)


def _tiny_vit() -> nn.Module:
    """torchvision's VisionTransformer (its layer names) at 32 px: 4 x 4 patches of 8 px."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )  # fmt: skip
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero
    return vit.eval()


def test_vit_tokens_without_reshape_transform_are_refused_with_the_fold():
    """Without the transform the token axis was taken for channels: the maps were (N, 1, D)
    vectors over the embedding, returned without a word (only upsampling refused them). Now
    every CAM (and VOICE) refuses, and the fold it names gives the patch grid's map, the
    map of the token-grid wrapper's ``.grid``."""
    import re

    from captum_ext.attr import VOICE, GradCAM
    from captum_ext.token_grid import expose_token_grid

    model = _tiny_vit()
    layer = "encoder.layers.encoder_layer_0.ln_1"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = (
        lambda: GradCAM(model, layer).attribute(x, target=0),
        lambda: ContrastCAM(model, layer).attribute(x, upsample_to_input=True),
        lambda: CounterfactualCAM(model, layer).attribute(x),
        lambda: VOICE(LayerGradCam(model, dict(model.named_modules())[layer])).attribute(x),
    )
    for call in calls:
        with pytest.raises(ValueError, match=r"transformer's tokens \(a class token and 4 x 4"):
            call()
    with pytest.raises(ValueError) as info:
        calls[0]()
    fold = eval(re.search(r"reshape_transform=(lambda t: [^`]*)`", str(info.value)).group(1))
    maps = GradCAM(model, layer).attribute(x, target=0, reshape_transform=fold)
    wrapper = expose_token_grid(model, layer, x)
    assert maps.shape == (2, 1, 4, 4)
    torch.testing.assert_close(maps, GradCAM(wrapper, wrapper.grid).attribute(x, target=0))


def test_a_layer_that_reads_images_as_rows_is_not_taken_for_tokens():
    """(N, C, W) activations of a model that pools the image's height away (as OCR models
    do): a 1-D map along the width, which the token check must let through, though its 16
    channels would make a 4 x 4 grid of tokens (they do not tile the 8 x 36 images)."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), Rows(), nn.Conv1d(16, 16, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 3),
    ).eval()  # fmt: skip
    x = torch.randn(2, 1, 8, 36, generator=torch.Generator().manual_seed(0))
    maps = ContrastCAM(model, "3").attribute(x, contrast=1)
    assert maps.shape == (2, 1, 36)


class Rows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=2)  # (N, C, H, W) -> (N, C, W)
