"""Models compiled with ``torch.compile`` (a wrapper) or ``model.compile()`` (in place).

Users compile for speed and then explain the same object. Compiled graphs do not take the
per-example gradients' ``vmap`` (VOICE failed with "vmap: aten::copy_ ... not possible" from
inside the compiled backward), the wrapper's module names carry an ``_orig_mod.`` prefix
(``GradCAM(m, "features.6")`` inside ``model_randomisation`` was refused), and torch warned
about our global hook on every call. Methods now run the eager module behind the compiled
one; these tests compare every result with the eager model's. The ``aot_eager`` backend
traces and compiles autograd like the default backend, without a C++ compiler, so the tests
are fast; the default backend was checked by hand on the same calls.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from captum_ext.attr import VOICE, ActivationMatchingMask, GradCAM, LayerIBA
from captum_ext.circuits import CircuitReadout
from captum_ext.metrics import class_sensitivity, gradtrust, model_randomisation

pytestmark = pytest.mark.filterwarnings("error::UserWarning")

LAYER = "features.7"


@pytest.fixture(params=["wrapper", "in_place"])
def compiled(request, fresh_bundled_model):
    """(compiled model, its eager twin): the wrapper around the model itself, or a copy of
    the model compiled in place."""
    eager = fresh_bundled_model
    if request.param == "wrapper":
        return torch.compile(eager, backend="aot_eager"), eager
    twin = copy.deepcopy(eager)
    twin.compile(backend="aot_eager")
    return twin, eager


def _layer(model: torch.nn.Module) -> torch.nn.Module:
    return (
        dict(model.named_modules()).get(LAYER) or dict(model.named_modules())["_orig_mod." + LAYER]
    )


def _assert_still_compiled(model: torch.nn.Module) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return
    assert model._compiled_call_impl is not None


def test_voice_on_a_compiled_model_equals_the_eager_one(compiled, sample_digits):
    model, eager = compiled
    x, y = sample_digits[0][:6], sample_digits[1][:6]
    result = VOICE(GradCAM(model, _layer(model))).attribute(x, target=y)
    expected = VOICE(GradCAM(eager, _layer(eager))).attribute(x, target=y)
    assert expected.uncertainty.flatten(1).amax(dim=1).gt(0).all()
    torch.testing.assert_close(result.uncertainty, expected.uncertainty)
    torch.testing.assert_close(result.explanation, expected.explanation)
    _assert_still_compiled(model)
    torch.testing.assert_close(model(x), eager(x))  # the compiled model still runs


def test_compiled_names_and_eager_names_give_the_same_layer(fresh_bundled_model, sample_digits):
    eager = fresh_bundled_model
    wrapped = torch.compile(eager, backend="aot_eager")
    x, y = sample_digits[0][:4], sample_digits[1][:4]
    expected = GradCAM(eager, LAYER).attribute(x, target=y)
    assert expected.abs().amin(dim=(1, 2, 3)).lt(expected.abs().amax(dim=(1, 2, 3))).all()
    for name in (LAYER, "_orig_mod." + LAYER):
        torch.testing.assert_close(GradCAM(wrapped, name).attribute(x, target=y), expected)
    with pytest.raises(ValueError, match="'_orig_mod.features.60' is not a module"):
        GradCAM(wrapped, "_orig_mod.features.60")


def test_sanity_checks_take_compiled_models_and_names(compiled, sample_digits):
    model, eager = compiled
    x, y = sample_digits[0][:4], sample_digits[1][:4]

    def explainer(m):
        return GradCAM(m, LAYER)

    layers = ["classifier", "features.6"]
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        layers = ["_orig_mod." + name for name in layers]  # as model.named_modules() names them
    curves = model_randomisation(explainer, model, x, target=y, layers=layers)
    expected = model_randomisation(
        explainer, eager, x, target=y, layers=["classifier", "features.6"]
    )
    assert curves.layers == expected.layers == ["classifier", "features.6"]
    for measure, values in expected.similarity.items():
        torch.testing.assert_close(curves.similarity[measure], values)
    sensitivity = class_sensitivity(explainer, model, x, target=y)
    for measure, values in class_sensitivity(explainer, eager, x, target=y).similarity.items():
        torch.testing.assert_close(sensitivity.similarity[measure], values)
    _assert_still_compiled(model)


def test_trust_masks_and_circuits_on_a_compiled_model(compiled, sample_digits):
    model, eager = compiled
    x, y = sample_digits[0][:4], sample_digits[1][:4]
    for layer in (None, "all"):
        torch.testing.assert_close(
            gradtrust(model, x, layer=layer), gradtrust(eager, x, layer=layer)
        )
    masks = ActivationMatchingMask(model, [_layer(model)]).attribute(
        x[:2], target=y[:2], mode="per_image", steps=5, seed=0, progress=False
    )
    expected = ActivationMatchingMask(eager, [_layer(eager)]).attribute(
        x[:2], target=y[:2], mode="per_image", steps=5, seed=0, progress=False
    )
    torch.testing.assert_close(masks, expected)
    readout, reference = CircuitReadout(model), CircuitReadout(eager)
    assert readout.stages == reference.stages  # eager names, no "_orig_mod." prefix
    for graph, expected_graph in zip(
        readout.readout(x[:2], target=y[:2]), reference.readout(x[:2], target=y[:2]), strict=True
    ):
        assert sorted(graph.edges) == sorted(expected_graph.edges)
        for edge in expected_graph.edges:
            assert graph.edges[edge] == pytest.approx(expected_graph.edges[edge])
    _assert_still_compiled(model)


def test_layer_iba_on_a_compiled_model(compiled, sample_digits):
    model, eager = compiled
    x, y = sample_digits
    maps = []
    for m in (model, eager):
        iba = LayerIBA(m, _layer(m))
        iba.estimate(x)
        torch.manual_seed(0)
        maps.append(iba.attribute(x[:3], target=y[:3]))
    torch.testing.assert_close(maps[0], maps[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x[:1])
    _assert_still_compiled(model)


def test_inversion_and_tie_take_a_compiled_model(fresh_bundled_model):
    """TIE extends the classifier by a garbage class: on the wrapper it found no linear layer
    (its hooks did not fire inside the compiled graph) and refused the model."""
    from captum_ext.inversion import TIE, NetworkInversion

    eager = fresh_bundled_model
    wrapped = torch.compile(eager, backend="aot_eager")
    tie, reference = TIE(wrapped, input_shape=(1, 28, 28)), TIE(eager, input_shape=(1, 28, 28))
    assert tie.head_name == reference.head_name == "classifier"
    state, expected = tie.model.state_dict(), reference.model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)
    inversions = [NetworkInversion(m, batch_size=8, seed=0) for m in (wrapped, eager)]
    for inversion in inversions:
        inversion.fit(2, progress=False)
    torch.testing.assert_close(
        torch.tensor(inversions[0].history["loss"]), torch.tensor(inversions[1].history["loss"])
    )
