"""GradTrust on layouts of the model zoo: the variances of very large gradients (layer="all"
on VGG) without float64 copies of whole parameters, and layers whose weight the parent uses
without calling them (torchvision's Swin ``attn.qkv``, ``nn.MultiheadAttention.out_proj``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from captum_ext.metrics import grad_trust, gradtrust

#: a slice far below the gradients' size, so that every reduction runs over many slices
SMALL_SLICE = 64


def _unsliced_variances(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """The definition: the unbiased variance over all entries of all gradients as one vector,
    two passes in float64 over whole tensors."""
    flat = torch.cat([g.flatten(2).double() for g in grads.values()], dim=2)
    mean = flat.mean(2, keepdim=True)
    return (flat - mean).pow(2).sum(2) / (flat.shape[2] - 1)


def _gradients() -> dict[str, torch.Tensor]:
    """(n=2, K=3, ...) gradients of three parameters of unequal sizes, with a large common
    mean (two passes keep its digits)."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"a": (2, 3, 17, 31), "b": (2, 3, 5), "c": (2, 3, 40, 7, 3)}
    return {
        name: 1e3 + torch.randn(shape, generator=generator, dtype=torch.float32)
        for name, shape in shapes.items()
    }


class _LargestFloat64(TorchDispatchMode):
    """Records the largest number of entries of a float64 tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in tree_leaves(result):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                self.largest = max(self.largest, value.numel())
        return result


def test_variances_never_copy_a_whole_parameter_to_float64(monkeypatch):
    # the float64 copies of VGG-11's classifier.0.weight gradients (6 contrasts) were 5 GB
    # each: every float64 intermediate now holds one slice of the gradients at most
    monkeypatch.setattr(grad_trust, "VARIANCE_SLICE_ENTRIES", SMALL_SLICE, raising=False)
    grads = _gradients()
    with _LargestFloat64() as watch:
        grad_trust._variances(grads)
    assert watch.largest <= SMALL_SLICE


def test_sliced_variances_equal_the_unsliced_definition(monkeypatch):
    monkeypatch.setattr(grad_trust, "VARIANCE_SLICE_ENTRIES", SMALL_SLICE, raising=False)
    grads = _gradients()
    expected = _unsliced_variances(grads)
    torch.testing.assert_close(grad_trust._variances(grads), expected, rtol=1e-12, atol=0)


def test_sliced_reference_energies_equal_the_unsliced_definition(monkeypatch):
    # the reference form: max_c / mean_c of Var(g_c^2) over each row c of the weight gradient
    monkeypatch.setattr(grad_trust, "VARIANCE_SLICE_ENTRIES", SMALL_SLICE, raising=False)
    g = torch.randn(3, 1, 10, 12, generator=torch.Generator().manual_seed(1))
    energies = g[:, 0].double().pow(2).var(2)
    expected = energies.amax(1) / energies.mean(1)
    actual = grad_trust._reference_reduce({"w": g})
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5)).double().eval()


def test_all_parameters_score_is_the_same_over_small_slices(monkeypatch):
    model, x = _mlp(), torch.randn(3, 6, dtype=torch.float64)
    whole = gradtrust(model, x, layer="all", log=True)
    monkeypatch.setattr(grad_trust, "VARIANCE_SLICE_ENTRIES", SMALL_SLICE, raising=False)
    sliced = gradtrust(model, x, layer="all", log=True)
    torch.testing.assert_close(sliced, whole, rtol=1e-12, atol=1e-12)


class _Attention(nn.Module):
    """A parent that uses its child's weight without calling the child, as torchvision's
    ShiftedWindowAttention uses ``self.qkv.weight`` in ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(x, self.qkv.weight, self.qkv.bias))


class _ParentUsesChildWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.attn = _Attention()
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(torch.relu(self.stem(x))))


def _parent_model() -> nn.Module:
    torch.manual_seed(0)
    model = _ParentUsesChildWeight().double().eval()
    with torch.no_grad():
        model.head.weight.mul_(3)
    return model


def _manual_topk(model: nn.Module, x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """The definition with plain autograd: mean_Q Var(grad_W CE(z, Q)) / Var(grad_W CE(z, P)),
    P the prediction and Q the next k classes, per example."""
    scores = []
    for i in range(len(x)):
        out = model(x[i : i + 1])
        order = out[0].argsort(descending=True)
        variances = []
        for c in range(k + 1):
            (g,) = torch.autograd.grad(
                F.cross_entropy(out, order[c : c + 1]), weight, retain_graph=True
            )
            variances.append(g.var())
        scores.append(torch.stack(variances[1:]).mean() / variances[0])
    return torch.stack(scores)


@pytest.mark.parametrize("layer", ["attn.qkv", "module"])
def test_layer_whose_parent_uses_its_weight_is_measured(layer):
    model, x = _parent_model(), torch.randn(3, 6, dtype=torch.float64)
    target = model.attn.qkv if layer == "module" else layer
    expected = _manual_topk(model, x, model.attn.qkv.weight, k=3)
    torch.testing.assert_close(gradtrust(model, x, layer=target), expected, rtol=1e-9, atol=0)


def test_layer_whose_parent_uses_its_weight_by_the_loop_path():
    # a forward hook of the user's: the per-example gradients run one example at a time
    model, x = _parent_model(), torch.randn(3, 6, dtype=torch.float64)
    expected = _manual_topk(model, x, model.attn.qkv.weight, k=3)
    handle = model.stem.register_forward_hook(lambda module, args, output: None)
    try:
        actual = gradtrust(model, x, layer="attn.qkv")
    finally:
        handle.remove()
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=0)


def test_layer_used_by_its_parent_leaves_the_model_as_it_was():
    model, x = _parent_model(), torch.randn(3, 6, dtype=torch.float64)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    gradtrust(model, x, layer="attn.qkv")
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_layer_whose_weight_nothing_uses_is_refused_with_a_hint():
    model, x = _parent_model(), torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`layer` \(Linear\) did not run.*layer='all'"):
        gradtrust(model, x, layer="unused")
