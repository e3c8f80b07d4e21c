"""Contrastive around every Captum method: contrastive, or refused at construction.

Reference for the methods that only evaluate the model: the same Captum method built on a
hand-written module returning the per-class cross-entropies (``F.cross_entropy`` with every
label), with ``target=Q``. DeepLift methods have their own rule for the final log-softmax, so
they are checked by completeness: the attributions sum to CE_Q(x) - CE_Q(baseline).
"""

from __future__ import annotations

import copy
import inspect
import random
import warnings

import captum.attr
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, guided_copy, make_tiny_cnn, model_snapshot
from captum._utils.models.linear_model import SkLearnLinearRegression
from captum.attr import (
    LRP,
    Attribution,
    Deconvolution,
    DeepLift,
    DeepLiftShap,
    FeatureAblation,
    FeaturePermutation,
    GradientShap,
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    InternalInfluence,
    KernelShap,
    LayerActivation,
    LayerConductance,
    LayerDeepLift,
    LayerDeepLiftShap,
    LayerFeatureAblation,
    LayerFeaturePermutation,
    LayerGradCam,
    LayerGradientShap,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    LayerLRP,
    Lime,
    NeuronGradient,
    NoiseTunnel,
    Occlusion,
    Saliency,
    ShapleyValues,
    ShapleyValueSampling,
)
from torch import nn

from captum_ext.attr import Contrastive

pytestmark = pytest.mark.filterwarnings("ignore")

CONTRAST = torch.tensor([3, 1, 0, 4])


class HandCrossEntropy(nn.Module):
    """Column c: the per-example cross-entropy of the model's logits with label c."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        labels = [torch.full((len(x),), c, dtype=torch.long) for c in range(logits.shape[1])]
        return torch.stack([F.cross_entropy(logits, y, reduction="none") for y in labels], 1)


def _seed() -> None:
    """Captum's sampling methods draw from torch, numpy and random."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(
        4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


# one feature group per 3 x 3 quadrant of each channel: 12 features (cheap for Shapley / Lime)
_MASK = (torch.arange(36).reshape(6, 6) // 18 * 2 + torch.arange(6) // 3).expand(4, 3, 6, 6)
_MASK = _MASK + 4 * torch.arange(3).reshape(1, 3, 1, 1)
_BASELINES = torch.randn(
    3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
)


def _layer(model):
    # the residual block of TinyCNN (also reachable inside HandCrossEntropy)
    return model.features[3]


#: Captum classes that only evaluate the model: (constructor, attribute kwargs).
EVALUATING = {
    Saliency: (lambda f, m: Saliency(f), {"abs": False}),
    InputXGradient: (lambda f, m: InputXGradient(f), {}),
    IntegratedGradients: (
        lambda f, m: IntegratedGradients(f),
        {"n_steps": 8, "baselines": _BASELINES[:1]},
    ),
    GradientShap: (lambda f, m: GradientShap(f), {"baselines": _BASELINES, "n_samples": 4}),
    GuidedBackprop: (lambda f, m: GuidedBackprop(f), {}),
    Deconvolution: (lambda f, m: Deconvolution(f), {}),
    GuidedGradCam: (lambda f, m: GuidedGradCam(f, _layer(m)), {}),
    FeatureAblation: (lambda f, m: FeatureAblation(f), {"feature_mask": _MASK[:1]}),
    FeaturePermutation: (lambda f, m: FeaturePermutation(f), {"feature_mask": _MASK[:1]}),
    Occlusion: (lambda f, m: Occlusion(f), {"sliding_window_shapes": (3, 3, 3), "strides": 3}),
    ShapleyValueSampling: (
        lambda f, m: ShapleyValueSampling(f),
        {"feature_mask": _MASK[:1], "n_samples": 2},
    ),
    ShapleyValues: (
        lambda f, m: ShapleyValues(f),
        {"feature_mask": (torch.arange(36).reshape(1, 1, 6, 6) // 18).repeat(1, 3, 1, 1)},
    ),
    Lime: (
        lambda f, m: Lime(f, interpretable_model=SkLearnLinearRegression()),
        {"feature_mask": _MASK[:1], "n_samples": 16},
    ),
    KernelShap: (lambda f, m: KernelShap(f), {"feature_mask": _MASK[:1], "n_samples": 12}),
    LayerGradCam: (lambda f, m: LayerGradCam(f, _layer(m)), {}),
    LayerConductance: (lambda f, m: LayerConductance(f, _layer(m)), {"n_steps": 4}),
    InternalInfluence: (lambda f, m: InternalInfluence(f, _layer(m)), {"n_steps": 4}),
    LayerGradientXActivation: (lambda f, m: LayerGradientXActivation(f, _layer(m)), {}),
    LayerIntegratedGradients: (
        lambda f, m: LayerIntegratedGradients(f, _layer(m)),
        {"n_steps": 4},
    ),
    LayerGradientShap: (
        lambda f, m: LayerGradientShap(f, _layer(m)),
        {"baselines": _BASELINES, "n_samples": 3},
    ),
    LayerFeatureAblation: (lambda f, m: LayerFeatureAblation(f, _layer(m)), {}),
}

#: keyword arguments of the class form
CONSTRUCTOR_KWARGS = {Lime: {"interpretable_model": SkLearnLinearRegression()}}

#: DeepLift methods: contrastive through their own rule (checked by completeness).
DEEPLIFT = (DeepLift, DeepLiftShap, LayerDeepLift, LayerDeepLiftShap)

#: Refused at construction.
REFUSED = (
    "LRP",
    "LayerLRP",
    "LayerActivation",
    "LayerFeaturePermutation",
    "DataLoaderAttribution",
    "LLMAttribution",
    "LLMGradientAttribution",
    "RemoteLLMAttribution",
)

#: Base classes, not methods.
BASES = (
    "Attribution",
    "GradientAttribution",
    "PerturbationAttribution",
    "LayerAttribution",
    "NeuronAttribution",
    "LimeBase",
)


def test_every_captum_method_is_covered_here():
    """A Captum release with a new method fails here until the method is checked."""
    covered = {c.__name__ for c in EVALUATING} | {c.__name__ for c in DEEPLIFT}
    covered |= set(REFUSED) | set(BASES) | {"NoiseTunnel"}
    public = {
        name
        for name, value in vars(captum.attr).items()
        if inspect.isclass(value) and issubclass(value, Attribution)
    }
    missing = {name for name in public - covered if not name.startswith("Neuron")}
    assert not missing, f"Captum methods not checked with Contrastive: {sorted(missing)}"


@pytest.mark.parametrize("cls", list(EVALUATING), ids=lambda c: c.__name__)
@pytest.mark.parametrize("form", ["class", "instance"])
def test_evaluating_methods_explain_the_cross_entropy(cls, form):
    model = make_tiny_cnn()
    make, kwargs = EVALUATING[cls]
    x = _inputs()
    _seed()
    expected = make(HandCrossEntropy(model), model).attribute(x, target=CONTRAST, **kwargs)
    before = model_snapshot(model)
    if form == "instance":
        wrapped = Contrastive(make(model, model))
    elif cls in (GuidedGradCam, InternalInfluence) or cls.__name__.startswith("Layer"):
        wrapped = Contrastive(cls, model, _layer(model))
    else:
        wrapped = Contrastive(cls, model, **CONSTRUCTOR_KWARGS.get(cls, {}))
    _seed()
    got = wrapped.attribute(x, CONTRAST, **kwargs)
    assert_model_unchanged(model, before)
    torch.testing.assert_close(got, expected)
    plain = make(model, model).attribute(x, target=CONTRAST, **kwargs)
    assert not torch.allclose(got, plain), "the result is the non-contrastive one"


def _cross_entropy(model, x, contrast):
    with torch.no_grad():
        return F.cross_entropy(model(x), contrast, reduction="none")


@pytest.mark.parametrize("form", ["class", "instance"])
def test_deep_lift_sums_to_the_cross_entropy_difference(form):
    model = make_tiny_cnn()
    x, baselines = _inputs(1), 0.3 * _inputs(2)
    method = Contrastive(DeepLift, model) if form == "class" else Contrastive(DeepLift(model))
    before = model_snapshot(model)
    attr, delta = method.attribute(x, CONTRAST, baselines=baselines, return_convergence_delta=True)
    assert_model_unchanged(model, before)
    expected = _cross_entropy(model, x, CONTRAST) - _cross_entropy(model, baselines, CONTRAST)
    torch.testing.assert_close(attr.sum(dim=(1, 2, 3)), expected, rtol=0, atol=1e-12)
    assert delta.abs().max() < 1e-12
    # the plain method sums to the change of the logit Q, not of CE_Q
    plain = DeepLift(model).attribute(x, target=CONTRAST, baselines=baselines)
    assert (plain.sum(dim=(1, 2, 3)) - expected).abs().max() > 1e-3


def test_deep_lift_equals_the_gradient_of_the_cross_entropy_near_the_baseline():
    """With the baseline close to the input, the rescale multipliers approach the gradient:
    DeepLift / (x - b) -> d CE_Q / dx where no ReLU changes state."""
    model = make_tiny_cnn()
    x = _inputs(1)
    baselines = x - 1e-7 * _inputs(3)
    attr = Contrastive(DeepLift, model, multiply_by_inputs=False).attribute(
        x, CONTRAST, baselines=baselines
    )
    leaf = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(leaf), CONTRAST, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(attr, gradient, rtol=1e-4, atol=1e-6)


def test_layer_deep_lift_sums_to_the_cross_entropy_difference():
    model = make_tiny_cnn()
    x, baselines = _inputs(1), 0.3 * _inputs(2)
    attr, delta = Contrastive(LayerDeepLift, model, _layer(model)).attribute(
        x, CONTRAST, baselines=baselines, return_convergence_delta=True
    )
    expected = _cross_entropy(model, x, CONTRAST) - _cross_entropy(model, baselines, CONTRAST)
    torch.testing.assert_close(attr.sum(dim=(1, 2, 3)), expected, rtol=0, atol=1e-12)
    assert delta.abs().max() < 1e-12


@pytest.mark.parametrize("cls", [DeepLiftShap, LayerDeepLiftShap], ids=lambda c: c.__name__)
def test_deep_lift_shap_sums_to_the_difference_from_the_mean_baseline_loss(cls):
    model = make_tiny_cnn()
    x = _inputs(1)
    args = (_layer(model),) if cls is LayerDeepLiftShap else ()
    attr = Contrastive(cls, model, *args).attribute(x, CONTRAST, baselines=_BASELINES)
    baseline_loss = torch.stack(
        [_cross_entropy(model, _BASELINES, q.repeat(len(_BASELINES))).mean() for q in CONTRAST]
    )
    expected = _cross_entropy(model, x, CONTRAST) - baseline_loss
    torch.testing.assert_close(attr.sum(dim=(1, 2, 3)), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [DeepLiftShap, LayerDeepLiftShap], ids=lambda c: c.__name__)
def test_a_baseline_distribution_of_n_rows_is_not_split_with_the_examples(cls):
    """Shap baselines are a distribution of any size. With exactly N of them, the classes of
    contrast="all" (in chunks of `batch_size` rows) repeated and sliced the distribution as
    if it held one baseline per example, so each chunk averaged over other references
    (3-20 % off on the bundled model). Every class's map must equal its own call, and sum
    to the cross-entropy minus the mean over all baselines."""
    model = make_tiny_cnn()
    x = _inputs(1)  # 4 examples, 5 classes
    baselines = 0.3 * _inputs(5)  # 4 references: as many as examples
    args = (_layer(model),) if cls is LayerDeepLiftShap else ()
    every = Contrastive(cls, model, *args).attribute(x, "all", baselines=baselines, batch_size=3)
    for c in range(5):
        alone = Contrastive(cls, model, *args).attribute(x, c, baselines=baselines)
        torch.testing.assert_close(every[:, c], alone, rtol=0, atol=1e-12)
        labels = torch.full((4,), c)
        mean_loss = _cross_entropy(model, baselines, labels).mean()
        expected = _cross_entropy(model, x, labels) - mean_loss
        torch.testing.assert_close(every[:, c].sum(dim=(1, 2, 3)), expected, rtol=0, atol=1e-12)


def test_noise_tunnel_around_deep_lift_sums_to_the_mean_noisy_difference():
    """SmoothGrad of contrastive DeepLift: the noisy inputs are read off the paired forward
    (the first half of each batch the model sees), then each attribution must sum to the
    mean over its noisy copies of CE_Q(x + noise) - CE_Q(baseline)."""
    model = make_tiny_cnn()
    x, baselines = _inputs(1), 0.3 * _inputs(2)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        torch.manual_seed(0)
        attr = Contrastive(NoiseTunnel(DeepLift(model))).attribute(
            x,
            CONTRAST,
            baselines=baselines,
            nt_type="smoothgrad",
            nt_samples=3,
            nt_samples_batch_size=2,
            stdevs=0.2,
        )
    finally:
        handle.remove()
    # NoiseTunnel's sub-batches: 2 then 1 noisy copies of each example (repeat_interleave)
    assert [len(batch) for batch in seen] == [16, 8]
    first, second = (batch[: len(batch) // 2] for batch in seen)
    noisy = torch.cat([first.view(4, 2, 3, 6, 6), second.view(4, 1, 3, 6, 6)], dim=1)
    loss = _cross_entropy(model, noisy.flatten(0, 1), CONTRAST.repeat_interleave(3))
    loss = loss.view(4, 3).mean(1)
    expected = loss - _cross_entropy(model, baselines, CONTRAST)
    torch.testing.assert_close(attr.sum(dim=(1, 2, 3)), expected, rtol=0, atol=1e-12)
    silent = Contrastive(NoiseTunnel(DeepLift(model))).attribute(
        x, CONTRAST, baselines=baselines, nt_samples=4, nt_samples_batch_size=3, stdevs=0.0
    )
    torch.testing.assert_close(
        silent, Contrastive(DeepLift, model).attribute(x, CONTRAST, baselines=baselines)
    )


def test_guided_grad_cam_is_guided_backprop_times_grad_cam_of_the_cross_entropy():
    model = make_tiny_cnn()
    x = _inputs(1)
    got = Contrastive(GuidedGradCam, model, _layer(model)).attribute(x, CONTRAST)
    # guided backprop of CE_Q, with hand-written guided ReLUs
    leaf = x.clone().requires_grad_(True)
    loss = F.cross_entropy(guided_copy(model)(leaf), CONTRAST, reduction="sum")
    (guided,) = torch.autograd.grad(loss, leaf)
    # Grad-CAM of CE_Q at the residual block, by hand; upsampled as GuidedGradCam does
    store = {}
    handle = _layer(model).register_forward_hook(lambda m, a, out: store.update(a=out))
    try:
        loss = F.cross_entropy(model(x), CONTRAST, reduction="sum")
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(loss, store["a"])
    cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True))
    cam = F.interpolate(cam.detach(), size=x.shape[2:], mode="nearest")
    torch.testing.assert_close(got, guided * cam)


def test_saliency_and_integrated_gradients_keep_working():
    model = make_tiny_cnn()
    x = _inputs(1)
    leaf = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(leaf), CONTRAST, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, leaf)
    saliency = Contrastive(Saliency, model).attribute(x, CONTRAST, abs=False)
    torch.testing.assert_close(saliency, gradient)
    ig, delta = Contrastive(IntegratedGradients, model).attribute(
        x, CONTRAST, n_steps=200, return_convergence_delta=True
    )
    expected = _cross_entropy(model, x, CONTRAST) - _cross_entropy(
        model, torch.zeros_like(x), CONTRAST
    )
    torch.testing.assert_close(ig.sum(dim=(1, 2, 3)), expected, rtol=0, atol=1e-3)
    assert delta.abs().max() < 1e-3


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda m: Contrastive(LRP, m), "LRP"),
        (lambda m: Contrastive(LRP(m)), "LRP"),
        (lambda m: Contrastive(LayerLRP, m, _layer(m)), "LayerLRP"),
        (lambda m: Contrastive(LayerActivation, m, _layer(m)), "LayerActivation"),
        (lambda m: Contrastive(NeuronGradient, m, _layer(m)), "NeuronGradient"),
        (lambda m: Contrastive(NoiseTunnel(LRP(m))), "LRP"),
        (
            lambda m: Contrastive(LayerFeaturePermutation, m, _layer(m)),
            "LayerFeaturePermutation",
        ),
    ],
)
def test_methods_that_cannot_be_contrastive_are_refused_at_construction(make, name):
    model = make_tiny_cnn()
    with pytest.raises(TypeError, match=f"cannot make {name} contrastive"):
        make(model)


def test_a_method_that_bypasses_the_forward_function_is_an_error():
    model = make_tiny_cnn()

    class OwnModel(Attribution):
        """Evaluates a model it holds under a name Contrastive does not know."""

        def __init__(self, forward_func):
            super().__init__(forward_func)
            self.network = [forward_func]

        def attribute(self, inputs, target=None, additional_forward_args=None):
            return self.network[0](inputs)[:, target[0]]

    with pytest.raises(RuntimeError, match="OwnModel never called the contrastive forward"):
        Contrastive(OwnModel, model).attribute(_inputs(), CONTRAST)


def test_the_given_deep_lift_instance_is_not_modified():
    model = make_tiny_cnn()
    deep_lift = DeepLift(model)
    handles = list(deep_lift.forward_handles)
    wrapped = Contrastive(deep_lift)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped.attribute(_inputs(), CONTRAST)
    assert deep_lift.model is model and deep_lift.forward_func is model
    assert deep_lift.forward_handles == handles


def test_confident_model_deep_lift_is_finite_and_equals_float64(confident_model, sample_digits):
    """Logit gaps up to ~10^4: the secant softmax must not overflow in float32, and float32
    must agree with the same computation on a float64 copy of the model. (Completeness is
    checked on TinyCNN above: on this model Captum's own DeepLift is not complete, its
    MaxPool rule leaves a convergence delta of ~0.2 % even for the plain logit.)"""
    images = sample_digits[0][:8]
    baselines = torch.zeros_like(images)
    attr = Contrastive(DeepLift, confident_model).attribute(images, baselines=baselines)
    assert torch.isfinite(attr).all()
    reference = copy.deepcopy(confident_model).double()
    expected = Contrastive(DeepLift, reference).attribute(
        images.double(), baselines=baselines.double()
    )
    scale = expected.abs().amax(dim=(1, 2, 3), keepdim=True)
    assert ((attr.double() - expected).abs() <= 1e-4 * scale).all()


@pytest.mark.parametrize("batch_size", [3, None])
def test_deep_lift_for_every_contrast_equals_single_calls(batch_size):
    """contrast='all' stacks (example, class) rows, inputs and baselines alike, so the paired
    forward still pairs each input with its own baseline."""
    model = make_tiny_cnn()
    x, baselines = _inputs(1), 0.3 * _inputs(2)
    method = Contrastive(DeepLift, model)
    every = method.attribute(x, "all", baselines=baselines, batch_size=batch_size)
    assert every.shape == (4, 5, 3, 6, 6)
    for q in range(5):
        single = method.attribute(x, q, baselines=baselines)
        torch.testing.assert_close(every[:, q], single)
        expected = _cross_entropy(model, x, torch.full((4,), q)) - _cross_entropy(
            model, baselines, torch.full((4,), q)
        )
        torch.testing.assert_close(every[:, q].sum(dim=(1, 2, 3)), expected, rtol=0, atol=1e-12)


def test_no_warning_that_the_input_did_not_require_gradients(bundled_model, bundled_digits):
    """Captum's "Input Tensor 0 did not already require gradients" came from every call of
    Contrastive(Saliency / InputXGradient), whatever the caller's input: the method got a
    detached view. The view now requires gradients itself; the caller's tensor is left as
    it was."""
    import warnings

    from captum.attr import InputXGradient, Saliency

    from captum_ext.attr import Contrastive

    x, y = bundled_digits[0][:3], bundled_digits[1][:3]
    for method in (Saliency, InputXGradient):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Contrastive(method, bundled_model).attribute(x, contrast=y)
    assert not x.requires_grad and x.grad is None


def test_results_carry_no_graph_over_the_inner_copies(bundled_model, bundled_digits):
    """With the inner copies requiring gradients, Contrastive(IntegratedGradients) returned
    attributions with a graph over them: `.numpy()` failed ("Can't call numpy() on Tensor
    that requires grad")."""
    from captum.attr import InputXGradient, IntegratedGradients

    from captum_ext.attr import Contrastive

    x, y = bundled_digits[0][:2], bundled_digits[1][:2]
    for method in (IntegratedGradients, InputXGradient):
        maps = Contrastive(method, bundled_model).attribute(x, contrast=y)
        assert not maps.requires_grad and maps.grad_fn is None
        maps.numpy()
    maps, delta = Contrastive(IntegratedGradients, bundled_model).attribute(
        x, contrast=y, n_steps=8, return_convergence_delta=True
    )
    assert not maps.requires_grad and not delta.requires_grad


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 5),
        )
        .double()
        .eval()
    )


@pytest.mark.parametrize("method", ["DeepLift", "DeepLiftShap", "GuidedBackprop"])
def test_module_rule_methods_refuse_a_plain_function(method):
    """A lambda hides the model's ReLUs from DeepLift's and Guided Backprop's hooks: the
    result was a plain gradient (completeness off by 0.0135), without a word."""
    import captum.attr as captum_attr

    from captum_ext.attr import Contrastive

    model = _small_cnn()
    with pytest.raises(TypeError, match="`forward_func`: .* Pass the nn.Module"):
        Contrastive(getattr(captum_attr, method), lambda x: model(x))
    Contrastive(getattr(captum_attr, method), model)  # the module itself works
    if method != "GuidedBackprop":  # (Captum's own GuidedBackprop takes only a Module)
        Contrastive(getattr(captum_attr, method), model.forward)  # a bound forward has one


def test_distribution_baselines_stay_a_distribution_for_several_classes():
    """NoiseTunnel(IG) with draw_baseline_from_distrib and contrast="all": a 3-row
    distribution for 3 images was repeated per example, so example i drew only baseline i."""
    from captum.attr import GradientShap, IntegratedGradients, NoiseTunnel

    from captum_ext.attr import Contrastive

    model = _small_cnn()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dist = torch.stack([torch.zeros(3, 6, 6), 3 * torch.ones(3, 6, 6), -3 * torch.ones(3, 6, 6)])
    dist = dist.double()
    method = Contrastive(NoiseTunnel(IntegratedGradients(model)))
    options = {"baselines": dist, "draw_baseline_from_distrib": True, "stdevs": 0.0}
    torch.manual_seed(0)
    np.random.seed(0)  # NoiseTunnel draws the baselines with numpy
    many = method.attribute(x, contrast="all", nt_samples=3, n_steps=4, batch_size=5, **options)
    ce = lambda t: -torch.log_softmax(model(t), 1)  # noqa: E731
    with torch.no_grad():
        implied = ce(x) - many.flatten(2).sum(2)  # mean CE(b) of the baselines drawn
        rows = ce(dist)
    # with draws restricted to each example's own row, example i's would be exactly CE(b_i)
    assert not torch.allclose(implied[:, 0], rows[:, 0], atol=1e-3)
    with pytest.raises(ValueError, match="draw_baseline_from_distrib=True"):
        Contrastive(NoiseTunnel(GradientShap(model))).attribute(
            x, contrast="all", baselines=dist, nt_samples=2, stdevs=0.0
        )


def test_a_broadcast_baseline_of_three_rgb_images_is_one_baseline_for_all():
    """A (C, H, W) baseline or feature mask for 3 RGB images has N = C = 3 rows and was
    repeated as if per example: contrast="all" failed deep in torch."""
    from captum.attr import FeatureAblation

    from captum_ext.attr import Contrastive

    model = _small_cnn()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    baseline = torch.linspace(-1, 1, 3 * 6 * 6, dtype=torch.float64).view(3, 6, 6)
    mask = torch.arange(36).view(1, 6, 6).expand(3, 6, 6) // 6
    method = Contrastive(FeatureAblation, model)
    many = method.attribute(x, contrast="all", baselines=baseline, feature_mask=mask)
    for q in range(5):
        one = method.attribute(x, contrast=q, baselines=baseline, feature_mask=mask)
        torch.testing.assert_close(many[:, q], one)


def test_a_contrastive_layer_method_exposes_its_layer():
    from captum.attr import LayerGradCam

    from captum_ext.attr import Contrastive

    model = _small_cnn()
    assert Contrastive(LayerGradCam, model, model[1]).layer is model[1]
    assert Contrastive(Saliency, model).layer is None
