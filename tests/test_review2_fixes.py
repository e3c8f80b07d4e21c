"""Second review of the execution-order and CAM fixes: the sanity cascade watches the
explainer's own passes, a CAM subclass's two-argument ``_channel_weights`` works again, a
module with children ranks by the first use of its own parameters (a ViT's class token, a
ConvNeXt block's layer scale), and the docs of PointingGame and CounterfactualCAM. Each is
checked against an independent computation (plain autograd, Captum on a hand-edited copy,
the order read off the model's forward code)."""

from __future__ import annotations

import copy
import doctest
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, Saliency
from torch import nn

from captum_ext.attr import CounterfactualCAM, GradCAM
from captum_ext.metrics import model_randomisation, purview
from captum_ext.metrics.evaluation_accumulators import PointingGame

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


# ---------------------------------------------------------------------------------------------
# 1. model_randomisation: a layer run only by the explainer's own passes stays in the cascade


class _Branch(nn.Module):
    """`small` runs only for inputs of small mean magnitude: not for the test images, but
    on integrated gradients' path from the zero baseline."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.small = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = x.flatten(1)
        h = torch.relu(self.a(x))
        mask = (x.abs().mean(1, keepdim=True) < 0.3).to(x.dtype)
        if bool(mask.any()):
            h = h + mask * self.small(h)
        return self.out(h)


def _branch_case():
    torch.manual_seed(0)
    model = _Branch().double().eval()
    signs = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    x = (torch.rand(4, 1, 2, 2, dtype=torch.float64) + 1.0) * signs
    assert bool((x.flatten(1).abs().mean(1) >= 1).all())  # `small` idle on the inputs
    return model, x


def test_cascade_keeps_a_layer_that_runs_only_on_the_explainers_path():
    model, x = _branch_case()
    # independently: Captum's maps on a copy without `small` differ from the model's
    target = torch.zeros(4, dtype=torch.long)
    plain = IntegratedGradients(model).attribute(x, target=target)
    without = copy.deepcopy(model)
    with torch.no_grad():
        without.small.weight.zero_()
        without.small.bias.zero_()
    edited = IntegratedGradients(without).attribute(x, target=target)
    assert not torch.allclose(plain, edited)  # randomising `small` moves the maps
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing left out
        curves = model_randomisation(IntegratedGradients, model, x, target=0, similarity="spearman")
    # a -> small -> out in the forward code: from the output down
    assert curves.layers == ["out", "small", "a"]
    assert _hooks(model) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_cascade_leaves_out_a_layer_run_neither_by_the_model_nor_the_explainer():
    model, x = _branch_case()
    with pytest.warns(UserWarning, match=r"leaves out 1 module.*neither.*explainer.*'small'"):
        curves = model_randomisation(Saliency, model, x, target=0, similarity="spearman")
    assert curves.layers == ["out", "a"]


def test_watching_the_explainer_leaves_no_hook_when_it_raises():
    model, x = _branch_case()

    class Failing:
        def __init__(self, m):
            self.m = m

        def attribute(self, inputs, target=None):
            self.m(inputs)
            raise RuntimeError("explainer failed")

    with pytest.raises(RuntimeError, match="explainer failed"):
        model_randomisation(Failing, model, x, target=0, similarity="spearman")
    assert _hooks(model) == 0
    assert torch.overrides._get_current_function_mode() is None  # the watching mode is gone


# ---------------------------------------------------------------------------------------------
# 2. a CAM subclass overriding _channel_weights(gradients, activations)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class _TwoArgumentCAM(GradCAM):  # as TargetClassCAMBase's docstring invites
    def _channel_weights(self, gradients, activations):
        return gradients.mean(dim=tuple(range(3, gradients.dim())))


def _gradcam_by_hand(model: _Net, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    maps = []
    for xi, t in zip(x, target):
        a = model.conv(xi[None])
        z = model.fc(torch.tanh(a).flatten(1))
        (g,) = torch.autograd.grad(z[0, t], a)
        weights = g.mean(dim=(2, 3), keepdim=True)
        maps.append(F.relu((weights * a).sum(1, keepdim=True)).detach())
    return torch.cat(maps)


def test_cam_subclass_with_a_two_argument_channel_weights_runs():
    torch.manual_seed(0)
    model = _Net().double().eval()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    maps = _TwoArgumentCAM(model, "conv").attribute(x, target=target)
    torch.testing.assert_close(maps, _gradcam_by_hand(model, x, target), rtol=1e-10, atol=1e-12)


def test_cam_subclass_without_the_keyword_refuses_gradient_sign_by_name():
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(TypeError, match=r"`gradient_sign`='positive'.*_channel_weights"):
        _TwoArgumentCAM(model, "conv").attribute(x, target=0, gradient_sign="positive")
    assert _hooks(model) == 0

    seen = []

    class WithKeyword(GradCAM):
        def _channel_weights(self, gradients, activations, gradient_sign=None):
            seen.append(gradient_sign)
            return super()._channel_weights(gradients, activations, gradient_sign)

    WithKeyword(model, "conv").attribute(x, target=0)
    WithKeyword(model, "conv").attribute(x, target=0, gradient_sign="positive")
    assert seen == [None, "positive"]


# ---------------------------------------------------------------------------------------------
# 3. a module with children ranks by the first use of its own parameters


def _tiny_vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 8, 1, 2, 8, 16, num_classes=3).double().eval()
    with torch.no_grad():  # trained-looking values: the head and class token start at zero
        for parameter in vit.parameters():
            parameter.add_(torch.randn_like(parameter))
    return vit


def _purview_by_hand(model: nn.Module, x: torch.Tensor, groups: list[list[nn.Parameter]]):
    """-(1/G) sum_groups ||dL/dtheta||^2, L = mean_c softplus(-z_c), one example at a time."""
    scores = []
    for xi in x:
        z = model(xi[None])
        loss = F.binary_cross_entropy_with_logits(z, torch.ones_like(z))
        flat = [p for group in groups for p in group]
        grads = iter(torch.autograd.grad(loss, flat))
        norms = [sum(float(next(grads).pow(2).sum()) for _ in group) for group in groups]
        scores.append(-sum(norms) / len(groups))
    return torch.tensor(scores, dtype=torch.float64)


def test_purview_early_group_of_a_vit_is_its_patch_embedding_not_its_class_token():
    vit = _tiny_vit()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    # torchvision's forward: conv_proj (patches), then the class token joins, ..., heads
    expected = _purview_by_hand(
        vit, x, [list(vit.conv_proj.parameters()), list(vit.heads.head.parameters())]
    )
    got = purview(vit, x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-8, atol=0)


class _ScaledBlock(nn.Module):
    """A block holding a scale that multiplies its layers' output (ConvNeXt's layer scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.scale = nn.Parameter(torch.randn(2, 1, 1))

    def forward(self, x):
        return self.scale * torch.tanh(self.conv(x))


class _HeadOnRoot(nn.Module):
    """The model's own weight is its output layer, used after its block and `mid`."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _ScaledBlock()
        self.mid = nn.Linear(2 * 4 * 4, 5)
        self.weight = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return torch.tanh(self.mid(self.block(x).flatten(1))) @ self.weight.t()


def test_purview_groups_of_a_model_whose_own_weight_is_its_head():
    torch.manual_seed(0)
    model = _HeadOnRoot().double().eval()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    # block.conv runs first (the block's scale after it), then mid; the model's weight last
    expected = _purview_by_hand(model, x, [list(model.block.conv.parameters()), [model.weight]])
    torch.testing.assert_close(purview(model, x).double(), expected, rtol=1e-8, atol=0)


def test_cascade_randomises_a_convnext_layer_scale_before_its_block_and_a_vit_class_token_last():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    convnext = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3).eval()
    layers = model_randomisation(
        Saliency, convnext, torch.rand(2, 3, 32, 32), similarity="spearman"
    ).layers
    # CNBlock.forward: layer_scale * block(input): its dwconv, norm, two linears, then the scale
    for block in ("features.1.0", "features.3.0"):
        first = min(layers.index(f"{block}.block.{i}") for i in (0, 2, 3, 5))
        assert layers.index(block) < first, block
    assert layers[:2] == ["classifier.2", "classifier.0"]  # output first
    vit_layers = model_randomisation(
        Saliency, _tiny_vit(), torch.rand(2, 3, 16, 16, dtype=torch.float64), similarity="spearman"
    ).layers
    assert vit_layers[0] == "heads.head"
    assert vit_layers[-2:] == ["conv_proj", ""]  # the class token (the model's own) last


# ---------------------------------------------------------------------------------------------
# 4. docs: PointingGame's example shows the tolerance; CounterfactualCAM's other weightings


def test_pointing_game_example_shows_a_near_miss_that_the_tolerance_accepts():
    (tolerance,) = re.findall(r"PointingGame\(tolerance=(\d+)\)", PointingGame.__doc__)
    tolerance = int(tolerance)
    # TorchRay's disk is squared distance < tolerance^2: tolerance 1 is the object alone
    # (integer pixel offsets), so the example must use 2 or more to show anything
    assert tolerance >= 2
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    namespace = {"PointingGame": PointingGame}
    for test in finder.find(PointingGame, "PointingGame", globs=namespace):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 5


def test_counterfactual_cam_doc_and_its_positive_weights_of_the_negated_gradient():
    text = DOCS.read_text()
    section = text.split("### What if not P? CounterfactualCAM")[1].split("### ")[0]
    assert "signed Grad-CAM weighting" in section
    assert 'gradient_sign="positive"' in section and 'weighting="gradcam++"' in section
    assert r"G = -\,\partial z_P / \partial A" in section
    # the stated formula, by hand: alpha_k = mean ReLU(-dz_P/dA), not -mean ReLU(dz_P/dA)
    torch.manual_seed(1)
    model = _Net().double().eval()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    target = torch.tensor([1, 0])
    expected, other = [], []
    for xi, t in zip(x, target):
        a = model.conv(xi[None])
        (g,) = torch.autograd.grad(model.fc(torch.tanh(a).flatten(1))[0, t], a)
        for weights, store in (
            (F.relu(-g).mean(dim=(2, 3), keepdim=True), expected),
            (-F.relu(g).mean(dim=(2, 3), keepdim=True), other),
        ):
            store.append(F.relu((weights * a).sum(1, keepdim=True)).detach())
    maps = CounterfactualCAM(model, "conv").attribute(x, target=target, gradient_sign="positive")
    torch.testing.assert_close(maps, torch.cat(expected), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(maps, torch.cat(other))
