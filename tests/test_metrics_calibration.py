"""expected_calibration_error: hand cases and an independent float64 numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_ext.metrics import expected_calibration_error


def numpy_calibration(confidence, correct, n_bins, norm):
    """Equal-width bins ((m-1)/M, m/M], written with explicit loops over the bins."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    gaps, weights = [], []
    for m in range(n_bins):
        low, high = m / n_bins, (m + 1) / n_bins
        inside = (confidence > low) & (confidence <= high)
        if m == 0:
            inside |= confidence == 0.0
        if inside.any():
            gaps.append(abs(correct[inside].mean() - confidence[inside].mean()))
            weights.append(inside.sum() / confidence.size)
    gaps, weights = np.array(gaps), np.array(weights)
    if norm == "l1":
        return float((weights * gaps).sum())
    if norm == "l2":
        return float(np.sqrt((weights * gaps**2).sum()))
    return float(gaps.max())


def test_hand_cases():
    # perfectly calibrated: confidence 0.75 in one bin with 3 of 4 correct
    conf = torch.full((4,), 0.75, dtype=torch.float64)
    assert expected_calibration_error(conf, torch.tensor([1, 1, 1, 0])) == pytest.approx(0.0)
    # always right at confidence 0.6: gap 0.4 everywhere
    assert expected_calibration_error(
        torch.full((5,), 0.6, dtype=torch.float64), torch.ones(5, dtype=torch.bool)
    ) == pytest.approx(0.4)
    # (N, C) probabilities: confidences 0.9 (right), 0.6 (wrong), 0.7 (right), each alone
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    assert expected_calibration_error(p, y) == pytest.approx((0.1 + 0.6 + 0.3) / 3)
    assert expected_calibration_error(p, y, norm="max") == pytest.approx(0.6)
    l2 = ((0.01 + 0.36 + 0.09) / 3) ** 0.5
    assert expected_calibration_error(p, y, norm="l2") == pytest.approx(l2)
    # one bin: |mean correct - mean confidence| = |2/3 - 0.7333|
    assert expected_calibration_error(p, y, n_bins=1) == pytest.approx(abs(2 / 3 - 2.2 / 3))
    # a confidence on a bin edge (0.5 with 2 bins) falls in the lower bin ((0, 0.5])
    conf = torch.tensor([0.5, 1.0], dtype=torch.float64)
    got = expected_calibration_error(conf, torch.tensor([0, 1]), n_bins=2)
    assert got == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_equals_numpy_reference(norm, n_bins):
    gen = torch.Generator().manual_seed(n_bins)
    logits = torch.randn(257, 7, generator=gen, dtype=torch.float64) * 3
    probabilities = logits.softmax(dim=1)
    labels = torch.randint(0, 7, (257,), generator=gen)
    conf, pred = probabilities.max(dim=1)
    expected = numpy_calibration(conf.numpy(), (pred == labels).numpy(), n_bins, norm)
    got = expected_calibration_error(probabilities, labels, n_bins=n_bins, norm=norm)
    assert got == pytest.approx(expected, abs=1e-12)
    # (N,) confidences with correctness give the same
    same = expected_calibration_error(conf, pred == labels, n_bins=n_bins, norm=norm)
    assert same == pytest.approx(expected, abs=1e-12)


def test_bad_input_names_the_argument():
    p = torch.tensor([[0.9, 0.1]])
    with pytest.raises(ValueError, match="`norm`"):
        expected_calibration_error(p, torch.tensor([0]), norm="l3")
    with pytest.raises(ValueError, match="`n_bins`"):
        expected_calibration_error(p, torch.tensor([0]), n_bins=0)
    with pytest.raises(ValueError, match="`labels`"):
        expected_calibration_error(p, torch.tensor([2]))
    with pytest.raises(ValueError, match="`labels`"):
        expected_calibration_error(torch.tensor([0.4]), torch.tensor([3]))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        expected_calibration_error(torch.tensor([1.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="examples"):
        expected_calibration_error(p, torch.tensor([0, 1]))
