"""Heat-map overlays as plain uint8 RGB arrays, and PNG output."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ._figures import literal_text, record_written, save_figure

__all__ = ["DEFAULT_CMAP", "overlay", "save_colorbar", "save_png", "to_uint8_rgb"]

#: The colour map of heat maps by default: perceptually uniform (equal steps in the map look
#: like equal steps of colour, and brightness grows with the value, also in grey print),
#: unlike "jet", whose bright bands in the middle invent edges that are not in the map.
DEFAULT_CMAP = "inferno"


def _as_array(x: Any, argument: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if x.is_floating_point() and str(x.dtype) != "torch.float64":
            x = x.float()  # bfloat16 and the float8 types have no numpy dtype
        x = x.numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"`{argument}` must be a numpy array or a torch tensor, got {type(x)}.")
    return x


#: the largest value of a float image still taken for one on the [0, 1] scale (above it a
#: warning says the image looks like one on another scale; values above 1 are clipped either
#: way). Resampling a [0, 1] image overshoots: bicubic (PyTorch, a = -0.75) up to 1.45 in
#: 2-D, antialiased bicubic (a = -0.5) and Lanczos-2 up to 1.28, Lanczos-3 up to 1.69 (a
#: checkerboard; natural images stay near 1.2), and a denormalisation rounds just above 1.
#: An image on the 0..255 scale goes far past 2 unless it is black, and an ImageNet-
#: normalised one that was not denormalised reaches 2.25-2.64 at a white pixel.
_FLOAT_LARGEST = 2.0


def _image_values(array: np.ndarray, argument: str) -> np.ndarray:
    """``array`` if its values can be drawn as an image: uint8 (0..255) as it is, booleans
    as uint8 black (False) and white (True), floats on a [0, 1] scale (values above 1 come out
    white; a warning names ``argument`` when they go above 2, which no resampling of a
    [0, 1] image reaches, :data:`_FLOAT_LARGEST`). Other integer types are
    refused: 0..255 in an int64 array and 0..65535 in a 16-bit PNG cannot be told apart, and
    guessing wrong gives a white or a black picture."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"`{argument}` has dtype {array.dtype}, but images must be uint8 (0..255) or float "
            "in [0, 1]; the scale of other integer types is ambiguous. Convert it first: "
            "`.astype(np.uint8)` (tensors: `.to(torch.uint8)`) for values in 0..255, or to "
            "float in [0, 1] by dividing by the largest value (e.g. `/ 65535` for a 16-bit "
            "image)."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(
            f"`{argument}` must hold real numbers (uint8, or float in [0, 1]), got dtype "
            f"{array.dtype}."
        )
    finite = array[np.isfinite(array)]
    if finite.size and float(finite.max()) > _FLOAT_LARGEST:
        from captum_ext._utils.caller import user_stacklevel

        warnings.warn(
            f"`{argument}` holds float values up to {float(finite.max()):.4g}, but float images "
            "are drawn on a [0, 1] scale and values above 1 come out white: divide by 255 (or "
            "pass uint8) for images on a 0..255 scale, or denormalise them first.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return array


def _check_alpha(alpha: Any, argument: str = "alpha") -> float:
    """``alpha`` as a float in [0, 1]: any real number (Python, numpy scalar, 0-d array or
    tensor); bools, NaN and values out of range are refused."""
    value = alpha
    if hasattr(value, "detach") and hasattr(value, "item"):  # a torch tensor
        value = value.item() if value.dim() == 0 else None
    elif isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or math.isnan(float(value))
        or not 0.0 <= float(value) <= 1.0
    ):
        raise ValueError(f"`{argument}` must be a number in [0, 1], got {alpha!r}.")
    return float(value)


def to_uint8_rgb(image: Any, argument: str = "image") -> np.ndarray:
    """An H x W, H x W x 1 or H x W x 3 image (uint8, or float in [0, 1]) as uint8 RGB.

    uint8 is taken as 0..255, booleans as black and white, floats as [0, 1] (values outside
    are clipped; a warning names ``argument`` when floats go above 2, e.g. an image on a
    0..255 scale, not for the overshoot of a resized [0, 1] image). Other integer dtypes
    (int64, uint16) raise a ``TypeError``: their scale is ambiguous, so convert them to
    uint8 or to floats in [0, 1] first. Tensors may be on any device and of any float dtype
    (bfloat16 included).
    """
    array = _as_array(image, argument)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(
            f"`{argument}` must be H x W, H x W x 1 or H x W x 3, got shape {array.shape}."
        )
    array = _image_values(array, argument)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    floats = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(floats, 0.0, 1.0) * 255.0).astype(np.uint8)


def overlay(
    image_01_hwc: Any, heatmap_01_hw: Any, alpha: float = 0.5, cmap: str = DEFAULT_CMAP
) -> np.ndarray:
    r"""Blend a colour-mapped heat map over an image.

    ``out = (1 - alpha) * image + alpha * cmap(heatmap)``, in RGB, rounded to uint8.

    Args:
        image_01_hwc (numpy.ndarray or Tensor): the image, ``H x W x C`` with C = 1 or 3 (or
            ``H x W``), float in [0, 1] or uint8 (e.g. from
            :func:`~captum_ext.data.denormalize_for_display`). Other integer dtypes
            (int64, uint16) raise a ``TypeError``: convert them to uint8 or to floats in
            [0, 1] first (floats above 1 are clipped, with a warning above 2).
        heatmap_01_hw (numpy.ndarray or Tensor): the map, ``H x W`` (or ``1 x H x W``) in
            [0, 1] (values outside are clipped), the size of the image: upsample first (e.g.
            ``upsample_to_input=True, normalize="minmax"``).
        alpha (float, optional): weight of the heat map, a real number in [0, 1] (a Python
            or numpy scalar, or a 0-d tensor). Default: 0.5.
        cmap (str, optional): a matplotlib colormap name. Default: :data:`DEFAULT_CMAP`,
            the perceptually uniform ``"inferno"`` (dark: low, bright yellow: high; show the
            scale with :func:`save_colorbar`). Pass ``"jet"`` for the former default.

    Returns:
        numpy.ndarray: uint8 ``H x W x 3``.

    Examples::

        >>> from captum_ext.attr import ContrastCAM
        >>> from captum_ext.data import denormalize_for_display
        >>> from captum_ext.viz import overlay, save_png
        >>> maps = ContrastCAM(model, layer).attribute(x, upsample_to_input=True,
        ...                                            normalize="minmax")
        >>> picture = overlay(denormalize_for_display(x[0], "digits"), maps[0, 0])
        >>> picture.shape, picture.dtype
        ((28, 28, 3), dtype('uint8'))
        >>> path = save_png(picture, "why.png")
    """
    alpha = _check_alpha(alpha)
    image = to_uint8_rgb(image_01_hwc, "image_01_hwc").astype(np.float64) / 255.0
    heat = _as_array(heatmap_01_hw, "heatmap_01_hw")
    if heat.ndim == 3 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != 2:
        raise ValueError(f"`heatmap_01_hw` must be H x W, got shape {heat.shape}.")
    if heat.shape != image.shape[:2]:
        raise ValueError(
            f"`heatmap_01_hw` is {heat.shape[0]} x {heat.shape[1]} but the image is "
            f"{image.shape[0]} x {image.shape[1]}; upsample the map to the image size first."
        )
    colormap = _colormap(cmap, "overlay()")
    heat = np.clip(np.nan_to_num(heat.astype(np.float64), nan=0.0), 0.0, 1.0)
    colours = colormap(heat)[:, :, :3]
    blended = (1.0 - alpha) * image + alpha * colours
    return np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


def _colormap(cmap: str, caller: str):
    try:
        from matplotlib import colormaps
    except ImportError:
        raise ImportError(f"{caller} needs matplotlib: pip install 'captum-ext[viz]'") from None
    try:
        return colormaps[cmap]
    except (KeyError, TypeError):
        raise ValueError(f"`cmap`={cmap!r} is not a matplotlib colormap.") from None


def save_colorbar(
    path: str | os.PathLike,
    *,
    cmap: str = DEFAULT_CMAP,
    label: str = "map value, scaled to [0, 1] per map",
    low: str = "0 (low)",
    high: str = "1 (high)",
    alpha: float = 1.0,
) -> Path:
    r"""Write the legend of heat maps: a horizontal colour bar from 0 to 1, as a PNG.

    One per section (the maps of a section share the scale): the colours of ``cmap`` from
    ``0`` (left) to ``1`` (right), ticks at 0, 0.5 and 1 (the ends labelled ``low`` and
    ``high``) and ``label`` under it. With ``alpha < 1`` the bar shows the colours as blended
    over a mid-grey image by :func:`overlay`.

    Args:
        path (str or PathLike): the PNG to write (parent folders are created).
        cmap (str, optional): the overlays' colour map. Default: ``"inferno"``
        label (str, optional): what the colour measures (drawn as given: ``$`` does not
            start mathtext).
        low, high (str, optional): tick labels of the ends (drawn as given).
        alpha (float, optional): the overlays' opacity, a real number in [0, 1]. Default: 1

    Returns:
        Path: ``path``.

    Examples::

        >>> from captum_ext.viz import save_colorbar
        >>> bar = save_colorbar("out/images/voice/colorbar.png", label="uncertainty")
    """
    colormap = _colormap(cmap, "save_colorbar()")
    alpha = _check_alpha(alpha)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    steps = np.linspace(0.0, 1.0, 256)
    colours = (1.0 - alpha) * 0.5 + alpha * colormap(steps)[:, :3]
    figure = Figure(figsize=(4.0, 0.9), dpi=100, layout="constrained")
    ax = figure.add_subplot()
    mappable = ScalarMappable(Normalize(0.0, 1.0), ListedColormap(colours, name=f"{cmap}_bar"))
    bar = figure.colorbar(mappable, cax=ax, orientation="horizontal", ticks=[0.0, 0.5, 1.0])
    literal_text(*bar.ax.set_xticklabels([low, "0.5", high], fontsize=8))
    bar.set_label(label, fontsize=8)
    literal_text(bar.ax.xaxis.label)  # drawn as given, no mathtext
    return save_figure(figure, path)


def save_png(array: Any, path: str | os.PathLike) -> Path:
    """Write an image array as a PNG (parent folders are created).

    Args:
        array: ``H x W``, ``H x W x 1`` or ``H x W x 3``; uint8, or float in [0, 1] (as
            :func:`to_uint8_rgb` takes it: other integer dtypes raise a ``TypeError``).
        path: the file to write.

    Returns:
        Path: ``path``.
    """
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("save_png() needs pillow: pip install 'captum-ext[viz]'") from None
    rgb = to_uint8_rgb(array, "array")
    from captum_ext._utils.training import atomic_path

    target = record_written(Path(path))  # noted first: a run killed while writing left it
    with atomic_path(target) as temp:  # never a truncated PNG where a figure was
        Image.fromarray(rgb).save(temp, format="PNG")
    return target
