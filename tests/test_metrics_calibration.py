"""expected_calibration_error and reliability_diagram: hand cases, an independent float64
numpy computation, and torchmetrics' multiclass calibration error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_ext.metrics import expected_calibration_error, reliability_diagram


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


# ---------------------------------------------------------------- against torchmetrics


@pytest.fixture
def tm_calibration():
    """torchmetrics' classification functions (the ``dev`` extra)."""
    return pytest.importorskip("torchmetrics.functional.classification")


def _away_from_edges(confidence, n_bins, margin=1e-5):
    """True where a confidence is not within ``margin`` of an inner bin edge, nor 1."""
    scaled = confidence * n_bins
    return ((scaled - scaled.round()).abs() > margin * n_bins) & (confidence < 1 - margin)


def _probabilities_with_ties(generator, n, classes):
    """Random softmax rows, some rows repeated (tied confidences across examples) and some
    with two classes sharing the largest probability (tied within a row)."""
    logits = torch.randn(n, classes, generator=generator, dtype=torch.float64) * 2.5
    logits[: n // 8] = logits[n // 8 : 2 * (n // 8)]  # repeated rows
    tied = torch.arange(2 * (n // 8), 3 * (n // 8))
    logits[tied, 1] = logits[tied, 0] = logits[tied].max(dim=1).values + 0.5
    return logits.softmax(dim=1)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [1, 5, 15])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_torchmetrics_away_from_bin_edges(norm, n_bins, seed, tm_calibration):
    gen = torch.Generator().manual_seed(seed)
    classes = 3 + seed
    probabilities = _probabilities_with_ties(gen, 400, classes)
    labels = torch.randint(0, classes, (400,), generator=gen)
    # torchmetrics works in float32: compare on the float32 values, away from the edges,
    # where both bin the same way
    probabilities = probabilities.float()
    keep = _away_from_edges(probabilities.max(dim=1).values.double(), n_bins)
    probabilities, labels = probabilities[keep], labels[keep]
    # the within-row ties survive, and the first tied class is the prediction for both
    top2 = probabilities.topk(2, dim=1).values
    assert bool((top2[:, 0] == top2[:, 1]).any())
    expected = tm_calibration.multiclass_calibration_error(
        probabilities, labels, num_classes=classes, n_bins=n_bins, norm=norm
    )
    got = expected_calibration_error(probabilities, labels, n_bins=n_bins, norm=norm)
    assert got == pytest.approx(float(expected), abs=2e-6)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [2, 4, 8, 16])
def test_bin_edge_confidences_mirror_torchmetrics(norm, n_bins, tm_calibration):
    # confidences on the bin edges k / M (exact in float32): torchmetrics' bins are closed on
    # the left, ours on the right, so the identity is the mirror image conf -> 1 - conf
    gen = torch.Generator().manual_seed(n_bins)
    confidence = torch.randint(1, n_bins + 1, (300,), generator=gen).double() / n_bins
    confidence[:50] = torch.rand(50, generator=gen, dtype=torch.float64)  # and some inside
    confidence[:50] = (confidence[:50] * 64).round().clamp_min(1) / 64  # exact in float32
    correct = torch.rand(300, generator=gen) < confidence
    expected = tm_calibration.binary_calibration_error(
        (1 - confidence).float(), (~correct).long(), n_bins=n_bins, norm=norm
    )
    got = expected_calibration_error(confidence, correct, n_bins=n_bins, norm=norm)
    assert got == pytest.approx(float(expected), abs=2e-6)
    # ... and our reference loop agrees with the edges going into the lower bin
    assert got == pytest.approx(numpy_calibration(confidence, correct, n_bins, norm), abs=1e-12)


def test_bin_edges_are_where_torchmetrics_differs(tm_calibration):
    # two confidences on the edge 0.5 with 2 bins: ours puts them in (0, 0.5], torchmetrics
    # in [0.5, 1), together with the 0.75 prediction, so the two values differ
    confidence = torch.tensor([0.5, 0.5, 0.75])
    correct = torch.tensor([1, 1, 0])
    ours = expected_calibration_error(confidence, correct, n_bins=2)
    theirs = float(tm_calibration.binary_calibration_error(confidence, correct, n_bins=2))
    assert ours == pytest.approx((2 * 0.5 + 0.75) / 3)
    assert theirs == pytest.approx(abs(2 / 3 - 1.75 / 3))


# ---------------------------------------------------------------- reliability diagram


@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_reliability_diagram_bins_and_identity(n_bins):
    gen = torch.Generator().manual_seed(n_bins)
    probabilities = _probabilities_with_ties(gen, 300, 5)
    labels = torch.randint(0, 5, (300,), generator=gen)
    diagram = reliability_diagram(probabilities, labels, n_bins=n_bins)
    assert diagram.n_bins == n_bins
    assert torch.allclose(diagram.bin_edges, torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))
    assert diagram.count.dtype == torch.int64 and int(diagram.count.sum()) == 300
    # per bin, against explicit loops
    conf, pred = probabilities.max(dim=1)
    correct = (pred == labels).double()
    for m in range(n_bins):
        inside = (conf > m / n_bins) & (conf <= (m + 1) / n_bins)
        assert int(diagram.count[m]) == int(inside.sum())
        if inside.any():
            assert float(diagram.confidence[m]) == pytest.approx(float(conf[inside].mean()))
            assert float(diagram.accuracy[m]) == pytest.approx(float(correct[inside].mean()))
        else:
            assert bool(diagram.confidence[m].isnan()) and bool(diagram.accuracy[m].isnan())
    for norm in ("l1", "l2", "max"):
        ece = expected_calibration_error(probabilities, labels, n_bins=n_bins, norm=norm)
        assert diagram.calibration_error(norm) == pytest.approx(ece, abs=1e-12)
        expected = numpy_calibration(conf.numpy(), correct.numpy(), n_bins, norm)
        assert diagram.calibration_error(norm) == pytest.approx(expected, abs=1e-12)


def test_reliability_diagram_of_the_bundled_model(bundled_model, bundled_digits):
    images, labels = bundled_digits
    with torch.no_grad():
        probabilities = bundled_model(images).softmax(dim=1)
    diagram = reliability_diagram(probabilities, labels)
    assert diagram.calibration_error() == pytest.approx(
        expected_calibration_error(probabilities, labels), abs=1e-12
    )
    # a confident model: most predictions in the top bin, where accuracy is high
    assert int(diagram.count[-1]) >= 30 and float(diagram.accuracy[-1]) >= 0.9
    gap = diagram.gap
    filled = diagram.count > 0
    assert torch.allclose(gap[filled], (diagram.accuracy - diagram.confidence)[filled])


def test_reliability_diagram_bad_input():
    p = torch.tensor([[0.9, 0.1]])
    with pytest.raises(ValueError, match="`n_bins`"):
        reliability_diagram(p, torch.tensor([0]), n_bins=0)
    with pytest.raises(ValueError, match="`labels`"):
        reliability_diagram(p, torch.tensor([5]))
    with pytest.raises(ValueError, match="`norm`"):
        reliability_diagram(p, torch.tensor([0])).calibration_error("l3")


def test_bins_follow_the_reported_edges_also_where_c_times_m_rounds():
    """Bin m is documented as (bin_edges[m], bin_edges[m + 1]]; the binning used ceil(c M) - 1,
    which disagrees with the linspace edges where c M rounds (0.55 * 20 =
    11.000000000000002, while bin_edges[11] = 0.5499999999999999)."""
    for n_bins, confidence in ((20, 0.55), (25, 0.28), (25, 0.68), (10, 0.7), (15, 0.0)):
        diagram = reliability_diagram(np.array([confidence]), np.array([1]), n_bins=n_bins)
        (m,) = diagram.count.nonzero()[:, 0].tolist()
        edges = diagram.bin_edges
        assert float(edges[m]) < confidence <= float(edges[m + 1]) or (m == 0 and confidence == 0)
