"""Extreme arguments and empty batches in LayerIBA, the inversion losses and the VOICE
read-outs: results stay finite (or the argument is refused by name), and ordinary
arguments give what they gave before.

LayerIBA is compared with the documented capacity computed here in float64 from the
equations, ``ln(1 - lambda)`` written as ``-softplus(alpha)`` (``1 - sigmoid(alpha)`` rounds
to 0 in float64 above alpha ~ 37, where the plain formula gives ``log 0``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, model_snapshot
from torch import nn

import captum_ext.attr.layer_iba as layer_iba
from captum_ext.attr import LayerIBA
from captum_ext.inversion import (
    class_cosine_diversity,
    cosine_diversity,
    cross_entropy_to_labels,
    feature_orthogonality,
    kl_to_conditioning,
    perturbed_kl_ce,
    pixel_range,
    total_variation,
    weight_gradient_norm,
)
from captum_ext.metrics import voice_iou, voice_snr

# ------------------------------------------------------------------ LayerIBA


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


def _setup(dtype=torch.float64):
    torch.manual_seed(0)
    model = _Net().to(dtype).eval()
    data = torch.randn(32, 3, 6, 6, dtype=dtype)
    with torch.no_grad():
        seen = []
        handle = model.conv2.register_forward_hook(lambda m, a, o: seen.append(o))
        model(data)
        handle.remove()
    acts = seen[0]
    mean, std = acts.mean(0), acts.std(0)
    active = torch.ones_like(mean, dtype=torch.bool)
    active[0, 0, 0] = False  # one inactive feature: its capacity is 0
    return model, data[:3], mean, std, active


def _layer_output(model, x):
    seen = []
    handle = model.conv2.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0].double()


def _softplus(a: float) -> float:
    return max(a, 0.0) + math.log1p(math.exp(-abs(a)))


def _equation_bits_constant_alpha(r, mean, std, active, alpha: float) -> torch.Tensor:
    """(N, 1, h, w) bits of the documented KL for every alpha equal to ``alpha`` (the blur of
    a constant lambda is that constant), float64, ln(1 - lambda) = -softplus(alpha)."""
    lam = math.exp(-_softplus(-alpha))  # sigmoid(alpha)
    log_keep = -_softplus(alpha)  # ln(1 - sigmoid(alpha)) = ln sigmoid(-alpha)
    keep = math.exp(log_keep)
    rn = (r - mean.double()) / std.double().clamp_min(0.01)
    kl = 0.5 * ((lam * rn) ** 2 + keep**2 - 1 - 2 * log_keep) * active.double()
    return (kl / math.log(2)).sum(dim=1, keepdim=True)


@pytest.mark.parametrize("sigma", [1.0, None], ids=["blur", "no_blur"])
@pytest.mark.parametrize("init_alpha", [5.0, 40.0, 800.0, -40.0, -800.0])
def test_iba_init_alpha_maps_equal_float64_equations(init_alpha, sigma):
    model, x, mean, std, active = _setup()
    before = model_snapshot(model)
    iba = LayerIBA(model, model.conv2, mean=mean, std=std, active=active)
    bits = iba.attribute(x, target=[0, 1, 2], init_alpha=init_alpha, steps=1, sigma=sigma)
    assert_model_unchanged(model, before)
    assert bool(torch.isfinite(bits).all())
    expected = _equation_bits_constant_alpha(_layer_output(model, x), mean, std, active, init_alpha)
    torch.testing.assert_close(bits, expected, rtol=1e-10, atol=1e-10)
    if init_alpha > 0:  # about alpha / ln 2 bits per active feature
        assert float(bits.max()) >= 5 * (init_alpha - 1) / math.log(2) * 0.99


def _blur64(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian blur (side 2 round(2 sigma) + 1, reflection), float64 conv2d."""
    radius = int(round(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    k = k / k.sum()
    c = values.shape[1]
    padded = F.pad(values, (radius,) * 4, mode="reflect")
    return F.conv2d(padded, k.expand(c, 1, *k.shape), groups=c)


def _equation_iba(model, x, targets, mean, std, active, *, init_alpha, steps, sigma, beta):
    """Zero-noise IBA (n_noise=1) from the equations, float64, with 1 - lambda taken as the
    blur of sigmoid(-alpha) (exact in float64 for alpha up to ~700)."""
    r = _layer_output(model, x)
    std = std.double().clamp_min(0.01)
    mean, act = mean.double(), active.double()
    rn = (r - mean) / std
    alpha = torch.full_like(r, init_alpha, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=1.0)
    for step in range(steps):
        lam = _blur64(torch.sigmoid(alpha), sigma)
        keep = _blur64(torch.sigmoid(-alpha), sigma)
        kl = 0.5 * ((lam * rn) ** 2 + keep**2 - 1 - 2 * torch.log(keep)) * act
        if step == steps - 1:
            return (kl.detach() / math.log(2)).sum(dim=1, keepdim=True)
        z = (lam * r + (1 - lam) * mean) * act
        handle = model.conv2.register_forward_hook(lambda m, a, o, z=z: z)
        try:
            out = model(x)
        finally:
            handle.remove()
        model_loss = F.cross_entropy(out, torch.tensor(targets), reduction="none")
        loss = (model_loss + beta * kl.flatten(1).mean(dim=1)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raise AssertionError("unreachable")


@pytest.mark.parametrize("init_alpha", [5.0, 40.0])
def test_iba_optimised_maps_equal_float64_equations_at_large_init_alpha(monkeypatch, init_alpha):
    monkeypatch.setattr(
        layer_iba,
        "standard_normal",
        lambda shape, generators, dtype, device: torch.zeros(shape, dtype=dtype, device=device),
    )
    model, x, mean, std, active = _setup()
    iba = LayerIBA(model, model.conv2, mean=mean, std=std, active=active)
    options = dict(init_alpha=init_alpha, steps=6, sigma=1.0, beta=10.0)
    bits = iba.attribute(x, target=[0, 1, 2], n_noise=1, **options)
    expected = _equation_iba(model, x, [0, 1, 2], mean, std, active, **options)
    assert bool(torch.isfinite(bits).all())
    torch.testing.assert_close(bits, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    ("bottleneck_dtype", "rtol"),
    [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)],
)
def test_iba_large_init_alpha_in_low_precision_bottlenecks(bottleneck_dtype, rtol):
    model, x, mean, std, active = _setup(torch.float32)
    iba = LayerIBA(model, model.conv2, mean=mean, std=std, active=active)
    bits = iba.attribute(x, target=0, init_alpha=40.0, steps=1, bottleneck_dtype=bottleneck_dtype)
    expected = _equation_bits_constant_alpha(_layer_output(model, x), mean, std, active, 40.0)
    assert bool(torch.isfinite(bits).all())
    torch.testing.assert_close(bits.double(), expected, rtol=rtol, atol=0.0)
    # a few Adam steps from there stay finite too
    more = iba.attribute(x, target=0, init_alpha=40.0, steps=4, bottleneck_dtype=bottleneck_dtype)
    assert bool(torch.isfinite(more).all())


def test_iba_init_alpha_beyond_the_bottleneck_dtype_is_refused():
    model, x, mean, std, active = _setup(torch.float32)
    iba = LayerIBA(model, model.conv2, mean=mean, std=std, active=active)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="`init_alpha`=100000 .*float16"):
        iba.attribute(x, target=0, init_alpha=1e5, steps=2, bottleneck_dtype=torch.float16)
    assert_model_unchanged(model, before)


def test_iba_maps_overflowing_the_layer_dtype_are_refused():
    model, x, mean, std, active = _setup(torch.float32)
    iba = LayerIBA(model, model.conv2, mean=mean, std=std, active=active)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="overflow torch.float32.*`init_alpha`=1e\\+300"):
        iba.attribute(x, target=0, init_alpha=1e300, steps=1)
    with pytest.raises(ValueError, match="`init_alpha`"):
        iba.attribute(x, target=0, init_alpha=1e300, steps=1, return_type="capacity")
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("min_std", [1e-300, 1e300])
def test_iba_min_std_outside_the_layer_dtype_is_refused(min_std):
    model, x, mean, std, active = _setup(torch.float32)
    iba = LayerIBA(model, model.conv2, mean=mean, std=std, active=active)
    with pytest.raises(ValueError, match="`min_std`"):
        iba.attribute(x, target=0, steps=2, min_std=min_std)


def test_iba_tiny_min_std_overflowing_the_maps_is_refused():
    model, x, mean, std, active = _setup(torch.float32)
    std = std.clone()
    std[0] = 0.0  # a feature that never varied in the statistics, but varies in x
    iba = LayerIBA(model, model.conv2, mean=mean, std=std)
    with pytest.raises(ValueError, match="overflow torch.float32.*`min_std`=1e-30"):
        iba.attribute(x, target=0, steps=2, min_std=1e-30)


@pytest.mark.parametrize("sigma", [1e-300, 0.2])
def test_iba_sigma_below_a_quarter_is_no_blur(sigma):
    assert layer_iba.gaussian_taps(sigma) == (1.0,)
    model, x, mean, std, active = _setup()
    iba = LayerIBA(model, model.conv2, mean=mean, std=std, active=active)
    bits = iba.attribute(x, target=0, steps=3, sigma=sigma, generator=0)
    assert bool(torch.isfinite(bits).all())
    torch.testing.assert_close(bits, iba.attribute(x, target=0, steps=3, sigma=None, generator=0))


# ------------------------------------------------------------------ inversion losses


def _empty(*shape):
    return torch.rand(0, *shape, dtype=torch.float64, requires_grad=True)


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))


_EMPTY_LOSSES = {
    "total_variation": lambda: (lambda x: total_variation(x), _empty(3, 2, 2)),
    "pixel_range": lambda: (lambda x: pixel_range(x), _empty(3, 2, 2)),
    "kl_to_conditioning": lambda: (
        lambda q: kl_to_conditioning(q, torch.rand(0, 5).double()),
        _empty(5),
    ),
    "cross_entropy_to_labels": lambda: (
        lambda q: cross_entropy_to_labels(q, torch.zeros(0, dtype=torch.long)),
        _empty(5),
    ),
    "cross_entropy_to_vectors": lambda: (
        lambda q: cross_entropy_to_labels(q, torch.rand(0, 5).double()),
        _empty(5),
    ),
    "perturbed_kl_ce": lambda: (
        lambda p: perturbed_kl_ce(_Flat().double(), p, torch.rand(0, 5).double(), generator=0),
        _empty(3, 2, 2),
    ),
    "weight_gradient_norm": lambda: (
        lambda p: weight_gradient_norm(_Flat().double(), p, torch.zeros(0, dtype=torch.long)),
        _empty(3, 2, 2),
    ),
}


@pytest.mark.parametrize("name", sorted(_EMPTY_LOSSES))
def test_losses_of_an_empty_batch_are_zero_on_the_graph(name):
    loss, x = _EMPTY_LOSSES[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = loss(x)
    assert value.shape == ()
    assert value.dtype == torch.float64 and value.device == x.device
    assert float(value.detach()) == 0.0
    (grad,) = torch.autograd.grad(value, x, allow_unused=True)
    assert grad is None or grad.shape == x.shape


@pytest.mark.parametrize("shape", [(2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)])
def test_total_variation_without_pixel_pairs_is_zero(shape):
    assert float(total_variation(torch.rand(shape))) == 0.0


def test_losses_on_ordinary_batches_are_unchanged():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    vertical = ((x[:, :, 1:] - x[:, :, :-1]) ** 2).mean()
    horizontal = ((x[..., 1:] - x[..., :-1]) ** 2).mean()
    assert float(total_variation(x)) == pytest.approx(float(vertical + horizontal), rel=1e-14)
    q, c = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), 1)
    kl = (c * (c.log() - F.log_softmax(q, 1))).sum(1).mean()
    assert float(kl_to_conditioning(q, c)) == pytest.approx(float(kl), rel=1e-6)
    labels = torch.tensor([0, 4, 2, 1])
    ce = float(cross_entropy_to_labels(q, labels))
    assert ce == pytest.approx(float(F.cross_entropy(q, labels)), rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan")])
@pytest.mark.parametrize(
    "loss",
    [
        cosine_diversity,
        feature_orthogonality,
        lambda f, eps: class_cosine_diversity(f, torch.zeros(3, dtype=torch.long), eps=eps),
    ],
    ids=["cosine", "orthogonality", "class_cosine"],
)
def test_diversity_terms_refuse_a_non_positive_eps(loss, eps):
    features = torch.zeros(3, 4)  # an all-zero feature vector divided by eps = 0: NaN
    with pytest.raises(ValueError, match="`eps`"):
        loss(features, eps=eps)


@pytest.mark.parametrize("eps", [float("inf"), float("nan")])
def test_perturbed_kl_ce_refuses_a_non_finite_eps(eps):
    pixels, c = torch.rand(2, 3, 2, 2), torch.softmax(torch.randn(2, 5), 1)
    with pytest.raises(ValueError, match="`eps`"):
        perturbed_kl_ce(_Flat(), pixels, c, eps=eps, generator=0)


# ------------------------------------------------------------------ VOICE read-outs


@pytest.mark.parametrize("shape", [(0, 1, 4, 4), (0, 4, 4)])
def test_voice_readouts_of_an_empty_batch_are_empty_without_warnings(shape):
    maps = torch.rand(shape, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        snr = voice_snr(maps)
        iou = voice_iou(maps, maps.clone())
    for value in (snr, iou):
        assert value.shape == (0,) and value.dtype == torch.float64


@pytest.mark.parametrize("shape", [(2, 1, 0, 4), (2, 0, 4), (2, 1, 3, 0)])
def test_voice_readouts_refuse_maps_without_pixels(shape):
    with pytest.raises(ValueError, match="`uncertainty`.*no pixels"):
        voice_snr(torch.rand(shape))
    with pytest.raises(ValueError, match="`explanation`.*no pixels"):
        voice_iou(torch.rand(shape), torch.rand(shape))


@pytest.mark.parametrize("smoothing", [1e-50, 1e-320, 1e308])
def test_voice_iou_stays_in_unit_interval_for_extreme_smoothing(smoothing):
    empty = torch.zeros(2, 1, 3, 3)  # constant maps: empty masks, IoU 1 by the smoothing
    assert voice_iou(empty, empty, smoothing=smoothing).tolist() == [1.0, 1.0]
    a, b = torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3)
    iou = voice_iou(a, b, smoothing=smoothing)
    assert bool(((iou >= 0) & (iou <= 1)).all())


def test_voice_iou_of_float16_maps_with_more_pixels_than_float16_holds():
    torch.manual_seed(0)
    maps = torch.rand(1, 1, 300, 300).half()  # ~81,000 pixels above the threshold > 65,504
    iou = voice_iou(maps, maps.clone())
    assert iou.dtype == torch.float16
    assert iou.tolist() == [1.0]
    snr = voice_snr(maps)
    expected = maps.double().mean() / maps.double().std(correction=0)
    assert float(snr) == pytest.approx(float(expected), rel=2e-3)


def test_voice_readouts_on_ordinary_maps_are_unchanged():
    torch.manual_seed(0)
    a, b = torch.rand(3, 1, 5, 5), torch.rand(3, 1, 5, 5)

    def norm(m):
        low, high = m.amin((1, 2, 3), True), m.amax((1, 2, 3), True)
        return (m - low) / (high - low)

    ma, mb = norm(a) > 0.1, norm(b) > 0.1
    both = (ma & mb).flatten(1).sum(1).float()
    either = (ma | mb).flatten(1).sum(1).float()
    torch.testing.assert_close(voice_iou(a, b), (both + 1e-6) / (either + 1e-6))
    u = a.flatten(1)
    torch.testing.assert_close(voice_snr(a), u.mean(1) / u.std(1, correction=0))
