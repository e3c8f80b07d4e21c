"""Models that end in a softmax (deployed and Keras-style models often do).

Every method reads the model's output as logits. On probabilities its softmax is a second one:
on the bundled model behind ``nn.Softmax``, ContrastCAM's maps correlated 0.18-0.73 with the
logits model's, and deletion curves flattened towards 1/C (AUC 0.098-0.109 on four digits
against 0.065-0.155), all without a word. A warning now names the cause and the remedy,
``output_transform=captum_ext.data.log_probabilities`` (log-probabilities are logits:
``softmax(log p) = p``; plain ``torch.log`` gives NaN maps where a confident model's
probabilities underflow to 0).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_ext._utils.batched_grad import PROBABILITIES_WARNING
from captum_ext.attr import ContrastCAM, GradCAM
from captum_ext.data import log_probabilities
from captum_ext.metrics import deletion, softmax_confidence

LAYER = "features.7"


def _probabilities_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if str(w.message).startswith(PROBABILITIES_WARNING)]


@pytest.fixture
def softmax_model(bundled_model):
    return nn.Sequential(bundled_model, nn.Softmax(dim=1)).eval()


CALLS = {
    "ContrastCAM": lambda m, x, y, layer: ContrastCAM(m, layer).attribute(x, contrast=(y + 1) % 10),
    "GradCAM": lambda m, x, y, layer: GradCAM(m, layer).attribute(x, target=y),
    "deletion": lambda m, x, y, layer: deletion(m, x, torch.rand(x.shape[0], 1, 28, 28), target=y),
    "softmax_confidence": lambda m, x, y, layer: softmax_confidence(m, x),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_softmax_at_the_end_is_named(name, softmax_model, bundled_model, sample_digits):
    x, y = sample_digits[0][:4], sample_digits[1][:4]
    messages = _probabilities_warnings(lambda: CALLS[name](softmax_model, x, y, f"0.{LAYER}"))
    assert messages and "log_probabilities" in messages[0]  # output_transform=, or wrap
    assert not _probabilities_warnings(lambda: CALLS[name](bundled_model, x, y, LAYER))


def test_the_named_remedy_gives_the_logits_model_s_maps(
    softmax_model, bundled_model, sample_digits
):
    x, y = sample_digits[0][:8], sample_digits[1][:8]
    expected = ContrastCAM(bundled_model, LAYER).attribute(x, contrast=(y + 1) % 10)
    cam = ContrastCAM(softmax_model, f"0.{LAYER}", output_transform=log_probabilities)
    got = cam.attribute(x, contrast=(y + 1) % 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert not _probabilities_warnings(lambda: cam.attribute(x, contrast=(y + 1) % 10))


def test_multi_label_sigmoid_outputs_are_not_taken_for_probabilities(bundled_model, sample_digits):
    """Each entry in [0, 1] but rows not summing to 1: independent labels, no warning."""
    x, y = sample_digits[0][:4], sample_digits[1][:4]
    sigmoid_model = nn.Sequential(bundled_model, nn.Sigmoid()).eval()
    assert not _probabilities_warnings(
        lambda: GradCAM(sigmoid_model, f"0.{LAYER}").attribute(x, target=y)
    )


def test_functions_without_output_transform_say_to_wrap_the_model(softmax_model, sample_digits):
    from captum_ext._utils.batched_grad import run_forward

    x = sample_digits[0][:2]
    messages = _probabilities_warnings(
        lambda: run_forward(softmax_model, (x,), None, takes_output_transform=False)
    )
    assert messages and "lambda x: captum_ext.data.log_probabilities(model(x))" in messages[0]


def test_with_logits_output_reads_probabilities_as_log_probabilities(
    softmax_model, bundled_model, sample_digits
):
    """What `captum-ext report` and `score` do with such a model."""
    from captum_ext.data import LogitsOutput, with_logits_output

    x, y = sample_digits[0][:8], sample_digits[1][:8]
    wrapped, adapted = with_logits_output(softmax_model, x[:2])
    assert adapted and isinstance(wrapped, LogitsOutput) and wrapped.reads == "probabilities"
    with torch.no_grad():
        torch.testing.assert_close(
            wrapped(x).softmax(1), bundled_model(x).softmax(1), rtol=1e-5, atol=1e-7
        )
    expected = ContrastCAM(bundled_model, LAYER).attribute(x, contrast=(y + 1) % 10)
    got = []
    assert not _probabilities_warnings(
        lambda: got.append(ContrastCAM(wrapped, f"0.{LAYER}").attribute(x, contrast=(y + 1) % 10))
    )
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # a probability of exactly 0 (underflow) gives a finite logit
    zero = LogitsOutput(nn.Identity(), reads="probabilities")(torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(zero).all() and zero[0, 1] < -80
    with pytest.raises(ValueError, match="`reads`"):
        LogitsOutput(bundled_model, reads="softmax")


def test_a_confident_softmax_model_is_told_that_underflowed_classes_are_lost(sample_digits):
    """Logit gaps of 29 and more: some probabilities are exactly 0. ``torch.log`` gave NaN
    maps; ``log_probabilities`` keeps them finite, and the warning says that no transform
    brings those classes back (the remedy is the logits before the softmax)."""
    from _helpers import make_confident_model

    from captum_ext.data import with_logits_output

    x, y = sample_digits[0][:4], sample_digits[1][:4]
    confident = nn.Sequential(make_confident_model(29.0), nn.Softmax(dim=1)).eval()
    with torch.no_grad():
        assert (confident(x) == 0).any()
    contrast = (y + 1) % 10
    nan_maps = ContrastCAM(confident, f"0.{LAYER}", output_transform=torch.log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isnan(nan_maps.attribute(x, contrast=contrast)).any()
    messages = _probabilities_warnings(lambda: softmax_confidence(confident, x))
    assert messages and "exactly 0" in messages[0] and "without its final softmax" in messages[0]
    cam = ContrastCAM(confident, f"0.{LAYER}", output_transform=log_probabilities)
    with pytest.warns(UserWarning, match="exactly zero"):  # the contrasts underflowed: lost
        assert torch.isfinite(cam.attribute(x, contrast=contrast)).all()
    with pytest.warns(UserWarning, match="exactly 0"):
        wrapped, _ = with_logits_output(confident, x)
    assert wrapped.reads == "probabilities"
