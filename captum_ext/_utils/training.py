r"""Machinery for long-running work: atomic files, checkpoints, progress bars, torch.distributed.

Every trainer in captum-ext (the amortised mask net, the inversion generator, TIE) and the
dataset scorer use these, so that they all

* write files atomically (to a temporary file in the same folder, then ``os.replace``), so a
  crash never leaves a half-written checkpoint or table;
* read checkpoints with ``torch.load(weights_only=True)`` only;
* show one tqdm bar on stderr, on rank 0, that ``progress=False`` turns off;
* run unchanged under ``torchrun``: when a process group is initialised the trained module is
  wrapped in ``DistributedDataParallel`` and only rank 0 writes files.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "atomic_path",
    "barrier",
    "distributed_shard",
    "is_main_process",
    "load_checkpoint",
    "progress_bar",
    "save_checkpoint",
    "unwrap_distributed",
    "wrap_distributed",
]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, rename it over
    ``path`` (atomic on POSIX and Windows); when it raises, delete it. The folder is created
    if needed."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save(state)`` atomically. ``state`` should hold only what
    ``torch.load(weights_only=True)`` reads back: tensors, state dicts, numbers, strings,
    lists, tuples and dicts of those (a ``torch.Generator``'s ``get_state()`` is a tensor)."""
    path = Path(path).expanduser()
    with atomic_path(path) as temp:
        torch.save(dict(state), temp)
    return path


def load_checkpoint(
    path: str | os.PathLike, *, map_location: Any = "cpu", argument: str = "checkpoint"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises a ``ValueError`` naming ``argument`` when the file is missing or is not a
    checkpoint dictionary.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"`{argument}`: no checkpoint file at {str(path)!r}.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle errors, truncated files, non-weights content
        raise ValueError(
            f"`{argument}`: {str(path)!r} is not a readable checkpoint "
            f"({type(error).__name__}: {error})."
        ) from error
    if not isinstance(state, dict):
        raise ValueError(
            f"`{argument}`: {str(path)!r} holds a {type(state).__name__}, not a checkpoint dict."
        )
    return state


def distributed_shard() -> tuple[int, int] | None:
    """``(rank, world_size)`` when a torch.distributed process group with more than one
    process is initialised, else ``None``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def is_main_process() -> bool:
    """True on rank 0, and in a plain single process."""
    shard = distributed_shard()
    return shard is None or shard[0] == 0


def barrier() -> None:
    """``torch.distributed.barrier()`` when distributed, else nothing."""
    if distributed_shard() is not None:
        import torch.distributed as dist

        dist.barrier()


def wrap_distributed(module: nn.Module) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when distributed (``device_ids`` set for a
    CUDA module, as DDP requires), else ``module`` itself."""
    if distributed_shard() is None:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        return DistributedDataParallel(module, device_ids=[device])
    return DistributedDataParallel(module)


def unwrap_distributed(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(module, DataParallel | DistributedDataParallel):
        module = module.module
    return module


def progress_bar(total: int | None, enabled: bool, *, desc: str, unit: str, initial: int = 0):
    """A tqdm bar on stderr, or ``None`` when ``enabled`` is false, on ranks other than 0 or
    when tqdm (the ``report`` extra) is not installed. Callers guard with ``if bar``."""
    if not enabled or not is_main_process():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the `report` extra; no bar without it
        return None
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
    )
