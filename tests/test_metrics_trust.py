"""GradTrust and the trust baselines, each against a direct (looped, autograd) computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_ext.metrics import (
    GradTrust,
    energy,
    gradnorm,
    gradtrust,
    log_likelihood,
    margin,
    mc_dropout,
    negative_entropy,
    odin,
    purview,
    softmax_confidence,
)

DTYPE = torch.float64


def mlp(num_classes: int, bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, num_classes, bias=bias))
        .to(DTYPE)
        .eval()
    )


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 4 * 4, num_classes, bias=bias)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).flatten(1)))


def convnet(num_classes: int, bias: bool = True, seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    model = ConvNet(num_classes, bias).to(DTYPE)
    model.bn.running_mean.uniform_(-0.3, 0.3)
    model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def images(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def vectors(n: int = 5, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def weight_grad(model, layer, x, loss_fn):
    """Gradient of loss_fn(logits) with respect to layer.weight for one example, by autograd."""
    model = copy.deepcopy(model)
    layer = dict(model.named_modules())[layer]
    model.zero_grad()
    loss_fn(model(x)).backward()
    return layer.weight.grad.detach().clone()


def published_reference(model, layer, x):
    """The published demo, one image at a time: MSE to the uniform vector, last-layer weight
    gradient, squared, unbiased variance of each row, max / mean."""
    out = []
    for i in range(len(x)):

        def loss(z):
            return F.mse_loss(z, torch.full_like(z, 1.0 / z.shape[1]))

        g = weight_grad(model, layer, x[i : i + 1], loss)
        energies = (g**2).flatten(1).var(dim=1)
        out.append(energies.max() / energies.mean())
    return torch.stack(out)


def paper_topk(model, layer, x, k):
    """The paper's ratio by autograd: Var(grad CE(P)) / mean_Q Var(grad CE(Q)); inverted."""
    out = []
    for i in range(len(x)):
        with torch.no_grad():
            classes = model(x[i : i + 1]).topk(k + 1, dim=1).indices[0].tolist()
        var = []
        for c in classes:

            def loss(z, c=c):
                return F.cross_entropy(z, torch.tensor([c]))

            var.append(weight_grad(model, layer, x[i : i + 1], loss).var())
        var = torch.stack(var)
        out.append(var[1:].mean() / var[0])
    return torch.stack(out)


def snapshot(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        [m.training for m in model.modules()],
        [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    )


def assert_same_state(before, after):
    state0, params0, training0, hooks0 = before
    state1, params1, training1, hooks1 = after
    assert state0.keys() == state1.keys()
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
    for (rg0, g0), (rg1, g1) in zip(params0, params1):
        assert rg0 == rg1
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            assert torch.equal(g0, g1)
    assert training0 == training1
    assert hooks0 == hooks1


# ---------------------------------------------------------------------------------------------
# GradTrust


@pytest.mark.parametrize("num_classes", [2, 10, 1000])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 4, 5])
@pytest.mark.parametrize("form", ["topk", "reference"])
def test_closed_form_equals_autograd(num_classes, bias, form, batch):
    for model, x in (
        (mlp(num_classes, bias), vectors(batch)),
        (convnet(num_classes, bias), images(batch)),
    ):
        closed = gradtrust(model, x, form=form, method="closed_form")
        auto = gradtrust(model, x, form=form, method="autograd")
        assert closed.shape == (len(x),)
        assert torch.isfinite(closed).all()
        torch.testing.assert_close(closed, auto, rtol=1e-9, atol=0)


@pytest.mark.parametrize("num_classes", [2, 10])
@pytest.mark.parametrize("batch", [1, 4, 5])
def test_reference_form_equals_published_procedure(num_classes, batch):
    model, x = convnet(num_classes), images(batch)
    expected = published_reference(model, "fc", x)
    torch.testing.assert_close(gradtrust(model, x, form="reference"), expected, rtol=1e-9, atol=0)
    # and the closed form from the spec: max (z - 1/C)^4 / mean (z - 1/C)^4
    with torch.no_grad():
        dev = (model(x) - 1.0 / num_classes) ** 4
    torch.testing.assert_close(expected, dev.amax(1) / dev.mean(1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [1, 4, 5])
def test_topk_form_equals_paper_ratio(k, batch):
    model, x = mlp(10, bias=False), vectors(batch)
    expected = paper_topk(model, "2", x, k)
    torch.testing.assert_close(gradtrust(model, x, k=k), expected, rtol=1e-9, atol=0)
    # h cancels: mean_Q ||p - e_Q||^2 / ||p - e_P||^2
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    top = p.topk(k + 1, dim=1).indices
    dist = ((p.unsqueeze(1) - F.one_hot(top, 10).to(DTYPE)) ** 2).sum(2)
    torch.testing.assert_close(expected, dist[:, 1:].mean(1) / dist[:, 0], rtol=1e-9, atol=0)


def test_higher_is_more_confident():
    head = nn.Linear(2, 3, bias=False).to(DTYPE)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 2, dtype=DTYPE) * 5)
    x = torch.tensor([[2.0, 0.0], [0.3, 0.2]], dtype=DTYPE)  # peaked, then flat logits
    for form in ("topk", "reference"):
        scores = gradtrust(head, x, form=form)
        assert scores[0] > scores[1]


def test_autograd_path_on_an_inner_layer():
    model, x = convnet(5), images(3)
    scores = gradtrust(model, x, layer="conv", k=2)  # auto: not the final linear -> autograd
    torch.testing.assert_close(scores, paper_topk(model, "conv", x, 2), rtol=1e-9, atol=0)
    reference = gradtrust(model, x, layer=model.conv, form="reference")
    torch.testing.assert_close(reference, published_reference(model, "conv", x), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="closed form does not apply"):
        gradtrust(model, x, layer="conv", method="closed_form")


def test_gradtrust_class_and_additional_args():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4).to(DTYPE)

        def forward(self, x, shift):
            return self.fc(x + shift)

    model, x = Scaled(), vectors(4)
    shift = torch.randn(4, 6, dtype=DTYPE)
    trust = GradTrust(model, k=2)
    closed = trust.score(x, additional_forward_args=(shift,))
    auto = gradtrust(model, x, k=2, method="autograd", additional_forward_args=(shift,))
    torch.testing.assert_close(closed, auto, rtol=1e-9, atol=0)
    shifted = gradtrust(model, x + shift, k=2, additional_forward_args=torch.zeros_like(shift))
    torch.testing.assert_close(closed, shifted, rtol=1e-12, atol=0)
    assert "topk" in repr(trust)


def test_layer_that_does_not_produce_the_logits():
    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4).to(DTYPE)

        def forward(self, x):
            return self.fc(x) / 2.0  # the logits are not the linear layer's output

    model, x = Tempered(), vectors(3)
    with pytest.raises(ValueError, match="does not produce the logits.*method='autograd'"):
        gradtrust(model, x)
    with pytest.raises(ValueError, match="does not produce the logits"):
        gradnorm(model, x)
    # the autograd path differentiates the true loss through the division
    scores = gradtrust(model, x, method="autograd", form="reference")
    torch.testing.assert_close(scores, published_reference(model, "fc", x), rtol=1e-9, atol=0)


def test_bad_arguments():
    model, x = mlp(4), vectors(2)
    with pytest.raises(ValueError, match="`form`"):
        gradtrust(model, x, form="paper")
    with pytest.raises(ValueError, match="`method`"):
        gradtrust(model, x, method="fast")
    with pytest.raises(ValueError, match="`k`=4 is out of range"):
        gradtrust(model, x, k=4)
    with pytest.raises(ValueError, match="`k`"):
        GradTrust(model, k=0)
    with pytest.raises(TypeError, match="`k`"):
        gradtrust(model, x, k=1.5)
    with pytest.raises(ValueError, match="`layer`"):
        gradtrust(model, x, layer="nope")
    with pytest.raises(ValueError, match="`layer`.*no linear layer"):
        gradtrust(nn.Sequential(nn.Identity()), x)
    with pytest.raises(TypeError, match="`inputs`"):
        gradtrust(model, [1, 2])
    with pytest.raises(ValueError, match="`temperature`"):
        odin(model, x, temperature=0)
    with pytest.raises(ValueError, match="`n_passes`"):
        mc_dropout(convnet(3), images(2), n_passes=0)
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout(model, x)


def test_vanishing_gradients_give_nan_like_autograd():
    head = nn.Linear(3, 4).to(DTYPE)
    x = torch.zeros(2, 3, dtype=DTYPE)  # h = 0: every weight gradient is zero
    for form in ("topk", "reference"):
        for method in ("auto", "autograd"):
            with pytest.warns(RuntimeWarning, match="every score is NaN"):
                scores = gradtrust(head, x, form=form, method=method)
            assert torch.isnan(scores).all()


def test_default_k_and_float32():
    model = mlp(10).float()
    x = vectors(4).float()
    closed = gradtrust(model, x)
    auto = gradtrust(model, x, method="autograd", k=5)
    assert closed.dtype == torch.float32
    torch.testing.assert_close(closed, auto, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------
# baselines


def test_logit_baselines_match_direct_computation():
    model, x = convnet(7), images(6)
    with torch.no_grad():
        z = model(x)
    for i in range(len(x)):
        p = torch.softmax(z[i], 0).tolist()
        ranked = sorted(p, reverse=True)
        assert softmax_confidence(model, x)[i].item() == pytest.approx(ranked[0], rel=1e-12)
        assert margin(model, x)[i].item() == pytest.approx(ranked[0] - ranked[1], rel=1e-12)
        entropy = -sum(q * torch.log(torch.tensor(q, dtype=DTYPE)).item() for q in p)
        assert negative_entropy(model, x)[i].item() == pytest.approx(-entropy, rel=1e-12)
        assert log_likelihood(model, x)[i].item() == pytest.approx(
            torch.log(torch.tensor(ranked[0], dtype=DTYPE)).item(), rel=1e-12
        )


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_energy_matches_direct_computation(temperature):
    model, x = convnet(7), images(6)
    with torch.no_grad():
        z = model(x).tolist()
    scores = energy(model, x, temperature=temperature)
    for i, row in enumerate(z):
        expected = temperature * math.log(sum(math.exp(v / temperature) for v in row))
        assert scores[i].item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="`temperature`"):
        energy(model, x, temperature=0.0)


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_odin_matches_looped_computation(batch):
    model, x = convnet(5), images(batch)
    temperature, epsilon = 100.0, 0.0014
    expected = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        log_s = torch.log_softmax(model(xi) / temperature, 1).max()
        (grad,) = torch.autograd.grad(log_s, xi)
        perturbed = xi.detach() - epsilon * torch.sign(-grad)
        with torch.no_grad():
            expected.append(torch.softmax(model(perturbed) / temperature, 1).max())
    torch.testing.assert_close(odin(model, x), torch.stack(expected), rtol=1e-12, atol=0)
    # epsilon = 0: plain temperature-scaled confidence
    with torch.no_grad():
        plain = torch.softmax(model(x) / 10.0, 1).amax(1)
    torch.testing.assert_close(odin(model, x, temperature=10.0, epsilon=0.0), plain)


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_gradnorm_matches_autograd(batch):
    for model, x, layer in (
        (convnet(6), images(batch), "fc"),
        (mlp(3, bias=False), vectors(batch), "2"),
    ):
        expected = []
        for i in range(len(x)):

            def loss(z):
                uniform = torch.full_like(z, 1.0 / z.shape[1])
                return F.kl_div(torch.log_softmax(z, 1), uniform, reduction="sum")

            expected.append(weight_grad(model, layer, x[i : i + 1], loss).norm())
        expected = torch.stack(expected)
        torch.testing.assert_close(gradnorm(model, x), expected, rtol=1e-9, atol=0)
    l1 = gradnorm(model, x, p=1.0)
    l1_auto = gradnorm(model, x, p=1.0, layer=model[0])  # inner layer: autograd path
    assert l1.shape == l1_auto.shape == (batch,)


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_purview_matches_autograd(batch):
    model, x = convnet(5), images(batch)

    def direct(groups):
        out = []
        for i in range(len(x)):
            m = copy.deepcopy(model)
            m.zero_grad()
            z = m(x[i : i + 1])
            F.binary_cross_entropy_with_logits(z, torch.ones_like(z)).backward()
            modules = dict(m.named_modules())
            norms = [sum((p.grad**2).sum() for p in modules[g].parameters()) for g in groups]
            out.append(-torch.stack(norms).mean())
        return torch.stack(out)

    torch.testing.assert_close(purview(model, x), direct(["conv", "fc"]), rtol=1e-9, atol=0)
    custom = purview(model, x, groups=["conv", ["bn", "fc"]])
    torch.testing.assert_close(custom, _two(model, x), rtol=1e-9, atol=0)


def _two(model, x):
    """Purview with groups [conv] and [bn, fc], by autograd."""
    out = []
    for i in range(len(x)):
        m = copy.deepcopy(model)
        m.zero_grad()
        z = m(x[i : i + 1])
        F.binary_cross_entropy_with_logits(z, torch.ones_like(z)).backward()
        early = sum((p.grad**2).sum() for p in m.conv.parameters())
        late = sum((p.grad**2).sum() for p in [*m.bn.parameters(), *m.fc.parameters()])
        out.append(-(early + late) / 2)
    return torch.stack(out)


def test_mc_dropout_reproducible_and_only_dropout_in_train_mode():
    model, x = convnet(4), images(5)
    seen = []
    handle = model.bn.register_forward_hook(lambda m, a, o: seen.append((m.training,)))
    try:
        state = torch.get_rng_state()
        a = mc_dropout(model, x, n_passes=8, generator=torch.Generator().manual_seed(3))
        assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
        b = mc_dropout(model, x, n_passes=8, generator=3)
    finally:
        handle.remove()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert seen and not any(flag for (flag,) in seen)  # batch norm stayed in eval mode
    assert not model.drop.training
    c = mc_dropout(model, x, n_passes=8, generator=4)
    assert not torch.equal(a, c)
    # the documented protocol, by hand
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(3)))
    m = copy.deepcopy(model)
    m.drop.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            mean = sum(torch.softmax(m(x), 1) for _ in range(8)) / 8
    torch.testing.assert_close(a, (mean * mean.log()).sum(1), rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|trace)` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated:FutureWarning")
def test_mc_dropout_on_torchscript_models():
    """A scripted model keeps its dropout layer (as a compiled submodule with
    ``original_name`` "Dropout"), but was refused as having "no dropout module". It now
    gives the eager model's numbers; a traced one, whose dropout was fixed at tracing, is
    refused by name."""
    model, x = convnet(4), images(5)
    scripted = torch.jit.script(model)
    expected = mc_dropout(model, x, n_passes=6, generator=3)
    torch.testing.assert_close(mc_dropout(scripted, x, n_passes=6, generator=3), expected)
    assert not scripted.training and not scripted.drop.training
    traced = torch.jit.trace(model, x)
    with pytest.raises(ValueError, match="traced TorchScript"):
        mc_dropout(traced, x, n_passes=2, generator=0)

    class OwnDropout(torch.nn.Dropout):  # a user's subclass keeps only its own class name
        pass

    own = copy.deepcopy(model)
    own.drop = OwnDropout(model.drop.p)
    expected = mc_dropout(own, x, n_passes=6, generator=3)
    torch.testing.assert_close(
        mc_dropout(torch.jit.script(own), x, n_passes=6, generator=3), expected
    )

    class NormThenDrop(torch.nn.Module):  # reads `training` for more than dropout
        def forward(self, h):
            if self.training:
                h = h - h.mean(0, keepdim=True)
            return torch.nn.functional.dropout(h, 0.3, self.training)

    mixed = copy.deepcopy(model)
    mixed.drop = torch.nn.Sequential(model.drop, NormThenDrop())
    expected = mc_dropout(mixed, x, n_passes=4, generator=1)  # eager: only nn.Dropout switched
    scripted_mixed = torch.jit.script(mixed)
    torch.testing.assert_close(mc_dropout(scripted_mixed, x, n_passes=4, generator=1), expected)
    from captum_ext.metrics.trust_baselines import _is_dropout

    found = [name for name, m in scripted_mixed.named_modules() if _is_dropout(m)]
    assert found == ["drop.0"]  # the scripted nn.Dropout, not the leaf that also centres
    wrapper = torch.nn.Sequential(torch.jit.trace(model, x))  # traced inside an eager model
    with pytest.raises(ValueError, match="traced TorchScript"):
        mc_dropout(wrapper, x, n_passes=2, generator=0)


def test_mc_dropout_without_dropping_is_negative_entropy():
    model, x = convnet(4), images(3)
    model.drop.p = 0.0
    torch.testing.assert_close(
        mc_dropout(model, x, n_passes=3, generator=0), negative_entropy(model, x)
    )


# ---------------------------------------------------------------------------------------------
# nothing left behind


def test_model_left_exactly_as_found():
    model, x = convnet(5), images(3)
    model.conv.weight.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.bn.train()  # an unusual mix of modes must survive
    model.bn.eval()
    model.drop.train()
    before = snapshot(model)
    calls = [
        lambda: gradtrust(model, x),
        lambda: gradtrust(model, x, form="reference", method="autograd"),
        lambda: gradtrust(model, x, layer="conv"),
        lambda: softmax_confidence(model, x),
        lambda: odin(model, x),
        lambda: mc_dropout(model, x, n_passes=2, generator=0),
        lambda: gradnorm(model, x),
        lambda: purview(model, x),
    ]
    for call in calls:
        call()
        assert_same_state(before, snapshot(model))
    with pytest.raises(ValueError):
        gradtrust(model, x, layer="conv", method="closed_form")
    with pytest.raises(ValueError):
        gradtrust(model, x, k=10)
    assert_same_state(before, snapshot(model))


def test_default_layer_is_the_last_linear_to_run():
    class HeadFirst(nn.Module):
        """Registers the classifier before the hidden layer: the last *registered* linear is
        the hidden one, the last to *run* is the classifier."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(5, 3).to(DTYPE)
            self.hidden = nn.Linear(6, 5).to(DTYPE)

        def forward(self, x):
            return self.fc(torch.tanh(self.hidden(x)))

    model, x = HeadFirst(), vectors(4)
    torch.testing.assert_close(gradtrust(model, x), gradtrust(model, x, layer="fc"))
    torch.testing.assert_close(gradnorm(model, x), gradnorm(model, x, layer=model.fc))


def test_trust_module_still_exports_everything_without_warning():
    import warnings

    import captum_ext.metrics.grad_trust as new_gradtrust
    import captum_ext.metrics.trust as trust
    import captum_ext.metrics.trust_baselines as baselines

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in trust.__all__:
            home = new_gradtrust if name in new_gradtrust.__all__ else baselines
            assert getattr(trust, name) is getattr(home, name)


def test_gradnorm_refuses_one_logit_and_mc_dropout_a_seed_beyond_64_bits():
    """gradnorm on a one-logit model returned all zeros silently (the softmax of one output is
    1, every gradient 0), where every other score refuses C = 1; mc_dropout(generator=2**70)
    ended in torch's "Overflow when unpacking long long"."""
    model = mlp(1)
    x = torch.randn(4, 6, dtype=DTYPE)
    with pytest.raises(ValueError, match="gradnorm .* the model has 1 output.*two_class_logits"):
        gradnorm(model, x)
    dropout = nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.5), nn.Linear(12, 3)).to(DTYPE)
    with pytest.raises(ValueError, match=r"`generator`=1180591620717411303424: an int seed"):
        mc_dropout(dropout, x, generator=2**70)
    assert mc_dropout(dropout, x, generator=2**63).shape == (4,)


def test_gradnorm_and_minmax_survive_values_whose_squares_overflow_float32():
    """`vector_norm` squared features above ~1.8e19 to inf in float32 (gradnorm inf where the
    score is 1.4e20), and min-max normalisation of a map spanning +-3e38 divided by an
    overflowed span (NaN)."""
    from captum_ext._utils.maps import minmax_normalize
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import load_sample_digits
    from captum_ext.metrics import gradnorm

    model = load_bundled_model().eval()
    x = load_sample_digits()[0][:2]
    reference = gradnorm(model.double(), x.double() * 1e19)
    got = gradnorm(load_bundled_model().eval(), x * 1e19)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), reference, rtol=1e-4, atol=0)
    assert hasattr(gradnorm, "__wrapped__")  # still Captum's log_usage-wrapped entry point
    maps = (torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 3e38
    assert bool(torch.isfinite(maps).all())
    expected = minmax_normalize(maps / 1e30, 1)
    assert bool(torch.isfinite(expected).all()) and float(expected.max()) == 1.0
    torch.testing.assert_close(minmax_normalize(maps, 1), expected)
