"""Half-precision models (``model.half()``, ``model.to(torch.bfloat16)``), as users load them.

Before: Captum's NoiseTunnel adds float32 noise to the inputs, so half-precision inputs reached
a half-precision model as float32 and every NoiseTunnel over our methods failed inside torch
("Input type (float) and bias type (c10::Half) should be the same"), and so did
``score_dataset`` on a loader of float32 pixels. The trust scores came back in float16:
``gradtrust`` overflowed to inf for every example of the bundled model (with a warning), and
max-softmax rounded the probabilities above 0.9995 to 1, tying confident predictions.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot
from captum.attr import NoiseTunnel, Saliency
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_ext.attr import ContrastCAM, Contrastive, FinerCAM, GradCAM
from captum_ext.metrics import (
    TRUST_SCORES,
    deletion_curves,
    gradtrust,
    insertion_curves,
    margin,
    masking_score,
    score_dataset,
    softmax_confidence,
    structure_deletion,
)

LAYER = "features.7"
HALF = [torch.float16, torch.bfloat16]

NOISE_TUNNELS = {
    "GradCAM": lambda m, x, y: NoiseTunnel(GradCAM(m, LAYER)).attribute(
        x, target=y, nt_samples=3, stdevs=0.1, nt_type="smoothgrad"
    ),
    "ContrastCAM": lambda m, x, y: NoiseTunnel(ContrastCAM(m, LAYER)).attribute(
        x, contrast=(y + 1) % 10, nt_samples=3, stdevs=0.1, nt_type="smoothgrad"
    ),
    "FinerCAM": lambda m, x, y: NoiseTunnel(FinerCAM(m, LAYER)).attribute(
        x, target=y, nt_samples=3, stdevs=0.1, nt_type="smoothgrad"
    ),
    "Contrastive(Saliency)": lambda m, x, y: NoiseTunnel(Contrastive(Saliency(m))).attribute(
        x, contrast=(y + 1) % 10, nt_samples=3, stdevs=0.1, nt_type="smoothgrad"
    ),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(NOISE_TUNNELS))
def test_noise_tunnel_over_a_half_precision_model(name, dtype, bundled_model, sample_digits):
    """The same NoiseTunnel (same seed, so the same float32 noise) on the half model and on
    its float32 copy: equal up to half-precision rounding."""
    x, y = sample_digits[0][:4], sample_digits[1][:4]
    half = copy.deepcopy(bundled_model).to(dtype)
    wide = copy.deepcopy(half).float()  # the same (rounded) weights, in float32
    before = model_snapshot(half)
    torch.manual_seed(0)
    got = NOISE_TUNNELS[name](half, x.to(dtype), y)
    torch.manual_seed(0)
    expected = NOISE_TUNNELS[name](wide, x.to(dtype).float(), y)
    assert torch.isfinite(got).all() and expected.abs().amax() > 0
    error = (got.float() - expected).abs().amax() / expected.abs().amax()
    # measured: CAMs <= 1e-2, Saliency's input gradients 6e-2 (plain Captum Saliency on the
    # same half model, without noise: 0.14-0.17)
    assert error < (0.15 if name.startswith("Contrastive") else 0.03), float(error)
    assert_model_unchanged(half, before)


def test_float32_inputs_to_a_half_model_are_cast_as_the_model_would_need(
    bundled_model, sample_digits
):
    x, y = sample_digits[0][:4], sample_digits[1][:4]
    half = copy.deepcopy(bundled_model).half()
    cam = GradCAM(half, LAYER)
    torch.testing.assert_close(
        cam.attribute(x, target=y), cam.attribute(x.half(), target=y), rtol=0, atol=0
    )


def test_a_mixed_precision_model_gets_its_inputs_as_given(bundled_model, sample_digits):
    """Only a model whose floating parameters are all one half dtype has its inputs cast: a
    model kept partly in float32 on purpose gets them untouched (torch's error and our note
    name the mismatch)."""
    x = sample_digits[0][:2]
    mixed = copy.deepcopy(bundled_model).half()
    mixed.classifier.float()
    with pytest.raises(RuntimeError) as raised:
        softmax_confidence(mixed, x)
    assert "torch.float32" in "".join(getattr(raised.value, "__notes__", []))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_trust_scores_of_a_half_model_are_float32(dtype, bundled_model, sample_digits):
    x = sample_digits[0][:8].to(dtype)
    half = copy.deepcopy(bundled_model).to(dtype)
    with torch.no_grad():
        logits = half(x).float()
    probabilities = logits.softmax(1)
    # by definition, from the half model's logits in float32
    torch.testing.assert_close(softmax_confidence(half, x), probabilities.amax(1))
    top = probabilities.topk(2, dim=1).values
    torch.testing.assert_close(margin(half, x), top[:, 0] - top[:, 1])
    for name, score in TRUST_SCORES.items():
        if name == "mc_dropout":
            continue  # the bundled model has no dropout (below, on one that has)
        got = score(half, x)
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
    with_dropout = torch.nn.Sequential(half, torch.nn.Dropout(0.2)).to(dtype)
    got = TRUST_SCORES["mc_dropout"](with_dropout, x, n_passes=3, generator=0)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


def test_gradtrust_of_a_half_model_is_finite_and_close_to_float32(bundled_model, sample_digits):
    """Before: inf for every example (the scores of the bundled model reach 1e10)."""
    x = sample_digits[0][:8]
    half = copy.deepcopy(bundled_model).half()
    wide = copy.deepcopy(half).float()
    for layer in (None, "features.6", "all"):
        got = gradtrust(half, x.half(), layer=layer, log=True)
        expected = gradtrust(wide, x.half().float(), layer=layer, log=True)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=0.05)
        raw = gradtrust(half, x.half(), layer=layer)
        assert torch.isfinite(raw).all()


def test_score_dataset_on_float32_pixels_and_a_half_model(bundled_model, sample_digits):
    x, y = sample_digits
    half = copy.deepcopy(bundled_model).half()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    table = score_dataset(half, loader, scores=("gradtrust", "softmax"), progress=False)
    assert table["gradtrust"].dtype == torch.float32
    assert torch.isfinite(table["gradtrust"]).all()
    with torch.no_grad():
        expected = half(x.half()).float().softmax(1).amax(1)
    torch.testing.assert_close(table["softmax"], expected)


def _iba(model, x):
    from captum_ext.attr import LayerIBA

    iba = LayerIBA(model, LAYER)
    iba.estimate(x)
    torch.manual_seed(0)
    return iba.attribute(x, target=0)


def _circuit_weights(model, x):
    from captum_ext.circuits import CircuitReadout

    graphs = CircuitReadout(model, gradient=True).readout(x[:2], target=[0, 0])
    return torch.tensor(sorted(w for g in graphs for *_, w in g.edges(data="weight")))


FLOAT32_INPUT_CALLS = {
    "gradtrust at a layer": lambda m, x: gradtrust(m, x, layer="features.6", log=True),
    "gradtrust, all parameters": lambda m, x: gradtrust(m, x, layer="all", log=True),
    "LayerIBA": _iba,
    "circuit readout": _circuit_weights,
}


@pytest.mark.parametrize("name", list(FLOAT32_INPUT_CALLS))
def test_float32_inputs_reach_a_half_model_in_its_dtype(name, bundled_model, sample_digits):
    """The per-example gradient engine, LayerIBA and the circuit readout call the model
    themselves: float32 inputs are cast there too (the same result as half inputs)."""
    x = sample_digits[0][:4]
    half = copy.deepcopy(bundled_model).to(torch.bfloat16)
    call = FLOAT32_INPUT_CALLS[name]
    torch.manual_seed(0)
    got = call(half, x)
    torch.manual_seed(0)
    expected = call(half, x.to(torch.bfloat16))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_only_the_inputs_are_cast_not_the_additional_arguments(sample_digits):
    """The cast is for the inputs that NoiseTunnel noised; an extra float32 argument reaches
    the model as given (it may be meant as float32, e.g. a temperature or a mask)."""
    seen = []

    class TakesAScale(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(4, 3)

        def forward(self, x, scale):
            seen.append((x.dtype, scale.dtype))
            return self.head(self.features(x).mean(dim=(2, 3))) * scale.to(x.dtype)

    model = TakesAScale().to(torch.bfloat16).eval()
    x = sample_digits[0][:2].to(torch.bfloat16)
    scale = torch.ones(2, 1)  # float32 on purpose
    torch.manual_seed(0)
    NoiseTunnel(Contrastive(Saliency(model))).attribute(
        x, contrast=1, additional_forward_args=(scale,), nt_samples=2, stdevs=0.1
    )
    NoiseTunnel(GradCAM(model, "features.1")).attribute(
        x, target=0, additional_forward_args=(scale,), nt_samples=2, stdevs=0.1
    )
    assert seen and all(pair == (torch.bfloat16, torch.float32) for pair in seen)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_masks_of_a_half_model_are_optimised_in_float32(dtype, bundled_model, sample_digits):
    """The mask's Adam steps and losses ran in the model's dtype: in float16 the masks kept
    54 % of the pixels instead of 19 % (6 digits, default settings) and one digit in six lost
    its class. Now the images are float32 during the fit, the model runs in its dtype, and
    float32 inputs are taken too; the mask comes back in the inputs' dtype."""
    from captum_ext.attr import ActivationMatchingMask

    x, y = sample_digits[0][::8][:4], sample_digits[1][::8][:4]
    model = copy.deepcopy(bundled_model).to(dtype)
    before = model_snapshot(model)
    options = dict(target=y, mode="per_image", steps=100, seed=0, progress=False)
    method = ActivationMatchingMask(model, ["features.7"])
    half = method.attribute(x.to(dtype), return_details=True, **options)
    assert half.mask.dtype == dtype and half.probabilities.dtype == torch.float32
    # the same fit as on the float32 copy of the half inputs
    as_float32 = method.attribute(x.to(dtype).float(), **options)
    assert as_float32.dtype == torch.float32 and torch.equal(as_float32, half.mask.float())
    assert_model_unchanged(model, before)
    # the masks do what they should on the half model, at the float32 model's size
    reference = ActivationMatchingMask(bundled_model, ["features.7"]).attribute(x, **options)
    with torch.no_grad():
        kept = model((half.mask * x.to(dtype)).to(dtype)).argmax(1)
    assert torch.equal(kept, y)
    # (100 steps: float32 model 0.22 of the pixels on average; float16 0.25, bfloat16 0.29;
    # float16 before: 0.45, the first digit's mask empty and its class lost)
    assert abs(half.mask.float().mean() - reference.mean()) < 0.1


def test_the_mask_net_of_a_float16_model_trains_in_float32(bundled_model, sample_digits):
    """fit() trained the mask net in the images' dtype: with a float16 model its weights
    overflowed to inf after the first step and every later loss was NaN."""
    from captum_ext.attr import ActivationMatchingMask

    x, y = sample_digits
    model = copy.deepcopy(bundled_model).half()
    method = ActivationMatchingMask(model, ["features.7"])
    method.fit((x.half(), y), epochs=1, batch_size=10, progress=False, seed=0)
    assert next(method.mask_net.parameters()).dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(method.history)))
    mask = method.attribute(x[:4].half())
    assert mask.dtype == torch.float16 and set(mask.unique().tolist()) <= {0.0, 1.0}


PERTURBATION_CALLS = {
    "deletion_curves (7 x 7 maps)": lambda m, x, y, maps7, maps: deletion_curves(
        m, x, maps7, target=y
    ),
    "insertion_curves": lambda m, x, y, maps7, maps: insertion_curves(m, x, maps, target=y),
    "structure_deletion": lambda m, x, y, maps7, maps: structure_deletion(m, x, maps, target=y),
    "masking_score": lambda m, x, y, maps7, maps: (masking_score(m, x, maps, target=y),),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(PERTURBATION_CALLS))
def test_perturbation_curves_of_half_inputs_equal_those_of_the_same_values_in_float32(
    name, dtype, bundled_model, sample_digits
):
    """The same pixel values as a half tensor or as float32 (which the model wrapper casts):
    the curves must agree. Before, half inputs rounded the float32 maps to their dtype before
    ranking (bfloat16 merged ranks, so pixels were deleted in another order: curves 0.19
    apart), and the probabilities and perturbed fractions were stored in bfloat16 (a count
    above 256 rounded)."""
    x, y = sample_digits[0][::4][:8], sample_digits[1][::4][:8]
    cam = GradCAM(bundled_model, LAYER)
    maps7 = cam.attribute(x, target=y)
    maps = cam.attribute(x, target=y, upsample_to_input=True, normalize="minmax")
    half = copy.deepcopy(bundled_model).to(dtype)
    x_half = x.to(dtype)
    got = PERTURBATION_CALLS[name](half, x_half, y, maps7, maps)
    expected = PERTURBATION_CALLS[name](half, x_half.float(), y, maps7, maps)
    for value, reference in zip(got, expected, strict=True):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference, rtol=0, atol=0)
