"""Metrics against their specifications (GradTrust's reference form on log-probability
outputs, the sanity cascade and purview's groups in execution order, the pointing game's
Euclidean tolerance), each checked against an independent float64 / autograd computation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Saliency
from torch import nn

from captum_ext.data import log_probabilities
from captum_ext.metrics import gradnorm, gradtrust, model_randomisation, pointing_game, purview

C = 5


def _head_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, C)).double().eval()


def _reference_by_hand(model: nn.Module, x: torch.Tensor, weight: torch.Tensor, transform=None):
    """The authors' demo on the model's output z: MSE(z, 1/C), its gradient at ``weight``
    (plain autograd, one example at a time), squared, unbiased variance of each row,
    max / mean."""
    scores = []
    for xi in x:
        z = model(xi[None])
        z = transform(z) if transform is not None else z
        (g,) = torch.autograd.grad(F.mse_loss(z, torch.full_like(z, 1.0 / C)), [weight])
        energies = (g**2).var(1)
        scores.append(float(energies.max() / energies.mean()))
    return torch.tensor(scores, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# GradTrust's reference form on log-probabilities


@pytest.mark.parametrize("method", ["auto", "closed_form", "autograd"])
def test_reference_form_of_a_log_softmax_model_passes_through_the_log_softmax(method):
    base = _head_model()
    model = nn.Sequential(*base, nn.LogSoftmax(dim=1)).eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = _reference_by_hand(model, x, model[2].weight)
    got = gradtrust(model, x, form="reference", method=method)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    # the layer named explicitly: the same
    torch.testing.assert_close(
        gradtrust(model, x, form="reference", layer=model[2]), expected, rtol=1e-10, atol=0
    )


def test_reference_form_of_a_softmax_model_read_through_log_probabilities():
    base = _head_model()
    model = nn.Sequential(*base, nn.Softmax(dim=1)).eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = _reference_by_hand(model, x, model[2].weight, log_probabilities)
    for method in ("auto", "autograd"):
        got = gradtrust(
            model, x, form="reference", output_transform=log_probabilities, method=method
        )
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)


def test_reference_form_in_float32_agrees_with_float64_autograd():
    base = _head_model()
    model = nn.Sequential(*base, nn.Softmax(dim=1)).eval()
    x = torch.randn(16, 6, dtype=torch.float64)
    expected = _reference_by_hand(model, x, model[2].weight, log_probabilities)
    got = gradtrust(model.float(), x.float(), form="reference", output_transform=log_probabilities)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0)


class _Centred(nn.Module):
    """Logits less their row mean: a shift per row that is no log-softmax."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x):
        z = self.base(x)
        return z - z.mean(dim=1, keepdim=True)


def test_reference_form_with_another_shift_takes_autograd_or_refuses_the_closed_form():
    model = _Centred(_head_model()).eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = _reference_by_hand(model, x, model.base[2].weight)
    torch.testing.assert_close(gradtrust(model, x, form="reference"), expected, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="`method`='closed_form'"):
        gradtrust(model, x, form="reference", method="closed_form")
    # the topk form is shift-invariant: its closed form still applies and agrees
    torch.testing.assert_close(
        gradtrust(model, x, method="closed_form"),
        gradtrust(model, x, method="autograd"),
        rtol=1e-10,
        atol=0,
    )


def test_reference_form_of_plain_logits_is_unchanged():
    model = _head_model()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = _reference_by_hand(model, x, model[2].weight)
    torch.testing.assert_close(gradtrust(model, x, form="reference"), expected, rtol=1e-10, atol=0)


def test_gradnorm_docstring_says_the_gradtrust_paper_negates_it():
    assert "-gradnorm(...)" in gradnorm.__doc__
    assert "minus" in gradnorm.__doc__.split("GradTrust paper")[1][:200]


# ---------------------------------------------------------------------------------------------
# model_randomisation: the default cascade from the output down, by execution


class _HeadFirst(nn.Module):
    """The head registered before the backbone; forward runs conv1 -> conv2 -> fc. An
    auxiliary head runs in training mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.aux = nn.Linear(4 * 6 * 6, 3)
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        out = self.fc(F.relu(self.conv2(h)).flatten(1))
        if self.training:
            out = out + self.aux(h.flatten(1))
        return out


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_default_cascade_runs_from_the_output_down_and_leaves_out_idle_modules():
    torch.manual_seed(0)
    model = _HeadFirst().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 8, 8)
    with pytest.warns(UserWarning, match=r"leaves out 1 module.*'aux'.*`layers`"):
        curves = model_randomisation(Saliency, model, x, similarity="spearman_abs")
    assert curves.layers == ["fc", "conv2", "conv1"]
    assert model.training  # the model comes back as it came in
    assert _hooks(model) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    # a layer list given keeps its order, idle layers included
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = model_randomisation(
            Saliency, model, x, layers=["conv1", "aux", "fc"], similarity="spearman_abs"
        )
    assert given.layers == ["conv1", "aux", "fc"]


class _Attention(nn.Module):
    """Parameters used by another module without being called: MultiheadAttention's
    out_proj and a ParameterList, declared in the reverse of their use."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.mix = nn.ParameterList([nn.Parameter(torch.randn(4, 4))])
        self.embed = nn.Conv2d(1, 4, 4, stride=4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2) @ self.mix[0]
        out, _ = self.attention(tokens, tokens, tokens)
        return self.head(out.mean(1))


def test_default_cascade_places_parameter_holders_where_their_parameters_are_used():
    torch.manual_seed(0)
    model = _Attention().eval()
    curves = model_randomisation(Saliency, model, torch.randn(2, 1, 8, 8), similarity="spearman")
    assert curves.layers == ["head", "attention.out_proj", "attention", "mix", "embed"]


# ---------------------------------------------------------------------------------------------
# purview: the early and late groups by execution


class _PurviewHeadFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * 4 * 4, 3)  # registered first, runs last
        self.conv1 = nn.Conv2d(1, 4, 3)  # runs first
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


def test_purview_default_groups_are_the_first_and_last_layers_to_run():
    torch.manual_seed(0)
    model = _PurviewHeadFirst().double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    expected = []
    for xi in x:  # -(||dL/d conv1||^2 + ||dL/d fc||^2) / 2, L = mean_c softplus(-z_c)
        z = model(xi[None])
        loss = F.binary_cross_entropy_with_logits(z, torch.ones_like(z))
        grads = torch.autograd.grad(loss, [*model.conv1.parameters(), *model.fc.parameters()])
        early = sum(float(g.pow(2).sum()) for g in grads[:2])
        late = sum(float(g.pow(2).sum()) for g in grads[2:])
        expected.append(-(early + late) / 2)
    got = purview(model, x)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), rtol=1e-10, atol=0)
    assert _hooks(model) == 0


# ---------------------------------------------------------------------------------------------
# pointing game: TorchRay's Euclidean disk


def _torchray_hits(maps: torch.Tensor, masks: torch.Tensor, tolerance: int) -> list[bool]:
    """TorchRay's PointingGame.evaluate, one map at a time: the maximum (first in row-major
    order) is a hit when some object pixel lies at squared distance < tolerance^2, or
    (tolerance 0) on the object."""
    hits = []
    for m, mask in zip(maps[:, 0].double(), masks):
        row, col = divmod(int(m.flatten().argmax()), m.shape[1])
        v, u = torch.meshgrid(
            (torch.arange(mask.shape[0], dtype=torch.float64) - row) ** 2,
            (torch.arange(mask.shape[1], dtype=torch.float64) - col) ** 2,
            indexing="ij",
        )
        accept = (v + u) < tolerance**2
        hits.append(bool((mask & accept).any()) or bool(mask[row, col]))
    return hits


def test_pointing_game_tolerance_is_a_euclidean_disk():
    maps = torch.zeros(4, 1, 224, 224)
    maps[0, 0, 85, 85] = 1.0  # 15 px diagonally off the corner: 21.2 px away
    maps[1, 0, 100, 85] = 1.0  # 15 px left of the box: on the circle, not inside it
    maps[2, 0, 100, 86] = 1.0  # 14 px left of the box
    maps[3, 0, 91, 88] = 1.0  # (9, 12) off the corner: exactly 15 px
    boxes = torch.tensor([[100, 100, 120, 120]] * 4)
    assert pointing_game(maps, boxes, tolerance=15).tolist() == [False, False, True, False]
    assert pointing_game(maps, boxes, tolerance=22).tolist() == [True, True, True, True]
    assert pointing_game(maps, boxes, tolerance=0).tolist() == [False] * 4
    assert pointing_game(maps, boxes, tolerance=10**12).tolist() == [True] * 4


def test_pointing_game_equals_torchray_on_random_maps():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(40, 1, 32, 32, generator=generator)
    masks = torch.zeros(40, 32, 32, dtype=torch.bool)
    for i in range(40):
        y0, x0 = torch.randint(0, 28, (2,), generator=generator).tolist()
        h, w = torch.randint(1, 5, (2,), generator=generator).tolist()
        masks[i, y0 : y0 + h, x0 : x0 + w] = True
    for tolerance in (0, 1, 2, 3, 5, 8, 15, 40):
        ours = pointing_game(maps, masks, tolerance=tolerance).tolist()
        assert ours == _torchray_hits(maps, masks, tolerance), tolerance


def test_default_cascade_of_an_exported_program_follows_execution():
    torch.manual_seed(0)
    model = _PurviewHeadFirst().eval()
    x = torch.randn(2, 1, 8, 8)
    program = torch.export.export(model, (x,)).module()
    curves = model_randomisation(Saliency, program, x, similarity="spearman")
    assert curves.layers == ["fc", "conv2", "conv1"]
