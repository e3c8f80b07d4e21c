r"""Designed networks whose true attribution is known exactly (AttributionLab's idea).

A trained network's "true" explanation is unknown, so an attribution method can only be judged
against proxies. Here the weights are *designed*, not trained: each network computes a
function whose attribution follows from its definition, so a method's map can be compared with
the exact ground truth, offline and on any device.

Three oracles:

- :func:`~captum_ext.testing.dominant_colour_oracle` -- images made of a few palette colours; a
  small ReLU CNN detects each colour pixel by pixel (1x1 convolutions) and counts the pixels of each
  colour. The logit of colour :math:`k` is

  .. math::  z_k(x) = n_k(x) - \frac{1}{K - 1}\sum_{j \ne k} n_j(x),

  where :math:`n_j(x)` is the number of pixels of colour :math:`j`. The function is a sum of
  per-pixel terms, so the exact (signed) attribution of a pixel to :math:`z_k` is its own term:
  :math:`+1` for a pixel of colour :math:`k`, :math:`-1/(K-1)` for a pixel of another colour,
  0 for background (black). Adding or removing any pixel of a colour moves the logit by exactly
  that amount.
- :func:`~captum_ext.testing.null_region_oracle` -- a fixed, randomly initialised ReLU CNN applied
  to the image with a region multiplied by zero: no attribution may fall in that region (a null
  player).
- :func:`~captum_ext.testing.interaction_oracle` -- two patches that are either lit (all ones)
  or dark; the logits are :math:`\mathrm{AND}(a, b) = \mathrm{ReLU}(a + b - 1)` and
  :math:`\mathrm{XOR}(a, b) = \mathrm{ReLU}(a - b) + \mathrm{ReLU}(b - a)` of the patch
  indicators. The ground truth is each patch's Shapley value (relative to both patches dark),
  spread evenly over its pixels: for AND with both lit, 1/2 each; for XOR with both lit, 0 each.

Each oracle returns an :class:`Oracle`: the model (in eval mode), inputs, targets, the designed
baseline (the input that the ground truth is relative to) and the ground-truth maps
``(N, 1, H, W)``. :meth:`~captum_ext.testing.Oracle.sample` draws fresh inputs. Score a method's
maps against the ground truth with :func:`captum_ext.metrics.attribution_f1`.

Reference: Y. Zhang, S. Li, ..., A. Khakzar, K. Kawaguchi, "AttributionLab: faithfulness of
feature attribution under controllable environments" (2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from captum_ext._utils.seeding import seeded_rng
from captum_ext._utils.validation import check_int, check_number

__all__ = [
    "Oracle",
    "dominant_colour_oracle",
    "interaction_oracle",
    "null_region_oracle",
]

# eight colours, none black, no two closer than 0.5 in L1 distance (orange is 0.5 from red
# and from yellow): the detectors' ReLU(1 - 2 d) is exactly 0 for every other colour
_PALETTE = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
    (0.0, 1.0, 1.0),
    (1.0, 1.0, 1.0),
    (1.0, 0.5, 0.0),
)


@dataclass(frozen=True)
class Oracle:
    """A designed network with inputs and their exact ground-truth attributions.

    Attributes:
        name (str): which oracle.
        model (nn.Module): the designed network, in eval mode; ``model(inputs)`` gives
            ``(N, classes)`` logits.
        inputs (Tensor): ``(N, C, H, W)`` inputs.
        target (Tensor): ``(N,)`` the class whose logit the ground truth explains.
        baselines (Tensor): ``(1, C, H, W)``: the reference input the ground truth is
            relative to, for :attr:`inputs` and for the inputs of :meth:`sample` alike (black
            for the colour counter, zero for the null region, black for the interaction cell:
            both patches dark, and the pixels outside them do not enter the network).
        ground_truth (Tensor): ``(N, 1, H, W)`` exact attribution of each pixel (summed over
            channels) to ``model(inputs)[n, target[n]]`` relative to ``baselines``, except
            for ``null_region_oracle``, whose ground truth is the 0/1 indicator of the pixels
            the model sees (it sums to the visible area, not to the logit difference).
        sampler (Callable): ``sampler(n, generator) -> (inputs, target, ground_truth)``; a
            module-level callable holding the oracle's model, so an Oracle pickles (spawn
            workers, DataLoader workers) and a deep copy's sampler uses the copy's model.
    """

    name: str
    model: nn.Module
    inputs: Tensor
    target: Tensor
    baselines: Tensor
    ground_truth: Tensor
    sampler: Callable[[int, torch.Generator], tuple[Tensor, Tensor, Tensor]]

    def sample(self, n: int, *, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` fresh ``(inputs, target, ground_truth)`` drawn with ``seed`` (an int >= 0;
        the same seed draws the same examples). ``baselines`` holds for them too."""
        n = check_int(n, "n")
        seed = check_int(seed, "seed", minimum=0)
        generator = torch.Generator().manual_seed(seed)
        return self.sampler(n, generator)


# ---------------------------------------------------------------------------------------------
# samplers: module-level callables holding what they draw from as attributes (not closures),
# so that an Oracle pickles (spawn workers, DataLoader workers) and a deep copy's sampler uses
# the copy's model


class _DominantColourSampler:
    """``(count, generator) -> (images, target, ground_truth)`` of the dominant-colour oracle:
    images of ``palette`` colours, the target ``model``'s predicted (dominant) colour."""

    def __init__(self, model: nn.Module, palette: Tensor, size: int, fill: float) -> None:
        self.model, self.palette, self.size, self.fill = model, palette, size, fill

    def __call__(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        images, labels = _colour_images(self.palette, count, self.size, self.fill, generator)
        target = self.model(images).argmax(dim=1)
        others = -1.0 / (self.palette.shape[0] - 1)
        truth = torch.where(labels == target.view(-1, 1, 1, 1), 1.0, others)
        truth = torch.where(labels < 0, 0.0, truth)
        return images, target, truth

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(colours={self.palette.shape[0]}, size={self.size}, "
            f"fill={self.fill})"
        )


class _NullRegionSampler:
    """``(count, generator) -> (images, target, ground_truth)`` of the null-region oracle:
    uniform noise, the target ``model``'s prediction, the ground truth ``keep``."""

    def __init__(self, model: nn.Module, keep: Tensor, channels: int) -> None:
        self.model, self.keep, self.channels = model, keep, channels

    def __call__(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        size = self.keep.shape[-1]
        images = torch.rand(count, self.channels, size, size, generator=generator)
        with torch.no_grad():
            target = self.model(images).argmax(dim=1)
        return images, target, self.keep.expand(count, 1, size, size).clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels}, size={self.keep.shape[-1]})"


class _InteractionSampler:
    """``(count, generator) -> (images, target, ground_truth)`` of the interaction oracle:
    patches ``patch_a`` and ``patch_b`` (0 / 1 masks of ``area`` pixels each) lit or dark,
    noise elsewhere, and each patch's Shapley value spread over its pixels."""

    def __init__(self, patch_a: Tensor, patch_b: Tensor, area: float) -> None:
        self.patch_a, self.patch_b, self.area = patch_a, patch_b, area

    def __call__(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        patch_a, patch_b = self.patch_a, self.patch_b
        size = patch_a.shape[-1]
        lit = torch.randint(2, (count, 2), generator=generator).float()
        target = torch.randint(2, (count,), generator=generator)
        noise = torch.rand(count, 1, size, size, generator=generator)
        outside = 1.0 - patch_a - patch_b
        images = noise * outside + lit[:, 0, None, None, None] * patch_a
        images = images + lit[:, 1, None, None, None] * patch_b
        a, b = lit[:, 0], lit[:, 1]
        phi_and = torch.stack([a * b / 2, a * b / 2], dim=1)
        phi_xor = torch.stack([a * (1 - b), b * (1 - a)], dim=1)
        phi = torch.where(target.view(-1, 1) == 0, phi_and, phi_xor)
        truth = phi[:, 0, None, None, None] * patch_a + phi[:, 1, None, None, None] * patch_b
        return images, target, truth / self.area

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.patch_a.shape[-1]}, area={self.area:g})"


# ---------------------------------------------------------------------------------------------
# dominant colour


class DominantColourCounter(nn.Module):
    r"""Counts the pixels of each palette colour; logits ``n_k - mean_{j != k} n_j``.

    Layers: ``detect_difference`` (1x1 conv, ReLU) computes :math:`\mathrm{ReLU}(x - c_k)` and
    :math:`\mathrm{ReLU}(c_k - x)` per channel; ``detect`` (1x1 conv, ReLU) turns their sum
    (the L1 distance to :math:`c_k`) into :math:`\mathrm{ReLU}(1 - 2\,\|x - c_k\|_1)`, which is 1
    on a pixel of colour :math:`k` and 0 on black and on every other palette colour; ``count``
    sums over the image and ``head`` (Linear) forms the logits.

    That holds when the detector of each colour is exactly 0 on black and on the others, i.e.
    :math:`1 - 2\,\|c_j - c_k\|_1 \le 0`: every two palette colours are at least 0.5 apart
    in L1 distance, and every colour at least 0.5 from black (:math:`\|c_k\|_1 \ge 0.5`).
    A closer palette is refused, as is one of fewer than 2 colours (the head divides by
    :math:`K - 1`).

    Args:
        palette (Tensor): ``(K, C)`` colours, ``K >= 2``, finite; integer or bool colours are
            read as floats.
    """

    def __init__(self, palette: Tensor) -> None:
        super().__init__()
        if not isinstance(palette, Tensor) or palette.dim() != 2 or palette.is_complex():
            raise TypeError(
                "`palette` must be a real (colours, channels) tensor, got "
                + (
                    f"{palette.dtype} {tuple(palette.shape)}"
                    if isinstance(palette, Tensor)
                    else type(palette).__name__
                )
                + "."
            )
        if not palette.is_floating_point():  # integer or bool colours (0 / 1)
            palette = palette.float()
        _check_palette(palette)
        k, c = palette.shape
        # the layers' default initialisation (overwritten below) must not draw from the
        # caller's random stream
        with seeded_rng(None, cuda_devices=()):
            self.detect_difference = nn.Conv2d(c, 2 * c * k, kernel_size=1)
            self.detect = nn.Conv2d(2 * c * k, k, kernel_size=1)
            self.relu1 = nn.ReLU()
            self.relu2 = nn.ReLU()
            self.head = nn.Linear(k, k)
        with torch.no_grad():
            w1 = torch.zeros(2 * c * k, c)
            b1 = torch.zeros(2 * c * k)
            w2 = torch.zeros(k, 2 * c * k)
            for colour in range(k):
                for ch in range(c):
                    up, down = 2 * (colour * c + ch), 2 * (colour * c + ch) + 1
                    w1[up, ch], b1[up] = 1.0, -palette[colour, ch]
                    w1[down, ch], b1[down] = -1.0, palette[colour, ch]
                    w2[colour, up] = w2[colour, down] = -2.0
            self.detect_difference.weight.copy_(w1[:, :, None, None])
            self.detect_difference.bias.copy_(b1)
            self.detect.weight.copy_(w2[:, :, None, None])
            self.detect.bias.fill_(1.0)
            others = -1.0 / (k - 1)
            self.head.weight.copy_(torch.full((k, k), others).fill_diagonal_(1.0))
            self.head.bias.zero_()
        self.register_buffer("palette", palette.clone())
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        detected = self.relu2(self.detect(self.relu1(self.detect_difference(x))))
        counts = detected.sum(dim=(2, 3))
        return self.head(counts)


def _check_palette(palette: Tensor) -> None:
    """Refuse a palette for which the detectors' ``ReLU(1 - 2 d)`` is not exactly 0 on black
    and on the other colours (``d`` the L1 distance), by name."""
    k, c = palette.shape
    if k < 2 or c < 1:
        raise ValueError(
            f"`palette` must hold at least 2 colours of at least 1 channel, got shape "
            f"{tuple(palette.shape)}: the logits compare each colour with the others."
        )
    if not bool(torch.isfinite(palette).all()):
        raise ValueError("`palette` contains NaN or infinite values.")
    # the colours as the network's float32 weights hold them
    colours = palette.detach().float().cpu().double()
    with_black = torch.cat([colours, torch.zeros(1, c, dtype=torch.float64)])
    distance = torch.cdist(colours, with_black, p=1)
    distance[:, :k].fill_diagonal_(float("inf"))
    close = (distance < 0.5).nonzero().tolist()
    if close:
        i, j = close[0]

        def shown(row: int) -> str:
            return "(" + ", ".join(f"{float(v):.6g}" for v in colours[row]) + ")"

        other = "black" if j == k else f"colour {j} {shown(j)}"
        raise ValueError(
            f"`palette`: colour {i} {shown(i)} is {float(distance[i, j]):.6g} from "
            f"{other} in L1 distance; the detectors ReLU(1 - 2 d) need every two colours, and "
            "every colour and black (the background), at least 0.5 apart, or a pixel is "
            "counted for more than one colour."
        )


def _colour_images(
    palette: Tensor, n: int, size: int, fill: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Images whose pixels are black or a palette colour, one colour dominant per image."""
    k = palette.shape[0]
    pixels = size * size
    dominant = torch.randint(k, (n,), generator=generator)
    labels = torch.full((n, pixels), -1, dtype=torch.long)
    for i in range(n):
        coloured = int(round(fill * pixels))
        order = torch.randperm(pixels, generator=generator)[:coloured]
        # the dominant colour takes a clear majority; the rest is shared by the others
        share = torch.rand(k, generator=generator) + 0.2
        share[dominant[i]] = share.sum() + 1.0
        counts = torch.floor(share / share.sum() * coloured).long()
        counts[dominant[i]] += coloured - int(counts.sum())
        colours = torch.repeat_interleave(torch.arange(k), counts)
        labels[i, order] = colours[torch.randperm(coloured, generator=generator)]
    images = torch.zeros(n, palette.shape[1], pixels)
    coloured_mask = labels >= 0
    images.permute(0, 2, 1)[coloured_mask] = palette[labels[coloured_mask]]
    return images.view(n, -1, size, size), labels.view(n, 1, size, size)


def dominant_colour_oracle(
    n: int = 8, *, size: int = 16, colours: int = 3, fill: float = 0.6, seed: int = 0
) -> Oracle:
    r"""The dominant-colour counter and ``n`` images with their exact ground truth.

    Each image has ``fill`` of its ``size x size`` pixels coloured from the first ``colours``
    colours of a fixed palette (one colour holds the majority), the rest black. The target is
    the dominant colour; the ground truth of a pixel is :math:`+1` if it has the target's
    colour, :math:`-1/(K-1)` if it has another colour, 0 if black (see the module docstring).

    Args:
        n (int): number of images. Default: 8.
        size (int): image height and width. Default: 16.
        colours (int): number of colours K, 2 to 8. Default: 3.
        fill (float): fraction of coloured pixels, in (0, 1]. Default: 0.6.
        seed (int): seed of the images. Default: 0.

    Returns:
        Oracle: ``model`` is a :class:`DominantColourCounter`; ``baselines`` is black.

    Examples::

        >>> from captum.attr import IntegratedGradients
        >>> from captum_ext.metrics import attribution_f1
        >>> from captum_ext.testing import dominant_colour_oracle
        >>> oracle = dominant_colour_oracle(4)
        >>> ig = IntegratedGradients(oracle.model)
        >>> maps = ig.attribute(oracle.inputs, baselines=oracle.baselines, target=oracle.target)
        >>> f1 = attribution_f1(maps.sum(1, keepdim=True), oracle.ground_truth)
        >>> bool((f1 > 0.99).all())
        True
    """
    n = check_int(n, "n")
    size = check_int(size, "size")
    colours = check_int(colours, "colours", minimum=2)
    if colours > len(_PALETTE):
        raise ValueError(f"`colours` must be at most {len(_PALETTE)}, got {colours}.")
    fill = check_number(fill, "fill", maximum=1.0)
    seed = check_int(seed, "seed", minimum=0)
    if round(fill * size * size) < 1:
        raise ValueError(
            f"`fill`={fill} of {size} x {size} pixels rounds to no coloured pixel: every image "
            "would be black, with no dominant colour to explain; raise `fill` or `size`."
        )
    palette = torch.tensor(_PALETTE[:colours])
    model = DominantColourCounter(palette)
    sampler = _DominantColourSampler(model, palette, size, fill)
    inputs, target, truth = sampler(n, torch.Generator().manual_seed(seed))
    return Oracle(
        name="dominant colour",
        model=model,
        inputs=inputs,
        target=target,
        baselines=torch.zeros(1, 3, size, size),
        ground_truth=truth,
        sampler=sampler,
    )


# ---------------------------------------------------------------------------------------------
# null region


class MaskedInputNet(nn.Module):
    """A fixed ReLU CNN that sees ``x * keep``: pixels where ``keep`` is 0 cannot matter.

    Args:
        keep (Tensor): finite mask the ``(N, channels, H, W)`` inputs are multiplied by, with
            torch's broadcasting: ``(H, W)``, ``(channels, H, W)``, ``(1, 1, H, W)``, a
            per-example ``(N, 1, H, W)``, or any shape whose sizes are 1 where the mask is the
            same along that dimension (``(1, 1, 1, W)`` masks columns). A mask of fewer than
            4 dimensions is kept as 4 (leading 1s added, as broadcasting does); a copy is
            kept, integer and bool masks as floats.
        channels (int): input channels.
        classes (int): number of logits.
        seed (int): seed of the fixed weights (numpy integers are accepted).
    """

    def __init__(self, keep: Tensor, channels: int, classes: int, seed: int) -> None:
        super().__init__()
        channels = check_int(channels, "channels")
        classes = check_int(classes, "classes")
        seed = check_int(seed, "seed", minimum=0)  # numpy integers pass, as ints
        keep = _keep_mask(keep, channels)
        with seeded_rng(seed, cuda_devices=()):  # built on the CPU
            self.features = nn.Sequential(
                nn.Conv2d(channels, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1),
                nn.ReLU(),
            )
            self.head = nn.Linear(8, classes)
        self.register_buffer("keep", keep)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not _broadcasts_to(self.keep.shape, x.shape):
            sizes = [
                str(size) if size != 1 else letter
                for size, letter in zip(self.keep.shape, ("N", "C", "H", "W"))
            ]
            raise ValueError(
                f"MaskedInputNet: its `keep` mask {tuple(self.keep.shape)} is for "
                f"({', '.join(sizes)}) images, got inputs of shape {tuple(x.shape)}."
            )
        return self.head(self.features(x * self.keep).mean(dim=(2, 3)))


def _broadcasts(*shapes: torch.Size | tuple[int, ...]) -> bool:
    """Whether tensors of these shapes broadcast against each other."""
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return False
    return True


def _broadcasts_to(mask: torch.Size, inputs: torch.Size) -> bool:
    """Whether a ``mask`` of this shape broadcasts to ``inputs`` without enlarging them (inputs
    of 1 x 1 pixels, or a batch of 1 against a mask of 4 examples, are refused, not
    expanded)."""
    return _broadcasts(mask, inputs) and tuple(torch.broadcast_shapes(mask, inputs)) == tuple(
        inputs
    )


def _keep_mask(keep: Tensor, channels: int) -> Tensor:
    """A 4-D copy of ``keep`` (leading 1s added to a mask of fewer dimensions, as
    broadcasting does), after refusing, by name, what is not a finite real mask that
    broadcasts against ``(1, channels, H, W)`` images, none of its sizes 0 (integer and
    bool masks read as floats)."""
    if not isinstance(keep, Tensor) or keep.is_complex():
        got = f"{keep.dtype} tensor" if isinstance(keep, Tensor) else type(keep).__name__
        raise TypeError(
            f"`keep` must be a real tensor (the mask the inputs are multiplied by), got {got}."
        )
    wrong_channels = keep.dim() >= 3 and keep.shape[-3] not in (1, channels)
    if keep.dim() > 4 or 0 in keep.shape or wrong_channels:
        raise ValueError(
            f"`keep` must be a mask that broadcasts against (N, channels={channels}, H, W) "
            "images, such as (H, W), (channels, H, W), (1, 1, H, W) or a per-example "
            f"(N, 1, H, W), got shape {tuple(keep.shape)}."
        )
    keep = keep.detach().reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    keep = keep.clone() if keep.is_floating_point() else keep.float()
    if not bool(torch.isfinite(keep).all()):
        raise ValueError("`keep` contains NaN or infinite values.")
    return keep


def null_region_oracle(
    n: int = 8, *, size: int = 16, channels: int = 3, classes: int = 4, seed: int = 0
) -> Oracle:
    """A network that ignores the right half of its input, with uniform-noise images.

    The right half (columns ``size // 2`` onwards) is multiplied by zero before the first
    layer, so its pixels are null players for every output. The ground truth is 1 on the half
    the network sees and 0 on the null half: judge a map by the share of its mass in the null
    region (exactly 0 for a faithful method) or by :func:`captum_ext.metrics.attribution_f1`
    with ``sign="absolute"`` and ``selection="nonzero"`` (the false positives are the null
    pixels a method marks).

    Args:
        n (int): number of images. Default: 8.
        size (int): image height and width. Default: 16.
        channels (int): input channels. Default: 3.
        classes (int): number of logits. Default: 4.
        seed (int): seed of the fixed weights and of the images. Default: 0.

    Returns:
        Oracle: the target is the predicted class; ``baselines`` is zero.
    """
    n = check_int(n, "n")
    size = check_int(size, "size", minimum=2)
    channels = check_int(channels, "channels")
    classes = check_int(classes, "classes", minimum=2)
    seed = check_int(seed, "seed", minimum=0)
    keep = torch.ones(1, 1, size, size)
    keep[..., size // 2 :] = 0.0
    model = MaskedInputNet(keep, channels, classes, seed)
    sampler = _NullRegionSampler(model, keep, channels)
    inputs, target, truth = sampler(n, torch.Generator().manual_seed(seed + 1))
    return Oracle(
        name="null region",
        model=model,
        inputs=inputs,
        target=target,
        baselines=torch.zeros(1, channels, size, size),
        ground_truth=truth,
        sampler=sampler,
    )


# ---------------------------------------------------------------------------------------------
# interaction cell


class PatchInteractionCell(nn.Module):
    r"""Logits ``[AND(a, b), XOR(a, b)]`` of two patch indicators ``a``, ``b``.

    ``a`` and ``b`` are the mean intensities of two fixed patches (1 when lit, 0 when dark);
    ``AND = ReLU(a + b - 1)``, ``XOR = ReLU(a - b) + ReLU(b - a)``. Pixels outside the patches
    do not enter.

    Args:
        patch_a (Tensor): the first patch, a mask (or non-negative weights) broadcastable to
            the inputs' ``(N, 1, H, W)`` channel mean, with at least one non-zero pixel; it is
            divided by its sum, so ``a`` is the patch's (weighted) mean intensity.
        patch_b (Tensor): the second patch, likewise.
    """

    def __init__(self, patch_a: Tensor, patch_b: Tensor) -> None:
        super().__init__()
        self.register_buffer("patch_a", _patch_weights(patch_a, "patch_a"))
        self.register_buffer("patch_b", _patch_weights(patch_b, "patch_b"))
        # one ReLU module per use, so that methods with per-module rules (DeepLift) apply
        self.relu_and = nn.ReLU()
        self.relu_a_not_b = nn.ReLU()
        self.relu_b_not_a = nn.ReLU()
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        intensity = x.mean(dim=1, keepdim=True)
        a = (intensity * self.patch_a).sum(dim=(1, 2, 3))
        b = (intensity * self.patch_b).sum(dim=(1, 2, 3))
        both = self.relu_and(a + b - 1.0)
        either = self.relu_a_not_b(a - b) + self.relu_b_not_a(b - a)
        return torch.stack([both, either], dim=1)


def _patch_weights(patch: Tensor, argument: str) -> Tensor:
    """``patch`` divided by its sum, after refusing what is not a patch, by name."""
    if not isinstance(patch, Tensor) or patch.is_complex():
        got = f"{patch.dtype} tensor" if isinstance(patch, Tensor) else type(patch).__name__
        raise TypeError(f"`{argument}` must be a real tensor (a mask of the patch), got {got}.")
    patch = patch.detach().clone() if patch.is_floating_point() else patch.float()
    if not bool(torch.isfinite(patch).all()):
        raise ValueError(f"`{argument}` contains NaN or infinite values.")
    if bool((patch < 0).any()):
        raise ValueError(
            f"`{argument}` has negative values; a patch is a 0 / 1 mask (or non-negative weights)."
        )
    total = patch.sum()
    if not bool(total > 0):
        raise ValueError(
            f"`{argument}` is all zero: the patch covers no pixel, so its mean intensity "
            "(the sum divided by the patch's area) is undefined."
        )
    return patch / total


def interaction_oracle(n: int = 8, *, size: int = 12, patch: int = 4, seed: int = 0) -> Oracle:
    r"""Two patches and the AND / XOR of whether each is lit, with Shapley ground truth.

    Patch A sits in the top-left, patch B in the bottom-right corner (``patch x patch`` pixels
    each); the rest of the image is uniform noise the network ignores. Each image lights A, B,
    both or neither, and explains class 0 (AND) or 1 (XOR). The ground truth is each patch's
    Shapley value relative to both patches dark (the ``baselines``: a black image, the same
    as each image with its patches dark since the network ignores the other pixels), spread
    evenly over its pixels:

    ==========  ==========  ======================  ======================
    A lit       B lit       AND: A, B               XOR: A, B
    ==========  ==========  ======================  ======================
    yes         yes         1/2, 1/2                0, 0
    yes         no          0, 0                    1, 0
    no          no          0, 0                    0, 0
    ==========  ==========  ======================  ======================

    Args:
        n (int): number of images. Default: 8.
        size (int): image height and width. Default: 12.
        patch (int): patch side. Default: 4.
        seed (int): seed of the images. Default: 0.

    Returns:
        Oracle: ``model`` is a :class:`PatchInteractionCell` (one channel); ``baselines`` is
        black, ``(1, 1, size, size)``.
    """
    n = check_int(n, "n")
    patch = check_int(patch, "patch")
    size = check_int(size, "size")
    if size < 2 * patch:
        raise ValueError(
            f"`size`={size} and `patch`={patch}: the two patches sit in opposite corners and "
            f"must not overlap, so size >= 2 * patch; use size >= {2 * patch} or patch <= "
            f"{size // 2}."
        )
    seed = check_int(seed, "seed", minimum=0)
    patch_a = torch.zeros(1, 1, size, size)
    patch_a[..., :patch, :patch] = 1.0
    patch_b = torch.zeros(1, 1, size, size)
    patch_b[..., size - patch :, size - patch :] = 1.0
    model = PatchInteractionCell(patch_a, patch_b)
    sampler = _InteractionSampler(patch_a, patch_b, float(patch * patch))
    inputs, target, truth = sampler(n, torch.Generator().manual_seed(seed))
    return Oracle(
        name="interaction",
        model=model,
        inputs=inputs,
        target=target,
        # both patches dark; the pixels outside them do not enter the network, so one black
        # image is "the same image with the patches dark" for every input, sampled ones too
        baselines=torch.zeros(1, 1, size, size),
        ground_truth=truth,
        sampler=sampler,
    )
