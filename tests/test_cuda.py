"""CUDA model with CUDA tensors, and mixed precision: what users will do on a GPU."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot

from captum_ext.attr import ContrastCAM, Contrastive, CounterfactualCAM, LayerGradCamPlusPlus

pytestmark = pytest.mark.cuda


@pytest.fixture
def pair():
    cpu = make_tiny_cnn()
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    return cpu, x


@pytest.mark.parametrize("method", [ContrastCAM, CounterfactualCAM, LayerGradCamPlusPlus])
def test_cuda_float64_equals_cpu(method, pair):
    model, x = pair
    expected = method(model, "features.3").attribute(x, "all")
    gpu_model = make_tiny_cnn().cuda()
    before = model_snapshot(gpu_model)
    got = method(gpu_model, "features.3").attribute(x.cuda(), "all", max_batch=2)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, atol=1e-9, rtol=1e-7)
    assert_model_unchanged(gpu_model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_mixed_precision_close_to_float32(dtype, pair):
    _, x = pair
    model = make_tiny_cnn(dtype=torch.float32).cuda()
    x = x.float().cuda()
    cam = ContrastCAM(model, "features.3")
    reference = cam.attribute(x, contrast=[0, 1, 2, 3, 4, 0], normalize="minmax")
    with torch.autocast("cuda", dtype=dtype):
        mixed = cam.attribute(x, contrast=[0, 1, 2, 3, 4, 0], normalize="minmax")
    assert mixed.device.type == "cuda"
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), reference, atol=5e-2, rtol=0)


def test_contrastive_wrapper_on_cuda(pair):
    from captum.attr import Saliency

    model, x = pair
    expected = Contrastive(Saliency, model).attribute(x, "all", abs=False)
    got = Contrastive(Saliency, make_tiny_cnn().cuda()).attribute(x.cuda(), "all", abs=False)
    torch.testing.assert_close(got.cpu(), expected)


def test_resnet18_all_classes_on_cuda_matches_single_calls():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=50).eval().cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    cam = ContrastCAM(model, "layer4")
    every = cam.attribute(x, "all", max_batch=16)
    for q in (0, 17, 49):
        torch.testing.assert_close(every[:, q : q + 1], cam.attribute(x, q), atol=1e-5, rtol=1e-4)
