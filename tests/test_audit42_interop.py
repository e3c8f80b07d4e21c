"""Audit 42 (interoperability): IntrospectiveNetwork under Captum's gradient methods,
Contrastive(PathwayGradient) layer names, (N, 1) targets, NoiseTunnel with return_pathway,
FinerCAM's and the introspection page's documentation."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from captum_ext.attr import Contrastive, FinerCAM, LayerIBA, PathwayGradient
from captum_ext.bundled import load_bundled_introspective_network, load_bundled_model
from captum_ext.data import load_sample_digits
from captum_ext.introspection import IntrospectiveNetwork, introspective_features, make_head

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    model = load_bundled_model().eval()
    images, labels = load_sample_digits()
    return model, images[:4], labels[:4], images


def tiny_network(layer, form, k, normalize):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    network = IntrospectiveNetwork(model, layer=layer, form=form, k=k, normalize=normalize)
    size = network.features(torch.zeros(2, 4, dtype=torch.float64)).shape[1]
    network.head = make_head(size, 3, 6).double()
    return model, network


# ------------------------------------------------------------------ 1. IntrospectiveNetwork
@pytest.mark.parametrize("layer", [None, "0"], ids=["closed_form", "inner_layer"])
@pytest.mark.parametrize(
    "form, k, normalize",
    [("per_class", None, "per_class"), ("all_ones", None, "global"), ("topk", 2, None)],
)
def test_introspective_network_input_gradient_passes_gradcheck(layer, form, k, normalize):
    model, network = tiny_network(layer, form, k, normalize)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(
        lambda t: network(t), (x.clone().requires_grad_(),), eps=1e-6, atol=1e-5
    )


def test_introspective_network_forward_values_unchanged_and_stage1_frozen():
    model, network = tiny_network(None, "per_class", None, "per_class")
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plain = network(x)
    leaf = x.clone().requires_grad_()
    differentiable = network(leaf)
    assert torch.equal(plain, differentiable.detach())  # the same values, bit for bit
    differentiable.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert network.head[0].weight.grad is not None


def test_captum_gradient_methods_explain_the_bundled_introspective_network(digits):
    model, x, y, _ = digits
    network = load_bundled_introspective_network(model)
    saliency = Saliency(network).attribute(x, target=y)
    assert saliency.shape == x.shape and saliency.abs().sum() > 0
    integrated = IntegratedGradients(network).attribute(x, target=y, n_steps=4)
    assert integrated.shape == x.shape and torch.isfinite(integrated).all()


# ------------------------------------------------------------------ 2. Contrastive names
def test_contrastive_pathway_gradient_uses_the_models_names(digits):
    model, x, _, _ = digits
    contrast = torch.tensor([3, 7, 1, 0])
    direct = PathwayGradient(model).attribute(x, target=contrast, return_pathway=True)
    contrastive = Contrastive(PathwayGradient, model)
    result = contrastive.attribute(x, contrast=contrast, return_pathway=True)
    assert result.sites == direct.sites == ("features.1", "features.4", "features.7")
    by_name = contrastive.attribute(x, contrast=contrast, layers=["features.4"])
    by_module = contrastive.attribute(x, contrast=contrast, layers=[model.features[4]])
    assert torch.equal(by_name, by_module)
    named = contrastive.attribute(x, contrast=contrast, layers=["features.4"], return_pathway=True)
    assert named.sites == ("features.4",)


# ------------------------------------------------------------------ 3. docs
def test_introspection_page_names_the_normalize_argument():
    text = (REPO_ROOT / "docs" / "api" / "introspection.rst").read_text()
    assert "normalization=" not in text
    for option in re.findall(r"``(\w+)=``", text):
        assert option in introspective_features.__code__.co_varnames, option


# ------------------------------------------------------------------ 4. FinerCAM docstring
def test_finer_cam_docstring_does_not_promise_segmentation_outputs():
    init = FinerCAM.__doc__[FinerCAM.__doc__.index("forward_func (") :]
    init = init[: init.index("layer (")]
    assert "refused" in init and "(N, C) logits" in init
    target = FinerCAM.attribute.__doc__
    assert "tuple ``(c, h, w)``" not in target
    seg = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1)).eval()
    with pytest.raises(ValueError, match="output_transform"):
        FinerCAM(seg, "1").attribute(torch.randn(2, 3, 8, 8), target=(1, 2, 3))


# ------------------------------------------------------------------ 5. (N, 1) targets
def test_n_by_one_target_is_one_class_per_example(digits):
    model, x, y, images = digits
    column = y.view(-1, 1)
    pathway = PathwayGradient(model)
    assert torch.equal(pathway.attribute(x, target=column), pathway.attribute(x, target=y))
    iba = LayerIBA(model, "features.4")
    iba.estimate(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = iba.attribute(
            x, target=column, steps=2, n_noise=2, generator=torch.Generator().manual_seed(0)
        )
        b = iba.attribute(
            x, target=y, steps=2, n_noise=2, generator=torch.Generator().manual_seed(0)
        )
    assert torch.equal(a, b)


def test_several_classes_per_example_still_refused(digits):
    model, x, _, _ = digits
    with pytest.raises(ValueError, match="one class per example"):
        PathwayGradient(model).attribute(x, target=torch.tensor([[1, 2]] * 4))


# ------------------------------------------------------------------ 6. NoiseTunnel
def test_noise_tunnel_return_pathway_names_the_argument(digits):
    model, x, y, _ = digits
    tunnel = NoiseTunnel(PathwayGradient(model))
    with pytest.raises(ValueError, match="return_pathway.*directly"):
        tunnel.attribute(x, target=y, nt_samples=2, stdevs=0.1, return_pathway=True)
    # without it the wrapper still works
    assert tunnel.attribute(x, target=y, nt_samples=2, stdevs=0.1).shape == x.shape
