r"""Calibration: expected calibration error over equal-width confidence bins, and the
reliability diagram (per-bin confidence, accuracy and count) it is computed from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from captum_ext._utils.precision import array_like_tensor
from captum_ext._utils.validation import check_int, check_rows_sum_to_one

__all__ = [
    "CALIBRATION_NORMS",
    "ReliabilityDiagram",
    "expected_calibration_error",
    "reliability_diagram",
]

CALIBRATION_NORMS = ("l1", "l2", "max")
"""Values of ``norm``: the weighted mean gap (ECE), its root mean square, the largest gap."""


def _confidence_and_correct(
    probabilities_or_confidences: Any, labels: Any
) -> tuple[Tensor, Tensor]:
    """(N,) float64 confidences in [0, 1] and (N,) float64 0/1 correctness, on the CPU."""
    try:
        values = array_like_tensor(probabilities_or_confidences).detach()
        targets = array_like_tensor(labels).detach()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"`probabilities_or_confidences` and `labels` must be tensors or array-like: {error}"
        ) from None
    if values.dtype == torch.bool or values.is_complex() or not values.is_floating_point():
        raise TypeError(
            f"`probabilities_or_confidences` must hold floating point values, got {values.dtype}."
        )
    values = values.to(device="cpu", dtype=torch.float64)
    targets = targets.cpu()
    if values.dim() not in (1, 2) or targets.dim() != 1:
        raise ValueError(
            "expected `probabilities_or_confidences` of shape (N, C) or (N,) and `labels` of "
            f"shape (N,), got {tuple(values.shape)} and {tuple(targets.shape)}."
        )
    if values.shape[0] != targets.shape[0]:
        raise ValueError(
            f"`probabilities_or_confidences` has {values.shape[0]} examples but `labels` has "
            f"{targets.shape[0]}."
        )
    if values.shape[0] == 0:
        raise ValueError("`probabilities_or_confidences` is empty; expected at least one example.")
    if (
        not bool(torch.isfinite(values).all())
        or bool((values < 0).any())
        or bool((values > 1).any())
    ):
        raise ValueError(
            "`probabilities_or_confidences` must lie in [0, 1] (softmax probabilities or "
            "confidences), without NaN."
        )
    if targets.is_complex() or (
        values.dim() == 2 and (targets.is_floating_point() or targets.dtype == torch.bool)
    ):
        raise TypeError(f"`labels` must hold integer class indices, got {targets.dtype}.")
    if values.dim() == 2:
        check_rows_sum_to_one(
            values,
            "probabilities_or_confidences",
            advice=" For per-class scores such as sigmoids, pass the (N,) confidences of the "
            "predictions with whether each is correct instead.",
        )
        confidence, predicted = values.max(dim=1)
        targets = targets.long()
        if bool((targets < 0).any()) or bool((targets >= values.shape[1]).any()):
            raise ValueError(
                f"`labels` must be class indices in [0, {values.shape[1] - 1}] for "
                f"{values.shape[1]} classes."
            )
        correct = (predicted == targets).to(torch.float64)
    else:
        confidence = values
        if targets.dtype != torch.bool and not bool(((targets == 0) | (targets == 1)).all()):
            raise ValueError(
                "with (N,) confidences, `labels` must say whether each prediction is correct "
                "(booleans or 0/1)."
            )
        correct = targets.to(torch.float64)
    return confidence, correct


def expected_calibration_error(
    probabilities_or_confidences: Any,
    labels: Any,
    *,
    n_bins: int = 15,
    norm: str = "l1",
) -> float:
    r"""Expected calibration error: how far confidence is from accuracy, over confidence bins.

    The confidences are split into ``n_bins`` equal-width bins ``B_m = ((m-1)/M, m/M]``
    (a confidence of exactly 0 goes into the first bin); in each bin the accuracy and the mean
    confidence are compared, weighted by the fraction of examples in the bin:

    .. code-block:: text

        conf_i = max_c p_ic,  correct_i = 1[argmax_c p_ic == y_i]     ((N, C) probabilities)
        acc_m  = mean of correct_i over B_m,   conf_m = mean of conf_i over B_m
        "l1":  ECE = sum_m |B_m| / N * |acc_m - conf_m|
        "l2":  RMSCE = sqrt(sum_m |B_m| / N * (acc_m - conf_m)^2)
        "max": MCE = max over non-empty bins of |acc_m - conf_m|

    Empty bins contribute nothing. Computed in float64 on the CPU. A tie for the largest
    probability counts the first of the tied classes as the prediction (``torch.max``).

    Against ``torchmetrics.functional.classification.multiclass_calibration_error`` (same
    norms, same default of 15 bins): torchmetrics closes its bins on the left,
    ``[(m-1)/M, m/M)``, puts a confidence of exactly 1 in a bin of its own, and works in
    float32. The two are the same quantity on every confidence that is not exactly on an
    inner bin edge or equal to 1 (to float32 rounding); on the edges the mirror image holds:
    this function on ``(conf, correct)`` equals torchmetrics'
    ``binary_calibration_error(1 - conf, 1 - correct)`` for confidences in (0, 1].

    Papers: Naeini, Cooper & Hauskrecht, "Obtaining Well Calibrated Probabilities Using
    Bayesian Binning", AAAI 2015; Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern
    Neural Networks", ICML 2017.

    Args:
        probabilities_or_confidences (Tensor or array-like): (N, C) class probabilities
            (e.g. a softmax; each row must sum to 1 within max(1e-2, C * 5e-5), at most
            0.5, which takes half-precision and 4-decimal rounding but not per-class
            sigmoids), or (N,) confidences of the predictions, in [0, 1].
        labels (Tensor or array-like): (N,) true integer class indices with (N, C)
            probabilities (booleans are refused there); with (N,) confidences, whether
            each prediction is correct (booleans or 0/1).
        n_bins (int, optional): number of equal-width bins M. Default: 15.
        norm (str, optional): ``"l1"`` (default, the ECE), ``"l2"`` (root mean square
            calibration error) or ``"max"`` (maximum calibration error).

    Returns:
        float: the calibration error, in [0, 1]; 0 for a perfectly calibrated model.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import expected_calibration_error
        >>> probabilities = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> round(expected_calibration_error(probabilities, torch.tensor([0, 1, 1])), 4)
        0.3333
    """
    n_bins = check_int(n_bins, "n_bins")
    _check_norm(norm)
    confidence, correct = _confidence_and_correct(probabilities_or_confidences, labels)
    count, accuracy, mean_confidence = _bin_sums(confidence, correct, n_bins)
    filled = count > 0
    gap = (accuracy[filled] - mean_confidence[filled]).abs() / count[filled]
    weight = count[filled] / confidence.numel()
    return _reduce(gap, weight, norm)


def _check_norm(norm: Any) -> None:
    if not isinstance(norm, str) or norm not in CALIBRATION_NORMS:
        raise ValueError(
            f"`norm`={norm!r}: expected one of {', '.join(map(repr, CALIBRATION_NORMS))}."
        )


def _bin_edges(n_bins: int) -> Tensor:
    """``(M + 1,)`` float64 edges ``0, 1/M, ..., 1``."""
    return torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)


def _bin_sums(confidence: Tensor, correct: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per bin ``(bin_edges[m], bin_edges[m + 1]]`` (0 in the first): count, sum of
    correctness, sum of confidence, float64. Binned against the edges the diagram reports
    (``linspace``): ``ceil(c M) - 1`` disagreed with them where ``c M`` rounds (0.55 with
    20 bins: ``0.55 * 20 = 11.000000000000002``)."""
    edges = _bin_edges(n_bins).to(confidence.device)
    bins = torch.searchsorted(edges[1:].contiguous(), confidence, right=False)
    bins = bins.clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(correct))
    accuracy = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    mean_confidence = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    return count, accuracy, mean_confidence


def _reduce(gap: Tensor, weight: Tensor, norm: str) -> float:
    """The calibration error from the non-empty bins' gaps and weights (fractions of N)."""
    if norm == "l1":
        return float((weight * gap).sum())
    if norm == "l2":
        return float((weight * gap**2).sum().sqrt())
    return float(gap.max())


@dataclass(frozen=True)
class ReliabilityDiagram:
    r"""Per-bin statistics of a reliability diagram (see :func:`reliability_diagram`).

    Attributes:
        bin_edges (Tensor): ``(M + 1,)`` float64 edges ``0, 1/M, ..., 1``; bin ``m`` is
            ``(bin_edges[m], bin_edges[m + 1]]`` (a confidence of 0 is in the first).
        confidence (Tensor): ``(M,)`` float64 mean confidence of the predictions in each bin,
            NaN for an empty bin.
        accuracy (Tensor): ``(M,)`` float64 fraction of correct predictions in each bin, NaN
            for an empty bin.
        count (Tensor): ``(M,)`` int64 number of predictions in each bin.
    """

    bin_edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    @property
    def n_bins(self) -> int:
        """The number of bins ``M``."""
        return int(self.count.numel())

    @property
    def gap(self) -> Tensor:
        """``(M,)`` float64 ``accuracy - confidence`` per bin (NaN for an empty bin):
        negative where the model is over-confident."""
        return self.accuracy - self.confidence

    def calibration_error(self, norm: str = "l1") -> float:
        r"""The calibration error read off the diagram: ``sum_m count_m / N *
        |accuracy_m - confidence_m|`` for ``"l1"`` (the ECE), the root of the weighted mean
        square gap for ``"l2"`` and the largest gap for ``"max"``; equal to
        :func:`expected_calibration_error` on the same data with the same ``n_bins``."""
        _check_norm(norm)
        filled = self.count > 0
        gap = self.gap[filled].abs()
        weight = self.count[filled].to(torch.float64) / self.count.sum()
        return _reduce(gap, weight, norm)


def reliability_diagram(
    probabilities_or_confidences: Any,
    labels: Any,
    *,
    n_bins: int = 15,
) -> ReliabilityDiagram:
    r"""Reliability diagram: accuracy against confidence over equal-width confidence bins.

    The bins and the per-bin quantities are the ones :func:`expected_calibration_error`
    compares (``B_m = ((m-1)/M, m/M]``, a confidence of 0 in the first)::

        conf_i = max_c p_ic,  correct_i = 1[argmax_c p_ic == y_i]     ((N, C) probabilities)
        confidence_m = mean of conf_i over B_m,  accuracy_m = mean of correct_i over B_m,
        count_m = |B_m|

    so ``reliability_diagram(p, y).calibration_error()`` equals
    ``expected_calibration_error(p, y)``. A calibrated model's bins lie on the diagonal;
    bins below it are over-confident. Draw it with
    :func:`captum_ext.viz.plot_reliability_diagram`. Computed in float64 on the CPU.

    Papers: DeGroot & Fienberg, "The Comparison and Evaluation of Forecasters", 1983;
    Niculescu-Mizil & Caruana, "Predicting Good Probabilities with Supervised Learning",
    ICML 2005; Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks",
    ICML 2017.

    Args:
        probabilities_or_confidences (Tensor or array-like): (N, C) class probabilities
            (e.g. a softmax; each row must sum to 1 within max(1e-2, C * 5e-5), at most
            0.5, which takes half-precision and 4-decimal rounding but not per-class
            sigmoids), or (N,) confidences of the predictions, in [0, 1].
        labels (Tensor or array-like): (N,) true integer class indices with (N, C)
            probabilities (booleans are refused there); with (N,) confidences, whether
            each prediction is correct (booleans or 0/1).
        n_bins (int, optional): number of equal-width bins M. Default: 15.

    Returns:
        ReliabilityDiagram: bin edges ``(M + 1,)``, and per bin the mean confidence, the
        accuracy (NaN where empty) and the count.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import expected_calibration_error, reliability_diagram
        >>> probabilities = model(images).softmax(dim=1)
        >>> diagram = reliability_diagram(probabilities, labels, n_bins=10)
        >>> int(diagram.count.sum()), diagram.bin_edges.shape
        (40, torch.Size([11]))
        >>> ece = expected_calibration_error(probabilities, labels, n_bins=10)
        >>> abs(diagram.calibration_error() - ece) < 1e-12
        True
    """
    n_bins = check_int(n_bins, "n_bins")
    confidence, correct = _confidence_and_correct(probabilities_or_confidences, labels)
    count, accuracy, mean_confidence = _bin_sums(confidence, correct, n_bins)
    empty = count == 0
    safe = count.clamp_min(1)
    nan = torch.full_like(count, float("nan"))
    return ReliabilityDiagram(
        bin_edges=_bin_edges(n_bins),
        confidence=torch.where(empty, nan, mean_confidence / safe),
        accuracy=torch.where(empty, nan, accuracy / safe),
        count=count.long(),
    )
