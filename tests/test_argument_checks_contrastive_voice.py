"""Argument checks of Contrastive, VOICE, the inversion losses and read-outs that were NaN.

Each bad value must get a ValueError/TypeError naming the argument (or, for a read-out that
is NaN by definition, a RuntimeWarning saying why), never Captum's bare AssertionError, a
crash inside torch, or a silently wrong result.
"""

from __future__ import annotations

import math
import warnings

import networkx as nx
import pytest
import torch
from _helpers import make_tiny_cnn
from captum.attr import GradientShap, IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from captum_ext.attr import VOICE, Contrastive, GradCAM
from captum_ext.circuits import compare
from captum_ext.inversion import perturbed_kl_ce, weight_gradient_norm, within_class_diversity

CONTRAST = [1, 2, 3, 0]


def _inputs(seed: int = 1, n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=generator, dtype=torch.float64)


def _nan_baselines() -> torch.Tensor:
    baselines = 0.1 * _inputs(2)
    baselines[0, 0, 0, 0] = float("nan")
    return baselines


# ---------------------------------------------------------------- 1. Contrastive kwargs


@pytest.mark.parametrize(
    ("method", "kwargs", "argument"),
    [
        ("ig", {"baselines": _nan_baselines(), "n_steps": 4}, "baselines"),
        ("ig", {"baselines": torch.tensor(float("nan"), dtype=torch.float64)}, "baselines"),
        ("ig", {"baselines": 0.1 * _inputs(2)[:3], "n_steps": 4}, "baselines"),
        ("ig", {"baselines": torch.zeros(1, 3, 5, 6, dtype=torch.float64)}, "baselines"),
        ("ig", {"n_steps": 0}, "n_steps"),
        ("ig", {"n_steps": 2.5}, "n_steps"),
        ("ig", {"n_steps": 1, "method": "riemann_trapezoid"}, "n_steps"),
        ("ig", {"n_steps": 4, "method": "simpson"}, "method"),
        ("ig", {"n_steps": 4, "internal_batch_size": 0}, "internal_batch_size"),
        ("nt", {"nt_type": "smoothgrad_cubed", "nt_samples": 2}, "nt_type"),
        ("nt", {"nt_samples": 0}, "nt_samples"),
        ("nt", {"nt_samples": 2, "stdevs": float("nan")}, "stdevs"),
    ],
    ids=[
        "baselines-nan",
        "baselines-nan-scalar-tensor",
        "baselines-batch-3-of-4",
        "baselines-not-broadcastable",
        "n_steps-0",
        "n_steps-float",
        "n_steps-1-riemann",
        "method-unknown",
        "internal_batch_size-0",
        "nt_type-unknown",
        "nt_samples-0",
        "stdevs-nan",
    ],
)
def test_contrastive_refuses_bad_captum_arguments_by_name(method, kwargs, argument):
    model = make_tiny_cnn()
    if method == "ig":
        explainer = Contrastive(IntegratedGradients, model)
    else:
        explainer = Contrastive(NoiseTunnel(Saliency(model)))
    with pytest.raises((ValueError, TypeError), match=f"`{argument}"):
        explainer.attribute(_inputs(), contrast=CONTRAST, **kwargs)


def test_contrastive_keeps_captum_message_when_translating_an_assertion():
    explainer = Contrastive(IntegratedGradients, make_tiny_cnn())
    with pytest.raises(ValueError, match="`n_steps`") as info:
        explainer.attribute(_inputs(), contrast=1, n_steps=1, method="riemann_left")
    assert "The number of steps has to be larger than one" in str(info.value)
    assert isinstance(info.value.__cause__, AssertionError)


def test_contrastive_lets_an_unrelated_assertion_through():
    """Only Captum's argument checks are translated: a model's own assert stays as it is."""

    class Asserting(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = make_tiny_cnn()

        def forward(self, x):
            assert x.shape[0] < 0, "the model's own baselines check"
            return self.model(x)

    with pytest.raises(AssertionError, match="the model's own"):
        Contrastive(Saliency, Asserting()).attribute(_inputs(), contrast=1)


def _plain_contrastive_ig(model, x, contrast, baselines, n_steps):
    """Captum's own IntegratedGradients of -log_softmax(model(x))[Q]: what Contrastive(IG)
    computed before the argument checks were added (identical to it in float64)."""
    forward = lambda z: -torch.log_softmax(model(z), dim=1)  # noqa: E731
    return IntegratedGradients(forward).attribute(
        x, target=torch.tensor(contrast), baselines=baselines, n_steps=n_steps
    )


@pytest.mark.parametrize(
    "baselines",
    [
        0.1 * _inputs(2)[:1],  # one for all
        0.1 * _inputs(2),  # one per example
        0.25,  # a scalar
        torch.full((1, 6, 6), 0.1, dtype=torch.float64),  # broadcastable, lower rank
    ],
    ids=["batch-1", "batch-N", "scalar", "broadcastable"],
)
def test_contrastive_valid_baselines_give_the_same_result_as_before(baselines):
    model = make_tiny_cnn()
    x = _inputs()
    got = Contrastive(IntegratedGradients, model).attribute(
        x, contrast=CONTRAST, baselines=baselines, n_steps=8
    )
    expected = _plain_contrastive_ig(model, x, CONTRAST, baselines, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_contrastive_baseline_distribution_of_any_size_is_still_accepted():
    """GradientShap draws from its baselines: 3 of them for 4 inputs is valid."""
    model = make_tiny_cnn()
    attr = Contrastive(GradientShap, model).attribute(
        _inputs(), contrast=CONTRAST, baselines=0.1 * _inputs(2)[:3], n_samples=2
    )
    assert attr.shape == (4, 3, 6, 6) and bool(torch.isfinite(attr).all())


# ---------------------------------------------------------------- 2. VOICE noise arguments


_BAD_NOISE = [
    ({"nt_samples": 0}, "nt_samples"),
    ({"nt_samples": 2.5}, "nt_samples"),
    ({"stdevs": float("nan")}, "stdevs"),
    ({"stdevs": -1.0}, "stdevs"),
    ({"generator": "not a generator"}, "generator"),
]


@pytest.mark.parametrize("technique", ["gradcam", "saliency"])
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    _BAD_NOISE,
    ids=[f"{a}={v!r}" for (kw, a) in _BAD_NOISE for v in kw.values()],
)
def test_voice_checks_noise_arguments_for_every_method(technique, kwargs, argument):
    """Invalid nt_samples / stdevs / generator were ignored outside SmoothGrad; they are
    refused with the message the SmoothGrad branch gives."""
    model = make_tiny_cnn()
    method = GradCAM(model, "features.3") if technique == "gradcam" else Saliency(model)
    with pytest.raises((ValueError, TypeError), match=f"`{argument}`") as info:
        VOICE(method).attribute(_inputs(n=3), **kwargs)
    with pytest.raises(type(info.value)) as smooth:
        VOICE(NoiseTunnel(Saliency(model))).attribute(_inputs(n=3), **kwargs)
    assert str(smooth.value) == str(info.value)


def test_voice_valid_noise_arguments_still_have_no_effect_outside_smoothgrad():
    model = make_tiny_cnn()
    voice = VOICE(GradCAM(model, "features.3"))
    x = _inputs(n=3)
    default = voice.attribute(x)
    given = voice.attribute(x, nt_samples=3, stdevs=0.5, generator=7)
    torch.testing.assert_close(given.uncertainty, default.uncertainty, rtol=0, atol=0)
    torch.testing.assert_close(given.explanation, default.explanation, rtol=0, atol=0)


# ---------------------------------------------------------------- 3. NaN read-outs warn


def test_within_class_diversity_warns_when_no_class_has_two_images():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    with pytest.warns(RuntimeWarning, match="within_class_diversity: no class has two"):
        result = within_class_diversity(features, None, torch.tensor([0, 1, 2]))
    assert math.isnan(result.mean)


def test_within_class_diversity_does_not_warn_with_a_pair():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = within_class_diversity(features, None, torch.tensor([0, 0, 2]))
    assert result.mean == pytest.approx(0.0)


def _zero_weight_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_node("a:0", layer="a")
    graph.add_node("b:0", layer="b")
    graph.add_edge("a:0", "b:0", weight=0.0)
    return graph


def test_compare_warns_when_flow_retained_is_nan_for_zero_weights_only():
    """Edges that all weigh 0: a NaN worth a warning. No edges at all (node-only graphs such
    as pathway graphs, compared by node_jaccard): NaN as documented, without a warning."""
    with pytest.warns(RuntimeWarning, match="compare: the edges of `graph_a` all weigh 0"):
        result = compare(_zero_weight_graph(), _zero_weight_graph())
    assert math.isnan(result.flow_retained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compare(nx.DiGraph(), nx.DiGraph())
    assert math.isnan(result.flow_retained)


# ---------------------------------------------------------------- 4. models returning a tuple


class _TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = make_tiny_cnn()

    def forward(self, x):
        return self.model(x), None


@pytest.mark.parametrize(
    "loss",
    [
        lambda m, x: weight_gradient_norm(m, x, torch.tensor([0, 1, 2, 3])),
        lambda m, x: perturbed_kl_ce(m, x, torch.softmax(torch.randn(4, 5, dtype=x.dtype), 1)),
    ],
    ids=["weight_gradient_norm", "perturbed_kl_ce"],
)
def test_inversion_losses_refuse_a_model_that_returns_a_tuple(loss):
    with pytest.raises(ValueError, match=r"`model` must return \(N, classes\) logits") as info:
        loss(_TupleModel(), _inputs())
    assert "model(x)[0]" in str(info.value) or "model(*args)[0]" in str(info.value)
