"""The user's own weight machinery and hooks: pruned (``torch.nn.utils.prune``) and weight-
normalised layers (legacy hooks and ``torch.nn.utils.parametrize``), and the user's hooks.

- ``model_randomisation`` re-initialised a pruned layer's computed ``weight``, which the
  pruning pre-hook overwrote from the trained ``weight_orig`` on the next forward pass (only
  the bias changed; Spearman stayed 1.0). It now randomises as the folded layer would.
- ``gradtrust(layer=...)`` (and the other per-example gradient scores) differentiated the
  computed ``weight`` that the pre-hook replaced: gradients 0, every score NaN. They are now
  the scores of the same model with the weight folded.
- ``gradtrust(layer=...)``, ``layer="all"`` and ``purview`` ran the user's hooks inside
  ``vmap`` / ``vjp``: a forward hook storing ``o.detach()`` (or a tensor hook registered in
  ``forward``) kept a torch.func wrapper that could not be used after the call. The hooks
  now see plain tensors.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _helpers import make_tiny_cnn
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

from captum_ext._utils.legacy_norms import copied_model
from captum_ext.attr import GradCAM
from captum_ext.introspection import introspective_features
from captum_ext.metrics import gradnorm, gradtrust, model_randomisation, purview
from captum_ext.metrics.sanity import _reset_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ("features.0", "features.3", "features.6", "classifier")


def _is_wrapped(tensor: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _state(model: nn.Module) -> dict:
    """What must come back unchanged: parameters and buffers (objects and values), hooks,
    flags, and every tensor a module holds as a plain attribute (a pruned ``weight``)."""
    return {
        "params": {
            k: (p, p.detach().clone(), p.requires_grad) for k, p in model.named_parameters()
        },
        "buffers": {k: (b, b.detach().clone()) for k, b in model.named_buffers()},
        "hooks": {
            k: (
                list(m._forward_hooks.items()),
                list(m._forward_pre_hooks.items()),
                list(m._backward_hooks.items()),
                list(m._backward_pre_hooks.items()),
            )
            for k, m in model.named_modules()
        },
        "training": {k: m.training for k, m in model.named_modules()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert set(after["params"]) == set(before["params"])
    for k, (p, value, flag) in before["params"].items():
        q, new, new_flag = after["params"][k]
        assert q is p and torch.equal(new, value) and new_flag == flag, k
    for k, (b, value) in before["buffers"].items():
        c, new = after["buffers"][k]
        assert c is b and torch.equal(new, value), k
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                assert not _is_wrapped(value), f"{name}.{key} holds a torch.func wrapper"


@pytest.fixture
def digits(sample_digits):
    return sample_digits[0][:5]


# ------------------------------------------------------------------ 1. model_randomisation


def _pruned(base: nn.Module, how: str) -> nn.Module:
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    if how == "identity":
        for name in LAYERS:
            prune.identity(modules[name], "weight")
    elif how == "mixed":
        prune.l1_unstructured(modules["classifier"], "weight", amount=0.3)
        prune.random_unstructured(modules["classifier"], "bias", amount=0.4)
        prune.l1_unstructured(modules["classifier"], "weight", amount=0.2)  # a container
        prune.ln_structured(modules["features.6"], "weight", amount=0.25, n=2, dim=0)
        prune.global_unstructured(
            [(modules["features.3"], "weight"), (modules["features.0"], "weight")],
            pruning_method=prune.L1Unstructured,
            amount=0.3,
        )
    return model


def _folded(pruned: nn.Module) -> nn.Module:
    """The same model with every pruned tensor folded into a plain parameter
    (``prune.remove``), built from a copy of the pruned model's state."""
    folded = copied_model(pruned)  # (deepcopy refuses the computed tensors' history)
    for module in folded.modules():
        for hook in [h for h in module._forward_pre_hooks.values()]:
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return folded


@pytest.mark.parametrize("how", ["identity", "mixed"])
def test_model_randomisation_randomises_pruned_layers_as_the_folded_model(
    fresh_bundled_model, digits, how
):
    """At every step of the cascade the pruned copy's ``<name>_orig`` holds exactly what the
    folded model's ``<name>`` is re-initialised to (same seed), its masks are kept and its
    forward pass uses ``<name>_orig * <name>_mask``. With identity masks the curves are the
    folded model's; with real masks they fall well below 1 (they stayed at 1.0)."""
    pruned = _pruned(fresh_bundled_model, how)
    folded = _folded(pruned)
    with torch.no_grad():
        torch.testing.assert_close(pruned(digits), folded(digits))
    masks = {k: b.clone() for k, b in pruned.named_buffers() if k.endswith("_mask")}
    assert masks
    before = _state(pruned)
    before_orig = {k: p.detach().clone() for k, p in pruned.named_parameters()}

    def recording(store):
        def explainer(model):
            store.append({k: t.detach().clone() for k, t in model.state_dict().items()})
            return GradCAM(model, "features.7")

        return explainer

    seen_pruned, seen_folded = [], []
    order = list(reversed(LAYERS))
    kwargs = dict(layers=order, similarity="spearman_abs", seed=3)
    got = model_randomisation(recording(seen_pruned), pruned, digits, **kwargs)
    expected = model_randomisation(recording(seen_folded), folded, digits, **kwargs)
    _assert_unchanged(pruned, before)
    assert len(seen_pruned) == len(seen_folded) == len(LAYERS) + 1
    for step, (p_state, f_state) in enumerate(zip(seen_pruned, seen_folded)):
        randomised = order[:step]  # the cascade, from the top
        for name, value in f_state.items():
            if name + "_mask" not in masks:
                torch.testing.assert_close(p_state[name], value, rtol=0, atol=0)
                continue
            assert torch.equal(p_state[name + "_mask"], masks[name + "_mask"])
            if name.rpartition(".")[0] in randomised:  # drawn as the folded layer's
                torch.testing.assert_close(p_state[name + "_orig"], value, rtol=0, atol=0)
                assert not torch.equal(p_state[name + "_orig"], before_orig[name + "_orig"])
            else:  # trained: its effective tensor is the folded one
                effective = p_state[name + "_orig"] * p_state[name + "_mask"]
                torch.testing.assert_close(effective, value, rtol=0, atol=0)
    if how == "identity":
        torch.testing.assert_close(
            got.similarity["spearman_abs"], expected.similarity["spearman_abs"]
        )
    else:
        assert bool((got.similarity["spearman_abs"].mean(1) < 0.9).all())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_reset_of_a_pruned_layer_uses_the_new_weight_in_its_forward_pass(kind):
    """The re-initialised layer computes with ``new_weight * mask`` (weight and bias pruned),
    not with its trained weight."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4) if kind == "linear" else nn.Conv2d(2, 3, 3)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    prune.l1_unstructured(layer, "bias", amount=0.5)
    plain = copied_model(layer)
    prune.remove(plain, "weight")
    prune.remove(plain, "bias")
    x = torch.randn(2, 6) if kind == "linear" else torch.randn(2, 2, 5, 5)
    trained = layer.weight_orig.detach().clone()
    torch.manual_seed(7)
    _reset_parameters(layer)
    assert not torch.equal(layer.weight_orig, trained)
    torch.manual_seed(7)
    _reset_parameters(plain)
    with torch.no_grad():
        masked = copy.deepcopy(plain)
        masked.weight.mul_(layer.weight_mask)
        masked.bias.mul_(layer.bias_mask)
        torch.testing.assert_close(layer(x), masked(x), rtol=0, atol=0)
    torch.testing.assert_close(layer.weight_orig, plain.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias_orig, plain.bias, rtol=0, atol=0)


# ------------------------------------------------------------------ 2. computed weights


def _with_computed_weight(base: nn.Module, kind: str, layer: str) -> tuple[nn.Module, nn.Module]:
    """(a model whose ``layer`` computes its weight, the same model with it folded)."""
    model, folded = copy.deepcopy(base), copy.deepcopy(base)
    module, twin = model.get_submodule(layer), folded.get_submodule(layer)
    if kind.startswith("prune"):
        if kind == "prune_identity":
            prune.identity(module, "weight")
        else:
            prune.l1_unstructured(module, "weight", amount=0.3)
            prune.l1_unstructured(module, "bias", amount=0.3)
        for name in ("weight", "bias"):
            mask = getattr(module, name + "_mask", None)
            if mask is not None:
                with torch.no_grad():
                    getattr(twin, name).mul_(mask)
    elif kind in ("legacy_weight_norm", "legacy_spectral_norm"):
        norm = getattr(torch.nn.utils, kind.removeprefix("legacy_"))
        with warnings.catch_warnings():  # (weight_norm's deprecation: the point here)
            warnings.simplefilter("ignore", FutureWarning)
            norm(module)
            norm(twin)
        twin.load_state_dict(module.state_dict())
        getattr(torch.nn.utils, "remove_" + kind.removeprefix("legacy_"))(twin)
    else:  # torch.nn.utils.parametrize (each model its own parametrised class)
        getattr(parametrizations, kind)(module)
        getattr(parametrizations, kind)(twin)
        twin.load_state_dict(module.state_dict())
        parametrize.remove_parametrizations(twin, "weight")
    return model, folded


KINDS = [
    "prune_identity",
    "prune_l1",
    "legacy_weight_norm",
    "legacy_spectral_norm",
    "weight_norm",
    "spectral_norm",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", ["features.6", "classifier"])
def test_gradtrust_at_a_layer_computing_its_weight_is_the_folded_models(
    fresh_bundled_model, digits, kind, layer
):
    """The gradient is taken with respect to the weight the forward pass uses: the scores
    equal those of the same model with the weight folded (they were all NaN, with a warning
    that the gradients vanish)."""
    model, folded = _with_computed_weight(fresh_bundled_model, kind, layer)
    before = _state(model)
    for form in ("topk", "reference"):
        got = gradtrust(model, digits, layer=layer, method="autograd", form=form, log=True)
        expected = gradtrust(folded, digits, layer=layer, method="autograd", form=form, log=True)
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    _assert_unchanged(model, before)
    if kind.startswith("prune"):  # the layer still computes its weight from weight_orig
        module = model.get_submodule(layer)
        with torch.no_grad():
            model(digits[:1])
        torch.testing.assert_close(module.weight, module.weight_orig * module.weight_mask)


@pytest.mark.parametrize("kind", ["prune_l1", "legacy_weight_norm", "weight_norm"])
def test_gradnorm_and_introspective_features_at_a_layer_computing_its_weight(
    fresh_bundled_model, digits, kind
):
    """The other per-example gradient scores go through the same engine."""
    model, folded = _with_computed_weight(fresh_bundled_model, kind, "features.6")
    torch.testing.assert_close(
        gradnorm(model, digits, layer="features.6"),
        gradnorm(folded, digits, layer="features.6"),
        rtol=1e-5,
        atol=1e-7,
    )
    torch.testing.assert_close(
        introspective_features(model, digits, layer="features.6"),
        introspective_features(folded, digits, layer="features.6"),
        rtol=1e-4,
        atol=1e-6,
    )


class _TwiceShared(nn.Module):
    """One pruned linear layer applied twice (its gradient is the sum over both calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_a_pruned_layer_called_twice_sums_the_gradients_of_both_calls():
    torch.manual_seed(0)
    model = _TwiceShared().double().eval()
    folded = copy.deepcopy(model)
    prune.random_unstructured(model.inner, "weight", amount=0.4)
    with torch.no_grad():
        folded.inner.weight.mul_(model.inner.weight_mask)
    x = torch.randn(6, 4, dtype=torch.float64)
    got = gradtrust(model, x, layer="inner", k=2, log=True)
    torch.testing.assert_close(got, gradtrust(folded, x, layer="inner", k=2, log=True))


# ------------------------------------------------------------------ 3. the user's hooks

CALLS = {
    "layer": lambda m, x: gradtrust(m, x, layer="features.6", log=True),
    "all": lambda m, x: gradtrust(m, x, layer="all", log=True),
    "purview": lambda m, x: purview(m, x),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_users_forward_hook_holds_a_plain_tensor_afterwards(fresh_bundled_model, digits, call):
    """The stored activations are those of a plain forward pass (of the last example, run
    alone), usable after the call; the scores are those of the model without the hook."""
    model = fresh_bundled_model
    expected = CALLS[call](copy.deepcopy(model), digits)
    stored = {}
    model.features[7].register_forward_hook(lambda m, i, o: stored.__setitem__("o", o.detach()))
    before = _state(model)
    got = CALLS[call](model, digits)
    _assert_unchanged(model, before)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    out = stored["o"]
    assert not _is_wrapped(out)
    with torch.no_grad():
        plain = model.features(digits[-1:])
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("where", ["backward", "global_forward"])
def test_a_users_backward_or_global_hook_holds_plain_tensors(fresh_bundled_model, digits, where):
    model = fresh_bundled_model
    expected = gradtrust(copy.deepcopy(model), digits, layer="features.6", log=True)
    stored = []
    if where == "backward":
        handle = model.features[7].register_full_backward_hook(
            lambda m, gi, go: stored.append(go[0].detach())
        )
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: stored.append(o.detach()) if m is model.features[7] else None
        )
    try:
        got = gradtrust(model, digits, layer="features.6", log=True)
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert stored and not any(_is_wrapped(t) for t in stored)
    assert all(bool(torch.isfinite(t).all()) for t in stored)


class _GradientKeeper(nn.Module):
    """The bundled model, keeping the gradient at its features through a tensor hook that
    its forward registers (as a Grad-CAM written by hand does)."""

    def __init__(self, inner: nn.Module, keep: bool = True) -> None:
        super().__init__()
        self.inner = inner
        self.keep = keep
        self.grads: list[torch.Tensor] = []

    def tail(self, a):
        i = self.inner
        return i.classifier(i.dropout(i.flatten(i.pool(a))))

    def forward(self, x):
        a = self.inner.features(x)
        if a.requires_grad and self.keep:
            a.register_hook(self.grads.append)
        return self.tail(a)


KEEPER_CALLS = {
    "layer": lambda m, x: gradtrust(m, x, layer="inner.features.6", log=True),
    "purview": lambda m, x: purview(m, x),
}


@pytest.mark.parametrize("call", list(KEEPER_CALLS))
def test_a_tensor_hook_registered_in_forward_gets_plain_gradients(
    fresh_bundled_model, digits, call
):
    """The hook receives, for the last example, the gradient of <cotangent, logits> at the
    features: for purview (one cotangent, sigmoid(z) - 1 over C) checked against autograd.
    The scores are those of the model without the hook."""
    model = _GradientKeeper(fresh_bundled_model)
    expected = KEEPER_CALLS[call](
        _GradientKeeper(copy.deepcopy(fresh_bundled_model), keep=False), digits
    )
    got = KEEPER_CALLS[call](model, digits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert model.grads and not any(_is_wrapped(g) for g in model.grads)
    last = model.grads[-1]
    assert bool(torch.isfinite(last.sum()))
    if call == "purview":
        a = fresh_bundled_model.features(digits[-1:]).detach().requires_grad_(True)
        logits = model.tail(a)
        cotangent = (torch.sigmoid(logits) - 1).detach() / logits.shape[1]
        (grad,) = torch.autograd.grad(logits, a, cotangent)
        torch.testing.assert_close(last, grad, rtol=1e-5, atol=1e-8)


def test_the_packages_own_hooks_keep_the_batched_path(monkeypatch, fresh_bundled_model, digits):
    """Without hooks of the user's (a hidden model behind a lambda: the package's own global
    hook that restores its buffers is active) the batched torch.func path runs, not the
    loop."""
    import captum_ext._utils.batched_grad as engine

    calls = []
    loop = engine._per_example_by_loop
    monkeypatch.setattr(
        engine, "_per_example_by_loop", lambda *a, **k: calls.append(1) or loop(*a, **k)
    )
    model = fresh_bundled_model
    gradtrust(model, digits, layer="features.6")
    gradtrust(model, digits, layer="all")
    purview(model, digits)
    gradtrust(lambda t: model(t), digits, layer=model.features[6])
    tiny = make_tiny_cnn().eval()
    prune.identity(tiny.features[0], "weight")  # pruning hooks are not the user's either
    gradtrust(tiny, torch.randn(3, 3, 6, 6, dtype=torch.float64), layer="all")
    assert not calls
