"""ActivationMatchingMask: loss terms by hand, straight-through gradients, a designed model,
state restoration, checkpoint resume, 2 gloo processes, save/load and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from _distributed import run_gloo
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_ext.attr import (
    WEIGHT_PRESETS,
    ActivationMatchingMask,
    ActivationMatchingResult,
    MaskLossWeights,
)
from captum_ext.attr import _activation_matching_loss as loss_module
from captum_ext.attr._mask_net import (
    MaskUNet,
    build_mask_net,
    default_unet_config,
    straight_through_mask,
    unet_config_from_state_dict,
)

TINY_LAYERS = ["features.1", "features.3", "head"]  # BN map before an in-place ReLU, map, vector


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_images(n: int = 4, size: int = 8, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=generator, dtype=dtype)


def only(term: str, value: float = 1.0) -> MaskLossWeights:
    values = dict.fromkeys(("act", "ce", "kl", "area", "bin", "tv", "rob", "nec"), 0.0)
    values[term] = value
    return MaskLossWeights(**values)


# ---------------------------------------------------------------------------------------------
# straight-through estimator and mask net


def test_straight_through_is_hard_forward_and_identity_backward():
    p = torch.tensor([[0.1, 0.5, 0.51], [0.9, 0.49, 0.0]], dtype=torch.float64, requires_grad=True)
    m = straight_through_mask(p)
    assert torch.equal(m, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    weights = torch.arange(6, dtype=torch.float64).view(2, 3) - 2.5
    (grad,) = torch.autograd.grad((weights * m).sum(), p)
    assert torch.equal(grad, weights)  # d m / d p = 1 everywhere, also where m = 0


@pytest.mark.parametrize("size", [(28, 28), (224, 224), (13, 17), (5, 9), (1, 1)])
def test_mask_net_keeps_the_input_size(size):
    height, width = size
    net = build_mask_net(3, height, width, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, height, width)
    assert net(x).shape == (2, 1, height, width)


def test_mask_net_scales_with_the_input_and_leaves_the_global_rng_alone():
    assert default_unet_config(224, 224) == {"depth": 4, "width": 32}  # the papers' U-Net
    assert default_unet_config(28, 28) == {"depth": 2, "width": 16}
    small = build_mask_net(1, 28, 28)
    large = build_mask_net(3, 224, 224)
    n_small = sum(p.numel() for p in small.parameters())
    n_large = sum(p.numel() for p in large.parameters())
    assert n_small < n_large / 50
    # the paper's channels 32-64-128-256 with a 512 bottleneck
    assert [block[0].out_channels for block in large.encoder] == [32, 64, 128, 256]
    assert large.bottleneck[0].out_channels == 512
    state = torch.get_rng_state()
    a = build_mask_net(1, 28, 28, generator=torch.Generator().manual_seed(3))
    b = build_mask_net(1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


# ---------------------------------------------------------------------------------------------
# loss terms against hand computations


def test_terms_equal_hand_computations_on_tiny_tensors():
    p = torch.tensor([[[[0.2, 0.9], [0.6, 0.1]]]], dtype=torch.float64)  # 1 x 1 x 2 x 2
    assert loss_module.area(p).item() == pytest.approx((0.2 + 0.9 + 0.6 + 0.1) / 4)
    hand_bin = (0.2 * 0.8 + 0.9 * 0.1 + 0.6 * 0.4 + 0.1 * 0.9) / 4
    assert loss_module.binarisation(p).item() == pytest.approx(hand_bin)
    # neighbours: vertical (0.2, 0.6), (0.9, 0.1); horizontal (0.2, 0.9), (0.6, 0.1)
    hand_tv = (0.4 + 0.8 + 0.7 + 0.5) / 4
    assert loss_module.total_variation(p).item() == pytest.approx(hand_tv)
    assert loss_module.total_variation(p[..., :1, :1]).item() == 0.0

    a = torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.float64)  # vectors: cosine distance
    b = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64)
    cos = (1 * 2 + 2 * 0 + 2 * 1) / (3.0 * math.sqrt(5.0))
    assert loss_module.activation_distance(a, b).item() == pytest.approx(1 - cos)
    maps_a = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]], dtype=torch.float64)  # 1x2x1x2 maps
    maps_b = torch.tensor([[[[0.0, 2.0]], [[5.0, 1.0]]]], dtype=torch.float64)
    assert loss_module.activation_distance(maps_a, maps_b).item() == pytest.approx(
        (1 + 0 + 4 + 9) / 4
    )

    z = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    z_ref = torch.tensor([[0.0, 3.0, -1.0]], dtype=torch.float64)
    ez = [math.exp(v) for v in (1.0, 2.0, 0.5)]
    er = [math.exp(v) for v in (0.0, 3.0, -1.0)]
    q = [v / sum(er) for v in er]
    pz = [v / sum(ez) for v in ez]
    target = torch.tensor([2])
    assert loss_module.cross_entropy(z, target).item() == pytest.approx(-math.log(pz[2]))
    hand_kl = sum(qi * math.log(qi / pi) for qi, pi in zip(q, pz))
    assert loss_module.kl_divergence(z_ref, z).item() == pytest.approx(hand_kl)
    assert loss_module.kl_divergence(z, z).item() == pytest.approx(0.0, abs=1e-12)

    ref_logit = torch.tensor([3.0, 3.0], dtype=torch.float64)
    comp_logit = torch.tensor([2.5, -1.0], dtype=torch.float64)
    hinge = loss_module.necessity_hinge(ref_logit, comp_logit, margin=1.0)
    assert hinge.tolist() == pytest.approx([0.5, 0.0])


class _Sum(nn.Module):
    def forward(self, x):
        return x


def test_whole_objective_equals_a_hand_computation():
    """A linear model on 1x2x2 images: every term written out with plain arithmetic."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), _Sum()).double().eval()
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]], dtype=torch.float64)
    p = torch.tensor([[[[0.7, 0.2], [0.4, 0.9]]]], dtype=torch.float64)
    r = torch.tensor([[[[0.3, -0.1], [1.2, 0.0]]]], dtype=torch.float64)
    baseline = torch.tensor(-0.5, dtype=torch.float64)
    weights = MaskLossWeights(0.6, 4.0, 0.54, 100.0, 1.2, 50.0, 10.0, nec=2.0)
    W, c = model[1].weight.detach(), model[1].bias.detach()

    def logits(image):
        flat = [v for row in image for v in row]
        return [sum(W[k, j].item() * flat[j] for j in range(4)) + c[k].item() for k in range(3)]

    def log_softmax(z):
        top = max(z)
        s = math.log(sum(math.exp(v - top) for v in z)) + top
        return [v - s for v in z]

    m = [[1.0, 0.0], [0.0, 1.0]]
    xs, rs, ps = x[0, 0].tolist(), r[0, 0].tolist(), p[0, 0].tolist()
    e = [[m[i][j] * xs[i][j] + (1 - m[i][j]) * -0.5 for j in range(2)] for i in range(2)]
    rob_image = [
        [m[i][j] * xs[i][j] + (1 - m[i][j]) * rs[i][j] for j in range(2)] for i in range(2)
    ]
    comp = [[(1 - m[i][j]) * xs[i][j] + m[i][j] * -0.5 for j in range(2)] for i in range(2)]
    zx, ze = logits(xs), logits(e)
    y = max(range(3), key=lambda k: zx[k])
    # the layer "1" outputs vectors (N, 3): cosine distance, weight a = 2
    dot = sum(a * b for a, b in zip(zx, ze))
    cos = dot / (math.sqrt(sum(a * a for a in zx)) * math.sqrt(sum(b * b for b in ze)))
    act = 2.0 * (1 - cos)
    ce = -log_softmax(ze)[y]
    lq, lp = log_softmax(zx), log_softmax(ze)
    kl = sum(math.exp(a) * (a - b) for a, b in zip(lq, lp))
    flat_p = [v for row in ps for v in row]
    area = sum(flat_p) / 4
    binar = sum(v * (1 - v) for v in flat_p) / 4
    tv = (abs(ps[0][0] - ps[1][0]) + abs(ps[0][1] - ps[1][1])) / 4
    tv += (abs(ps[0][0] - ps[0][1]) + abs(ps[1][0] - ps[1][1])) / 4
    rob = -log_softmax(logits(rob_image))[y]
    nec = max(0.0, 1.5 - (zx[y] - logits(comp)[y]))
    hand = (
        0.6 * act + 4.0 * ce + 0.54 * kl + 100 * area + 1.2 * binar + 50 * tv + 10 * rob + 2 * nec
    )

    explainer = ActivationMatchingMask(
        model, {"1": 2.0}, weights=weights, baseline=-0.5, necessity_margin=1.5
    )
    reference = explainer._reference(x)
    target = reference.logits.argmax(1)
    assert target.item() == y
    loss, terms, _ = loss_module.mask_objective(
        model,
        explainer.layers,
        explainer.layer_weights,
        weights,
        x,
        p,
        target,
        reference,
        baseline,
        r,
        1.5,
    )
    assert terms["act"].item() == pytest.approx(act, rel=1e-9, abs=1e-12)
    assert terms["nec"].item() == pytest.approx(nec, rel=1e-9, abs=1e-12)
    assert terms["rob"].item() == pytest.approx(rob, rel=1e-9)
    assert loss.item() == pytest.approx(hand, rel=1e-9)


@pytest.mark.parametrize("term", loss_module.TERMS)
def test_each_term_alone_gives_the_mask_net_gradients(term):
    """Straight-through: every term, on its own, reaches the mask net's parameters."""
    model = make_tiny_cnn()
    x = tiny_images()
    explainer = ActivationMatchingMask(
        model, TINY_LAYERS, weights=only(term), necessity_margin=100.0
    )
    net = build_mask_net(3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    reference = explainer._reference(x)
    target = reference.logits.argmax(1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    with explainer._frozen_model():
        loss, terms, _, _ = explainer._objective(
            net, x, target, reference, explainer._baseline_for(x), noise
        )
        grads = torch.autograd.grad(loss, list(net.parameters()))
    assert terms[term].abs().sum() > 0
    total = sum(g.abs().sum() for g in grads)
    assert total > 0, term
    assert all(p.grad is None for p in model.parameters())  # the classifier stays frozen


def test_paper_loss_forms_equal_hand_computations():
    """The notebook's forms behind the "paper" preset: KL at temperature T scaled by T^2,
    eight-neighbour TV, and a robustness term that is reported but trains nothing."""
    z = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    z_ref = torch.tensor([[0.0, 3.0, -1.0]], dtype=torch.float64)
    t = 2.0
    eq = [math.exp(v / t) for v in (0.0, 3.0, -1.0)]
    ep = [math.exp(v / t) for v in (1.0, 2.0, 0.5)]
    q = [v / sum(eq) for v in eq]
    pz = [v / sum(ep) for v in ep]
    hand = t * t * sum(qi * math.log(qi / pi) for qi, pi in zip(q, pz))
    assert loss_module.kl_divergence(z_ref, z, t).item() == pytest.approx(hand, rel=1e-12)
    assert loss_module.kl_divergence(z_ref, z, 1.0).item() == pytest.approx(
        loss_module.kl_divergence(z_ref, z).item()
    )

    p = torch.tensor([[[[0.2, 0.9], [0.6, 0.1]]]], dtype=torch.float64)
    # vertical |0.2-0.6|, |0.9-0.1|; horizontal |0.2-0.9|, |0.6-0.1|; diagonals |0.1-0.2|
    # (down-right) and |0.6-0.9| (down-left), one pair each, weighted 1/sqrt(2)
    hand_tv8 = (0.4 + 0.8) / 2 + (0.7 + 0.5) / 2 + (0.1 + 0.3) / math.sqrt(2)
    assert loss_module.total_variation_8(p).item() == pytest.approx(hand_tv8, rel=1e-12)
    assert loss_module.total_variation_8(p[..., :1, :1]).item() == 0.0
    row = p[..., :1, :]  # 1 x 2: only the horizontal pair
    assert loss_module.total_variation_8(row).item() == pytest.approx(0.7)

    paper = WEIGHT_PRESETS["paper"]
    assert (paper.kl_temperature, paper.rob_gradient, paper.tv_diagonal) == (2.0, False, True)
    model = make_tiny_cnn()
    x = tiny_images()
    rob_only = MaskLossWeights(**{**only("rob").__dict__, "rob_gradient": False})
    explainer = ActivationMatchingMask(model, TINY_LAYERS, weights=rob_only)
    net = build_mask_net(3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    reference = explainer._reference(x)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    with explainer._frozen_model():
        loss, terms, _, _ = explainer._objective(
            net, x, reference.logits.argmax(1), reference, explainer._baseline_for(x), noise
        )
        grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    assert terms["rob"].abs().sum() > 0  # reported ...
    assert all(g is None or g.abs().sum() == 0 for g in grads)  # ... but trains nothing


def test_weights_dict_takes_the_loss_form_options():
    model = make_tiny_cnn()
    base = dict(act=1, ce=1, kl=1, area=1, bin=1, tv=1, rob=1)
    explainer = ActivationMatchingMask(
        model, "head", weights={**base, "kl_temperature": 2, "tv_diagonal": True}
    )
    assert explainer.weights.kl_temperature == 2.0 and explainer.weights.tv_diagonal
    assert explainer.weights.rob_gradient
    with pytest.raises(TypeError, match="rob_gradient"):
        ActivationMatchingMask(model, "head", weights={**base, "rob_gradient": 1})
    with pytest.raises(ValueError, match="kl_temperature"):
        ActivationMatchingMask(model, "head", weights={**base, "kl_temperature": 0})


def test_activations_survive_an_in_place_relu():
    model = make_tiny_cnn()
    x = tiny_images()
    _, acts = loss_module.run_with_activations(model, [model.features[1]], x)
    expected = model.features[1](model.features[0](x))  # BN output, before the in-place ReLU
    assert (expected < 0).any()
    assert torch.allclose(acts[0], expected)


# ---------------------------------------------------------------------------------------------
# a model whose decision depends on a known small region


class _Crop(nn.Module):
    def __init__(self, rows: slice, cols: slice) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x):
        return x[..., self.rows, self.cols]


class RegionModel(nn.Module):
    """1x1 convolutions with positive weights (no spatial mixing), then only a 4x4 region R is
    read out: logit 0 = (sum of R's features) / 16 - 6, logit 1 = 0, logit 2 = -1. With the
    inputs below R's pixels all support class 0; the blank (baseline) image is class 1, and
    removing more than about a quarter of R's evidence flips the decision."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.relu = nn.ReLU()
        self.region = _Crop(slice(3, 7), slice(8, 12))
        self.fc = nn.Linear(4 * 16, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.0]).view(4, 1, 1, 1))
            self.conv.bias.zero_()
            self.fc.weight.zero_()
            self.fc.weight[0].fill_(1 / 16)
            self.fc.bias.copy_(torch.tensor([-6.0, 0.0, -1.0]))

    def forward(self, x):
        return self.fc(self.region(self.relu(self.conv(x))).flatten(1))


REGION = torch.zeros(16, 16, dtype=torch.bool)
REGION[3:7, 8:12] = True


def test_designed_model_mask_covers_the_region_and_little_else():
    """Only R (16 of 256 pixels) can change f or the matched activations: the minimal mask
    is R. Threshold: IoU(mask, R) >= 0.8 for each of 3 images (R is 6% of the image).

    l_ce is raised to 10: at a full match (e = x) the activation and KL terms have zero
    gradient, so it is the CE term that holds R's pixels on against the area term.

    One fit from one random start reaches it for about half of the seeds only (all three
    images at IoU >= 0.8 for 4 of seeds 0-7; this test passed on the lucky seeds that each
    image's index gave it before its seeds came from its pixels). Three starts, the method's
    own remedy, reach it for all 8 seeds tried."""
    torch.manual_seed(0)
    model = RegionModel().eval()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 16, 16, generator=generator)
    x[:, :, REGION] = 1.5 + 0.5 * torch.rand(3, 1, 16, generator=generator)  # evidence for 0
    weights = {"act": 10.0, "ce": 10.0, "kl": 1.0, "area": 20.0, "bin": 1.0, "tv": 1.0, "rob": 1.0}
    explainer = ActivationMatchingMask(model, ["region"], weights=weights)
    result = explainer.attribute(
        x,
        mode="per_image",
        steps=150,
        lr=1e-3,
        seed=0,
        starts=3,
        return_details=True,
        progress=False,
    )
    masks = result.mask[:, 0].bool()
    for mask in masks:
        iou = (mask & REGION).sum() / (mask | REGION).sum()
        assert iou >= 0.8, (iou, mask.int())
    assert result.agreement.all()


# ---------------------------------------------------------------------------------------------
# attribute: details, modes, Captum conventions


class FixedMaskNet(nn.Module):
    """Ignores the image: logits +5 where ``pattern`` is True, -5 elsewhere."""

    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pattern", pattern.to(torch.float64))

    def forward(self, x):
        logits = torch.where(self.pattern > 0, 5.0, -5.0).to(x.dtype)
        return logits.expand(x.shape[0], 1, *self.pattern.shape).clone()


def test_details_equal_direct_computations():
    model = make_tiny_cnn()
    x = tiny_images(5)
    pattern = torch.zeros(8, 8, dtype=torch.bool)
    pattern[1:6, 2:7] = True
    explainer = ActivationMatchingMask(
        model, TINY_LAYERS, mask_net=FixedMaskNet(pattern), baseline=0.25
    )
    result = explainer.attribute(x, return_details=True, sufficiency_samples=4, seed=3)
    assert isinstance(result, ActivationMatchingResult)
    m = pattern.to(x.dtype).expand(5, 1, 8, 8)
    assert torch.equal(result.mask, m)
    assert torch.allclose(
        result.probabilities,
        torch.sigmoid(torch.tensor(5.0, dtype=x.dtype)) * m
        + torch.sigmoid(torch.tensor(-5.0, dtype=x.dtype)) * (1 - m),
    )
    with torch.no_grad():
        zx = model(x)
        e = m * x + (1 - m) * 0.25
        ze = model(e)
        zc = model((1 - m) * x + m * 0.25)
    y = zx.argmax(1)
    rows = torch.arange(5)
    assert torch.equal(result.target, y)
    assert torch.allclose(result.explanation, e)
    assert torch.equal(result.agreement, ze.argmax(1) == y)
    assert torch.allclose(result.confidence, zx.softmax(1)[rows, y])
    assert torch.allclose(result.explanation_confidence, ze.softmax(1)[rows, y])
    assert torch.allclose(result.active_fraction, torch.full((5,), 25 / 64, dtype=x.dtype))
    assert torch.allclose(result.necessity, zx[rows, y] - zc[rows, y])
    # sufficiency: K=4 backgrounds, each a value in {0, 1/4, ..., 1}
    assert ((result.sufficiency * 4) == (result.sufficiency * 4).round()).all()
    assert ((result.sufficiency >= 0) & (result.sufficiency <= 1)).all()
    # an explicit target is followed by the details
    other = explainer.attribute(x, target=[0, 1, 2, 3, 4], return_details=True)
    assert torch.equal(other.target, torch.arange(5))
    assert torch.allclose(other.confidence, zx.softmax(1)[rows, rows])
    # plain masks, broadcast masks
    assert torch.equal(explainer.attribute(x), m)
    assert torch.equal(explainer.attribute(x, broadcast=True), m.expand_as(x))


def test_per_image_is_reproducible_and_works_under_no_grad():
    model = make_tiny_cnn(dtype=torch.float32)
    x = tiny_images(2, dtype=torch.float32)
    explainer = ActivationMatchingMask(model, TINY_LAYERS)
    a = explainer.attribute(x, mode="per_image", steps=4, seed=5, progress=False)
    with torch.no_grad():  # as NoiseTunnel / sensitivity_max call it
        b = explainer.attribute(x, mode="per_image", steps=4, seed=5, progress=False)
    c = explainer.attribute(
        x, mode="per_image", steps=4, generator=torch.Generator().manual_seed(9), progress=False
    )
    assert a.shape == (2, 1, 8, 8)
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert c.shape == a.shape
    assert callable(getattr(ActivationMatchingMask.attribute, "__wrapped__", None))
    assert explainer.multiplies_by_inputs is False


def test_model_left_unchanged_after_attribute_fit_and_errors(tmp_path):
    model = make_tiny_cnn()
    model.classifier.weight.requires_grad_(False)
    model.head[1].bias.grad = torch.ones_like(model.head[1].bias)
    model.head.train()  # a mixed-mode model keeps its flags
    before = model_snapshot(model)
    x = tiny_images(4)
    explainer = ActivationMatchingMask(model, TINY_LAYERS)
    explainer.attribute(x, mode="per_image", steps=2, progress=False)
    assert_model_unchanged(model, before)
    explainer.fit(TensorDataset(x), epochs=1, batch_size=2, progress=False)
    assert_model_unchanged(model, before)
    explainer.attribute(x, return_details=True)
    assert_model_unchanged(model, before)
    with pytest.raises(ValueError, match="`target`"):
        explainer.attribute(x, mode="per_image", target=17, steps=2, progress=False)
    assert_model_unchanged(model, before)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    explainer._train_step = broken
    with pytest.raises(RuntimeError, match="boom"):
        explainer.fit(TensorDataset(x), epochs=1, batch_size=2, progress=False)
    assert_model_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# fit: checkpoints, resume, save / load, torch.distributed


def _fit_data(n: int = 10, dtype=torch.float64) -> TensorDataset:
    return TensorDataset(tiny_images(n, dtype=dtype), torch.zeros(n, dtype=torch.long))


def test_fit_trains_and_resume_is_bit_identical(tmp_path):
    model = make_tiny_cnn()
    data = DataLoader(_fit_data(), batch_size=4, shuffle=True)  # 3 steps per epoch
    full = ActivationMatchingMask(model, TINY_LAYERS).fit(
        data,
        epochs=2,
        lr=1e-2,
        seed=11,
        progress=False,
        checkpoint=tmp_path / "full.pt",
        checkpoint_every=2,
    )
    assert len(full.history) == 6
    fresh = build_mask_net(3, 8, 8, dtype=torch.float64)
    assert any(
        not torch.equal(a, b) for a, b in zip(full.mask_net.parameters(), fresh.parameters())
    )

    interrupted = ActivationMatchingMask(model, TINY_LAYERS)
    calls = {"n": 0}
    original = interrupted._train_step

    def crash_on_fifth(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args)

    interrupted._train_step = crash_on_fifth
    path = tmp_path / "part.pt"
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(
            data, epochs=2, lr=1e-2, seed=11, progress=False, checkpoint=path, checkpoint_every=2
        )
    state = torch.load(path, weights_only=True)
    assert (state["step"], state["epoch"], state["batch"]) == (4, 1, 1)  # mid-epoch
    with pytest.raises(ValueError, match="`seed`=999, but `checkpoint` was written with"):
        ActivationMatchingMask(model, TINY_LAYERS).fit(
            data, epochs=2, lr=1e-2, seed=999, progress=False, checkpoint=path, resume=True
        )  # another seed than the checkpoint's was silently ignored
    with pytest.raises(ValueError, match="`lr`=0.001, but `checkpoint` was written with 0.01"):
        ActivationMatchingMask(model, TINY_LAYERS).fit(
            data, epochs=2, lr=1e-3, progress=False, checkpoint=path, resume=True
        )  # the optimiser's saved state set another learning rate back without a word
    resumed = ActivationMatchingMask(model, TINY_LAYERS).fit(
        data, epochs=2, progress=False, checkpoint=path, resume=True
    )  # without a seed or a learning rate: the checkpoint's
    assert resumed.history == full.history
    for a, b in zip(full.mask_net.state_dict().values(), resumed.mask_net.state_dict().values()):
        assert torch.equal(a, b)
    x = tiny_images(3, seed=7)
    assert torch.equal(full.attribute(x), resumed.attribute(x))
    # resuming a finished run loads it
    again = ActivationMatchingMask(model, TINY_LAYERS).fit(
        data, epochs=2, progress=False, checkpoint=tmp_path / "full.pt", resume=True
    )
    assert torch.equal(again.attribute(x), full.attribute(x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_and_load_round_trip(tmp_path, suffix):
    model = make_tiny_cnn()
    explainer = ActivationMatchingMask(model, TINY_LAYERS).fit(
        _fit_data(), epochs=1, batch_size=5, seed=2, progress=False
    )
    path = explainer.save(tmp_path / f"net{suffix}")
    loaded = ActivationMatchingMask(model, TINY_LAYERS).load(path)
    assert isinstance(loaded.mask_net, MaskUNet)
    x = tiny_images(3, seed=8)
    assert torch.equal(
        loaded.attribute(x, return_details=True).probabilities,
        explainer.attribute(x, return_details=True).probabilities,
    )
    if suffix == ".pt":
        state = torch.load(path, weights_only=True)
        assert set(state) == set(explainer.mask_net.state_dict())
    with pytest.raises(ValueError, match="`path`"):
        ActivationMatchingMask(model, TINY_LAYERS).load(tmp_path / "missing.pt")


def test_a_refused_load_leaves_the_trained_net_as_it_was(tmp_path):
    """load_state_dict copies every tensor that fits before it raises for the others: a
    file of a net with another width replaced the current net's fitting tensors (masks
    changed by up to 0.46) while the explainer stayed "trained"."""
    model = make_tiny_cnn()
    explainer = ActivationMatchingMask(model, TINY_LAYERS).fit(
        _fit_data(), epochs=1, batch_size=5, seed=2, progress=False
    )
    x = tiny_images(3, seed=8)
    before = explainer.attribute(x, return_details=True).probabilities
    config = {**unet_config_from_state_dict(explainer.mask_net.state_dict())}
    config["in_channels"] = config["in_channels"] + 2  # another input: the first conv differs
    other = tmp_path / "other.pt"
    torch.save(MaskUNet(**config).state_dict(), other)
    with pytest.raises(ValueError, match="another architecture .* nothing was loaded"):
        explainer.load(other)
    after = explainer.attribute(x, return_details=True).probabilities
    assert torch.equal(before, after)


def _gloo_job(rank, world, out_dir):
    torch.manual_seed(0)
    model = make_tiny_cnn()
    data = DataLoader(_fit_data(12), batch_size=3)
    explainer = ActivationMatchingMask(model, TINY_LAYERS)
    explainer.fit(
        data,
        epochs=2,
        lr=1e-2,
        seed=4,
        progress=False,
        checkpoint=f"{out_dir}/ckpt.pt",
        checkpoint_every=2,
    )
    torch.save(explainer.mask_net.state_dict(), f"{out_dir}/rank{rank}.pt")
    torch.save(torch.tensor(explainer.history), f"{out_dir}/history{rank}.pt")


@pytest.mark.slow
def test_two_gloo_processes_train_identical_mask_nets(tmp_path):
    run_gloo(_gloo_job, tmp_path)
    nets = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in nets[0]:
        assert torch.equal(nets[0][name], nets[1][name]), name
    fresh = build_mask_net(3, 8, 8, dtype=torch.float64).state_dict()
    assert any(not torch.equal(nets[0][k], fresh[k]) for k in fresh)
    histories = [torch.load(tmp_path / f"history{r}.pt", weights_only=True) for r in range(2)]
    assert len(histories[0]) == 4  # 12 examples / 2 ranks / batch 3 = 2 steps x 2 epochs
    assert not torch.equal(histories[0], histories[1])  # each rank saw its own shard
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 2


# ---------------------------------------------------------------------------------------------
# presets and argument checks


def test_presets_are_the_papers_numbers():
    order = ("act", "ce", "kl", "area", "bin", "tv", "rob")
    as_tuple = {name: tuple(getattr(w, k) for k in order) for name, w in WEIGHT_PRESETS.items()}
    assert as_tuple == {
        "cnn_imagenet": (1.0, 4.0, 0.4, 15, 0.3, 15, 6),
        "vit_imagenet": (4.5, 15, 5, 55, 1.5, 57, 45),
        "mnist": (0.6, 4.0, 0.54, 100, 1.2, 50, 10),
        "paper": (0.6, 4.0, 0.54, 100, 1.2, 50, 10),
        "sparse": (0.6, 40, 0.54, 200, 1.2, 50, 0),
        "sparse_amortised": (0.6, 80, 0.54, 200, 1.2, 50, 0),
        "sparse_confident": (0.6, 80, 0.54, 1300, 1.2, 50, 0),
    }
    assert all(w.nec == 0 for w in WEIGHT_PRESETS.values())
    assert {name for name, w in WEIGHT_PRESETS.items() if w.conf} == {"sparse_confident"}
    assert WEIGHT_PRESETS["sparse_confident"].conf == 100


def test_bad_arguments_name_the_argument(tmp_path):
    model = make_tiny_cnn()
    x = tiny_images(2)
    ok = ActivationMatchingMask(model, TINY_LAYERS)
    cases = [
        (lambda: ActivationMatchingMask(model, "features.99"), ValueError, "`layers`"),
        (lambda: ActivationMatchingMask(model, 3), TypeError, "`layers`"),
        (lambda: ActivationMatchingMask(model, {"head": -1.0}), ValueError, "`layers`"),
        (lambda: ActivationMatchingMask(model, "head", weights="resnet"), ValueError, "`weights`"),
        (
            lambda: ActivationMatchingMask(model, "head", weights={"act": 1}),
            ValueError,
            "`weights`",
        ),
        (lambda: ActivationMatchingMask(model, "head", weights=3), TypeError, "`weights`"),
        (lambda: ActivationMatchingMask(model, "head", mask_net="unet"), TypeError, "`mask_net`"),
        (lambda: ActivationMatchingMask(model, "head", baseline="mean"), TypeError, "`baseline`"),
        (lambda: ActivationMatchingMask(5, "head"), TypeError, "`forward_func`"),
        (lambda: ok.attribute(x), ValueError, "`mode`"),  # amortised before fit
        (lambda: ok.attribute(x, mode="fast"), ValueError, "`mode`"),
        (lambda: ok.attribute(x, mode="per_image", steps=0), ValueError, "`steps`"),
        (lambda: ok.attribute(x, mode="per_image", lr=-1.0), ValueError, "`lr`"),
        (
            lambda: ok.attribute(x, mode="per_image", seed=1, generator=torch.Generator()),
            ValueError,
            "`generator`",
        ),
        (lambda: ok.attribute(x, mode="per_image", seed=-2), ValueError, "`seed`"),
        (lambda: ok.attribute(x, mode="per_image", keep="first"), ValueError, "`keep`"),
        (lambda: ok.attribute(x[0], mode="per_image"), ValueError, "`inputs`"),
        (
            lambda: ok.attribute(x, mode="per_image", target=[0, 1, 2], steps=1, progress=False),
            ValueError,
            "`target`",
        ),
        (
            lambda: ok.attribute(x, mode="per_image", sufficiency_samples=-1),
            ValueError,
            "`sufficiency_samples`",
        ),
        (
            lambda: ActivationMatchingMask(
                model, "head", baseline=torch.zeros(1, 2, 8, 8)
            ).attribute(x, mode="per_image"),
            ValueError,
            "`baseline`",
        ),
        (lambda: ok.fit(_fit_data(), epochs=0), ValueError, "`epochs`"),
        (lambda: ok.fit(_fit_data(), checkpoint_every=0), ValueError, "`checkpoint_every`"),
        (lambda: ok.fit(_fit_data(), resume=True), ValueError, "`resume`"),
        (lambda: ok.fit(42), TypeError, "`data`"),
        (lambda: ok.fit([("a", 1)], progress=False), TypeError, "`data`"),
        (lambda: ok.fit(_fit_data(), lr=0), ValueError, "`lr`"),
        (lambda: ok.save(tmp_path / "x.pt"), ValueError, "fit"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="`checkpoint`"):
        ok.fit(_fit_data(), checkpoint=bad, resume=True, progress=False)
    with pytest.raises(ValueError, match="`path`"):
        ok.load(bad)


def test_progress_bar_on_stderr(capsys):
    model = make_tiny_cnn()
    explainer = ActivationMatchingMask(model, TINY_LAYERS)
    explainer.attribute(tiny_images(1), mode="per_image", steps=3, progress=True)
    assert "mask per image" in capsys.readouterr().err
    explainer.attribute(tiny_images(1), mode="per_image", steps=3, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
def test_cuda_per_image_fit_and_amortised_under_autocast():
    device = torch.device("cuda")
    model = make_tiny_cnn(dtype=torch.float32).to(device)
    before = model_snapshot(model)
    x = tiny_images(4, dtype=torch.float32).to(device)
    explainer = ActivationMatchingMask(model, TINY_LAYERS)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        masks = explainer.attribute(x, mode="per_image", steps=3, seed=0, progress=False)
    assert masks.device.type == "cuda" and masks.shape == (4, 1, 8, 8)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    explainer.fit(TensorDataset(x.cpu()), epochs=1, batch_size=2, progress=False)
    assert next(explainer.mask_net.parameters()).device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        result = explainer.attribute(x, return_details=True)
    assert result.mask.device.type == "cuda"
    assert result.agreement.dtype == torch.bool
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_per_image_batch_sizes_with_per_example_targets(batch):
    model = make_tiny_cnn().eval()
    x = tiny_images(batch)
    targets = [i % 3 for i in range(batch)]
    explainer = ActivationMatchingMask(model, TINY_LAYERS)
    masks = explainer.attribute(
        x, mode="per_image", target=targets, steps=2, seed=0, progress=False
    )
    assert masks.shape[0] == batch and masks.shape[-2:] == x.shape[-2:]


def test_fit_delegates_to_the_trainer_module():
    from captum_ext.attr import _activation_matching_training as trainer
    from captum_ext.attr import activation_matching

    for name in (
        "WEIGHT_PRESETS",
        "ActivationMatchingMask",
        "ActivationMatchingResult",
        "MaskLossWeights",
        "MODES",
    ):
        assert hasattr(activation_matching, name)
    assert callable(trainer.fit_mask_net)


def test_fit_takes_a_tuple_of_images_and_labels(bundled_model, sample_digits):
    """``fit((images, labels))`` as the other methods take data; it was read as a dataset of
    two items and failed in the DataLoader's collate ("stack expects each tensor to be equal
    size")."""
    from torch.utils.data import TensorDataset

    x, y = sample_digits
    masks = []
    for data in ((x, y), TensorDataset(x, y)):
        method = ActivationMatchingMask(bundled_model, ["features.7"])
        method.fit(data, epochs=1, batch_size=20, progress=False, seed=0)
        masks.append(method.attribute(x[:2], target=y[:2], progress=False))
    torch.testing.assert_close(masks[0], masks[1])


class _MaskNetWithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.out(self.norm(self.conv(x)).relu())


def test_a_given_mask_net_is_left_in_eval_mode_dtype_and_statistics():
    """fit left a user's mask net in train mode, so every later attribute call updated its
    batch-norm statistics and gave an image another mask in another batch; attribute also
    cast the net to the images' dtype for good. fit also advanced the caller's global RNG
    (its DataLoader drew a worker seed from it)."""
    model = make_tiny_cnn().eval()
    torch.manual_seed(0)
    net = _MaskNetWithBatchNorm().double().eval()
    explainer = ActivationMatchingMask(model, ["features.3"], mask_net=net)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    expected_draw = torch.rand(2)
    torch.manual_seed(123)
    explainer.fit(x, epochs=1, batch_size=4, progress=False, seed=0)
    assert torch.equal(torch.rand(2), expected_draw)
    assert not net.training
    statistics = net.norm.running_mean.clone()
    batch = explainer.attribute(x, return_details=True)
    alone = explainer.attribute(x[:1], return_details=True)
    assert torch.equal(net.norm.running_mean, statistics)
    torch.testing.assert_close(alone.probabilities[0], batch.probabilities[0])
    net.float()  # a float32 net on float64 images: used in its dtype, not cast for good
    explainer.attribute(x)
    assert next(net.parameters()).dtype == torch.float32


def test_a_tuple_of_inputs_gives_a_tuple_as_captum_methods_do(bundled_model, sample_digits):
    """sensitivity_max(explainer.attribute, x) failed inside Captum: a 1-tuple of inputs came
    back as a bare tensor, which Captum iterated over the batch."""
    from captum.metrics import sensitivity_max

    from captum_ext.bundled import load_bundled_mask_explainer

    explainer = load_bundled_mask_explainer(bundled_model)
    x = sample_digits[0][:2]
    (mask,) = explainer.attribute((x,))
    assert torch.equal(mask, explainer.attribute(x))
    assert sensitivity_max(explainer.attribute, x, n_perturb_samples=2).shape == (2,)


def test_a_tuple_of_tensors_of_different_lengths_is_refused_by_name():
    """(images[:20], labels[:40]) was read as a dataset of two items and failed deep in
    torch's collate."""
    model = make_tiny_cnn()
    images = tiny_images(6, seed=1)
    with pytest.raises(ValueError, match=r"`data`: .* first dimensions \[6, 4\]"):
        ActivationMatchingMask(model, TINY_LAYERS).fit(
            (images, torch.zeros(4, dtype=torch.long)), progress=False
        )
