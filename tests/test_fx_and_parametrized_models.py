"""Models that are not plain eager modules but keep their layers as modules: a
``torch.fx.symbolic_trace`` GraphModule (its layers are ``call_module`` nodes, unlike a
``torch.export`` program's operators) and convolutions under ``torch.nn.utils.parametrize``
(``weight_norm``). Every result must equal the eager (plain) model's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from captum_ext.attr import PathwayGradient
from captum_ext.bundled import load_bundled_model
from captum_ext.circuits import CircuitReadout
from captum_ext.data import load_sample_digits
from captum_ext.exported import expose_exported_layer, is_exported

torch.set_num_threads(1)

_EAGER_STAGES = ("features.1", "features.4", "features.7", "pooled", "class")


class _SmallCNN(nn.Module):
    """Functional calls and tensor methods between the modules (``call_function`` /
    ``call_method`` nodes in a symbolic trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv(x)).mean((2, 3), keepdim=True), 1))


@pytest.fixture(scope="module")
def digits():
    images, labels = load_sample_digits()
    return images[:4].double(), labels[:4]


@pytest.fixture(scope="module")
def eager():
    return load_bundled_model().eval().double()


@pytest.fixture(scope="module")
def traced(eager):
    return torch.fx.symbolic_trace(eager)


@pytest.fixture(scope="module")
def weight_normed(eager):
    model = copy.deepcopy(eager)
    for name in ("features.0", "features.3", "features.6", "classifier"):
        weight_norm(model.get_submodule(name))
    return model


def _edges(graph) -> dict:
    return {(u, v): w for u, v, w in graph.edges(data="weight")}


def _assert_same_graphs(got, expected) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert dict(g.nodes(data=True)).keys() == dict(e.nodes(data=True)).keys()
        for node, data in e.nodes(data=True):
            for key, value in data.items():
                if isinstance(value, float):
                    assert g.nodes[node][key] == pytest.approx(value, rel=1e-6, abs=1e-6)
                else:
                    assert g.nodes[node][key] == value
        got_edges, expected_edges = _edges(g), _edges(e)
        assert got_edges.keys() == expected_edges.keys()
        for edge, weight in expected_edges.items():
            assert got_edges[edge] == pytest.approx(weight, rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------------------------------
# is_exported: a symbolic trace is not a torch.export program, an export program still is


@pytest.mark.parametrize("make", [load_bundled_model, _SmallCNN], ids=["bundled", "small_cnn"])
def test_a_symbolic_trace_is_not_an_export_program_and_an_export_program_is(make):
    model = make().eval()
    example = torch.randn(2, 1, 28, 28)
    traced = torch.fx.symbolic_trace(model)
    # recent torch records the module paths (nn_module_stack) in a symbolic trace too
    assert isinstance(traced, torch.fx.GraphModule)
    assert not is_exported(traced)
    assert not is_exported(model)
    program = torch.export.export(model, (example,)).module()
    assert is_exported(program)
    plain = torch.fx.GraphModule(program, program.graph)  # as load_exported returns it
    assert is_exported(plain)
    torch.testing.assert_close(plain(example), model(example), rtol=0, atol=1e-6)


def test_an_exposed_export_program_is_still_an_export_program(eager, digits):
    images, _ = digits
    model = load_bundled_model().eval()
    program = torch.export.export(model, (images[:2].float(),)).module()
    wrapper, _ = expose_exported_layer(program, "features.7")
    assert is_exported(wrapper)
    with pytest.raises(TypeError, match="torch.export program"):
        PathwayGradient(program).attribute(images[:2].float(), target=0)


def test_a_bad_layer_name_of_a_symbolic_trace_is_not_called_an_export_layer(traced):
    with pytest.raises(ValueError) as error:
        CircuitReadout(traced, layers=["features.1", "nope"])
    assert "torch.export" not in str(error.value)
    assert "nope" in str(error.value)


# ---------------------------------------------------------------------------------------
# PathwayGradient on a symbolic trace: its ReLUs are modules


def test_pathway_gradient_default_layers_on_a_symbolic_trace_equal_the_eager_models(
    eager, traced, digits
):
    images, labels = digits
    expected = PathwayGradient(eager).attribute(images, target=labels, return_pathway=True)
    got = PathwayGradient(traced).attribute(images, target=labels, return_pathway=True)
    assert got.sites == expected.sites == ("features.1", "features.4", "features.7")
    torch.testing.assert_close(got.attributions, expected.attributions, rtol=0, atol=1e-6)
    for site in expected.sites:
        torch.testing.assert_close(got.masks[site], expected.masks[site], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# CircuitReadout: default stages of a symbolic trace and of weight-normed convolutions


@pytest.mark.parametrize("gradient", [False, True])
def test_circuit_readout_of_a_symbolic_trace_equals_the_eager_models(
    eager, traced, digits, gradient
):
    images, labels = digits
    expected = CircuitReadout(eager, gradient=gradient)
    got = CircuitReadout(traced, gradient=gradient)
    assert expected.stages == _EAGER_STAGES
    assert got.stages == expected.stages
    assert [c.ingress for c in got.connections] == [c.ingress for c in expected.connections]
    _assert_same_graphs(got.readout(images, target=labels), expected.readout(images, target=labels))


@pytest.mark.parametrize("gradient", [False, True])
def test_circuit_readout_of_weight_normed_convolutions_equals_the_plain_models(
    eager, weight_normed, digits, gradient
):
    images, labels = digits
    torch.testing.assert_close(weight_normed(images), eager(images), rtol=0, atol=1e-9)
    expected = CircuitReadout(eager, gradient=gradient)
    got = CircuitReadout(weight_normed, gradient=gradient)
    assert expected.stages == _EAGER_STAGES
    assert got.stages == expected.stages  # post-activation outputs, not the convs'
    assert [c.ingress for c in got.connections] == [c.ingress for c in expected.connections]
    _assert_same_graphs(got.readout(images, target=labels), expected.readout(images, target=labels))
