"""Seeds that belong to an example, not to its place in a batch.

A method that draws random numbers per example (ROAD's imputation noise, a per-image mask
fit's initialisation and backgrounds) and seeds them from the example's index gives an
image other numbers alone, in another batch or in another order. Keys derived from the
example's own values (and the caller's seed) make the draws, and so the results, a property
of the example.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

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


def seed_from(generator: torch.Generator | None) -> int:
    """One 62-bit seed drawn from ``generator`` (torch's global generator when None, as
    ``torch.randn`` would use): successive calls with the same generator differ, as its
    draws do, while each example's draws within a call come from that seed and its values."""
    return int(torch.randint(2**62, (1,), generator=generator, dtype=torch.int64))


def example_normal(
    keys: list[int], per_example: int, shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """Standard normal draws of ``shape`` for ``per_example`` rows of each key, on the CPU:
    rows ``i * per_example ... (i + 1) * per_example - 1`` from a generator seeded by
    ``keys[i]`` alone (so an example's draws do not depend on the other examples)."""
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    draws = torch.empty((len(keys) * per_example, *shape), dtype=draw_dtype)
    generator = torch.Generator()
    for i, key in enumerate(keys):
        generator.manual_seed(key)
        draws[i * per_example : (i + 1) * per_example] = torch.randn(
            (per_example, *shape), generator=generator, dtype=draw_dtype
        )
    return draws.to(dtype)


def combined_keys(*keys: list[int]) -> list[int]:
    """One key per example from several per-example keys (e.g. an image's and its mask's)."""
    combined = []
    for parts in zip(*keys, strict=True):
        key = 0
        for part in parts:
            key = (key * 1_000_003 + part) % (2**63 - 1)
        combined.append(key)
    return combined


def initialised_cuda_devices() -> list[int]:
    """The CUDA devices whose random state exists (CUDA initialised), else none."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def seed_generators(seed: int, cuda_devices: Sequence[int | torch.device] = ()) -> None:
    """Seed torch's CPU generator and those of ``cuda_devices``, and no other.

    ``torch.manual_seed`` also seeds every CUDA device, lazily when CUDA is not initialised
    yet; inside ``fork_rng(devices=[])`` that reset the caller's CUDA random state for good
    (the fork restores only what it was given)."""
    torch.random.default_generator.manual_seed(seed)
    for device in cuda_devices:
        index = device if isinstance(device, int) else torch.device(device).index
        if index is None:
            index = torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


@contextlib.contextmanager
def seeded_rng(
    seed: int | None, cuda_devices: Sequence[int | torch.device] | None = None
) -> Iterator[None]:
    """Run the block with torch's CPU generator and ``cuda_devices``' (default: every
    initialised CUDA device) seeded by ``seed`` (None: forked, not seeded), and give the
    caller's random states back afterwards."""
    devices = initialised_cuda_devices() if cuda_devices is None else list(cuda_devices)
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            seed_generators(seed, devices)
        yield


def global_rng_state(device: torch.device) -> dict[str, Tensor]:
    """torch's global random state on the CPU and, for a CUDA ``device``, on that device:
    what a checkpoint keeps so that a resumed fit draws what an uninterrupted one would."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_global_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    """Put back a :func:`global_rng_state` (its CUDA part only where ``device`` is CUDA)."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def as_generator(
    generator: Any, argument: str = "generator", *, device: Any = None
) -> torch.Generator | None:
    """A ``generator`` argument as the conventions take it: a ``torch.Generator`` (returned
    as is), an int seed (a new generator on ``device``, the CPU by default, seeded with it)
    or None. numpy integers (``np.int64(0)``) are int seeds; bools are refused."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        generator = int(generator)
        if not -(2**63) <= generator < 2**64:
            raise ValueError(
                f"`{argument}`={generator}: an int seed must fit in 64 bits (torch's range)."
            )
        return torch.Generator(device=device or "cpu").manual_seed(generator)
    raise TypeError(
        f"`{argument}` must be a torch.Generator, an int seed or None, got "
        f"{type(generator).__name__}."
    )
