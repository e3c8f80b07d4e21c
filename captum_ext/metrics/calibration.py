r"""Calibration: expected calibration error over equal-width confidence bins."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_ext._utils.validation import check_int

__all__ = ["CALIBRATION_NORMS", "expected_calibration_error"]

CALIBRATION_NORMS = ("l1", "l2", "max")
"""Values of ``norm``: the weighted mean gap (ECE), its root mean square, the largest gap."""


def _confidence_and_correct(
    probabilities_or_confidences: Any, labels: Any
) -> tuple[Tensor, Tensor]:
    """(N,) float64 confidences in [0, 1] and (N,) float64 0/1 correctness, on the CPU."""
    try:
        values = torch.as_tensor(probabilities_or_confidences).detach()
        targets = torch.as_tensor(labels).detach()
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
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"`labels` must hold integers or booleans, got {targets.dtype}.")
    if values.dim() == 2:
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

    Empty bins contribute nothing. Computed in float64 on the CPU.

    Papers: Naeini, Cooper & Hauskrecht, "Obtaining Well Calibrated Probabilities Using
    Bayesian Binning", AAAI 2015; Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern
    Neural Networks", ICML 2017.

    Args:
        probabilities_or_confidences (Tensor or array-like): (N, C) class probabilities
            (e.g. a softmax), or (N,) confidences of the predictions, in [0, 1].
        labels (Tensor or array-like): (N,) true class indices with (N, C) probabilities;
            with (N,) confidences, whether each prediction is correct (booleans or 0/1).
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
    if not isinstance(norm, str) or norm not in CALIBRATION_NORMS:
        raise ValueError(
            f"`norm`={norm!r}: expected one of {', '.join(map(repr, CALIBRATION_NORMS))}."
        )
    confidence, correct = _confidence_and_correct(probabilities_or_confidences, labels)
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(correct))
    accuracy = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    mean_confidence = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    filled = count > 0
    gap = (accuracy[filled] - mean_confidence[filled]).abs() / count[filled]
    weight = count[filled] / confidence.numel()
    if norm == "l1":
        return float((weight * gap).sum())
    if norm == "l2":
        return float((weight * gap**2).sum().sqrt())
    return float(gap.max())
