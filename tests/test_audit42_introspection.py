"""Audit 42 (IntrospectiveNetwork differentiable in its inputs): a stage 1 in train mode
(batch norm, dropout), a stage 1 ending in a per-row shift of its logits (LogSoftmax), and
a stage 1 with several inputs under Captum's ``forward(*inputs)``."""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import Saliency
from torch import nn

from captum_ext.introspection import IntrospectiveNetwork, make_head
from captum_ext.metrics import _trust_common

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fitted(model, x, **options):
    network = IntrospectiveNetwork(model, **options)
    torch.manual_seed(1)
    dtype = (x if isinstance(x, torch.Tensor) else x[0]).dtype
    network.head = make_head(network.features(x).shape[1], 3, 6).to(dtype)
    return network


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [(p.requires_grad, p.grad) for p in model.parameters()],
    )


def assert_unchanged(model, before):
    state, training, flags = before
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [m.training for m in model.modules()] == training
    assert [(p.requires_grad, p.grad) for p in model.parameters()] == flags


# ------------------------------------------------------------------ 1. train-mode batch norm
def batch_norm_1d():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def batch_norm_2d():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)
    )


@pytest.mark.parametrize(
    "build, shape, layer",
    [
        (batch_norm_1d, (5, 8), None),
        (batch_norm_2d, (3, 1, 4, 4), None),
        (batch_norm_2d, (3, 1, 4, 4), "0"),  # each example alone (a batch of one)
    ],
    ids=["bn1d_closed_form", "bn2d_closed_form", "bn2d_inner_layer"],
)
def test_train_mode_batch_norm_gradient_matches_finite_differences(build, shape, layer):
    model = build().double().train()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    network = fitted(model, x, layer=layer)
    before = snapshot(model)
    # finite differences of the network's output under the same (train) mode
    assert torch.autograd.gradcheck(
        lambda t: network(t), (x.clone().requires_grad_(),), eps=1e-6, atol=1e-5
    )
    assert_unchanged(model, before)


def test_saliency_explains_a_train_mode_batch_norm_stage_one_and_leaves_it_as_it_was():
    model = batch_norm_1d().train()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    network = fitted(model, x)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum's note that it set requires_grad itself
        saliency = Saliency(network).attribute(x, target=0)
    assert saliency.shape == x.shape and saliency.abs().sum() > 0
    assert_unchanged(model, before)
    out = network(x.clone().requires_grad_())
    out.sum().backward()  # the head's own gradients too
    assert network.head[0].weight.grad is not None
    assert_unchanged(model, before)


# ------------------------------------------------------------------ 2. LogSoftmax: no warning
@pytest.mark.parametrize("transform", [False, True], ids=["log_softmax_module", "transform"])
def test_per_row_shift_of_the_logits_neither_warns_nor_changes_the_gradient(transform, monkeypatch):
    compare = _trust_common._same_up_to_row_shift
    compared = []

    def detached_only(out, logits):  # torch's scalar warning is issued once per process
        compared.append(out.requires_grad or logits.requires_grad)
        return compare(out, logits)

    monkeypatch.setattr(_trust_common, "_same_up_to_row_shift", detached_only)
    torch.manual_seed(0)
    layers = [nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)]
    if not transform:
        layers.append(nn.LogSoftmax(dim=1))
    model = nn.Sequential(*layers).double().eval()
    options = {"output_transform": lambda z: torch.log_softmax(z, dim=1)} if transform else {}
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    network = fitted(model, x, **options)
    leaf = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        network(leaf)[:, 0].sum().backward()
    assert leaf.grad.abs().sum() > 0
    assert compared and not any(compared)  # the comparison saw detached tensors only
    assert torch.autograd.gradcheck(
        lambda t: network(t), (x.clone().requires_grad_(),), eps=1e-6, atol=1e-5
    )


# ------------------------------------------------------------------ 3. several inputs
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 5), nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x, y):
        return self.out(torch.tanh(self.a(x) + self.b(y)))


def test_captum_explains_a_stage_one_with_several_inputs():
    torch.manual_seed(0)
    model = TwoInputs().double().eval()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 4, dtype=torch.float64, generator=gen)
    y = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    network = fitted(model, (x, y))
    assert torch.equal(network(x, y), network((x, y)))  # Captum's call and the packed one
    leaves = (x.clone().requires_grad_(), y.clone().requires_grad_())
    saliency = Saliency(network).attribute(leaves, target=1, abs=False)
    expected = torch.autograd.grad(network(*leaves)[:, 1].sum(), leaves)
    assert all(torch.allclose(s, e) for s, e in zip(saliency, expected))
    assert all(s.abs().sum() > 0 for s in saliency)
    assert torch.autograd.gradcheck(lambda a, b: network(a, b), leaves, eps=1e-6, atol=1e-5)


def test_one_input_calls_keep_working():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    network = fitted(model, x)
    assert torch.equal(network(x), network((x,)))
    assert network.predict(x).shape == (3,)


def test_a_call_mixing_packed_and_unpacked_inputs_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    network = fitted(model, x)
    with pytest.raises(TypeError, match="inputs"):
        network()
    with pytest.raises(TypeError, match=r"inputs\[0\]"):
        network((x, x), x)


# ------------------------------------------------------------------ dropout in stage 1
def test_train_mode_dropout_value_and_gradient_share_their_masks_at_the_final_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
    model = model.double().train()
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    network = fitted(model, x)

    def seeded(t):  # the network under the dropout masks of seed 11
        torch.manual_seed(11)
        return network(t)

    # finite differences of the value under fixed masks: the gradient is that of the value
    assert torch.autograd.gradcheck(seeded, (x.clone().requires_grad_(),), eps=1e-6, atol=1e-5)
    # and the differentiable forward leaves the random state where a plain one leaves it
    torch.manual_seed(11)
    network(x)
    plain = torch.get_rng_state()
    torch.manual_seed(11)
    network(x.clone().requires_grad_())
    assert torch.equal(torch.get_rng_state(), plain)


def test_inputs_can_still_be_given_by_name():
    """``forward(inputs)`` became ``forward(*inputs)``: ``network(inputs=x)``, the documented
    parameter's name, broke."""
    from captum_ext.bundled import load_bundled_introspective_network
    from captum_ext.data import load_sample_digits

    network = load_bundled_introspective_network()
    x = load_sample_digits()[0][:4]
    torch.testing.assert_close(network(inputs=x), network(x))
    with pytest.raises(TypeError, match="both by position and as `inputs`"):
        network(x, inputs=x)
    with pytest.raises(TypeError, match="unexpected keyword argument 'input'"):
        network(input=x)
