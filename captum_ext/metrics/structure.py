r"""Structure-wise deletion and insertion (CausalCAM): mask what an explanation selects at
several thresholds and measure the masked image by the length of a lossless (Huffman) code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from captum.log import log_usage
from torch import Tensor

from captum_ext._utils.deprecation import renamed_arguments
from captum_ext._utils.maps import minmax_normalize
from captum_ext.metrics._huffman import huffman_bits_of_images
from captum_ext.metrics._perturbation import (
    DEFAULT_BLUR_KERNEL_SIZE,
    DEFAULT_BLUR_SIGMA,
    DEFAULT_THRESHOLDS,
    Evaluator,
    baseline_images,
    check_score,
    chunk_rows,
    evaluation,
    image_batch,
    keyword_only_after,
    ranking_scores,
    score_dtype,
)

__all__ = ["StructureCurves", "structure_deletion", "structure_insertion"]


class StructureCurves(NamedTuple):
    """What :func:`structure_deletion` and :func:`structure_insertion` return."""

    area: Tensor
    """(N,) trapezoid area of score over ratio, points sorted by ratio."""
    ratios: Tensor
    """(N, T) bits(masked) / bits(original) at each threshold, in the order of thresholds."""
    scores: Tensor
    """(N, T) probability (or correctness) of the target at each threshold."""


def _default_uint8(x: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    # in at least float32: half-precision images would round (x - low) * scale to levels
    # other than the same pixel values in float32 give
    dtype = score_dtype(x)
    low = x.to(dtype).amin(dim=(1, 2, 3))
    span = x.to(dtype).amax(dim=(1, 2, 3)) - low
    scale = torch.where(span > 0, 255.0 / torch.where(span > 0, span, 1.0), 0.0)

    def to_uint8(images: Tensor, examples: Tensor) -> Tensor:
        view = (-1, 1, 1, 1)
        return (images.to(dtype) - low[examples].view(view)) * scale[examples].view(view)

    return to_uint8


def _quantised(
    to_uint8: Callable | None, default: Callable, images: Tensor, examples: Tensor
) -> Tensor:
    if to_uint8 is None:
        values = default(images, examples)
    else:
        values = to_uint8(images)
        if not isinstance(values, Tensor) or values.shape != images.shape:
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"`to_uint8` must return a tensor shaped like the images it is given "
                f"{tuple(images.shape)}, got {got}."
            )
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise ValueError("`to_uint8` returned NaN or infinite values.")
    if values.is_floating_point():
        values = values.round()
    return values.clamp(0, 255).long()


def _check_thresholds(thresholds: Any, x: Tensor) -> Tensor:
    try:
        values = torch.as_tensor(thresholds, dtype=score_dtype(x), device=x.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"`thresholds` must be a sequence of numbers, got {type(thresholds).__name__}."
        ) from None
    if values.dim() != 1 or values.numel() == 0 or not bool(torch.isfinite(values).all()):
        raise ValueError(
            f"`thresholds` must be a non-empty 1-D sequence of finite numbers, got {thresholds!r}."
        )
    return values


def _structure_curves(
    mode: str,
    forward_func: Callable,
    inputs: Any,
    attributions: Any,
    *,
    target: Any,
    baselines: Any,
    thresholds: Any,
    score: str,
    to_uint8: Callable | None,
    channel_reduction: str,
    batch_size: int | None,
    additional_forward_args: Any,
    blur_kernel_size: int,
    blur_sigma: float,
) -> StructureCurves:
    x = image_batch(inputs)
    check_score(score)
    if to_uint8 is not None and not callable(to_uint8):
        raise TypeError(f"`to_uint8` must be callable or None, got {type(to_uint8).__name__}.")
    levels = _check_thresholds(thresholds, x)
    chunk = chunk_rows(batch_size, x)
    normalised = minmax_normalize(ranking_scores(attributions, x, channel_reduction), 1)
    base = baseline_images(baselines, x, blur_kernel_size, blur_sigma)
    n = x.shape[0]
    n_levels = levels.numel()
    device = x.device
    default_uint8 = _default_uint8(x)
    every = torch.arange(n, device=device)
    original_bits = huffman_bits_of_images(_quantised(to_uint8, default_uint8, x, every))

    evaluator = Evaluator(forward_func, x, target, additional_forward_args)
    dtype = score_dtype(x)
    values = torch.empty(n * n_levels, dtype=dtype, device=device)
    bits = torch.empty(n * n_levels, dtype=torch.long, device=device)
    with evaluation(forward_func):
        evaluator.original(x)
        for start in range(0, n * n_levels, chunk):
            rows = torch.arange(start, min(start + chunk, n * n_levels), device=device)
            examples = rows // n_levels
            selected = normalised[examples] > levels[rows % n_levels].view(-1, 1, 1, 1)
            if mode == "deletion":
                images = torch.where(selected, base[examples], x[examples])
            else:
                images = torch.where(selected, x[examples], base[examples])
            probability, correct = evaluator(images, examples)
            value = probability if score == "probability" else correct
            values[rows] = value.to(device=device, dtype=dtype)
            bits[rows] = huffman_bits_of_images(
                _quantised(to_uint8, default_uint8, images, examples)
            )
    scores = values.view(n, n_levels)
    ratios = bits.view(n, n_levels).to(dtype) / original_bits.to(dtype)[:, None]
    sorted_ratios, order = torch.sort(ratios, dim=1, stable=True)
    area = torch.trapezoid(scores.gather(1, order), sorted_ratios, dim=1)
    return StructureCurves(area, ratios, scores)


_STRUCTURE_ARGS = r"""
    Args:
        forward_func (Callable or nn.Module): the model, returning (N, C) logits. It runs
            under ``torch.no_grad`` and, when it is an ``nn.Module`` (or a bound method of
            one), in eval mode; its train/eval and gradient flags are restored afterwards.
        inputs (Tensor): images (N, C, H, W), floating point (a 1-tuple is accepted).
        attributions (Tensor): one explanation per example, (N, C, H, W), (N, 1, h, w) or
            (N, h, w), upsampled bilinearly to H x W when smaller or larger. A resized map
            is upsampled, normalised and thresholded in float64 (float32 on Apple's MPS),
            pixels equal in exact arithmetic (a plateau, a constant 1 x 1 map) kept exactly
            equal: they fall on the same side of every threshold, as for the same map given
            at H x W.
        target (int, list, Tensor, optional): the class followed, one per example.
            Default: None, the class predicted on the unperturbed input.
        baselines (float, str or Tensor, optional): what a masked pixel becomes: a number
            (default 0.0), ``"mean"`` (per-channel mean of each image), ``"blur"``
            (Gaussian blur) or a tensor broadcastable to the inputs, as in
            :func:`deletion`.
        thresholds (sequence of float, optional): the levels t, applied to the min-max
            normalised explanation. Default: (0.0, 0.1, ..., 0.9).
        score (str, optional): ``"probability"`` (default): softmax probability of the
            target; ``"accuracy"`` (or its alias ``"correct"``): 1.0 where the model's top
            class on the masked image is the target, else 0.0 (with ``target`` the labels,
            averaging over examples gives accuracy).
        to_uint8 (Callable, optional): maps a batch of images shaped like the inputs (any
            number of rows: originals and masked copies) to their displayed 8-bit values;
            the result is rounded and clamped to 0..255. Pass e.g. the inverse of your
            normalisation times 255. Default: None, min-max of each *original* image to
            0..255, the same affine map applied to its masked copies (values outside the
            original's range are clamped; a constant image maps to 0).
        channel_reduction (str, optional): for attributions with the input's C > 1
            channels: ``"sum_abs"`` (default) masks whole pixels by ``sum_c |attr_c|``;
            ``"per_channel"`` thresholds every (channel, pixel) entry, normalised over all
            entries of the example.
        batch_size (int, optional): masked images per forward pass. Default: None, as many
            as fit 32 MiB of inputs, at most 256. Results do not depend on it.
        additional_forward_args (Any, optional): passed to ``forward_func`` after the
            images; tensors whose first dimension is N, also inside tuples, lists,
            mappings and dataclasses, follow the masked rows' examples. A tensor shared by
            all examples whose first dimension happens to be N (a ``(C, D)`` class table
            with ``C == N``) follows them too: refused (ValueError) where a chunk's row
            count differs from N (the classes then change with the rows), but a chunk of
            exactly N rows keeps the shape and is scored silently against the table's
            re-indexed rows. Bind such a table in a closure
            (``forward_func=lambda x, meta: model(x, meta, table)``).
        blur_kernel_size (int, optional): Gaussian kernel size for ``baselines="blur"``.
            Default: 11.
        blur_sigma (float, optional): its standard deviation. Default: 5.0.

    Returns:
        StructureCurves:
        - **area** (*Tensor*): (N,) trapezoid area of score over bit ratio, the points of
          each example sorted by ratio (stable sort). The area covers only the range of
          ratios reached, so it is not an average over [0, 1];
        - **ratios** (*Tensor*): (N, T) ``bits(masked) / bits(original)``, in the order of
          ``thresholds``;
        - **scores** (*Tensor*): (N, T) the score at each threshold;

        a named tuple: ``area, ratios, scores = structure_deletion(...)`` works.
"""

_STRUCTURE_FORMULA = r"""
    .. code-block:: text

        m       = minmax(explanation) in [0, 1]            (per example)
        bits(z) = sum_v count_v(q(z)) * len_v               Huffman code of the 8-bit values
                  q = to_uint8, len_v = Huffman code length of value v (1 bit per value
                  when the image has a single value)
        ratio_t = bits(x_t) / bits(x)
        score_t = softmax(f(x_t))[target]                   (or 1[argmax f(x_t) == target])
        area    = trapezoid of score_t over ratio_t, points sorted by ratio

    The Huffman code is built from the histogram of all C * H * W values of the image
    (one code per image); ``bits`` is its total length in bits, without the code table.
    A Huffman code spends at least 1 bit per value, so a heavily masked image still costs
    about ``C * H * W`` bits: ratios stay above ``C * H * W / bits(x)``.
"""


def _with_structure_args(function: Callable) -> Callable:
    function.__doc__ = function.__doc__.replace(
        "{structure_formula}", _STRUCTURE_FORMULA.strip()
    ).replace("{structure_args}", _STRUCTURE_ARGS.strip())
    return function


@keyword_only_after(3)
@renamed_arguments(max_batch="batch_size")
@_with_structure_args
@log_usage()
def structure_deletion(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    *,
    target: Any = None,
    baselines: float | str | Tensor = 0.0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    score: str = "probability",
    to_uint8: Callable[[Tensor], Tensor] | None = None,
    channel_reduction: str = "sum_abs",
    batch_size: int | None = None,
    additional_forward_args: Any = None,
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> StructureCurves:
    r"""Structure-wise deletion: delete what the explanation selects, count what is left.

    For each threshold t the pixels whose normalised explanation exceeds t are set to the
    baseline. The masked image is measured by the length of a lossless code of its 8-bit
    values (Huffman), relative to the original image, and the model's score of the target
    is read. A good explanation makes the score fall while deleting few bits (low curve).

    {structure_formula}

    with ``x_t = where(m > t, baseline, x)``.

    Paper: Prabhushankar & AlRegib, "Extracting Causal Visual Features for Limited Label
    Classification" (CausalCAM), ICIP 2021; AlRegib & Prabhushankar, "Inferential Machine
    Learning", WACV 2025 tutorial.

    {structure_args}

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits
        >>> from captum_ext.metrics import structure_deletion
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER))
        >>> maps = cam.attribute(images[:8], target=labels[:8])
        >>> area, ratios, scores = structure_deletion(model, images[:8], maps, target=labels[:8])
        >>> ratios.shape
        torch.Size([8, 10])
    """
    return _structure_curves(
        "deletion",
        forward_func,
        inputs,
        attributions,
        target=target,
        baselines=baselines,
        thresholds=thresholds,
        score=score,
        to_uint8=to_uint8,
        channel_reduction=channel_reduction,
        batch_size=batch_size,
        additional_forward_args=additional_forward_args,
        blur_kernel_size=blur_kernel_size,
        blur_sigma=blur_sigma,
    )


@keyword_only_after(3)
@renamed_arguments(max_batch="batch_size")
@_with_structure_args
@log_usage()
def structure_insertion(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    *,
    target: Any = None,
    baselines: float | str | Tensor = 0.0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    score: str = "probability",
    to_uint8: Callable[[Tensor], Tensor] | None = None,
    channel_reduction: str = "sum_abs",
    batch_size: int | None = None,
    additional_forward_args: Any = None,
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> StructureCurves:
    r"""Structure-wise insertion: keep only what the explanation selects, count its bits.

    For each threshold t only the pixels whose normalised explanation exceeds t are kept,
    the others set to the baseline. The best explanation keeps the score of the target
    with the fewest bits of a lossless (Huffman) code of the 8-bit image (high curve at
    low ratios).

    {structure_formula}

    with ``x_t = where(m > t, x, baseline)``.

    Paper: Prabhushankar & AlRegib, "Extracting Causal Visual Features for Limited Label
    Classification" (CausalCAM), ICIP 2021; AlRegib & Prabhushankar, "Inferential Machine
    Learning", WACV 2025 tutorial.

    {structure_args}

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, denormalize_digits, load_sample_digits
        >>> from captum_ext.metrics import structure_insertion
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER))
        >>> maps = cam.attribute(images[:8], target=labels[:8])
        >>> curves = structure_insertion(
        ...     model, images[:8], maps, target=labels[:8], score="accuracy",
        ...     baselines=images.min(), to_uint8=lambda z: denormalize_digits(z) * 255)
        >>> curves.area.shape
        torch.Size([8])
    """
    return _structure_curves(
        "insertion",
        forward_func,
        inputs,
        attributions,
        target=target,
        baselines=baselines,
        thresholds=thresholds,
        score=score,
        to_uint8=to_uint8,
        channel_reduction=channel_reduction,
        batch_size=batch_size,
        additional_forward_args=additional_forward_args,
        blur_kernel_size=blur_kernel_size,
        blur_sigma=blur_sigma,
    )
