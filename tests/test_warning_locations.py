"""Warnings point at the user's line, once per call, and say what is true.

Several warnings used a fixed ``stacklevel`` that lands inside the package or inside
Captum's logging wrapper from some entry points: Python's default filters then hide a
DeprecationWarning (shown only when attributed to ``__main__``), and users cannot tell
which of their lines caused a warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency
from torch import nn

from captum_ext.attr import FinerCAM, GradCAM
from captum_ext.data import BUNDLED_CAM_LAYER, log_probabilities
from captum_ext.metrics import (
    GradTrust,
    class_sensitivity,
    deletion,
    gradtrust,
    model_randomisation,
)


def _recorded(call) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return list(caught)


def test_gradtrust_overflow_points_at_the_user_also_through_the_class(bundled_model, sample_digits):
    confident = bundled_model
    x = sample_digits[0][:6] * 20  # logit gaps far beyond float32's exp range
    for call in (lambda: gradtrust(confident, x), lambda: GradTrust(confident).score(x)):
        caught = [w for w in _recorded(call) if "exceeds the range" in str(w.message)]
        assert caught and all(w.filename == __file__ for w in caught)


def test_deprecated_return_curves_is_attributed_to_the_caller(bundled_model, sample_digits):
    x = sample_digits[0][:2]
    maps = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    caught = _recorded(lambda: deletion(bundled_model, x, maps, n_steps=4, return_curves=True))
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert deprecations and all(w.filename == __file__ for w in deprecations)


def test_a_softmax_model_is_named_at_the_users_line_and_the_remedy_works(
    bundled_model, sample_digits
):
    x = sample_digits[0][:4]
    model = nn.Sequential(bundled_model, nn.Softmax(dim=1)).eval()
    caught = _recorded(lambda: GradCAM(model, "0." + BUNDLED_CAM_LAYER).attribute(x))
    named = [w for w in caught if "probabilities" in str(w.message)]
    assert named and all(w.filename == __file__ for w in named)
    # the remedy the warning gives: log-probabilities are the logits up to a shift per row,
    # which the closed form at the last Linear layer allows
    remedied = gradtrust(model, x, output_transform=log_probabilities)
    torch.testing.assert_close(remedied, gradtrust(bundled_model, x), rtol=1e-4, atol=1e-5)


class _NaNFeaturesFirstRow(nn.Module):
    """A linear classifier whose features overflow (NaN) for the first example only."""

    def __init__(self, poison: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(28 * 28, 10)
        self.poison = poison

    def forward(self, x):
        h = x.flatten(1)
        if self.poison:
            h = torch.cat([h[:1] * float("nan"), h[1:]])
        return self.linear(h)


def test_gradtrust_scores_the_finite_rows_of_a_model_that_overflowed_on_one(sample_digits):
    """One NaN row made the last Linear "not the logits" (torch.equal is False with NaN),
    and the whole batch was refused with that false diagnosis, after two NaN warnings."""
    x = sample_digits[0][:4]
    model, clean = _NaNFeaturesFirstRow(True).eval(), _NaNFeaturesFirstRow(False).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = gradtrust(model, x)
    assert len([w for w in caught if "holds NaN" in str(w.message)]) == 1
    torch.testing.assert_close(scores[1:], gradtrust(clean, x)[1:])
    assert bool(torch.isnan(scores[0]))


@pytest.mark.parametrize("check", [model_randomisation, class_sensitivity])
def test_sanity_checks_give_captum_inputs_that_require_gradients(
    check, bundled_model, sample_digits
):
    """The inputs were detached before each explainer call, so Captum's Saliency warned
    "Input Tensor 0 did not already require gradients" at every randomisation step."""
    x = sample_digits[0][:4]
    caught = _recorded(lambda: check(lambda m: Saliency(m), bundled_model, x))
    assert not [w for w in caught if "did not already require gradients" in str(w.message)]


def test_finer_cam_inside_noise_tunnel_counts_rows_not_examples(bundled_model, sample_digits):
    x = sample_digits[0][:3] * 20  # confident: every map vanishes
    caught = _recorded(
        lambda: NoiseTunnel(FinerCAM(bundled_model, BUNDLED_CAM_LAYER)).attribute(
            x, nt_samples=2, stdevs=0.0
        )
    )
    named = [str(w.message) for w in caught if str(w.message).startswith("FinerCAM:")]
    assert named and all("noisy copies" in text for text in named)
