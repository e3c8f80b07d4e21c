r"""Sanity checks for attribution methods (Adebayo et al., NeurIPS 2018) and class sensitivity.

A map that does not change when the model's weights are destroyed cannot be explaining the model.
:func:`~captum_ext.metrics.model_randomisation` re-initialises the model's layers one by one, from
the output down (``cascade=True``, the cumulative protocol) or each alone (``cascade=False``,
independent), recomputes the maps on the randomised copy, and measures how similar they stay to the
original maps:

- Spearman rank correlation of :math:`|a|` (and of :math:`a`),
- SSIM (structural similarity, Wang et al. 2004, Gaussian window 11 x 11 with sigma 1.5 on maps
  scaled to [0, 1]),
- Pearson correlation of HOG features (needs scikit-image; skipped without it).

A method that passes falls towards 0 as more layers are randomised; Guided Backprop is the
known failure (its maps stay close to an edge detector of the input).

:func:`~captum_ext.metrics.class_sensitivity` asks the same of the explained class: maps for the
predicted class and for another class of the same input should differ (Khakzar et al., "Rethinking
positive aggregation and propagation of gradients", 2020; "Do explanations explain? Model knows
best", CVPR 2022). Both classes are explained in one call of the method, on the inputs stacked
twice.

The user's model is never changed: randomisation acts on a deep copy.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import NoiseTunnel
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from captum_ext._utils.batched_grad import call_model, in_model_precision
from captum_ext._utils.caller import user_stacklevel
from captum_ext._utils.layers import eager_name, execution_ranks, is_exported, uncompiled
from captum_ext._utils.legacy_norms import copied_model, resynchronise_legacy_norms
from captum_ext._utils.maps import upsample_keeping_ties
from captum_ext._utils.model_state import (
    leaves_inference_mode,
    preserved_state,
    set_eval_mode,
)
from captum_ext._utils.precision import at_least_float32, float64_here_or_cpu, precise_dtype
from captum_ext._utils.seeding import initialised_cuda_devices, seed_generators, seeded_rng
from captum_ext._utils.summaries import compact_repr, names_summary
from captum_ext._utils.validation import (
    check_flag,
    check_int,
    check_number,
    class_selection,
    format_additional_forward_args,
    map_per_example,
    runner_up_classes,
)
from captum_ext.metrics._perturbation import image_batch

__all__ = [
    "ClassSensitivity",
    "RandomisationCurves",
    "class_sensitivity",
    "model_randomisation",
    "spearman_similarity",
    "ssim_similarity",
]

SIMILARITIES = ("spearman_abs", "spearman", "ssim", "hog")


class RandomisationCurves(NamedTuple):
    """What :func:`model_randomisation` returns."""

    layers: list[str]
    """Names of the layers randomised, top (output) first (by default in the reverse of the
    order they run in a forward pass; see ``layers`` of :func:`model_randomisation`); step
    ``i`` randomised ``layers[: i + 1]`` (cascade) or only ``layers[i]`` (independent)."""
    similarity: dict[str, Tensor]
    """Per measure, ``(len(layers), N)``: similarity of each example's randomised map to its
    original map at each step."""
    original: Tensor
    """``(N, 1, H, W)`` the maps of the trained model (channels summed)."""
    randomised: Tensor
    """``(len(layers), N, 1, H, W)`` the maps after each step."""

    def __repr__(self) -> str:
        # the shapes and dtypes, not the values: the maps of a few images printed in full
        # are hundreds of lines
        return compact_repr(self, layers=names_summary(self.layers, "layer"))


class ClassSensitivity(NamedTuple):
    """What :func:`class_sensitivity` returns."""

    similarity: dict[str, Tensor]
    """Per measure, ``(N,)`` similarity of the two classes' maps (1 = identical: the method is
    blind to the class)."""
    target: Tensor
    """``(N,)`` the first class explained."""
    contrast: Tensor
    """``(N,)`` the second class explained."""
    target_maps: Tensor
    """``(N, 1, H, W)``."""
    contrast_maps: Tensor
    """``(N, 1, H, W)``."""

    def __repr__(self) -> str:
        # the shapes and dtypes, not the values (two batches of maps printed in full)
        return compact_repr(self)


def _ranks(values: Tensor) -> Tensor:
    """Average ranks along dim 1 (ties share the mean of their ranks)."""
    n = values.shape[1]
    order = values.argsort(dim=1, stable=True)
    sorted_values = values.gather(1, order)
    ranks = torch.empty_like(values)
    positions = torch.arange(n, dtype=values.dtype, device=values.device).expand_as(values)
    # average the positions of equal values: first and last index of each run
    new_run = torch.ones_like(sorted_values, dtype=torch.bool)
    new_run[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    run_id = new_run.cumsum(dim=1) - 1
    run_sum = torch.zeros_like(values).scatter_add_(1, run_id, positions)
    run_len = torch.zeros_like(values).scatter_add_(1, run_id, torch.ones_like(values))
    mean_position = (run_sum / run_len.clamp_min(1)).gather(1, run_id)
    ranks.scatter_(1, order, mean_position)
    return ranks


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise correlation; two constant rows correlate 1 (they are equal up to an offset:
    identical, all-tied rankings), a constant row with a varying one 0."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    varies_a, varies_b = a.norm(dim=1) > 0, b.norm(dim=1) > 0
    denominator = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    correlation = torch.where(varies_a & varies_b, (a * b).sum(dim=1) / denominator, 0.0)
    return torch.where(~varies_a & ~varies_b, 1.0, correlation)


def spearman_similarity(maps_a: Tensor, maps_b: Tensor, *, absolute: bool = True) -> Tensor:
    """Spearman rank correlation of two batches of maps, ``(N,)`` float64 (ties: mean ranks).
    Two constant maps (e.g. the all-zero maps of a dead layer) correlate 1: their rankings
    are identical, so a sanity check reads them as the same map; a constant map and a
    varying one correlate 0.

    Args:
        maps_a (Tensor): ``(N, 1, H, W)`` or ``(N, H, W)`` maps (as :func:`ssim_similarity`
            takes them; a single ``(H, W)`` map is refused, not read as ``H`` rows).
        maps_b (Tensor): maps of the same shape.
        absolute (bool, optional): rank the absolute values (the sign of a map ignored).
            Default: True.
    """
    _check_single_channel_pair(maps_a, maps_b)
    absolute = check_flag(absolute, "absolute")
    return rank_correlation(maps_a.flatten(1), maps_b.flatten(1), absolute=absolute)


def rank_correlation(rows_a: Tensor, rows_b: Tensor, *, absolute: bool = False) -> Tensor:
    """Spearman correlation of each row of ``(N, D)`` ``rows_a`` with the same row of
    ``rows_b``, ``(N,)`` float64 (ties: mean ranks; two constant rows correlate 1, a
    constant and a varying one 0): :func:`spearman_similarity` without its check that the
    rows are maps."""
    a, b = float64_here_or_cpu(rows_a), float64_here_or_cpu(rows_b)
    if absolute:
        a, b = a.abs(), b.abs()
    return _pearson(_ranks(a), _ranks(b))


def _unit_range(maps: Tensor, source_dtype: torch.dtype | None = None) -> Tensor:
    """Each map of float ``(N, ...)`` ``maps`` scaled to [0, 1]; a constant map gives zeros.

    "Constant" allows for rounding, as :func:`~captum_ext._utils.maps.minmax_normalize`
    does: a span of at most ``8 eps max|m|``, with ``eps`` that of ``source_dtype`` (the
    dtype the maps came in before they were widened to float64; default ``maps.dtype``;
    integers: exact), is what bilinear resizing of a constant map leaves, and stretching
    it to [0, 1] drew a pattern that is not in the map (SSIM 0.4 to 0.6 between two
    constant maps instead of 1)."""
    source_dtype = maps.dtype if source_dtype is None else source_dtype
    eps = torch.finfo(source_dtype).eps if source_dtype.is_floating_point else 0.0
    flat = maps.flatten(1)
    magnitude = flat.abs().amax(dim=1, keepdim=True)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    if not bool(torch.isfinite(span).all()):
        # finite maps spanning more than the dtype's range: max - min overflowed; the
        # scaled map is scale-free, so divide by max |m| first
        flat = flat / torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
        magnitude = flat.abs().amax(dim=1, keepdim=True)
        low = flat.amin(dim=1, keepdim=True)
        span = flat.amax(dim=1, keepdim=True) - low
    varies = span > 8 * eps * magnitude
    safe = torch.where(varies, span, torch.ones_like(span))
    return torch.where(varies, (flat - low) / safe, torch.zeros_like(flat)).view_as(maps)


def ssim_similarity(
    maps_a: Tensor, maps_b: Tensor, *, window: int = 11, sigma: float = 1.5
) -> Tensor:
    r"""Mean SSIM of two batches of ``(N, 1, H, W)`` maps, each scaled to [0, 1], ``(N,)``.

    .. math::  \mathrm{SSIM} = \frac{(2\mu_a\mu_b + C_1)(2\sigma_{ab} + C_2)}
               {(\mu_a^2 + \mu_b^2 + C_1)(\sigma_a^2 + \sigma_b^2 + C_2)},

    with Gaussian-weighted local statistics, :math:`C_1 = 0.01^2`, :math:`C_2 = 0.03^2`
    (data range 1), averaged over the positions where the window fits (scikit-image's
    ``structural_similarity(gaussian_weights=True, use_sample_covariance=False,
    data_range=1)`` of the scaled maps, whose window has radius ``int(3.5 sigma + 0.5)``).
    A map constant up to the rounding of its dtype (a span of at most ``8 eps max|m|``,
    e.g. a constant map resized bilinearly) is scaled to zeros, so two such maps have
    SSIM 1, as two exactly constant ones.

    Args:
        maps_a (Tensor): ``(N, 1, H, W)`` or ``(N, H, W)`` maps.
        maps_b (Tensor): maps of the same shape.
        window (int, optional): odd side of the Gaussian window; maps smaller than it use
            the largest odd window that fits them. Default: 11.
        sigma (float, optional): > 0, the window's standard deviation in pixels; a
            sigma far below a pixel gives the limit, a one-tap window (per-pixel SSIM,
            still averaged where ``window`` fits). Default: 1.5.
    """
    _check_single_channel_pair(maps_a, maps_b)
    if maps_a.dim() == 3:  # (N, H, W): one channel
        maps_a, maps_b = maps_a[:, None], maps_b[:, None]
    window = check_int(window, "window")
    if window % 2 == 0:
        raise ValueError(f"`window` must be odd (a centred Gaussian window), got {window}.")
    sigma = check_number(sigma, "sigma")
    a = _unit_range(float64_here_or_cpu(maps_a), maps_a.dtype)
    b = _unit_range(float64_here_or_cpu(maps_b), maps_b.dtype)
    size = min(window, a.shape[-2], a.shape[-1])
    size -= 1 - size % 2
    coords = torch.arange(size, dtype=torch.float64, device=a.device) - (size - 1) / 2
    # (coords / sigma)**2, not coords**2 / sigma**2: 2 sigma**2 underflows to 0 below
    # sigma ~ 1e-162 (0 / 0 = NaN at the centre); this way a tiny sigma gives the limit,
    # a one-tap (identity) window
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    blur = lambda x: F.conv2d(x, kernel)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim.flatten(1).mean(dim=1)


def _hog_similarity(maps_a: Tensor, maps_b: Tensor) -> Tensor | None:
    try:
        from skimage.feature import hog
    except ImportError:
        return None
    h, w = maps_a.shape[-2:]
    if min(h, w) < 3:  # central differences with zero borders: no gradient across 2 pixels
        raise ValueError(
            f"`similarity` 'hog' needs maps of at least 3 x 3 pixels (a gradient inside each "
            f"direction), got {h} x {w}; use 'spearman_abs' or 'ssim' for these maps."
        )
    cell = max(2, min(h, w) // 4)

    def features(maps: Tensor) -> Tensor:
        rows = [
            hog(m[0].numpy(), pixels_per_cell=(cell, cell), cells_per_block=(1, 1))
            for m in _unit_range(maps.cpu().double(), maps.dtype)
        ]
        return torch.from_numpy(np.stack(rows)).to(torch.float64)

    return _pearson(features(maps_a), features(maps_b))


def _similarities(maps_a: Tensor, maps_b: Tensor, measures: Sequence[str]) -> dict[str, Tensor]:
    result: dict[str, Tensor] = {}
    for measure in measures:
        if measure == "spearman_abs":
            result[measure] = spearman_similarity(maps_a, maps_b, absolute=True)
        elif measure == "spearman":
            result[measure] = spearman_similarity(maps_a, maps_b, absolute=False)
        elif measure == "ssim":
            result[measure] = ssim_similarity(maps_a, maps_b)
        else:
            hog = _hog_similarity(maps_a, maps_b)
            if hog is not None:
                result[measure] = hog
    return result


def _check_measures(measures: Any) -> tuple[str, ...]:
    if not isinstance(measures, str) and not hasattr(measures, "__iter__"):
        raise TypeError(
            f"`similarity` must be a measure's name or a list of names (of "
            f"{', '.join(SIMILARITIES)}), got {type(measures).__name__}."
        )
    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    unknown = [m for m in measures if m not in SIMILARITIES]
    if unknown or not measures:
        raise ValueError(
            f"`similarity`: unknown measure(s) {unknown}; expected some of "
            f"{', '.join(SIMILARITIES)}."
        )
    return measures


def _checked_attribute_kwargs(attribute_kwargs: Any, *, target_instead: str) -> dict[str, Any]:
    """A copy of ``attribute_kwargs`` (None: empty), after refusing, by name, what is not a
    mapping and the keywords the check passes to ``attribute`` itself (Python's "got
    multiple values for keyword argument" named neither the argument nor what to use);
    ``target_instead`` says which argument gives the classes."""
    if attribute_kwargs is None:
        return {}
    if not isinstance(attribute_kwargs, Mapping):
        raise TypeError(
            "`attribute_kwargs` must be a dict of keywords for `attribute`, got "
            f"{type(attribute_kwargs).__name__}."
        )
    own = {"inputs": "`inputs`", "target": target_instead}
    for keyword, instead in own.items():
        if keyword in attribute_kwargs:
            raise ValueError(
                f"`attribute_kwargs` sets {keyword!r}, which this check passes to `attribute` "
                f"itself; give it as {instead} instead."
            )
    return dict(attribute_kwargs)


def _check_explainer(explainer: Any) -> None:
    """A factory (a function, or an attribution class such as ``Saliency``), not a string
    or an attribution object already made for the unrandomised model."""
    if isinstance(explainer, type) or (
        callable(explainer) and not callable(getattr(explainer, "attribute", None))
    ):
        return
    if callable(getattr(explainer, "attribute", None)):
        raise TypeError(
            f"`explainer` must build the attribution object from a model, e.g. `lambda m: "
            f"{type(explainer).__name__}(m)`, not be one already made "
            f"({type(explainer).__name__}): it must follow each randomised copy of the model."
        )
    raise TypeError(
        "`explainer` must be a callable taking the model and returning a Captum attribution "
        f"object (e.g. `lambda m: Saliency(m)`), got {type(explainer).__name__}."
    )


def _attribution_method(explainer: Callable[[nn.Module], Any], model: nn.Module) -> Any:
    """``explainer(model)``, refused by name when it has no callable ``attribute``."""
    method = explainer(model)
    if not callable(getattr(method, "attribute", None)):
        raise TypeError(
            "`explainer` must be a callable taking the model and returning a Captum "
            "attribution object (e.g. `lambda m: Saliency(m)`), got one that returned "
            f"{type(method).__name__}."
        )
    return method


def _takes_contrast_instead_of_target(method: Any) -> bool:
    """Whether ``method.attribute`` takes the class as ``contrast`` rather than ``target``:
    the package's contrastive explainers say so (``_class_argument = "contrast"`` on
    ContrastCAM and Contrastive, and their subclasses), also inside Captum's NoiseTunnel,
    which hands ``contrast`` on to them. Any other explainer gets ``target``, unless its
    ``attribute`` names a ``contrast`` parameter and no ``target`` parameter at all (it has
    no other way to be given a class). An explainer that takes ``target`` and an optional
    ``contrast`` (a difference map, say) gets ``target``, whatever kind of parameter
    ``target`` is."""
    if isinstance(method, NoiseTunnel):
        return _takes_contrast_instead_of_target(method.attribution_method)
    declared = getattr(type(method), "_class_argument", None)
    if declared in ("target", "contrast"):
        return declared == "contrast"
    try:
        parameters = inspect.signature(method.attribute).parameters
    except (TypeError, ValueError):
        return False
    return "contrast" in parameters and "target" not in parameters


def _trained_contrast(target: Any, output: Any, attribute_kwargs: dict[str, Any]) -> Any:
    """For an explainer that takes ``contrast`` instead of ``target``: the contrast class Q
    every map of :func:`model_randomisation` is computed against, read once from the trained
    model's ``output``.

    Q is ``attribute_kwargs["contrast"]`` (taken out of it) when given, else the trained
    model's most likely class other than ``target`` (default: its prediction)."""
    given = attribute_kwargs.pop("contrast", None)
    logits = isinstance(output, Tensor) and output.dim() == 2
    if given is not None:
        if target is not None:
            raise ValueError(
                "model_randomisation: `target` and `attribute_kwargs['contrast']` are both "
                "given, but the explainer takes only the contrast class (its maps explain "
                "the network's preference against it); give one of them."
            )
        if logits:
            return _one_class_each(given, output, "attribute_kwargs['contrast']")
        return given
    if not logits:
        raise ValueError(
            "model_randomisation: the explainer takes the class as `contrast` (not "
            "`target`), and the model's output is not (N, C) logits, so there is no "
            "runner-up class to default to; give it as attribute_kwargs={'contrast': ...}."
        )
    if output.shape[1] < 2:
        raise ValueError(
            "model_randomisation: the model has 1 output, so there is no runner-up class "
            "for the contrastive explainer; give attribute_kwargs={'contrast': ...}."
        )
    return runner_up_classes(output, _one_class_each(target, output, "target"))


def _explain(
    method: Any,
    inputs: Tensor,
    classes: Any,
    attribute_kwargs: dict[str, Any],
    when: str = "on the model",
    class_argument: str = "target",
) -> Tensor:
    """The maps of ``method`` (from :func:`_attribution_method`) for ``classes``, given as
    its ``class_argument`` (``"target"``, or ``"contrast"`` for a contrastive explainer),
    channels summed and resized to the inputs."""
    with warnings.catch_warnings():
        # Captum's gradient methods warn that the inputs "did not already require gradients"
        # at every step: true and harmless here (they turn it on themselves). A copy, so an
        # explainer that works in place, or through numpy, meets an ordinary tensor.
        warnings.filterwarnings("ignore", message=r"Input Tensor .* did not already require")
        maps = method.attribute(
            inputs.detach().clone(), **{class_argument: classes}, **attribute_kwargs
        )
    if isinstance(maps, tuple):
        maps = maps[0]
    maps = maps.detach()
    if maps.dim() == 4:  # summed in float64: a float16 sum overflows past 65,504
        maps = float64_here_or_cpu(maps).sum(dim=1, keepdim=True)
    if maps.shape[-2:] != inputs.shape[-2:]:
        if maps.dim() not in (3, 4) or min(maps.shape[-2:]) == 0:
            raise ValueError(
                f"`explainer` returned maps of shape {tuple(maps.shape)} {when}; expected "
                f"(N, C, h, w) or (N, h, w) maps with h, w >= 1 (resized to the inputs' "
                f"{tuple(inputs.shape[-2:])})."
            )
        # bilinear (F.interpolate's sample positions) in float64 where the device has it,
        # keeping equal values equal: F.interpolate turned a constant map (a CAM at a
        # 1 x 1 layer) into values an ulp apart, which the measures then read as a pattern
        work = torch.promote_types(maps.dtype, precise_dtype(maps.device))
        flat = maps.dim() == 3  # (N, H, W): one channel
        maps = upsample_keeping_ties(
            (maps[:, None] if flat else maps).to(work), tuple(inputs.shape[-2:])
        )
        maps = maps[:, 0] if flat else maps
    if maps.is_floating_point() and not bool(torch.isfinite(maps).all()):
        bad = (~torch.isfinite(maps)).flatten(1).any(dim=1).nonzero()[:, 0].tolist()
        raise ValueError(
            f"`explainer` returned NaN or infinite maps {when} for the examples {bad}; "
            "similarities of such maps mean nothing (a float64 model or another method may help)."
        )
    return maps


def _check_pair(maps_a: Any, maps_b: Any) -> None:
    """Two finite tensors of one shape with at least one example and one value each."""
    for maps, argument in ((maps_a, "maps_a"), (maps_b, "maps_b")):
        if not isinstance(maps, Tensor):
            raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(maps).__name__}.")
        if maps.dim() < 2 or maps.shape[0] == 0 or maps[0].numel() == 0:
            raise ValueError(
                f"`{argument}` must be a batch of maps (N, ...) with N >= 1, got "
                f"{tuple(maps.shape)}."
            )
        _check_finite(maps, argument)
    if maps_a.shape != maps_b.shape:
        raise ValueError(
            f"`maps_a` {tuple(maps_a.shape)} and `maps_b` {tuple(maps_b.shape)} must have the "
            "same shape."
        )


def _check_single_channel_pair(maps_a: Any, maps_b: Any) -> None:
    """:func:`_check_pair`, and the maps ``(N, 1, H, W)`` or ``(N, H, W)``: one map per
    example, one channel each."""
    _check_pair(maps_a, maps_b)
    if maps_a.dim() not in (3, 4) or (maps_a.dim() == 4 and maps_a.shape[1] != 1):
        raise ValueError(
            f"`maps_a` and `maps_b` must be (N, 1, H, W) or (N, H, W) maps, got "
            f"{tuple(maps_a.shape)}; reduce the channels first (e.g. sum them), and give a "
            "single (H, W) map as map[None]."
        )


def _check_finite(maps: Tensor, argument: str) -> None:
    if maps.is_floating_point() and not bool(torch.isfinite(maps).all()):
        raise ValueError(f"`{argument}` contains NaN or infinite values.")


def _has_own_parameters(module: nn.Module) -> bool:
    """Parameters of its own, or weights moved into ``module.parametrizations``."""
    return parametrize.is_parametrized(module) or any(True for _ in module.parameters(False))


def _exported_layer_holders(model: nn.Module) -> dict[str, type]:
    """The modules of ``model`` that hold the parameters of a layer of a ``torch.export``
    program (the model itself, or an exported module inside it) whose class re-initialises
    itself (``reset_parameters``), by name, with that class. In the program's module the
    layers ran as graph operators, and their parameters hang on bare containers at the
    layers' paths, without the layers' methods; the class each layer had is the one the
    program recorded (:func:`captum_ext.exported.exported_module_types`, by its qualified
    name), taken from a Python module already imported (nothing is imported). The other
    holders (a class without ``reset_parameters``, such as a LayerScale, or one that cannot
    be found) are treated as the eager model's modules without it: their trained weights
    only (:func:`_raw_weights`). A ``MultiheadAttention``'s ``out_proj``, which the program
    does not record (it never runs as a module), is a Linear, as in the eager model."""
    holders: dict[str, type] = {}
    for prefix, module in model.named_modules():
        if is_exported(module):
            head = f"{prefix}." if prefix else ""
            classes = _exported_classes(module)
            for path, kind in list(classes.items()):
                # a MultiheadAttention's out_proj (a Linear) never runs as a module of its own,
                # so the program does not record it; the eager model resets it as a Linear
                if isinstance(kind, type) and issubclass(kind, nn.MultiheadAttention):
                    classes.setdefault(f"{path}.out_proj", nn.Linear)
            for path, kind in classes.items():
                if path and callable(getattr(kind, "reset_parameters", None)):
                    holders[head + path] = kind
    return holders


def _exported_classes(model: torch.fx.GraphModule) -> dict[str, type | None]:
    """The class of every module of an exported model that ran, by path (None where it is
    not in a Python module already imported), as ``torch.export`` recorded it in each
    node's ``nn_module_stack`` (a qualified name such as ``"torch.nn.modules.conv.Conv2d"``,
    or in older releases the class itself)."""
    classes: dict[str, type | None] = {}
    for node in model.graph.nodes:
        for value in (node.meta.get("nn_module_stack") or {}).values():
            path, kind = value[0], value[1]
            if path not in classes:
                classes[path] = kind if isinstance(kind, type) else _imported_class(str(kind))
    return classes


def _imported_class(qualified: str) -> type | None:
    """The ``nn.Module`` subclass named ``qualified`` (``module.Class``, or ``module.Outer.Inner``)
    in a Python module already imported; None when there is none."""
    parts = qualified.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        owner: Any = sys.modules.get(".".join(parts[:cut]))
        if owner is None:
            continue
        for part in parts[cut:]:
            owner = getattr(owner, part, None)
        if isinstance(owner, type) and issubclass(owner, nn.Module):
            return owner
        return None
    return None


def _reset_as(kind: type, holder: nn.Module) -> None:
    """Re-initialise ``holder``'s parameters (and buffers) in place as ``kind``'s
    ``reset_parameters`` would those of the eager layer: it runs on a stand-in, an instance of
    ``kind`` made without its ``__init__`` that holds the same parameter and buffer objects
    (absent ``weight`` / ``bias`` as None, as torch registers them), whose other attributes
    are ``kind``'s constructor defaults, except the flags that follow from the parameters
    present (``affine`` and ``elementwise_affine``: a weight; ``track_running_stats``: a
    running mean). It draws the same random numbers in the same order as the eager layer:
    Linear, convolutions, batch, layer and group norms, PReLU (with its default ``init``,
    0.25: the one given to the eager layer is not recorded) give the eager values; an
    embedding's ``padding_idx`` is its one all-zero row. A class whose ``reset_parameters``
    fails on the stand-in (it needs an attribute the defaults do not give, such as an RNN's
    sizes, or a constructor argument other than the default) gets its tensors back and then
    torch's default initialisation (:func:`_reset_parameters`)."""
    stand_in = kind.__new__(kind)
    nn.Module.__init__(stand_in)
    parameters = dict(holder._parameters)
    buffers = dict(holder._buffers)
    stand_in._parameters = dict(parameters)  # the same objects, in the holder's order
    stand_in._buffers = dict(buffers)
    for name in ("weight", "bias"):
        stand_in._parameters.setdefault(name, None)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        stand_in._buffers.setdefault(name, None)
    try:
        arguments = inspect.signature(kind.__init__).parameters.values()
    except (TypeError, ValueError):
        arguments = []
    taken = set(stand_in._parameters) | set(stand_in._buffers)
    for argument in arguments:
        if argument.default is not inspect.Parameter.empty and argument.name not in taken:
            stand_in.__dict__[argument.name] = argument.default
    has_weight = parameters.get("weight") is not None
    stand_in.__dict__.update(
        affine=has_weight,
        elementwise_affine=has_weight,
        track_running_stats=buffers.get("running_mean") is not None,
    )
    if issubclass(kind, (nn.Embedding, nn.EmbeddingBag)):
        stand_in.__dict__["padding_idx"] = _padding_row(parameters.get("weight"))
    saved = {name: value.detach().clone() for name, value in holder.state_dict().items()}
    try:
        with torch.no_grad():
            stand_in.reset_parameters()
    except Exception:  # it needs what the program did not record: torch's default instead
        with torch.no_grad():
            for name, value in holder.state_dict().items():
                value.copy_(saved[name])
        _reset_parameters(holder)
        return
    with torch.no_grad():  # a reset_parameters that assigned new tensors
        for store, ours in ((parameters, stand_in._parameters), (buffers, stand_in._buffers)):
            for name, value in store.items():
                if value is not None and ours.get(name) is not value:
                    value.copy_(ours[name])


def _padding_row(weight: Tensor | None) -> int | None:
    """The padding row of an embedding's trained ``weight``: the one row that is all zeros
    (``padding_idx`` keeps it at zero through training; the program does not record the
    index). None where no row, or more than one, is all zeros."""
    if weight is None or weight.dim() != 2:
        return None
    rows = torch.nonzero(~weight.detach().ne(0).any(dim=1)).flatten()
    return int(rows[0]) if len(rows) == 1 else None


def _parametrised_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    modules = dict(model.named_modules())
    if isinstance(layers, str):  # one layer (a string is a sequence of its characters)
        layers = [layers]
    if layers is not None:
        try:  # any iterable of names: a list, reversed(...), dict keys, a numpy array
            layers = [str(name) if isinstance(name, str) else name for name in layers]
        except TypeError:
            layers = None
        if layers is None or not all(isinstance(name, str) for name in layers):
            raise TypeError("`layers` must be a module name or a list of module names.")
        layers = [eager_name(name, modules) for name in layers]
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"`layers`: {missing} are not modules of {type(model).__name__}.")
        empty = [name for name in layers if not _has_own_parameters(modules[name])]
        if empty:  # "randomising" them changes nothing: similarity 1 by construction
            raise ValueError(
                f"`layers`: {empty} have no parameters of their own to randomise (an "
                "activation, a pooling layer or a container); name the layers that hold the "
                "weights (e.g. a container's convolutions and linear layers)."
            )
        return list(layers)
    # every layer that re-initialises itself (``reset_parameters``, or compiled), and every
    # other module holding trainable weights of its own, the model itself included: a vision
    # transformer keeps its class token there, and attention layers and positional
    # embeddings have no public ``reset_parameters`` (see _raw_weights for what is taken)
    inside_parametrisations = {  # re-initialised with the layer they belong to
        id(part)
        for module in model.modules()
        if parametrize.is_parametrized(module)
        for part in module.parametrizations.modules()
    }
    holders = _exported_layer_holders(model)
    names = [
        name
        for name, module in model.named_modules()
        if id(module) not in inside_parametrisations
        and _has_own_parameters(module)
        and ((name and (_resets_itself(module) or name in holders)) or _raw_weights(module))
    ]
    # top (output) first by declaration, the model's own parameters ("") last: the fallback
    # of _in_execution_order where a forward pass cannot be watched
    return names[::-1]


def _in_execution_order(
    model: nn.Module,
    names: list[str],
    ranks: dict[str, int],
    explained: dict[str, int] | None = None,
) -> list[str]:
    """The default cascade ``names`` from the output down, by the reverse of the order in
    which they first ran (:func:`~captum_ext._utils.layers.execution_ranks`): ``ranks``,
    watched in the model's forward pass on the inputs, and ``explained``, watched in the
    explainer's call on the model, whose own passes (an integrated-gradients path from a
    baseline, noisy copies) may run layers the plain pass does not; such a layer is placed
    after the last layer of the forward pass that ran before it in the explainer's call.
    The model's own parameters (name ``""``: a vision transformer's class token) come last.
    Layers that ran in neither are left out with a warning. As given (declaration order
    reversed) where the passes could not be watched: a TorchScript model or layer
    (compiled code takes no hooks), or none ran."""
    explained = explained or {}
    modules = dict(model.named_modules())
    if (not ranks and not explained) or any(
        isinstance(modules[name], torch.jit.ScriptModule) for name in names
    ):
        return names
    idle = [name for name in names if name not in ranks and name not in explained]
    if idle:
        shown = ", ".join(repr(name) for name in idle[:8])
        more = f" and {len(idle) - 8} more" if len(idle) > 8 else ""
        warnings.warn(
            f"model_randomisation: the default cascade leaves out {len(idle)} module(s) with "
            f"parameters that ran neither in the model's forward pass on `inputs` (eval "
            f"mode) nor in the explainer's call on the model: {shown}{more}. For these "
            "inputs and this explainer randomising them would change no map (an auxiliary "
            "head that runs only in training mode, a branch other inputs take, an unused "
            "layer); name them in `layers` to randomise them anyway.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def key(name: str) -> tuple[int, int, int]:
        if name in ranks:
            return (ranks[name], 0, 0)
        before = [
            ranks[other]
            for other in explained
            if other in ranks and explained[other] < explained[name]
        ]
        return (max(before, default=-1), 1, explained[name])

    ran = sorted((name for name in names if name not in idle), key=key, reverse=True)
    # the model's own parameters last, where the model takes its input in (it is called
    # first), as in the declaration order of the fallback
    return [name for name in ran if name] + [name for name in ran if not name]


def _reset_parametrized(module: nn.Module) -> None:
    """Re-initialise a layer whose weights are parametrised (``weight_norm``,
    ``spectral_norm``, ...): its ``reset_parameters`` would write into the computed
    ``weight``, a fresh tensor on each access, and leave the parametrisation's tensors as
    they were. A plain twin is re-initialised instead and its values assigned through the
    parametrisation (its ``right_inverse``); spectral_norm's power-iteration vectors are then
    recomputed for the new weight, as when it is created."""
    names = list(module.parametrizations)
    for name in names:
        for parametrization in module.parametrizations[name]:
            inverse = getattr(type(parametrization), "right_inverse", None)
            if inverse is None or inverse is nn.Module.__dict__.get("right_inverse"):
                _refuse_parametrization(module, name, "has no right_inverse")
    # a plain instance of the layer's own class (the parametrised class derives from it)
    # sharing nothing that the re-initialisation writes: ``remove_parametrizations`` on a
    # deep copy would delete the properties of the class the copy shares with ``module``
    plain_class = type(module).__bases__[0]
    twin = plain_class.__new__(plain_class)
    twin.__dict__.update(module.__dict__)
    twin._modules = {
        key: value for key, value in module._modules.items() if key != "parametrizations"
    }
    twin._parameters = {
        key: None if value is None else nn.Parameter(value.detach().clone())
        for key, value in module._parameters.items()
    }
    for name in names:
        twin._parameters[name] = nn.Parameter(getattr(module, name).detach().clone())
    _reset_parameters(twin)
    with torch.no_grad():
        for name in names:
            try:
                setattr(module, name, getattr(twin, name).detach())  # a tensor: the setter
            except (NotImplementedError, RuntimeError) as error:  # its right_inverse refuses
                raise ValueError(
                    f"`layers`: the parametrised `{name}` of a {type(module).__name__} cannot "
                    f"be re-initialised ({error}); name other layers in `layers`."
                ) from error
            for parametrization in module.parametrizations[name]:
                if _is_spectral_norm(parametrization):  # u, v of the new weight, as at creation
                    original = module.parametrizations[name].original
                    parametrization._power_method(
                        parametrization._reshape_weight_to_matrix(original), 15
                    )
        for name, parameter in module.named_parameters(recurse=False):
            parameter.copy_(getattr(twin, name))


def _is_spectral_norm(parametrization: nn.Module) -> bool:
    """torch's ``spectral_norm`` parametrisation (its power-iteration vectors ``_u``, ``_v``
    belong to the weight)."""
    return all(
        hasattr(parametrization, name)
        for name in ("_u", "_v", "_power_method", "_reshape_weight_to_matrix")
    )


def _refuse_parametrization(module: nn.Module, name: str, why: str) -> None:
    raise ValueError(
        f"`layers`: the parametrised `{name}` of a {type(module).__name__} cannot be "
        f"re-initialised (its parametrisation {why}); name other layers in `layers`."
    )


def _resets_itself(module: nn.Module) -> bool:
    """A layer re-initialised by its own ``reset_parameters`` (or a compiled layer of a
    TorchScript model, given torch's default initialisation by _reset_parameters; for the
    parameter holders of a ``torch.export`` program: :func:`_exported_layer_holders`)."""
    return (
        callable(getattr(module, "reset_parameters", None))
        or parametrize.is_parametrized(module)
        or isinstance(module, torch.jit.ScriptModule)
    )


def _raw_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights of a module without ``reset_parameters`` that the default cascade
    re-initialises: its own floating-point parameters of two or more dimensions that are
    trained (``requires_grad``): attention projections, class tokens, positional
    embeddings. Vectors and scalars (a temperature, a scale, a bias without its layer) and
    frozen or integer parameters (normalisation constants, counters) keep their values: a
    rule written for linear and convolutional weights would set a temperature to 0 or a
    scale to 1, and constants are not what the test is about."""
    return [
        (name, parameter)
        for name, parameter in module.named_parameters(recurse=False)
        if parameter.is_floating_point() and parameter.dim() >= 2 and parameter.requires_grad
    ]


def _pruning_hooks(module: nn.Module) -> list[prune.BasePruningMethod]:
    """The forward pre-hooks of ``torch.nn.utils.prune`` on ``module``: one per pruned
    tensor (``weight``, ``bias``, ...), each recomputing ``<name> = <name>_orig *
    <name>_mask`` before every forward pass (a ``PruningContainer`` for repeated pruning)."""
    return [
        hook
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod)
    ]


def _resynchronise_pruning(module: nn.Module) -> None:
    """After ``module.reset_parameters()`` of a pruned layer: it wrote its new values into
    the computed ``<name>`` (``<name>_orig * <name>_mask``), which the pruning pre-hook
    overwrites from the trained ``<name>_orig`` on the next forward pass (only the unpruned
    tensors were re-initialised). The new values go into ``<name>_orig`` (the mask is
    kept), as the re-initialisation of the same layer folded with ``prune.remove`` would
    draw them, and ``<name>`` is recomputed. A ``reset_parameters`` that assigned a new
    parameter to ``<name>`` (instead of initialising it in place) is handled alike."""
    for hook in _pruning_hooks(module):
        name = hook._tensor_name
        fresh = module._parameters.pop(name, None) if name in module._parameters else None
        if fresh is None:
            fresh = getattr(module, name)
        with torch.no_grad():
            getattr(module, name + "_orig").copy_(fresh)
        hook(module, ())  # <name> = <name>_orig * <name>_mask, as before a forward pass


def _reset_parameters(module: nn.Module, raw_weights_only: bool = False) -> None:
    """Re-initialise ``module``'s own parameters: its ``reset_parameters``, or, for a module
    without one (a compiled layer of a TorchScript model, ``nn.MultiheadAttention``, a
    module holding raw parameters such as a class token or a positional embedding), torch's
    default rule for linear and convolutional layers written out: weights of 2 or more
    dims Kaiming-uniform with ``a = sqrt(5)``, a bias uniform in +-1/sqrt(fan_in) of that
    weight; 1-D weights (norms) ones, other biases zeros, a batch norm's running statistics
    reset (mean 0, variance 1). The parameters are changed in place, so compiled code runs
    with the new values. ``raw_weights_only`` (the default cascade, on a module without
    ``reset_parameters`` that is not a compiled layer, or the model itself): only
    :func:`_raw_weights`, each Kaiming-uniform.

    A layer pruned with ``torch.nn.utils.prune`` is re-initialised as the same layer folded
    with ``prune.remove`` would be (the same values for the same seed), into its
    ``<name>_orig`` tensors; its masks are kept (:func:`_resynchronise_pruning`)."""
    if parametrize.is_parametrized(module):
        _reset_parametrized(module)
        return
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        resynchronise_legacy_norms(module)
        _resynchronise_pruning(module)
        return
    hooks = _pruning_hooks(module)
    if raw_weights_only:
        with torch.no_grad():
            for _, parameter in _raw_weights(module):
                nn.init.kaiming_uniform_(parameter, a=5**0.5)
        for hook in hooks:  # the computed tensors, from the new <name>_orig
            hook(module, ())
        return
    # a pruned tensor's rule by its own name (``weight``, not ``weight_orig``)
    pruned = {hook._tensor_name + "_orig": hook._tensor_name for hook in hooks}
    parameters = {
        pruned.get(name, name): parameter
        for name, parameter in module.named_parameters(recurse=False)
    }
    weight = parameters.get("weight")
    with torch.no_grad():
        for name, parameter in parameters.items():
            if parameter.dim() >= 2:
                nn.init.kaiming_uniform_(parameter, a=5**0.5)
            elif name == "bias" and weight is not None and weight.dim() >= 2:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
                bound = 1 / fan_in**0.5 if fan_in > 0 else 0.0
                nn.init.uniform_(parameter, -bound, bound)
            elif name == "weight":
                nn.init.ones_(parameter)
            else:
                nn.init.zeros_(parameter)
        # a batch norm's running statistics, as its reset_parameters resets them
        buffers = dict(module.named_buffers(recurse=False))
        if isinstance(buffers.get("running_mean"), Tensor):
            buffers["running_mean"].zero_()
        if isinstance(buffers.get("running_var"), Tensor):
            buffers["running_var"].fill_(1)
        if isinstance(buffers.get("num_batches_tracked"), Tensor):
            buffers["num_batches_tracked"].zero_()
    for hook in hooks:  # the computed tensors, from the new <name>_orig
        hook(module, ())


@leaves_inference_mode
def model_randomisation(
    explainer: Callable[[nn.Module], Any],
    model: nn.Module,
    inputs: Tensor,
    *,
    target: Any = None,
    cascade: bool = True,
    layers: Sequence[str] | None = None,
    similarity: Sequence[str] | str = ("spearman_abs", "ssim"),
    seed: int = 0,
    attribute_kwargs: dict[str, Any] | None = None,
) -> RandomisationCurves:
    r"""Cascading (or independent) model-parameter randomisation test.

    Args:
        explainer (Callable): ``explainer(model) -> attribution object`` with Captum's
            ``attribute(inputs, target=...)``, e.g. ``lambda m: Saliency(m)`` or
            ``lambda m: GradCAM(m, m.features[3])`` (build layer methods from the model given,
            so that they follow the randomised copy). An explainer whose ``attribute`` takes
            the class as ``contrast`` and not ``target`` (:class:`~captum_ext.attr.ContrastCAM`,
            :class:`~captum_ext.attr.Contrastive`; a ``contrast`` parameter and no ``target``
            one taken by position) explains the network's preference against one contrast
            class Q, the same for the trained model and every randomised copy:
            ``attribute_kwargs["contrast"]`` when given (one class per example; ``target``
            must then be left out), else the trained model's most likely class other than
            ``target`` (its runner-up by default), read once from the trained model's
            output; each map is ``attribute(inputs, contrast=Q, **attribute_kwargs)``.
            Its maps' channels are summed, and
            maps smaller than the inputs resized bilinearly (``F.interpolate``'s sample
            positions, in float64 where the device has it, keeping equal values equal: a
            1 x 1 CAM stays a constant map, similarity 1 with another).
        model (nn.Module): the trained model; it is not changed (a deep copy is randomised).
        inputs (Tensor): ``(N, C, H, W)``, passed to the explainer as given. The forward
            pass that reads the classes gives float32 images to a float16 / bfloat16
            model in its dtype, as this package's explainers do (Captum's own need the
            images in the model's dtype).
        target (int or Tensor, optional): classes to explain; default the model's predictions
            (for a contrastive explainer, the classes whose runner-up is the default Q).
        cascade (bool): randomise cumulatively from the top (True) or one layer at a time
            (False). Default: True.
        layers (str or list of str, optional): the layers to randomise, top first, in the
            order given (one name: that layer only). Default: from the output down, by the
            reverse of the order in which the layers first run in the forward pass on
            ``inputs`` (eval mode, watched with hooks) and, for layers that run only there,
            in the explainer's call on the model (integrated gradients' path from its
            baseline, noise tunnel's noisy copies: such a layer follows the last layer of
            the forward pass that ran before it). A layer ranks where it is called; a module
            with children (a ConvNeXt block's layer scale, a positional embedding) where its
            own parameters are first used; a module whose parameters another uses without
            calling it, such as ``nn.MultiheadAttention``'s ``out_proj``, by their first
            use; the model's own parameters (name ``""``, a vision transformer's class
            token) come last. Modules with parameters that run in neither (an auxiliary head
            that runs only in training, such as Inception v3's ``AuxLogits``, or a branch
            that other inputs take) are left out with a warning, since randomising them
            changes no map for these inputs and this explainer. A TorchScript model, whose
            compiled code cannot be watched, keeps its declaration order reversed, the
            model's own parameters last. The default takes every layer that
            re-initialises itself (``reset_parameters``; compiled layers of a
            TorchScript model get torch's default initialisation of linear and
            convolutional layers; the layers of a ``torch.export`` program are
            re-initialised as their eager class's ``reset_parameters`` would, when the
            program records a class that has one), and the trained weights of every other
            module, the model itself included (name ``""``: a vision transformer's class
            token): their own floating-point parameters of two or more dimensions with
            ``requires_grad`` (``nn.MultiheadAttention``'s projections, positional
            embeddings), each Kaiming-uniform. Vectors, scalars and frozen or integer
            parameters of such modules (a temperature, normalisation constants) keep their
            values. A layer pruned with ``torch.nn.utils.prune`` gets the values the same
            layer folded with ``prune.remove`` would (for the same ``seed``) in its
            ``weight_orig`` (and ``bias_orig``), and keeps its masks.
        similarity (str or list of str): measures, from ``"spearman_abs"``, ``"spearman"``,
            ``"ssim"``, ``"hog"`` (scikit-image). Default: ``("spearman_abs", "ssim")``.
        seed (int): seed of the re-initialisation. Default: 0.
        attribute_kwargs (dict, optional): extra keywords for ``attribute``; for a
            contrastive explainer, ``"contrast"`` gives Q (see ``explainer``).

    Returns:
        RandomisationCurves: layer names, per-measure ``(steps, N)`` similarities, the original
        and randomised maps.

    Reference: J. Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    _check_explainer(explainer)
    model = uncompiled(model)
    inputs = image_batch(
        inputs,
        purpose="model_randomisation compares the maps of one batch of images (N, C, H, W)",
        other_inputs="attribute_kwargs={'additional_forward_args': ...}",
    )
    measures = _check_measures(similarity)
    seed = check_int(seed, "seed", minimum=0)
    cascade = check_flag(cascade, "cascade")
    kwargs = _checked_attribute_kwargs(attribute_kwargs, target_instead="`target`")
    extra = format_additional_forward_args(kwargs.get("additional_forward_args"))
    names = _parametrised_layers(model, layers)
    default = layers is None  # raw modules: only their trained weights (_raw_weights)
    if not names:
        raise ValueError("`layers`: the model has no layer with parameters to randomise.")
    modules = dict(model.named_modules())
    # the default cascade in the order the layers run, watched in the forward pass and in
    # the explainer's call on the model below
    watched = {name: modules[name] for name in names}

    def watching() -> contextlib.AbstractContextManager:
        return execution_ranks(watched) if default else contextlib.nullcontext({})

    with preserved_state([model]):
        set_eval_mode(model, fixed_batch=True)  # the explainer runs the caller's batch
        with torch.no_grad(), watching() as ranks:
            # float32 images of a half-precision model in its dtype, as the explainers do;
            # the model's further inputs as the explainer passes them
            output = call_model(model, in_model_precision(model, (inputs,)), extra)
        method = _attribution_method(explainer, model)
        class_argument = "target"
        if _takes_contrast_instead_of_target(method):
            # every map against the same Q, read from the trained model: the randomised
            # copies' own runner-ups would change the question along with the weights
            class_argument = "contrast"
            classes = _trained_contrast(target, output, kwargs)
        elif isinstance(output, Tensor) and output.dim() == 2:  # (N, C) logits: one class each
            classes = _one_class_each(target, output, "target")
        else:
            classes = output.argmax(dim=1) if target is None else target
        # the explainer's own passes (an integrated-gradients path from its baseline, noisy
        # copies) may run layers that the plain forward pass does not
        with watching() as explained:
            original = _explain(method, inputs, classes, kwargs, class_argument=class_argument)
        if default:
            names = _in_execution_order(model, names, ranks, explained)
    randomised_maps = []
    similarity_rows: dict[str, list[Tensor]] = {}
    cuda_devices = initialised_cuda_devices()  # a CUDA model's parameters draw there
    with seeded_rng(None, cuda_devices):  # the caller's random states come back afterwards
        holders = _exported_layer_holders(model)
        working = copied_model(model)
        set_eval_mode(working, fixed_batch=True)
        for step, name in enumerate(names):
            if not cascade:
                working = copied_model(model)
                set_eval_mode(working, fixed_batch=True)
            seed_generators(seed + step, cuda_devices)
            module = dict(working.named_modules())[name]
            if name in holders:  # a layer of a torch.export program, as its eager class
                _reset_as(holders[name], module)
            else:
                # the default cascade: compiled layers as a whole, the model itself and
                # other modules without reset_parameters (the parameter holders of a
                # torch.export program included) by their trained weights only
                compiled_layer = bool(name) and isinstance(module, torch.jit.ScriptModule)
                _reset_parameters(module, raw_weights_only=default and not compiled_layer)
            # inside the caller's torch.autocast block the low-precision copies of weights
            # already run would be reused: the cascade stopped after its first layer
            torch.clear_autocast_cache()
            maps = _explain(
                _attribution_method(explainer, working),
                inputs,
                classes,
                kwargs,
                f"after randomising {name!r}",
                class_argument,
            )
            randomised_maps.append(maps)
            for measure, values in _similarities(original, maps, measures).items():
                similarity_rows.setdefault(measure, []).append(values)
    return RandomisationCurves(
        layers=names,
        similarity={m: torch.stack(rows) for m, rows in similarity_rows.items()},
        original=original,
        randomised=torch.stack(randomised_maps),
    )


def _one_class_each(value: Any, logits: Tensor, argument: str) -> Tensor:
    """``(N,)`` classes from an int, list or tensor (one per example, or one for all), or
    the prediction for None; checked against the model's classes, naming ``argument``."""
    selected, multi = class_selection(value, logits, argument=argument, default="predicted")
    if multi or selected.shape[1] != 1:
        raise ValueError(f"`{argument}` must give one class per example, not several.")
    return selected[:, 0]


@leaves_inference_mode
def class_sensitivity(
    explainer: Callable[[nn.Module], Any],
    model: nn.Module,
    inputs: Tensor,
    *,
    target: Any = None,
    contrast: Any = "runner-up",
    similarity: Sequence[str] | str = ("spearman_abs", "ssim"),
    attribute_kwargs: dict[str, Any] | None = None,
) -> ClassSensitivity:
    """How similar a method's maps are for two different classes of the same input.

    An explainer whose ``attribute`` takes the class as ``contrast`` and not ``target``
    (:class:`~captum_ext.attr.ContrastCAM`, :class:`~captum_ext.attr.Contrastive`: see
    ``explainer`` of :func:`model_randomisation`) gets the two classes as its ``contrast``:
    its maps show the evidence against ``target`` and against ``contrast`` (with the
    defaults, against the prediction and against the runner-up); for "why P, rather than
    Q1?" against "why P, rather than Q2?" pass ``target=Q1`` and ``contrast=Q2`` (e.g. the
    runner-up and ``"least-likely"``). ``attribute_kwargs`` must not set ``contrast`` then.

    Args:
        explainer (Callable): as in :func:`model_randomisation`.
        model (nn.Module): the model (not changed).
        inputs (Tensor): ``(N, C, H, W)``, passed to the explainer as given. The forward
            pass that reads the classes gives float32 images to a float16 / bfloat16
            model in its dtype, as this package's explainers do (Captum's own need the
            images in the model's dtype).
        target (int or Tensor, optional): first class; default the prediction.
        contrast (str, int or Tensor, optional): second class: ``"runner-up"`` (second most
            likely), ``"least-likely"``, or given classes. None is ``"runner-up"``, as for
            :class:`~captum_ext.attr.ContrastCAM` and :class:`~captum_ext.attr.Contrastive`.
            Default: ``"runner-up"``.
        similarity: measures as in :func:`model_randomisation`.
        attribute_kwargs (dict, optional): extra keywords for ``attribute``.

    Returns:
        ClassSensitivity: per-measure ``(N,)`` similarity (1 = the maps ignore the class), the
        two classes and their maps. Both are computed in one ``attribute`` call on the inputs
        stacked twice.
    """
    _check_explainer(explainer)
    model = uncompiled(model)
    inputs = image_batch(
        inputs,
        purpose="class_sensitivity compares the maps of one batch of images (N, C, H, W)",
        other_inputs="attribute_kwargs={'additional_forward_args': ...}",
    )
    measures = _check_measures(similarity)
    kwargs = _checked_attribute_kwargs(
        attribute_kwargs, target_instead="`target` (and `contrast` for the second class)"
    )
    extra = format_additional_forward_args(kwargs.get("additional_forward_args"))
    n = inputs.shape[0]
    with preserved_state([model]):
        set_eval_mode(model, argument="model")  # refuses a fixed-batch torch.export program
        with torch.no_grad():
            logits = call_model(model, in_model_precision(model, (inputs,)), extra)
        target = _one_class_each(target, logits, "target")
        if logits.dim() == 2 and logits.shape[1] == 1:  # else its only class with itself
            raise ValueError(
                "class_sensitivity: the model has 1 output, so there is no second class to "
                "compare its maps with. A binary classifier with one logit z has the two-class "
                "logits [-z/2, z/2]: wrap it in an nn.Module whose forward returns "
                "captum_ext.data.two_class_logits(model(x))."
            )
        if contrast is None:  # as ContrastCAM and Contrastive read it: the runner-up
            contrast = "runner-up"
        if isinstance(contrast, str):
            if contrast not in ("runner-up", "least-likely"):
                raise ValueError(
                    f"`contrast`={contrast!r}: expected 'runner-up', 'least-likely' or classes."
                )
            # the most (least) likely class other than the target: a given target may be
            # the runner-up itself (a misclassified image explained for its label)
            if contrast == "runner-up":
                contrast = runner_up_classes(logits, target)
            else:  # (float64 logits kept: differences in the 9th digit still rank)
                scores = at_least_float32(logits.detach())
                if not scores.is_floating_point():  # integer scores: inf needs a float
                    scores = scores.double()
                others = scores.scatter(1, target[:, None], float("inf"))
                contrast = others.argmin(dim=1)
        else:
            contrast = _one_class_each(contrast, logits, "contrast")
            same = (contrast == target).nonzero()[:, 0]
            if len(same):
                raise ValueError(
                    f"`contrast` equals `target` for example(s) {same[:5].tolist()}: the check "
                    "compares the maps of two different classes (the same class gives "
                    "similarity 1, read as 'blind to the class')."
                )
        method = _attribution_method(explainer, model)
        class_argument = "target"
        if _takes_contrast_instead_of_target(method):
            class_argument = "contrast"
            if "contrast" in kwargs:
                raise ValueError(
                    "`attribute_kwargs` sets 'contrast', but class_sensitivity hands its two "
                    "classes to this explainer's `contrast` itself; give them as `target` "
                    "and `contrast` instead."
                )
        stacked = torch.cat([inputs, inputs])
        if "additional_forward_args" in kwargs:  # the per-example ones stacked with the inputs
            kwargs["additional_forward_args"] = map_per_example(
                kwargs["additional_forward_args"], n, lambda tensor: torch.cat([tensor, tensor])
            )
        maps = _explain(
            method, stacked, torch.cat([target, contrast]), kwargs, class_argument=class_argument
        )
    first, second = maps[:n], maps[n:]
    return ClassSensitivity(
        similarity=_similarities(first, second, measures),
        target=target,
        contrast=contrast,
        target_maps=first,
        contrast_maps=second,
    )
