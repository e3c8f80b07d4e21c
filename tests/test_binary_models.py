"""Binary classifiers with one logit (trained with ``BCEWithLogitsLoss``): P(class 1) = sigmoid(z).

Before: the softmax of one output is always 1, so ``softmax_confidence`` was 1 and every
deletion curve flat at 1 for every image, without an error; the contrastive methods, VOICE and
GradTrust refused the model without saying what to do. ``captum_ext.data.two_class_logits``
gives the equivalent two-class logits ``[-z/2, z/2]`` (same probabilities), and every refusal names
it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_ext.attr import VOICE, ContrastCAM, CounterfactualCAM, FinerCAM, GradCAM
from captum_ext.data import two_class_logits
from captum_ext.metrics import (
    class_sensitivity,
    completeness,
    deletion,
    energy,
    gradtrust,
    insertion,
    margin,
    negative_entropy,
    odin,
    softmax_confidence,
)

LAYER = "m.features.7"


class _OneLogit(nn.Module):
    """The bundled model as a "1 vs 0" detector: z = z_1 - z_0."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.m(x)
        return z[:, 1:2] - z[:, 0:1]


@pytest.fixture
def one_logit(bundled_model) -> nn.Module:
    return _OneLogit(bundled_model).eval()


def test_two_class_logits_keep_the_sigmoid_probabilities():
    z = torch.tensor([[3.0], [-2.0], [0.0]], dtype=torch.float64)
    logits = two_class_logits(z)
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits.softmax(1)[:, 1], torch.sigmoid(z[:, 0]))
    torch.testing.assert_close(two_class_logits(z[:, 0]), logits)  # (N,) as well
    with pytest.raises(ValueError, match="one logit per example"):
        two_class_logits(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="`output`"):
        two_class_logits([1.0, 2.0])


NAMED = {
    "ContrastCAM": lambda m, x: ContrastCAM(m, LAYER).attribute(x),
    "FinerCAM": lambda m, x: FinerCAM(m, LAYER).attribute(x),
    "VOICE": lambda m, x: VOICE(GradCAM(m, LAYER)).attribute(x),
    "gradtrust": lambda m, x: gradtrust(m, x),
    "softmax_confidence": lambda m, x: softmax_confidence(m, x),
    "margin": lambda m, x: margin(m, x),
    "negative_entropy": lambda m, x: negative_entropy(m, x),
    "energy": lambda m, x: energy(m, x),
    "odin": lambda m, x: odin(m, x),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_one_logit_is_refused_with_the_remedy(name, one_logit, sample_digits):
    x = sample_digits[0][:4]
    with pytest.raises(ValueError, match="output_transform=captum_ext.data.two_class_logits"):
        NAMED[name](one_logit, x)


@pytest.mark.parametrize("metric", [deletion, insertion, completeness])
def test_perturbation_metrics_refuse_one_logit_and_say_to_wrap(metric, one_logit, sample_digits):
    x = sample_digits[0][:2]
    maps = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"lambda x: captum_ext.data.two_class_logits\(model"):
        metric(one_logit, x, maps, target=0)


class _FirstTwo(nn.Module):
    """The bundled model restricted to the classes 0 and 1: logits ``[z_0, z_1]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)[:, :2]


def test_with_two_class_logits_the_binary_model_is_the_two_class_one(
    one_logit, bundled_model, sample_digits
):
    """With ``z = z_1 - z_0``, ``[-z/2, z/2]`` and ``[z_0, z_1]`` differ by a constant per
    row, so every read-out built on their softmax (or cross-entropy) is the same."""
    x = sample_digits[0][:6]
    restricted = _FirstTwo(bundled_model).eval()
    torch.testing.assert_close(
        softmax_confidence(one_logit, x, output_transform=two_class_logits),
        softmax_confidence(restricted, x),
    )
    maps = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        deletion(lambda inputs: two_class_logits(one_logit(inputs)), x, maps, target=1),
        deletion(restricted, x, maps, target=1),
    )
    expected = ContrastCAM(restricted, LAYER).attribute(x)  # why P rather than the other?
    got = ContrastCAM(one_logit, LAYER, output_transform=two_class_logits).attribute(x)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_why_negative_is_the_opposite_evidence_of_why_positive(one_logit, sample_digits):
    """Grad-CAM of class 0 differentiates -z/2 and CounterfactualCAM of class 1 negates the
    weights of z/2: the same map (with ``[0, z]`` class 0 would be a constant, a zero map)."""
    x = sample_digits[0][:6]
    zeros, ones = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    negative = GradCAM(one_logit, LAYER, output_transform=two_class_logits).attribute(
        x, target=zeros
    )
    against_positive = CounterfactualCAM(
        one_logit, LAYER, output_transform=two_class_logits
    ).attribute(x, target=ones)
    assert negative.abs().sum() > 0
    torch.testing.assert_close(negative, against_positive)


@pytest.mark.filterwarnings("ignore:FinerCAM. for .* examples the classes compared:RuntimeWarning")
def test_finer_cam_compares_a_binary_prediction_with_the_other_class(one_logit, sample_digits):
    x = sample_digits[0][:4]
    transform = {"output_transform": two_class_logits}
    default = FinerCAM(one_logit, LAYER, **transform).attribute(x)
    explicit = FinerCAM(one_logit, LAYER, comparison_positions=(1,), **transform).attribute(x)
    torch.testing.assert_close(default, explicit)
    with pytest.raises(ValueError, match="reach beyond the model's 2 classes"):
        FinerCAM(one_logit, LAYER, comparison_positions=(1, 2), **transform).attribute(x)


def test_one_label_of_a_multi_label_model(bundled_model, sample_digits):
    """conventions.md: label c of independent sigmoids is read as a binary classifier."""
    x = sample_digits[0][:4]
    label = 3

    def transform(out: torch.Tensor) -> torch.Tensor:
        return two_class_logits(out[:, label])

    with torch.no_grad():
        p = torch.sigmoid(bundled_model(x)[:, label])
    torch.testing.assert_close(
        softmax_confidence(bundled_model, x, output_transform=transform), torch.maximum(p, 1 - p)
    )
    maps = GradCAM(bundled_model, "features.7", output_transform=transform).attribute(
        x, target=torch.ones(4, dtype=torch.long)
    )
    expected = GradCAM(bundled_model, "features.7").attribute(
        x, target=torch.full((4,), label, dtype=torch.long)
    )
    # Grad-CAM of z_c / 2: the same map as Grad-CAM of z_c, halved
    torch.testing.assert_close(maps, expected / 2)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_two_class_logits_can_be_scripted_into_a_torchscript_model(one_logit, sample_digits):
    """A model that applies the helper in its forward (to hand Captum-style tools a
    two-class model) can still be scripted."""

    class Scripted(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return two_class_logits(self.model(x))

    x = sample_digits[0][:3]
    eager = Scripted(one_logit).eval()
    scripted = torch.jit.script(eager)
    torch.testing.assert_close(scripted(x), eager(x))


def test_class_sensitivity_refuses_one_logit_instead_of_comparing_class_0_with_itself(
    one_logit, sample_digits
):
    """The runner-up of a one-output model was the target itself: every similarity came
    out 1 ("the method ignores the class") for maps of one class compared with themselves."""
    x = sample_digits[0][:3]
    with pytest.raises(ValueError, match=r"1 output.*two_class_logits\(model\(x\)\)"):
        class_sensitivity(lambda m: GradCAM(m, LAYER), one_logit, x)
