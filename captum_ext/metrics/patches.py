r"""Patch metrics of "Do explanations explain? Model knows best" (Khakzar et al., CVPR 2022).

The paper builds images with two patches, A and B, each of which alone drives a different
class, and whose effects do not interact. A faithful map of class A then puts its mass on A
and none on B. Given the patches as boxes ``(x0, y0, x1, y1)`` (pixels; x1, y1 exclusive),
and maps ``(N, C, H, W)`` (channels summed):

- :func:`null_player`: :math:`\sum_{B} a^{A} / \sum_{A} a^{A}`, the map of class A summed on
  the patch that does not affect A, over its sum on patch A (signed sums, as in the paper's
  code). Ideal 0.
- :func:`patch_class_sensitivity`: with :math:`h^A`, :math:`h^B` the absolute maps of the two
  classes, :math:`[\sum_A \min(h^A, h^B) + \sum_B \min(h^A, h^B)] / [\sum_A h^A + \sum_B h^B]`.
  0 when each class's map lies only on its own patch; 1 when the maps are identical.
- :func:`single_patch`: mean :math:`|a|` inside the patch over mean :math:`|a|` outside, for
  an image with one patch. Higher is better.
- :func:`saturation`: the same patch pasted twice; the Spearman correlation, across images,
  of the :math:`|a|` mass on one copy against the other (a method that saturates, giving all
  the mass to one copy, decorrelates them).

Where a ratio's denominator is zero for an example (no mass on the target patch, no mass on
either patch, no mass outside the single patch), its value is ``nan`` when the numerator is
zero too and ``inf`` (signed) otherwise, as the division gives, and a ``RuntimeWarning``
says how many examples are affected: average such scores with ``torch.nanmean`` or drop
them, knowingly.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from captum_ext.metrics.ground_truth import _object_masks, _pixel_maps
from captum_ext.metrics.sanity import rank_correlation

__all__ = ["null_player", "patch_class_sensitivity", "saturation", "single_patch"]


def _masks(boxes: Any, maps: Tensor, argument: str) -> Tensor:
    try:
        return _object_masks(boxes, tuple(maps.shape)).to(maps.device)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("`objects`", f"`{argument}`")) from None


def _ratio(numerator: Tensor, denominator: Tensor, metric: str, zero: str) -> Tensor:
    """``numerator / denominator``, with a warning naming the examples whose denominator is
    zero (``zero`` says what that means) and whose value is therefore inf or nan."""
    undefined = denominator == 0
    if bool(undefined.any()):
        rows = undefined.nonzero().flatten().tolist()
        shown = ", ".join(str(i) for i in rows[:10]) + (", ..." if len(rows) > 10 else "")
        warnings.warn(
            f"{metric}: {len(rows)} of {denominator.numel()} examples have {zero} (rows "
            f"{shown}); their value is inf, or nan where the numerator is 0 too.",
            RuntimeWarning,
            stacklevel=3,
        )
    return numerator / denominator


def null_player(attributions: Any, target_boxes: Any, null_boxes: Any) -> Tensor:
    """Signed map mass on the null patch over that on the target patch, ``(N,)`` float64
    (inf or nan, with a warning, for an example with no signed mass on its target patch)."""
    maps = _pixel_maps(attributions, "attributions")
    on_target = (maps * _masks(target_boxes, maps, "target_boxes")).flatten(1).sum(1)
    on_null = (maps * _masks(null_boxes, maps, "null_boxes")).flatten(1).sum(1)
    return _ratio(on_null, on_target, "null_player", "no signed map mass on the target patch")


def patch_class_sensitivity(
    attributions_a: Any, attributions_b: Any, boxes_a: Any, boxes_b: Any
) -> Tensor:
    """Overlap of the two classes' absolute maps on the two patches, ``(N,)`` float64 (nan,
    with a warning, for an example whose maps are zero on both patches)."""
    h_a = _pixel_maps(attributions_a, "attributions_a").abs()
    h_b = _pixel_maps(attributions_b, "attributions_b").abs()
    if h_a.shape != h_b.shape:
        raise ValueError(
            f"`attributions_a` {tuple(h_a.shape)} and `attributions_b` {tuple(h_b.shape)} must "
            "have the same (N, H, W) after summing channels."
        )
    on_a = _masks(boxes_a, h_a, "boxes_a")
    on_b = _masks(boxes_b, h_a, "boxes_b")
    overlap = torch.minimum(h_a, h_b)
    shared = (overlap * on_a).flatten(1).sum(1) + (overlap * on_b).flatten(1).sum(1)
    own = (h_a * on_a).flatten(1).sum(1) + (h_b * on_b).flatten(1).sum(1)
    return _ratio(shared, own, "patch_class_sensitivity", "no map mass on either patch")


def single_patch(attributions: Any, boxes: Any) -> Tensor:
    """Mean ``|a|`` inside the patch over mean ``|a|`` outside it, ``(N,)`` float64 (inf or
    nan, with a warning, for an example with no mass outside the patch). A box that covers
    the whole image leaves no outside and is refused."""
    maps = _pixel_maps(attributions, "attributions").abs()
    inside = _masks(boxes, maps, "boxes").flatten(1)
    whole = inside.all(dim=1)
    if bool(whole.any()):
        raise ValueError(
            f"`boxes`: the box of example {int(whole.nonzero()[0, 0])} covers the whole "
            f"{maps.shape[-2]} x {maps.shape[-1]} image, so there is no outside to compare with."
        )
    flat = maps.flatten(1)
    mean_in = (flat * inside).sum(1) / inside.sum(1)
    mean_out = (flat * ~inside).sum(1) / (~inside).sum(1)
    return _ratio(mean_in, mean_out, "single_patch", "no map mass outside the patch")


def saturation(attributions: Any, first_boxes: Any, second_boxes: Any) -> float:
    """Spearman correlation across images of the ``|a|`` mass on two copies of one patch
    (nan, with a warning, where either copy's mass is the same in every image, as for a method
    that attributes nothing or one that never gives the second copy any mass: a rank
    correlation with a constant is undefined)."""
    maps = _pixel_maps(attributions, "attributions").abs()
    first = (maps * _masks(first_boxes, maps, "first_boxes")).flatten(1).sum(1)
    second = (maps * _masks(second_boxes, maps, "second_boxes")).flatten(1).sum(1)
    if maps.shape[0] < 3:
        raise ValueError("`attributions`: saturation correlates across images; give at least 3.")
    constant = [
        name
        for name, mass in (("first", first), ("second", second))
        if bool((mass == mass[0]).all())
    ]
    if constant:
        copies = "each copy" if len(constant) == 2 else f"the {constant[0]} copy"
        warnings.warn(
            f"saturation: the mass on {copies} is the same in every image, so the correlation "
            "across images is undefined; returning nan.",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan")
    return float(rank_correlation(first[None], second[None])[0])
