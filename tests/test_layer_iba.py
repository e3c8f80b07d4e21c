"""LayerIBA (Schulz et al., ICLR 2020; Khakzar et al.'s inverse / regression variants).

The main check compares LayerIBA with an independent float64 implementation written here, one
example at a time, from the paper's equations and the reference's order of operations
(BioroboticsLab/IBA, ``IBA.analyze``): per step, noise drawn from the example's generator,
``sigmoid(alpha)`` blurred, the noisy mix substituted for the layer output, the model loss
averaged over the noisy copies plus beta times the mean capacity, one Adam step; the map is
the capacity of the last evaluated step. (The reference itself is not installable from a
package registry; the comparison with a run of its code is recorded in benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, model_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import captum_ext.attr.layer_iba as layer_iba
from captum_ext.attr import LayerIBA, upsample_bits

# ------------------------------------------------------------------ independent reference


def _blur_kernel(sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian as the outer product of two 1-D Gaussians (float64)."""
    radius = int(round(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return k / k.sum()


def reference_iba(
    model,
    layer,
    x,
    target,
    mean,
    std,
    active,
    *,
    beta=10.0,
    steps=10,
    lr=1.0,
    n_noise=10,
    sigma=1.0,
    init_alpha=5.0,
    min_std=0.01,
    post_relu=False,
    inverse=False,
    regression=False,
    generator=None,
    zero_noise=False,
):
    """IBA capacity (nats, C x h x w) for ONE example, written from the equations."""
    with torch.no_grad():
        seen = []
        handle = layer.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
        clean_out = model(x)
        handle.remove()
    r = seen[0][0]  # C x h x w
    std = torch.maximum(std, torch.full_like(std, min_std))
    kernel = _blur_kernel(sigma).to(r.dtype)
    radius = (kernel.shape[0] - 1) // 2
    alpha = torch.full_like(r, init_alpha, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=lr)
    act = active.to(r.dtype)

    def lam_of(a):
        lam = torch.sigmoid(a)[None]
        lam = F.pad(lam, (radius,) * 4, mode="reflect")
        weight = kernel.expand(r.shape[0], 1, *kernel.shape)
        return F.conv2d(lam, weight, groups=r.shape[0])[0]

    def kl_of(lam):
        rn = (r - mean) / std
        kl = 0.5 * ((lam * rn) ** 2 + (1 - lam) ** 2 - 1 - 2 * torch.log(1 - lam))
        return kl * act

    for step in range(steps):
        lam = lam_of(alpha)
        kl = kl_of(lam)
        if step == steps - 1:
            return kl.detach()
        if zero_noise:
            eps = torch.zeros(n_noise, *r.shape, dtype=r.dtype)
        else:
            eps = torch.randn(n_noise, *r.shape, generator=generator, dtype=r.dtype)
        noise = mean + std * eps
        if inverse:
            z = lam * noise + (1 - lam) * r
        else:
            z = lam * r + (1 - lam) * noise
        z = z * act
        if post_relu:
            z = z.clamp(min=0)
        handle = layer.register_forward_hook(lambda m, a, o, z=z: z)
        try:
            out = model(x.expand(n_noise, *x.shape[1:]))
        finally:
            handle.remove()
        if regression:
            model_loss = ((out[:, target] - clean_out[0, target]) ** 2).mean()
        else:
            model_loss = F.cross_entropy(out, torch.full((n_noise,), target))
        loss = (-model_loss if inverse else model_loss) + beta * kl.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ models


class VGGStyle(nn.Module):
    """conv-relu-conv-relu-pool-conv-relu(in place)-pool-linear; layer ``features.5`` is a
    pre-ReLU conv (as VGG-16's conv4_1 in the paper) followed by an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(48, 6)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def _vgg_style():
    torch.manual_seed(0)
    return VGGStyle().double().eval()


def _stats(model, layer, data):
    with torch.no_grad():
        seen = []
        handle = layer.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
        model(data)
        handle.remove()
    acts = seen[0]
    return acts.mean(0), acts.std(0), (acts != 0).double().mean(0) > 0.01


@pytest.fixture(scope="module")
def vgg_setup():
    model = _vgg_style()
    torch.manual_seed(1)
    data = torch.randn(64, 3, 12, 12, dtype=torch.float64)
    layer = model.features[5]
    mean, std, active = _stats(model, layer, data)
    return model, layer, data, mean, std, active


def _zero_noise(monkeypatch):
    monkeypatch.setattr(
        layer_iba,
        "standard_normal",
        lambda shape, generators, dtype, device: torch.zeros(shape, dtype=dtype, device=device),
    )


# ------------------------------------------------------------------ equality with the equations


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"inverse": True, "beta": 30.0},
        {"regression": True},
        {"post_relu": True, "beta": 1.0, "sigma": 0.5},
    ],
    ids=["iba", "inverse", "regression", "post_relu"],
)
def test_zero_noise_capacity_equals_equations_vgg_style(vgg_setup, monkeypatch, variant):
    model, layer, data, mean, std, active = vgg_setup
    _zero_noise(monkeypatch)
    x = data[:3]
    targets = [0, 3, 5]
    options = dict(variant)
    regression = options.pop("regression", False)
    iba = LayerIBA(model, "features.5", mean=mean, std=std, active=active)
    ours = iba.attribute(
        x,
        target=targets,
        loss="mse" if regression else None,
        return_type="capacity",
        **options,
    )
    for i, t in enumerate(targets):
        expected = reference_iba(
            model, layer, x[i : i + 1], t, mean, std, active, zero_noise=True,
            regression=regression, **options,
        )  # fmt: skip
        torch.testing.assert_close(ours[i], expected / math.log(2), rtol=1e-8, atol=1e-10)


def test_seeded_noise_equals_equations_vgg_style(vgg_setup):
    """Per-example seeds: each example's noise is drawn from its own generator, step by step,
    as (n_noise, C, h, w) standard normals (the reference's order for one image)."""
    model, layer, data, mean, std, active = vgg_setup
    x = data[5:8]
    seeds = [11, 12, 13]
    iba = LayerIBA(model, layer, mean=mean, std=std, active=active)
    ours = iba.attribute(x, target=[1, 2, 4], n_noise=4, return_type="capacity", generator=seeds)
    for i, (t, s) in enumerate(zip([1, 2, 4], seeds)):
        g = torch.Generator().manual_seed(s)
        expected = reference_iba(
            model, layer, x[i : i + 1], t, mean, std, active, n_noise=4, generator=g
        )
        torch.testing.assert_close(ours[i], expected / math.log(2), rtol=1e-8, atol=1e-10)


def test_zero_noise_capacity_equals_equations_resnet18(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).double().eval()
    data = torch.randn(8, 3, 64, 64, dtype=torch.float64)
    mean, std, active = _stats(model, model.layer2, data)
    _zero_noise(monkeypatch)
    iba = LayerIBA(model, "layer2", mean=mean, std=std, active=active)
    x = data[:1]
    target = int(model(x).argmax())
    ours = iba.attribute(x, target, steps=4, n_noise=2, post_relu=True, return_type="capacity")
    expected = reference_iba(
        model, model.layer2, x, target, mean, std, active, steps=4, n_noise=2,
        post_relu=True, zero_noise=True,
    )  # fmt: skip
    torch.testing.assert_close(ours[0], expected / math.log(2), rtol=1e-8, atol=1e-10)


def test_float64_bottleneck_of_a_float32_model_is_closer_to_the_float64_maps(
    vgg_setup, monkeypatch
):
    """The default bottleneck arithmetic (float64) leaves a float32 model's maps with only
    the model's rounding; doing it in float32 as well adds the bottleneck's own. (Zero noise:
    float32 and float64 draws of one seed differ.)"""
    model64, _, data, mean, std, active = vgg_setup
    _zero_noise(monkeypatch)
    model32 = _vgg_style().float()  # the float64 model's weights are float32 numbers
    # inputs and statistics that float32 holds exactly, so both models see the same numbers
    x, mean, std = data[:4].float().double(), mean.float().double(), std.float().double()
    targets = [0, 3, 5, 1]
    exact = LayerIBA(model64, "features.5", mean=mean, std=std, active=active).attribute(
        x, target=targets, return_type="capacity"
    )
    iba32 = LayerIBA(model32, "features.5", mean=mean.float(), std=std.float(), active=active)
    errors = {}
    for dtype in ("auto", torch.float64, torch.float32):
        got = iba32.attribute(
            x.float(), target=targets, return_type="capacity", bottleneck_dtype=dtype,
        )  # fmt: skip
        assert got.dtype == torch.float32
        errors[dtype] = float((got.double() - exact).abs().max())
    assert errors["auto"] == errors[torch.float64]
    assert errors[torch.float64] < errors[torch.float32] / 4 and errors[torch.float32] < 1e-5
    # a float64 model is unaffected by the choice beyond float32's rounding of the mix
    plain = LayerIBA(model64, "features.5", mean=mean, std=std, active=active).attribute(
        x, target=targets, return_type="capacity", bottleneck_dtype=torch.float64
    )
    assert torch.equal(plain, exact)
    # the noise is drawn in the layer's dtype: one seed, the same draws for either arithmetic
    monkeypatch.undo()
    seeded = [
        iba32.attribute(x.float(), target=targets, generator=3, bottleneck_dtype=dtype)
        for dtype in (torch.float64, torch.float32)
    ]
    torch.testing.assert_close(seeded[0], seeded[1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ batching and properties


@pytest.fixture(scope="module")
def digits_iba(bundled_model, bundled_digits):
    images, labels = bundled_digits
    iba = LayerIBA(bundled_model, "features.7")
    iba.estimate(images)
    return iba, images, labels


def test_batch_equals_single_calls(digits_iba, bundled_model):
    """Per-example seeds: the batch gives each example's single-call map. In float32 the
    batched convolutions round differently from single ones (maps of ~10 bits per position
    differ in the last bits: 1e-6 on one CPU, 2e-6 on an AMD EPYC, whose kernels round
    otherwise); in float64 the equality is to 1e-10."""
    iba, images, labels = digits_iba
    x, y = images[:4], labels[:4]
    seeds = [3, 1, 4, 1]
    batched = iba.attribute(x, target=y, generator=seeds)
    model64 = copy.deepcopy(bundled_model).double()
    iba64 = LayerIBA(
        model64, "features.7", mean=iba.mean.double(), std=iba.std.double(), active=iba.active
    )
    batched64 = iba64.attribute(x.double(), target=y, generator=seeds)
    for i in range(4):
        single = iba.attribute(x[i : i + 1], target=int(y[i]), generator=seeds[i])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-5)
        single64 = iba64.attribute(x[i : i + 1].double(), target=int(y[i]), generator=seeds[i])
        torch.testing.assert_close(batched64[i : i + 1], single64, rtol=0, atol=1e-10)


def test_bits_fall_strictly_with_beta_on_the_digit_model(digits_iba):
    iba, images, labels = digits_iba
    x, y = images[::10], labels[::10]
    totals = [
        iba.attribute(x, target=y, beta=beta, generator=0).sum(dim=(1, 2, 3))
        for beta in (1, 10, 100)
    ]
    assert bool((totals[0] > totals[1]).all()) and bool((totals[1] > totals[2]).all())
    assert bool((totals[2] > 0).all())


def test_return_types_agree_and_default_target_is_the_prediction(digits_iba, bundled_model):
    iba, images, labels = digits_iba
    x = images[:3]
    predicted = bundled_model(x).argmax(1)
    bits = iba.attribute(x, generator=7)
    assert bits.shape == (3, 1, 7, 7)
    torch.testing.assert_close(bits, iba.attribute(x, target=predicted, generator=7))
    capacity = iba.attribute(x, return_type="capacity", generator=7)
    assert capacity.shape == (3, 64, 7, 7)
    torch.testing.assert_close(capacity.sum(1, keepdim=True), bits)
    lam = iba.attribute(x, return_type="lambda", generator=7)
    assert bool(((lam > 0) & (lam < 1)).all())
    # inactive features carry no bits
    assert bool((capacity[:, ~iba.active.expand(64, 7, 7)] == 0).all())


def test_no_grad_outside_gives_the_same_maps(digits_iba):
    iba, images, labels = digits_iba
    expected = iba.attribute(images[:2], target=labels[:2], generator=5)
    with torch.no_grad():
        got = iba.attribute(images[:2], target=labels[:2], generator=5)
    torch.testing.assert_close(got, expected)


def test_inverse_bits_mark_what_removal_destroys(digits_iba, bundled_model):
    """Inverse IBA maps differ from IBA maps and still keep the bits non-negative."""
    iba, images, labels = digits_iba
    x, y = images[:2], labels[:2]
    inverse = iba.attribute(x, target=y, inverse=True, beta=30, generator=2)
    plain = iba.attribute(x, target=y, generator=2)
    assert bool((inverse >= 0).all()) and not torch.allclose(inverse, plain)


def test_upsample_to_input_keeps_the_bits(digits_iba):
    iba, images, labels = digits_iba
    small = iba.attribute(images[:2], target=labels[:2], generator=0)
    big = iba.attribute(images[:2], target=labels[:2], generator=0, upsample_to_input=True)
    assert big.shape == (2, 1, 28, 28)
    torch.testing.assert_close(big.sum((1, 2, 3)), small.sum((1, 2, 3)), rtol=1e-5, atol=0)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 3),
    k=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    big_h=st.integers(1, 40),
    big_w=st.integers(1, 40),
    seed=st.integers(0, 10_000),
)
def test_upsample_bits_keeps_each_maps_sum(n, k, h, w, big_h, big_w, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(n, k, h, w, generator=g) * 5
    up = upsample_bits(bits, (big_h, big_w))
    assert up.shape == (n, k, big_h, big_w)
    torch.testing.assert_close(up.sum((2, 3)), bits.sum((2, 3)), rtol=1e-5, atol=1e-6)
    assert bool((up >= 0).all())


def test_upsample_bits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`bits`"):
        upsample_bits(torch.rand(7, 7), (28, 28))
    with pytest.raises(ValueError, match="`size`"):
        upsample_bits(torch.rand(1, 1, 7, 7), (28,))


# ------------------------------------------------------------------ estimate


def test_estimate_equals_direct_statistics_and_accepts_dataloaders(vgg_setup):
    model, layer, data, mean, std, active = vgg_setup
    iba = LayerIBA(model, layer)
    iba.estimate(data)
    torch.testing.assert_close(iba.mean, mean)
    torch.testing.assert_close(iba.std, std)
    assert torch.equal(iba.active, active) and iba.n_estimated == 64
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data, torch.zeros(64)), batch_size=10
    )
    other = LayerIBA(model, layer)
    other.estimate(loader, n_samples=35)
    assert other.n_estimated == 35
    m35, s35, a35 = _stats(model, layer, data[:35])
    torch.testing.assert_close(other.mean, m35)
    torch.testing.assert_close(other.std, s35)
    assert torch.equal(other.active, a35)


# ------------------------------------------------------------------ model state and errors


class _Boom(RuntimeError):
    pass


def test_model_left_unchanged_also_when_attribute_raises(fresh_bundled_model, sample_digits):
    model = fresh_bundled_model.train()
    images, labels = sample_digits
    model.classifier.weight.requires_grad_(False)
    model.features[0].register_forward_hook(lambda m, a, o: None)
    before = model_snapshot(model)
    iba = LayerIBA(model, "features.7")
    iba.estimate(images[:20])
    inputs = images[:2].clone().requires_grad_(True)
    iba.attribute(inputs, target=labels[:2], steps=3, n_noise=2, generator=0)
    assert_model_unchanged(model, before)
    assert inputs.requires_grad and inputs.grad is None

    def explode(module, args, output):
        raise _Boom("after the layer")

    handle = model.classifier.register_forward_hook(explode)
    before = model_snapshot(model)
    with pytest.raises(_Boom):
        iba.attribute(images[:2], steps=3, n_noise=2)
    assert_model_unchanged(model, before)
    handle.remove()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="target"):
        iba.attribute(images[:2], target=99, steps=2)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"beta": -1}, ValueError, "beta"),
        ({"steps": 0}, ValueError, "steps"),
        ({"n_noise": 1.5}, TypeError, "n_noise"),
        ({"lr": 0}, ValueError, "lr"),
        ({"return_type": "pixels"}, ValueError, "return_type"),
        ({"loss": "hinge"}, ValueError, "loss"),
        ({"inverse": 1}, TypeError, "inverse"),
        ({"generator": [1, 2, 3]}, ValueError, "generator"),
        ({"generator": "seed"}, TypeError, "generator"),
        ({"sigma": 5.0}, ValueError, "sigma"),
        ({"target": torch.tensor([[1, 2], [3, 4]])}, ValueError, "target"),
        ({"bottleneck_dtype": torch.int32}, TypeError, "bottleneck_dtype"),
        ({"bottleneck_dtype": "double"}, TypeError, "bottleneck_dtype"),
    ],
)
def test_bad_arguments_name_the_argument(digits_iba, kwargs, error, match):
    iba, images, labels = digits_iba
    with pytest.raises(error, match=match):
        iba.attribute(images[:2], **kwargs)


def test_statistics_errors(bundled_model, bundled_digits):
    images, _ = bundled_digits
    with pytest.raises(ValueError, match="estimate"):
        LayerIBA(bundled_model, "features.7").attribute(images[:1])
    wrong = LayerIBA(bundled_model, "features.7", mean=torch.zeros(64, 5, 5), std=torch.ones(5))
    with pytest.raises(ValueError, match="`mean`"):
        wrong.attribute(images[:1])
    with pytest.raises(ValueError, match="std"):
        LayerIBA(bundled_model, "features.7", mean=torch.zeros(1), std=-torch.ones(1))
    with pytest.raises(TypeError, match="mean"):
        LayerIBA(bundled_model, "features.7", mean=[0.0], std=torch.ones(1))
    flat = LayerIBA(bundled_model, "classifier", mean=torch.zeros(10), std=torch.ones(10))
    with pytest.raises(ValueError, match="N x C x h x w"):
        flat.attribute(images[:1])
    with pytest.raises(ValueError, match="at least 2"):
        LayerIBA(bundled_model, "features.7").estimate(images[:1])
    with pytest.raises(ValueError, match="`target` is required"):
        LayerIBA(bundled_model, "features.7", mean=torch.zeros(1), std=torch.ones(1)).attribute(
            images[:1], loss="mse"
        )


def test_inside_captum_noise_tunnel(digits_iba):
    """NoiseTunnel calls attribute under no_grad with repeated inputs and targets."""
    from captum.attr import NoiseTunnel

    iba, images, labels = digits_iba
    x, y = images[:2], labels[:2]
    options = {"generator": 0}
    maps = NoiseTunnel(iba).attribute(
        x, nt_samples=3, nt_samples_batch_size=2, target=y, stdevs=0.0, **options
    )
    assert maps.shape == (2, 1, 7, 7)
    # with zero input noise every sample is the plain map up to the bottleneck's own noise
    # (the repeated rows draw other noise), and the targets reach their examples
    plain = iba.attribute(x, target=y, **options)
    other = iba.attribute(x, target=(y + 1) % 10, **options)
    assert (maps - plain).abs().max() < 0.25 * (other - plain).abs().max()


@pytest.mark.cuda
def test_cuda_equals_cpu_in_float64(vgg_setup):
    """On a GPU the maps stay on the device and equal the CPU ones (the noise comes from CPU
    generators, so both draw the same numbers); an int seed makes a generator on the GPU."""
    model, layer, data, mean, std, active = vgg_setup
    x = data[:3]
    seeds = [1, 2, 3]
    cpu = LayerIBA(model, "features.5", mean=mean, std=std, active=active).attribute(
        x, target=[0, 1, 2], generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    gpu_model = copy.deepcopy(model).cuda()
    iba = LayerIBA(gpu_model, "features.5", mean=mean, std=std, active=active)
    got = iba.attribute(
        x.cuda(), target=[0, 1, 2], generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), cpu, rtol=1e-7, atol=1e-9)
    seeded = iba.attribute(x.cuda(), target=[0, 1, 2], generator=0)
    assert seeded.device.type == "cuda" and bool(torch.isfinite(seeded).all())


def test_additional_forward_args_follow_their_examples(digits_iba, bundled_model):
    """A per-example extra argument is repeated with the noisy copies (and cut with the
    examples in estimate)."""
    iba, images, labels = digits_iba

    def scaled(x, scale):
        return bundled_model(x) * scale

    x, y = images[:3], labels[:3]
    ones = torch.ones(3, 1)
    wrapped = LayerIBA(scaled, bundled_model.features[7])
    wrapped.estimate(images, additional_forward_args=(torch.ones(40, 1),), n_samples=40)
    torch.testing.assert_close(wrapped.mean, iba.mean)
    got = wrapped.attribute(x, target=y, additional_forward_args=(ones,), generator=[1, 2, 3])
    expected = iba.attribute(x, target=y, generator=[1, 2, 3])
    torch.testing.assert_close(got, expected)
    # a different scale for one example changes only that example's map
    scale = torch.tensor([[1.0], [0.2], [1.0]])
    other = wrapped.attribute(x, target=y, additional_forward_args=(scale,), generator=[1, 2, 3])
    torch.testing.assert_close(other[[0, 2]], expected[[0, 2]])
    assert not torch.allclose(other[1], expected[1])
    partial = LayerIBA(scaled, bundled_model.features[7])
    partial.estimate(images, additional_forward_args=(torch.ones(40, 1),), n_samples=25)
    assert partial.n_estimated == 25


def test_prefix_runs_once_per_example_when_the_model_allows(digits_iba, bundled_model):
    """The layers before the bottleneck see N rows, not N * n_noise, and the maps are the
    same as when every copy runs the whole model (the reference's way)."""
    iba, images, labels = digits_iba
    x, y = images[:3], labels[:3]
    rows = []
    handle = bundled_model.features[0].register_forward_hook(
        lambda m, a, o: rows.append(o.shape[0])
    )
    try:
        fast = iba.attribute(x, target=y, generator=[1, 2, 3], steps=3)
        assert rows == [3, 3, 3]  # clean pass + two optimisation steps, N rows each
        rows.clear()
        full = iba.attribute(x, target=y, generator=[1, 2, 3], steps=3, reuse_prefix=False)
        assert rows == [3, 30, 30]
    finally:
        handle.remove()
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6)


def test_layer_inside_a_residual_block_runs_every_copy_in_full():
    """A skip connection around the layer needs the copies' own prefix: the shared-prefix
    attempt fails on the first step and every copy runs the whole model, with the maps the
    float64 equations give."""
    from _helpers import make_tiny_cnn

    model = make_tiny_cnn().eval()
    torch.manual_seed(3)
    data = torch.randn(16, 3, 6, 6, dtype=torch.float64)
    layer = model.features[3].conv
    mean, std, active = _stats(model, layer, data)
    iba = LayerIBA(model, "features.3.conv", mean=mean, std=std, active=active)
    x = data[:2]
    got = iba.attribute(
        x, target=[1, 2], generator=[5, 6], n_noise=3, steps=4, return_type="capacity"
    )
    for i, (t, s) in enumerate(zip([1, 2], [5, 6])):
        expected = reference_iba(
            model, layer, x[i : i + 1], t, mean, std, active, n_noise=3, steps=4,
            generator=torch.Generator().manual_seed(s),
        )  # fmt: skip
        torch.testing.assert_close(got[i], expected / math.log(2), rtol=1e-8, atol=1e-10)


def test_estimate_is_stable_when_the_mean_dwarfs_the_spread():
    """Features around 1e4 with a spread of 1e-2: merged per-batch statistics keep the std
    (a sum-of-squares formula would lose it to cancellation in float32)."""

    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Identity()

        def forward(self, x):
            return self.layer(x + 1e4).flatten(1)[:, :3]

    model = Shift()
    torch.manual_seed(0)
    data = torch.randn(300, 2, 4, 4) * 1e-2
    iba = LayerIBA(model, "layer")
    iba.estimate(torch.utils.data.DataLoader(data, batch_size=7))
    direct = (data.double() + 1e4).std(0)
    torch.testing.assert_close(iba.std.double(), direct, rtol=2e-2, atol=0)
    torch.testing.assert_close(iba.mean.double(), (data.double() + 1e4).mean(0))


def test_regression_iba_on_a_one_output_model(vgg_setup, monkeypatch):
    """Regression IBA on a model with one output per example, (N,): target None explains it,
    and the map equals the equations with the squared deviation from the clean output."""
    model, layer, data, mean, std, active = vgg_setup

    def score(x):
        return model(x)[:, 2]  # (N,) regression output

    _zero_noise(monkeypatch)
    iba = LayerIBA(score, layer, mean=mean, std=std, active=active)
    x = data[10:12]
    got = iba.attribute(x, loss="mse", return_type="capacity", steps=5)
    for i in range(2):
        expected = reference_iba(
            model, layer, x[i : i + 1], 2, mean, std, active, regression=True, steps=5,
            zero_noise=True,
        )  # fmt: skip
        torch.testing.assert_close(got[i], expected / math.log(2), rtol=1e-8, atol=1e-10)


def test_callable_loss_equal_to_the_built_in_gives_the_same_maps(vgg_setup):
    model, layer, data, mean, std, active = vgg_setup
    iba = LayerIBA(model, layer, mean=mean, std=std, active=active)
    x = data[:2]

    def cross_entropy(output, clean, columns):
        assert output.shape == (20, 6) and clean.shape == (20, 6) and columns.shape == (20,)
        return F.cross_entropy(output, columns, reduction="none")

    built_in = iba.attribute(x, target=[1, 4], generator=[0, 1])
    custom = iba.attribute(x, target=[1, 4], generator=[0, 1], loss=cross_entropy)
    torch.testing.assert_close(custom, built_in)
    with pytest.raises(ValueError, match="one loss per noisy copy"):
        iba.attribute(x, target=[1, 4], loss=lambda o, c, t: o.sum())


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 3),
    n_noise=st.integers(1, 4),
    steps=st.integers(1, 3),
    return_type=st.sampled_from(["bits", "capacity", "lambda"]),
    upsample=st.booleans(),
    sigma=st.sampled_from([None, 0.0, 0.5, 1.0]),
)
def test_shapes_for_any_batch_and_settings(n, n_noise, steps, return_type, upsample, sigma):
    model = _vgg_style()
    layer = model.features[5]
    data = torch.randn(n, 3, 12, 12, dtype=torch.float64)
    mean, std, active = _stats(model, layer, torch.randn(8, 3, 12, 12, dtype=torch.float64))
    iba = LayerIBA(model, layer, mean=mean, std=std, active=active)
    maps = iba.attribute(
        data, n_noise=n_noise, steps=steps, return_type=return_type,
        upsample_to_input=upsample, sigma=sigma, generator=0,
    )  # fmt: skip
    channels = 1 if return_type == "bits" else 12
    size = (12, 12) if upsample else (6, 6)
    assert maps.shape == (n, channels, *size)
    assert bool(torch.isfinite(maps).all()) and bool((maps >= 0).all())
    if steps == 1 and return_type == "lambda" and not upsample and not sigma:
        # no update yet: lambda is sigmoid(init_alpha) everywhere
        torch.testing.assert_close(maps, torch.full_like(maps, torch.sigmoid(torch.tensor(5.0))))


def test_a_saturated_loss_is_told_apart_from_a_layer_the_output_ignores():
    """With logit gaps of about 2,000 the cross-entropy is exactly 0 even on the noisy copies,
    so its gradient at the bottleneck is 0 too: the warning names saturation (and the way
    round it), not a layer the output does not read. Gaps of about 20 warn of nothing."""
    import warnings

    from _helpers import make_confident_model

    from captum_ext.data import load_sample_digits

    images, _ = load_sample_digits()
    for scale, saturated in ((3.0, False), (300.0, True)):
        model = make_confident_model(scale)
        iba = LayerIBA(model, "features.4")
        iba.estimate(images)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            iba.attribute(images[:4], steps=2, generator=0)
        said = [str(w.message) for w in caught if "LayerIBA" in str(w.message)]
        if not saturated:
            assert said == []
            continue
        (message,) = said
        assert "exactly 0 on every example" in message and "underflows" in message
        assert "does not depend" not in message
        # the custom loss the message suggests sees the bottleneck
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            predicted = model(images[:4]).argmax(dim=1)
            iba.attribute(
                images[:4], target=predicted, steps=2, generator=0,
                loss=lambda out, clean, t: -out.gather(1, t[:, None])[:, 0],
            )  # fmt: skip


class _SkipAcrossTheLayer(nn.Module):
    """An in-place op on the layer's output, then a skip connection across the layer: the
    shared-prefix attempt fails on the batch sizes after the in-place op has run."""

    def __init__(self, in_place: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layer = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.in_place = in_place

    def forward(self, x):
        x = self.stem(x)
        h = self.layer(x)
        h = torch.relu_(h) if self.in_place == "relu" else h.mul_(2.0)
        return self.fc((h + x).mean((2, 3)))


@pytest.mark.parametrize("in_place", ["relu", "mul"])
def test_reuse_prefix_gives_the_same_maps_after_an_in_place_op_on_the_layer(in_place):
    """The layer's substitute output was one tensor shared by every forward pass: the failed
    shared-prefix attempt ran the in-place op on it, and the full forward pass that follows
    read the changed copies (an in-place ReLU raised autograd's "modified by an inplace
    operation", as on a torchvision ResNet; `mul_` gave other maps silently). The docstring
    promises the same maps either way."""
    torch.manual_seed(0)
    model = _SkipAcrossTheLayer(in_place).eval()
    iba = LayerIBA(model, "layer")
    iba.estimate(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    options = {"target": [0, 1, 2], "generator": [1, 2, 3], "steps": 4}
    shared = iba.attribute(x, reuse_prefix=True, **options)
    full = iba.attribute(x, reuse_prefix=False, **options)
    torch.testing.assert_close(shared, full, rtol=0, atol=0)
