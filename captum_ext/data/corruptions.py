r"""Corrupted images, generated offline, in the spirit of MNIST-C and CIFAR-10-C.

Eight corruptions at five severities each, for any batch of images ``(N, C, H, W)`` whose
pixels lie in a known ``value_range``. Every formula works on ``u = (x - low) / (high - low)``
in [0, 1]; the result is clipped to [0, 1] and mapped back to ``value_range``. Random draws
come from ``generator`` (made on the generator's device, the CPU by default, then moved to the
images' device, so a seed gives the same corruption on every device).

Formulas (on ``u``; ``S = min(H, W)``, the tables' pixel sizes are for ``S = 28``) and the
parameter at severities 1 to 5:

- ``"gaussian_noise"``: ``u + sigma * z``, ``z ~ N(0, 1)`` per pixel;
  sigma = 0.08, 0.12, 0.18, 0.26, 0.38.
- ``"shot_noise"``: ``Poisson(lam * u) / lam`` per pixel; lam = 60, 25, 12, 5, 3.
- ``"blur"``: Gaussian blur of std ``s * S / 28`` pixels, separable, truncated at 3 std,
  edges replicated; s = 0.5, 0.75, 1, 1.5, 2.
- ``"contrast"``: ``(u - m) * c + m``, ``m`` the mean of each image; c = 0.4, 0.3, 0.2, 0.1,
  0.05.
- ``"brightness"``: ``u + b``; b = 0.1, 0.2, 0.3, 0.4, 0.5.
- ``"affine"``: rotation by ``±a`` degrees, shear ``±h``, zoom ``z`` or ``1 / z``, and a shift
  by ``t * S`` pixels in a random direction (signs and direction drawn per image); bilinear,
  zeros outside; (a, h, z, t) = (6, 0.05, 0.95, 0.02), (12, 0.1, 0.9, 0.04),
  (18, 0.15, 0.85, 0.06), (24, 0.2, 0.8, 0.08), (30, 0.25, 0.75, 0.1).
- ``"elastic"``: Simard's displacement field: ``U(-1, 1)`` per pixel and axis, smoothed by a
  Gaussian of std ``4 * S / 28`` pixels, times ``alpha * S / 28`` pixels; bilinear, zeros
  outside; alpha = 8, 16, 24, 32, 40.
- ``"fog"``: ``(u + t * f) / (1 + t)``, ``f`` low-frequency noise in [0, 1] (white noise whose
  Fourier amplitude is divided by ``|k|^2``, no constant term, min-max scaled per image and
  channel); t = 0.25, 0.5, 0.75, 1, 1.5.

Choices, and where they follow the references:

- The noise, contrast and brightness tables are ImageNet-C's (Hendrycks & Dietterich): its
  Gaussian-noise sigmas, shot-noise rates, contrast factors and brightness shifts. ImageNet-C's
  brightness adds ``b`` to the V channel in HSV; adding it to every channel is the same for
  grey images and what is done here for colour images too. CIFAR-10-C's blur widths (0.4 to 1
  pixel on 32-pixel images) hardly change the thick strokes of a 28-pixel digit; the widths
  here go from half a pixel to two pixels, scaled with the image side.
- ``"affine"`` gathers MNIST-C's rotate, shear, scale and translate (Mu & Gilmer) into one
  transform whose every part grows with the severity; the sign of each part is random.
  Pixels moved in from outside are 0 (the digits' background), as in MNIST-C.
- ``"elastic"`` is the elastic distortion of Simard, Steinkraus & Platt (ICDAR 2003),
  ``sigma = 4`` pixels on 28-pixel digits, with the displacement scale as the severity
  (their 34 lies between severities 4 and 5).
- ``"fog"`` stands for ImageNet-C's plasma-fractal fog: the same mixing rule
  ``(u + t f) max(u) / (max(u) + t)`` with ``max(u)`` taken as 1, and a ``1 / |k|^2``
  amplitude spectrum instead of the diamond-square algorithm (a Brownian surface: large,
  smooth patches).

With the same ``generator`` seed at every severity, the distance to the clean image grows with
the severity pixel by pixel for ``"gaussian_noise"``, ``"contrast"``, ``"brightness"`` and
``"fog"`` (the same draws, scaled by a larger factor); for ``"shot_noise"``, ``"blur"``,
``"affine"`` and ``"elastic"`` it grows on average over a batch.

Papers: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions
and Perturbations", ICLR 2019 (ImageNet-C, CIFAR-10-C); Mu & Gilmer, "MNIST-C: A Robustness
Benchmark for Computer Vision", ICML 2019 workshop; Simard, Steinkraus & Platt, "Best Practices
for Convolutional Neural Networks Applied to Visual Document Analysis", ICDAR 2003.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_ext._utils.precision import precise_dtype
from captum_ext._utils.seeding import as_generator
from captum_ext._utils.validation import ArgumentTypeError, check_int

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt"]

#: the parameter of each corruption at severities 1 .. 5 (formulas in the module's docstring)
SEVERITIES: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60.0, 25.0, 12.0, 5.0, 3.0),
    "blur": (0.5, 0.75, 1.0, 1.5, 2.0),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    # (rotation in degrees, shear, zoom, shift as a fraction of the side)
    "affine": (
        (6.0, 0.05, 0.95, 0.02),
        (12.0, 0.10, 0.90, 0.04),
        (18.0, 0.15, 0.85, 0.06),
        (24.0, 0.20, 0.80, 0.08),
        (30.0, 0.25, 0.75, 0.10),
    ),
    "elastic": (8.0, 16.0, 24.0, 32.0, 40.0),
    "fog": (0.25, 0.5, 0.75, 1.0, 1.5),
}

#: names accepted by :func:`corrupt`, in the order of the module's docstring
CORRUPTIONS: tuple[str, ...] = tuple(SEVERITIES)

_REFERENCE_SIDE = 28.0  # the tables' pixel sizes are for 28 x 28 digits
_ELASTIC_SMOOTHING = 4.0


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor):
        raise ArgumentTypeError(
            f"`images` must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}."
        )
    if images.dim() != 4:
        raise ValueError(
            f"`images` must have shape (N, C, H, W), got {tuple(images.shape)} "
            f"({images.dim()} dimensions); add a batch dimension with images.unsqueeze(0)."
        )
    if not images.is_floating_point():
        raise ArgumentTypeError(
            f"`images` must be floating point, got {images.dtype}; convert them, e.g. "
            "images.float() / 255 with value_range=(0, 1)."
        )
    if images.numel() == 0:
        raise ValueError(f"`images` is empty: shape {tuple(images.shape)}.")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("`images` holds NaN or infinite values.")
    return images


def _check_range(value_range: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ArgumentTypeError(
            f"`value_range` must be a pair (low, high) of numbers, got {value_range!r}."
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"`value_range`={value_range!r}: expected finite low < high.")
    return low, high


def _check_generator(generator: Any) -> torch.Generator:
    """The conventions' ``generator`` (a torch.Generator or an int seed), with None a seed
    drawn from torch's global random state."""
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from torch's global random state
        return torch.Generator().manual_seed(seed)
    try:
        return as_generator(generator)
    except TypeError as error:  # (also a ValueError, as this function raised before)
        raise ArgumentTypeError(str(error)) from None


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _blur(u: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of every channel, edges replicated (skimage's "nearest")."""
    n, c, h, w = u.shape
    kernel = _gaussian_kernel(sigma, u.dtype, u.device)
    radius = kernel.numel() // 2
    flat = u.reshape(n * c, 1, h, w)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="replicate")
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1))
    flat = F.pad(flat, (0, 0, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def _draw(
    kind: str, shape: tuple[int, ...], generator: torch.Generator, like: Tensor, **kwargs: Any
) -> Tensor:
    """Random numbers drawn on the generator's device in float64 (float32 where the device
    has no float64), then moved to ``like``."""
    device = generator.device
    dtype = precise_dtype(device)
    if kind == "normal":
        values = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    elif kind == "uniform":
        values = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    else:  # poisson with the given rates
        rates = kwargs["rates"].to(device=device, dtype=dtype)
        values = torch.poisson(rates, generator=generator)
    return values.to(device=like.device, dtype=like.dtype)


def _sample(u: Tensor, grid: Tensor) -> Tensor:
    return F.grid_sample(u, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _identity_grid(u: Tensor) -> Tensor:
    n, _, h, w = u.shape
    eye = torch.eye(2, 3, dtype=u.dtype, device=u.device).expand(n, 2, 3)
    return F.affine_grid(eye, [n, 1, h, w], align_corners=False)


def _gaussian_noise(u: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    return u + sigma * _draw("normal", tuple(u.shape), generator, u)


def _shot_noise(u: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    return _draw("poisson", tuple(u.shape), generator, u, rates=u * rate) / rate


def _blur_corruption(u: Tensor, scale: float, generator: torch.Generator) -> Tensor:
    del generator  # deterministic
    return _blur(u, scale * min(u.shape[-2:]) / _REFERENCE_SIDE)


def _contrast(u: Tensor, factor: float, generator: torch.Generator) -> Tensor:
    del generator
    mean = u.mean(dim=(1, 2, 3), keepdim=True)
    return (u - mean) * factor + mean


def _brightness(u: Tensor, shift: float, generator: torch.Generator) -> Tensor:
    del generator
    return u + shift


def _affine(u: Tensor, parameters: tuple[float, ...], generator: torch.Generator) -> Tensor:
    degrees, shear, zoom, shift = parameters
    n, _, h, w = u.shape
    draws = _draw("uniform", (n, 4), generator, u)
    signs = torch.where(draws[:, :3] < 0.5, -1.0, 1.0).to(u)
    angle = signs[:, 0] * math.radians(degrees)
    shear_x = signs[:, 1] * shear
    scale = zoom ** signs[:, 2]
    direction = draws[:, 3] * (2 * math.pi)
    side = min(h, w)
    tx = torch.cos(direction) * (shift * side)  # in pixels
    ty = torch.sin(direction) * (shift * side)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # the forward map in pixel units (rotation . shear . zoom, then the shift), moved to
    # affine_grid's normalised coordinates (x_n = x / (W / 2)) and inverted: each output pixel
    # samples the input where the forward map came from
    forward = torch.zeros(n, 3, 3, dtype=u.dtype, device=u.device)
    forward[:, 0, 0] = scale * cos
    forward[:, 0, 1] = scale * (cos * shear_x - sin)
    forward[:, 1, 0] = scale * sin
    forward[:, 1, 1] = scale * (sin * shear_x + cos)
    forward[:, 0, 2] = tx
    forward[:, 1, 2] = ty
    forward[:, 2, 2] = 1.0
    half = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], dtype=u.dtype, device=u.device))
    forward_normalised = torch.linalg.inv(half) @ forward @ half
    inverse = torch.linalg.inv(forward_normalised)[:, :2, :]
    grid = F.affine_grid(inverse, list(u.shape), align_corners=False)
    return _sample(u, grid)


def _elastic(u: Tensor, alpha: float, generator: torch.Generator) -> Tensor:
    n, _, h, w = u.shape
    side = min(h, w)
    field = _draw("uniform", (n, 2, h, w), generator, u) * 2 - 1
    field = _blur(field, _ELASTIC_SMOOTHING * side / _REFERENCE_SIDE) * (
        alpha * side / _REFERENCE_SIDE
    )
    # displacements in pixels -> normalised coordinates (a pixel is 2 / W along x)
    offset = torch.stack((field[:, 0] * (2.0 / w), field[:, 1] * (2.0 / h)), dim=-1)
    return _sample(u, _identity_grid(u) + offset)


def _low_frequency_noise(
    n: int, c: int, h: int, w: int, generator: torch.Generator, like: Tensor
) -> Tensor:
    """White noise with its Fourier amplitude divided by ``|k|^2``, min-max scaled to [0, 1]."""
    work = precise_dtype(like.device)
    white = _draw("normal", (n, c, h, w), generator, like).to(work)
    ky = torch.fft.fftfreq(h, dtype=work, device=like.device).view(h, 1)
    kx = torch.fft.rfftfreq(w, dtype=work, device=like.device).view(1, -1)
    k2 = kx**2 + ky**2
    k2[0, 0] = math.inf  # no constant term
    fog = torch.fft.irfft2(torch.fft.rfft2(white) / k2, s=(h, w))
    low = fog.amin(dim=(2, 3), keepdim=True)
    high = fog.amax(dim=(2, 3), keepdim=True)
    fog = (fog - low) / (high - low).clamp_min(1e-12)
    return fog.to(like.dtype)


def _fog(u: Tensor, thickness: float, generator: torch.Generator) -> Tensor:
    fog = _low_frequency_noise(*u.shape, generator, u)
    return (u + thickness * fog) / (1.0 + thickness)


_FUNCTIONS: dict[str, Callable[[Tensor, Any, torch.Generator], Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "blur": _blur_corruption,
    "contrast": _contrast,
    "brightness": _brightness,
    "affine": _affine,
    "elastic": _elastic,
    "fog": _fog,
}


def corrupt(
    images: Tensor,
    corruption: str,
    severity: int,
    *,
    generator: torch.Generator | int | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    r"""A corrupted copy of a batch of images: noise, blur, contrast, brightness, affine,
    elastic or fog, at severity 1 (mild) to 5 (strong).

    The formulas and the severity table are in :mod:`captum_ext.data.corruptions`. In short,
    with ``u = (images - low) / (high - low)``::

        gaussian_noise  u + sigma z,  z ~ N(0, 1)          shot_noise  Poisson(lam u) / lam
        blur            Gaussian blur of width s           contrast    (u - mean(u)) c + mean(u)
        brightness      u + b                              fog         (u + t f) / (1 + t)
        affine          rotation, shear, zoom and shift    elastic     Simard's smooth warp

    and the result is ``low + (high - low) * clip(., 0, 1)``. Batched: all images are
    corrupted in one call, each with its own random draws; runs on the images' device.

    Papers: Hendrycks & Dietterich, ICLR 2019 (ImageNet-C / CIFAR-10-C); Mu & Gilmer, 2019
    (MNIST-C); Simard, Steinkraus & Platt, ICDAR 2003 (elastic distortion).

    Args:
        images (Tensor): ``(N, C, H, W)`` floating point images with pixels in
            ``value_range``.
        corruption (str): one of :data:`CORRUPTIONS`: ``"gaussian_noise"``,
            ``"shot_noise"``, ``"blur"``, ``"contrast"``, ``"brightness"``, ``"affine"``,
            ``"elastic"``, ``"fog"``.
        severity (int): 1 to 5.
        generator (torch.Generator or int, optional): the random draws (an int is a seed);
            ``None`` draws a seed from torch's global random state. The draws are made on the
            generator's device (the CPU for an int or ``None``) and moved to the images'
            device, so a seed gives the same corruption on every device. Default: None.
        value_range (tuple of float, optional): ``(low, high)`` of the pixels, e.g.
            ``(0, 1)`` or ``(0, 255)``; for the bundled digits, which are normalised,
            ``(normalize_digits(0), normalize_digits(255))``. Values within ``1e-4`` of the
            range (rounding) are accepted. Default: ``(0, 1)``.

    Returns:
        Tensor: corrupted images, the shape, dtype and device of ``images``, in
        ``value_range``.

    Examples::

        >>> import torch
        >>> from captum_ext.data import CORRUPTIONS, corrupt, denormalize_digits
        >>> clean = denormalize_digits(images)          # the sample digits, in [0, 1]
        >>> noisy = corrupt(clean, "gaussian_noise", 3, generator=0)
        >>> noisy.shape, bool(noisy.min() >= 0), bool(noisy.max() <= 1)
        (torch.Size([40, 1, 28, 28]), True, True)
        >>> len(CORRUPTIONS)
        8
    """
    images = _check_images(images)
    if not isinstance(corruption, str) or corruption not in _FUNCTIONS:
        raise ValueError(
            f"`corruption`={corruption!r}: expected one of {', '.join(map(repr, CORRUPTIONS))}."
        )
    severity = check_int(severity, "severity")
    if severity > 5:
        raise ValueError(f"`severity` must be 1, 2, 3, 4 or 5, got {severity}.")
    low, high = _check_range(value_range)
    generator = _check_generator(generator)
    tolerance = 1e-4 * (high - low)
    if bool(images.min() < low - tolerance) or bool(images.max() > high + tolerance):
        raise ValueError(
            f"`images` must lie in `value_range`=({low:g}, {high:g}), found values in "
            f"[{float(images.min()):.4g}, {float(images.max()):.4g}]; pass the range the pixels "
            "are on."
        )
    dtype = images.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    u = ((images.detach().to(work) - low) / (high - low)).clamp(0.0, 1.0)
    out = _FUNCTIONS[corruption](u, SEVERITIES[corruption][severity - 1], generator)
    return (low + (high - low) * out.clamp(0.0, 1.0)).to(dtype)
