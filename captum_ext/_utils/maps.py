"""Post-processing of attribution maps shared by the CAM methods, VOICE and the report."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import OutOfMemoryError

NORMALIZE_CHOICES = (None, "minmax")


def minmax_normalize(maps: Tensor, start_dim: int = 2) -> Tensor:
    """Scale each map (the dims from ``start_dim`` on) to [0, 1]; a constant map gives zeros.

    ``(m - min m) / (max m - min m)`` per map; where the map is constant the result is all
    zeros (never NaN); a map holding NaN (a model whose activations overflowed) comes back
    all NaN, not as an empty map. "Constant" allows for rounding: a span of at most 8
    units in the last place of the map's largest magnitude (``8 eps max|m|``) is what
    bilinear upsampling of a constant map leaves (its weights sum to 1 only up to
    rounding), and stretching it to [0, 1] would draw a pattern that is not in the map.
    """
    if maps.dim() <= start_dim:
        raise ValueError(
            f"cannot min-max normalise maps of shape {tuple(maps.shape)}: no spatial dimensions."
        )
    flat = maps.flatten(start_dim)
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    if flat.is_floating_point() and not bool(torch.isfinite(span).all()):
        # finite maps spanning more than the dtype's range (+-2e38 in float32): max - min
        # overflowed; the normalised map is scale-free, so divide by max |m| first
        magnitude = flat.abs().amax(dim=-1, keepdim=True)
        flat = flat / torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
        low = flat.amin(dim=-1, keepdim=True)
        span = flat.amax(dim=-1, keepdim=True) - low
    if flat.is_floating_point():
        rounding = 8 * torch.finfo(flat.dtype).eps * flat.abs().amax(dim=-1, keepdim=True)
        varies = span > rounding
    else:
        varies = span > 0
    safe = torch.where(varies, span, torch.ones_like(span))
    scaled = torch.where(varies, (flat - low) / safe, torch.zeros_like(flat))
    if flat.is_floating_point():  # a map holding NaN (a model that overflowed) stays NaN,
        broken = torch.isnan(flat).any(dim=-1, keepdim=True)  # not an all-zero "empty" map
        scaled = torch.where(broken, torch.full_like(scaled, float("nan")), scaled)
    return scaled.view_as(maps)


INTERPOLATE_MODES = (
    "nearest",
    "nearest-exact",
    "linear",
    "bilinear",
    "bicubic",
    "trilinear",
    "area",
)
_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample_maps(maps: Tensor, size: tuple[int, ...], mode: str | None = None) -> Tensor:
    """Resize (N, C', *spatial) maps to ``size``: by default bilinearly (linear / trilinear for
    1 / 3 spatial dimensions), ``align_corners=False``.

    The published CAM post-processing interpolates (bi)linearly. ``mode`` is any mode of
    ``torch.nn.functional.interpolate`` for the number of spatial dimensions; the result
    equals ``captum.attr.LayerAttribution.interpolate(maps, size, interpolate_mode=mode)``
    (whose own default is ``"nearest"``, which gives blocky maps: on the bundled digit model
    the min-max normalised 7x7 -> 28x28 maps of the two modes differ by up to 0.57 per
    pixel, 0.06 on average).
    """
    spatial = maps.dim() - 2
    if spatial < 1 or spatial != len(size):
        raise ValueError(
            f"cannot upsample maps of shape {tuple(maps.shape)} to the input size {tuple(size)}: "
            "the layer's output and the input need the same number of spatial dimensions."
        )
    if mode is None:
        mode = _LINEAR_MODES.get(spatial, "nearest")
    if mode not in INTERPOLATE_MODES:
        raise ValueError(
            f"`interpolate_mode`={mode!r}: expected one of {INTERPOLATE_MODES} (the modes of "
            "torch.nn.functional.interpolate)."
        )
    linear = mode in ("linear", "bilinear", "bicubic", "trilinear")
    try:
        return F.interpolate(
            maps, size=tuple(size), mode=mode, align_corners=False if linear else None
        )
    except OutOfMemoryError:
        raise
    except (NotImplementedError, ValueError, RuntimeError) as error:
        # torch refuses a mode for this number of spatial dims (e.g. "bicubic" on 1-D maps)
        raise ValueError(
            f"`interpolate_mode`={mode!r} does not apply to maps with {spatial} spatial "
            f"dimension(s) ({error})."
        ) from error


def upsample_keeping_ties(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resizing of (N, C, h, w) maps to ``size`` (``align_corners=False``, the
    sample positions of ``F.interpolate(mode="bilinear")``) that keeps equal values equal.

    ``F.interpolate`` forms ``w0 a + w1 b``, which for ``a == b`` rounds to a value an ulp
    off ``a`` at some pixels: a constant 1 x 1 map becomes 552 slightly different values on
    a 28 x 28 image, and a metric that ranks pixels (ties broken by index) orders them by
    rounding noise instead. Here each axis is one ``torch.lerp`` (``a + t (b - a)``, exact
    for ``a == b``): equal to ``F.interpolate`` up to rounding, exact on plateaus, and
    never outside the range of the values it interpolates between.
    """
    out = maps
    for dim, new in ((2, size[0]), (3, size[1])):
        old = out.shape[dim]
        if old == new:
            continue
        position = (torch.arange(new, dtype=torch.float64) + 0.5) * (old / new) - 0.5
        position = position.clamp_min(0)
        low = position.floor().long().clamp_max(old - 1)
        high = (low + 1).clamp_max(old - 1)
        weight = (position - low).to(device=out.device, dtype=out.dtype)
        shape = [1] * out.dim()
        shape[dim] = new
        low, high = low.to(out.device), high.to(out.device)
        out = torch.lerp(
            out.index_select(dim, low), out.index_select(dim, high), weight.view(shape)
        )
    return out


def check_normalize(normalize) -> None:
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"`normalize`={normalize!r}: expected None or 'minmax'.")
