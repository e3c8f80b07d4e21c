"""Shared machinery of the perturbation metrics (deletion / insertion, structure-wise,
masking): argument checks, baselines, the chunked evaluator and eval-mode context, and the
positional-argument deprecation of the captum.metrics-style signatures."""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_ext._utils.batched_grad import run_forward, warn_if_nan
from captum_ext._utils.layers import root_module
from captum_ext._utils.maps import upsample_keeping_ties
from captum_ext._utils.model_state import preserved_state, set_eval_mode
from captum_ext._utils.precision import at_least_float32, precise_dtype
from captum_ext._utils.validation import (
    PerExampleLayout,
    check_int,
    check_not_meta,
    check_number,
    check_several_classes,
    class_selection,
    format_additional_forward_args,
    format_inputs,
)

DEFAULT_N_STEPS = 50
DEFAULT_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_BLUR_KERNEL_SIZE = 11
DEFAULT_BLUR_SIGMA = 5.0
BASELINE_NAMES = ("mean", "blur")
CHANNEL_REDUCTIONS = ("sum_abs", "per_channel")
SCORE_NAMES = ("probability", "correct", "accuracy")
"""Values of the ``score`` argument of the structure-wise and masking metrics."""
# rows per forward pass when batch_size is None: this many bytes of perturbed inputs, capped
_AUTO_CHUNK_BYTES = 32 * 2**20
_AUTO_CHUNK_ROWS = 256


# ---------------------------------------------------------------------------------------------
# argument checks and preparation


def image_batch(
    inputs: Any,
    *,
    purpose: str = "these metrics perturb one batch of images (N, C, H, W)",
    other_inputs: str = "`additional_forward_args`",
) -> Tensor:
    """``inputs`` as one floating-point batch of images ``(N, C, H, W)``, detached.

    A tuple of several tensors is refused with ``purpose`` (what the caller does with the
    images) and ``other_inputs`` (where the model's further inputs go) in the message."""
    formatted = format_inputs(inputs, argument="inputs")
    if len(formatted) != 1:
        raise ValueError(
            f"`inputs` is a tuple of {len(formatted)} tensors; {purpose}. Pass the model's "
            f"other inputs (metadata, masks) as {other_inputs}."
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


def check_choice(value: Any, choices: Sequence[str], argument: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"`{argument}`={value!r}: expected one of {', '.join(map(repr, choices))}."
        )


def maps_for(maps: Any, x: Tensor, argument: str, dtype: torch.dtype | None = None) -> Tensor:
    """(N, K, H, W) float maps at the input's size, K = 1 or C (resized bilinearly when
    needed, equal values kept equal: :func:`upsample_keeping_ties`), in ``dtype`` (default:
    the input's)."""
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
    check_not_meta(a, argument)
    if a.is_floating_point() and not bool(torch.isfinite(a).all()):  # before any cast
        raise ValueError(f"`{argument}` contains NaN or infinite values.")
    a = a.to(device=x.device, dtype=x.dtype if dtype is None else dtype)
    if not bool(torch.isfinite(a).all()):
        raise ValueError(
            f"`{argument}` holds values beyond the range of {a.dtype} (largest magnitude "
            f"{float(maps.detach().abs().max()):.3g}); scale the maps down first."
        )
    if tuple(a.shape[2:]) != (h, w):  # plateaus stay exact ties (ranked by pixel index)
        a = upsample_keeping_ties(a, (h, w))
    return a


def score_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the ranks, probabilities and fractions of perturbation curves on the
    images ``x``: the images' own, at least float32 (a half-precision model is fed its own
    dtype, but its curves are not rounded to it: bfloat16 holds counts exactly only to 256)."""
    return torch.promote_types(x.dtype, torch.float32)


def _ranking_dtype(attributions: Any, x: Tensor) -> torch.dtype:
    """:func:`score_dtype`, or the maps' own float64, or :func:`precise_dtype` (float64 but on
    Apple's MPS, which has none) for maps that must be resized to the images.

    float64 maps whose values differ in the 9th digit, or lie below float32's range, are
    ranked as given, not merged into ties by a cast to the images' float32. A smaller map (a
    CAM's 7 x 7) is upsampled in float64, as ``road`` does: a float32 interpolation
    rounds pixels that are equal in exact arithmetic to values an ulp apart, so their order
    (and deletion's curve) followed rounding, changed with the map's scale (``3.7 * map``) or
    dtype, instead of the documented tie-break by pixel index."""
    given = attributions[0] if isinstance(attributions, tuple) and attributions else attributions
    dtype = score_dtype(x)
    if isinstance(given, Tensor) and given.is_floating_point() and x.device.type != "mps":
        dtype = torch.promote_types(given.dtype, dtype)
    resized = isinstance(given, Tensor) and given.dim() >= 2 and given.shape[-2:] != x.shape[2:]
    if resized:
        dtype = torch.promote_types(dtype, precise_dtype(x.device))
    return dtype


def ranking_scores(attributions: Any, x: Tensor, channel_reduction: str) -> Tensor:
    """The values pixels are ranked by: (N, 1, H, W) or, per channel, (N, C, H, W), in at
    least float32 (:func:`score_dtype`), float64 for float64 maps and for maps resized to the
    images (:func:`_ranking_dtype`): a half-precision batch must not merge the ranks of
    pixels whose attributions differ in the fourth digit, a float32 one those of float64
    maps that differ in the ninth, nor an upsampling split pixels that are equal into
    values an ulp apart."""
    check_choice(channel_reduction, CHANNEL_REDUCTIONS, "channel_reduction")
    a = maps_for(attributions, x, "attributions", dtype=_ranking_dtype(attributions, x))
    if a.shape[1] > 1 and channel_reduction == "sum_abs":
        a = a.abs().sum(dim=1, keepdim=True)
    return a


def gaussian_blur(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, H, W) images, each channel alone, replicate padding.

    The taps ``exp(-(k / sigma)**2 / 2)``, ``k = -kernel_size // 2 .. kernel_size // 2``, are
    formed and normalised in float64 on the CPU, then cast to the images' dtype and device:
    the centre tap is 1 for every ``sigma > 0``, so a tiny ``sigma`` gives the identity kernel
    (its limit), never ``0 / 0``. (``offsets**2 / (2 sigma**2)`` in float32 underflowed
    ``2 sigma**2`` to 0 from ``sigma`` about 1e-23 on: NaN images and a warning that blamed
    the model.)"""
    check_int(kernel_size, "blur_kernel_size")
    if kernel_size % 2 == 0:
        raise ValueError(f"`blur_kernel_size` must be odd, got {kernel_size}.")
    sigma = check_number(sigma, "blur_sigma")
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=torch.float64) - half
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    padded = F.pad(x, (half, half, half, half), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def baseline_images(baselines: Any, x: Tensor, blur_kernel_size: int, blur_sigma: float) -> Tensor:
    """(N, C, H, W) images the perturbed pixels are taken from."""
    if isinstance(baselines, tuple):
        if len(baselines) != 1:
            raise ValueError(
                f"`baselines` is a tuple of {len(baselines)} entries; expected one for the one "
                "input tensor."
            )
        baselines = baselines[0]
    if isinstance(baselines, str):
        check_choice(baselines, BASELINE_NAMES, "baselines")
        if baselines == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        return gaussian_blur(x, blur_kernel_size, blur_sigma)
    if isinstance(baselines, bool):
        raise TypeError("`baselines` must be a number, 'mean', 'blur' or a tensor, not a bool.")
    if isinstance(baselines, numbers.Real):  # numpy numbers too (np.float32(0.0))
        return torch.full_like(x, check_number(baselines, "baselines", minimum=None))
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


def chunk_rows(batch_size: int | None, x: Tensor) -> int:
    """Perturbed rows per forward pass: ``batch_size``, or as many as fit the memory budget."""
    if batch_size is not None:
        return check_int(batch_size, "batch_size")
    per_row = max(x[0].numel() * x.element_size(), 1)
    return max(1, min(_AUTO_CHUNK_ROWS, _AUTO_CHUNK_BYTES // per_row))


def check_logits_like_clean(
    logits: Tensor,
    clean_shape: Sequence[int] | None,
    n: int,
    *,
    per_example_extras: bool = True,
) -> None:
    """Refuse the logits of a chunk of perturbed rows whose shape past the rows differs from
    ``clean_shape``, the shape past the rows of the clean images' logits (``None``: nothing
    to compare with yet).

    The rows of a chunk get the rows of the per-example tensors of
    ``additional_forward_args`` (first dimension the ``n`` examples, nested ones too:
    :func:`~captum_ext._utils.validation.map_per_example`). A tensor shared by all examples
    whose first dimension happens to equal ``n`` (a ``(C, D)`` prototype or class table with
    ``C == n``) is indexed with them, and a model that scores against it returns another
    number of classes for a chunk than for the clean batch: scores of other classes, read
    without an error. Such a chunk is refused here, naming ``additional_forward_args``
    where it holds per-example tensors (``per_example_extras``); without them, the model's
    number of classes depends on the batch it is given (it scores each image against the
    others of its batch, say), which these metrics cannot read either.

    Raises:
        ValueError: ``logits.shape[1:]`` is not ``clean_shape``.
    """
    if clean_shape is None or tuple(logits.shape[1:]) == tuple(clean_shape):
        return
    if not per_example_extras:
        raise ValueError(
            f"forward_func returned logits of shape {tuple(logits.shape)} for "
            f"{logits.shape[0]} perturbed rows, but {tuple(clean_shape)} per example for the "
            f"clean batch of N={n} images: the model's number of classes depends on the batch "
            "it is given. These metrics run the perturbed images in chunks of another size "
            "and need logits with one row per example and a fixed number of classes, the "
            "same whatever the other images of the batch."
        )
    raise ValueError(
        f"forward_func returned logits of shape {tuple(logits.shape)} for {logits.shape[0]} "
        f"perturbed rows, but {tuple(clean_shape)} per example for the clean images: the "
        "classes changed with the rows. Every tensor in `additional_forward_args` whose "
        f"first dimension is the N={n} examples, also inside tuples, lists, dicts and "
        "dataclasses, is read as one row per example and indexed with the perturbed rows; "
        "a table shared by all examples (C class prototypes, C == N) must not be. Bind it "
        "in a closure or a module attribute instead, e.g. "
        "forward_func=lambda x, meta: model(x, meta, table)."
    )


class Evaluator:
    """Runs the model on perturbed rows and reads the target's probability and correctness."""

    def __init__(self, forward_func: Callable, x: Tensor, target: Any, extra: Any) -> None:
        self.forward_func = forward_func
        self.n = x.shape[0]
        self.extra = format_additional_forward_args(extra)
        # the per-example tensors of the extra arguments, also nested ones: found once
        self._extra_layout = PerExampleLayout(self.extra, self.n)
        self._target = target
        self.targets: Tensor | None = None
        # the logits' shape past the rows: the clean pass's, else the first chunk's
        self._logits_shape: tuple[int, ...] | None = None
        self._nan_named = False  # NaN logits are named once per call, by the user's examples

    def _rows_of_extra(self, examples: Tensor) -> tuple:
        """The additional arguments of the rows of ``examples``: their per-example tensors,
        also those nested in tuples, lists, mappings and dataclasses, indexed by
        ``examples``."""
        return self._extra_layout.select(examples)

    def resolve_target(self, logits: Tensor) -> Tensor:
        check_several_classes(
            logits,
            "deletion, insertion and masking_score read the softmax probability of the target",
            takes_output_transform=False,
        )
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
        logits = run_forward(
            self.forward_func, (x,), self.extra, takes_output_transform=False, check_nan=False
        )
        self._nan_named = warn_if_nan(logits, (x,))
        self.resolve_target(logits)
        self._logits_shape = tuple(logits.shape[1:])
        return logits

    def __call__(self, rows: Tensor, examples: Tensor) -> tuple[Tensor, Tensor]:
        """Target probability and 0/1 correctness of each row; ``examples`` gives its example."""
        logits = run_forward(
            self.forward_func,
            (rows,),
            self._rows_of_extra(examples),
            takes_output_transform=False,
            check_nan=False,
        )
        check_logits_like_clean(
            logits,
            self._logits_shape,
            self.n,
            per_example_extras=self._extra_layout.has_per_example_tensors,
        )
        if self._logits_shape is None:
            self._logits_shape = tuple(logits.shape[1:])
        if not self._nan_named:
            self._nan_named = warn_if_nan(logits, (rows,), examples)
        if self.targets is None:
            # masking_score with an explicit target: one row per example, only the class
            # count of the logits is used
            self.resolve_target(logits)
        targets = self.targets.to(logits.device)[examples.to(logits.device)]
        work = at_least_float32(logits)
        probability = work.softmax(dim=1).gather(1, targets[:, None])[:, 0]
        correct = (work.argmax(dim=1) == targets).to(probability.dtype)
        return probability, correct


@contextlib.contextmanager
def evaluation(forward_func: Callable) -> Iterator[None]:
    """no_grad and eval mode for the model behind ``forward_func``; all flags restored after.

    Eval mode keeps dropout off and batch norm on its running statistics (never updated), so
    scores do not depend on how the perturbed images are batched. A model hidden behind a
    plain function (``lambda x: model(x)["out"]``) runs in eval mode too: each of its modules
    as it runs.
    """
    model = root_module(forward_func)
    hidden = model is None
    with preserved_state([model], hidden_model=hidden, hidden_eval=hidden), torch.no_grad():
        if model is not None:
            set_eval_mode(model)
        yield


def check_score(score: Any) -> None:
    check_choice(score, SCORE_NAMES, "score")


def keyword_only_after(n_positional: int) -> Callable:
    """Accept, for one release, arguments given positionally past the first ``n_positional``.

    The metric functions take ``(forward_func, inputs, attributions, *, ...)`` as in
    :mod:`captum.metrics`; the old signatures took ``target``, ``baselines``, ... by position.
    Extra positional arguments are mapped to the names they had, in order, with a
    ``DeprecationWarning``. Put it outside :func:`renamed_arguments` (old keyword names).
    """

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)
        names = [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > n_positional:
                extra = args[n_positional:]
                if len(extra) > len(names):
                    raise TypeError(
                        f"{function.__name__}() takes {n_positional} positional arguments but "
                        f"{len(args)} were given."
                    )
                moved = names[: len(extra)]
                warnings.warn(
                    f"{function.__name__}(): pass {', '.join(f'`{m}`' for m in moved)} by "
                    f"keyword; only the first {n_positional} arguments are positional (as in "
                    "captum.metrics), and positional use will be removed in a future release.",
                    DeprecationWarning,
                    stacklevel=2,
                )
                for name, value in zip(moved, extra):
                    if name in kwargs:
                        raise TypeError(
                            f"{function.__name__}() got multiple values for argument `{name}`."
                        )
                    kwargs[name] = value
                args = args[:n_positional]
            return function(*args, **kwargs)

        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        return wrapper

    return decorate
