"""Post-processing of attribution maps shared by the CAM methods, VOICE and the report."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NORMALIZE_CHOICES = (None, "minmax")


def minmax_normalize(maps: Tensor, start_dim: int = 2) -> Tensor:
    """Scale each map (the dims from ``start_dim`` on) to [0, 1]; a constant map gives zeros.

    ``(m - min m) / (max m - min m)`` per map; where ``max m == min m`` the map is all zeros
    (never NaN).
    """
    if maps.dim() <= start_dim:
        raise ValueError(
            f"cannot min-max normalise maps of shape {tuple(maps.shape)}: no spatial dimensions."
        )
    flat = maps.flatten(start_dim)
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    scaled = torch.where(span > 0, (flat - low) / safe, torch.zeros_like(flat))
    return scaled.view_as(maps)


def upsample_maps(maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """Bilinear (or linear / trilinear) resize of (N, C', *spatial) maps to ``size``.

    Same convention as ``captum.attr.LayerAttribution.interpolate`` (``align_corners=False``).
    """
    spatial = maps.dim() - 2
    if spatial < 1 or spatial != len(size):
        raise ValueError(
            f"cannot upsample maps of shape {tuple(maps.shape)} to the input size {tuple(size)}: "
            "the layer's output and the input need the same number of spatial dimensions."
        )
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial]
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=False)


def check_normalize(normalize) -> None:
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"`normalize`={normalize!r}: expected None or 'minmax'.")
