r"""TIE: out-of-distribution detection by training, inversion and exclusion.

Suhail, Sethi et al., "TIE: A Training-Inversion-Exclusion Framework" (arXiv 2512.00229) and
"Network Inversion for Uncertainty-Aware Out-of-Distribution Detection" (arXiv 2505.23448).
An ``n``-class classifier gets an extra "garbage" class ``n``; a conditioned generator trained
against the classifier (network inversion) produces the images the classifier believes in,
and those it is uncertain about are added to the garbage class, epoch after epoch, so that
the classifier learns to put what it has not seen into the garbage class, without any real
out-of-distribution data.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from captum.log import log_usage
from torch import Tensor, nn

from captum_ext._utils.caller import user_stacklevel
from captum_ext._utils.deprecation import renamed_arguments
from captum_ext._utils.distributed import (
    broadcast_buffers,
    checked_on_every_rank,
    raise_if_any_rank_failed,
    tensor_fingerprint,
    written_on_main_process,
)
from captum_ext._utils.layers import uncompiled
from captum_ext._utils.legacy_norms import copied_model, is_legacy_norm_hook
from captum_ext._utils.model_state import gradients_on, leaves_inference_mode, preserved_state
from captum_ext._utils.precision import (
    at_least_float32,
    has_float64,
    precise,
    precise_dtype,
    share,
)
from captum_ext._utils.seeding import as_generator, seeded_rng
from captum_ext._utils.training import (
    distributed_shard,
    load_checkpoint,
    load_fitting_state,
    optimiser_step,
    progress_bar,
    save_checkpoint,
    unwrap_distributed,
    wrap_distributed,
    writable_path_argument,
)
from captum_ext._utils.validation import (
    check_int,
    check_rows_sum_to_one,
    is_real,
    model_device_dtype,
    refuse_ignored_settings,
)
from captum_ext.inversion._checkpointing import inversion_state, restore_inversion, rng_devices
from captum_ext.inversion._features import count_classes, final_linear, head_already_checked
from captum_ext.inversion.generator import ConditionedGenerator, check_value_range
from captum_ext.inversion.network_inversion import NetworkInversion
from captum_ext.inversion.tie_config import GARBAGE_NOISE_KINDS, TIE_BASELINES, TIEConfig

__all__ = [
    "BASELINES",
    "GARBAGE_NOISE_KINDS",
    "OOD_SCORE_KINDS",
    "TIE",
    "TIEConfig",
    "TIEPrediction",
    "TIE_BASELINES",
    "pen_strokes",
    "pixel_range_noise",
    "transformed_inputs",
    "uncertainty_ue",
]

#: Former name of :data:`~captum_ext.inversion.tie_config.TIE_BASELINES` (the values of
#: ``TIEConfig.baseline``).
BASELINES: tuple[str, ...] = TIE_BASELINES

#: The kinds of :meth:`TIE.ood_score`: ``"max_in"`` (``1 - max_{c < n} p_c``), ``"ue"``
#: (:func:`uncertainty_ue` of the ``n + 1`` probabilities) and ``"garbage"`` (``p_n``).
OOD_SCORE_KINDS: tuple[str, ...] = ("max_in", "ue", "garbage")

#: the TIEConfig fields that name the settings of TIE's inner NetworkInversion
_INVERSION_SETTING_NAMES = {
    "steps": "generator_steps",
    "lr": "generator_lr",
    "betas": "betas",
    "seed": "seed",
    "batch_size": "generator_batch_size",
}


def _recorded_config(config: Any) -> dict[str, Any]:
    """A TIEConfig as plain values a ``weights_only`` checkpoint holds (tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        if isinstance(value, Mapping):
            return {str(key): plain(item) for key, item in value.items()}
        if hasattr(value, "item") and not isinstance(value, str):  # numpy / 0-d tensor values:
            return value.item()  # a weights_only load refuses numpy scalars
        return value

    return {field.name: plain(getattr(config, field.name)) for field in dataclasses.fields(config)}


_FORMAT = "captum_ext.TIE/1"
_CHECKPOINT_KEYS = (
    "num_classes",
    "baseline",
    "threshold",
    "world_size",
    "epoch",
    "stopped",
    "fit_epoch",
    "fit_epochs",
    "fit_start",
    "classifier",
    "optimizer",
    "inversion",
    "pool",
    "log",
)
_LOG_KEYS = (
    "epoch",
    "loss",
    "accuracy",
    "garbage_accuracy",
    "generator_loss",
    "label_consistency",
    "sampled",
    "excluded",
    "excluded_fraction",
    "mean_ue",
    "pool_size",
)


def _seed_of(seed: int, stream: int, epoch: int, rank: int = 0) -> int:
    """An independent seed per (seed, stream, epoch, rank)."""
    return (seed * 1_000_003 + stream * 104_729 + epoch * 7_919 + rank * 31 + 98_765) % (2**63)


@log_usage()
def uncertainty_ue(probs: Tensor) -> Tensor:
    r"""The uncertainty score UE of TIE: how far a probability vector is from a one-hot one.

    .. code-block:: text

        UE(p) = 1 - sum_i (p_i - 1/K)^2 / sum_i (onehot_k,i - 1/K)^2,   k = argmax p
              = 1 - K / (K - 1) * sum_i (p_i - 1/K)^2

    (the denominator is ``(K - 1) / K`` whatever ``k``). ``UE = 1`` for the uniform vector
    (most uncertain) and ``0`` for a one-hot vector (certain); it lies in ``[0, 1]``.

    From Suhail, Sethi et al., "TIE: A Training-Inversion-Exclusion Framework" (arXiv
    2512.00229), where inverted samples with ``UE > 0.5`` are excluded into the garbage class.

    Args:
        probs (Tensor): ``N x K`` probabilities (rows non-negative, summing to 1 within
            the tolerance of :func:`~captum_ext.metrics.expected_calibration_error`, which
            takes float16 and bfloat16 softmaxes; ``K >= 2``), e.g. ``model(x).softmax(1)``.

    Returns:
        Tensor: ``(N,)`` UE scores in ``[0, 1]``, dtype and device of ``probs``.

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import uncertainty_ue
        >>> uncertainty_ue(torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]))
        tensor([1., 0.])
    """
    if not isinstance(probs, Tensor):
        raise TypeError(f"`probs` must be a torch.Tensor, got {type(probs).__name__}.")
    if not probs.is_floating_point():
        raise TypeError(f"`probs` must be a floating point tensor, got dtype {probs.dtype}.")
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise ValueError(f"`probs` must have shape (N, K) with K >= 2, got {tuple(probs.shape)}.")
    if probs.numel():
        if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
            raise ValueError("`probs` must hold finite non-negative probabilities.")
        # the row-sum check of expected_calibration_error, so that both take and refuse the
        # same rows (a bfloat16 softmax misses 1 by up to about 3e-3, per-class sigmoids by
        # far more); it sums in float64, on the CPU where the device has none
        rows = probs if has_float64(probs.device) else probs.cpu()
        check_rows_sum_to_one(rows, "probs")
    k = probs.shape[1]
    # UE = K / (K - 1) (1 - sum p^2), and 1 - sum p^2 = eps (1 + p_k) - sum_{i != k} p_i^2 with
    # eps = sum_{i != k} p_i = 1 - p_k summed from the other classes: a confident row's UE is
    # about 2 eps K / (K - 1), where the direct form cancels to exactly 0
    top = probs.argmax(1, keepdim=True)
    others = probs.scatter(1, top, 0.0)
    eps = others.sum(1)
    spread = eps * (1.0 + probs.gather(1, top)[:, 0]) - others.square().sum(1)
    return (spread * (k / (k - 1))).clamp(0.0, 1.0)


def _image_shape(shape: Any) -> tuple[int, int, int]:
    """``shape`` checked to be (C, H, W) of positive ints."""
    if (
        not isinstance(shape, Sequence)
        or len(shape) != 3
        or not all(type(v) is int and v > 0 for v in shape)
    ):
        raise ValueError(f"`shape` must be (C, H, W) of positive ints, got {shape!r}.")
    return tuple(shape)


def pixel_range_noise(
    size: int, shape: Sequence[int], *, generator: torch.Generator | int | None = None
) -> Tensor:
    r"""Noise images over the whole pixel range ``[0, 1]``: TIE's garbage-class seeds.

    Image ``i`` is, by ``i mod 3``: white Gaussian noise ``clip(m + s z, 0, 1)``; uniform
    noise ``U(a, b)``; or low-frequency noise ``clip(m + s up(z_r), 0, 1)``, where ``z_r`` is
    standard Gaussian noise at a random resolution ``r x r`` (``r`` in
    ``2..max(2, min(H, W) // 2)``) bilinearly upsampled to ``H x W`` and standardised. Per
    image the brightness ``m ~ U(0, 1)``, the contrast ``s ~ U(0.05, 0.5)`` and the bounds
    ``a <= b`` (two ``U(0, 1)`` draws) are random; channels are drawn independently.

    Seeding the garbage class with noise of every brightness and contrast in the valid pixel
    range (and then the model's preprocessing) is what lets it absorb noise that is brighter
    or darker than the average training image; Gaussian noise with the preprocessed data's
    mean and std (``TIEConfig(garbage_noise="data_stats")``) covers only noise as dark as
    the average digit. TIE: Suhail, Sethi et al. (arXiv 2512.00229) seed the garbage class
    with noise images.

    Args:
        size (int): Number of images.
        shape (tuple[int, int, int]): ``(C, H, W)``.
        generator (torch.Generator or int, optional): CPU random generator. Default: None (the
            global one).

    Returns:
        Tensor: ``size x C x H x W`` float64 pixels in ``[0, 1]`` on the CPU.

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import pixel_range_noise
        >>> noise = pixel_range_noise(6, (1, 28, 28), generator=torch.Generator().manual_seed(0))
        >>> noise.shape, bool(noise.min() >= 0), bool(noise.max() <= 1)
        (torch.Size([6, 1, 28, 28]), True, True)
    """
    generator = as_generator(generator)
    size = check_int(size, "size")
    c, h, w = _image_shape(shape)
    f64 = torch.float64

    def uniform(*dims: int) -> Tensor:
        return torch.rand(*dims, generator=generator, dtype=f64)

    m = uniform(size, c, 1, 1)
    s = 0.05 + 0.45 * uniform(size, c, 1, 1)
    bounds = uniform(size, c, 1, 2).sort(-1).values
    out = torch.empty(size, c, h, w, dtype=f64)
    highest = max(2, min(h, w) // 2)
    for i in range(size):
        kind = i % 3
        if kind == 0:
            z = torch.randn(c, h, w, generator=generator, dtype=f64)
            out[i] = (m[i] + s[i] * z).clamp(0.0, 1.0)
        elif kind == 1:
            low, high = bounds[i, :, :, :1], bounds[i, :, :, 1:]
            out[i] = low + (high - low) * uniform(c, h, w)
        else:
            r = int(torch.randint(2, highest + 1, (1,), generator=generator))
            z = torch.randn(1, c, r, r, generator=generator, dtype=f64)
            z = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)[0]
            z = (z - z.mean(dim=(1, 2), keepdim=True)) / z.std(dim=(1, 2), keepdim=True).clamp(
                min=1e-6
            )
            out[i] = (m[i] + s[i] * z).clamp(0.0, 1.0)
    return out


def pen_strokes(
    size: int,
    shape: Sequence[int],
    *,
    max_strokes: int = 4,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    r"""Random pen scribbles over the pixel range ``[0, 1]``: structured garbage-class seeds.

    Image ``i`` holds ``k ~ U{1, ..., max_strokes}`` cubic Bezier curves, each with four
    control points uniform in the central ``[0.15, 0.85]`` of the image (in units of its
    height and width), drawn with one solid, anti-aliased pen:

    .. code-block:: text

        ink(x) = clip(r - d(x) + 1/2, 0, 1),    r = S (0.02 + 0.06 u),  u ~ U(0, 1)
        image  = b + (v - b) ink,               b ~ U(0, 0.3),  v ~ U(0.6, 1)

    where ``d(x)`` is the distance (in pixels) from pixel centre ``x`` to the nearest of
    ``max(64, 4 S)`` points sampled along each curve, ``S = min(H, W)``, and ``b`` (background)
    and ``v`` (pen) are drawn per channel. With probability 1/2 the image is inverted
    (``1 - image``: dark pen on a bright background).

    Noise seeds (:func:`pixel_range_noise`) teach TIE's garbage class what is unlike any
    image; scribbles are unlike the training classes too, but made of strokes, as many
    out-of-distribution images are (glyphs, sketches, other symbols), so the garbage class
    must use shape, not texture, to absorb them. A generic family: nothing in it is drawn
    from the training data or from any test set. Used by ``TIEConfig(garbage_strokes=...)``;
    the TIE paper (Suhail, Sethi et al., arXiv 2512.00229) seeds with noise only.

    Args:
        size (int): Number of images.
        shape (tuple[int, int, int]): ``(C, H, W)``.
        max_strokes (int, optional): Most curves per image. Default: 4
        generator (torch.Generator or int, optional): CPU random generator. Default: None (the
            global one).

    Returns:
        Tensor: ``size x C x H x W`` float64 pixels in ``[0, 1]`` on the CPU.

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import pen_strokes
        >>> scribbles = pen_strokes(6, (1, 28, 28), generator=torch.Generator().manual_seed(0))
        >>> scribbles.shape, bool(scribbles.min() >= 0), bool(scribbles.max() <= 1)
        (torch.Size([6, 1, 28, 28]), True, True)
    """
    generator = as_generator(generator)
    size = check_int(size, "size")
    max_strokes = check_int(max_strokes, "max_strokes")
    c, h, w = _image_shape(shape)
    f64 = torch.float64
    side = min(h, w)
    points = max(64, 4 * side)  # spacing below one pixel along any curve in the image
    t = torch.linspace(0.0, 1.0, points, dtype=f64).unsqueeze(1)
    basis = torch.cat([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], 1)
    ys = (torch.arange(h, dtype=f64) + 0.5).view(1, h, 1)
    xs = (torch.arange(w, dtype=f64) + 0.5).view(1, 1, w)
    scale = torch.tensor([h, w], dtype=f64)
    out = torch.empty(size, c, h, w, dtype=f64)
    for i in range(size):
        k = int(torch.randint(1, max_strokes + 1, (1,), generator=generator))
        control = 0.15 + 0.7 * torch.rand(k, 4, 2, generator=generator, dtype=f64)
        curve = torch.einsum("tj,kjd->ktd", basis, control).reshape(-1, 2) * scale
        radius = side * (0.02 + 0.06 * float(torch.rand((), generator=generator, dtype=f64)))
        dist2 = torch.full((h, w), math.inf, dtype=f64)
        for chunk in curve.split(64):  # running minimum: memory O(64 H W), not O(k T H W)
            d2 = (ys - chunk[:, :1, None]).square() + (xs - chunk[:, 1:, None]).square()
            dist2 = torch.minimum(dist2, d2.amin(0))
        ink = (radius - dist2.sqrt() + 0.5).clamp(0.0, 1.0)
        back = 0.3 * torch.rand(c, 1, 1, generator=generator, dtype=f64)
        pen = 0.6 + 0.4 * torch.rand(c, 1, 1, generator=generator, dtype=f64)
        image = back + (pen - back) * ink
        if bool(torch.rand((), generator=generator) < 0.5):
            image = 1.0 - image
        out[i] = image
    return out


def _mirror(images: Tensor) -> Tensor:
    return images.flip(-1)


def _upside_down(images: Tensor) -> Tensor:
    return images.flip(-2)


def _quarter_turn_left(images: Tensor) -> Tensor:
    return images.rot90(1, (-2, -1))


def _quarter_turn_right(images: Tensor) -> Tensor:
    return images.rot90(-1, (-2, -1))


_GEOMETRIC_TRANSFORMS = (_mirror, _upside_down, _quarter_turn_left, _quarter_turn_right)


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (float64; NaN for
    a constant row)."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def transformed_inputs(
    inputs: Tensor,
    size: int,
    *,
    max_correlation: float = 0.6,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    r"""Mirrored, flipped and quarter-turned copies of in-distribution images: structured
    garbage-class seeds that look like the data but are no class of it.

    Each output is a randomly drawn input ``x`` under a random transform ``T``: left-right
    mirror, upside-down flip or, for square images, a quarter turn either way (not the half
    turn, which maps a 6 to a 9). A copy is kept only when it differs from its source,

    .. code-block:: text

        corr(T(x), x) < max_correlation,      corr = Pearson correlation over all C H W values

    so that images the transform barely changes (a mirrored 0 or 8 is still that digit) do
    not become garbage; candidates are drawn in rounds until ``size`` copies are kept (at
    most eight rounds: fewer are returned when the inputs are nearly all symmetric).

    The transforms act on the given tensor, so ``inputs`` may be in the model's input space
    already (per-channel normalisation commutes with them). Transformed in-distribution
    images as negatives are the idea of "shifted" instances in contrastive out-of-
    distribution detection (Tack et al., "CSI", NeurIPS 2020); the TIE paper (Suhail, Sethi
    et al., arXiv 2512.00229) seeds the garbage class with noise only. Used by
    ``TIEConfig(garbage_transforms=...)``: on the bundled digit model they are what moved
    TIE on rendered letters (``benchmarks/RESULTS.md``).

    Args:
        inputs (Tensor): ``N x C x H x W`` in-distribution images (N >= 1).
        size (int): Number of copies wanted.
        max_correlation (float, optional): Copies at least this correlated with their source
            are dropped, in (-1, 1]. Default: 0.6
        generator (torch.Generator or int, optional): CPU random generator for the draws.
            Default: None (the global one).

    Returns:
        Tensor: at most ``size`` copies, ``M x C x H x W`` on the device and dtype of
        ``inputs`` (``M = size`` unless the inputs ran out of asymmetric images).

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import transformed_inputs
        >>> sevens = torch.zeros(2, 1, 8, 8)
        >>> sevens[:, 0, 1, 1:7] = 1.0                                # the bar
        >>> sevens[:, 0, 2:7, 5] = 1.0                                # the stem
        >>> copies = transformed_inputs(sevens, 4, generator=torch.Generator().manual_seed(0))
        >>> copies.shape
        torch.Size([4, 1, 8, 8])
    """
    generator = as_generator(generator)
    if not isinstance(inputs, Tensor) or inputs.dim() != 4 or inputs.shape[0] == 0:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"`inputs` must be an N x C x H x W tensor with N >= 1, got {shape}.")
    size = check_int(size, "size")
    if not is_real(max_correlation) or not -1.0 < max_correlation <= 1.0:
        raise ValueError(f"`max_correlation` must be in (-1, 1], got {max_correlation!r}.")
    max_correlation = float(max_correlation)
    square = inputs.shape[-1] == inputs.shape[-2]
    transforms = _GEOMETRIC_TRANSFORMS if square else _GEOMETRIC_TRANSFORMS[:2]
    images = inputs.detach()
    kept: list[Tensor] = []
    found = 0
    for _ in range(8):
        draws = 2 * (size - found)
        rows = torch.randint(images.shape[0], (draws,), generator=generator)
        kinds = torch.randint(len(transforms), (draws,), generator=generator)
        sources = images[rows.to(images.device)]
        copies = torch.empty_like(sources)
        for kind, transform in enumerate(transforms):
            chosen = (kinds == kind).nonzero().flatten().to(images.device)
            if chosen.numel():
                copies[chosen] = transform(sources[chosen])
        unlike = _pearson_rows(copies, sources) < max_correlation  # NaN (constant): dropped
        new = copies[unlike][: size - found]
        kept.append(new)
        found += new.shape[0]
        if found == size:
            break
    return torch.cat(kept)


class TIEPrediction(NamedTuple):
    """The answer of :meth:`TIE.predict`.

    Attributes:
        labels (Tensor): ``(N,)`` int64, the predicted class in ``0..n - 1``, or ``n`` (the
            garbage class: out of distribution).
        confidence (Tensor): ``(N,)`` the probability of the predicted class (``max p`` over
            the ``n + 1`` classes).
        is_garbage (Tensor): ``(N,)`` bool, ``labels == n``.
    """

    labels: Tensor
    confidence: Tensor
    is_garbage: Tensor


def _clear_hooks(model: nn.Module) -> None:
    """Drop the forward/backward hooks a deep copy inherited from the user's model (their
    closures may refer to the user's objects), except those of torch's legacy
    ``weight_norm`` / ``spectral_norm``, which compute the layer's weight."""
    for module in model.modules():
        for name in (
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_state_dict_pre_hooks",
            "_load_state_dict_pre_hooks",
            "_load_state_dict_post_hooks",
        ):
            hooks = getattr(module, name, None)
            for key, hook in list((hooks or {}).items()):
                if not is_legacy_norm_hook(hook):
                    del hooks[key]


def _extend_classifier(
    model: nn.Module, num_classes: int, input_shape, seed: int
) -> tuple[nn.Module, str]:
    """A deep copy of ``model`` whose last nn.Linear has ``num_classes + 1`` outputs; the
    first ``num_classes`` rows are the trained ones."""
    device, dtype = model_device_dtype(model)
    example = torch.zeros(2, *input_shape, device=device, dtype=dtype)
    try:
        head = final_linear(model, example)
    except ValueError as error:
        raise ValueError(
            f"`model`: cannot find the final nn.Linear to extend ({error}); pass a factory "
            "(a callable, not an nn.Module) that builds a model with n + 1 outputs instead."
        ) from error
    name = next(n for n, m in model.named_modules() if m is head)
    extended = copied_model(model)
    _clear_hooks(extended)
    for param in extended.parameters():
        param.grad = None
    old = extended.get_submodule(name)
    w = old.weight
    # made on the meta device (no initialisation drawn from the caller's global generator:
    # every entry is set below), then given real storage
    new = nn.Linear(
        old.in_features, num_classes + 1, bias=old.bias is not None, device="meta", dtype=w.dtype
    ).to_empty(device=w.device)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        gen = torch.Generator().manual_seed(_seed_of(seed, 1, 0))
        bound = 1.0 / math.sqrt(max(1, old.in_features))
        row = (torch.rand(old.in_features, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        new.weight.zero_()
        new.weight[:num_classes] = w.detach()
        new.weight[num_classes] = row.to(w.dtype).to(w.device)
        if new.bias is not None:
            new.bias.zero_()
            new.bias[:num_classes] = old.bias.detach()
    new.train(old.training)
    parent_name, _, attr = name.rpartition(".")
    parent = extended.get_submodule(parent_name) if parent_name else extended
    setattr(parent, attr, new)
    return extended, name


def _refuse_settings_the_factory_ignores(
    generator: ConditionedGenerator,
    preprocess: Any,
    value_range: tuple[float, float],
    latent_dim: int,
    width: int,
    dropout: float,
) -> None:
    """The default generator's settings given with a ``generator_factory`` are refused where
    the factory's generator does not have them (they would be ignored): a latent size or
    pixel range other than its own, a ``preprocess`` for a generator without one, a width
    or dropout other than the defaults (not recorded by a generator)."""
    defaults = TIEConfig()

    def default_or(value: Any, default: Any, own: Any) -> Any:
        """What ``value`` is compared with: left at its default, or the generator's own."""
        return value if value == default else own

    refuse_ignored_settings(
        {
            "preprocess": (preprocess, None if generator.preprocess is None else preprocess),
            "value_range": (
                value_range,
                default_or(value_range, (0.0, 1.0), tuple(generator.value_range)),
            ),
            "latent_dim": (
                latent_dim,
                default_or(latent_dim, defaults.latent_dim, generator.latent_dim),
            ),
            "generator_width": (width, defaults.generator_width),
            "dropout": (dropout, defaults.dropout),
        },
        "it sets the default generator, and `generator_factory` built one without it; give "
        "it to the ConditionedGenerator the factory builds",
    )


def _cpu_copy(value: Any) -> Any:
    """A copy of a (nested) state dict with every tensor copied to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        copied = {key: _cpu_copy(item) for key, item in value.items()}
        if type(value) is not dict:  # OrderedDict state dicts, with their _metadata
            copied = type(value)(copied)
            if hasattr(value, "_metadata"):
                copied._metadata = copy.deepcopy(value._metadata)
        return copied
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(item) for item in value)
    return copy.deepcopy(value)


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if distributed_shard() is None:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _float32_masters(params: Sequence[nn.Parameter]) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(parameter, float32 master copy)`` for each float16 / bfloat16 parameter: the master
    copies of mixed-precision training, which Adam steps instead of the parameters. In
    float16, Adam's ``eps`` (1e-8) and its small squared-gradient averages round to 0, and
    its steps ``m / (sqrt(v) + eps)`` turn the weights into inf and NaN at the first step;
    in bfloat16 (8 significant bits) small updates are rounded away."""
    with torch.no_grad():
        return [
            (param, nn.Parameter(param.detach().to(torch.float32, copy=True)))
            for param in params
            if param.dtype in (torch.float16, torch.bfloat16)
        ]


class TIE:
    r"""TIE: training, inversion and exclusion for out-of-distribution detection.

    Suhail, Sethi et al., "TIE: A Training-Inversion-Exclusion Framework" (arXiv 2512.00229);
    the earlier version without the uncertainty filter (``baseline="all"``) is "Network
    Inversion for Uncertainty-Aware Out-of-Distribution Detection" (arXiv 2505.23448).

    An ``n``-class classifier is extended to ``n + 1`` outputs; class ``n`` is "garbage".
    The garbage pool is seeded with noise images (DEFAULT as many as an average class):
    white Gaussian, uniform and low-frequency noise of random brightness and contrast over
    the whole pixel range, mapped to the model's input space by ``preprocess``
    (:func:`pixel_range_noise`; DEFAULT). ``TIEConfig(garbage_noise="data_stats")`` gives the
    earlier seeding, ``N(mean, std^2)`` of the preprocessed inputs per channel: noise as dark
    as the average input, which leaves brighter noise to the in-distribution classes.
    ``TIEConfig(garbage_strokes=s)`` draws a share ``s`` of the seeds as random pen
    scribbles instead (:func:`pen_strokes`; not in the paper, DEFAULT 0), and
    ``TIEConfig(garbage_transforms=t)`` a share ``t`` as mirrored, flipped or quarter-turned
    training inputs (:func:`transformed_inputs`; not in the paper, DEFAULT 0: better on
    near out-of-distribution images such as letters for digits, at some cost in held-out
    accuracy). Then each epoch of
    :meth:`fit`:

    1. one epoch of class-weighted cross-entropy (weights inverse to the class frequencies,
       ``w_c = N / ((n + 1) N_c)``, the garbage class's times ``garbage_weight``, DEFAULT 0.5)
       on the in-distribution data plus the garbage pool;
    2. a :class:`NetworkInversion` generator (vector-matrix conditioning, KL + CE + cosine
       diversity) is trained for ``generator_steps`` steps against the just-trained
       classifier, then ``samples_per_class`` inverted images of each of the ``n + 1``
       classes are sampled (one-hot conditioning vectors by default, see
       ``sample_vector``);
    3. the inverted samples with ``UE(p) > threshold`` (:func:`uncertainty_ue` of the
       classifier's ``n + 1`` probabilities) join the garbage pool (all of them with
       ``baseline="all"``).

    Training stops when the excluded fraction of an epoch is below ``stop_fraction`` or
    after ``epochs`` epochs; the classifier then trains one last epoch on the final pool
    (``final_training``, our DEFAULT: otherwise the last exclusions would never be learnt
    and ``baseline="all"`` would end with the same classifier as TIE). At inference the
    garbage class means out of distribution (:meth:`predict`); :meth:`ood_score` gives
    threshold-free scores.

    **Classifier.** Either an ``n``-output ``nn.Module`` (usually trained): TIE works on a
    deep copy (the user's model is never modified) whose final ``nn.Linear`` (the last one
    to run, producing the logits) is replaced by one with ``n + 1`` outputs, its first ``n``
    rows (weights and bias) copied from the trained layer, so the first ``n`` logits are
    unchanged on every input until training starts; the garbage row gets seeded uniform
    weights ``U(-1/sqrt(d), 1/sqrt(d))`` and bias 0. The copy keeps the user's
    ``requires_grad`` flags (frozen layers stay frozen; the new head is trainable) but not
    their hooks. Or a model factory: a callable (not an ``nn.Module``) that takes
    the number of outputs ``n + 1`` and returns a fresh model; ``num_classes`` is then
    required.

    **Distributed.** Under ``torchrun`` (an initialised process group) the classifier and
    the generator are wrapped in ``DistributedDataParallel``; each rank gets the full data
    and trains on its ``DistributedSampler`` shard (``batch_size`` per process); buffers
    (BatchNorm statistics) are broadcast from rank 0 after each training phase, every rank
    samples the same inverted images, so all ranks hold identical models and pools; rank 0
    writes the checkpoints.

    **Half precision.** A float16 or bfloat16 classifier keeps its dtype (the classifier
    trained, sampled against and returned is in it), but its trainable parameters are
    stepped through float32 master copies, the usual mixed-precision recipe: each step's
    gradients (computed by the model in its dtype, from a float32 cross-entropy) move to the
    float32 copies, Adam and its moments work in float32, and the parameters take the new
    values rounded to their dtype. (Adam in float16 turns the weights into NaN at the first
    step: its ``eps`` and small squared-gradient averages round to 0.) The generator is
    float32 as well (see :class:`NetworkInversion`).

    Args:
        model (nn.Module or callable): The ``n``-class classifier (logits), or a factory
            ``model(n + 1) -> nn.Module`` (a callable that is not an ``nn.Module``).
            Formerly ``classifier``. A model whose outputs are probabilities (it ends in a
            softmax, of which TIE would take a second one) gets a UserWarning; give it without
            the softmax, or as ``captum_ext.data.LogitsOutput(model, reads="probabilities")``.
        generator_factory (callable, optional): ``generator_factory(n + 1)`` returning a
            :class:`ConditionedGenerator` for ``n + 1`` classes and ``input_shape``.
            Default: a vector-matrix ``ConditionedGenerator(n + 1, input_shape,
            latent_dim, dropout=dropout, preprocess=preprocess, value_range=value_range,
            width=generator_width)`` on the model's device and dtype, initialised from
            ``seed``.
        config (TIEConfig, optional): The training settings (threshold, stopping rule,
            batch sizes, learning rates, generator size, seed, ...): see
            :class:`TIEConfig`. Default: ``TIEConfig()``
        num_classes (int, optional): ``n``. Required with a factory; checked against the
            model's outputs otherwise. Default: None
        input_shape (tuple[int, int, int], optional): ``(C, H, W)`` of the model's inputs.
            Default: the model's ``input_shape`` attribute when it has one, else required.
        preprocess (callable or tuple, optional): Maps the default generator's pixels to the
            model's input space (see :class:`ConditionedGenerator`). Formerly
            ``normalize``. Default: None (the model takes pixels in ``[0, 1]``)
        value_range (tuple[float, float], optional): The pixel range ``preprocess`` takes,
            e.g. ``(0, 255)``. Default: ``(0, 1)``
        **settings: Any field of :class:`TIEConfig` (``threshold=0.3``,
            ``generator_steps=50``, ...), applied on top of ``config``: the keyword form
            of earlier releases, still supported without a warning.

    Attributes:
        model (nn.Module): The ``n + 1``-output classifier being trained (the copy;
            formerly ``classifier``).
        config (TIEConfig): The training settings in use (fixed when the TIE is made:
            assigning another is refused; make a new TIE for other settings).
        generator (ConditionedGenerator): The generator.
        inversion (NetworkInversion): The generator's trainer.
        pool (Tensor or None): The garbage pool, in the classifier's input space.
        log (dict[str, list]): Per-epoch records, keys ``epoch``, ``loss``, ``accuracy``
            (in-distribution training accuracy of the epoch), ``garbage_accuracy`` (share
            of pool images put in the garbage class while training), ``generator_loss``
            (mean over the epoch's steps), ``label_consistency`` (share of inverted samples
            classified as their conditioning class), ``sampled``, ``excluded``,
            ``excluded_fraction``, ``mean_ue`` (of the inverted samples) and ``pool_size``
            (after the exclusion); a final-training row has ``sampled = 0`` and NaN in the
            inversion columns.

    Examples::

        >>> import torch
        >>> from captum_ext.bundled import BUNDLED_INVERSION_OPTIONS
        >>> from captum_ext.inversion import TIE, TIEConfig
        >>> from captum_ext.metrics import auroc
        >>> _ = torch.manual_seed(0)
        >>> # a tiny budget on the 40 sample digits; a real fit uses the training set and
        >>> # the default TIEConfig (100 generator steps per epoch, up to 10 epochs)
        >>> config = TIEConfig(generator_steps=2, generator_batch_size=8, batch_size=20)
        >>> tie = TIE(model, config=config, **BUNDLED_INVERSION_OPTIONS)
        >>> log = tie.fit(images, labels, epochs=1, progress=False)
        >>> log["epoch"]                    # one epoch run
        [1.0]
        >>> noise = torch.randn(40, 1, 28, 28)
        >>> separation = auroc(tie.in_distribution_score(images),
        ...                    tie.in_distribution_score(noise))
        >>> 0.0 <= separation <= 1.0
        True
    """

    @renamed_arguments(classifier="model", normalize="preprocess")
    @leaves_inference_mode  # the extended classifier and generators are trained later
    def __init__(
        self,
        model: nn.Module | Callable[[int], nn.Module],
        generator_factory: Callable[[int], ConditionedGenerator] | None = None,
        *,
        config: TIEConfig | None = None,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        preprocess: Callable[[Tensor], Tensor] | Sequence | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        **settings: Any,
    ) -> None:
        if config is None:
            config = TIEConfig()
        elif not isinstance(config, TIEConfig):
            raise TypeError(f"`config` must be a TIEConfig, got {type(config).__name__}.")
        if settings:
            known = {f.name for f in dataclasses.fields(TIEConfig)}
            unknown = sorted(set(settings) - known)
            if unknown:
                raise TypeError(
                    f"TIE() got unexpected keyword arguments {unknown}; the training settings "
                    f"are the fields of TIEConfig: {sorted(known)}."
                )
            config = dataclasses.replace(config, **settings)
        self._config = config
        self.threshold = config.threshold
        self.stop_fraction = config.stop_fraction
        self.baseline = config.baseline
        self.seed = seed = config.seed
        self.lr = config.lr
        self.batch_size = config.batch_size
        self.generator_steps = config.generator_steps
        self.garbage_size = config.garbage_size
        self.samples_per_class = config.samples_per_class
        self.sample_vector = config.sample_vector
        self.final_training = config.final_training
        if num_classes is not None:
            num_classes = check_int(num_classes, "num_classes", minimum=2)
        value_range = check_value_range(value_range)
        if input_shape is None:
            input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError(
                "`input_shape` (C, H, W) of the model's inputs is needed for "
                f"{type(model).__name__}."
            )
        if (
            not isinstance(input_shape, Sequence)
            or len(input_shape) != 3
            or not all(type(s) is int and s > 0 for s in input_shape)
        ):
            raise ValueError(
                f"`input_shape` must be (C, H, W) of positive ints, got {input_shape!r}."
            )
        self.input_shape = tuple(int(s) for s in input_shape)

        if isinstance(model, nn.Module):
            model = uncompiled(model)  # torch.compile's wrapper: extend and train its module
            device, dtype = model_device_dtype(model)
            outputs = count_classes(model, self.input_shape, device, dtype)
            if outputs < 2:
                raise ValueError(f"`model` must have at least 2 outputs, got {outputs}.")
            if num_classes is not None and num_classes != outputs:
                raise ValueError(
                    f"`num_classes`={num_classes} but the model has {outputs} outputs."
                )
            self.num_classes = outputs
            self.model, self.head_name = _extend_classifier(model, outputs, self.input_shape, seed)
        elif callable(model):
            if num_classes is None:
                raise ValueError("`num_classes` (n) is required with a `model` factory.")
            self.num_classes = num_classes
            with seeded_rng(_seed_of(seed, 2, 0)):
                built = model(num_classes + 1)
            if not isinstance(built, nn.Module):
                raise TypeError(
                    f"`model` factory must return an nn.Module, got {type(built).__name__}."
                )
            device, dtype = model_device_dtype(built)
            outputs = count_classes(built, self.input_shape, device, dtype)
            if outputs != num_classes + 1:
                raise ValueError(
                    f"`model` factory must build a model with num_classes + 1 = "
                    f"{num_classes + 1} outputs, got {outputs}."
                )
            self.model, self.head_name = built, None
        else:
            raise TypeError(
                f"`model` must be an nn.Module or a factory callable, got {type(model).__name__}."
            )
        latent_dim, generator_width, dropout = (
            config.latent_dim,
            config.generator_width,
            config.dropout,
        )
        generator_lr, generator_batch_size = config.generator_lr, config.generator_batch_size
        inversion_weights = config.inversion_weights
        self.model.eval()
        device, dtype = model_device_dtype(self.model)
        k = self.num_classes + 1

        with seeded_rng(_seed_of(seed, 3, 0)):
            if generator_factory is None:
                generator = ConditionedGenerator(
                    k,
                    self.input_shape,
                    latent_dim=latent_dim,
                    conditioning="vector_matrix",
                    dropout=dropout,
                    preprocess=preprocess,
                    value_range=value_range,
                    width=generator_width,
                )
            elif callable(generator_factory):
                generator = generator_factory(k)
            else:
                raise TypeError(
                    "`generator_factory` must be a callable taking the number of classes, got "
                    f"{type(generator_factory).__name__}."
                )
        if not isinstance(generator, ConditionedGenerator):
            raise TypeError(
                "`generator_factory` must return a ConditionedGenerator, got "
                f"{type(generator).__name__}."
            )
        if generator_factory is not None:
            _refuse_settings_the_factory_ignores(
                generator, preprocess, value_range, latent_dim, generator_width, dropout
            )
        if generator.num_classes != k or tuple(generator.out_shape) != self.input_shape:
            raise ValueError(
                f"`generator_factory` must build a generator for {k} classes and "
                f"{self.input_shape} images, got {generator.num_classes} and "
                f"{tuple(generator.out_shape)}."
            )
        if generator_factory is None:
            generator = generator.to(device=device, dtype=dtype)
        weights = {"orthogonality": 0.0, **dict(inversion_weights or {})}
        with head_already_checked():  # a softmax output was warned of above
            self.inversion = NetworkInversion(
                self.model,
                generator,
                preset="inversion",
                weights=weights,
                lr=generator_lr,
                batch_size=generator_batch_size,
                seed=_seed_of(seed, 4, 0) % (2**31),
            )
        self.generator = generator
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("`model` has no trainable parameter.")
        # a half-precision classifier's parameters are stepped through float32 copies
        self._masters = _float32_masters(params)
        stepped = {id(param): master for param, master in self._masters}
        self.optimizer = torch.optim.Adam([stepped.get(id(p), p) for p in params], lr=self.lr)
        self.pool: Tensor | None = None
        self.epoch = 0
        self.stopped = False
        self.log: dict[str, list[float]] = {key: [] for key in _LOG_KEYS}
        self._ddp: nn.Module | None = None

    @property
    def config(self) -> TIEConfig:
        """The training settings in use (read only)."""
        return self._config

    @config.setter
    def config(self, value: Any) -> None:
        raise AttributeError(
            "`config` is fixed when a TIE is made (its settings were copied then, so a new "
            "one would apply only in part); make a new TIE with the settings you want."
        )

    @property
    def classifier(self) -> nn.Module:
        """Deprecated alias of the ``model`` attribute (the ``n + 1``-output copy)."""
        warnings.warn(
            "TIE.classifier is renamed model; the old name will be removed in a future release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.model

    @property
    def garbage_class(self) -> int:
        """The index ``n`` of the garbage class."""
        return self.num_classes

    # ----------------------------------------------------------------- checks
    def _check_inputs(self, inputs: Any, argument: str = "inputs") -> Tensor:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(inputs).__name__}.")
        if not inputs.is_floating_point():
            raise TypeError(
                f"`{argument}` must be floating point (the classifier's inputs), got "
                f"{inputs.dtype}."
            )
        if inputs.dim() != 4 or tuple(inputs.shape[1:]) != self.input_shape:
            raise ValueError(
                f"`{argument}` must have shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(inputs.shape)}."
            )
        # for fit and every prediction alike: a NaN image gives NaN probabilities, whose
        # argmax is class 0 ("in distribution") with NaN confidence
        finite = torch.isfinite(inputs).flatten(1).all(1)
        if not bool(finite.all()):
            raise ValueError(
                f"`{argument}` must be finite: {int((~finite).sum())} of {inputs.shape[0]} "
                "images hold NaN or infinite values."
            )
        return inputs

    def _check_labels(self, labels: Any, n: int) -> Tensor:
        if not isinstance(labels, Tensor):
            raise TypeError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}.")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"`labels` must hold integer class indices, got {labels.dtype}.")
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(
                f"`labels` must have shape ({n},) like `inputs`, got {tuple(labels.shape)}."
            )
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"`labels` must lie in 0..{self.num_classes - 1} (the in-distribution "
                f"classes), got values in {int(labels.min())}..{int(labels.max())}."
            )
        return labels.long()

    # ----------------------------------------------------------------- training
    def _seed_pool(self, inputs: Tensor) -> None:
        n = inputs.shape[0]
        total = self.garbage_size or max(1, round(n / self.num_classes))
        strokes = round(self.config.garbage_strokes * total)
        transforms = round(self.config.garbage_transforms * total)
        if transforms:
            gen = torch.Generator(device="cpu").manual_seed(_seed_of(self.seed, 9, 0))
            copies = transformed_inputs(inputs, transforms, generator=gen)
            if copies.shape[0] < transforms:
                warnings.warn(
                    f"`garbage_transforms`: only {copies.shape[0]} of {transforms} mirrored or "
                    "turned inputs differ enough from their source (correlation < 0.6); the "
                    "other seeds are noise.",
                    stacklevel=user_stacklevel(),
                )
            transforms = copies.shape[0]
        strokes = min(strokes, total - transforms)
        size = total - strokes - transforms
        gen = torch.Generator(device="cpu").manual_seed(_seed_of(self.seed, 5, 0))
        seeds = []
        if size and self.config.garbage_noise == "data_stats":
            dims = [0, 2, 3]
            mean = inputs.mean(dim=dims, keepdim=True)
            std = inputs.std(dim=dims, keepdim=True) if n > 1 else torch.ones_like(mean)
            noise = torch.randn(size, *self.input_shape, generator=gen, dtype=torch.float64)
            seeds.append(noise.to(inputs.device, inputs.dtype) * std + mean)
        elif size:
            pixels = pixel_range_noise(size, self.input_shape, generator=gen)
            with torch.no_grad():
                seeds.append(
                    self.generator.preprocess_pixels(pixels.to(inputs.device, inputs.dtype))
                )
        if strokes:
            gen = torch.Generator(device="cpu").manual_seed(_seed_of(self.seed, 8, 0))
            pixels = pen_strokes(strokes, self.input_shape, generator=gen)
            with torch.no_grad():
                seeds.append(
                    self.generator.preprocess_pixels(pixels.to(inputs.device, inputs.dtype))
                )
        if transforms:
            seeds.append(copies)
        self.pool = torch.cat(seeds).detach()

    def _train_classifier(self, inputs: Tensor, labels: Tensor, epoch: int) -> dict[str, float]:
        from torch.utils.data.distributed import DistributedSampler

        device = inputs.device
        n, k = self.num_classes, self.num_classes + 1
        data = torch.cat([inputs, self.pool])
        targets = torch.cat(
            [labels, torch.full((self.pool.shape[0],), n, dtype=torch.long, device=device)]
        )
        counts = torch.bincount(targets, minlength=k).to(torch.float64)
        weight = torch.where(counts > 0, targets.numel() / (k * counts.clamp(min=1)), 0.0)
        weight[n] *= self.config.garbage_weight
        shard = distributed_shard()
        rank, world = (0, 1) if shard is None else shard
        sampler = DistributedSampler(
            range(data.shape[0]), num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long, device=device)
        if shard is None:
            net = self.model
        else:
            if self._ddp is None:
                self._ddp = wrap_distributed(self.model)
            net = self._ddp
        totals = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # loss sum, batches, in ok, in n, gb ok, gb n
        self._masters_follow_model()
        with seeded_rng(_seed_of(self.seed, 6, epoch, rank), self._rng_devices(device)):
            self.model.train()
            try:
                for rows in order.split(self.batch_size):
                    x, y = data[rows], targets[rows]
                    logits = net(x)
                    # the loss in float32 at least: a float16 cross-entropy keeps 3 digits
                    wide = at_least_float32(logits)
                    loss = F.cross_entropy(wide, y, weight=weight.to(wide.dtype))
                    value = float(loss.detach())
                    diverged = None
                    if not math.isfinite(value):
                        diverged = FloatingPointError(
                            f"TIE.fit: the classifier's training loss became {value} "
                            f"in epoch {epoch + 1}; try a smaller `lr`. The TIE is left as "
                            "it was before this fit."
                        )
                    # under torchrun one rank's batch can diverge first: every rank raises,
                    # before the backward pass whose all-reduce the others would wait in
                    raise_if_any_rank_failed(diverged, what="TIE.fit")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self._master_step()
                    with torch.no_grad():
                        hit = logits.argmax(1) == y
                        is_in = y < n
                        totals[0] += float(loss.detach())
                        totals[1] += 1
                        totals[2] += float((hit & is_in).sum())
                        totals[3] += float(is_in.sum())
                        totals[4] += float((hit & ~is_in).sum())
                        totals[5] += float((~is_in).sum())
            finally:
                self.model.eval()
                self.optimizer.zero_grad(set_to_none=True)
                for param, _ in self._masters:
                    param.grad = None
        broadcast_buffers(self.model)
        totals = _all_sum(totals, device)
        return {
            "loss": totals[0] / max(totals[1], 1),
            "accuracy": totals[2] / max(totals[3], 1),
            "garbage_accuracy": totals[4] / max(totals[5], 1),
        }

    def _master_step(self) -> None:
        """The optimiser's step: a half-precision parameter's gradient moves to its float32
        master copy, which Adam steps, and the parameter takes the master's new value in
        its own dtype; other parameters are stepped as they are."""
        for param, master in self._masters:
            master.grad = None if param.grad is None else param.grad.to(master.dtype)
            param.grad = None
        optimiser_step(self.optimizer)
        with torch.no_grad():
            for param, master in self._masters:
                param.copy_(master)

    def _masters_follow_model(self) -> None:
        """Float32 master copies that no longer round to their parameters (the classifier's
        weights loaded or changed since the last fit) start again from the parameters."""
        with torch.no_grad():
            for param, master in self._masters:
                if not torch.equal(master.to(param.dtype), param):
                    master.copy_(param)

    def _invert_and_exclude(self, per_class: int, epoch: int) -> dict[str, float]:
        # (ends with rank 0's generator buffers on every rank)
        history = self.inversion.fit(self.generator_steps, progress=False)
        images, labels = self.inversion.sample_classes(
            per_class, generator=_seed_of(self.seed, 7, epoch) % (2**62), vector=self.sample_vector
        )
        probs = self._probabilities(images)
        if not bool(torch.isfinite(probs).all()):
            raise FloatingPointError(
                f"TIE.fit: the classifier's outputs on the inverted samples of epoch "
                f"{epoch + 1} are NaN or infinite; try a smaller `lr` or `generator_lr`. The "
                "TIE is left as it was before this fit."
            )
        ue = uncertainty_ue(probs)
        excluded = torch.ones_like(ue, dtype=torch.bool)
        if self.baseline == "uncertain":
            excluded = ue > self.threshold
        new = images[excluded].detach().to(self.pool.device, self.pool.dtype)
        self.pool = torch.cat([self.pool, new])
        losses = history["loss"]
        return {
            "generator_loss": sum(losses) / len(losses),
            "label_consistency": share(probs.argmax(1) == labels),
            "sampled": float(ue.numel()),
            "excluded": float(excluded.sum()),
            "excluded_fraction": share(excluded),
            "mean_ue": float(precise(ue).mean()),
        }

    @staticmethod
    def _rng_devices(device: torch.device) -> list[int]:
        return rng_devices(device)

    def _checkpoint_state(self, fit_epoch: int, epochs: int, fit_start: int) -> dict[str, Any]:
        steps = self.generator_steps
        shard = distributed_shard()
        return {
            "format": _FORMAT,
            "num_classes": self.num_classes,
            "baseline": self.baseline,
            "threshold": self.threshold,
            "world_size": 1 if shard is None else shard[1],
            "epoch": self.epoch,
            "stopped": self.stopped,
            "fit_epoch": fit_epoch,
            "fit_epochs": epochs,
            "fit_start": fit_start,
            "classifier": unwrap_distributed(self.model).state_dict(),
            # a half-precision classifier's float32 master copies, for an exact resume
            "classifier_masters": [master.detach() for _, master in self._masters],
            "optimizer": self.optimizer.state_dict(),
            # collective under torch.distributed (gathers every rank's random state)
            "inversion": inversion_state(
                self.inversion, steps, steps, 0, self.inversion.batch_size
            ),
            "config": _recorded_config(self._config),
            "pool": self.pool.detach().cpu(),
            "log": {key: list(values) for key, values in self.log.items()},
        }

    def _restore(self, state: Mapping[str, Any], epochs: int) -> tuple[int, int]:
        if state.get("format") != _FORMAT:
            raise ValueError("`checkpoint` was not written by TIE.fit.")
        missing = [key for key in _CHECKPOINT_KEYS if key not in state]
        if missing:
            raise ValueError(f"`checkpoint` lacks the entries {missing} a TIE.fit writes.")
        if (
            state["num_classes"] != self.num_classes
            or state["baseline"] != self.baseline
            or state["threshold"] != self.threshold
        ):
            raise ValueError(
                f"`checkpoint` is for {state['num_classes']} classes, baseline "
                f"{state['baseline']!r}, threshold {state['threshold']}; this TIE has "
                f"{self.num_classes}, {self.baseline!r}, {self.threshold}."
            )
        if state["fit_epochs"] != epochs:
            raise ValueError(
                f"`epochs`={epochs} differs from the interrupted fit's {state['fit_epochs']}; "
                "resume with the same `epochs`."
            )
        if "config" in state:  # (checkpoints before it was recorded: the inversion's checks)
            own = _recorded_config(self._config)
            # a setting added since the checkpoint was written: the fit ran with its default
            saved_config = {**_recorded_config(TIEConfig()), **state["config"]}
            differ = [
                f"{name}={own[name]!r} (the checkpoint's: {saved!r})"
                for name, saved in saved_config.items()
                if name in own and own[name] != saved
            ]
            if differ:
                raise ValueError(
                    f"`resume`: this TIE's settings {', '.join(differ)} differ from the "
                    "interrupted fit's; build the TIE with the same TIEConfig to resume, or "
                    "start a new fit without `resume`."
                )
        shard = distributed_shard()
        world = 1 if shard is None else shard[1]
        if state["world_size"] != world:
            raise ValueError(
                f"`resume`: the checkpoint was written by {state['world_size']} processes, "
                f"this run has {world}."
            )
        device, dtype = model_device_dtype(self.model)
        load_fitting_state(unwrap_distributed(self.model), state["classifier"], "`checkpoint`")
        self._load_masters(state.get("classifier_masters"))
        self.optimizer.load_state_dict(state["optimizer"])
        restore_inversion(
            self.inversion,
            state["inversion"],
            self.generator_steps,
            self.inversion.batch_size,
            _INVERSION_SETTING_NAMES,
        )
        self.pool = state["pool"].to(device=device, dtype=dtype)
        self.epoch = int(state["epoch"])
        self.stopped = bool(state["stopped"])
        self.log = {key: list(values) for key, values in state["log"].items()}
        return int(state["fit_epoch"]), int(state["fit_start"])

    @log_usage()
    @leaves_inference_mode
    def fit(
        self,
        inputs: Tensor,
        labels: Tensor,
        epochs: int = 10,
        *,
        progress: bool = True,
        checkpoint: str | os.PathLike | None = None,
        resume: bool = False,
    ) -> dict[str, list[float]]:
        r"""Run TIE epochs (train, invert, exclude) until few samples are excluded.

        Each epoch trains the classifier for one epoch, the generator for
        ``generator_steps`` steps, samples ``samples_per_class`` inverted images per class
        and excludes the uncertain ones (all with ``baseline="all"``) into the garbage pool.
        The fit stops after an epoch whose excluded fraction is below ``stop_fraction`` or
        after ``epochs`` epochs; then (``final_training``) the classifier trains one more
        epoch on the final pool when the last epoch added to it. A later call continues
        from the current state.

        Args:
            inputs (Tensor): ``N x C x H x W`` in-distribution training images, in the
                classifier's input space (moved to the classifier's device and dtype).
                Under ``torchrun`` give every rank the full data (the fit shards it
                itself): the number of images, the first and last ones and the labels are
                compared before training, and ranks given different data are refused with
                a ``ValueError`` on every rank.
            labels (Tensor): ``(N,)`` their classes in ``0..n - 1``.
            epochs (int, optional): Maximum number of epochs of this call. Default: 10
            progress (bool, optional): Show a tqdm bar (rank 0). Default: True
            checkpoint (str or PathLike, optional): File written atomically (rank 0) after
                every epoch: classifier, its optimiser, generator state (with its optimiser
                and random streams), garbage pool, log and counters. Default: None
            resume (bool, optional): Continue the interrupted fit stored in ``checkpoint``
                (same ``epochs``, TIEConfig and number of processes: another setting is
                refused by name, not replaced by the checkpoint's); the result is identical
                to an uninterrupted run with the same seed on the same machine (under
                torchrun the checkpoint holds rank 0's loss records, so after a resume the
                other ranks' records of the earlier epochs are rank 0's). Starts from
                the beginning when the file does not exist yet. Default: False

        Returns:
            dict[str, list[float]]: This call's per-epoch records (see ``log``).

        Raises:
            ValueError: ``inputs`` hold NaN or infinite values, have the wrong shape, or
                ``labels`` are not classes ``0..n - 1`` (checked before any training);
                under torchrun, ranks given different data, or one of these checks that
                failed on another rank (named, with its message; the failing rank raises
                its own error).
            FloatingPointError: the classifier's training loss, or its outputs on the
                inverted samples, became NaN or infinite (e.g. a too large ``lr``).

        A fit that raises (or is interrupted) leaves this TIE as it was before the call:
        the classifier's parameters, buffers and flags, the generator, both optimisers, the
        pool, the log and the counters are restored; a ``checkpoint`` written by the
        failed call keeps its progress for ``resume=True``.
        """
        # under torch.distributed every check before the first collective ends in one
        # gathering step: a check that fails on one process raises on every process, and
        # processes given different data are refused (with different numbers of examples
        # they took different numbers of steps, and gloo aborted the job inside DDP)
        with checked_on_every_rank("TIE.fit") as agreement:
            inputs = self._check_inputs(inputs)
            labels = self._check_labels(labels, inputs.shape[0])
            if inputs.shape[0] == 0:
                raise ValueError("`inputs` must hold at least one image.")
            epochs = check_int(epochs, "epochs")
            if checkpoint is not None and not isinstance(checkpoint, str | os.PathLike):
                raise TypeError(f"`checkpoint` must be a path, got {type(checkpoint).__name__}.")
            if resume and checkpoint is None:
                raise ValueError("`resume=True` needs the `checkpoint` file to resume from.")
            writable_path_argument(checkpoint, "checkpoint")  # before any step
            device, dtype = model_device_dtype(self.model)
            inputs = inputs.detach().to(device=device, dtype=dtype)
            labels = labels.to(device)
            per_class = self.samples_per_class or max(
                1, math.ceil(inputs.shape[0] / (self.num_classes * (self.num_classes + 1)))
            )
            if distributed_shard() is not None:  # first and last images, every label
                agreement.same_data(
                    "`inputs`",
                    inputs.shape[0],
                    tensor_fingerprint(inputs[:1], inputs[-1:], labels),
                    whole="the full data",
                )

        snapshot = self._snapshot()
        try:
            return self._fit(
                inputs, labels, epochs, per_class, progress, checkpoint, resume, device
            )
        except BaseException:
            self._rollback(snapshot)
            raise

    def _fit(self, inputs, labels, epochs, per_class, progress, checkpoint, resume, device):
        start, fit_start = 0, len(self.log["epoch"])
        if resume and os.path.isfile(os.fspath(checkpoint)):
            state = load_checkpoint(checkpoint, map_location=device)
            start, fit_start = self._restore(state, epochs)
            if self.stopped:
                start = epochs  # no more TIE epochs; only the final training may be left
        else:
            self.stopped = False
        if self.pool is None:
            self._seed_pool(inputs)

        bar = progress_bar(epochs, bool(progress), desc="TIE", unit="epoch", initial=start)
        try:
            with gradients_on():
                for i in range(start, epochs):
                    record = {"epoch": float(self.epoch + 1)}
                    record.update(self._train_classifier(inputs, labels, self.epoch))
                    record.update(self._invert_and_exclude(per_class, self.epoch))
                    record["pool_size"] = float(self.pool.shape[0])
                    for key in _LOG_KEYS:
                        self.log[key].append(record[key])
                    self.epoch += 1
                    self.stopped = (
                        self.baseline == "uncertain"
                        and record["excluded_fraction"] < self.stop_fraction
                    )
                    if bar:
                        bar.update(1)
                        bar.set_postfix(
                            acc=f"{record['accuracy']:.3f}",
                            pool=int(record["pool_size"]),
                            excluded=f"{record['excluded_fraction']:.2f}",
                            refresh=False,
                        )
                    self._save(checkpoint, i + 1, epochs, fit_start)
                    if self.stopped:
                        break
                if self._needs_final_training():
                    record = {key: math.nan for key in _LOG_KEYS}
                    record.update(self._train_classifier(inputs, labels, self.epoch))
                    record.update(epoch=float(self.epoch + 1), sampled=0.0, excluded=0.0)
                    record["pool_size"] = float(self.pool.shape[0])
                    for key in _LOG_KEYS:
                        self.log[key].append(record[key])
                    self.epoch += 1
                    self._save(checkpoint, epochs, epochs, fit_start)
        finally:
            self.model.eval()
            if bar:
                bar.close()
        return {key: values[fit_start:] for key, values in self.log.items()}

    def _snapshot(self) -> dict[str, Any]:
        """Everything a fit changes, copied (tensors to the CPU, so that no accelerator memory
        is held), so that a failed fit can be undone."""
        inversion = self.inversion
        modules = [unwrap_distributed(self.model), unwrap_distributed(self.generator)]
        params = [p for m in modules for p in m.parameters()]
        return {
            "classifier": _cpu_copy(unwrap_distributed(self.model).state_dict()),
            "classifier_masters": _cpu_copy([master for _, master in self._masters]),
            "optimizer": _cpu_copy(self.optimizer.state_dict()),
            "generator": _cpu_copy(unwrap_distributed(self.generator).state_dict()),
            "generator_optimizer": _cpu_copy(inversion.optimizer.state_dict()),
            "generator_step": inversion._step,
            "generator_history": copy.deepcopy(inversion.history),
            "generator_rng": copy.deepcopy(inversion._rng),
            "training": [(m, m.training) for module in modules for m in module.modules()],
            "flags": [(p, p.requires_grad, p.grad) for p in params],
            "pool": self.pool,  # never changed in place (each epoch makes a new tensor)
            "epoch": self.epoch,
            "stopped": self.stopped,
            "log": copy.deepcopy(self.log),
        }

    def _rollback(self, snapshot: Mapping[str, Any]) -> None:
        """Put back the state :meth:`_snapshot` copied (parameters and buffers in place)."""
        inversion = self.inversion
        with torch.no_grad():
            unwrap_distributed(self.model).load_state_dict(snapshot["classifier"])
            unwrap_distributed(self.generator).load_state_dict(snapshot["generator"])
        self._load_masters(snapshot["classifier_masters"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        inversion.optimizer.load_state_dict(snapshot["generator_optimizer"])
        inversion._step = snapshot["generator_step"]
        inversion.history = snapshot["generator_history"]
        inversion._rng = snapshot["generator_rng"]
        for module, training in snapshot["training"]:
            module.training = training
        for param, requires_grad, grad in snapshot["flags"]:
            param.requires_grad_(requires_grad)
            param.grad = grad
        self.pool = snapshot["pool"]
        self.epoch = snapshot["epoch"]
        self.stopped = snapshot["stopped"]
        self.log = snapshot["log"]

    def _load_masters(self, masters: Sequence[Tensor] | None) -> None:
        """The float32 master copies as saved (None, or another number of them, as in a
        checkpoint written before they were saved: from the classifier's parameters)."""
        with torch.no_grad():
            if masters is not None and len(masters) == len(self._masters):
                for (_, master), saved in zip(self._masters, masters, strict=True):
                    master.copy_(saved)
        self._masters_follow_model()

    def _needs_final_training(self) -> bool:
        """The last log row is a TIE epoch that added samples the classifier has not seen."""
        return (
            self.final_training
            and bool(self.log["sampled"])
            and self.log["sampled"][-1] > 0
            and self.log["excluded"][-1] > 0
        )

    def _save(self, checkpoint, fit_epoch: int, epochs: int, fit_start: int) -> None:
        if checkpoint is None:
            return
        state = self._checkpoint_state(fit_epoch, epochs, fit_start)
        # rank 0 writes; every rank returns once it has (a failed write raises on every rank)
        written_on_main_process(
            lambda: save_checkpoint(state, checkpoint), what="writing the checkpoint"
        )

    # ----------------------------------------------------------------- inference
    def _probabilities(
        self, inputs: Tensor, batch_size: int = 256, *, precise: bool = False
    ) -> Tensor:
        """Softmax of the n + 1 logits, in float32 at least (float64 where ``precise`` and the
        device has it)."""
        model = self.model
        device, dtype = model_device_dtype(model)
        out = []
        with preserved_state([model]), torch.no_grad():
            model.eval()
            for chunk in inputs.split(batch_size):
                logits = model(chunk.to(device=device, dtype=dtype))
                wide = torch.promote_types(logits.dtype, torch.float32)
                if precise:
                    wide = precise_dtype(logits.device)
                out.append(torch.softmax(logits.to(wide), dim=1))
        if not out:
            return torch.empty(0, self.num_classes + 1, device=device)
        return torch.cat(out)

    def probabilities(self, inputs: Tensor, *, batch_size: int = 256) -> Tensor:
        r"""Softmax probabilities of the ``n + 1`` classes (the last one is garbage).

        Args:
            inputs (Tensor): ``N x C x H x W`` images in the classifier's input space,
                finite (NaN or infinite values are refused with a ``ValueError``, as by
                :meth:`fit`).
            batch_size (int, optional): Images per forward pass. Default: 256

        Returns:
            Tensor: ``N x (n + 1)``, on the device of ``inputs`` (float32 at least).
        """
        inputs = self._check_inputs(inputs)
        batch_size = check_int(batch_size, "batch_size")
        return self._probabilities(inputs, batch_size).to(inputs.device)

    def predict(self, inputs: Tensor, *, batch_size: int = 256) -> TIEPrediction:
        r"""Class or garbage, with confidence.

        .. code-block:: text

            k = argmax_{c in 0..n} p_c      (k = n: garbage, out of distribution)
            confidence = p_k

        Args:
            inputs (Tensor): ``N x C x H x W`` images in the classifier's input space,
                finite (NaN or infinite values are refused with a ``ValueError``, as by
                :meth:`fit`).
            batch_size (int, optional): Images per forward pass. Default: 256

        Returns:
            TIEPrediction: ``labels`` (``n`` = garbage), ``confidence``, ``is_garbage``.

        Examples::

            >>> from captum_ext.bundled import BUNDLED_INVERSION_OPTIONS
            >>> from captum_ext.inversion import TIE
            >>> tie = TIE(model, **BUNDLED_INVERSION_OPTIONS)   # then tie.fit(...), see TIE
            >>> result = tie.predict(images)
            >>> unknown = images[result.is_garbage]            # sent to the garbage class
            >>> result.labels.shape, tie.garbage_class
            (torch.Size([40]), 10)
        """
        probs = self.probabilities(inputs, batch_size=batch_size)
        confidence, predicted = probs.max(1)
        return TIEPrediction(predicted, confidence, predicted == self.num_classes)

    def ood_score(self, inputs: Tensor, kind: str = "max_in", *, batch_size: int = 256) -> Tensor:
        r"""Out-of-distribution score: HIGHER = MORE out of distribution.

        .. code-block:: text

            "max_in":  1 - max_{c < n} p_c      (the paper's score)
            "ue":      UE(p) over the n + 1 probabilities (see uncertainty_ue)
            "garbage": p_n

        The metric functions of :mod:`captum_ext.metrics` (``auroc``, ``aupr``,
        ``fpr_at_tpr``) expect higher = more in-distribution: give them
        :meth:`in_distribution_score` (``1 - ood_score``; negating gives the same metrics).

        Args:
            inputs (Tensor): ``N x C x H x W`` images in the classifier's input space,
                finite (NaN or infinite values are refused with a ``ValueError``, as by
                :meth:`fit`).
            kind (str, optional): ``"max_in"``, ``"ue"`` or ``"garbage"``.
                Default: ``"max_in"``
            batch_size (int, optional): Images per forward pass. Default: 256

        Returns:
            Tensor: ``(N,)`` scores in ``[0, 1]`` on the device of ``inputs``.
        """
        if kind not in OOD_SCORE_KINDS:
            raise ValueError(f"`kind` must be one of {list(OOD_SCORE_KINDS)}, got {kind!r}.")
        probs = self.probabilities(inputs, batch_size=batch_size)
        n = self.num_classes
        if kind == "max_in":  # 1 - max_{c<n} p_c as the sum of the other probabilities
            top = probs[:, :n].argmax(1, keepdim=True)
            return probs.scatter(1, top, 0.0).sum(1)
        if kind == "ue":
            return uncertainty_ue(probs)
        return probs[:, n]

    def in_distribution_score(
        self, inputs: Tensor, kind: str = "max_in", *, batch_size: int = 256
    ) -> Tensor:
        r"""``1 - ood_score(inputs, kind)``: HIGHER = MORE in-distribution, the orientation of
        :func:`captum_ext.metrics.auroc`, ``aupr`` and ``fpr_at_tpr``. For ``"max_in"`` it is
        ``max_{c < n} p_c``. Computed in float64 (where the device has it): in float32
        ``1 - p_garbage`` is exactly 1 for every ``p_garbage`` below 6e-8, and those ties
        changed the metrics (negating :meth:`ood_score` would not have them). ``inputs``
        and ``batch_size`` as in :meth:`ood_score` (images holding NaN or infinite values
        are refused).

        Examples::

            >>> from captum_ext.bundled import BUNDLED_INVERSION_OPTIONS
            >>> from captum_ext.inversion import TIE
            >>> from captum_ext.metrics import auroc
            >>> tie = TIE(model, **BUNDLED_INVERSION_OPTIONS)   # then tie.fit(...), see TIE
            >>> letters = torch.rand(40, 1, 28, 28)             # stand-in out-of-distribution set
            >>> separation = auroc(tie.in_distribution_score(images),
            ...                    tie.in_distribution_score(letters))
            >>> 0.0 <= separation <= 1.0
            True
        """
        if kind not in OOD_SCORE_KINDS:
            raise ValueError(f"`kind` must be one of {list(OOD_SCORE_KINDS)}, got {kind!r}.")
        inputs = self._check_inputs(inputs)
        batch_size = check_int(batch_size, "batch_size")
        probs = self._probabilities(inputs, batch_size, precise=True).to(inputs.device)
        n = self.num_classes
        if kind == "max_in":
            return probs[:, :n].amax(1)
        if kind == "ue":
            return 1.0 - uncertainty_ue(probs)
        return 1.0 - probs[:, n]
