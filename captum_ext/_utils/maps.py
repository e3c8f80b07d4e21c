"""Post-processing of attribution maps shared by the CAM methods, VOICE and the report."""

from __future__ import annotations

import math

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

    The (bi/tri)linear modes of floating-point maps are computed by
    :func:`upsample_keeping_ties` in the maps' dtype (float32 for half precision), in
    chunks of maps whose working memory stays near :data:`_UPSAMPLE_CHUNK_BYTES`: equal to
    ``F.interpolate`` up to its rounding (an ulp or two), but a plateau (a constant map)
    stays exactly constant and mirror-symmetric pixels stay exactly equal. With
    ``F.interpolate`` a constant map (a CAM at a 1 x 1 layer) came back as 3 to 5 values an
    ulp apart, and a metric that ranks pixels (ties broken by index) ordered them by that
    rounding noise: deletion curves of the same map upsampled and at 1 x 1 differed by up
    to 0.34. (The metrics resize maps themselves in float64, where every tie in exact
    arithmetic is kept; here the maps' own dtype keeps the cost near ``F.interpolate``'s.)
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
    nonempty = min(size) >= 1 and min(maps.shape[2:]) >= 1  # else torch's own error below
    if mode == _LINEAR_MODES.get(spatial) and maps.is_floating_point() and nonempty:
        return _upsampled_in_chunks(maps, tuple(int(s) for s in size))
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


def _linear_taps(old: int, new: int, device: torch.device, dtype: torch.dtype):
    """Source indices and weights of ``align_corners=False`` linear resizing of one axis,
    ``old`` -> ``new`` samples: output ``i`` reads position ``p = (i + 1/2) old / new - 1/2``
    (clamped at 0), i.e. ``lerp(m[low], m[high], t)``, ``low = floor(p)``,
    ``high = min(low + 1, old - 1)``, ``t = p - low``.

    ``p`` is formed from integers, ``((2i + 1) old - new) / (2 new)``, so outputs at the same
    fraction ``t`` get bit-identical weights wherever they lie, and the weights of mirrored
    outputs (``i`` and ``new - 1 - i`` read ``t`` and ``1 - t``) are exact complements in
    ``dtype``: the weight of at least 1/2 is rounded, the other is 1 minus it (exact).
    ``torch.lerp`` forms ``a + t (b - a)`` below 1/2 and ``b - (b - a)(1 - t)`` from 1/2 on,
    so a map symmetric under a flip stays exactly symmetric.
    """
    double = 2 * new
    numerator = (2 * torch.arange(new, dtype=torch.int64) + 1) * old - new
    numerator = numerator.clamp_min(0)  # positions left of the first sample read it
    low = torch.div(numerator, double, rounding_mode="floor")
    rest = numerator - low * double  # t = rest / (2 new), 0 <= rest < 2 new
    upper = 2 * rest >= double
    large = torch.where(upper, rest, double - rest).to(torch.float64) / double  # in [1/2, 1]
    large = large.to(device=device, dtype=dtype)
    weight = torch.where(upper.to(device), large, 1 - large)
    high = (low + 1).clamp_max(old - 1)
    return low.to(device), high.to(device), weight


# working memory of one chunk of :func:`upsample_maps` (the two gathered copies and the
# interpolated result of each axis, in the working dtype)
_UPSAMPLE_CHUNK_BYTES = 64 * 2**20


def _upsampled_in_chunks(maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """:func:`upsample_keeping_ties` of (N, C, *spatial) maps in their own dtype (float32 for
    half precision, whose weights would round coarsely), a chunk of the N x C maps at a
    time, written into the result: the gathered copies never exceed about
    ``_UPSAMPLE_CHUNK_BYTES`` however many maps there are."""
    work = maps.dtype if maps.dtype in (torch.float32, torch.float64) else torch.float32
    flat = maps.reshape(-1, 1, *maps.shape[2:])
    out = torch.empty((flat.shape[0], 1, *size), dtype=maps.dtype, device=maps.device)
    per_map = 3 * math.prod(size) * torch.empty((), dtype=work).element_size()
    rows = max(1, _UPSAMPLE_CHUNK_BYTES // max(per_map, 1))
    for start in range(0, flat.shape[0], rows):
        part = flat[start : start + rows].to(work)
        upsample_keeping_ties(part, size, into=out[start : start + rows])
    return out.view(*maps.shape[:2], *size)


def upsample_keeping_ties(
    maps: Tensor, size: tuple[int, ...], *, into: Tensor | None = None
) -> Tensor:
    """(Bi/tri)linear resizing of (N, C, *spatial) maps to ``size`` (``align_corners=False``,
    the sample positions of ``F.interpolate(mode="bilinear")``, or ``"linear"`` /
    ``"trilinear"`` for 1 / 3 spatial dimensions) that keeps equal values equal.

    ``F.interpolate`` forms ``w0 a + w1 b``, which for ``a == b`` rounds to a value an ulp
    off ``a`` at some pixels: a constant 1 x 1 map becomes 552 slightly different values on
    a 28 x 28 image, and a metric that ranks pixels (ties broken by index) orders them by
    rounding noise instead. Here each axis is one ``torch.lerp`` (``a + t (b - a)``, exact
    for ``a == b``) with weights formed from integers (:func:`_linear_taps`: the same
    fraction gives the same weight, mirrored pixels complementary ones): equal to
    ``F.interpolate`` up to rounding, exact on plateaus, mirror-symmetric maps stay exactly
    symmetric, and never outside the range of the values it interpolates between. It
    computes in the maps' dtype (the metrics call it in float64). ``into``: a tensor of the
    result's shape to write it into (cast to its dtype), which is also returned.
    """
    size = tuple(int(s) for s in size)
    if maps.dim() - 2 != len(size):
        raise ValueError(
            f"cannot resize maps of shape {tuple(maps.shape)} to {size}: expected "
            f"{maps.dim() - 2} sizes, one per spatial dimension."
        )
    out = maps
    # the last axis first (on the smallest tensor), each axis moved to dimension 2 so that
    # the gathers copy whole contiguous rows (a gather along the last axis is ~6x slower)
    for dim in reversed(range(2, out.dim())):
        old, new = out.shape[dim], size[dim - 2]
        if old == new:
            continue
        low, high, weight = _linear_taps(old, new, out.device, out.dtype)
        moved = out.movedim(dim, 2).contiguous()
        shape = [1] * moved.dim()
        shape[2] = new
        ends = moved.index_select(2, low), moved.index_select(2, high), weight.view(shape)
        # (``out=`` takes no part in autograd: maps that need gradients take the copy)
        writable = not (torch.is_grad_enabled() and moved.requires_grad)
        if dim == 2 and into is not None and into.dtype == moved.dtype and writable:
            return torch.lerp(*ends, out=into)  # the last step, straight into the result
        out = torch.lerp(*ends).movedim(2, dim)
    if into is not None:
        return into.copy_(out)
    return out.contiguous()


def check_normalize(normalize) -> None:
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"`normalize`={normalize!r}: expected None or 'minmax'.")
