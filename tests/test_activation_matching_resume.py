"""ActivationMatchingMask.fit with checkpoints: fewer epochs than a checkpoint holds, a
checkpoint of another mask net, what an interrupted fit leaves of a given mask net, and a
given mask net with random layers (dropout)."""

from __future__ import annotations

import re

import pytest
import torch
from _helpers import make_tiny_cnn
from torch import nn
from torch.utils.data import TensorDataset

from captum_ext.attr import ActivationMatchingMask

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["features.3"]


def _data(n: int = 10, channels: int = 3) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, channels, 8, 8, generator=generator, dtype=torch.float64))


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _fit(method, **options):
    return method.fit(_data(), batch_size=5, progress=False, **options)  # 2 steps per epoch


def test_resume_with_fewer_epochs_than_the_checkpoint_holds_is_refused(tmp_path):
    """epochs=1 on a 3-epoch checkpoint returned the 3-epoch net with 6 steps of history."""
    model = make_tiny_cnn()
    path = tmp_path / "m.pt"
    full = _fit(ActivationMatchingMask(model, LAYERS), epochs=3, seed=3, checkpoint=path)
    with pytest.raises(
        ValueError, match=r"`epochs`=1, but `checkpoint` already holds 3 epochs \(6 steps\)"
    ):
        _fit(ActivationMatchingMask(model, LAYERS), epochs=1, checkpoint=path, resume=True)
    again = _fit(ActivationMatchingMask(model, LAYERS), epochs=3, checkpoint=path, resume=True)
    assert again.history == full.history and _same_parameters(again.mask_net, full.mask_net)
    # a checkpoint in the middle of epoch 2 (step 3) holds more than one epoch
    method = ActivationMatchingMask(model, LAYERS)
    original, calls = method._train_step, {"n": 0}

    def interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args)

    method._train_step = interrupt
    part = tmp_path / "part.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(method, epochs=3, seed=3, checkpoint=part, checkpoint_every=3)
    with pytest.raises(ValueError, match=r"holds 1 epoch and 1 step of the next \(3 steps\)"):
        _fit(ActivationMatchingMask(model, LAYERS), epochs=1, checkpoint=part, resume=True)
    resumed = _fit(ActivationMatchingMask(model, LAYERS), epochs=3, checkpoint=part, resume=True)
    assert resumed.history == full.history
    assert _same_parameters(resumed.mask_net, full.mask_net)


class _MaskNet(nn.Module):
    """A given mask net with a buffer (batch norm), a frozen layer and dropout."""

    def __init__(self, channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout2d(dropout)
        self.out = nn.Conv2d(4, 1, 1)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def forward(self, x):
        return self.out(self.drop(self.norm(self.conv(x)).relu()))


def _user_net_state(net: nn.Module) -> dict:
    return {
        "objects": dict(net.named_parameters()),
        "values": {k: v.clone() for k, v in net.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in net.state_dict().items()},
        "training": {n: m.training for n, m in net.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in net.named_parameters()},
        "grads": {n: p.grad for n, p in net.named_parameters()},
    }


def _assert_as_it_was(net: nn.Module, before: dict) -> None:
    after = _user_net_state(net)
    assert after["objects"] == before["objects"]  # the same parameter objects
    assert after["dtypes"] == before["dtypes"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(after["grads"][n] is g for n, g in before["grads"].items())
    assert all(torch.equal(v, after["values"][k]) for k, v in before["values"].items())


def _float32_net_in_eval_mode() -> nn.Module:
    net = _MaskNet().float().eval()
    net.norm.train()  # one submodule in train mode
    net.out.bias.requires_grad_(False)
    net.conv.weight.grad = torch.full_like(net.conv.weight, 0.5)
    return net


def test_an_interrupted_fit_leaves_a_given_mask_net_as_it_was(tmp_path):
    """Only the parameter values came back: a float32 eval-mode net trained on float64
    images was left in train mode and in float64 (the docstring promises it "as it was")."""
    net = _float32_net_in_eval_mode()
    before = _user_net_state(net)
    method = ActivationMatchingMask(make_tiny_cnn(), LAYERS, mask_net=net)
    original, calls = method._train_step, {"n": 0}

    def interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    method._train_step = interrupt
    with pytest.raises(KeyboardInterrupt):
        _fit(method, epochs=2, checkpoint=tmp_path / "m.pt", checkpoint_every=1)
    assert method.mask_net is net
    _assert_as_it_was(net, before)


def test_a_checkpoint_of_another_mask_net_is_refused_by_name_and_changes_nothing(tmp_path):
    """A checkpoint of another channel count ended in torch's bare "Error(s) in loading
    state_dict", which names neither `checkpoint` nor the file."""
    path = tmp_path / "rgb.pt"
    _fit(ActivationMatchingMask(make_tiny_cnn(), LAYERS), epochs=1, checkpoint=path)
    grey = make_tiny_cnn(in_channels=1)
    message = rf"`checkpoint`: {re.escape(repr(str(path)))} belongs to another architecture"
    with pytest.raises(ValueError, match=message):
        ActivationMatchingMask(grey, LAYERS).fit(
            _data(channels=1), epochs=2, batch_size=5, progress=False, checkpoint=path,
            resume=True,
        )  # fmt: skip
    # a given mask net of another architecture: refused, and left as it was
    net = _float32_net_in_eval_mode()
    before = _user_net_state(net)
    method = ActivationMatchingMask(make_tiny_cnn(), LAYERS, mask_net=net)
    trained = method._trained
    with pytest.raises(ValueError, match=message + " than this _MaskNet"):
        _fit(method, epochs=2, checkpoint=path, resume=True)
    assert method.mask_net is net and method._trained == trained and method.history == []
    _assert_as_it_was(net, before)
    with pytest.raises(ValueError, match=message):  # a finished checkpoint, loaded directly
        _fit(method, epochs=1, checkpoint=path, resume=True)
    _assert_as_it_was(net, before)


def test_a_mask_net_with_dropout_is_fixed_by_the_seed_and_resumes_bit_identically(tmp_path):
    """`seed` "fixes every random draw of a fit": dropout in a given mask net drew from the
    caller's unseeded global RNG (and advanced it), so the same seed gave other nets and a
    resumed fit was not the uninterrupted one."""
    model = make_tiny_cnn()
    nets = [_MaskNet(dropout=0.5).double() for _ in range(5)]  # (drawing from the global RNG)

    def fit(net, rng_seed, **options):
        torch.manual_seed(rng_seed)
        state = torch.get_rng_state()
        method = _fit(ActivationMatchingMask(model, LAYERS, mask_net=net), **options)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG as it was
        return method

    straight = fit(nets[0], 1, epochs=2, seed=5)
    assert _same_parameters(straight.mask_net, fit(nets[1], 2, epochs=2, seed=5).mask_net)
    assert not _same_parameters(straight.mask_net, fit(nets[2], 1, epochs=2, seed=6).mask_net)
    path = tmp_path / "m.pt"
    fit(nets[3], 3, epochs=1, seed=5, checkpoint=path)
    resumed = fit(nets[4], 4, epochs=2, checkpoint=path, resume=True)
    assert resumed.history == straight.history
    assert _same_parameters(straight.mask_net, resumed.mask_net)
