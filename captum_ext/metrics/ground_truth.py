r"""Attributions judged against ground truth: precision / recall / F1 and the pointing games.

- :func:`attribution_precision_recall` and :func:`attribution_f1` compare the pixels a map
  marks with the pixels that truly matter (from a designed oracle network of
  :mod:`captum_ext.testing`, or annotated). For each example the map marks a set :math:`P` of
  pixels and the ground truth a set :math:`R`;
  :math:`\text{precision} = |P \cap R| / |P|`, :math:`\text{recall} = |P \cap R| / |R|`,
  :math:`F_1 = 2\,\text{precision}\cdot\text{recall} / (\text{precision} + \text{recall})`.
- :func:`pointing_game` (Zhang et al., "Top-down neural attention by excitation backprop",
  ECCV 2016): a hit when the map's maximum lies inside the object (mask or box), or less
  than ``tolerance`` pixels from it in Euclidean distance (15 in the paper, at 224 px).
- :func:`energy_pointing_game` (Wang et al., "Score-CAM", CVPR-W 2020): the share of the map's
  positive mass that falls inside the object.

Every function takes maps of shape ``(N, C, H, W)`` (channels summed; a one-tensor tuple as
Captum returns is accepted) and returns one value per example. Layer-sized maps (a CAM's)
must be resized to the ground truth's size first; resize them bilinearly, as the package's
own upsampling does (the CAMs' ``upsample_to_input=True``, deletion, ROAD, the sanity
checks), with ``interpolate_mode="bilinear"`` if through
``captum.attr.LayerAttribution.interpolate``, whose default (nearest) moves where the maxima
fall and so changes the pointing game's hits.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from captum_ext._utils.precision import float64_here_or_cpu
from captum_ext._utils.validation import check_int, check_number

__all__ = [
    "AttributionPrecisionRecall",
    "attribution_f1",
    "attribution_precision_recall",
    "energy_pointing_game",
    "pointing_game",
]

_SIGNS = ("positive", "negative", "absolute")
_SELECTIONS = ("top-k", "threshold", "nonzero")


#: how to bring layer-sized maps to the ground truth's size, as the package resizes maps
_BILINEAR_RESIZE = (
    "upsample_to_input=True for the CAMs, or captum.attr.LayerAttribution.interpolate(maps, "
    "size, interpolate_mode='bilinear'), bilinear as deletion and ROAD resize (its default "
    "mode is 'nearest')"
)


class AttributionPrecisionRecall(NamedTuple):
    """What :func:`attribution_precision_recall` returns; each field ``(N,)``."""

    precision: Tensor
    recall: Tensor
    f1: Tensor


def _pixel_maps(maps: Any, argument: str) -> Tensor:
    """``(N, H * W)``-like flat maps: channels summed, a one-tensor tuple unpacked."""
    if isinstance(maps, tuple):
        if len(maps) != 1:
            raise ValueError(f"`{argument}` is a tuple of {len(maps)} tensors; pass one tensor.")
        maps = maps[0]
    if not isinstance(maps, Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(maps).__name__}.")
    if maps.dim() not in (3, 4):
        raise ValueError(
            f"`{argument}` must have shape (N, C, H, W) or (N, H, W), got {tuple(maps.shape)}."
        )
    if maps.is_complex():
        raise TypeError(f"`{argument}` must hold real values, got {maps.dtype}.")
    if maps.is_floating_point() and not bool(torch.isfinite(maps).all()):
        raise ValueError(f"`{argument}` contains NaN or infinite values.")
    # channels summed in float64: a float16 sum overflows past 65,504 and a float32 one
    # merges maxima that differ in the last bits
    maps = float64_here_or_cpu(maps)
    return maps.sum(dim=1) if maps.dim() == 4 else maps


def _same_shape(maps: Tensor, truth: Tensor) -> None:
    if maps.shape != truth.shape:
        raise ValueError(
            f"`attributions` have (N, H, W) = {tuple(maps.shape)} after summing channels but "
            f"`ground_truth` has {tuple(truth.shape)}; upsample the maps to the input size first "
            f"({_BILINEAR_RESIZE})."
        )


def attribution_precision_recall(
    attributions: Any,
    ground_truth: Any,
    *,
    sign: str = "positive",
    selection: str = "top-k",
    threshold: float = 0.5,
) -> AttributionPrecisionRecall:
    r"""Precision, recall and F1 of the pixels a map marks against the ground truth.

    Args:
        attributions (Tensor): ``(N, C, H, W)`` or ``(N, H, W)`` maps (channels are summed).
        ground_truth (Tensor): the exact attributions, same shape after summing channels.
        sign (str): which evidence is compared. ``"positive"``: :math:`R` is the pixels with
            ground truth > 0, pixels are ranked by the map's value. ``"negative"``: ground
            truth < 0, ranked by minus the value. ``"absolute"``: ground truth != 0, ranked by
            the absolute value. Default: ``"positive"``.
        selection (str): how the map marks :math:`P`. ``"top-k"``: the :math:`|R|` highest
            ranked pixels (per example; only pixels with a rank score > 0), so precision and
            recall coincide when there are enough of them. ``"threshold"``: the pixels with a
            rank score >= ``threshold`` times the example's highest (and > 0), so
            ``threshold=1`` marks the pixels at the maximum. ``"nonzero"``: every
            pixel with a rank score above 1e-6 of the highest (for null regions). Default:
            ``"top-k"``.
        threshold (float): for ``selection="threshold"``, in (0, 1]. Default: 0.5.

    Returns:
        AttributionPrecisionRecall: ``precision``, ``recall``, ``f1``, each ``(N,)`` float64.
        An empty :math:`P` has precision 1 when :math:`R` is empty, else 0; an empty :math:`R`
        has recall 1; F1 is 0 when precision and recall are both 0.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import attribution_precision_recall
        >>> truth = torch.zeros(1, 1, 4, 4); truth[..., :2, :2] = 1.0
        >>> maps = torch.zeros(1, 1, 4, 4); maps[..., :2, :3] = 1.0
        >>> attribution_precision_recall(maps, truth, selection="threshold")
        AttributionPrecisionRecall(precision=tensor([0.6667], dtype=torch.float64), recall=tensor([1.], dtype=torch.float64), f1=tensor([0.8000], dtype=torch.float64))
    """  # noqa: E501
    if sign not in _SIGNS:
        raise ValueError(f"`sign`={sign!r}: expected one of {', '.join(_SIGNS)}.")
    if selection not in _SELECTIONS:
        raise ValueError(f"`selection`={selection!r}: expected one of {', '.join(_SELECTIONS)}.")
    threshold = check_number(threshold, "threshold", maximum=1.0)
    maps = _pixel_maps(attributions, "attributions")
    truth = _pixel_maps(ground_truth, "ground_truth")
    _same_shape(maps, truth)
    maps, truth = maps.flatten(1), truth.flatten(1).to(maps.device)
    if sign == "positive":
        relevant, score = truth > 0, maps
    elif sign == "negative":
        relevant, score = truth < 0, -maps
    else:
        relevant, score = truth != 0, maps.abs()
    top = score.max(dim=1, keepdim=True).values.clamp_min(0.0)
    if selection == "top-k":
        k = relevant.sum(dim=1, keepdim=True)
        # rank 0 = highest score; ties keep index order (stable)
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        ranks = torch.empty_like(order).scatter_(
            1, order, torch.arange(score.shape[1], device=score.device).expand_as(order)
        )
        marked = (ranks < k) & (score > 0)
    elif selection == "threshold":
        # >=: threshold=1 (allowed) marks the maximum; > would mark nothing
        marked = (score >= threshold * top) & (score > 0)
    else:
        marked = (score > 1e-6 * top) & (score > 0)
    hits = (marked & relevant).sum(dim=1).double()
    n_marked = marked.sum(dim=1).double()
    n_relevant = relevant.sum(dim=1).double()
    precision = torch.where(n_marked > 0, hits / n_marked.clamp_min(1), (n_relevant == 0).double())
    recall = torch.where(n_relevant > 0, hits / n_relevant.clamp_min(1), torch.ones_like(hits))
    total = precision + recall
    f1 = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-300), 0.0)
    return AttributionPrecisionRecall(precision, recall, f1)


def attribution_f1(attributions: Any, ground_truth: Any, **kwargs: Any) -> Tensor:
    """F1 of the pixels a map marks against the ground truth, ``(N,)``.

    The same as ``attribution_precision_recall(...).f1``; keywords as there.
    """
    return attribution_precision_recall(attributions, ground_truth, **kwargs).f1


#: pixels a box may reach past the maps' edge and still be taken (clipped): the rounding of a
#: box rescaled in floating point, never a whole pixel
_BOX_SLACK = 0.5


def _object_masks(objects: Any, shape: tuple[int, int, int]) -> Tensor:
    """``(N, H, W)`` bool masks from masks or ``(N, 4)`` boxes ``(x0, y0, x1, y1)``."""
    n, h, w = shape
    if not isinstance(objects, Tensor):
        raise TypeError(
            f"`objects` must be a torch.Tensor (masks or boxes), got {type(objects).__name__}."
        )
    if objects.dim() == 2 and objects.shape == (n, 4):
        boxes = float64_here_or_cpu(objects)
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError("`objects`: boxes contain NaN or infinite coordinates.")
        ys = torch.arange(h, dtype=torch.float64, device=boxes.device).view(1, h, 1)
        xs = torch.arange(w, dtype=torch.float64, device=boxes.device).view(1, 1, w)
        x0, y0, x1, y1 = (boxes[:, i].view(n, 1, 1) for i in range(4))
        if bool(((x1 < x0) | (y1 < y0)).any()):
            raise ValueError("`objects`: boxes must be (x0, y0, x1, y1) with x1 >= x0, y1 >= y0.")
        # boxes in image pixels with layer-sized maps would be read as map pixels; an
        # overshoot under half a pixel (a box rescaled in floating point) changes no pixel
        slack = _BOX_SLACK
        outside = (
            ((x0 < -slack) | (y0 < -slack) | (x1 > w + slack) | (y1 > h + slack))
            .flatten()
            .nonzero()[:, 0]
            .tolist()
        )
        if outside:
            shown = outside[:5] + (["..."] if len(outside) > 5 else [])
            raise ValueError(
                f"`objects`: the box of example(s) {shown} reaches past the {h} x {w} maps "
                f"(first: {boxes[outside[0]].tolist()}). Boxes are in "
                "pixels of the maps: upsample the maps to the image's size first "
                f"({_BILINEAR_RESIZE}), or clip boxes that leave the image "
                f"(boxes.clamp(min=0) and x1 <= {w}, y1 <= {h})."
            )
        masks = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        kind = "box"
    else:
        masks = objects.squeeze(1) if objects.dim() == 4 and objects.shape[1] == 1 else objects
        if tuple(masks.shape) != shape:
            resize = (
                f"; the maps are {h} x {w}: give them at the masks' size (upsample them: "
                f"{_BILINEAR_RESIZE})"
                if masks.dim() == 3 and masks.shape[0] == n and masks.shape[1:] != shape[1:]
                else ""
            )
            raise ValueError(
                f"`objects` must be (N, 4) boxes (x0, y0, x1, y1) or masks of shape (N, H, W) = "
                f"{shape} (or (N, 1, H, W)), got {tuple(objects.shape)}{resize}."
            )
        if masks.dtype != torch.bool and not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError(
                f"`objects`: masks must be bool or hold only 0 and 1, got {masks.dtype} values "
                f"in [{float(masks.min()):g}, {float(masks.max()):g}]; threshold them first."
            )
        masks, kind = masks.bool(), "mask"
    empty = (~masks.flatten(1).any(dim=1)).nonzero()[:, 0].tolist()
    if empty:
        shown = empty[:5] + (["..."] if len(empty) > 5 else [])
        hint = (
            " (of zero area: boxes are in pixels of the maps, (x0, y0, x1, y1) with x1, y1 "
            "exclusive)"
            if kind == "box"
            else ""
        )
        raise ValueError(
            f"`objects`: the {kind} of example(s) {shown} covers no pixel of the {h} x {w} "
            f"maps{hint}; leave out the examples without an object."
        )
    return masks


def pointing_game(attributions: Any, objects: Any, *, tolerance: int = 0) -> Tensor:
    """Whether each map's maximum points at the object, ``(N,)`` bool.

    A hit when the pixel of highest attribution (channels summed; the first in row-major order
    among ties) lies inside the object or, with ``tolerance`` t > 0, less than t pixels from
    it in Euclidean distance: some object pixel (y, x) has (y - y*)^2 + (x - x*)^2 < t^2,
    the disk of the protocol's reference implementation (TorchRay's
    ``PointingGame.evaluate``, strict ``<``: ``tolerance=1`` accepts the object only, a
    pixel next to it needs 2, a diagonal neighbour 2 too). The game's score over a dataset is
    the mean of the hits. Quantus' ``PointingGame`` has no tolerance: it equals
    ``tolerance=0`` (up to ties: Quantus counts any tied maximum, this the first).

    Args:
        attributions (Tensor): ``(N, C, H, W)`` or ``(N, H, W)`` maps at the input's size
            (a CAM's resized bilinearly: ``upsample_to_input=True``).
        objects (Tensor): ``(N, H, W)`` / ``(N, 1, H, W)`` masks, or ``(N, 4)`` boxes
            ``(x0, y0, x1, y1)`` in pixels of the maps (x1, y1 exclusive; boxes reaching past
            the maps are refused, since image-pixel boxes on layer-sized maps would be read
            wrongly).
        tolerance (int): the radius, in pixels, of the disk around the maximum that must
            meet the object (strictly inside it; 15 at 224 px in the paper, as in TorchRay).
            Default: 0 (the maximum must lie on the object).

    Reference: J. Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016.
    """
    tolerance = check_int(tolerance, "tolerance", minimum=0)
    maps = _pixel_maps(attributions, "attributions")
    n, h, w = maps.shape
    masks = _object_masks(objects, (n, h, w)).to(maps.device)
    best = maps.flatten(1).argmax(dim=1)
    hits = masks.flatten(1).gather(1, best[:, None])[:, 0]
    if tolerance:
        # TorchRay's PointingGame.evaluate: the disk of squared radius < tolerance^2 around
        # the maximum meets the object (integers: exact)
        row, col = (best // w).view(n, 1, 1), (best % w).view(n, 1, 1)
        ys = torch.arange(h, device=maps.device).view(1, h, 1)
        xs = torch.arange(w, device=maps.device).view(1, 1, w)
        radius = min(tolerance, h + w)  # past h + w the disk holds every pixel: no overflow
        accept = (ys - row) ** 2 + (xs - col) ** 2 < radius**2
        hits = hits | (masks & accept).flatten(1).any(dim=1)
    return hits


def energy_pointing_game(attributions: Any, objects: Any) -> Tensor:
    r"""Share of each map's positive mass inside the object, ``(N,)`` float64.

    .. math::  \frac{\sum_{p \in \text{object}} \max(a_p, 0)}{\sum_p \max(a_p, 0)}

    0 for a map with no positive mass.

    Reference: H. Wang et al., "Score-CAM: score-weighted visual explanations for
    convolutional neural networks", CVPR Workshops 2020.
    """
    maps = _pixel_maps(attributions, "attributions").clamp_min(0.0)
    masks = _object_masks(objects, tuple(maps.shape)).to(maps.device)
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * masks).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), 0.0)
