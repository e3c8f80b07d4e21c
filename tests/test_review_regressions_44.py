"""Regressions of the user-hook and sigmoid-output fixes (review 44).

- A user's forward hook sent per-example gradients down the plain-autograd loop, which
  differentiated the real ``nn.Parameter`` objects: a tensor hook the user registered on a
  parameter (``weight.register_hook(lambda g: g * 0)``) changed the scores (all NaN at
  ``features.6``). The vmap path never runs such hooks; the loop now differentiates leaf
  copies swapped in for the parameters, so both paths agree.
- A model hidden behind a plain function (``lambda x: model(x)``): its modules' hooks were
  not looked at, and a forward hook elsewhere in the model kept torch.func wrappers.
- A pruning method the user defined (a ``prune.BasePruningMethod`` subclass) was taken for
  a user hook, forcing the slow path.
- ``two_class_logits`` read its output's values (a ``bool`` on data), which broke
  ``torch.export`` and ``torch.compile(fullgraph=True)`` of ``lambda x:
  two_class_logits(model(x))``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import captum_ext._utils.batched_grad as engine
from captum_ext.data import LogitsOutput, two_class_logits
from captum_ext.data.loading import SIGMOID_OUTPUT_WARNING
from captum_ext.metrics import gradtrust

pytestmark = pytest.mark.usefixtures("one_thread")


def _is_wrapped(tensor: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


@pytest.fixture
def digits(sample_digits):
    return sample_digits[0][:4]


@pytest.fixture
def loop_calls(monkeypatch):
    calls = []
    loop = engine._per_example_by_loop
    monkeypatch.setattr(
        engine, "_per_example_by_loop", lambda *a, **k: calls.append(1) or loop(*a, **k)
    )
    return calls


def _global_hooks() -> list:
    module = torch.nn.modules.module
    return [
        list(table)
        for table in (
            module._global_forward_hooks,
            module._global_forward_pre_hooks,
            module._global_backward_hooks,
            module._global_backward_pre_hooks,
        )
    ]


# ------------------------------------------------------------ 1. hooks on parameters


@pytest.mark.parametrize("layer", ["features.6", "all"])
def test_a_parameter_hook_changes_no_score_on_the_loop_path(
    fresh_bundled_model, digits, loop_calls, layer
):
    """A zeroing gradient hook on a parameter and a harmless forward hook elsewhere (which
    sends the gradients down the loop): the scores are the plain model's, the parameter
    hook never runs, and the parameters come back as they were."""
    model = fresh_bundled_model
    expected = gradtrust(copy.deepcopy(model), digits, layer=layer, method="autograd")
    ran = []
    weight = model.features[6].weight
    weight.register_hook(lambda g: ran.append(1) or g * 0)
    model.features[0].register_forward_hook(lambda m, i, o: None)
    params = {k: (p, p.detach().clone(), p.requires_grad) for k, p in model.named_parameters()}
    got = gradtrust(model, digits, layer=layer, method="autograd")
    assert loop_calls, "the forward hook should take the loop path"
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not ran
    for k, p in model.named_parameters():
        q, value, flag = params[k]
        assert p is q and torch.equal(p, value) and p.requires_grad == flag, k
    assert model.features[6].weight is weight and weight.grad is None


class _TiedHeads(nn.Module):
    """Two layers sharing one weight (tied, as an embedding and its output layer): the
    gradient sums both uses, on both paths."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        self.other = nn.Linear(6, 3, bias=False)
        self.other.weight = self.body[2].weight

    def forward(self, x):
        h = self.body[1](self.body[0](x))
        return self.body[2](h) + self.other(h * h)


def _per_example_weight_gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    cot = torch.randn(x.shape[0], 2, 3, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    layer = model.body[2]
    return engine.per_example_parameter_gradients(
        model, (x,), (), {"m": layer}, {"m.weight": layer.weight}, cot,
        lambda grads: grads["m.weight"].flatten(1),
    )  # fmt: skip


def test_a_tied_weight_on_the_loop_path(loop_calls):
    """The per-example gradients of a tied weight sum both of its uses on the loop path, as
    under vmap (``functional_call`` ties them); a hook on it changes nothing."""
    torch.manual_seed(0)
    model = _TiedHeads().double().eval()
    x = torch.randn(5, 5, dtype=torch.float64)
    expected = _per_example_weight_gradients(copy.deepcopy(model), x)
    untied = copy.deepcopy(model)
    untied.other.weight = nn.Parameter(untied.other.weight.detach().clone())
    assert not torch.allclose(_per_example_weight_gradients(untied, x), expected)
    assert not loop_calls
    model.body[0].register_forward_hook(lambda m, i, o: None)
    model.body[2].weight.register_hook(lambda g: g * 0)
    got = _per_example_weight_gradients(model, x)
    assert loop_calls
    torch.testing.assert_close(got, expected)
    assert model.other.weight is model.body[2].weight
    assert isinstance(model.other.weight, nn.Parameter)


# ---------------------------------------------------- 2. a model behind a plain function


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_a_hidden_models_hook_sees_plain_tensors(fresh_bundled_model, digits, loop_calls, kind):
    """``forward_func=lambda t: model(t)``: a hook of the user's on a module that is not the
    layer asked for sees plain tensors only (every call), usable after the call; the scores
    are those without the hook; torch's global hook tables come back as they were."""
    model = fresh_bundled_model
    expected = gradtrust(copy.deepcopy(model), digits, layer="features.6", method="autograd")
    seen = []
    if kind == "forward":
        model.features[4].register_forward_hook(lambda m, i, o: seen.append(o))
    else:
        model.features[4].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    before = _global_hooks()
    got = gradtrust(lambda t: model(t), digits, layer=model.features[6], method="autograd")
    assert _global_hooks() == before
    assert loop_calls
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert seen and not any(_is_wrapped(t) for t in seen)
    assert bool(torch.isfinite(seen[-1].sum()))


def test_a_hidden_model_without_hooks_keeps_the_batched_path(
    fresh_bundled_model, digits, loop_calls
):
    model = fresh_bundled_model
    gradtrust(lambda t: model(t), digits, layer=model.features[6])
    assert not loop_calls


class _Tolerant(nn.Module):
    """A forward that falls back to a cheaper answer on any error (``except Exception``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.inner(x)
        except Exception:  # a constant answer of the right shape
            return x.flatten(1)[:, :10] * 0


class _Rewrapping(nn.Module):
    """A forward that wraps any error in its own (``raise ... from e``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.inner(x)
        except Exception as error:
            raise RuntimeError(f"inference failed: {error!r}") from error


@pytest.mark.parametrize("wrapper", [_Tolerant, _Rewrapping])
def test_a_forward_catching_the_refusal_still_gets_the_loop(fresh_bundled_model, digits, wrapper):
    """The refusal of a hooked module inside ``vmap`` is an exception raised inside the
    user's forward: a forward that swallowed it finished the chunk on its fallback answer
    (a constant answer, silently), one that re-wrapped it failed with its own error. The
    refusal is now recorded apart from the exception, and the chunk redone by the loop."""
    model = fresh_bundled_model
    expected = gradtrust(wrapper(copy.deepcopy(model)), digits, layer="inner.features.6")
    model.features[4].register_forward_hook(lambda m, i, o: None)
    wrapped = wrapper(model)
    got = gradtrust(lambda t: wrapped(t), digits, layer=model.features[6])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------- 3. a pruning method of the user's


class _KeepAll(prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return default_mask


def test_a_users_pruning_method_keeps_the_batched_path(fresh_bundled_model, digits, loop_calls):
    model = fresh_bundled_model
    expected = gradtrust(copy.deepcopy(model), digits, layer="features.6")
    _KeepAll.apply(model.features[0], "weight")
    (hook,) = model.features[0]._forward_pre_hooks.values()
    assert engine._is_our_hook(hook)
    got = gradtrust(model, digits, layer="features.6")
    assert not loop_calls
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------- 4. two_class_logits under compilers


class _Binary(nn.Module):
    def __init__(self, sigmoid: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.sigmoid = sigmoid

    def forward(self, x):
        z = self.lin(x)
        return torch.sigmoid(z) if self.sigmoid else z


class _Wrapped(nn.Module):
    """The documented wrapper, ``two_class_logits(model(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Binary()

    def forward(self, x):
        return two_class_logits(self.model(x))


def test_the_wrapper_exports():
    torch.manual_seed(0)
    wrapped, x = _Wrapped().eval(), torch.randn(3, 4)
    exported = torch.export.export(wrapped, (x,))
    torch.testing.assert_close(exported.module()(x), wrapped(x))


def test_the_wrapper_compiles_in_one_graph():
    torch.manual_seed(0)
    wrapped, x = _Wrapped().eval(), torch.randn(3, 4)
    compiled = torch.compile(wrapped, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), wrapped(x))


def test_two_class_logits_stays_scriptable_and_checks_no_fake_or_meta_tensor():
    scripted = torch.jit.script(two_class_logits)
    z = torch.tensor([0.5, -2.0])
    torch.testing.assert_close(scripted(z), two_class_logits(z))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning, no error
        two_class_logits(torch.full((3, 1), 0.5, device="meta"))
        with torch._subclasses.FakeTensorMode():
            two_class_logits(torch.full((3, 1), 0.5))


def test_a_logits_output_wrapper_warns_of_a_sigmoid_once():
    """``LogitsOutput(model, "one logit")`` built directly: the first output is checked,
    once per wrapper (an attribution method calls it many times)."""
    torch.manual_seed(0)
    wrapper = LogitsOutput(_Binary(sigmoid=True), reads="one logit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            wrapper(torch.randn(3, 4))
    assert [str(w.message) for w in caught] == [SIGMOID_OUTPUT_WARNING]
