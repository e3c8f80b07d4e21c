"""Seeds that belong to an example, not to its place in a batch.

A method that draws random numbers per example (ROAD's imputation noise, a per-image mask
fit's initialisation and backgrounds) and seeds them from the example's index gives an
image other numbers alone, in another batch or in another order. Keys derived from the
example's own values (and the caller's seed) make the draws, and so the results, a property
of the example.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def content_keys(batch: Tensor, seed: int = 0) -> list[int]:
    """One 63-bit key per example (dim 0) of ``batch``, from ``seed`` and the example's
    values: the bytes of its elements on the CPU, as stored (any dtype, bfloat16 too; no
    float64 is formed, which some devices lack)."""
    values = batch.detach().cpu().contiguous()
    salt = f"{int(seed)}:{values.dtype}".encode()
    keys = []
    for example in values:
        data = example.reshape(-1).view(torch.uint8).numpy().tobytes()
        digest = hashlib.blake2b(data, digest_size=8, key=salt)
        keys.append(int.from_bytes(digest.digest(), "little") >> 1)
    return keys
