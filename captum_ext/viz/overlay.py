"""Heat-map overlays as plain uint8 RGB arrays, and PNG output."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["overlay", "save_png", "to_uint8_rgb"]


def _as_array(x: Any, argument: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"`{argument}` must be a numpy array or a torch tensor, got {type(x)}.")
    return x


def to_uint8_rgb(image: Any, argument: str = "image") -> np.ndarray:
    """An H x W, H x W x 1 or H x W x 3 image (uint8, or float in [0, 1]) as uint8 RGB."""
    array = _as_array(image, argument)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(
            f"`{argument}` must be H x W, H x W x 1 or H x W x 3, got shape {array.shape}."
        )
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"`{argument}` must hold numbers, got dtype {array.dtype}.")
    floats = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(floats, 0.0, 1.0) * 255.0).astype(np.uint8)


def overlay(
    image_01_hwc: Any, heatmap_01_hw: Any, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    r"""Blend a colour-mapped heat map over an image.

    ``out = (1 - alpha) * image + alpha * cmap(heatmap)``, in RGB, rounded to uint8.

    Args:
        image_01_hwc (numpy.ndarray or Tensor): the image, ``H x W x C`` with C = 1 or 3 (or
            ``H x W``), float in [0, 1] or uint8 (e.g. from
            :func:`captum_ext.data.loading.denormalize_for_display`).
        heatmap_01_hw (numpy.ndarray or Tensor): the map, ``H x W`` (or ``1 x H x W``) in
            [0, 1] (values outside are clipped), the size of the image: upsample first (e.g.
            ``upsample_to_input=True, normalize="minmax"``).
        alpha (float, optional): weight of the heat map, in [0, 1]. Default: 0.5.
        cmap (str, optional): a matplotlib colormap name. Default: ``"jet"``.

    Returns:
        numpy.ndarray: uint8 ``H x W x 3``.

    Examples::

        >>> maps = ContrastCAM(model, layer).attribute(x, upsample_to_input=True,
        ...                                            normalize="minmax")
        >>> picture = overlay(denormalize_for_display(x[0], "imagenet"), maps[0, 0])
        >>> save_png(picture, "why.png")
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}.")
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
    try:
        from matplotlib import colormaps
    except ImportError:
        raise ImportError("overlay() needs matplotlib: pip install 'captum-ext[viz]'") from None
    try:
        colormap = colormaps[cmap]
    except KeyError:
        raise ValueError(f"`cmap`={cmap!r} is not a matplotlib colormap.") from None
    heat = np.clip(np.nan_to_num(heat.astype(np.float64), nan=0.0), 0.0, 1.0)
    colours = colormap(heat)[:, :, :3]
    blended = (1.0 - alpha) * image + alpha * colours
    return np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(array: Any, path: str | os.PathLike) -> Path:
    """Write an image array as a PNG (parent folders are created).

    Args:
        array: ``H x W``, ``H x W x 1`` or ``H x W x 3``; uint8, or float in [0, 1].
        path: the file to write.

    Returns:
        Path: ``path``.
    """
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("save_png() needs pillow: pip install 'captum-ext[viz]'") from None
    rgb = to_uint8_rgb(array, "array")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(target, format="PNG")
    return target
