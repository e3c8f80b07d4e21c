r"""Evaluating explanations by intervening on the input with them.

Pixel-wise deletion and insertion (RISE), their structure-wise form with a lossless code
(CausalCAM), heatmap masking, and the two scalar read-outs of VOICE (IoU of explanation and
uncertainty, SNR of the uncertainty). All functions take a batch and return one value per
example, on the device of the inputs, in the style of :mod:`captum.metrics`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from captum.log import log_usage
from torch import Tensor

from captum_ext._utils.batched_grad import run_forward
from captum_ext._utils.layers import root_module
from captum_ext._utils.maps import minmax_normalize, upsample_maps
from captum_ext._utils.model_state import preserved_state
from captum_ext._utils.validation import (
    class_selection,
    format_additional_forward_args,
    format_inputs,
)
from captum_ext.metrics._huffman import huffman_bits_of_images

__all__ = [
    "PerturbationCurves",
    "StructureCurves",
    "deletion",
    "insertion",
    "masking_score",
    "structure_deletion",
    "structure_insertion",
    "voice_iou",
    "voice_snr",
]

DEFAULT_N_STEPS = 50
DEFAULT_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_BLUR_KERNEL_SIZE = 11
DEFAULT_BLUR_SIGMA = 5.0
BASELINE_NAMES = ("mean", "blur")
CHANNEL_REDUCTIONS = ("sum_abs", "per_channel")
SCORES = ("probability", "correct", "accuracy")
# rows per forward pass when max_batch is None: this many bytes of perturbed inputs, capped
_AUTO_CHUNK_BYTES = 32 * 2**20
_AUTO_CHUNK_ROWS = 256


class PerturbationCurves(NamedTuple):
    """What :func:`deletion` and :func:`insertion` return with ``return_curves=True``."""

    auc: Tensor
    """(N,) area under each curve."""
    curves: Tensor
    """(N, n_steps + 1) probability of the target after each step (step 0 first)."""
    fractions: Tensor
    """(n_steps + 1,) fraction of the pixels perturbed at each step, from 0 to 1."""


class StructureCurves(NamedTuple):
    """What :func:`structure_deletion` and :func:`structure_insertion` return."""

    area: Tensor
    """(N,) trapezoid area of score over ratio, points sorted by ratio."""
    ratios: Tensor
    """(N, T) bits(masked) / bits(original) at each threshold, in the order of thresholds."""
    scores: Tensor
    """(N, T) probability (or correctness) of the target at each threshold."""


# ---------------------------------------------------------------------------------------------
# argument checks and preparation


def _image_batch(inputs: Any) -> Tensor:
    formatted = format_inputs(inputs, argument="inputs")
    if len(formatted) != 1:
        raise ValueError(
            f"`inputs` is a tuple of {len(formatted)} tensors; these metrics perturb one batch "
            "of images (N, C, H, W)."
        )
    x = formatted[0]
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"`inputs` must be a floating point batch of images (N, C, H, W), got shape "
            f"{tuple(x.shape)} and dtype {x.dtype}."
        )
    if x.shape[0] == 0:
        raise ValueError("`inputs` holds no examples (N = 0).")
    return x.detach()


def _check_choice(value: Any, choices: Sequence[str], argument: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"`{argument}`={value!r}: expected one of {', '.join(map(repr, choices))}."
        )


def _check_positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}.")
    return value


def _maps_for(maps: Any, x: Tensor, argument: str) -> Tensor:
    """(N, K, H, W) float maps at the input's size, K = 1 or C (upsampled when needed)."""
    if isinstance(maps, tuple):
        if len(maps) != 1:
            raise ValueError(
                f"`{argument}` is a tuple of {len(maps)} tensors; expected one tensor for the "
                "one input tensor."
            )
        maps = maps[0]
    if not isinstance(maps, Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(maps).__name__}.")
    n, c, h, w = x.shape
    a = maps.detach()
    if a.dim() == 3:
        a = a.unsqueeze(1)
    if a.dim() != 4:
        raise ValueError(
            f"`{argument}` has shape {tuple(maps.shape)}; expected (N, 1, h, w), (N, h, w) "
            "or (N, C, h, w) with the input's C channels."
        )
    if a.shape[0] != n:
        raise ValueError(
            f"`{argument}` has {a.shape[0]} examples but `inputs` has {n}; give one map per "
            "example."
        )
    if a.shape[1] not in (1, c):
        raise ValueError(
            f"`{argument}` has {a.shape[1]} channels; expected 1 or {c} (the input's)."
        )
    if a.is_complex():
        raise TypeError(f"`{argument}` must be real, got {a.dtype}.")
    a = a.to(device=x.device, dtype=x.dtype)
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"`{argument}` contains NaN or infinite values.")
    if tuple(a.shape[2:]) != (h, w):
        a = upsample_maps(a, (h, w))
    return a


def _ranking_scores(attributions: Any, x: Tensor, channel_reduction: str) -> Tensor:
    """The values pixels are ranked by: (N, 1, H, W) or, per channel, (N, C, H, W)."""
    _check_choice(channel_reduction, CHANNEL_REDUCTIONS, "channel_reduction")
    a = _maps_for(attributions, x, "attributions")
    if a.shape[1] > 1 and channel_reduction == "sum_abs":
        a = a.abs().sum(dim=1, keepdim=True)
    return a


def _gaussian_blur(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, H, W) images, each channel alone, replicate padding."""
    _check_positive_int(kernel_size, "blur_kernel_size")
    if kernel_size % 2 == 0:
        raise ValueError(f"`blur_kernel_size` must be odd, got {kernel_size}.")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma > 0:
        raise ValueError(f"`blur_sigma` must be a positive number, got {sigma!r}.")
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - half
    kernel = torch.exp(-(offsets**2) / (2.0 * float(sigma) ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    padded = F.pad(x, (half, half, half, half), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def _baseline_images(baselines: Any, x: Tensor, blur_kernel_size: int, blur_sigma: float) -> Tensor:
    """(N, C, H, W) images the perturbed pixels are taken from."""
    if isinstance(baselines, tuple):
        if len(baselines) != 1:
            raise ValueError(
                f"`baselines` is a tuple of {len(baselines)} entries; expected one for the one "
                "input tensor."
            )
        baselines = baselines[0]
    if isinstance(baselines, str):
        _check_choice(baselines, BASELINE_NAMES, "baselines")
        if baselines == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        return _gaussian_blur(x, blur_kernel_size, blur_sigma)
    if isinstance(baselines, bool):
        raise TypeError("`baselines` must be a number, 'mean', 'blur' or a tensor, not a bool.")
    if isinstance(baselines, (int, float)):
        return torch.full_like(x, float(baselines))
    if isinstance(baselines, Tensor):
        b = baselines.detach().to(device=x.device, dtype=x.dtype)
        try:
            b = torch.broadcast_to(b, x.shape)
        except RuntimeError:
            raise ValueError(
                f"`baselines` has shape {tuple(baselines.shape)}, which does not broadcast to "
                f"the inputs' shape {tuple(x.shape)}."
            ) from None
        if not bool(torch.isfinite(b).all()):
            raise ValueError("`baselines` contains NaN or infinite values.")
        return b
    raise TypeError(
        "`baselines` must be a number, 'mean', 'blur' or a tensor broadcastable to the inputs, "
        f"got {type(baselines).__name__}."
    )


def _chunk_rows(max_batch: int | None, x: Tensor) -> int:
    if max_batch is not None:
        return _check_positive_int(max_batch, "max_batch")
    per_row = max(x[0].numel() * x.element_size(), 1)
    return max(1, min(_AUTO_CHUNK_ROWS, _AUTO_CHUNK_BYTES // per_row))


class _Evaluator:
    """Runs the model on perturbed rows and reads the target's probability and correctness."""

    def __init__(self, forward_func: Callable, x: Tensor, target: Any, extra: Any) -> None:
        self.forward_func = forward_func
        self.n = x.shape[0]
        self.extra = format_additional_forward_args(extra)
        self._target = target
        self.targets: Tensor | None = None

    def _rows_of_extra(self, examples: Tensor) -> tuple:
        rows = []
        for arg in self.extra:
            if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == self.n:
                arg = arg[examples.to(arg.device)]
            rows.append(arg)
        return tuple(rows)

    def resolve_target(self, logits: Tensor) -> Tensor:
        classes, multi = class_selection(
            self._target, logits, argument="target", default="predicted"
        )
        if multi or classes.shape[1] != 1:
            raise ValueError(
                "`target` must give one class per example (an int, a list or a 1-D tensor); "
                "these metrics follow one class along the perturbations."
            )
        self.targets = classes[:, 0]
        return self.targets

    def original(self, x: Tensor) -> Tensor:
        logits = run_forward(self.forward_func, (x,), self.extra)
        self.resolve_target(logits)
        return logits

    def __call__(self, rows: Tensor, examples: Tensor) -> tuple[Tensor, Tensor]:
        """Target probability and 0/1 correctness of each row; ``examples`` gives its example."""
        logits = run_forward(self.forward_func, (rows,), self._rows_of_extra(examples))
        if self.targets is None:
            # masking_score with an explicit target: one row per example, only the class
            # count of the logits is used
            self.resolve_target(logits)
        targets = self.targets.to(logits.device)[examples.to(logits.device)]
        work = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        probability = work.softmax(dim=1).gather(1, targets[:, None])[:, 0]
        correct = (work.argmax(dim=1) == targets).to(probability.dtype)
        return probability, correct


@contextlib.contextmanager
def _evaluation(forward_func: Callable) -> Iterator[None]:
    """no_grad and eval mode for the model behind ``forward_func``; all flags restored after.

    Eval mode keeps dropout off and batch norm on its running statistics (never updated), so
    scores do not depend on how the perturbed images are batched.
    """
    model = root_module(forward_func)
    with preserved_state([model]), torch.no_grad():
        if model is not None:
            model.eval()
        yield


def _check_score(score: Any) -> None:
    _check_choice(score, SCORES, "score")


# ---------------------------------------------------------------------------------------------
# pixel-wise deletion / insertion


def _perturbation_curves(
    mode: str,
    forward_func: Callable,
    inputs: Any,
    attributions: Any,
    target: Any,
    baselines: Any,
    n_steps: int,
    max_batch: int | None,
    channel_reduction: str,
    return_curves: bool,
    additional_forward_args: Any,
    blur_kernel_size: int,
    blur_sigma: float,
) -> Tensor | PerturbationCurves:
    x = _image_batch(inputs)
    n_steps = _check_positive_int(n_steps, "n_steps")
    chunk = _chunk_rows(max_batch, x)
    ranked = _ranking_scores(attributions, x, channel_reduction)
    base = _baseline_images(baselines, x, blur_kernel_size, blur_sigma)
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

    evaluator = _Evaluator(forward_func, x, target, additional_forward_args)
    probabilities = torch.empty(n * n_points, dtype=x.dtype, device=device)
    with _evaluation(forward_func):
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
            probabilities[rows] = probability.to(device=device, dtype=x.dtype)
    curves = probabilities.view(n, n_points)
    fractions = counts.to(x.dtype) / n_units
    auc = torch.trapezoid(curves, fractions, dim=1)
    if return_curves:
        return PerturbationCurves(auc, curves, fractions)
    return auc


_PERTURBATION_ARGS = r"""
    Args:
        forward_func (Callable or nn.Module): the model, returning (N, C) logits. It runs
            under ``torch.no_grad`` and, when it is an ``nn.Module`` (or a bound method of
            one), in eval mode; its train/eval and gradient flags are restored afterwards.
        inputs (Tensor): images (N, C, H, W), floating point (a 1-tuple is accepted).
        attributions (Tensor): one explanation per example: (N, C, H, W) like the inputs,
            or one map per example (N, 1, h, w) or (N, h, w) at any resolution (a layer's,
            e.g. 7 x 7 for a 28 x 28 input), upsampled bilinearly
            (``align_corners=False``) to H x W. A one-channel map is ranked by its values
            as they are (no absolute value) and orders pixels, all channels together.
        target (int, list, Tensor, optional): the class followed, one per example as in
            Captum. Default: None, the class the model predicts on the unperturbed input.
        baselines (float, str or Tensor, optional): what a removed pixel becomes. A number
            (default 0.0); ``"mean"``: the per-channel mean of each image; ``"blur"``: a
            Gaussian blur of each image (``blur_kernel_size``, ``blur_sigma``, replicate
            padding, each channel alone); or a tensor broadcastable to the inputs, e.g. a
            per-channel dataset mean of shape (1, C, 1, 1).
        n_steps (int, optional): number of perturbation steps; the curve has
            ``n_steps + 1`` points (steps 0 .. n_steps). Default: 50.
        max_batch (int, optional): rows (perturbed images) per forward pass. The
            ``N * (n_steps + 1)`` perturbed images are built and evaluated in chunks of this
            many rows, so many steps share one forward pass. Default: None, as many rows as
            fit 32 MiB of perturbed inputs, at most 256. Results do not depend on it.
        channel_reduction (str, optional): for attributions with the input's C > 1
            channels. ``"sum_abs"`` (default): rank pixels by ``sum_c |attr_c|``, one order
            per pixel applied to all channels; ``"per_channel"``: rank every
            (channel, pixel) entry by its own value, so a step perturbs
            ``round(s / n_steps * C * H * W)`` entries and a pixel may be partly perturbed.
        return_curves (bool, optional): also return the curves and their x-axis.
            Default: False.
        additional_forward_args (Any, optional): passed to ``forward_func`` after the
            images; tensors whose first dimension is N are indexed with the perturbed rows'
            examples, everything else is passed unchanged.
        blur_kernel_size (int, optional): odd size of the Gaussian kernel for
            ``baselines="blur"``. Default: 11 (as in RISE).
        blur_sigma (float, optional): its standard deviation in pixels. Default: 5.0.

    Returns:
        Tensor or PerturbationCurves:
        - **auc** (*Tensor*): (N,) area under the curve, on the inputs' device;
        - with ``return_curves=True``, the named tuple ``(auc, curves, fractions)`` with
          the probabilities (N, n_steps + 1) and the fractions (n_steps + 1,) perturbed at
          each step.
"""


def _with_args(function: Callable) -> Callable:
    function.__doc__ = function.__doc__.replace("{perturbation_args}", _PERTURBATION_ARGS.strip())
    return function


@_with_args
@log_usage()
def deletion(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    target: Any = None,
    baselines: float | str | Tensor = 0.0,
    n_steps: int = DEFAULT_N_STEPS,
    max_batch: int | None = None,
    channel_reduction: str = "sum_abs",
    return_curves: bool = False,
    additional_forward_args: Any = None,
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> Tensor | PerturbationCurves:
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

    All ``N * (n_steps + 1)`` perturbed images are evaluated in chunks of ``max_batch``
    rows, many steps per forward pass, in eval mode under ``torch.no_grad`` (so the scores
    do not depend on the batching); the model's flags are restored afterwards.

    Paper: Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018.

    {perturbation_args}

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_bundled_model, load_sample_digits
        >>> from captum_ext.metrics import deletion
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER))
        >>> maps = cam.attribute(images[:8], target=labels[:8])      # 8 x 1 x 7 x 7
        >>> auc = deletion(model, images[:8], maps, target=labels[:8], baselines="blur")
        >>> auc.shape
        torch.Size([8])
    """
    return _perturbation_curves(
        "deletion",
        forward_func,
        inputs,
        attributions,
        target,
        baselines,
        n_steps,
        max_batch,
        channel_reduction,
        return_curves,
        additional_forward_args,
        blur_kernel_size,
        blur_sigma,
    )


@_with_args
@log_usage()
def insertion(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    target: Any = None,
    baselines: float | str | Tensor = 0.0,
    n_steps: int = DEFAULT_N_STEPS,
    max_batch: int | None = None,
    channel_reduction: str = "sum_abs",
    return_curves: bool = False,
    additional_forward_args: Any = None,
    blur_kernel_size: int = DEFAULT_BLUR_KERNEL_SIZE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> Tensor | PerturbationCurves:
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
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_bundled_model, load_sample_digits
        >>> from captum_ext.metrics import insertion
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER))
        >>> maps = cam.attribute(images[:8], target=labels[:8])
        >>> auc, curves, fractions = insertion(
        ...     model, images[:8], maps, target=labels[:8], baselines="blur", n_steps=28,
        ...     return_curves=True)
        >>> curves.shape, fractions.shape
        (torch.Size([8, 29]), torch.Size([29]))
    """
    return _perturbation_curves(
        "insertion",
        forward_func,
        inputs,
        attributions,
        target,
        baselines,
        n_steps,
        max_batch,
        channel_reduction,
        return_curves,
        additional_forward_args,
        blur_kernel_size,
        blur_sigma,
    )


# ---------------------------------------------------------------------------------------------
# structure-wise deletion / insertion


def _default_uint8(x: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    low = x.amin(dim=(1, 2, 3))
    span = x.amax(dim=(1, 2, 3)) - low
    scale = torch.where(span > 0, 255.0 / torch.where(span > 0, span, 1.0), 0.0)

    def to_uint8(images: Tensor, examples: Tensor) -> Tensor:
        view = (-1, 1, 1, 1)
        return (images - low[examples].view(view)) * scale[examples].view(view)

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
        values = torch.as_tensor(thresholds, dtype=x.dtype, device=x.device)
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
    target: Any,
    baselines: Any,
    thresholds: Any,
    score: str,
    to_uint8: Callable | None,
    channel_reduction: str,
    max_batch: int | None,
    additional_forward_args: Any,
    blur_kernel_size: int,
    blur_sigma: float,
) -> StructureCurves:
    x = _image_batch(inputs)
    _check_score(score)
    if to_uint8 is not None and not callable(to_uint8):
        raise TypeError(f"`to_uint8` must be callable or None, got {type(to_uint8).__name__}.")
    levels = _check_thresholds(thresholds, x)
    chunk = _chunk_rows(max_batch, x)
    normalised = minmax_normalize(_ranking_scores(attributions, x, channel_reduction), 1)
    base = _baseline_images(baselines, x, blur_kernel_size, blur_sigma)
    n = x.shape[0]
    n_levels = levels.numel()
    device = x.device
    default_uint8 = _default_uint8(x)
    every = torch.arange(n, device=device)
    original_bits = huffman_bits_of_images(_quantised(to_uint8, default_uint8, x, every))

    evaluator = _Evaluator(forward_func, x, target, additional_forward_args)
    values = torch.empty(n * n_levels, dtype=x.dtype, device=device)
    bits = torch.empty(n * n_levels, dtype=torch.long, device=device)
    with _evaluation(forward_func):
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
            values[rows] = value.to(device=device, dtype=x.dtype)
            bits[rows] = huffman_bits_of_images(
                _quantised(to_uint8, default_uint8, images, examples)
            )
    scores = values.view(n, n_levels)
    ratios = bits.view(n, n_levels).to(x.dtype) / original_bits.to(x.dtype)[:, None]
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
            (N, h, w), upsampled bilinearly to H x W when smaller or larger.
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
        max_batch (int, optional): masked images per forward pass. Default: None, as many
            as fit 32 MiB of inputs, at most 256. Results do not depend on it.
        additional_forward_args (Any, optional): passed to ``forward_func`` after the
            images; tensors whose first dimension is N follow the masked rows' examples.
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


@_with_structure_args
@log_usage()
def structure_deletion(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    target: Any = None,
    baselines: float | str | Tensor = 0.0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    score: str = "probability",
    to_uint8: Callable[[Tensor], Tensor] | None = None,
    channel_reduction: str = "sum_abs",
    max_batch: int | None = None,
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
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_bundled_model, load_sample_digits
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
        target,
        baselines,
        thresholds,
        score,
        to_uint8,
        channel_reduction,
        max_batch,
        additional_forward_args,
        blur_kernel_size,
        blur_sigma,
    )


@_with_structure_args
@log_usage()
def structure_insertion(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    attributions: Tensor | tuple[Tensor],
    target: Any = None,
    baselines: float | str | Tensor = 0.0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    score: str = "probability",
    to_uint8: Callable[[Tensor], Tensor] | None = None,
    channel_reduction: str = "sum_abs",
    max_batch: int | None = None,
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
        >>> from captum_ext.data import (
        ...     BUNDLED_CAM_LAYER, denormalize_digits, load_bundled_model, load_sample_digits)
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
        target,
        baselines,
        thresholds,
        score,
        to_uint8,
        channel_reduction,
        max_batch,
        additional_forward_args,
        blur_kernel_size,
        blur_sigma,
    )


# ---------------------------------------------------------------------------------------------
# heatmap masking


@log_usage()
def masking_score(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor],
    heatmaps: Tensor | tuple[Tensor],
    target: Any = None,
    score: str = "probability",
    additional_forward_args: Any = None,
) -> Tensor:
    r"""Score of the target on the input multiplied by the heatmap.

    .. code-block:: text

        S_x   = x * heatmap                 (heatmap in [0, 1] at input size, all channels)
        score = softmax(f(S_x))[target]     ("probability")
              | 1[argmax f(S_x) == target]  ("correct", alias "accuracy")

    With the default target (the class predicted on ``x``), ``"correct"`` says whether the
    original prediction survives the masking. The score favours large explanations (a
    heatmap of ones scores like the input itself); read it beside deletion / insertion.

    Paper: AlRegib & Prabhushankar, "Inferential Machine Learning", WACV 2025 tutorial;
    the same quantity as pytorch-grad-cam's ``CamMultImageConfidenceChange`` without the
    difference to the unmasked score.

    Args:
        forward_func (Callable or nn.Module): the model, returning (N, C) logits. It runs
            under ``torch.no_grad`` and, when it is an ``nn.Module`` (or a bound method of
            one), in eval mode; its train/eval and gradient flags are restored afterwards.
        inputs (Tensor): images (N, C, H, W), floating point (a 1-tuple is accepted).
        heatmaps (Tensor): values in [0, 1], (N, 1, h, w) or (N, h, w) (upsampled
            bilinearly to H x W and applied to every channel) or (N, C, H, W).
        target (int, list, Tensor, optional): the class scored, one per example.
            Default: None, the class predicted on the unmasked input.
        score (str, optional): ``"probability"`` (default) or ``"correct"``.
        additional_forward_args (Any, optional): passed to ``forward_func`` after the
            images.

    Returns:
        Tensor: (N,) one score per example, on the inputs' device.

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_bundled_model, load_sample_digits
        >>> from captum_ext.metrics import masking_score
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER))
        >>> maps = cam.attribute(images[:8], target=labels[:8], relu_attributions=True)
        >>> heat = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        >>> masking_score(model, images[:8], heat).shape
        torch.Size([8])
    """
    x = _image_batch(inputs)
    _check_score(score)
    heat = _maps_for(heatmaps, x, "heatmaps")
    if bool((heat < 0).any()) or bool((heat > 1).any()):
        raise ValueError(
            f"`heatmaps` must lie in [0, 1], got values in [{float(heat.min()):.4g}, "
            f"{float(heat.max()):.4g}]; min-max normalise them first."
        )
    n = x.shape[0]
    evaluator = _Evaluator(forward_func, x, target, additional_forward_args)
    with _evaluation(forward_func):
        if target is None:
            evaluator.original(x)
        probability, correct = evaluator(x * heat, torch.arange(n, device=x.device))
    value = probability if score == "probability" else correct
    return value.to(device=x.device)


# ---------------------------------------------------------------------------------------------
# VOICE read-outs


def _voice_maps(maps: Any, argument: str) -> Tensor:
    if not isinstance(maps, Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(maps).__name__}.")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ValueError(
            f"`{argument}` has shape {tuple(maps.shape)}; expected (N, 1, H, W) or (N, H, W)."
        )
    if maps.is_complex() or maps.dtype == torch.bool:
        raise TypeError(f"`{argument}` must hold real values, got {maps.dtype}.")
    if not maps.is_floating_point():
        maps = maps.to(torch.get_default_dtype())
    maps = maps.detach()
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"`{argument}` contains NaN or infinite values.")
    return maps


def voice_iou(
    explanation: Tensor,
    uncertainty: Tensor,
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
        explanation (Tensor): (N, 1, H, W) or (N, H, W) maps.
        uncertainty (Tensor): uncertainty maps of the same shape.
        threshold (float, optional): mask level after min-max normalisation. Default: 0.1.
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
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise TypeError(f"`threshold` must be a number, got {type(threshold).__name__}.")
    if threshold != threshold or threshold in (float("inf"), float("-inf")):
        raise ValueError(f"`threshold` must be a finite number, got {threshold!r}.")
    if not isinstance(smoothing, (int, float)) or isinstance(smoothing, bool) or smoothing <= 0:
        raise ValueError(f"`smoothing` must be a positive number, got {smoothing!r}.")
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
        uncertainty (Tensor): (N, 1, H, W) or (N, H, W) maps.

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
