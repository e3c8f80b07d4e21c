r"""Pixel-wise deletion and insertion (RISE): intervene on the input in the order of an
explanation and read the class probability along the way.

:func:`deletion` / :func:`insertion` return the (N,) areas; :func:`deletion_curves` /
:func:`insertion_curves` the full :class:`PerturbationCurves`. All ``N * (n_steps + 1)``
perturbed images of a batch go through the model together, ``batch_size`` rows per forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from captum.log import log_usage
from torch import Tensor

from captum_ext._utils.caller import user_stacklevel
from captum_ext._utils.deprecation import renamed_arguments
from captum_ext._utils.validation import check_flag, check_int
from captum_ext.metrics._perturbation import (
    DEFAULT_BLUR_KERNEL_SIZE,
    DEFAULT_BLUR_SIGMA,
    DEFAULT_N_STEPS,
    Evaluator,
    baseline_images,
    chunk_rows,
    evaluation,
    image_batch,
    keyword_only_after,
    ranking_scores,
    score_dtype,
)

__all__ = [
    "PerturbationCurves",
    "deletion",
    "deletion_curves",
    "insertion",
    "insertion_curves",
]


class PerturbationCurves(NamedTuple):
    """What :func:`deletion_curves` and :func:`insertion_curves` return (always this type)."""

    auc: Tensor
    """(N,) area under each curve."""
    curves: Tensor
    """(N, n_steps + 1) probability of the target after each step (step 0 first)."""
    fractions: Tensor
    """(n_steps + 1,) fraction of the pixels perturbed at each step, from 0 to 1."""


# ---------------------------------------------------------------------------------------------
# pixel-wise deletion / insertion


def _perturbation_curves(
    mode: str,
    forward_func: Callable,
    inputs: Any,
    attributions: Any,
    *,
    target: Any,
    baselines: Any,
    n_steps: int,
    batch_size: int | None,
    channel_reduction: str,
    additional_forward_args: Any,
    blur_kernel_size: int,
    blur_sigma: float,
) -> PerturbationCurves:
    x = image_batch(inputs)
    n_steps = check_int(n_steps, "n_steps")
    chunk = chunk_rows(batch_size, x)
    ranked = ranking_scores(attributions, x, channel_reduction)
    base = baseline_images(baselines, x, blur_kernel_size, blur_sigma)
    n = x.shape[0]
    device = x.device

    # rank of each pixel (or channel-pixel) in decreasing attribution, ties by index
    flat = ranked.flatten(1)
    n_units = flat.shape[1]
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n_units, device=device).expand(n, n_units))
    ranks = ranks.view_as(ranked)
    # pixels perturbed after step s: round(s / n_steps * P), half up, in integers
    steps = torch.arange(n_steps + 1, device=device)
    counts = (2 * steps * n_units + n_steps) // (2 * n_steps)
    n_points = n_steps + 1

    evaluator = Evaluator(forward_func, x, target, additional_forward_args)
    dtype = score_dtype(x)
    probabilities = torch.empty(n * n_points, dtype=dtype, device=device)
    with evaluation(forward_func):
        evaluator.original(x)
        for start in range(0, n * n_points, chunk):
            rows = torch.arange(start, min(start + chunk, n * n_points), device=device)
            examples = rows // n_points
            perturbed = ranks[examples] < counts[rows % n_points].view(-1, 1, 1, 1)
            if mode == "deletion":
                images = torch.where(perturbed, base[examples], x[examples])
            else:
                images = torch.where(perturbed, x[examples], base[examples])
            probability, _ = evaluator(images, examples)
            probabilities[rows] = probability.to(device=device, dtype=dtype)
    curves = probabilities.view(n, n_points)
    fractions = counts.to(dtype) / n_units
    auc = torch.trapezoid(curves, fractions, dim=1)
    return PerturbationCurves(auc, curves, fractions)


def _auc_or_deprecated_curves(result: PerturbationCurves, return_curves: Any, mode: str) -> Tensor:
    if check_flag(return_curves, "return_curves"):
        warnings.warn(
            f"{mode}(return_curves=True) is deprecated: call {mode}_curves(...), which always "
            "returns PerturbationCurves; {mode}() always returns the (N,) AUC.".replace(
                "{mode}", mode
            ),
            DeprecationWarning,
            stacklevel=user_stacklevel(),  # the user's line: shown by Python's default filters
        )
        return result  # type: ignore[return-value]
    return result.auc


_PERTURBATION_ARGS = r"""
    Args:
        forward_func (Callable or nn.Module): the model, returning (N, C) logits. It runs
            under ``torch.no_grad`` with every module it runs in eval mode: an
            ``nn.Module`` (or a bound method of one) is put in eval mode before the metric,
            and the modules a plain function calls (``lambda x: model(x)["out"]``) each as
            it first runs (so code in the function that reads ``model.training`` before
            calling it still sees its own flag on the first call). The train/eval flags,
            buffers and gradient flags are restored afterwards. A model whose output
            changes with its mode is therefore called in its eval form: torchvision's
            ``inception_v3(aux_logits=True)`` returns a tuple (``.logits``, ``.aux_logits``)
            in train mode only, so here it returns the logits tensor itself, and a function
            written for its train-mode tuple (``lambda x: model(x).logits``) fails.
        inputs (Tensor): images (N, C, H, W), floating point (a 1-tuple is accepted).
        attributions (Tensor): one explanation per example: (N, C, H, W) like the inputs,
            or one map per example (N, 1, h, w) or (N, h, w) at any resolution (a layer's,
            e.g. 7 x 7 for a 28 x 28 input), upsampled bilinearly
            (``align_corners=False``) to H x W. A resized map is upsampled and ranked in
            float64 (float32 on Apple's MPS), pixels equal in exact arithmetic (a plateau,
            a constant 1 x 1 map) kept exactly equal: they are ties broken by pixel index,
            as for the same map given at H x W, not ordered by float32 rounding. A
            one-channel map is ranked by its values as they are (no absolute value) and
            orders pixels, all channels together.
        target (int, list, Tensor, optional): the class followed, one per example as in
            Captum. Default: None, the class the model predicts on the unperturbed input.
        baselines (float, str or Tensor, optional): what a removed pixel becomes. A number
            (default 0.0); ``"mean"``: the per-channel mean of each image; ``"blur"``: a
            Gaussian blur of each image (``blur_kernel_size``, ``blur_sigma``, replicate
            padding, each channel alone); or a tensor broadcastable to the inputs, e.g. a
            per-channel dataset mean of shape (1, C, 1, 1).
        n_steps (int, optional): number of perturbation steps; the curve has
            ``n_steps + 1`` points (steps 0 .. n_steps). Default: 50.
        batch_size (int, optional): rows (perturbed images) per forward pass. The
            ``N * (n_steps + 1)`` perturbed images are built and evaluated in chunks of this
            many rows, so many steps share one forward pass. Default: None, as many rows as
            fit 32 MiB of perturbed inputs, at most 256. Results do not depend on it.
        channel_reduction (str, optional): for attributions with the input's C > 1
            channels. ``"sum_abs"`` (default): rank pixels by ``sum_c |attr_c|``, one order
            per pixel applied to all channels; ``"per_channel"``: rank every
            (channel, pixel) entry by its own value, so a step perturbs
            ``round(s / n_steps * C * H * W)`` entries and a pixel may be partly perturbed.
            (:func:`~captum_ext.metrics.road`, ``completeness`` and ``soundness`` rank by
            the signed ``sum_c attr_c`` by default; their ``channel_reduction="sum_abs"``
            matches this default.)
        return_curves (bool, optional): deprecated: use :func:`deletion_curves` /
            :func:`insertion_curves`, which always return the curves. ``True`` still
            returns the named tuple, with a ``DeprecationWarning``. Default: False.
        additional_forward_args (Any, optional): passed to ``forward_func`` after the
            images; tensors whose first dimension is N, also inside tuples, lists,
            mappings and dataclasses, are indexed with the perturbed rows' examples,
            everything else is passed unchanged. A tensor shared by all examples whose
            first dimension happens to be N (a ``(C, D)`` class table with ``C == N``) is
            indexed too: refused (ValueError) where a chunk's row count differs from N (the
            classes then change with the rows), but a chunk of exactly N rows keeps the
            shape and is scored silently against the table's re-indexed rows. Bind such a
            table in a closure (``forward_func=lambda x, meta: model(x, meta, table)``).
        blur_kernel_size (int, optional): odd size of the Gaussian kernel for
            ``baselines="blur"``. Default: 11 (as in RISE).
        blur_sigma (float, optional): its standard deviation in pixels. Default: 5.0.

    Returns:
        Tensor: (N,) area under the curve, on the inputs' device (the ``*_curves``
        functions return :class:`PerturbationCurves` ``(auc, curves, fractions)``, with the
        probabilities (N, n_steps + 1) and the fractions (n_steps + 1,) perturbed at each
        step).
"""


def _with_args(function: Callable) -> Callable:
    function.__doc__ = function.__doc__.replace("{perturbation_args}", _PERTURBATION_ARGS.strip())
    return function


@keyword_only_after(3)
@renamed_arguments(max_batch="batch_size")
@_with_args
@log_usage()
def deletion(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    *,
    target: Any = None,
    baselines: float | str | Tensor = 0.0,
    n_steps: int = DEFAULT_N_STEPS,
    batch_size: int | None = None,
    channel_reduction: str = "sum_abs",
    return_curves: bool = False,
    additional_forward_args: Any = None,
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> Tensor:
    r"""Deletion: remove the most important pixels first and watch the class probability fall.

    Pixels are ordered by decreasing attribution (ties broken by pixel index, a stable
    sort). After step s the first ``k_s`` pixels of that order are replaced by the
    baseline, and the model's softmax probability of the target is read. The score is the
    area under probability vs fraction removed. It approximates necessity: **lower is
    better**.

    .. code-block:: text

        P    = H * W pixels   (C * H * W entries with channel_reduction="per_channel")
        k_s  = floor(s * P / n_steps + 1/2)                 s = 0 .. n_steps
        x_s  = x with its k_s top-ranked pixels set to the baseline b
        p_s  = softmax(f(x_s))[target]
        AUC  = trapezoid of p_s over k_s / P                (fractions from 0 to 1)

    All ``N * (n_steps + 1)`` perturbed images are evaluated in chunks of ``batch_size``
    rows, many steps per forward pass, in eval mode under ``torch.no_grad`` (so the scores
    do not depend on the batching): every module that ``forward_func`` runs, also one called
    from a plain function; the modules' flags and buffers are restored afterwards.

    Paper: Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018.

    {perturbation_args}

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits
        >>> from captum_ext.metrics import deletion
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER))
        >>> maps = cam.attribute(images[:8], target=labels[:8])      # 8 x 1 x 7 x 7
        >>> auc = deletion(model, images[:8], maps, target=labels[:8], baselines="blur")
        >>> auc.shape
        torch.Size([8])
    """
    result = _perturbation_curves(
        "deletion",
        forward_func,
        inputs,
        attributions,
        target=target,
        baselines=baselines,
        n_steps=n_steps,
        batch_size=batch_size,
        channel_reduction=channel_reduction,
        additional_forward_args=additional_forward_args,
        blur_kernel_size=blur_kernel_size,
        blur_sigma=blur_sigma,
    )
    return _auc_or_deprecated_curves(result, return_curves, "deletion")


@keyword_only_after(3)
@renamed_arguments(max_batch="batch_size")
@_with_args
@log_usage()
def insertion(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    *,
    target: Any = None,
    baselines: float | str | Tensor = 0.0,
    n_steps: int = DEFAULT_N_STEPS,
    batch_size: int | None = None,
    channel_reduction: str = "sum_abs",
    return_curves: bool = False,
    additional_forward_args: Any = None,
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> Tensor:
    r"""Insertion: start from the baseline image and add the most important pixels first.

    The mirror of :func:`deletion`: after step s the first ``k_s`` pixels of the order
    (decreasing attribution, ties by pixel index) are taken from the input and all others
    from the baseline; the model's softmax probability of the target is read. It
    approximates sufficiency: **higher is better**.

    .. code-block:: text

        P    = H * W pixels   (C * H * W entries with channel_reduction="per_channel")
        k_s  = floor(s * P / n_steps + 1/2)                 s = 0 .. n_steps
        x_s  = baseline b with the k_s top-ranked pixels of x put back
        p_s  = softmax(f(x_s))[target]
        AUC  = trapezoid of p_s over k_s / P                (fractions from 0 to 1)

    Step 0 is the baseline image itself and step ``n_steps`` the input. Evaluation is
    batched and chunked as in :func:`deletion`.

    Paper: Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018.

    {perturbation_args}

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits
        >>> from captum_ext.metrics import insertion, insertion_curves
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER))
        >>> maps = cam.attribute(images[:8], target=labels[:8])
        >>> auc, curves, fractions = insertion_curves(
        ...     model, images[:8], maps, target=labels[:8], baselines="blur", n_steps=28)
        >>> curves.shape, fractions.shape
        (torch.Size([8, 29]), torch.Size([29]))
    """
    result = _perturbation_curves(
        "insertion",
        forward_func,
        inputs,
        attributions,
        target=target,
        baselines=baselines,
        n_steps=n_steps,
        batch_size=batch_size,
        channel_reduction=channel_reduction,
        additional_forward_args=additional_forward_args,
        blur_kernel_size=blur_kernel_size,
        blur_sigma=blur_sigma,
    )
    return _auc_or_deprecated_curves(result, return_curves, "insertion")


_CURVES_DOC = r"""The curves behind :func:`{mode}`, always as :class:`PerturbationCurves`.

    Same arguments and computation as :func:`{mode}` (it has no ``return_curves``).

    Returns:
        PerturbationCurves:
        - **auc** (*Tensor*): (N,) area under each curve (what :func:`{mode}` returns);
        - **curves** (*Tensor*): (N, n_steps + 1) probability of the target after each step;
        - **fractions** (*Tensor*): (n_steps + 1,) fraction perturbed at each step, 0 to 1.

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits
        >>> from captum_ext.metrics import {mode}_curves
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER))
        >>> maps = cam.attribute(images[:8], target=labels[:8])
        >>> auc, curves, fractions = {mode}_curves(
        ...     model, images[:8], maps, target=labels[:8], n_steps=28)
        >>> curves.shape, fractions.shape
        (torch.Size([8, 29]), torch.Size([29]))
"""


def _with_curves_doc(mode: str) -> Callable:
    def decorate(function: Callable) -> Callable:
        function.__doc__ = _CURVES_DOC.replace("{mode}", mode)
        return function

    return decorate


@renamed_arguments(max_batch="batch_size")
@_with_curves_doc("deletion")
@log_usage()
def deletion_curves(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    *,
    target: Any = None,
    baselines: float | str | Tensor = 0.0,
    n_steps: int = DEFAULT_N_STEPS,
    batch_size: int | None = None,
    channel_reduction: str = "sum_abs",
    additional_forward_args: Any = None,
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> PerturbationCurves:
    return _perturbation_curves(
        "deletion",
        forward_func,
        inputs,
        attributions,
        target=target,
        baselines=baselines,
        n_steps=n_steps,
        batch_size=batch_size,
        channel_reduction=channel_reduction,
        additional_forward_args=additional_forward_args,
        blur_kernel_size=blur_kernel_size,
        blur_sigma=blur_sigma,
    )


@renamed_arguments(max_batch="batch_size")
@_with_curves_doc("insertion")
@log_usage()
def insertion_curves(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    *,
    target: Any = None,
    baselines: float | str | Tensor = 0.0,
    n_steps: int = DEFAULT_N_STEPS,
    batch_size: int | None = None,
    channel_reduction: str = "sum_abs",
    additional_forward_args: Any = None,
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> PerturbationCurves:
    return _perturbation_curves(
        "insertion",
        forward_func,
        inputs,
        attributions,
        target=target,
        baselines=baselines,
        n_steps=n_steps,
        batch_size=batch_size,
        channel_reduction=channel_reduction,
        additional_forward_args=additional_forward_args,
        blur_kernel_size=blur_kernel_size,
        blur_sigma=blur_sigma,
    )
