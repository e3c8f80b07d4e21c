"""Serving code runs under ``torch.inference_mode()``, and so do many preprocessing pipelines.

Before: a batch made in inference mode failed deep inside the backward ("Inference tensors
cannot be saved for backward"), and a method called inside an inference-mode block said that
the model's output "does not depend on the differentiated tensors" (``enable_grad`` does not
undo inference mode), or failed in LayerIBA's hooks or the sanity checks' copied model. Every
result below must equal the one computed outside inference mode.
"""

from __future__ import annotations

from collections import namedtuple

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
from captum_ext.introspection import introspective_features
from captum_ext.metrics import (
    GradTrust,
    completeness,
    deletion,
    gradnorm,
    gradtrust,
    model_randomisation,
)

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


INNER_LAYER = "features.6"  # a layer before the classifier: per-example autograd (torch.func)

PER_EXAMPLE_CALLS = {
    "gradtrust": lambda m, x: gradtrust(m, x, layer=INNER_LAYER),
    "gradtrust, autograd": lambda m, x: gradtrust(m, x, layer=INNER_LAYER, method="autograd"),
    "GradTrust.score": lambda m, x: GradTrust(m, layer="features.3").score(x),
    "gradnorm": lambda m, x: gradnorm(m, x, layer=INNER_LAYER),
    "introspective_features": lambda m, x: introspective_features(m, x, layer=INNER_LAYER),
}

GRADIENTS_BACK_ON = {
    "enable_grad": torch.enable_grad,
    "set_grad_enabled(True)": lambda: torch.set_grad_enabled(True),
}


@pytest.mark.parametrize("switch", list(GRADIENTS_BACK_ON))
@pytest.mark.parametrize("name", list(PER_EXAMPLE_CALLS))
def test_per_example_gradients_inside_inference_mode_with_gradients_enabled(
    name, switch, bundled_model, sample_digits
):
    """``torch.enable_grad()`` inside an inference-mode block: the cotangents of the
    per-example gradients are built from logits computed there (inference tensors), and the
    backward pass of ``vjp`` under ``vmap`` saves them where gradients are on. Before, every
    score of an inner layer raised "Inference tensors cannot be saved for backward" from
    inside torch; the scores are those of the call outside inference mode."""
    x = sample_digits[0][:4]
    call = PER_EXAMPLE_CALLS[name]
    expected = call(bundled_model, x)
    assert expected.abs().sum() > 0
    with torch.inference_mode(), GRADIENTS_BACK_ON[switch]():
        inside = call(bundled_model, x)
    torch.testing.assert_close(inside, expected)


def test_introspective_network_fit_inside_inference_mode_with_gradients_enabled(
    bundled_model, sample_digits
):
    """An introspective head on an inner layer trained inside ``inference_mode`` +
    ``enable_grad`` (its features are per-example gradients): same seed, same head as
    outside. Before: "Inference tensors cannot be saved for backward"."""
    from captum_ext.introspection import IntrospectiveNetwork

    x, y = sample_digits

    def fit():
        head = IntrospectiveNetwork(bundled_model, layer=INNER_LAYER, hidden_width=8)
        head.fit(x, y, epochs=1, batch_size=20, progress=False, seed=0)
        return head(x[:4])

    expected = fit()
    with torch.inference_mode(), torch.enable_grad():
        inside = fit()
    torch.testing.assert_close(inside, expected)


class _Checkpointed(torch.nn.Module):
    """The bundled model run under activation checkpointing (torch.func refuses it: the
    per-example gradients are computed one example at a time)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.model, x, use_reentrant=False)


@pytest.mark.filterwarnings("ignore:per-example gradients run one example at a time")
@pytest.mark.parametrize("gradients", [False, True], ids=["inference_mode", "+enable_grad"])
def test_checkpointed_model_inside_inference_mode(gradients, bundled_model, sample_digits):
    """Activation checkpointing saves the inputs of its forward pass for the backward pass,
    whatever the grad mode: inside inference mode those were inference tensors, and the
    score of an inner layer raised "Inference tensors cannot be saved for backward" (even
    without ``enable_grad``). The per-example gradients now run outside inference mode."""
    x = sample_digits[0][:4]
    model = _Checkpointed(bundled_model)
    expected = gradtrust(model, x, layer=bundled_model.features[6])
    with torch.inference_mode(), torch.set_grad_enabled(gradients):
        inside = gradtrust(model, x, layer=bundled_model.features[6])
    torch.testing.assert_close(inside, expected)


def test_model_loaded_inside_inference_mode_keeps_its_inner_layer_scores(sample_digits):
    """A model with inference-tensor parameters can only be run inside inference mode: the
    per-example gradients stay in the caller's mode there (as before), with or without
    ``enable_grad``, and equal those of the same model loaded normally."""
    from captum_ext.bundled import load_bundled_model

    x = sample_digits[0][:4]
    expected = gradtrust(load_bundled_model(), x, layer=INNER_LAYER)
    with torch.inference_mode():
        model = load_bundled_model()
        plain = gradtrust(model, x, layer=INNER_LAYER)
        with torch.enable_grad():
            with_gradients = gradtrust(model, x, layer=INNER_LAYER)
    torch.testing.assert_close(plain, expected)
    torch.testing.assert_close(with_gradients, expected)


@pytest.mark.parametrize(
    "hooks",
    [
        torch.autograd.graph.save_on_cpu,
        lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
    ],
    ids=["save_on_cpu", "saved_tensors_hooks"],
)
def test_warning_under_the_callers_saved_tensor_hooks_names_them(
    hooks, bundled_model, sample_digits
):
    """torch.func refuses saved-tensor hooks, so inside the caller's ``save_on_cpu()`` /
    ``saved_tensors_hooks(...)`` block the per-example gradients run one example at a time
    (same scores). The warning blamed "this model" and activation checkpointing; it names
    the caller's block and says that a call outside it is batched."""
    x = sample_digits[0][:4]
    expected = gradtrust(bundled_model, x, layer=INNER_LAYER)
    with pytest.warns(RuntimeWarning, match="one example at a time") as caught, hooks():
        inside = gradtrust(bundled_model, x, layer=INNER_LAYER)
    torch.testing.assert_close(inside, expected)
    message = " ".join(str(w.message) for w in caught if "one example" in str(w.message))
    assert "save_on_cpu() or saved_tensors_hooks(...) block" in message
    assert "outside that block" in message
    assert "this model" not in message and "checkpointing" not in message


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
def test_warning_for_a_checkpointed_model_still_names_checkpointing(bundled_model, sample_digits):
    """Activation checkpointing inside the model gives torch.func's same refusal of
    saved-tensor hooks, but no block of the caller's is active: the warning keeps naming
    checkpointing, not a save_on_cpu block."""
    x = sample_digits[0][:4]
    with pytest.warns(RuntimeWarning, match="one example at a time") as caught:
        gradtrust(_Checkpointed(bundled_model), x, layer=bundled_model.features[6])
    message = " ".join(str(w.message) for w in caught if "one example" in str(w.message))
    assert "checkpointing" in message and "save_on_cpu" not in message


_Options = namedtuple("_Options", "scale shift")


class _WithOptions(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 6)

    def forward(self, x, options):
        return self.b(torch.relu(self.a(x * options.scale + options.shift)))


@pytest.mark.parametrize("inside", [False, True], ids=["plain", "inference_mode+enable_grad"])
def test_a_named_tuple_in_additional_forward_args_reaches_the_model(inside):
    """Leaving inference mode rebuilt every container of ``additional_forward_args`` by its
    type, which a named tuple refuses ("missing 1 required positional argument")."""
    torch.manual_seed(0)
    model = _WithOptions().eval()
    x = torch.rand(3, 4)
    options = _Options(2.0, torch.tensor(0.5))
    expected = gradtrust(model, x, layer="a", additional_forward_args=(options,))
    if inside:
        with torch.inference_mode(), torch.enable_grad():
            options = _Options(2.0, torch.tensor(0.5))  # an inference tensor inside
            got = gradtrust(model, x, layer="a", additional_forward_args=(options,))
    else:
        got = gradtrust(model, x, layer="a", additional_forward_args=(options,))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
