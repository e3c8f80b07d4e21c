"""Accuracy-retention curves, AUAC / AUFC and the misprediction AUROC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score, roc_auc_score

from captum_ext.metrics import (
    RetentionCurve,
    accuracy_retention_curve,
    auac,
    aufc,
    aupr,
    auroc,
    fpr_at_tpr,
    misprediction_auroc,
)


def test_hand_computed_tiny_curve():
    scores = [0.1, 0.9, 0.5, 0.3]
    correct = [False, True, False, True]
    # ranked by score: 0.9 (T), 0.5 (F), 0.3 (T), 0.1 (F)
    curve = accuracy_retention_curve(scores, correct, percentiles=[0, 25, 50, 60, 75, 99])
    assert isinstance(curve, RetentionCurve)
    assert curve.kept.tolist() == [4, 3, 2, 2, 1, 1]  # ceil((100 - t) * 4 / 100)
    assert curve.accuracy.tolist() == pytest.approx([2 / 4, 2 / 3, 1 / 2, 1 / 2, 1, 1])
    assert curve.macro_f1 is None


def test_perfect_score_exact_auac():
    # 100 examples, 80 correct, every correct one scored above every wrong one:
    # m_t = 100 - t kept, accuracy(t) = min(1, 80 / (100 - t))
    n, n_correct = 100, 80
    correct = torch.arange(n) < n_correct
    scores = (
        torch.where(correct, 1.0, 0.0)
        + torch.rand(n, generator=torch.Generator().manual_seed(0)) * 0.5
    )
    expected = 100 * sum(min(1.0, n_correct / (n - t)) for t in range(100)) / 100
    assert auac(scores, correct) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(80 + 80 * sum(1 / j for j in range(81, 101)))
    assert expected == pytest.approx(97.7519, abs=1e-4)
    assert misprediction_auroc(scores, correct) == 1.0
    # the inverted score is the worst case
    assert auac(-scores, correct) < 80.0


@pytest.mark.parametrize("seed", range(5))
def test_random_score_gives_plain_accuracy(seed):
    g = torch.Generator().manual_seed(seed)
    n = 4000
    correct = torch.rand(n, generator=g) < 0.7
    scores = torch.rand(n, generator=g)
    accuracy = 100 * correct.double().mean().item()
    assert abs(auac(scores, correct) - accuracy) < 3.0
    assert abs(misprediction_auroc(scores, correct) - 0.5) < 0.05


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_constant_score_is_plain_accuracy_at_every_percentile(correct):
    """Ties are split in expectation: the curve does not depend on the order of examples."""
    curve = accuracy_retention_curve([0.5] * len(correct), correct)
    assert torch.allclose(curve.accuracy, torch.full((100,), sum(correct) / len(correct)).double())


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=2, max_size=40),
    st.randoms(use_true_random=False),
)
def test_curve_is_order_independent_with_ties(rows, rng):
    scores = [s for s, _ in rows]
    correct = [c for _, c in rows]
    permutation = list(range(len(rows)))
    rng.shuffle(permutation)
    a = accuracy_retention_curve(scores, correct).accuracy
    b = accuracy_retention_curve(
        [scores[i] for i in permutation], [correct[i] for i in permutation]
    ).accuracy
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tie_straddling_the_cut_counts_fractionally():
    scores = [3.0, 2.0, 2.0, 2.0, 1.0]
    correct = [True, True, False, False, True]
    # t = 60: keep 2 = the 3.0 example plus one of three tied 2.0 examples (1/3 correct)
    curve = accuracy_retention_curve(scores, correct, percentiles=[60])
    assert curve.accuracy.item() == pytest.approx((1 + 1 / 3) / 2)


def test_macro_f1_matches_sklearn_on_the_kept_set():
    rng = np.random.default_rng(0)
    n = 200
    labels = rng.integers(0, 4, n)
    predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, 4, n))
    scores = rng.random(n)  # distinct: no tie at any cut
    percentiles = [0, 10, 33, 50, 75, 90, 99]
    curve = accuracy_retention_curve(
        scores,
        predictions == labels,
        predictions=predictions,
        labels=labels,
        percentiles=percentiles,
    )
    order = np.argsort(-scores, kind="stable")
    for t, m, acc, f1 in zip(percentiles, curve.kept, curve.accuracy, curve.macro_f1):
        assert int(m) == math.ceil((100 - t) * n / 100)
        keep = order[: int(m)]
        assert acc.item() == pytest.approx(np.mean(predictions[keep] == labels[keep]))
        expected = f1_score(labels[keep], predictions[keep], average="macro")
        assert f1.item() == pytest.approx(expected, rel=1e-12)
    value = aufc(scores, predictions, labels)
    full = accuracy_retention_curve(
        scores, predictions == labels, predictions=predictions, labels=labels
    )
    assert value == pytest.approx(100 * full.macro_f1.mean().item())


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    correct = rng.random(n) < 0.6
    scores = np.round(rng.random(n) + 0.3 * correct, 1)  # many ties
    assert misprediction_auroc(torch.tensor(scores), torch.tensor(correct)) == pytest.approx(
        roc_auc_score(correct, scores), rel=1e-12
    )


def test_bad_input():
    with pytest.raises(ValueError, match="`scores` has 3 entries but `correct` has 2"):
        auac([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="`scores` contains NaN"):
        auac([0.1, float("nan")], [True, False])
    with pytest.raises(ValueError, match="`correct` must hold booleans"):
        auac([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="`percentiles`"):
        accuracy_retention_curve([0.1, 0.2], [True, False], percentiles=[100])
    with pytest.raises(ValueError, match="both correct and wrong"):
        misprediction_auroc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="`scores` must be 1-D"):
        auac([[0.1, 0.2]], [True, False])
    with pytest.raises(ValueError, match="`predictions`"):
        aufc([0.1, 0.2], [1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="both `predictions` and `labels`"):
        accuracy_retention_curve([0.1, 0.2], [True, False], predictions=[1, 0])
    with pytest.raises(ValueError, match="empty"):
        auac([], [])


# ---------------------------------------------------------------------------------------------
# out-of-distribution detection: auroc, aupr, fpr_at_tpr against scikit-learn


def _sklearn_ood(in_scores, out_scores, tpr=0.95):
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    s = np.r_[in_scores, out_scores]
    fpr, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
        "fpr": fpr[tpr_curve >= tpr].min(),
    }


@pytest.mark.parametrize("seed", range(6))
def test_ood_metrics_equal_sklearn_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n_in, n_out = rng.integers(5, 300, size=2)
    # few distinct values: many ties within and across the two sets
    in_scores = rng.integers(0, 8, n_in).astype(float) + (seed % 2) * rng.normal(size=n_in)
    out_scores = rng.integers(-3, 5, n_out).astype(float)
    expected = _sklearn_ood(in_scores, out_scores)
    assert auroc(in_scores, out_scores) == pytest.approx(expected["auroc"], abs=1e-12)
    assert aupr(in_scores, out_scores) == pytest.approx(expected["aupr_in"], abs=1e-12)
    assert aupr(in_scores, out_scores, positive="out") == pytest.approx(
        expected["aupr_out"], abs=1e-12
    )
    assert fpr_at_tpr(in_scores, out_scores) == pytest.approx(expected["fpr"], abs=1e-12)
    for level in (0.5, 0.8, 1.0):
        assert fpr_at_tpr(in_scores, out_scores, tpr=level) == pytest.approx(
            _sklearn_ood(in_scores, out_scores, level)["fpr"], abs=1e-12
        )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-4, 4), min_size=1, max_size=40),
    st.lists(st.integers(-4, 4), min_size=1, max_size=40),
)
def test_ood_metrics_equal_sklearn_property(in_values, out_values):
    in_scores, out_scores = np.array(in_values, float), np.array(out_values, float)
    expected = _sklearn_ood(in_scores, out_scores)
    assert auroc(torch.tensor(in_scores), torch.tensor(out_scores)) == pytest.approx(
        expected["auroc"], abs=1e-12
    )
    assert aupr(in_scores, out_scores) == pytest.approx(expected["aupr_in"], abs=1e-12)
    assert aupr(in_scores, out_scores, positive="out") == pytest.approx(
        expected["aupr_out"], abs=1e-12
    )
    assert fpr_at_tpr(in_scores, out_scores) == pytest.approx(expected["fpr"], abs=1e-12)


def test_ood_metrics_on_separated_and_identical_scores():
    inside, outside = torch.arange(10.0, 30.0), torch.arange(0.0, 10.0)
    assert auroc(inside, outside) == 1.0
    assert aupr(inside, outside) == 1.0 and aupr(inside, outside, positive="out") == 1.0
    assert fpr_at_tpr(inside, outside) == 0.0
    assert auroc(outside, inside) == 0.0 and fpr_at_tpr(outside, inside) == 1.0
    same = torch.zeros(4)
    assert auroc(same, torch.zeros(6)) == 0.5
    assert aupr(same, torch.zeros(6)) == pytest.approx(0.4)  # the share of positives
    assert fpr_at_tpr(same, torch.zeros(6)) == 1.0


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: auroc([], [1.0]), "`in_scores` is empty"),
        (lambda: auroc([1.0], [[1.0]]), "`out_scores` must be 1-D"),
        (lambda: aupr([1.0], [float("nan")]), "`out_scores` contains NaN"),
        (lambda: aupr([1.0], [0.0], positive="ood"), "`positive`='ood'"),
        (
            lambda: fpr_at_tpr([1.0], [0.0], tpr=0.0),
            "`tpr`=0.0: expected a finite number > 0 and <= 1",
        ),
        (lambda: fpr_at_tpr([1.0], [0.0], tpr=True), "`tpr` must be a number, got bool"),
    ],
)
def test_ood_metric_errors_name_the_argument(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_python_float_lists_are_not_rounded_to_float32():
    """torch.as_tensor([...floats...]) is float32: scores that differ in the ninth digit
    (pandas' .tolist() of float64 columns) became ties, and auroc gave 0.5 where sklearn
    gives 0.75. Lists are read in float64, as numpy arrays already were."""
    from sklearn.metrics import average_precision_score

    from captum_ext.metrics import AUROC, expected_calibration_error

    inside, outside = [1 + 1e-9, 2 + 1e-9], [1.0, 2.0]
    truth = [1, 1, 0, 0]
    assert auroc(inside, outside) == pytest.approx(roc_auc_score(truth, inside + outside))
    assert auroc(inside, outside) == auroc(np.array(inside), np.array(outside)) == 0.75
    assert aupr(inside, outside) == pytest.approx(average_precision_score(truth, inside + outside))
    assert auroc([40 + 1e-6], [40.0]) == 1.0
    correct = [True, False, True]
    assert auac([0.3 + 1e-9, 0.3, 0.1], correct) == auac(np.array([0.3 + 1e-9, 0.3, 0.1]), correct)
    metric = AUROC()
    metric.update(inside, outside)
    assert metric.compute() == 0.75
    assert expected_calibration_error([0.8], [0]) == 0.8


def test_fpr_at_tpr_takes_the_positive_class_as_an_argument():
    """OOD papers disagree on which class is positive for FPR@95TPR (USER_NEEDS 9); aupr had
    `positive`, fpr_at_tpr did not. With "out" the OOD examples are the positives: sklearn's
    roc_curve with OOD labelled 1 and the scores negated."""
    from sklearn.metrics import roc_curve

    from captum_ext.metrics import FPRAtTPR

    rng = np.random.default_rng(0)
    inside, outside = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.5, 200)
    for positive, labels, values in (
        ("in", np.r_[np.ones(300), np.zeros(200)], np.r_[inside, outside]),
        ("out", np.r_[np.zeros(300), np.ones(200)], -np.r_[inside, outside]),
    ):
        fpr, tpr, _ = roc_curve(labels, values)
        expected = fpr[tpr >= 0.95].min()
        assert fpr_at_tpr(inside, outside, positive=positive) == pytest.approx(expected)
        metric = FPRAtTPR(positive=positive)
        metric.update(inside[:100], outside[:50])
        metric.update(inside[100:], outside[50:])
        assert metric.compute() == pytest.approx(expected)
    assert fpr_at_tpr(inside, outside, positive="out") == fpr_at_tpr(-outside, -inside)
    assert fpr_at_tpr(inside, outside) != fpr_at_tpr(inside, outside, positive="out")
    with pytest.raises(ValueError, match="`positive`='ood'"):
        fpr_at_tpr(inside, outside, positive="ood")
    with pytest.raises(ValueError, match="`positive`='ood'"):
        FPRAtTPR(positive="ood")


def test_aufc_names_the_scores_and_predictions_that_disagree():
    with pytest.raises(ValueError, match="`scores` has 2 entries but `predictions` has 3"):
        aufc([0.1, 0.2], [0, 1, 0], [0, 0, 0])
