"""float64 where the device has it.

Several computations here are formed in float64 because float32 loses the digits that matter
(the probabilities of a confident prediction's other classes, sums of squares over a layer,
rank statistics over a whole image). Apple's MPS backend has no float64: ``tensor.double()``
on an MPS tensor raises ``TypeError`` from inside torch. Every such computation asks this
module which dtype the device can hold.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def has_float64(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` can be float64 (every device but Apple's MPS)."""
    return torch.device(device).type != "mps"


def precise_dtype(device: torch.device | str) -> torch.dtype:
    """float64 on ``device`` where it has it, else float32."""
    return torch.float64 if has_float64(device) else torch.float32


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 where it is float16 or bfloat16, else as it is: scores from a
    half-precision model's logits (float16 rounds every probability above about 0.99976 to 1 and
    overflows above 65,504)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def precise(tensor: Tensor) -> Tensor:
    """``tensor`` in :func:`precise_dtype` of its device, on that device."""
    return tensor.to(precise_dtype(tensor.device))


def float64_here_or_cpu(tensor: Tensor) -> Tensor:
    """``tensor`` in float64: on its device where that has float64, else on the CPU (for
    read-outs whose digits matter more than where they are computed)."""
    if has_float64(tensor.device):
        return tensor.to(torch.float64)
    return tensor.to(device="cpu", dtype=torch.float64)


def share(mask: Tensor) -> float:
    """Fraction of True entries of a bool tensor, counted exactly on any device (NaN when
    it is empty, as the mean of nothing)."""
    return int(mask.sum()) / mask.numel() if mask.numel() else math.nan


def array_like_tensor(values) -> Tensor:
    """``torch.as_tensor(values)``, except that Python floats (a list, a tuple, a
    ``pandas.Series.tolist()``) become float64, not torch's default float32: rounding them
    to float32 merges scores that differ in the eighth digit into ties, and rank metrics
    then disagree with scikit-learn on the same list. Tensors and numpy arrays keep their
    dtype. A numpy view with negative strides (``np.flip``, ``[::-1]``), which torch
    refuses, is read through a contiguous copy."""
    if isinstance(values, np.ndarray) and any(stride < 0 for stride in values.strides):
        values = values.copy()  # (np.ascontiguousarray would make a 0-d array 1-d)
    tensor = torch.as_tensor(values)
    if tensor.is_meta:
        raise ValueError(
            "scores on the meta device hold shapes but no values; nothing can be computed "
            "from them."
        )
    if (
        tensor.is_floating_point()
        and not isinstance(values, Tensor)
        and not hasattr(values, "__array__")
    ):
        tensor = torch.as_tensor(values, dtype=torch.float64)
    return tensor
