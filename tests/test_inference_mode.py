"""Serving code runs under ``torch.inference_mode()``, and so do many preprocessing pipelines.

Before: a batch made in inference mode failed deep inside the backward ("Inference tensors
cannot be saved for backward"), and a method called inside an inference-mode block said that
the model's output "does not depend on the differentiated tensors" (``enable_grad`` does not
undo inference mode), or failed in LayerIBA's hooks or the sanity checks' copied model. Every
result below must equal the one computed outside inference mode.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency

from captum_ext.attr import (
    VOICE,
    ActivationMatchingMask,
    Contrastive,
    GradCAM,
    LayerIBA,
    PathwayGradient,
)
from captum_ext.circuits import CircuitReadout
from captum_ext.metrics import completeness, deletion, gradtrust, model_randomisation

LAYER = "features.7"


def _iba(model, estimate_on, x, y):
    iba = LayerIBA(model, LAYER)
    iba.estimate(estimate_on)
    torch.manual_seed(0)
    return iba.attribute(x, target=y)


CALLS = {
    "GradCAM": lambda model, x, y: GradCAM(model, LAYER).attribute(x, target=y),
    "VOICE": lambda model, x, y: VOICE(GradCAM(model, LAYER)).attribute(x, target=y).uncertainty,
    "Contrastive(Saliency)": lambda model, x, y: Contrastive(Saliency(model)).attribute(
        x, contrast=(y + 1) % 10
    ),
    "PathwayGradient": lambda model, x, y: PathwayGradient(model).attribute(x, target=y),
    "LayerIBA": lambda model, x, y: _iba(model, x, x, y),
    "gradtrust, all parameters": lambda model, x, y: gradtrust(model, x, layer="all"),
    "masks": lambda model, x, y: ActivationMatchingMask(model, [LAYER]).attribute(
        x[:2], target=y[:2], mode="per_image", steps=3, seed=0, progress=False
    ),
    "circuit, gradient": lambda model, x, y: torch.tensor(
        sorted(
            weight
            for graph in CircuitReadout(model, gradient=True).readout(x[:2], target=y[:2])
            for *_, weight in graph.edges(data="weight")
        )
    ),
    "model_randomisation": lambda model, x, y: model_randomisation(
        lambda m: GradCAM(m, LAYER), model, x, target=y, layers=["classifier"]
    ).similarity["spearman_abs"],
}


@pytest.mark.parametrize("name", list(CALLS))
def test_inputs_made_in_inference_mode_and_calls_inside_it(name, bundled_model, sample_digits):
    x, y = sample_digits[0][:4], sample_digits[1][:4]
    call = CALLS[name]
    expected = call(bundled_model, x, y)
    assert expected.abs().sum() > 0  # not a comparison of blank maps
    with torch.inference_mode():
        made_there = x * 1.0
    assert made_there.is_inference()
    torch.testing.assert_close(call(bundled_model, made_there, y), expected)
    with torch.inference_mode():
        inside = call(bundled_model, x, y)
        assert not torch.is_grad_enabled()  # the block's mode is back after the call
    torch.testing.assert_close(inside, expected)
    assert all(not p.is_inference() for p in bundled_model.parameters())


def test_metrics_inside_inference_mode_take_maps_made_there(bundled_model, sample_digits):
    """The perturbation metrics need no gradients: they stay in inference mode, where the
    maps a user made in the same block can be used as they are."""
    x, y = sample_digits[0][:4], sample_digits[1][:4]
    maps = GradCAM(bundled_model, LAYER).attribute(x, target=y, upsample_to_input=True)
    assert maps.flatten(1).amax(dim=1).gt(0).all()
    expected = (
        deletion(bundled_model, x, maps, target=y),
        completeness(bundled_model, x, maps, target=y, noise=0.0).drop,
    )
    with torch.inference_mode():
        there = maps * 1.0
        got = (
            deletion(bundled_model, x, there, target=y),
            completeness(bundled_model, x, there, target=y, noise=0.0).drop,
        )
    for value, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(value, reference)


@pytest.mark.parametrize(
    "context",
    [torch.inference_mode, torch.no_grad, lambda: torch.set_grad_enabled(False)],
    ids=["inference_mode", "no_grad", "set_grad_enabled(False)"],
)
def test_training_methods_inside_inference_mode(context, bundled_model, sample_digits):
    """The mask net, the introspective head and the inversion generator are trained inside
    an inference-mode or no-grad block as outside it (same seeds, same results). Under
    no_grad the introspective head failed in its backward ("element 0 of tensors does not
    require grad")."""
    from captum_ext.attr import ActivationMatchingMask
    from captum_ext.introspection import IntrospectiveNetwork
    from captum_ext.inversion import NetworkInversion

    x, y = sample_digits

    def train_all():
        masks = ActivationMatchingMask(bundled_model, [LAYER]).fit(
            (x, y), epochs=1, batch_size=20, progress=False, seed=0
        )
        head = IntrospectiveNetwork(bundled_model, layer="classifier", hidden_width=16)
        head.fit(x, y, epochs=1, batch_size=20, progress=False, seed=0)
        inversion = NetworkInversion(bundled_model, batch_size=4, seed=0)
        inversion.fit(1, progress=False)
        return (
            masks.attribute(x[:2], target=y[:2], progress=False),
            head(x[:4]),
            torch.tensor(inversion.history["loss"]),
        )

    expected = train_all()
    with context():
        inside = train_all()
    assert torch.is_grad_enabled()
    for got, reference in zip(inside, expected, strict=True):
        torch.testing.assert_close(got, reference)


class _Scaled(torch.nn.Module):
    """A model with a second, per-example tensor argument (a temperature)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, scale):
        return self.model(x) * scale


ARGUMENT_CALLS = {
    "Contrastive contrast": lambda m, x, t: Contrastive(Saliency(m)).attribute(x, contrast=t["q"]),
    "Contrastive additional_forward_args": lambda m, x, t: Contrastive(
        Saliency(_Scaled(m))
    ).attribute(x, contrast=1, additional_forward_args=(t["scale"],)),
    "Contrastive baselines": lambda m, x, t: Contrastive(IntegratedGradients(m)).attribute(
        x, contrast=1, baselines=t["black"], n_steps=4
    ),
    "PathwayGradient target": lambda m, x, t: PathwayGradient(m).attribute(x, target=t["p"]),
    "PathwayGradient integrated target": lambda m, x, t: PathwayGradient(m).attribute(
        x, target=t["p"], score="integrated", n_steps=3
    ),
    "CircuitReadout target": lambda m, x, t: torch.tensor(
        sorted(
            weight
            for graph in CircuitReadout(m, gradient=True).readout(x[:2], target=t["p"][:2])
            for *_, weight in graph.edges(data="weight")
        )
    ),
    "ActivationMatchingMask baseline": lambda m, x, t: ActivationMatchingMask(
        m, [LAYER], baseline=t["black"]
    ).attribute(x[:2], target=t["p"][:2], mode="per_image", steps=3, seed=0, progress=False),
}


@pytest.mark.parametrize("name", list(ARGUMENT_CALLS))
def test_other_arguments_made_in_inference_mode(name, bundled_model, sample_digits):
    """A serving pipeline's predictions, temperatures and baselines are inference tensors too:
    passed as target / contrast / additional_forward_args / baselines they gave "Inference
    tensors cannot be saved for backward" from inside the backward."""
    x = sample_digits[0][:4]
    with torch.no_grad():
        logits = bundled_model(x)
    normal = {
        "p": logits.argmax(1),
        "q": logits.topk(2, 1).indices[:, 1],
        "scale": torch.full((4, 1), 1.5),
        "black": torch.full((1, 1, 28, 28), -0.4242),
    }
    with torch.inference_mode():
        made_there = {key: value.clone() for key, value in normal.items()}
    assert all(value.is_inference() for value in made_there.values())
    expected = ARGUMENT_CALLS[name](bundled_model, x, normal)
    torch.testing.assert_close(ARGUMENT_CALLS[name](bundled_model, x, made_there), expected)
    with torch.inference_mode():  # the call inside the block as well
        inside = ARGUMENT_CALLS[name](bundled_model, x, made_there)
    torch.testing.assert_close(inside, expected)


def test_a_model_loaded_inside_inference_mode(bundled_model, sample_digits):
    """A model loaded in a serving block has inference-tensor parameters. The mask
    explainer loaded there raised "Setting requires_grad=True on inference tensor outside
    InferenceMode" while restoring its classifier, and left 8 of its 34 parameters frozen;
    gradient methods failed with torch's "Inference tensors cannot be saved for backward",
    which does not say that the parameters are the cause."""
    from captum_ext.bundled import load_bundled_mask_explainer, load_bundled_model

    x, y = sample_digits[0][:4], sample_digits[1][:4]
    expected = load_bundled_mask_explainer().attribute(x, target=y, progress=False)
    with torch.inference_mode():
        explainer = load_bundled_mask_explainer()
        model = load_bundled_model()
    held = [
        p
        for module in vars(explainer).values()
        if isinstance(module, torch.nn.Module)
        for p in module.parameters()
    ]
    assert held and all(p.is_inference() and p.requires_grad for p in held)
    torch.testing.assert_close(explainer.attribute(x, target=y, progress=False), expected)
    assert all(p.requires_grad for p in held)
    with pytest.raises(ValueError, match="parameters are inference tensors"):
        GradCAM(model, LAYER).attribute(x, target=y)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()
