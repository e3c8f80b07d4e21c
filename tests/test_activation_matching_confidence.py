"""The confidence hinge of ActivationMatchingMask (issue 13): l_conf * max(0, lo_y(x) - lo_y(e))
with lo_y = log(p_y / (1 - p_y)), by hand, inside the whole objective, as a ``weights`` key,
and its argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import make_tiny_cnn
from torch import nn

from captum_ext.attr import ActivationMatchingMask, MaskLossWeights
from captum_ext.attr import _activation_matching_loss as loss_module

pytestmark = pytest.mark.usefixtures("one_thread")


def softmax(z):
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def log_odds(z, y):
    p = softmax(z)[y]
    return math.log(p / (1 - p))


def test_hinge_equals_a_hand_computation_and_is_zero_when_more_confident():
    z_ref = torch.tensor([[0.0, 3.0, -1.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[1.0, 2.0, 0.5], [4.0, 0.0, -1.0]], dtype=torch.float64)
    target = torch.tensor([1, 0])
    got = loss_module.confidence_hinge(z_ref, z, target)
    first = log_odds([0.0, 3.0, -1.0], 1) - log_odds([1.0, 2.0, 0.5], 1)
    assert first > 0
    assert got[0].item() == pytest.approx(first, rel=1e-12)
    # the second explanation is more confident in its class than the image: no penalty
    assert softmax([4.0, 0.0, -1.0])[0] > softmax([2.0, 0.0, 0.0])[0]
    assert got[1].item() == 0.0


def test_log_odds_do_not_saturate_near_certainty():
    """At p_y = 0.9997 against 0.999 the difference of p is 7e-4, of the log-odds 1.2; the
    log-odds come from the logits, so even p_y = 1 - 1e-30 is exact."""
    z = torch.tensor([[70.0, 1.0, 0.0]], dtype=torch.float64)
    expected = 70.0 - math.log(math.exp(1.0) + 1.0)
    assert loss_module.log_odds(z, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)
    z_ref = torch.tensor([[8.9, 0.0, 0.0]], dtype=torch.float64)  # p_y about 0.9997
    z_e = torch.tensor([[7.6, 0.0, 0.0]], dtype=torch.float64)  # p_y about 0.999
    gap = loss_module.confidence_hinge(z_ref, z_e, torch.tensor([0])).item()
    assert gap == pytest.approx(log_odds([8.9, 0.0, 0.0], 0) - log_odds([7.6, 0.0, 0.0], 0))
    assert gap > 1.0


def test_objective_adds_the_weighted_hinge_and_only_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double().eval()
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]], dtype=torch.float64)
    p = torch.tensor([[[[0.7, 0.2], [0.4, 0.9]]]], dtype=torch.float64)
    baseline = torch.tensor(-0.5, dtype=torch.float64)
    base = dict(act=0.0, ce=1.0, kl=0.3, area=2.0, bin=0.5, tv=1.0, rob=0.0)
    explainer = ActivationMatchingMask(model, [], weights={**base, "conf": 0.0})
    reference = explainer._reference(x)
    target = reference.logits.argmax(1)

    def objective(conf):
        return loss_module.mask_objective(
            model,
            [],
            [],
            MaskLossWeights(**base, conf=conf),
            x,
            p,
            target,
            reference,
            baseline,
            None,
            1.0,
        )

    without, _, _ = objective(0.0)
    with_hinge, terms, _ = objective(7.0)
    # the hinge by hand: e keeps the two pixels with p > 0.5, the rest at the baseline
    W, c = model[1].weight.detach(), model[1].bias.detach()
    flat_x = [1.0, -2.0, 0.5, 3.0]
    flat_e = [1.0, -0.5, -0.5, 3.0]
    zx = [sum(W[k, j].item() * flat_x[j] for j in range(4)) + c[k].item() for k in range(3)]
    ze = [sum(W[k, j].item() * flat_e[j] for j in range(4)) + c[k].item() for k in range(3)]
    y = int(target)
    hand = max(0.0, log_odds(zx, y) - log_odds(ze, y))
    assert hand > 0  # e is less confident than x here: the term is on
    assert terms["conf"].item() == pytest.approx(hand, rel=1e-9, abs=1e-15)
    assert with_hinge.item() == pytest.approx(without.item() + 7.0 * hand, rel=1e-12)


def test_conf_is_a_weights_key_with_checked_values():
    model = make_tiny_cnn()
    base = dict(act=1, ce=1, kl=1, area=1, bin=1, tv=1, rob=0)
    explainer = ActivationMatchingMask(model, "head", weights={**base, "conf": 3})
    assert explainer.weights.conf == 3.0
    assert ActivationMatchingMask(model, "head", weights=base).weights.conf == 0.0
    with pytest.raises(ValueError, match="`weights\\['conf'\\]`"):
        ActivationMatchingMask(model, "head", weights={**base, "conf": -1.0})
    with pytest.raises(TypeError, match="`weights\\['conf'\\]`"):
        ActivationMatchingMask(model, "head", weights={**base, "conf": "high"})
