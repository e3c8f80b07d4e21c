r"""The two scalar read-outs of VOICE: IoU of explanation and uncertainty, SNR of the
uncertainty (Prabhushankar & AlRegib, IEEE JSTSP 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_ext._utils.maps import minmax_normalize
from captum_ext._utils.validation import check_number
from captum_ext.metrics._perturbation import keyword_only_after

__all__ = ["voice_iou", "voice_snr"]


def _voice_maps(maps: Any, argument: str) -> Tensor:
    if not isinstance(maps, Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(maps).__name__}.")
    if maps.dim() >= 3 and maps.shape[1] == 1:
        maps = maps[:, 0]  # (N, 1, *spatial): (N, 1, H, W), a signal's (N, 1, L), a volume's
    elif maps.dim() != 3:
        raise ValueError(
            f"`{argument}` has shape {tuple(maps.shape)}; expected (N, 1, H, W) or (N, H, W) "
            "(or (N, 1, *spatial) for other spatial shapes: (N, 1, L), (N, 1, T, H, W))."
        )
    if maps.is_complex() or maps.dtype == torch.bool:
        raise TypeError(f"`{argument}` must hold real values, got {maps.dtype}.")
    if not maps.is_floating_point():
        maps = maps.to(torch.get_default_dtype())
    maps = maps.detach()
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"`{argument}` contains NaN or infinite values.")
    return maps


@keyword_only_after(2)
def voice_iou(
    explanation: Tensor,
    uncertainty: Tensor,
    *,
    threshold: float = 0.1,
    smoothing: float = 1e-6,
) -> Tensor:
    r"""IoU between an explanation and its VOICE uncertainty map, one value per example.

    Each map is min-max normalised on its own and thresholded; the IoU of the two binary
    masks is smoothed so that two empty masks give 1 and nothing is ever NaN:

    .. code-block:: text

        A   = minmax(explanation) > threshold
        B   = minmax(uncertainty) > threshold
        IoU = (|A and B| + smoothing) / (|A or B| + smoothing)

    A constant map normalises to zeros (an empty mask). A high IoU on a prediction means
    the explanation is uncertain about the very features it attributes to: less
    trustworthy. The paper's observation: IoU is higher on wrong predictions.

    Paper: Prabhushankar & AlRegib, "VOICE: Variance of Induced Contrastive Explanations
    to Quantify Uncertainty in Neural Network Interpretability", IEEE JSTSP 2024.

    Args:
        explanation (Tensor): (N, 1, H, W) or (N, H, W) maps (or ``(N, 1, *spatial)`` of
            any spatial shape: a signal's (N, 1, L), a volume's (N, 1, T, H, W)).
        uncertainty (Tensor): uncertainty maps of the same shape.
        threshold (float, optional): mask level after min-max normalisation, in [0, 1).
            Default: 0.1.
        smoothing (float, optional): added to numerator and denominator. Default: 1e-6.

    Returns:
        Tensor: (N,) IoU per example, on the maps' device.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import voice_iou
        >>> a = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
        >>> b = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
        >>> voice_iou(a, b)
        tensor([0.6667])
    """
    a = _voice_maps(explanation, "explanation")
    b = _voice_maps(uncertainty, "uncertainty")
    if a.shape != b.shape:
        raise ValueError(
            f"`explanation` {tuple(a.shape)} and `uncertainty` {tuple(b.shape)} must have the "
            "same shape (upsample one to the other first)."
        )
    threshold = check_number(
        threshold, "threshold", allow_minimum=True, maximum=1.0, allow_maximum=False
    )
    smoothing = check_number(smoothing, "smoothing")
    dtype = torch.promote_types(a.dtype, b.dtype)
    mask_a = minmax_normalize(a.to(dtype), 1) > threshold
    mask_b = minmax_normalize(b.to(dtype), 1) > threshold
    both = (mask_a & mask_b).flatten(1).sum(dim=1).to(dtype)
    either = (mask_a | mask_b).flatten(1).sum(dim=1).to(dtype)
    return (both + smoothing) / (either + smoothing)


def voice_snr(uncertainty: Tensor) -> Tensor:
    r"""Signal-to-noise ratio of each uncertainty map: mean over standard deviation.

    .. code-block:: text

        SNR = mean(U) / std(U)      over all pixels of the map, population std (1 / HW);
              0 where the map is constant (std = 0), never NaN

    A higher SNR means the uncertainty is spread over the image rather than concentrated.
    A map is taken as constant when its maximum equals its minimum exactly, so rounding in
    the mean of a constant map cannot produce a huge ratio.

    Paper: Prabhushankar & AlRegib, "VOICE: Variance of Induced Contrastive Explanations
    to Quantify Uncertainty in Neural Network Interpretability", IEEE JSTSP 2024.

    Args:
        uncertainty (Tensor): (N, 1, H, W) or (N, H, W) maps (or ``(N, 1, *spatial)``).

    Returns:
        Tensor: (N,) SNR per example, on the maps' device.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import voice_snr
        >>> voice_snr(torch.tensor([[[0.0, 1.0], [1.0, 2.0]]]))
        tensor([1.4142])
    """
    u = _voice_maps(uncertainty, "uncertainty").flatten(1)
    mean = u.mean(dim=1)
    std = u.std(dim=1, correction=0)
    constant = u.amax(dim=1) == u.amin(dim=1)
    usable = ~constant & (std > 0)
    return torch.where(usable, mean / torch.where(usable, std, torch.ones_like(std)), 0.0)
