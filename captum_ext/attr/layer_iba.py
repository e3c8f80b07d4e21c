r"""IBA: the Per-Sample Information Bottleneck at a layer, with Khakzar et al.'s variants.

Schulz et al., "Restricting the Flow: Information Bottlenecks for Attribution", ICLR 2020;
inverse and regression variants from Khakzar et al., "Explaining COVID-19 and Thoracic
Pathology Model Predictions by Identifying Informative Input Features", MICCAI 2021.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from .._utils.batched_grad import (
    _training_batch_norms,
    call_model,
    in_model_precision,
    objective_gradients,
    run_forward,
)
from .._utils.batches import dict_batch
from .._utils.caller import inside_expanding_wrapper, user_stacklevel
from .._utils.hooks import call_hook, registered_hooks, restored_buffers_of_modules_run
from .._utils.layers import resolve_layer, root_module, uncompiled
from .._utils.maps import upsample_maps
from .._utils.model_state import gradients_on, leaves_inference_mode, preserved_state
from .._utils.precision import precise, precise_dtype
from .._utils.training import optimiser_step, progress_bar
from .._utils.validation import (
    OutOfMemoryError,
    check_flag,
    check_int,
    check_number,
    format_additional_forward_args,
    format_inputs,
    output_selection,
    repeat_per_example,
)
from ..token_grid import looks_channels_last
from .pathway_gradient import _in_backward_pass

RETURN_TYPES = ("bits", "capacity", "lambda")
LOSSES = ("cross_entropy", "mse")


class _StopForward(Exception):
    """Raised by the estimation hook once the layer has run (the rest of the model is not
    needed to collect its activations)."""


def upsample_bits(bits: Tensor, size: int | tuple[int, ...] | torch.Size) -> Tensor:
    r"""Resize (N, K, h, w) maps of bits to (N, K, H, W), keeping each map's total bits.

    The map is interpolated bilinearly (``align_corners=False``) and then rescaled so that
    every channel of every example sums to what it summed to before:

    .. code-block:: text

        up  = bilinear(bits, size)
        out = up * sum(bits) / sum(up)        (per example and channel; 0 stays 0)

    The reference implementation scales by ``(h * w) / (H * W)`` before its bilinear
    resize, which keeps the total only up to the interpolation's border effects; the
    rescaling here keeps it to float precision, so the bits of a pixel region add up to
    the information that passed through it.

    Args:
        bits (Tensor): (N, K, h, w) non-negative maps, e.g. ``LayerIBA.attribute``'s output.
        size (int or tuple[int, int]): the target (H, W), e.g. ``inputs.shape[2:]``; an
            int is both sides.

    Returns:
        Tensor: (N, K, H, W) maps whose per-map sums equal those of ``bits``.

    Examples::

        >>> from captum_ext.attr import upsample_bits
        >>> small = torch.rand(2, 1, 7, 7)
        >>> big = upsample_bits(small, (28, 28))
        >>> torch.allclose(big.sum((2, 3)), small.sum((2, 3)))
        True
    """
    if not isinstance(bits, Tensor) or bits.dim() != 4 or not bits.is_floating_point():
        got = tuple(bits.shape) if isinstance(bits, Tensor) else type(bits).__name__
        raise ValueError(f"`bits` must be a floating-point (N, K, h, w) tensor, got {got}.")
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)  # one side for both, as F.interpolate reads an int
    try:  # integers only: int() would read "28" as (2, 8) and truncate 28.5
        if isinstance(size, (str, bytes)):
            raise TypeError
        size = tuple(operator.index(s) for s in size)
    except TypeError:
        raise TypeError(
            "`size` must be an int or a (height, width) pair of ints, got "
            f"{type(size).__name__} {size!r}."
        ) from None
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"`size` must be a (height, width) pair of positive ints, got {size}.")
    up = upsample_maps(bits, size, "bilinear")
    total = bits.sum(dim=(2, 3), keepdim=True)
    total_up = up.sum(dim=(2, 3), keepdim=True)
    usable = total_up != 0
    scale = torch.where(usable, total / torch.where(usable, total_up, 1), 1)
    return up * scale


def gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The normalised 2-D Gaussian of IBA's mask smoothing: side ``2 round(2 sigma) + 1``.

    It is the outer product of :func:`gaussian_taps` with itself, which is how
    :func:`smooth_lambda` applies it."""
    taps = torch.tensor(gaussian_taps(sigma), dtype=torch.float64)
    return torch.outer(taps, taps).to(dtype=dtype, device=device)


def gaussian_taps(sigma: float) -> tuple[float, ...]:
    """The normalised 1-D factor of :func:`gaussian_kernel` (float64 numbers); a single tap
    of 1 (no blur) for ``sigma`` below 0.25, also where ``sigma**2`` underflows."""
    side = 2 * int(round(2 * sigma)) + 1
    if side == 1:
        return (1.0,)
    coords = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    taps = torch.exp(-(coords**2) / (2 * sigma**2))
    return tuple((taps / taps.sum()).tolist())


def _check_blur_fits(sigma: float, map_size: tuple[int, int]) -> None:
    """Refuse, naming ``sigma``, a blur whose reflection padding ``round(2 sigma)`` reaches
    the smaller side of the ``map_size`` maps, from ``sigma`` alone: before
    :func:`gaussian_taps` builds a kernel of side ``2 round(2 sigma) + 1`` (4e7 taps for
    sigma=1e7; for sigma=1e300 more than torch can count)."""
    smallest = min(map_size)
    # beyond the map's side round(2 sigma) > smallest anyway (and 2 sigma may overflow)
    if sigma <= smallest and int(round(2 * sigma)) < smallest:
        return
    if sigma < 1e15:  # the side as an exact int
        side = f"side {2 * int(round(2 * sigma)) + 1}"
    else:
        about = 4 * sigma
        side = f"side about {about:.3g}" if math.isfinite(about) else "side about 4 sigma"
    raise ValueError(
        f"`sigma`={sigma:g} needs a blur of {side}, too large for the layer's "
        f"{map_size[0]} x {map_size[1]} maps; use a smaller sigma (or None)."
    )


def smooth_lambda(lam: Tensor, taps: tuple[float, ...] | None) -> Tensor:
    """Blur each channel of (N, C, h, w) ``lam`` with the separable Gaussian whose 1-D factor
    is ``taps`` (reflection padding): a weighted sum of shifted copies along the width, then
    along the height, which is the 2-D convolution with :func:`gaussian_kernel` and runs at
    the same speed in any dtype on any device (a grouped float64 convolution on a CPU takes
    torch's slow path)."""
    if taps is None:
        return lam
    pad = (len(taps) - 1) // 2
    padded = F.pad(lam, (pad, pad, pad, pad), mode="reflect")
    h, w = lam.shape[2:]
    across = sum(t * padded[..., j : j + w] for j, t in enumerate(taps))
    return sum(t * across[..., i : i + h, :] for i, t in enumerate(taps))


def smooth_log_keep(alpha: Tensor, taps: tuple[float, ...] | None) -> Tensor:
    """``log(1 - lambda)`` for ``lambda = smooth_lambda(sigmoid(alpha), taps)``, finite for any
    finite ``alpha``.

    ``1 - sigmoid(alpha) = sigmoid(-alpha)``, and the blur's weights sum to 1, so
    ``1 - lambda`` is the blur of ``sigmoid(-alpha)``, whose log is accurate while every
    ``sigmoid(-alpha)`` is a normal number of the dtype (``alpha`` up to about 708 in
    float64, 87 in float32, 9 in float16); beyond that the blur is taken in log space, a
    ``logsumexp`` over ``log tap + logsigmoid(-alpha)`` with the same shifts and reflection
    padding as :func:`smooth_lambda`. Without a blur it is ``logsigmoid(-alpha)``.
    ``log(1 - lambda)`` itself rounds to ``log 0 = -inf`` once ``sigmoid(alpha)`` rounds to
    1 (``alpha`` above about 37 in float64, 17 in float32, 8 in float16); this gives about
    ``-alpha`` there instead."""
    if taps is None:
        return F.logsigmoid(-alpha)
    keep = torch.sigmoid(-alpha)
    if not keep.numel() or bool(keep.detach().min() >= torch.finfo(keep.dtype).tiny):
        return torch.log(smooth_lambda(keep, taps))
    log_keep = F.logsigmoid(-alpha)
    pad = (len(taps) - 1) // 2
    padded = F.pad(log_keep, (pad, pad, pad, pad), mode="reflect")
    h, w = log_keep.shape[2:]
    weights = [(math.log(t), j) for j, t in enumerate(taps) if t > 0]
    across = torch.logsumexp(torch.stack([lt + padded[..., j : j + w] for lt, j in weights]), dim=0)
    return torch.logsumexp(
        torch.stack([lt + across[..., i : i + h, :] for lt, i in weights]), dim=0
    )


def bottleneck_capacity(
    activations: Tensor,
    lam: Tensor,
    mean: Tensor,
    std: Tensor,
    active: Tensor,
    log_keep: Tensor | None = None,
) -> Tensor:
    r"""Per-feature KL(P(Z|R) || N(mu, sigma^2)) in nats, zero on inactive features.

    With ``r = (R - mu) / sigma`` and ``Z = lam R + (1 - lam) eps``, ``eps ~ N(mu, sigma^2)``:
    ``KL = -1/2 (1 + log (1 - lam)^2 - (lam r)^2 - (1 - lam)^2)``.

    ``log_keep`` is ``log(1 - lam)`` when the caller has it in a stable form
    (:func:`smooth_log_keep`); without it, ``log1p(-lam)``, which is ``-inf`` once ``lam``
    rounds to 1. The log of the squared term is ``2 log_keep`` and the squared term
    ``exp(2 log_keep)``, so a finite ``log_keep`` gives a finite KL (about ``-log_keep``
    for ``lam`` near 1).
    """
    if log_keep is None:
        log_keep = torch.log1p(-lam)
    r_norm = (activations - mean) / std
    var_z = torch.exp(2 * log_keep)
    mu_z = r_norm * lam
    return -0.5 * (1 + 2 * log_keep - mu_z**2 - var_z) * active


def _check_upsample_input(first: Tensor) -> None:
    """``upsample_to_input=True`` resizes the (N, ., h, w) maps to the H x W of ``inputs[0]``,
    which must then be an image batch (N, C, H, W)."""
    if first.dim() == 4:
        return
    spatial = max(first.dim() - 2, 0)
    raise ValueError(
        "`upsample_to_input=True` resizes the maps to the height and width of `inputs[0]`, "
        f"which must be images (N, C, H, W); `inputs[0]` has shape {tuple(first.shape)} "
        f"({spatial} spatial dimension{'' if spatial == 1 else 's'}). Pass "
        "upsample_to_input=False and resize the (N, ., h, w) maps yourself: a signal's or a "
        "volume's maps with torch.nn.functional.interpolate, or an image that is not the "
        "model's first input with upsample_bits(maps, image.shape[-2:]) (bits and capacity) "
        "or interpolate (lambda)."
    )


def _folded(maps: Tensor, reshape_transform: Callable | None, n: int) -> Tensor:
    """Per-feature ``maps`` in the layer's layout as (N, C, h, w) through ``reshape_transform``."""
    if reshape_transform is None:
        return maps
    folded = reshape_transform(maps)
    if not isinstance(folded, Tensor) or folded.dim() != 4 or folded.shape[0] != n:
        shown = tuple(folded.shape) if isinstance(folded, Tensor) else type(folded).__name__
        raise ValueError(
            f"`reshape_transform` returned {shown} for the layer's {tuple(maps.shape)}; it "
            f"must return (N, C, h, w) with N = {n}."
        )
    return folded


def _warn_if_channels_last(
    shape: tuple[int, ...], input_shape: tuple[int, ...], transformed: bool = False
) -> None:
    """Warn that the layer's (N, d1, d2, d3) output looks like the (N, h, w, C) maps of a
    channels-last layer (a Swin stage, the inside of a ConvNeXt block after its permute),
    which LayerIBA reads as (N, C, h, w): the bits would then run over (w, C), the features,
    not the image. Detected as the CAMs detect it
    (:func:`~captum_ext.token_grid.looks_channels_last`: dims 1 and 2 keep the images' aspect
    ratio, dims 2 and 3 do not), a heuristic that a channels-first layer can also match (a
    spectrogram network pooling over frequency only), so only a warning, and none when the
    user's ``reshape_transform`` keeps the layer's shape (``lambda t: t`` declares it
    N x C x h x w). ``transformed``: ``shape`` is what ``reshape_transform`` returned."""
    if len(shape) != 4 or len(input_shape) != 4:
        return
    if not looks_channels_last(shape, tuple(input_shape[2:])):
        return
    if transformed:
        warnings.warn(
            f"LayerIBA: `reshape_transform` returned maps of shape {shape} for inputs of shape "
            f"{input_shape}, which looks like a channels-last grid ({shape[1]} x {shape[2]} "
            f"positions of {shape[3]} features): the maps would run over the features, not the "
            "image. It must return N x C x h x w; end it with `.permute(0, 3, 1, 2)`.",
            stacklevel=user_stacklevel(),
        )
        return
    warnings.warn(
        f"LayerIBA: `layer` outputs activations of shape {shape} for inputs of shape "
        f"{input_shape}, which looks like a channels-last grid ({shape[1]} x {shape[2]} "
        f"positions of {shape[3]} features, as a Swin transformer's stages give). LayerIBA "
        f"reads it as {shape[1]} channels of {shape[2]} x {shape[3]} maps; if it is "
        "channels-last, the bits run over the features, not the image: pass "
        "`reshape_transform=lambda t: t.permute(0, 3, 1, 2)` with `sigma=None` (the "
        "bottleneck then runs in the layer's own layout and the maps are folded to "
        "N x C x h x w), or explain a module whose output is N x C x h x w (torchvision's "
        "Swin: `permute`; a ConvNeXt block as a whole, not the layers inside it). If the "
        "layer is N x C x h x w, pass `reshape_transform=lambda t: t` to say so (no warning).",
        stacklevel=user_stacklevel(),
    )


def _sees_the_model(z_grad: Tensor | None, reshape_transform: Callable | None, n: int) -> bool:
    """Whether the model loss's gradient at the bottleneck (one step's, (N, n_noise, ...)) is
    non-zero at some entry that the maps show."""
    if z_grad is None:
        return False
    shown = _folded(z_grad.abs().sum(dim=1), reshape_transform, n)
    return bool(shown.ne(0).any())


def _warn_if_blind(saturated: bool) -> None:
    """Warn that the model's loss had exactly zero gradient at every bottleneck entry that the
    maps show, at every step of the optimisation: the bottleneck then traded nothing against
    the information cost, and the maps show only that cost (the prior), nothing the model
    uses. Two causes, told apart by the loss: it was exactly 0 on every example at every step
    (``saturated``), or it does not depend on the layer. A loss that is 0 at the first step
    only (a confident prediction, whose noisy copies become less confident as the
    bottleneck closes) is not blind and is not warned of."""
    if saturated:
        cause = (
            "the loss is exactly 0 on every example: the predictions are so confident that "
            "their cross-entropy underflows, even on the noisy copies (a `loss=` callable on "
            "the logits, such as the negative target logit, does not saturate)"
        )
    else:
        cause = (
            "the loss does not depend on the bottleneck. After a vision transformer's last "
            "block only the class token is read (use the block's first norm, "
            "`encoder.layers.encoder_layer_<last>.ln_1` in torchvision, `blocks[-1].norm1` in "
            "timm), and a freshly built torchvision ViT has an all-zero head (load trained "
            "weights). Nor does a layer that the model runs inside `torch.utils.checkpoint(..., "
            "use_reentrant=True)` or under `torch.no_grad()` get gradients: turn activation "
            "checkpointing off (or lift the `no_grad`) while explaining"
        )
    warnings.warn(
        "LayerIBA: the model loss's gradient at the bottleneck of `layer` is exactly zero at "
        f"every step, so the maps show only the information cost, nothing the model uses: {cause}.",
        stacklevel=user_stacklevel(),
    )


def _check_bits_finite(
    bits: Tensor, alpha: Tensor, init_alpha: float, lr: float, min_std: float
) -> None:
    """Refuse maps that overflow their dtype although every ``alpha`` is finite.

    A feature with ``alpha = a`` costs about ``softplus(a) / ln 2`` bits (``a / ln 2`` for a
    large ``a``), and a position sums them over the channels: an extreme ``init_alpha`` (or
    an ``lr`` that carries ``alpha`` far out) exceeds the largest value of the bottleneck's
    or the layer's dtype (65504 in float16). Otherwise the ``(lambda r)^2 / 2`` term
    overflowed: ``r = (R - mu) / sigma`` is huge where a feature's standard deviation is
    near 0 and ``min_std`` lets it through. A NaN ``alpha`` comes from the model's own
    non-finite outputs (warned of where the model runs) and is left to that warning."""
    if bool(torch.isfinite(bits).all()) or bool(alpha.isnan().any()) or not alpha.numel():
        return
    largest = float(alpha.abs().max())
    # the alpha cost of the most expensive position (the channels a map position sums)
    positions = bits.shape[-2] * bits.shape[-1] if bits.dim() == 4 else 1
    per_position = max(alpha[0].numel() // max(positions, 1), 1)
    cost = per_position * float(F.softplus(alpha.double().max())) / math.log(2)
    limit = torch.finfo(bits.dtype).max
    if cost >= limit / 4:
        raise ValueError(
            f"LayerIBA: the maps overflow {bits.dtype} (largest finite value {limit:g}): "
            f"`init_alpha`={init_alpha:g} (with `lr`={lr:g}, alpha reached |alpha| = "
            f"{largest:g}) makes each feature cost about alpha / ln 2 bits, summed over the "
            "channels of a position. Use a moderate `init_alpha` (the default 5 lets almost "
            "all of the layer through: sigmoid(5) = 0.993) and `lr`."
        )
    raise ValueError(
        f"LayerIBA: the maps overflow {bits.dtype} (largest finite value {limit:g}): the "
        "information cost (lambda r)^2 / 2 with r = (R - mu) / sigma is huge where a "
        f"feature's standard deviation is about 0 and `min_std`={min_std:g} lets it through. "
        "Use a larger `min_std` (default 0.01), or statistics estimated on data like the "
        "inputs explained."
    )


def _as_generators(generator: Any, n: int, device: torch.device) -> list | None:
    """None (the global generator), or one generator for the batch, or one per example."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return [generator]
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return [torch.Generator(device=device).manual_seed(int(generator))]
    if isinstance(generator, list | tuple):
        if len(generator) != n:
            wrapped = (
                " Inside NoiseTunnel, infidelity or sensitivity_max the inputs arrive repeated"
                " (N x samples) while a list of generators does not: give one generator (or"
                " int seed) for the batch there."
                if inside_expanding_wrapper()
                else ""
            )
            raise ValueError(
                f"`generator` holds {len(generator)} entries but `inputs` has {n} examples; "
                "give one generator (or int seed) per example, or a single one for the batch."
                + wrapped
            )
        out = []
        for item in generator:
            if isinstance(item, torch.Generator):
                out.append(item)
            elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
                out.append(torch.Generator(device=device).manual_seed(int(item)))
            else:
                raise TypeError(
                    "`generator` entries must be torch.Generator objects or int seeds, got "
                    f"{type(item).__name__}."
                )
        return out
    raise TypeError(
        "`generator` must be None, a torch.Generator, an int seed, or a list of those (one per "
        f"example), got {type(generator).__name__}."
    )


def standard_normal(
    shape: tuple[int, ...], generators: list | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """(N, K, *S) standard normal draws: from each example's generator in turn (one
    generator per example), or all at once from a single generator (or the global one)."""
    if generators is None:
        return torch.randn(shape, dtype=dtype, device=device)
    if len(generators) == 1:
        g = generators[0]
        return torch.randn(shape, generator=g, dtype=dtype, device=g.device).to(device)
    return torch.stack(
        [
            torch.randn(shape[1:], generator=g, dtype=dtype, device=g.device).to(device)
            for g in generators
        ]
    )


class LayerIBA(LayerAttribution, GradientAttribution):
    r"""IBA: how many bits of each feature of a layer the prediction needs (Per-Sample
    Bottleneck).

    The layer's activations ``R`` (C x h x w) are replaced by a noisy mix whose noise is
    learned per example, so that as little information as possible passes while the model
    still predicts the target:

    .. code-block:: text

        lambda = blur_sigma( sigmoid(alpha) )                alpha init 5, per feature
        Z      = active * ( lambda R + (1 - lambda) eps )    eps ~ N(mu, sigma^2)
                 (clamped at 0 with post_relu=True)
        r      = (R - mu) / sigma
        KL     = active * 1/2 [ (lambda r)^2 + (1 - lambda)^2 - 1 - 2 ln(1 - lambda) ]
        loss_n = mean_k CE(f(Z_nk), target_n) + beta * mean_features KL_n
        bits   = sum_channels KL / ln 2                      -> (N, 1, h, w)

    ``ln(1 - lambda)`` is taken as the log of the blur of ``sigmoid(-alpha)``
    (``= 1 - sigmoid(alpha)``; the blur in log space, a ``logsumexp``, where that
    underflows), so the KL stays finite for any ``alpha``: about ``alpha`` nats for a large
    one, where ``1 - sigmoid(alpha)`` itself rounds to 0 (``alpha`` above about 37 in
    float64, 17 in float32).

    ``mu``, ``sigma`` (at least ``min_std``) and the ``active`` mask (features non-zero in
    more than 1 % of the samples) are the layer's statistics from :meth:`estimate` (or given
    to the constructor / :meth:`set_statistics`). Each example has its own ``alpha``; the
    whole batch is optimised at once with Adam on the sum of the per-example losses, so each
    example follows the trajectory it would follow alone (unless a batch norm in train mode
    mixes the examples: a warning says so). ``n_noise`` noisy copies per
    example and step; the map is the capacity of the last evaluated step, as in the
    reference implementation (so ``steps`` loss evaluations make ``steps - 1`` Adam updates
    that count, and the last backward pass is skipped). Cost per example: one clean forward
    pass, then per step a forward pass of the ``n_noise`` copies and a backward pass from the
    loss down to the layer only; the layers before ``layer`` run once per example rather than
    once per copy when the rest of the model takes only the layer's output
    (``reuse_prefix``).

    Variants (Khakzar et al., MICCAI 2021): ``inverse=True`` swaps the roles,
    ``Z = lambda eps + (1 - lambda) R`` with loss ``-CE + beta KL``, which finds the regions
    whose removal destroys the prediction (the capacity keeps its formula in ``lambda``, as in
    the authors' code, so the bits then mark what is replaced by noise); ``loss="mse"``
    (Regression IBA) keeps the explained output close to its value on the clean input
    instead of the class's cross-entropy.

    Inside ``captum.metrics.sensitivity_max`` wrap the method so that it returns a tuple
    (Captum 0.9 iterates over a bare tensor's batch there). ``layer`` must be an eager module
    that runs once per forward pass, and not again in the backward pass: a model that
    recomputes it there (activation checkpointing, ``torch.utils.checkpoint``) is refused
    (RuntimeError); turn checkpointing off while explaining.

    Papers: Schulz, Sixt, Tombari, Landgraf, "Restricting the Flow: Information
    Bottlenecks for Attribution", ICLR 2020; Khakzar, Zhang, Mansour, et al., "Explaining
    COVID-19 and Thoracic Pathology Model Predictions by Identifying Informative Input
    Features", MICCAI 2021.

    Args:
        forward_func (Callable or nn.Module): the model, returning (N, C) logits.
        layer (nn.Module or str): the layer (N x C x h x w output), or its dotted name.
        device_ids (list[int], optional): as in Captum's layer methods.
        mean, std (Tensor, optional): per-feature statistics of the layer's output
            (shape C x h x w, or broadcastable to it), instead of :meth:`estimate`.
        active (Tensor, optional): bool mask of the features that carry information
            (default: all, when ``mean`` and ``std`` are given).

    Examples::

        >>> from captum_ext.attr import LayerIBA
        >>> iba = LayerIBA(model, "features.7")
        >>> iba.estimate(images)                      # mean, std, active mask of the layer
        >>> bits = iba.attribute(x, target=labels[:4], generator=0)
        >>> bits.shape                                # bits per 7 x 7 position
        torch.Size([4, 1, 7, 7])
        >>> bits.min() >= 0
        tensor(True)
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: Any,
        device_ids: list[int] | None = None,
        *,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        active: Tensor | None = None,
    ) -> None:
        layer = resolve_layer(forward_func, layer)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.active: Tensor | None = None
        self.n_estimated = 0
        # the module the statistics belong to: a `layer` assigned afterwards is refused until
        # they are estimated (or set) again
        self._statistics_layer: nn.Module | None = None
        if mean is not None or std is not None:
            self.set_statistics(mean, std, active)
        elif active is not None:
            raise ValueError("`active` was given without `mean` and `std`; pass all three.")

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def has_convergence_delta(self) -> bool:
        return False

    # ---------------------------------------------------------------- statistics

    def set_statistics(
        self, mean: Tensor | None, std: Tensor | None, active: Tensor | None = None
    ) -> None:
        """Set the per-feature mean, standard deviation and (optionally) active mask.

        Args:
            mean (Tensor): per-feature mean of the layer's output (C x h x w, or broadcastable).
            std (Tensor): per-feature standard deviation, non-negative, same shape rules.
            active (Tensor, optional): bool (or 0/1) mask of the features used; default all.
        """
        for name, value in (("mean", mean), ("std", std)):
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(
                    f"`{name}` must be a floating-point tensor of per-feature values, got "
                    f"{type(value).__name__}."
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"`{name}` contains NaN or infinite values.")
        if bool((std < 0).any()):
            raise ValueError("`std` must be non-negative.")
        try:
            shape = torch.broadcast_shapes(mean.shape, std.shape)
        except RuntimeError:
            raise ValueError(
                f"`mean` {tuple(mean.shape)} and `std` {tuple(std.shape)} do not broadcast."
            ) from None
        if active is None:
            active = torch.ones(shape, dtype=torch.bool, device=mean.device)
        elif not isinstance(active, Tensor):
            raise TypeError(f"`active` must be a tensor mask, got {type(active).__name__}.")
        elif active.dtype != torch.bool:
            if not bool(((active == 0) | (active == 1)).all()):
                raise ValueError("`active` must be a bool (or 0/1) mask.")
            active = active != 0
        self.mean, self.std, self.active = mean.detach(), std.detach(), active.detach()
        self._statistics_layer = self.layer

    @leaves_inference_mode
    def estimate(
        self,
        inputs_or_dataloader: Any,
        n_samples: int = 10_000,
        additional_forward_args: Any = None,
        *,
        active_threshold: float = 0.01,
        progress: bool = False,
    ) -> None:
        """Estimate the layer's per-feature mean, std and active mask from data.

        The model runs (without gradients) up to the layer only, except on the first batch,
        which runs through to check that the layer runs once per forward pass (a module
        reused has no single activation; a ``ValueError`` before any statistic is
        gathered, as :meth:`attribute` refuses it too); each batch's mean and
        centred sum of squares are merged into running ones (in float64, Chan et al.'s
        pairwise update) to give the mean and the unbiased standard deviation, and the share
        of samples in which a feature is non-zero gives the active mask (share >
        ``active_threshold``). The statistics belong to ``layer``: assigning another
        layer afterwards makes :meth:`attribute` ask for them again.

        Args:
            inputs_or_dataloader: a batch (tensor or tuple of tensors, examples first) or an
                iterable of batches (tensors, or tuples/lists whose first entry is the input,
                e.g. a ``DataLoader`` of ``(images, labels)``).
            n_samples (int): use at most this many examples (the first ones).
            additional_forward_args: passed to the model after the inputs (as in Captum).
            active_threshold (float): in [0, 1); a feature is active when non-zero in more
                than this share of the samples.
            progress (bool): show a progress bar over the examples.
        """
        n_samples = check_int(n_samples, "n_samples")
        threshold = check_number(
            active_threshold, "active_threshold", minimum=0, allow_minimum=True, maximum=1,
            allow_maximum=False,
        )  # fmt: skip
        if isinstance(inputs_or_dataloader, Tensor | tuple):
            batches: Iterable = [inputs_or_dataloader]
        elif isinstance(inputs_or_dataloader, Iterable):
            batches = inputs_or_dataloader
        else:
            raise TypeError(
                "`inputs_or_dataloader` must be a tensor, a tuple of tensors or an iterable of "
                f"batches, got {type(inputs_or_dataloader).__name__}."
            )
        model = root_module(self.forward_func)
        count, mean, m2, nonzero = 0, None, None, None
        bar = progress_bar(n_samples, progress, desc="LayerIBA.estimate", unit="examples")
        captured: list[Tensor] = []
        # the first batch runs the whole forward pass, to count the layer's calls: a layer
        # that runs twice (a module reused) has no single activation to estimate, and
        # `attribute` refuses it; the later batches stop at the layer
        probing = True

        def on_output(module, args, output):
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"`layer` ({type(module).__name__}) returns {type(output).__name__}, not "
                    "a tensor."
                )
            # a copy while the pass runs on: an in-place operation after the layer
            # (ReLU(inplace=True)) would otherwise change the recorded activations
            captured.append(output.detach().clone() if probing else output.detach())
            if not probing:
                raise _StopForward

        try:
            with (
                preserved_state([model, self.layer]),
                restored_buffers_of_modules_run(exclude=[model, self.layer]),
                torch.no_grad(),
                registered_hooks(call_hook(self.layer, on_output)),
            ):
                for batch in batches:
                    if count >= n_samples:
                        break
                    if isinstance(batch, list):
                        batch = tuple(batch)
                    if isinstance(batch, Mapping):
                        batch = dict_batch(batch, "inputs_or_dataloader")[0]
                    if isinstance(batch, tuple) and len(batch) and isinstance(batch[0], Tensor):
                        # (images, labels, ...) from a DataLoader: the first entry is the input
                        batch = batch[0] if not isinstance(inputs_or_dataloader, tuple) else batch
                    inputs = format_inputs(batch, argument="inputs_or_dataloader")
                    inputs = in_model_precision(self.forward_func, inputs)
                    rows = inputs[0].shape[0]
                    take = min(rows, n_samples - count)
                    inputs = tuple(t[:take] for t in inputs)
                    extra = repeat_per_example(
                        format_additional_forward_args(additional_forward_args),
                        rows,
                        1,
                        slice(0, take),
                    )
                    captured.clear()
                    try:
                        call_model(uncompiled(self.forward_func), inputs, extra)
                    except _StopForward:
                        pass
                    if not captured:
                        raise ValueError(
                            "`layer` did not run during the forward pass, so it has no "
                            "activations to estimate; pick a module that forward_func calls."
                        )
                    if len(captured) > 1:
                        raise ValueError(
                            f"`layer` ran {len(captured)} times in one forward pass; pick one "
                            "that runs once."
                        )
                    probing = False
                    acts = precise(captured[0])
                    if acts.shape[0] != take:
                        raise ValueError(
                            f"`layer` output has {acts.shape[0]} rows for {take} examples; "
                            "LayerIBA needs a layer whose output keeps the examples first."
                        )
                    # Chan et al.'s pairwise update: the batch's mean and centred sum of
                    # squares merged into the running ones (no cancellation when mean >> std)
                    batch_mean = acts.mean(0)
                    batch_m2 = (acts - batch_mean).square().sum(0)
                    if mean is None:
                        mean, m2 = batch_mean, batch_m2
                        nonzero = (acts != 0).sum(0).to(acts.dtype)
                    elif acts.shape[1:] != mean.shape:
                        raise ValueError(
                            f"`layer` output changed shape between batches: "
                            f"{tuple(mean.shape)} then {tuple(acts.shape[1:])}."
                        )
                    else:
                        merged = count + take
                        delta = batch_mean - mean
                        mean = mean + delta * (take / merged)
                        m2 = m2 + batch_m2 + delta.square() * (count * take / merged)
                        nonzero += (acts != 0).sum(0)
                    count += take
                    if bar:
                        bar.update(take)
        finally:
            if bar:
                bar.close()
        if count < 2:
            raise ValueError(
                f"`inputs_or_dataloader` gave {count} example(s); estimating a standard "
                "deviation needs at least 2 (the reference recommends 10,000)."
            )
        variance = m2 / (count - 1)
        dtype = captured[0].dtype
        self.mean = mean.to(dtype)
        self.std = variance.sqrt().to(dtype)
        self.active = nonzero / count > threshold
        self.n_estimated = count
        self._statistics_layer = self.layer

    # ---------------------------------------------------------------- attribution

    @log_usage()
    @leaves_inference_mode
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
        *,
        beta: float = 10.0,
        steps: int = 10,
        lr: float = 1.0,
        n_noise: int = 10,
        sigma: float | None = 1.0,
        init_alpha: float = 5.0,
        min_std: float = 0.01,
        post_relu: bool = False,
        inverse: bool = False,
        loss: str | Callable | None = None,
        return_type: str = "bits",
        upsample_to_input: bool = False,
        generator: Any = None,
        reuse_prefix: bool = True,
        bottleneck_dtype: torch.dtype | str = "auto",
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        r"""Per-example IBA maps of ``inputs`` for the class in ``target``.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): a batch, examples first.
            target (int, list, Tensor or None): the class explained, in Captum's forms
                (one per example); None explains the predicted class of (N, C) outputs,
                for a callable ``loss`` too (the columns it gets are then the predicted
                classes), and the single output of a one-output model; ``loss="mse"`` on
                a model with several outputs, and any output with more than two
                dimensions, need ``target``.
            additional_forward_args: passed to the model after the inputs; tensors whose
                first dimension is N, also inside tuples, lists, mappings and dataclasses,
                are repeated with the noisy copies (a table shared by all examples with N
                rows too: bind it in a closure instead).
            beta (float): weight of the information loss (>= 0); larger gives fewer bits.
            steps (int): loss evaluations; the map is the capacity at the last one.
            lr (float): Adam's learning rate.
            n_noise (int): noisy copies of each example per step.
            sigma (float or None): standard deviation of the Gaussian blur of
                ``sigmoid(alpha)`` (kernel side ``2 round(2 sigma) + 1``, reflection
                padding); None or 0 for no blur (as is any sigma below 0.25, whose kernel
                is a single tap).
            init_alpha (float): initial value of every ``alpha``: any finite number that
                ``bottleneck_dtype`` holds (else a ValueError). A large one keeps the
                maps finite (a feature with ``alpha = a`` costs about ``a / ln 2`` bits),
                but maps whose bits exceed the layer's dtype (65504 in float16; a
                position sums its channels) are refused with a ValueError naming
                ``init_alpha``.
            min_std (float): lower bound on the feature standard deviations, > 0 (features
                that never vary, e.g. dead ReLU channels, have std 0) and neither 0 nor
                inf in the layer's dtype (else a ValueError). Maps that overflow the
                layer's dtype because a tiny ``min_std`` makes ``(R - mu) / sigma`` huge
                are refused with a ValueError naming ``min_std``.
            post_relu (bool): clamp ``Z`` at 0 (for a layer followed by, or ending in, ReLU).
            inverse (bool): Inverse IBA: ``Z = lambda eps + (1 - lambda) R``, loss negated.
            loss (str, Callable or None): the model loss per noisy copy.
                None / "cross_entropy": ``-log softmax(f(Z))[target]``. "mse" (Regression
                IBA): ``(f(Z)[target] - f(R)[target])^2`` with ``f(R)`` the output on the
                clean input. A callable gets ``(output, clean_output, target)``: the
                (N * n_noise, ...) outputs on the noisy copies, the clean outputs repeated
                per copy and the (N * n_noise,) target columns of ``output.flatten(1)``,
                and returns the (N * n_noise,) losses.
            return_type (str): "bits" (N, 1, h, w): bits per position, summed over channels;
                "capacity" (N, C, h, w): bits per feature; "lambda" (N, C, h, w): the
                blurred ``sigmoid(alpha)``.
            upsample_to_input (bool): resize to the input's H x W; bits and capacity with
                :func:`upsample_bits` (each map keeps its total), lambda bilinearly. The size
                is read from ``inputs[0]``, which must then be images (N, C, H, W): other
                shapes (a 1-D signal (N, C, L), a volume, a model whose image is not its
                first input) are refused with a ``ValueError`` before the optimisation;
                resize their maps yourself. Default: False.
            generator (torch.Generator, int, list or None): the noise source: one generator
                (or seed) for the batch, a list of one per example (each example's noise
                then comes from its own generator, so a batch equals its examples explained
                one by one with the same seeds), or None for torch's global generator. A
                model in train mode runs its own dropout from torch's global generator
                whatever this is: put it in eval mode for maps that repeat. A batch norm
                in train mode normalises the N x ``n_noise`` noisy copies with their joint
                statistics, so each example's map then depends on the rest of the batch
                (a warning says so): put the model in eval mode there too.
            reuse_prefix (bool): run the layers before ``layer`` on the N examples rather
                than on the N * n_noise copies, when the rest of the model takes only the
                layer's output (tried on the first step; otherwise, and with False, every
                copy runs through the whole model as in the reference). The maps are the
                same either way; only the time differs.
            bottleneck_dtype (torch.dtype or str): the dtype of the bottleneck's own
                arithmetic: ``alpha`` and its Adam state, ``lambda`` and the capacity (the
                noise and the mix ``Z``, the large tensors, stay in the layer's dtype, so a
                seed gives the same draws either way). "auto": float64 (float32 on devices
                without float64, such as MPS), so that the maps of a float32 model carry
                only the model's own rounding: on a random resnet18 at ``layer2`` the
                float32 maps then agree with the reference implementation's float32 maps
                to 8.0e-6 bits instead of 1.5e-5 (``benchmarks/RESULTS.md``), for 0.95-1.23x
                the time. ``torch.float32`` (or the layer's dtype) does the arithmetic as the
                reference does.
            reshape_transform (Callable, optional): for a layer whose output is not
                N x C x h x w, such as a vision transformer's (N, tokens, D): maps a tensor of
                the layer's output shape to (N, C, h, w), e.g. drop the class token and fold
                the patch tokens into their grid (the callable the CAM classes take). The
                bottleneck then runs in the layer's own layout (one ``alpha``, mean and
                standard deviation per token feature, every token included) without a blur,
                so ``sigma`` must be None; the capacity or lambda is folded into maps at the
                end. A 4-D output is read as (N, C, h, w) without it, with a UserWarning
                when it looks like a channels-last (N, h, w, C) one (a Swin stage: its
                h x w keep the images' aspect ratio, its w x C do not): if it is, pass
                ``lambda t: t.permute(0, 3, 1, 2)`` here. A given ``reshape_transform`` is
                taken as the layout (``lambda t: t`` for an N x C x h x w layer: no
                warning).
                Default: None (the layer must output N x C x h x w).

        Returns:
            Tensor: (N, 1, h, w) bits by default (see ``return_type``), in the layer's dtype.

        Example (a vision transformer, its patch tokens folded as for the CAMs)::

            >>> from torchvision.models import VisionTransformer
            >>> from captum_ext.attr import LayerIBA
            >>> vit = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16,
            ...                         mlp_dim=32, num_classes=5).eval()
            >>> _ = torch.nn.init.normal_(vit.heads.head.weight)  # a fresh one's head is 0
            >>> fold = lambda t: t[:, 1:].reshape(len(t), 4, 4, -1).permute(0, 3, 1, 2)
            >>> iba = LayerIBA(vit, "encoder.layers.encoder_layer_1.ln_1")
            >>> iba.estimate(torch.randn(16, 3, 32, 32))
            >>> bits = iba.attribute(torch.randn(2, 3, 32, 32), target=[0, 1], sigma=None,
            ...                      reshape_transform=fold)
            >>> tuple(bits.shape)
            (2, 1, 4, 4)
        """
        beta = check_number(beta, "beta", minimum=0, allow_minimum=True)
        steps = check_int(steps, "steps")
        lr = check_number(lr, "lr")
        n_noise = check_int(n_noise, "n_noise")
        if sigma is not None:
            sigma = check_number(sigma, "sigma", minimum=0, allow_minimum=True) or None
        init_alpha = check_number(init_alpha, "init_alpha", minimum=None)
        # > 0: a dead feature's std of 0 would divide by zero (all-NaN maps)
        min_std = check_number(min_std, "min_std", minimum=0)
        # numpy's bools pass too, as plain bools
        post_relu = check_flag(post_relu, "post_relu")
        inverse = check_flag(inverse, "inverse")
        upsample_to_input = check_flag(upsample_to_input, "upsample_to_input")
        reuse_prefix = check_flag(reuse_prefix, "reuse_prefix")
        if return_type not in RETURN_TYPES:
            raise ValueError(f"`return_type`={return_type!r}: expected one of {RETURN_TYPES}.")
        if loss is None:
            loss = "cross_entropy"
        if not callable(loss) and loss not in LOSSES:
            raise ValueError(f"`loss`={loss!r}: expected one of {LOSSES} or a callable.")
        if not (
            bottleneck_dtype == "auto"
            or (isinstance(bottleneck_dtype, torch.dtype) and bottleneck_dtype.is_floating_point)
        ):
            raise TypeError(
                "`bottleneck_dtype` must be 'auto' or a floating-point torch.dtype, got "
                f"{bottleneck_dtype!r}."
            )
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError(
                "`reshape_transform` must be callable (the layer's output -> N x C x h x w)."
            )
        if self.mean is None:
            raise ValueError(
                "LayerIBA needs the layer's feature statistics: call `estimate(data)` first, or "
                "pass `mean` and `std` to the constructor or to `set_statistics`."
            )
        self._check_statistics_layer()
        formatted = in_model_precision(self.forward_func, format_inputs(inputs))
        if upsample_to_input:  # before the optimisation, not as upsample_bits' `size` error
            _check_upsample_input(formatted[0])
        model = root_module(self.forward_func)
        if _training_batch_norms(model):
            warnings.warn(
                "LayerIBA: a batch norm of the model normalises with the batch's statistics (it "
                "is in train mode, or built with track_running_stats=False), so the N x n_noise "
                "noisy copies are normalised together: each example's map then depends on the "
                "other examples of the batch and differs from its map explained alone. Call "
                "model.eval() first (explanations are meant for the model as it predicts), or, "
                "for a batch norm without running statistics, explain one example per call.",
                stacklevel=user_stacklevel(),
            )
        with (
            preserved_state([model, self.layer]),
            restored_buffers_of_modules_run(exclude=[model, self.layer]),
        ):
            result = self._optimise(
                formatted, target, additional_forward_args, beta, steps, lr, n_noise, sigma,
                init_alpha, min_std, post_relu, inverse, loss, return_type, generator,
                reuse_prefix, bottleneck_dtype, reshape_transform,
            )  # fmt: skip
        if upsample_to_input:
            size = tuple(formatted[0].shape[2:])
            if return_type == "lambda":
                result = upsample_maps(result, size, "bilinear")
            else:
                result = upsample_bits(result, size)
        return result

    def _clean_pass(self, inputs, additional_forward_args, allow_multidim):
        captured: list[Tensor] = []

        def on_output(module, args, output):
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"`layer` ({type(module).__name__}) returns {type(output).__name__}, not "
                    "a tensor; LayerIBA needs an N x C x h x w tensor output."
                )
            # a copy: an in-place operation after the layer (ReLU(inplace=True)) would
            # otherwise change the recorded activations
            captured.append(output.detach().clone())

        with (
            torch.no_grad(),
            registered_hooks(call_hook(self.layer, on_output)),
        ):
            output = run_forward(
                self.forward_func,
                inputs,
                additional_forward_args,
                allow_multidim=allow_multidim,
                takes_output_transform=False,
            )
        if len(captured) != 1:
            raise ValueError(
                "`layer` did not run during the forward pass; pick a module that forward_func "
                "calls."
                if not captured
                else f"`layer` ran {len(captured)} times in one forward pass; pick one that "
                "runs once."
            )
        return captured[0], output.detach()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a LayerIBA pickled before the statistics' layer was recorded: they belong to the
        # layer it had then (read now, once; not to whatever `layer` is at a later call)
        state = dict(state)
        if "_statistics_layer" not in state:
            has = state.get("mean") is not None
            state["_statistics_layer"] = state.get("layer") if has else None
        self.__dict__.update(state)

    def _check_statistics_layer(self) -> None:
        """Refuse statistics estimated on another module than ``layer`` (a layer assigned
        after :meth:`estimate`: the same shape would otherwise pass unnoticed)."""
        estimated_on = self._statistics_layer
        if estimated_on is None or estimated_on is self.layer:
            return
        model = root_module(self.forward_func)
        names = {id(m): n for n, m in model.named_modules()} if model is not None else {}

        def label(module: Any) -> str:
            if isinstance(module, nn.Module):
                return repr(names.get(id(module), type(module).__name__))
            return repr(module)

        raise ValueError(
            f"LayerIBA: the statistics (`mean`, `std`, `active`) were estimated on the layer "
            f"{label(estimated_on)}, but `layer` is now {label(self.layer)}; call "
            "`estimate(data)` again for this layer (or give its statistics to "
            "`set_statistics`)."
        )

    def _statistics_for(self, activations: Tensor, min_std: float):
        shape = tuple(activations.shape[1:])
        stats = []
        for name, value in (("mean", self.mean), ("std", self.std), ("active", self.active)):
            try:
                fits = torch.broadcast_shapes(value.shape, shape) == torch.Size(shape)
            except RuntimeError:
                fits = False
            if not fits or value.dim() > len(shape):
                raise ValueError(
                    f"the stored `{name}` has shape {tuple(value.shape)}, but `layer` outputs "
                    f"{shape} features per example; estimate the statistics on inputs of this "
                    "size (or pass matching ones)."
                )
            stats.append(value.to(device=activations.device, dtype=activations.dtype))
        mean, std, active = stats
        held = float(torch.tensor(min_std, dtype=std.dtype))
        if held == 0 or not math.isfinite(held):
            raise ValueError(
                f"`min_std`={min_std:g} rounds to {held:g} in the layer's dtype {std.dtype}; "
                "a feature standard deviation must be positive and finite there (the default "
                "0.01 suits activations of order 1)."
            )
        std = torch.clamp(std, min=min_std)
        return mean, std, active

    def _optimise(
        self, inputs, target, additional_forward_args, beta, steps, lr, n_noise, sigma,
        init_alpha, min_std, post_relu, inverse, loss, return_type, generator, reuse_prefix,
        bottleneck_dtype, reshape_transform,
    ) -> Tensor:  # fmt: skip
        classification = loss == "cross_entropy"
        activations, clean = self._clean_pass(
            inputs, additional_forward_args, allow_multidim=not classification
        )
        shape = tuple(activations.shape)
        if not activations.is_floating_point() or activations.dim() < 2:
            raise ValueError(
                f"`layer` outputs a {activations.dtype} tensor of shape {shape}; LayerIBA needs "
                "floating-point activations with the examples first."
            )
        if reshape_transform is None and activations.dim() != 4:
            raise ValueError(
                f"`layer` outputs activations of shape {shape}, not N x C x h x w; pass "
                "`reshape_transform` mapping them to (N, C, h, w) (for a vision transformer's "
                "(N, tokens, D): drop the class token and fold the rest into the patch grid)."
            )
        if reshape_transform is not None and sigma is not None:
            raise ValueError(
                f"`sigma`={sigma:g} blurs lambda over an h x w grid, which the layer's own "
                f"layout {shape} is not; with `reshape_transform` pass sigma=None."
            )
        n = inputs[0].shape[0]
        if activations.shape[0] != n:
            raise ValueError(
                f"`layer` output has {activations.shape[0]} rows for {n} examples; LayerIBA "
                "needs a layer whose output keeps the examples first."
            )
        if reshape_transform is None:
            _warn_if_channels_last(shape, tuple(inputs[0].shape))
        else:  # its shape checked before optimising
            folded = tuple(_folded(activations, reshape_transform, n).shape)
            if folded != tuple(activations.shape):  # `lambda t: t` declares the layout; a
                # fold that still looks channels-last forgot its permute (tokens reshaped
                # to N x h x w x D)
                _warn_if_channels_last(folded, tuple(inputs[0].shape), transformed=True)
        layer_dtype = activations.dtype
        if bottleneck_dtype == "auto":
            bottleneck_dtype = precise_dtype(activations.device)
        kernel = None
        if sigma is not None:
            _check_blur_fits(sigma, tuple(activations.shape[2:]))
            kernel = gaussian_taps(sigma)
        mean, std, active = self._statistics_for(activations, min_std)
        # the mix Z is formed in the layer's dtype (the model rounds it to that anyway, and
        # the N x n_noise copies are the large tensors); the capacity in bottleneck_dtype
        expanded, noise_mean, noise_std = activations.unsqueeze(1), mean, std
        activations = activations.to(bottleneck_dtype)
        mean, std = mean.to(bottleneck_dtype), std.to(bottleneck_dtype)
        columns = self._columns(target, clean, loss)
        generators = _as_generators(generator, n, activations.device)
        repeated_inputs = tuple(x.repeat_interleave(n_noise, dim=0) for x in inputs)
        extra = repeat_per_example(
            format_additional_forward_args(additional_forward_args), n, n_noise
        )
        extra_once = format_additional_forward_args(additional_forward_args)
        # None: try once whether the layers before `layer` can run once per example
        shared = None if reuse_prefix and n_noise > 1 else False
        copy_columns = columns.repeat_interleave(n_noise)
        clean_copies = clean.repeat_interleave(n_noise, dim=0)
        if not math.isfinite(float(torch.tensor(init_alpha, dtype=bottleneck_dtype))):
            raise ValueError(
                f"`init_alpha`={init_alpha:g} is beyond the range of the bottleneck's dtype "
                f"{bottleneck_dtype} (largest {torch.finfo(bottleneck_dtype).max:g}); use a "
                "moderate value (default 5: lambda = sigmoid(5) = 0.993 lets almost all of "
                "the layer through) or a wider `bottleneck_dtype`."
            )
        alpha = torch.full_like(activations, init_alpha).requires_grad_(True)
        optimizer = torch.optim.Adam([alpha], lr=lr)
        noise_shape = (n, n_noise, *activations.shape[1:])
        state: dict[str, Tensor] = {}
        # whether the model loss's gradient at the bottleneck was zero at every step so far
        # (and the loss itself 0 on every example): warned of after the loop, since a
        # confident model whose loss underflows at the first step sees the bottleneck once
        # its noisy copies are less certain
        blind, saturated = steps > 1, True

        def substitute(module, args, output):
            if _in_backward_pass():
                raise RuntimeError(
                    "LayerIBA: `layer` ran again during the backward pass: the model "
                    "recomputes it there (activation checkpointing, torch.utils.checkpoint), "
                    "and the recomputation cannot take the bottleneck's N x n_noise noisy "
                    "copies in place of its output. Turn checkpointing off while explaining "
                    "(e.g. timm's model.set_grad_checkpointing(False), Hugging Face's "
                    "model.gradient_checkpointing_disable())."
                )
            if not isinstance(output, Tensor) or output.shape[1:] != activations.shape[1:]:
                raise ValueError(
                    "`layer` produced a different output on the noisy copies than on the clean "
                    "inputs; LayerIBA needs a layer that runs once with N x C x h x w output."
                )
            # a copy per forward pass: an in-place op after the layer (ReLU(inplace=True))
            # would otherwise change the noisy copies that a retried forward pass reads
            return state["z"].clone()

        with gradients_on():
            for step in range(steps):
                lam = smooth_lambda(torch.sigmoid(alpha), kernel)
                log_keep = smooth_log_keep(alpha, kernel)  # log(1 - lam), finite
                capacity = bottleneck_capacity(activations, lam, mean, std, active, log_keep)
                if step == steps - 1:
                    break  # the map is this step's capacity; its update would be unused
                eps = standard_normal(noise_shape, generators, layer_dtype, alpha.device)
                eps = noise_std * eps + noise_mean
                lam_k = lam.unsqueeze(1).to(layer_dtype)
                if inverse:
                    z = lam_k * eps + (1 - lam_k) * expanded
                else:
                    z = lam_k * expanded + (1 - lam_k) * eps
                z = z * active
                if post_relu:
                    z = torch.clamp(z, 0.0)
                if blind:  # the model loss's gradient at the bottleneck, for free
                    z.register_hook(lambda g: state.__setitem__("z_grad", g.detach()))
                state["z"] = z.flatten(0, 1)
                # registered through the backward pass too: a model that recomputes `layer`
                # there (activation checkpointing) is named by the hook, not by torch's
                # "Recomputed values ... have different metadata"
                with registered_hooks(call_hook(self.layer, substitute)):
                    output = None
                    if shared is not False:
                        output = self._shared_prefix_forward(
                            inputs, extra_once, n * n_noise, classification
                        )
                        shared = output is not None
                    if output is None:
                        output = run_forward(
                            self.forward_func,
                            repeated_inputs,
                            extra,
                            allow_multidim=not classification,
                            takes_output_transform=False,
                        )
                    model_loss = self._model_loss(output, clean_copies, copy_columns, loss, n)
                    model_loss = model_loss.view(n, n_noise).mean(dim=1)
                    information = capacity.flatten(1).mean(dim=1)
                    per_example = (-model_loss if inverse else model_loss) + beta * information
                    (grad,) = objective_gradients(per_example.sum(), [alpha])
                if blind:
                    blind = not _sees_the_model(state.get("z_grad"), reshape_transform, n)
                    saturated = saturated and bool((model_loss.detach() == 0).all())
                alpha.grad = grad
                optimiser_step(optimizer)
                state.clear()
        if blind:  # (a callable loss that is exactly 0 does not depend on the bottleneck)
            _warn_if_blind(saturated and classification)
        if return_type == "lambda":
            return _folded(lam.detach(), reshape_transform, n).to(layer_dtype)
        bits = _folded(capacity.detach() / math.log(2), reshape_transform, n)
        if return_type == "capacity":
            result = bits.to(layer_dtype)
        else:
            result = bits.sum(dim=1, keepdim=True).to(layer_dtype)
        _check_bits_finite(result, alpha.detach(), init_alpha, lr, min_std)
        return result

    def _shared_prefix_forward(self, inputs, extra, rows, classification) -> Tensor | None:
        """The model's output when it runs on the N examples and the layer's output is
        replaced by the N * n_noise noisy copies; None when the model does not allow it.

        The layers before ``layer`` then run once per example instead of once per copy.
        This holds when the rest of the model takes only the layer's output (a sequential
        stack, a whole ResNet stage); a skip connection or concatenation across the layer
        fails on the mismatched batch (or returns the wrong number of rows) and the caller
        runs the copies through the whole model instead, as the reference does. A size-1
        batch that broadcasts against the copies is harmless: every copy shares the example.
        """
        try:
            output = uncompiled(self.forward_func)(*inputs, *extra)
        except OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - any failure means: run the copies in full
            return None
        if (
            not isinstance(output, Tensor)
            or output.dim() < 1
            or output.shape[0] != rows
            or (classification and output.dim() != 2)
        ):
            return None
        return output

    @staticmethod
    def _columns(target: Any, clean: Tensor, loss: Any) -> Tensor:
        output = clean.unsqueeze(1) if clean.dim() == 1 else clean
        if target is None and output.flatten(1).shape[1] == 1:
            # a one-output model: its single output (the prediction of a regression model)
            return torch.zeros(output.shape[0], dtype=torch.long, device=output.device)
        if target is None and loss == "mse":
            raise ValueError(
                "`target` is required for a regression loss on a model with "
                f"{output.flatten(1).shape[1]} outputs per example: name the output "
                "explained."
            )
        # None: the predicted class of (N, C) outputs, for a callable loss too (an output of
        # more dimensions needs `target`, which output_selection says)
        columns, multi = output_selection(target, output, argument="target", default="predicted")
        # an (N, 1) target names one class per example, as (N,) does (as in FinerCAM)
        if multi and columns.shape[1] != 1:
            raise ValueError(
                "`target` must name one class per example for LayerIBA (one map per example); "
                "call attribute once per class for several."
            )
        return columns[:, 0]

    @staticmethod
    def _model_loss(output: Tensor, clean: Tensor, columns: Tensor, loss: Any, n: int) -> Tensor:
        rows = torch.arange(columns.shape[0], device=columns.device)
        if loss == "cross_entropy":
            return -torch.log_softmax(output, dim=1)[rows, columns]
        if loss == "mse":
            flat = output.reshape(output.shape[0], -1)
            reference = clean.reshape(clean.shape[0], -1)
            return (flat[rows, columns] - reference[rows, columns]) ** 2
        values = loss(output, clean, columns)
        if not isinstance(values, Tensor) or values.shape != (columns.shape[0],):
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"`loss` must return one loss per noisy copy, shape ({columns.shape[0]},), got "
                f"{got}."
            )
        return values
