r"""Misprediction and out-of-distribution detection: accuracy-retention curves (AUAC, AUFC),
AUROC, AUPR and FPR at 95 % TPR.

A trust score is good when the examples it trusts most are the correctly classified ones.
Following Prabhushankar and AlRegib (IEEE MIPR 2024, arXiv 2405.13758), the examples are
ranked by score; for each percentile t the examples above the t-th percentile are kept and the
accuracy (and macro F1) of the kept set is recorded. The areas under these curves are AUAC and
AUFC, in percent. Scores follow the convention of :mod:`captum_ext.metrics.trust`: higher =
more trusted; the correctly classified examples are the positive class.

Out-of-distribution detection (:func:`auroc`, :func:`aupr`, :func:`fpr_at_tpr`) uses the same
convention: scores where higher means *more in-distribution*, computed separately on
in-distribution and out-of-distribution examples, with the in-distribution examples as the
positive class unless said otherwise.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from captum_ext._utils.caller import user_stacklevel
from captum_ext._utils.precision import array_like_tensor
from captum_ext._utils.validation import check_number

__all__ = [
    "RetentionCurve",
    "accuracy_retention_curve",
    "auac",
    "aufc",
    "aupr",
    "auroc",
    "fpr_at_tpr",
    "misprediction_auroc",
]


class RetentionCurve(NamedTuple):
    """What :func:`accuracy_retention_curve` returns."""

    percentiles: Tensor
    """(T,) the percentiles t, in [0, 100)."""
    kept: Tensor
    """(T,) number of examples kept at each percentile, ceil((100 - t) N / 100)."""
    accuracy: Tensor
    """(T,) accuracy of the kept examples, in [0, 1]."""
    macro_f1: Tensor | None
    """(T,) macro F1 of the kept examples; None unless ``predictions`` and ``labels`` given."""


def _vector(values: Any, argument: str, *, dtype=None) -> Tensor:
    try:
        tensor = array_like_tensor(values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`{argument}` must be a 1-D tensor or array-like: {error}") from None
    tensor = tensor.detach()
    if tensor.dim() != 1:
        raise ValueError(
            f"`{argument}` must be 1-D (one value per example), got {tuple(tensor.shape)}."
        )
    if tensor.numel() == 0:
        raise ValueError(f"`{argument}` is empty; expected at least one example.")
    return tensor if dtype is None else tensor.to(dtype)


#: integers beyond this magnitude do not all have a float64 of their own (ranked in float64,
#: 2**53 + 1 and 2**53 would tie)
_EXACT_INTEGERS = 2**53


def checked_scores(tensor: Tensor, argument: str) -> Tensor:
    """``tensor`` (scores, any shape) if it holds real numbers that float64 ranks exactly:
    booleans and complex numbers are refused, as are integers beyond 2**53 in magnitude."""
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"`{argument}` must be real numbers, got {tensor.dtype}.")
    if not tensor.is_floating_point() and tensor.numel():
        # in numpy: torch's abs() overflows at int64's minimum, and torch has neither abs()
        # nor max() for uint16/32/64
        values = tensor.detach().cpu().numpy()
        largest = max(int(values.max()), -int(values.min()))
        if largest > _EXACT_INTEGERS:
            raise ValueError(
                f"`{argument}` holds integers up to {largest} in magnitude; beyond 2**53 "
                "float64 (in which the scores are ranked) rounds distinct integers to equal "
                "values and would make false ties. Rescale or rank them first."
            )
    return tensor


def finite_scores(scores: Any, argument: str = "scores") -> Tensor:
    """``scores`` as a float64 vector, refused unless real, exactly rankable and finite (the
    check every score metric makes)."""
    tensor = checked_scores(_vector(scores, argument), argument).to(torch.float64)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int((~finite).sum()) - nan
        first = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"`{argument}` contains NaN or infinite values ({nan} NaN and {inf} infinite of "
            f"{tensor.numel()}, the first at index {first}); rank only finite scores. "
            "GradTrust overflows to inf on confident models: pass its log "
            "(gradtrust(..., log=True)), which ranks the examples the same way."
        )
    return tensor


def _correct(correct: Any, n: int) -> Tensor:
    tensor = _vector(correct, "correct")
    if tensor.dtype != torch.bool:
        if tensor.is_complex() or not bool(((tensor == 0) | (tensor == 1)).all()):
            raise ValueError("`correct` must hold booleans (or 0/1): True = correct prediction.")
        tensor = tensor == 1
    if tensor.numel() != n:
        raise ValueError(
            f"`scores` has {n} entries but `correct` has {tensor.numel()}; give one of each per "
            "example."
        )
    return tensor


def _percentiles(percentiles: Any) -> Tensor:
    if percentiles is None:
        return torch.arange(100, dtype=torch.float64)
    tensor = _vector(percentiles, "percentiles", dtype=torch.float64)
    if not bool(((tensor >= 0) & (tensor < 100)).all()):
        raise ValueError("`percentiles` must lie in [0, 100).")
    nonzero = tensor[tensor > 0]
    if nonzero.numel() >= 2 and bool((nonzero <= 1).all()):
        # road, completeness and soundness take fractions: (0.1, 0.5, 0.9) here keeps
        # 99.9 %, 99.5 % and 99.1 % of the examples, not 90 %, 50 % and 10 % (a grid of
        # fractions from 0, np.arange(0, 1, 0.01), too; a single small percentile is taken
        # as meant)
        shown = ", ".join(f"{float(t):g}" for t in tensor[:5])
        warnings.warn(
            f"`percentiles` ({shown}{', ...' if tensor.numel() > 5 else ''}) all lie in "
            "[0, 1]: they are percentiles in [0, 100), not fractions, so 0.1 means 0.1 %, "
            "not 10 % (it keeps 99.9 % of the examples); multiply fractions by 100.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return tensor


def _keep_weights(scores: Tensor, percentiles: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weights (T, N) in descending-score order, the order, and the kept counts (T,)."""
    n = scores.numel()
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked = scores[order]
    # m = ceil((100 - t) N / 100), with a guard against rounding in the float product
    kept = [max(1, math.ceil(n * (100.0 - float(t)) / 100.0 - 1e-9)) for t in percentiles]
    kept_t = torch.tensor(kept, dtype=torch.long)
    # tie groups in descending order: [start, end) of the group holding each position
    _, counts = torch.unique_consecutive(ranked, return_counts=True)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    group = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    positions = torch.arange(n)
    weights = torch.zeros(len(kept), n, dtype=torch.float64)
    for i, m in enumerate(kept):
        g = group[m - 1]
        a, b = int(starts[g]), int(ends[g])
        weights[i] = (positions < a).to(torch.float64)
        weights[i, a:b] = (m - a) / (b - a)
    return weights, order, kept_t


def accuracy_retention_curve(
    scores: Any,
    correct: Any,
    *,
    predictions: Any = None,
    labels: Any = None,
    percentiles: Any = None,
) -> RetentionCurve:
    r"""Accuracy (and macro F1) of the examples a trust score keeps, per percentile.

    For each percentile t (default t = 0, 1, ..., 99) the m_t examples with the highest
    scores are kept and evaluated:

    .. code-block:: text

        m_t         = ceil((100 - t) N / 100)              (at least 1)
        accuracy(t) = (1 / m_t) sum_{kept i} correct_i

    Ties: when the cut falls inside a group of equal scores, each member of that group counts
    with the weight (places left) / (group size), i.e. the curve is the expected value under a
    uniformly random order among tied examples. It therefore does not depend on the order of
    the examples, and a constant score gives the plain accuracy at every t. Macro F1 is
    computed from the (weighted) confusion counts of the kept set, averaging the F1 of every
    class that occurs among its labels or predictions (as scikit-learn's
    ``f1_score(average="macro")`` on the kept examples when there are no ties at the cut).

    Args:
        scores (Tensor or array-like): (N,) finite trust scores, higher = more trusted.
        correct (Tensor or array-like): (N,) booleans (or 0/1), True = correct prediction.
        predictions (Tensor or array-like, optional): (N,) predicted classes, for macro F1.
        labels (Tensor or array-like, optional): (N,) true classes, for macro F1; when both
            are given, ``correct`` must equal ``predictions == labels``.
        percentiles (Tensor or array-like, optional): the t values, in [0, 100) (percent,
            not fractions: 10 keeps the top 90 %; values that all lie in (0, 1] are warned
            about, as 0.1 keeps the top 99.9 %). Default: 0, 1, ..., 99.

    Returns:
        RetentionCurve: ``percentiles``, ``kept``, ``accuracy`` and ``macro_f1`` (None when
        ``predictions``/``labels`` are not given), tensors on the CPU: ``kept`` int64, the
        others float64.

    Examples::

        >>> from captum_ext.metrics import accuracy_retention_curve
        >>> scores = torch.tensor([0.9, 0.8, 0.3, 0.1])  # higher = more trusted
        >>> preds = torch.tensor([1, 2, 0, 0])
        >>> truth = torch.tensor([1, 2, 1, 0])  # the third prediction is wrong
        >>> curve = accuracy_retention_curve(scores, preds == truth, predictions=preds,
        ...                                  labels=truth)
        >>> float(curve.accuracy[0]), float(curve.accuracy[50])  # all, most trusted half
        (0.75, 1.0)
        >>> int(curve.kept[50])
        2
    """
    values = finite_scores(scores)
    ok = _correct(correct, values.numel())
    ts = _percentiles(percentiles)
    if (predictions is None) != (labels is None):
        raise ValueError("macro F1 needs both `predictions` and `labels` (or neither).")
    weights, order, kept = _keep_weights(values.cpu(), ts)
    ok_sorted = ok.cpu()[order].to(torch.float64)
    accuracy = (weights * ok_sorted).sum(1) / kept.to(torch.float64)
    f1 = None
    if predictions is not None:
        pred = _vector(predictions, "predictions").cpu()
        true = _vector(labels, "labels").cpu()
        for name, t in (("predictions", pred), ("labels", true)):
            if t.numel() != values.numel():
                raise ValueError(
                    f"`{name}` has {t.numel()} entries but `scores` has {values.numel()}."
                )
            if t.is_floating_point() or t.dtype == torch.bool:
                raise TypeError(f"`{name}` must hold integer class indices, got {t.dtype}.")
        if not torch.equal(pred == true, ok.cpu()):
            raise ValueError("`correct` differs from `predictions == labels`.")
        f1 = _macro_f1(weights, pred[order], true[order])
    return RetentionCurve(ts, kept, accuracy, f1)


def _macro_f1(weights: Tensor, pred: Tensor, true: Tensor) -> Tensor:
    classes, inverse = torch.unique(torch.cat([pred, true]), return_inverse=True)
    n = pred.numel()
    p_idx, t_idx = inverse[:n], inverse[n:]
    k = classes.numel()
    pred_onehot = torch.nn.functional.one_hot(p_idx, k).to(torch.float64)
    true_onehot = torch.nn.functional.one_hot(t_idx, k).to(torch.float64)
    hit = pred_onehot * true_onehot
    tp = weights @ hit
    predicted = weights @ pred_onehot  # tp + fp
    actual = weights @ true_onehot  # tp + fn
    denominator = predicted + actual
    present = denominator > 0
    f1 = torch.where(present, 2 * tp / denominator.clamp_min(1e-300), torch.zeros_like(tp))
    return f1.sum(1) / present.sum(1).to(torch.float64)


def auac(scores: Any, correct: Any, *, percentiles: Any = None) -> float:
    r"""Area under the accuracy-retention curve, in percent.

    .. code-block:: text

        AUAC = 100 * mean_t accuracy(t),   t = 0, 1, ..., 99

    (the rectangle rule with 1-percentile bins, so a curve of constant accuracy a gives
    100 a). See :func:`accuracy_retention_curve` for the kept sets and ties. A score that
    ranks every correct example above every wrong one, with a fraction a of correct examples,
    gives ``100 * mean_t min(1, a N / m_t)``, below 100 because the curve starts at the plain
    accuracy (t = 0 keeps everything).

    Args:
        scores (Tensor or array-like): (N,) finite trust scores, higher = more trusted.
        correct (Tensor or array-like): (N,) booleans, True = correct prediction.
        percentiles (Tensor or array-like, optional): the t values, percentiles in
            [0, 100), not fractions (see :func:`accuracy_retention_curve`). Default: 0..99.

    Returns:
        float: AUAC in [0, 100].

    Examples::

        >>> from captum_ext.metrics import auac
        >>> scores = torch.tensor([0.9, 0.8, 0.3, 0.1])
        >>> correct = torch.tensor([True, True, False, True])
        >>> auac(torch.ones(4), correct)  # a constant score gives the plain accuracy
        75.0
        >>> round(auac(scores, correct), 2)
        85.42

        With a trained model and a trust score (here the bundled digit model, whose 40 sample
        digits it classifies with one mistake):

        >>> from captum_ext.metrics import gradtrust
        >>> correct = model(images).argmax(1) == labels
        >>> round(auac(gradtrust(model, images), correct), 1)
        99.9
    """
    curve = accuracy_retention_curve(scores, correct, percentiles=percentiles)
    return 100.0 * float(curve.accuracy.mean())


def aufc(scores: Any, predictions: Any, labels: Any, *, percentiles: Any = None) -> float:
    r"""Area under the macro-F1-retention curve, in percent.

    .. code-block:: text

        AUFC = 100 * mean_t macroF1(t),   t = 0, 1, ..., 99

    Args:
        scores (Tensor or array-like): (N,) finite trust scores, higher = more trusted.
        predictions (Tensor or array-like): (N,) predicted classes.
        labels (Tensor or array-like): (N,) true classes.
        percentiles (Tensor or array-like, optional): the t values, percentiles in
            [0, 100), not fractions (see :func:`accuracy_retention_curve`). Default: 0..99.

    Returns:
        float: AUFC in [0, 100].

    Examples::

        >>> from captum_ext.metrics import aufc
        >>> scores = torch.tensor([0.9, 0.8, 0.3, 0.1])
        >>> predictions = torch.tensor([1, 2, 0, 0])
        >>> truth = torch.tensor([1, 2, 1, 0])
        >>> round(aufc(scores, predictions, truth), 2)
        83.33
    """
    pred = _vector(predictions, "predictions")
    true = _vector(labels, "labels")
    if pred.numel() != true.numel():
        raise ValueError(
            f"`predictions` has {pred.numel()} entries but `labels` has {true.numel()}."
        )
    n_scores = finite_scores(scores).numel()
    if n_scores != pred.numel():  # before `correct` (= predictions == labels) is formed
        raise ValueError(
            f"`scores` has {n_scores} entries but `predictions` has {pred.numel()}; give one "
            "of each per example."
        )
    curve = accuracy_retention_curve(
        scores, pred == true, predictions=pred, labels=true, percentiles=percentiles
    )
    return 100.0 * float(curve.macro_f1.mean())


def misprediction_auroc(scores: Any, correct: Any) -> float:
    r"""AUROC of separating correct from wrong predictions with a trust score.

    Correct predictions are the positive class and higher scores mean more trusted, so 1 is a
    perfect trust score and 0.5 a useless one. Ties count one half (Mann-Whitney U with
    mid-ranks), as in ``sklearn.metrics.roc_auc_score(correct, scores)``.

    .. code-block:: text

        AUROC = P(s_correct > s_wrong) + 0.5 P(s_correct = s_wrong)

    Args:
        scores (Tensor or array-like): (N,) finite trust scores.
        correct (Tensor or array-like): (N,) booleans, with both classes present.

    Returns:
        float: AUROC in [0, 1].

    Examples::

        >>> from captum_ext.metrics import misprediction_auroc
        >>> scores = torch.tensor([0.9, 0.8, 0.3, 0.1])
        >>> correct = torch.tensor([True, True, False, True])
        >>> round(misprediction_auroc(scores, correct), 4)  # 2 of 3 pairs ranked right
        0.6667
        >>> from captum_ext.metrics import softmax_confidence
        >>> correct = model(images).argmax(1) == labels
        >>> misprediction_auroc(softmax_confidence(model, images), correct)
        1.0
    """
    values = finite_scores(scores).cpu()
    ok = _correct(correct, values.numel()).cpu()
    if bool(ok.all()) or not bool(ok.any()):
        raise ValueError("`correct` must contain both correct and wrong predictions for an AUROC.")
    return _rank_auroc(values, ok)


def _rank_auroc(values: Tensor, positive: Tensor) -> float:
    """Mann-Whitney AUROC with mid-ranks for ties; both classes present."""
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    ranked, order = torch.sort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(ranked, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mid_ranks = ends - (counts.to(torch.float64) - 1) / 2  # 1-based average rank of each group
    ranks = mid_ranks[inverse]
    rank_sum = float(ranks[positive[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# ---------------------------------------------------------------------------------------------
# out-of-distribution detection


def _in_out(in_scores: Any, out_scores: Any) -> tuple[Tensor, Tensor]:
    """All scores (float64, CPU) and the in-distribution mask."""
    inside = finite_scores(in_scores, "in_scores").cpu()
    outside = finite_scores(out_scores, "out_scores").cpu()
    values = torch.cat([inside, outside])
    is_in = torch.zeros(values.numel(), dtype=torch.bool)
    is_in[: inside.numel()] = True
    return values, is_in


def _threshold_counts(values: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """True and false positives (float64) when predicting "positive" for score >= each
    distinct score, thresholds from the highest down."""
    ranked, order = torch.sort(values, descending=True, stable=True)
    hits = positive[order].to(torch.float64)
    _, counts = torch.unique_consecutive(ranked, return_counts=True)
    last = torch.cumsum(counts, 0) - 1  # last position of each tie group
    true_pos = torch.cumsum(hits, 0)[last]
    false_pos = (last + 1).to(torch.float64) - true_pos
    return true_pos, false_pos


def auroc(in_scores: Any, out_scores: Any) -> float:
    r"""AUROC of separating in-distribution from out-of-distribution examples.

    Scores: higher = more in-distribution; the in-distribution examples are the positive
    class, so 1 is a perfect detector and 0.5 a useless one. Ties count one half (as
    ``sklearn.metrics.roc_auc_score``).

    .. code-block:: text

        AUROC = P(s_in > s_out) + 0.5 P(s_in = s_out)

    The value does not depend on which class is called positive (swapping the classes and
    negating the scores gives the same number).

    Args:
        in_scores (Tensor or array-like): (N_in,) finite scores of in-distribution examples.
        out_scores (Tensor or array-like): (N_out,) finite scores of OOD examples.

    Returns:
        float: AUROC in [0, 1].

    Examples::

        >>> from captum_ext.metrics import auroc
        >>> in_scores = torch.tensor([0.9, 0.8, 0.7, 0.4])  # higher = more in-distribution
        >>> out_scores = torch.tensor([0.5, 0.3, 0.2])
        >>> round(auroc(in_scores, out_scores), 4)  # 11 of 12 pairs ranked right
        0.9167

        With a :class:`~captum_ext.inversion.TIE` detector, pass scores oriented this way:
        ``auroc(tie.in_distribution_score(test_digits), tie.in_distribution_score(letters))``.
    """
    values, is_in = _in_out(in_scores, out_scores)
    return _rank_auroc(values, is_in)


def aupr(in_scores: Any, out_scores: Any, *, positive: str = "in") -> float:
    r"""Area under the precision-recall curve (average precision) of an OOD detector.

    Scores: higher = more in-distribution. With ``positive="in"`` (AUPR-In) the
    in-distribution examples are the positives, ranked by decreasing score; with
    ``positive="out"`` (AUPR-Out) the OOD examples are, ranked by increasing score. At each
    distinct threshold k (tied scores enter together):

    .. code-block:: text

        AP = sum_k (R_k - R_{k-1}) P_k      (P precision, R recall, R_0 = 0)

    the step-wise average precision of ``sklearn.metrics.average_precision_score``.

    Args:
        in_scores (Tensor or array-like): (N_in,) finite scores of in-distribution examples.
        out_scores (Tensor or array-like): (N_out,) finite scores of OOD examples.
        positive (str, optional): ``"in"`` or ``"out"``. Default: ``"in"``.

    Returns:
        float: AUPR in [0, 1]; a useless detector scores the share of positives.

    Examples::

        >>> from captum_ext.metrics import aupr
        >>> in_scores = torch.tensor([0.9, 0.8, 0.7, 0.4])
        >>> out_scores = torch.tensor([0.5, 0.3, 0.2])
        >>> round(aupr(in_scores, out_scores), 4)  # AUPR-In
        0.95
        >>> round(aupr(in_scores, out_scores, positive="out"), 4)  # AUPR-Out
        0.9167
    """
    if positive not in ("in", "out"):
        raise ValueError(f"`positive`={positive!r}: expected 'in' or 'out'.")
    values, is_in = _in_out(in_scores, out_scores)
    if positive == "out":
        values, is_in = -values, ~is_in
    true_pos, false_pos = _threshold_counts(values, is_in)
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / true_pos[-1]
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * precision).sum())


def fpr_at_tpr(
    in_scores: Any, out_scores: Any, *, tpr: float = 0.95, positive: str = "in"
) -> float:
    r"""False-positive rate at a given true-positive rate (FPR@95TPR by default).

    Scores: higher = more in-distribution. OOD papers disagree on which class is positive;
    ``positive`` makes it explicit. With ``"in"`` (the default, as in OpenOOD and most
    detection papers) the threshold is the highest one that keeps at least ``tpr`` of the
    in-distribution examples (score >= threshold), and the result is the share of OOD
    examples that pass it too; with ``"out"`` the roles swap: the OOD examples are the
    positives, ranked by increasing score, and the result is the share of in-distribution
    examples caught at ``tpr`` of the OOD ones (``fpr_at_tpr(-out, -in)``):

    .. code-block:: text

        FPR@TPR = min over thresholds t with TPR(t) >= tpr of FPR(t)

    (with ``sklearn.metrics.roc_curve``: ``fpr[tpr_curve >= tpr].min()``). Lower is better;
    0 means the OOD examples all score below 95 % of the in-distribution ones.

    Args:
        in_scores (Tensor or array-like): (N_in,) finite scores of in-distribution examples.
        out_scores (Tensor or array-like): (N_out,) finite scores of OOD examples.
        tpr (float, optional): the true-positive rate, in (0, 1]. Default: 0.95.
        positive (str, optional): ``"in"`` or ``"out"``, the positive class. Default:
            ``"in"``.

    Returns:
        float: FPR in [0, 1].

    Examples::

        >>> from captum_ext.metrics import fpr_at_tpr
        >>> in_scores = torch.tensor([0.9, 0.8, 0.7, 0.4])
        >>> out_scores = torch.tensor([0.5, 0.3, 0.2])
        >>> round(fpr_at_tpr(in_scores, out_scores), 4)  # FPR@95TPR: 0.5 passes too
        0.3333
        >>> fpr_at_tpr(in_scores, out_scores, tpr=0.75)
        0.0
    """
    tpr = check_number(tpr, "tpr", maximum=1.0)
    if positive not in ("in", "out"):
        raise ValueError(f"`positive`={positive!r}: expected 'in' or 'out'.")
    values, is_in = _in_out(in_scores, out_scores)
    if positive == "out":
        values, is_in = -values, ~is_in
    true_pos, false_pos = _threshold_counts(values, is_in)
    n_in, n_out = int(is_in.sum()), int((~is_in).sum())
    reached = true_pos / n_in >= tpr - 1e-12
    return float(false_pos[reached].min() / n_out)
