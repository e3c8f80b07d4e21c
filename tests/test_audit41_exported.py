"""Audit 41: models exported with ``torch.export`` (and TorchScript, wrapped models) in the
metrics, the final-layer wrappers and the circuit readout."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_ext.attr import GradCAM
from captum_ext.bundled import load_bundled_model
from captum_ext.data import load_sample_digits
from captum_ext.exported import (
    exported_layer_names,
    expose_exported_final_layer,
    expose_exported_layer,
)
from captum_ext.metrics import (
    class_sensitivity,
    deletion,
    gradtrust,
    insertion,
    model_randomisation,
    road,
)
from captum_ext.torchscript import expose_final_layer, expose_layer

torch.set_num_threads(1)


def _export(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The module ``torch.export`` returns (its ``.eval()`` / ``.train()`` raise)."""
    batch = torch.export.Dim("batch")
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()


def _plain(module: nn.Module) -> torch.fx.GraphModule:
    """The same graph and parameters as a plain GraphModule (as ``load_exported`` gives)."""
    return torch.fx.GraphModule(module, module.graph)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def digits():
    model = load_bundled_model()
    images, labels = load_sample_digits()
    images, labels = images[:4], labels[:4]
    return model, _export(model, images[:2]), images, labels


class _TwoHeads(nn.Module):
    """``fc`` gives the logits; ``aux`` (a calibration layer) runs after it, last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.aux = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux(self.fc(torch.relu(self.conv(x)).mean((2, 3))))


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _trained_conv_bn() -> nn.Module:
    torch.manual_seed(0)
    model = _ConvBN()
    with torch.no_grad():  # as after training: biases and statistics away from their init
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.bias.uniform_(-1, 1)
        model.conv.bias.uniform_(-1, 1)
        model.fc.bias.uniform_(-1, 1)
    return model.eval()


# -- 1. expose_layer passes final_layer on for an exported model -------------------------------


def test_expose_layer_gives_final_layer_to_an_exported_model():
    """expose_layer(exported, layer, final_layer=...) dropped final_layer: a bogus name was
    accepted and GradTrust silently read the last linear layer (aux) instead of fc."""
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    x = torch.randn(2, 3, 8, 8)
    exported = _export(model, x)
    wrapper, tap = expose_layer(exported, "conv", example=x, final_layer="fc")
    assert torch.equal(wrapper.final_linear.weight, model.fc.weight)
    assert wrapper.final_linear.bias is exported.get_parameter("fc.bias")
    torch.testing.assert_close(wrapper(x), model(x))
    with pytest.raises(ValueError, match=r"`final_layer`='does_not_exist' is not a layer"):
        expose_layer(exported, "conv", example=x, final_layer="does_not_exist")
    with pytest.raises(ValueError, match=r"`final_layer`='conv' is not a linear layer.*fc, aux"):
        expose_layer(exported, "conv", example=x, final_layer="conv")


# -- 2. model_randomisation re-initialises an exported model's layers as the eager ones -------


def test_model_randomisation_of_an_exported_model_equals_the_eager_model():
    """The parameter holders of an exported model have no reset_parameters: only their
    weights were re-initialised (trained biases and batch-norm statistics kept), and the
    curves differed from the eager (and TorchScript) model's."""
    model = _trained_conv_bn()
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    exported = _plain(_export(model, x[:2]))  # as load_exported gives it (takes .eval())
    before = _state(exported)
    eager = model_randomisation(lambda m: GradCAM(m, "conv"), model, x, target=0)
    curves = model_randomisation(
        lambda m: GradCAM(*expose_exported_layer(m, "conv")), exported, x, target=0
    )
    assert curves.layers == eager.layers == ["fc", "bn", "conv"]
    torch.testing.assert_close(curves.randomised, eager.randomised)
    for measure, values in eager.similarity.items():
        torch.testing.assert_close(curves.similarity[measure], values)
    after = _state(exported)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the user's copy as it was


# -- 3. the metrics accept the module torch.export returns ------------------------------------


def test_metrics_accept_the_module_torch_export_returns(digits):
    """deletion, insertion, road, model_randomisation and class_sensitivity called
    model.eval(), which torch refuses on torch.export.export(...).module()
    (NotImplementedError); the CAMs took the same module. Results equal the eager model's."""
    model, exported, x, y = digits
    before = _state(exported)
    wrapper, tap = expose_exported_layer(exported, "features.7", example=x[:2])
    maps = GradCAM(wrapper, tap).attribute(x, target=y)
    for metric, options in (
        (deletion, {"n_steps": 4}),
        (insertion, {"n_steps": 4}),
        (road, {"percentages": (0.2, 0.6)}),
    ):
        got = metric(exported, x, maps, target=y, **options)
        expected = metric(model, x, maps, target=y, **options)
        torch.testing.assert_close(got, expected)
    # a wrapper holding the exported module (its .eval() would recurse into it)
    wrapped = nn.Sequential(nn.Identity(), exported)
    torch.testing.assert_close(
        deletion(wrapped, x, maps, target=y, n_steps=4),
        deletion(model, x, maps, target=y, n_steps=4),
    )
    curves = model_randomisation(
        lambda m: GradCAM(*expose_exported_layer(m, "features.7")),
        exported,
        x[:2],
        target=y[:2],
        layers=["classifier", "features.6"],
    )
    eager = model_randomisation(
        lambda m: GradCAM(m, "features.7"),
        model,
        x[:2],
        target=y[:2],
        layers=["classifier", "features.6"],
    )
    torch.testing.assert_close(curves.randomised, eager.randomised)
    sensitivity = class_sensitivity(
        lambda m: GradCAM(*expose_exported_layer(m, "features.7")), exported, x[:2]
    )
    expected = class_sensitivity(lambda m: GradCAM(m, "features.7"), model, x[:2])
    for measure, values in expected.similarity.items():
        torch.testing.assert_close(sensitivity.similarity[measure], values)
    after = _state(exported)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# -- 4. a decomposed program is refused with the reason ---------------------------------------


def test_a_decomposed_program_is_refused_naming_run_decompositions(digits):
    """After run_decompositions() the linear layer runs as aten.addmm: the final-layer
    wrapper silently had no final_linear, GradTrust then asked for the wrapper already made,
    and final_layer='classifier' was "not a linear layer (its linear layers: classifier)"."""
    model, _, x, y = digits
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},))
    decomposed = program.run_decompositions().module()
    assert "classifier" in exported_layer_names(decomposed)
    with pytest.raises(ValueError, match=r"decomposed.*run_decompositions"):
        expose_exported_final_layer(decomposed, x[:2])
    with pytest.raises(ValueError, match=r"`final_layer`='classifier'.*run_decompositions"):
        expose_exported_final_layer(decomposed, x[:2], final_layer="classifier")
    with pytest.raises(ValueError, match=r"run_decompositions"):
        expose_exported_layer(decomposed, "features.7", final_layer="classifier")
    # a layer to explain is still exposed (no final layer asked for)
    wrapper, tap = expose_exported_layer(decomposed, "features.7", example=x[:2])
    torch.testing.assert_close(
        GradCAM(wrapper, tap).attribute(x, target=y),
        GradCAM(model, "features.7").attribute(x, target=y),
    )


def test_final_layer_messages_name_the_python_argument(digits):
    model, exported, x, _ = digits
    with pytest.raises(ValueError, match=r"^`final_layer`='features\.3' is not a linear layer"):
        expose_exported_final_layer(exported, final_layer="features.3")
    with pytest.raises(ValueError) as error:
        expose_exported_final_layer(exported, final_layer="clasifier")
    assert "--final-layer" not in str(error.value) and "Closest layers: classifier" in str(
        error.value
    )


def test_expose_final_layer_takes_an_exported_model(digits):
    """expose_final_layer(exported) called it "the TorchScript model GraphModule" without
    a linear layer; it now gives the exported model's final-layer wrapper."""
    model, exported, x, _ = digits
    wrapper = expose_final_layer(exported, example=x[:2])
    assert torch.equal(wrapper.final_linear.weight, model.classifier.weight)
    torch.testing.assert_close(gradtrust(wrapper, x), gradtrust(model, x))
    with pytest.raises(ValueError, match=r"^`final_layer`='features\.3' is not a linear"):
        expose_final_layer(exported, "features.3")  # the Python argument, as for TorchScript


# -- 5. the circuit readout opens a model nested in a wrapper ---------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_circuit_readout_opens_a_wrapped_model(digits, index):
    """nn.Sequential(normalise, model) and nn.Sequential(model): the inner model, which
    holds the classifier, was one stage, and the readout failed asking for `layers`."""
    from captum_ext.circuits import CircuitReadout

    model, _, x, y = digits
    wrapped = nn.Sequential(*([nn.Identity()] if index else []), model)
    inner = CircuitReadout(model)
    readout = CircuitReadout(wrapped)

    def prefixed(name: str) -> str:
        return name if name in ("pooled", "class") else f"{index}.{name}"

    assert readout.stages == tuple(prefixed(stage) for stage in inner.stages)
    (graph, *_), (expected, *_) = readout.readout(x[:2]), inner.readout(x[:2])

    def node(name: str) -> str:
        stage, _, channel = name.rpartition(":")
        return f"{prefixed(stage)}:{channel}"

    assert set(graph.nodes) == {node(n) for n in expected.nodes}
    assert set(graph.edges) == {(node(a), node(b)) for a, b in expected.edges}


# -- 6. copying a TorchScript model gives leaf parameters --------------------------------------


def test_model_randomisation_of_a_scripted_model_warns_nothing(digits):
    """deepcopy of a ScriptModule clones its parameters with autograd history: every
    backward pass on the copy warned about .grad of a non-leaf tensor."""
    from captum_ext._utils.legacy_norms import copied_model

    model, _, x, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
    copy = copied_model(scripted)
    for (name, parameter), original in zip(copy.named_parameters(), scripted.parameters()):
        assert parameter.is_leaf and parameter.grad_fn is None, name
        assert parameter.requires_grad == original.requires_grad, name
        assert parameter.data_ptr() != original.data_ptr(), name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curves = model_randomisation(
            lambda m: GradCAM(*expose_layer(m, "features.7")),
            scripted,
            x[:2],
            target=y[:2],
            layers=["classifier", "features.6"],
        )
    assert not [w for w in caught if "leaf" in str(w.message)]
    assert all(p.grad is None for p in scripted.parameters())
    eager = model_randomisation(
        lambda m: GradCAM(m, "features.7"),
        model,
        x[:2],
        target=y[:2],
        layers=["classifier", "features.6"],
    )
    torch.testing.assert_close(curves.randomised, eager.randomised)


# -- 7. model_randomisation: an exported layer is reset as its eager class, or not at all ------


class _LayerScale(nn.Module):
    """timm's LayerScale: a 1-D ``gamma`` and no ``reset_parameters``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.PReLU(4)
        self.ls = _LayerScale(4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x)))
        h = h + self.ls(h)
        return self.fc(self.norm(h.mean((2, 3))))


@pytest.mark.parametrize("cascade", [True, False])
def test_model_randomisation_resets_exported_layers_as_their_eager_classes(cascade):
    """Every parameter holder of the exported model got a written-out rule: PReLU set to 1
    (its reset_parameters gives 0.25), and the LayerScale, which the eager cascade leaves
    alone (no reset_parameters, no weight of 2 dims), randomised as an extra layer with its
    gamma zeroed."""
    from captum.attr import Saliency

    torch.manual_seed(0)
    model = _Mixed()
    with torch.no_grad():  # as after training: every parameter and statistic moved
        for tensor in [*model.parameters(), model.bn.running_mean]:
            tensor.add_(torch.rand_like(tensor))
        model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    exported = _export(model, x)

    def run(m: nn.Module):
        return model_randomisation(
            lambda mm: Saliency(mm), m, x, target=0, cascade=cascade, similarity="spearman"
        )

    eager, curves = run(model), run(exported)
    assert curves.layers == eager.layers == ["fc", "norm", "act", "bn", "conv"]
    assert torch.equal(curves.randomised, eager.randomised)
    torch.testing.assert_close(
        curves.similarity["spearman"], eager.similarity["spearman"], rtol=0, atol=1e-6
    )
    # named explicitly, the LayerScale gets the same rule as in the eager model
    named = {
        key: model_randomisation(
            lambda mm: Saliency(mm), m, x, target=0, layers=["ls", "act"], similarity="spearman"
        ).randomised
        for key, m in (("eager", model), ("exported", exported))
    }
    assert torch.equal(named["exported"], named["eager"])


# -- 8. a fixed-batch torch.export program is refused by the metrics, as by load_exported -----


def _fixed_batch_program() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    x = torch.rand(2, 3, 8, 8)
    return torch.export.export(model, (x,)).module(), x  # torch.export's default: batch 2


@pytest.mark.parametrize("metric", ["deletion", "road"])
def test_metrics_refuse_a_fixed_batch_program(metric):
    """They failed deep inside torch ("Guard failed: input.size()[0] == 2")."""
    from captum_ext.exported import FixedBatchError

    exported, x = _fixed_batch_program()
    call = {"deletion": lambda: deletion(exported, x, torch.rand_like(x), target=0, n_steps=4)}
    call["road"] = lambda: road(exported, x, torch.rand_like(x), target=0)
    with pytest.raises(FixedBatchError, match=r"^`forward_func`: .*fixed batch size of 2.*Dim"):
        call[metric]()


def test_class_sensitivity_refuses_a_fixed_batch_program_and_randomisation_takes_it():
    """class_sensitivity stacks the inputs twice (refused, naming `model`); the model
    randomisation test runs the caller's batch only, which the program takes."""
    from captum.attr import Saliency

    from captum_ext.exported import FixedBatchError

    exported, x = _fixed_batch_program()
    with pytest.raises(FixedBatchError, match=r"^`model`: .*fixed batch size of 2"):
        class_sensitivity(lambda m: Saliency(m), exported, x)
    curves = model_randomisation(
        lambda m: Saliency(m), exported, x, target=0, similarity="spearman"
    )
    assert curves.layers == ["4", "0"]


# -- 9. the TorchScript final-layer errors name the Python argument ----------------------------


def test_torchscript_final_layer_errors_name_the_python_argument(digits):
    """expose_final_layer's default `option` was "--final-layer", the command line's
    name, in errors of the Python API (the exported models' say `final_layer`)."""
    model, _, x, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
        no_linear = torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
    with pytest.raises(ValueError, match=r"^`final_layer`='features\.3' is a"):
        expose_final_layer(scripted, "features.3")
    with pytest.raises(ValueError, match=r"^`final_layer`='clasifier' is not a module"):
        expose_layer(scripted, "features.7", final_layer="clasifier")
    with pytest.raises(ValueError, match=r"pass `final_layer`=NAME") as error:
        expose_final_layer(no_linear)
    assert "--final-layer" not in str(error.value)
    # the command line still names its option
    with pytest.raises(ValueError, match=r"^`--final-layer`='clasifier' is not a module"):
        expose_final_layer(scripted, "clasifier", option="--final-layer")


# -- 10. second review: wrappers of fixed-batch programs, attention, embeddings, failing resets -


def test_model_randomisation_takes_a_wrapper_of_a_fixed_batch_program():
    """The bare program was taken, a wrapper holding it refused (naming `forward_func`)."""
    from captum.attr import Saliency

    exported, x = _fixed_batch_program()
    wrapped = nn.Sequential(nn.Identity(), exported)
    before = _state(wrapped)
    curves = model_randomisation(lambda m: Saliency(m), wrapped, x, target=0)
    assert curves.layers == ["1.4", "1.0"]
    assert all(torch.equal(v, before[k]) for k, v in wrapped.state_dict().items())


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return self.fc(self.att(tokens, tokens, tokens, need_weights=False)[0].mean(1))


def test_exported_attention_out_proj_is_reset_as_a_linear():
    """``out_proj`` never runs as a module, so the program does not record it: only its
    weight was re-initialised, the eager model resets its bias too."""
    from captum.attr import Saliency

    torch.manual_seed(0)
    model = _Attention().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.rand_like(parameter))
    x = torch.rand(2, 3, 4, 4)
    exported = _export(model, x)

    def run(m: nn.Module):
        return model_randomisation(lambda mm: Saliency(mm), m, x, target=0)

    eager, curves = run(model), run(exported)
    assert curves.layers == eager.layers and "att.out_proj" in eager.layers
    assert torch.equal(curves.randomised, eager.randomised)


def test_exported_embedding_keeps_its_padding_row_and_failing_resets_fall_back():
    """An embedding's padding row (all zeros after training) stays zero, as the eager
    ``reset_parameters`` keeps it; a class whose ``reset_parameters`` fails on the stand-in
    gets its tensors back and torch's default initialisation, not a ValueError from torch."""
    from captum_ext.metrics.sanity import _reset_as

    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4, padding_idx=3)
    holder = nn.Module()
    holder.weight = nn.Parameter(embedding.weight.detach().clone())
    torch.manual_seed(1)
    embedding.reset_parameters()
    torch.manual_seed(1)
    _reset_as(nn.Embedding, holder)
    assert torch.equal(holder.weight, embedding.weight)
    assert not holder.weight[3].any()

    class _NeedsMatrix(nn.Module):  # its default init cannot handle a vector
        def __init__(self, init: str = "kaiming") -> None:
            super().__init__()
            self.init = init
            self.scale = nn.Parameter(torch.ones(4))

        def reset_parameters(self) -> None:
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(self.scale)
            else:
                nn.init.ones_(self.scale)

    odd = nn.Module()
    odd.scale = nn.Parameter(torch.full((4,), 0.5))
    _reset_as(_NeedsMatrix, odd)  # no ValueError("Fan in and fan out can not be computed")
    # torch's default rule instead: a 1-D parameter that is not a weight becomes zeros
    assert torch.equal(odd.scale, torch.zeros(4))
