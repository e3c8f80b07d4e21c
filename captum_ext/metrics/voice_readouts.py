r"""The two scalar read-outs of VOICE: IoU of explanation and uncertainty, SNR of the
uncertainty (Prabhushankar & AlRegib, IEEE JSTSP 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_ext._utils.maps import minmax_normalize
from captum_ext._utils.precision import at_least_float32
from captum_ext._utils.validation import check_number
from captum_ext.metrics._perturbation import keyword_only_after

__all__ = ["voice_iou", "voice_snr"]


def _voice_maps(maps: Any, argument: str) -> Tensor:
    if not isinstance(maps, Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(maps).__name__}.")
    if maps.dim() < 2 or (maps.dim() == 2 and maps.shape[1] == 1):
        # VOICE averages its maps over dim 1: inputs without a spatial dimension, such as
        # tabular (N, F) features, reach here as (N, 1)
        raise ValueError(
            f"`{argument}` has shape {tuple(maps.shape)}: no spatial dimension. The VOICE "
            "read-outs (voice_iou, voice_snr, and VOICE, which reads them from its maps "
            "averaged over channels) need maps over space: (N, 1, H, W) or (N, H, W), or "
            "(N, 1, *spatial) such as a signal's (N, 1, L) or a volume's (N, 1, T, H, W). "
            "VOICE supports inputs (N, C, *spatial) with at least one spatial dimension; "
            "tabular (N, F) inputs give (N, 1) and are not supported."
        )
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
    if 0 in maps.shape[1:]:
        raise ValueError(
            f"`{argument}` has shape {tuple(maps.shape)}: its maps hold no pixels (a spatial "
            "size of 0); each example needs a map of at least one pixel."
        )
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
        Tensor: (N,) IoU per example, on the maps' device; empty for ``N = 0``. The ratio
        is taken in at least float32 (the pixel counts of a float16 map above 65,504
        pixels would overflow) and returned in the maps' dtype; a ``smoothing`` that
        the working dtype cannot hold (below its smallest or above its largest number)
        is taken as that smallest or largest number, so the result stays in [0, 1].

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
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=dtype, device=a.device)
    mask_a = minmax_normalize(a.to(dtype), 1) > threshold
    mask_b = minmax_normalize(b.to(dtype), 1) > threshold
    work = torch.promote_types(dtype, torch.float32)
    both = (mask_a & mask_b).flatten(1).sum(dim=1).to(work)
    either = (mask_a | mask_b).flatten(1).sum(dim=1).to(work)
    # a smoothing that rounds to 0 (two empty masks: 0 / 0) or to inf (inf / inf) in the
    # working dtype is taken as its smallest normal resp. largest number
    info = torch.finfo(work)
    smoothing = min(max(smoothing, info.tiny), info.max)
    return ((both + smoothing) / (either + smoothing)).to(dtype)


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
        Tensor: (N,) SNR per example, on the maps' device; empty for ``N = 0``. Mean and
        standard deviation are taken in at least float32 and the ratio returned in the
        maps' dtype.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import voice_snr
        >>> voice_snr(torch.tensor([[[0.0, 1.0], [1.0, 2.0]]]))
        tensor([1.4142])
    """
    u = _voice_maps(uncertainty, "uncertainty").flatten(1)
    if u.shape[0] == 0:  # (torch's std over an empty batch warns of 0 degrees of freedom)
        return torch.zeros(0, dtype=u.dtype, device=u.device)
    dtype, u = u.dtype, at_least_float32(u)
    mean = u.mean(dim=1)
    std = u.std(dim=1, correction=0)
    constant = u.amax(dim=1) == u.amin(dim=1)
    usable = ~constant & (std > 0)
    snr = torch.where(usable, mean / torch.where(usable, std, torch.ones_like(std)), 0.0)
    return snr.to(dtype)
