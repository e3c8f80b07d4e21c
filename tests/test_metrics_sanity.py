"""Sanity checks (model randomisation, class sensitivity) and their similarity measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from captum.attr import GuidedBackprop, Saliency
from torch import nn

from captum_ext.bundled import load_bundled_model
from captum_ext.data import load_sample_digits
from captum_ext.metrics.sanity import (
    class_sensitivity,
    model_randomisation,
    spearman_similarity,
    ssim_similarity,
)

pytestmark = pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_spearman_matches_scipy_including_ties(batch):
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(batch)
    a = torch.randint(0, 5, (batch, 1, 6, 6), generator=generator).double()  # many ties
    b = torch.randn(batch, 1, 6, 6, generator=generator, dtype=torch.float64)
    ours = spearman_similarity(a, b, absolute=False)
    expected = [stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(batch)]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-12)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 28, 28, generator=generator, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(3, 1, 28, 28, generator=generator, dtype=torch.float64)).clamp(0, 1)
    a[:, :, 0, :2] = torch.tensor([0.0, 1.0])  # the maps are rescaled to [0, 1]: keep that range
    b[:, :, 0, :2] = torch.tensor([0.0, 1.0])
    ours = ssim_similarity(a, b)
    expected = [
        metrics.structural_similarity(
            a[i, 0].numpy(),
            b[i, 0].numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-10)
    assert torch.allclose(ssim_similarity(a, a), torch.ones(3, dtype=torch.float64))


@pytest.fixture(scope="module")
def digits():
    model = load_bundled_model()
    images, _ = load_sample_digits()
    return model, images[:12]


def test_guided_backprop_fails_the_randomisation_check_and_saliency_passes(digits):
    """Adebayo et al.'s finding, in kind, on the bundled model: after randomising only the
    classifier, Guided Backprop's maps stay close to the original and Saliency's do not."""
    model, images = digits
    before = model_snapshot(model)
    saliency = model_randomisation(lambda m: Saliency(m), model, images)
    guided = model_randomisation(lambda m: GuidedBackprop(m), model, images)
    assert_model_unchanged(model, before)
    assert saliency.layers[0] == "classifier" and saliency.layers == guided.layers
    for measure in ("spearman_abs", "ssim"):
        top_saliency = saliency.similarity[measure][0].mean()
        top_guided = guided.similarity[measure][0].mean()
        assert top_guided > 0.75 and top_guided > top_saliency + 0.2
        # the cascade only destroys more: the last step is the least similar
        assert saliency.similarity[measure][-1].mean() < top_saliency
    assert saliency.randomised.shape == (len(saliency.layers), *saliency.original.shape)


def test_independent_randomisation_changes_one_layer_at_a_time(digits):
    model, images = digits
    curves = model_randomisation(
        lambda m: Saliency(m), model, images[:3], cascade=False, layers=["features.0"]
    )
    assert curves.layers == ["features.0"]
    assert curves.similarity["spearman_abs"].shape == (1, 3)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_torchscript_model_is_randomised_as_its_eager_twin(digits):
    """The compiled layers of a TorchScript model have no ``reset_parameters``:
    ``captum-ext report --sections evaluation`` on a TorchScript file stopped with an
    AttributeError from inside torch. Its parameters now get torch's default rule written
    out, drawn in the same order, so the cascade equals the eager model's, also through the
    report's layer wrapper."""
    from captum_ext.data import expose_layer

    model, images = digits
    scripted = torch.jit.script(model)
    before = model_snapshot(scripted)
    eager = model_randomisation(lambda m: Saliency(m), model, images[:4])
    compiled = model_randomisation(lambda m: Saliency(m), scripted, images[:4])
    assert compiled.layers == eager.layers  # every parametrised layer, top first
    torch.testing.assert_close(compiled.randomised, eager.randomised)
    assert_model_unchanged(scripted, before)
    wrapper, _ = expose_layer(scripted, "features.7", example=images[:2])
    through = model_randomisation(
        lambda m: Saliency(m), wrapper, images[:4], layers=["script_module.classifier"]
    )
    torch.testing.assert_close(through.randomised[0], eager.randomised[0])


def test_weight_normalised_layers_are_randomised_as_their_plain_twins(digits):
    """``reset_parameters`` of a ``weight_norm`` layer wrote into its computed ``weight``
    (a fresh tensor on each access), so only the biases were re-initialised and Saliency
    kept a Spearman similarity of 1.0 after the classifier was "randomised" (0.62 on the
    plain model): a correct explainer looked as if it failed the check. The
    parametrisation's tensors are now set through its ``right_inverse``, with the same
    draws as the plain layer's re-initialisation."""
    import copy

    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    model, images = digits
    x = images[:4].double()
    plain = copy.deepcopy(model).double()
    normalised = copy.deepcopy(plain)
    for name in ("features.0", "features.3", "features.6", "classifier"):
        weight_norm(normalised.get_submodule(name))
    normalised.features[3].bias = None  # a layer with no plain parameter left
    plain.features[3].bias = None
    torch.testing.assert_close(normalised(x), plain(x))
    before = model_snapshot(normalised)
    expected = model_randomisation(lambda m: Saliency(m), plain, x)
    got = model_randomisation(lambda m: Saliency(m), normalised, x)
    assert got.layers == expected.layers == ["classifier", "features.6", "features.3", "features.0"]
    torch.testing.assert_close(got.randomised, expected.randomised)
    assert got.similarity["spearman_abs"][0].mean() < 0.9
    assert_model_unchanged(normalised, before)
    assert parametrize.is_parametrized(normalised.classifier)
    torch.testing.assert_close(normalised(x), plain(x))  # the user's model as it was


def test_other_parametrisations_are_renormalised_or_refused_by_name():
    """spectral_norm's power-iteration vectors stayed those of the old weight, so the
    re-initialised layer was not spectrally normalised (sigma 6 to 51 instead of 1); a
    parametrisation without right_inverse failed with torch's RuntimeError."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm

    from captum_ext.metrics.sanity import _reset_parameters

    for seed in range(3):
        torch.manual_seed(seed)
        layer = spectral_norm(torch.nn.Linear(12, 7)).eval()
        _reset_parameters(layer)
        with torch.no_grad():
            sigma = torch.linalg.matrix_norm(layer.weight, ord=2)
        assert float(sigma) == pytest.approx(1.0, abs=0.05)

    # orthogonal keeps a buffer that its right_inverse sets: re-initialised, still orthogonal
    from torch.nn.utils.parametrizations import orthogonal

    torch.manual_seed(0)
    layer = orthogonal(torch.nn.Linear(6, 6)).eval()
    before = layer.weight.detach().clone()
    _reset_parameters(layer)
    with torch.no_grad():
        product = layer.weight @ layer.weight.T
    assert not torch.allclose(layer.weight, before)
    torch.testing.assert_close(product, torch.eye(6), atol=1e-5, rtol=0)
    fixed = orthogonal(torch.nn.Linear(6, 6), use_trivialization=False)
    with pytest.raises(ValueError, match="`layers`: the parametrised `weight`"):
        _reset_parameters(fixed)

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    layer = torch.nn.Linear(4, 3)
    parametrize.register_parametrization(layer, "weight", Doubled())
    model = torch.nn.Sequential(torch.nn.Flatten(), layer)
    with pytest.raises(ValueError, match="`weight` of a ParametrizedLinear.*no right_inverse"):
        model_randomisation(lambda m: Saliency(m), model, torch.rand(2, 1, 2, 2), target=0)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_legacy_weight_norm_and_spectral_norm_layers_are_randomised(digits):
    """torch's hook-based weight_norm / spectral_norm: the deep copy failed with torch's
    "Only Tensors created explicitly by the user (graph leaves)", and ``reset_parameters``
    wrote into the computed ``weight``, which the pre-hook overwrote from the old
    parameters. The maps now equal the plain twin's, and a re-initialised spectrally
    normalised weight has norm 1."""
    import copy

    from torch.nn.utils import spectral_norm, weight_norm

    from captum_ext.metrics.sanity import _reset_parameters

    model, images = digits
    x = images[:4].double()
    plain = copy.deepcopy(model).double()
    normalised = copy.deepcopy(plain)
    for name in ("features.0", "features.3", "features.6", "classifier"):
        weight_norm(normalised.get_submodule(name))
    normalised(x).sum().backward()  # computed weights with autograd history
    normalised.zero_grad(set_to_none=True)
    before = model_snapshot(normalised)
    expected = model_randomisation(lambda m: Saliency(m), plain, x)
    got = model_randomisation(lambda m: Saliency(m), normalised, x)
    assert got.layers == expected.layers
    torch.testing.assert_close(got.randomised, expected.randomised)
    assert_model_unchanged(normalised, before)
    torch.testing.assert_close(normalised(x), plain(x))

    for seed in range(3):
        torch.manual_seed(seed)
        layer = spectral_norm(torch.nn.Linear(12, 7)).eval()
        old = layer.weight.detach().clone()
        _reset_parameters(layer)
        layer(torch.zeros(1, 12))  # the pre-hook recomputes the weight from the parameters
        with torch.no_grad():
            sigma = torch.linalg.matrix_norm(layer.weight, ord=2)
        assert float(sigma) == pytest.approx(1.0, abs=0.05)
        assert not torch.allclose(layer.weight, old)


def test_one_layer_name_and_explainers_that_are_not_factories(digits):
    """``layers="classifier"`` was read as the layers 'c', 'l', 'a', ...; an explainer
    given as a string failed with "'str' object is not callable", and an attribution
    object already made would have explained the unrandomised model."""
    model, images = digits
    one = model_randomisation(lambda m: Saliency(m), model, images[:2], layers="classifier")
    listed = model_randomisation(lambda m: Saliency(m), model, images[:2], layers=["classifier"])
    assert one.layers == ["classifier"]
    torch.testing.assert_close(one.randomised, listed.randomised)
    by_class = model_randomisation(Saliency, model, images[:2], layers="classifier")
    torch.testing.assert_close(by_class.randomised, listed.randomised)  # a class is a factory
    top_first = model_randomisation(
        Saliency, model, images[:2], layers=reversed(["features.6", "classifier"])
    )
    assert top_first.layers == ["classifier", "features.6"]  # any iterable of names
    with pytest.raises(TypeError, match="`layers` must be a module name or a list"):
        model_randomisation(lambda m: Saliency(m), model, images[:2], layers=[3])
    for function in (model_randomisation, class_sensitivity):
        with pytest.raises(TypeError, match="`explainer` must be a callable"):
            function("saliency", model, images[:2])
        with pytest.raises(TypeError, match=r"`explainer` must build .* `lambda m: Saliency\(m\)`"):
            function(Saliency(model), model, images[:2])


def test_class_sensitivity_explains_both_classes_in_one_call(digits):
    model, images = digits
    calls = []

    class CountingSaliency(Saliency):
        def attribute(self, inputs, target=None, **kwargs):
            calls.append(inputs.shape[0])
            return super().attribute(inputs, target=target, **kwargs)

    result = class_sensitivity(lambda m: CountingSaliency(m), model, images)
    assert calls == [2 * images.shape[0]]
    with torch.no_grad():
        order = model(images).argsort(dim=1, descending=True)
    assert torch.equal(result.target, order[:, 0]) and torch.equal(result.contrast, order[:, 1])
    guided = class_sensitivity(lambda m: GuidedBackprop(m), model, images)
    # positive-only propagation is less class-sensitive (more similar maps) than the gradient
    assert guided.similarity["spearman_abs"].mean() > result.similarity["spearman_abs"].mean()


def test_bad_arguments_name_themselves(digits):
    model, images = digits
    with pytest.raises(ValueError, match="similarity"):
        model_randomisation(lambda m: Saliency(m), model, images, similarity="pixels")
    with pytest.raises(ValueError, match="layers"):
        model_randomisation(lambda m: Saliency(m), model, images, layers=["nope"])
    with pytest.raises(TypeError, match="explainer"):
        model_randomisation(lambda m: m, model, images)
    with pytest.raises(ValueError, match="contrast"):
        class_sensitivity(lambda m: Saliency(m), model, images, contrast="random")


def test_non_finite_maps_are_refused_naming_where_they_came_from(digits):
    """NaN in a map made the rank and SSIM similarities meaningless without a word. The
    similarity functions name the argument; model_randomisation names the layer after whose
    randomisation the explainer returned them."""
    model, images = digits
    good = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    bad = good.clone()
    bad[1, 0, 4, 4] = float("nan")
    for similarity in (spearman_similarity, ssim_similarity):
        with pytest.raises(ValueError, match="`maps_b` contains NaN"):
            similarity(good, bad)
        with pytest.raises(ValueError, match="`maps_a` contains NaN"):
            similarity(bad.clone().fill_(float("inf")), good)

    class BreaksOnceRandomised:
        """Saliency, NaN once the classifier's weights are no longer the trained ones."""

        def __init__(self, model):
            self.saliency = Saliency(model)
            self.trained = torch.equal(
                model.classifier.weight, digits[0].classifier.weight.to(model.classifier.weight)
            )

        def attribute(self, inputs, target=None):
            maps = self.saliency.attribute(inputs, target=target)
            return maps if self.trained else maps * float("nan")

    with pytest.raises(ValueError, match=r"after randomising 'classifier' for the examples"):
        model_randomisation(BreaksOnceRandomised, model, images[:3])


def test_inputs_are_checked_before_the_model_runs(digits):
    """A 1-tuple works as in Captum; 3-D, integer and NaN batches are refused naming
    `inputs` (class_sensitivity raised AttributeError on a tuple; NaN ran silently)."""
    model, images = digits
    images = images[:2]
    explainer = lambda m: Saliency(m)  # noqa: E731
    nan_images = images.clone()
    nan_images[1, 0, 5, 5] = float("nan")
    for check in (model_randomisation, class_sensitivity):
        with pytest.raises(ValueError, match="`inputs` must be a floating point batch"):
            check(explainer, model, images[:, 0])
        with pytest.raises(ValueError, match="`inputs` must be a floating point batch"):
            check(explainer, model, (images * 255).to(torch.uint8))
        with pytest.raises(ValueError, match="`inputs` contains NaN"):
            check(explainer, model, nan_images)
    plain = class_sensitivity(explainer, model, images)
    as_tuple = class_sensitivity(explainer, model, (images,))
    torch.testing.assert_close(as_tuple.target_maps, plain.target_maps)
    torch.testing.assert_close(as_tuple.similarity["ssim"], plain.similarity["ssim"])


@pytest.mark.parametrize("similarity", [spearman_similarity, ssim_similarity])
def test_similarities_refuse_mismatched_or_empty_batches(similarity):
    """Mismatched batches failed inside torch (a broadcasting or convolution error)."""
    maps = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"`maps_a` \(2, 1, 8, 8\) and `maps_b` \(3, 1, 8, 8\)"):
        similarity(maps, torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="`maps_b` must be a batch"):
        similarity(maps, maps[:, :, :0])
    with pytest.raises(TypeError, match="`maps_a` must be a torch.Tensor"):
        similarity(maps.numpy(), maps)


def test_ssim_takes_maps_without_a_channel_axis_and_refuses_several_channels():
    a, b = torch.rand(2, 8, 8), torch.rand(2, 8, 8)
    torch.testing.assert_close(ssim_similarity(a, b), ssim_similarity(a[:, None], b[:, None]))
    with pytest.raises(ValueError, match="reduce the channels"):
        ssim_similarity(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))


def test_class_sensitivity_never_compares_a_class_with_itself(digits):
    """With target given (e.g. the labels of misclassified images), the default contrast was
    the runner-up of the logits, which can be the target itself: the two maps were the same
    and the similarity 1, read as "blind to the class". The contrast is now the most (least)
    likely class other than the target, and an explicit contrast equal to the target is
    refused."""
    model, images = digits
    images = images[:6]
    with torch.no_grad():
        order = model(images).argsort(dim=1, descending=True)
    runner_up = order[:, 1]
    result = class_sensitivity(lambda m: Saliency(m), model, images, target=runner_up)
    assert torch.equal(result.target, runner_up)
    assert torch.equal(result.contrast, order[:, 0])  # the most likely class but the target
    assert bool((result.similarity["spearman_abs"] < 0.999).all())
    last = order[:, -1]
    least = class_sensitivity(
        lambda m: Saliency(m), model, images, target=last, contrast="least-likely"
    )
    assert torch.equal(least.contrast, order[:, -2])
    with pytest.raises(ValueError, match=r"`contrast` equals `target` for example\(s\) \[0, 1"):
        class_sensitivity(lambda m: Saliency(m), model, images, target=3, contrast=3)


def test_sanity_checks_name_a_bad_target(digits):
    """A target list of the wrong length, an index beyond the classes or a float target ended
    in torch's "expanded size", "index 12 is out of bounds" or Captum's "Target list length
    does not match output!"; now errors name `target` as the other metrics do."""
    model, images = digits
    images = images[:4]
    explainer = lambda m: Saliency(m)  # noqa: E731
    for check in (class_sensitivity, model_randomisation):
        with pytest.raises(ValueError, match="`target` has 2 entries but the inputs have 4"):
            check(explainer, model, images, target=[1, 2])
        with pytest.raises(ValueError, match="`target` holds class indices outside"):
            check(explainer, model, images, target=12)
        with pytest.raises(TypeError, match="`target` must hold integer class indices"):
            check(explainer, model, images, target=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="`contrast` holds class indices outside"):
        class_sensitivity(explainer, model, images, contrast=[1, 2, 3, 40])


def test_identical_constant_maps_are_similar_not_unrelated():
    """A dead layer's all-zero maps for both classes were similarity 0 by Spearman and HOG
    ("class-sensitive"), 1 only by SSIM."""
    zeros = torch.zeros(3, 1, 12, 12)
    varying = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(spearman_similarity(zeros, zeros + 2), torch.ones(3).double())
    torch.testing.assert_close(spearman_similarity(zeros, varying), torch.zeros(3).double())
    pytest.importorskip("skimage")
    from captum_ext.metrics.sanity import _hog_similarity

    torch.testing.assert_close(_hog_similarity(zeros, zeros), torch.ones(3).double())
    small = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_hog_similarity(small, small), torch.ones(2).double())
    other = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    assert (_hog_similarity(small, other) < 0.99).all()  # not 1 for any pair


def test_hog_refuses_maps_narrower_than_a_cell():
    pytest.importorskip("skimage")
    from captum_ext.metrics.sanity import _hog_similarity

    for shape in ((5, 1), (2, 2), (16, 2)):  # at 2 pixels: no gradient inside a direction
        maps = torch.rand(2, 1, *shape)
        with pytest.raises(
            ValueError, match=f"at least 3 x 3 pixels .*, got {shape[0]} x {shape[1]}"
        ):
            _hog_similarity(maps, maps)


def test_sanity_checks_sum_half_precision_channels_without_overflow():
    """Finite float16 maps of 3 channels near 30,000 each summed to inf in float16: "explainer
    returned NaN or infinite maps"."""

    class Half:
        def __init__(self, model):
            self.model = model

        def attribute(self, inputs, target=None):
            maps = torch.full((inputs.shape[0], 3, *inputs.shape[-2:]), 30000.0)
            maps[:, :, :2] = 1.0
            return maps.half()

    model = load_bundled_model()
    x = load_sample_digits()[0][:2]
    result = class_sensitivity(Half, model, x, similarity="spearman_abs")
    torch.testing.assert_close(result.similarity["spearman_abs"], torch.ones(2).double())


def test_class_sensitivity_least_likely_takes_integer_scores():
    """`at_least_float32` keeps int64 scores, and scattering inf into them raised."""
    from captum.attr import FeatureAblation
    from torch import nn

    from captum_ext.metrics import class_sensitivity

    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 5, 3, padding=1)

        def forward(self, x):
            return (self.conv(x).sum(dim=(2, 3)) * 100).long()

    torch.manual_seed(0)
    model = Counts().eval()
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = model(x)
    result = class_sensitivity(
        lambda m: FeatureAblation(m), model, x, contrast="least-likely", similarity="spearman_abs"
    )
    others = scores.double().scatter(1, result.target[:, None], float("inf"))
    assert result.contrast.tolist() == others.argmin(dim=1).tolist()


def test_explainers_that_use_numpy_or_work_in_place_get_an_ordinary_copy(
    bundled_model, sample_digits
):
    """The inputs were given to explainers with requires_grad on (to quiet Captum's warning):
    an explainer reading them through numpy then failed, and one that clamps them in place
    raised torch's leaf-variable error (before that, it changed the user's tensor)."""
    from captum_ext.metrics import class_sensitivity, model_randomisation

    class ThroughNumpy:
        def __init__(self, model):
            self.model = model

        def attribute(self, inputs, target=None):
            inputs.clamp_(-5, 5)
            return torch.from_numpy(np.abs(inputs.numpy())).sum(1, keepdim=True)

    x = sample_digits[0][:3]
    before = x.clone()
    model_randomisation(ThroughNumpy, bundled_model, x, layers=["classifier"])
    class_sensitivity(ThroughNumpy, bundled_model, x)
    assert torch.equal(x, before)


def test_default_cascade_ends_with_no_trained_parameter_of_a_vision_transformer():
    """The default cascade took only modules with a public ``reset_parameters``: a vision
    transformer's attention projections (``nn.MultiheadAttention``), class token and
    positional embedding, about 29 % of its parameters, kept their trained values after
    the last step. Every weight now changes by the end of the cascade, the model's own
    (its class token) last (the attention's bias vector, not a weight, keeps its value),
    and an independent step changes only its own layer."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=16,
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        num_classes=3,
    ).eval()
    with torch.no_grad():  # trained-looking values, unlike the zero class token at creation
        for parameter in vit.parameters():
            parameter.add_(torch.randn_like(parameter))
    x = torch.rand(2, 3, 16, 16)
    trained = {name: p.detach().clone() for name, p in vit.named_parameters()}
    seen = []
    curves = model_randomisation(lambda m: seen.append(m) or Saliency(m), vit, x)
    assert curves.layers[-1] == ""  # the class token's module: the model itself
    assert "encoder.layers.encoder_layer_0.self_attention" in curves.layers
    last = dict(seen[-1].named_parameters())
    unchanged = [n for n, p in trained.items() if torch.equal(last[n], p)]
    assert unchanged == ["encoder.layers.encoder_layer_0.self_attention.in_proj_bias"]
    independent = model_randomisation(
        lambda m: seen.append(m) or Saliency(m),
        vit,
        x,
        cascade=False,
        layers=["encoder.layers.encoder_layer_0.self_attention"],
    )
    changed = [n for n, p in seen[-1].named_parameters() if not torch.equal(trained[n], p)]
    assert changed == [  # named explicitly: all its own parameters
        "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
        "encoder.layers.encoder_layer_0.self_attention.in_proj_bias",
    ]
    assert independent.similarity["spearman_abs"].shape == (1, 2)
    for name, parameter in vit.named_parameters():  # the user's model as it was
        assert torch.equal(parameter, trained[name])


class _ScaledNet(nn.Module):
    """A small CNN with raw parameters of its own: a learned temperature (0-d), a learned
    per-class scale (1-D), frozen normalisation constants and an integer counter."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(16, 3)
        self.temperature = nn.Parameter(torch.tensor(2.0))
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 1.0]))
        self.mean = nn.Parameter(torch.full((1, 1, 1, 1), 0.3), requires_grad=False)
        self.steps = nn.Parameter(torch.tensor([[7]]), requires_grad=False)

    def forward(self, x):
        z = self.fc(self.features(x - self.mean).flatten(1))
        return z * self.scale / self.temperature


def test_default_cascade_leaves_raw_vectors_scalars_and_constants_alone():
    """The first version of the wider default re-initialised every raw parameter with the
    rule for linear and convolutional layers: a learned temperature became 0 (all maps NaN:
    the call failed), a per-class scale 0 (all maps 0, reported as a perfect pass), frozen
    normalisation constants were "randomised", and an integer parameter failed inside
    torch. Such modules now contribute only their trained weights of 2+ dimensions, and
    here the model has none: the steps are its layers, as before the change."""
    torch.manual_seed(0)
    model = _ScaledNet().eval()
    x = torch.rand(3, 1, 8, 8)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = []
    curves = model_randomisation(lambda m: seen.append(m) or Saliency(m), model, x)
    assert curves.layers == ["fc", "features.0"]
    assert bool(torch.isfinite(curves.randomised).all())
    last = dict(seen[-1].named_parameters())
    for name in ("temperature", "scale", "mean", "steps"):
        assert torch.equal(last[name], before[name])
    assert not torch.equal(last["fc.weight"], before["fc.weight"])
