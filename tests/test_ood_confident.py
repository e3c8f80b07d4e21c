"""Out-of-distribution scores on confident models (logit gaps 29 to 9,700).

Max-softmax saturates at 1.0 in float32 on such models, so many in-distribution scores tie;
the energy score keeps the logits' scale. The OOD metrics must handle both, and agree with
the same computation in float64.
"""

from __future__ import annotations

import copy
import math

import torch

from captum_ext.inversion import uncertainty_ue
from captum_ext.metrics import auroc, energy, fpr_at_tpr, softmax_confidence


def _ood_inputs(n: int = 40) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=generator)


def test_energy_and_softmax_are_finite_and_equal_float64(confident_model, sample_digits):
    images, _ = sample_digits
    noise = _ood_inputs()
    wide = copy.deepcopy(confident_model).double()
    for score in (energy, softmax_confidence):
        single = torch.cat([score(confident_model, x) for x in (images, noise)])
        double = torch.cat([score(wide, x.double()) for x in (images, noise)])
        assert torch.isfinite(single).all(), score.__name__
        # the float32 scores equal the float64 ones to float32 precision
        torch.testing.assert_close(single.double(), double, rtol=2e-6, atol=1e-6)


def test_ood_metrics_on_saturated_scores_equal_float64(confident_model, sample_digits):
    images, _ = sample_digits
    noise = _ood_inputs()
    wide = copy.deepcopy(confident_model).double()
    for score in (energy, softmax_confidence):
        single = (score(confident_model, images), score(confident_model, noise))
        double = (score(wide, images.double()), score(wide, noise.double()))
        for metric in (auroc, fpr_at_tpr):
            a, b = metric(*single), metric(*double)
            assert math.isfinite(a) and 0.0 <= a <= 1.0, (score.__name__, metric.__name__)
            if score is energy:  # energy keeps its order in float32
                assert a == b, (score.__name__, metric.__name__, a, b)


def test_tie_uncertainty_of_confident_predictions_is_finite_and_near_zero(
    confident_model, sample_digits
):
    images, _ = sample_digits
    with torch.no_grad():
        probs = confident_model(images).softmax(1)
    ue = uncertainty_ue(probs)
    assert torch.isfinite(ue).all() and (ue >= 0).all() and (ue <= 1).all()
    # UE = 1 - K/(K-1) sum_i (p_i - 1/K)^2, by hand in float64
    p = probs.double()
    k = p.shape[1]
    expected = 1 - k / (k - 1) * (p - 1 / k).pow(2).sum(1)
    torch.testing.assert_close(ue.double(), expected.clamp(0, 1), rtol=0, atol=1e-6)
