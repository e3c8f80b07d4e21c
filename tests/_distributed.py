"""Run a function in 2 CPU processes on the gloo backend (the torchrun tests of every trainer).

Usage::

    from _distributed import run_gloo

    def _job(rank, world, out_dir, *args):   # module-level, so that it pickles
        ...  # the process group is initialised here; write results under out_dir

    run_gloo(_job, tmp_path, *args)          # skips when gloo is not available
    run_gloo(_job, tmp_path, timeout_s=60)   # collectives give up after 60 s, not 30 min

A test of a path that used to hang passes a short ``timeout_s``: a regression then fails
(gloo's timeout error, raised in the parent) instead of waiting 30 minutes.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int,
    world: int,
    port: int,
    job: Callable,
    out_dir: str,
    args: tuple,
    timeout_s: float | None = None,
) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    options = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", rank=rank, world_size=world, **options)
    try:
        job(rank, world, out_dir, *args)
        # both ranks done before either tears the group down: rank 0 hosts the store, and a
        # rank leaving while its peer still talks to it ended once in SIGABRT ("terminate
        # called without an active exception") on the CI-like 2-core machine
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(
    job: Callable, out_dir: str | Path, *args, world: int = 2, timeout_s: float | None = None
) -> None:
    """Spawn ``world`` processes that each run ``job(rank, world, str(out_dir), *args)`` inside
    an initialised gloo process group (its collectives time out after ``timeout_s`` seconds;
    None: torch's default, 30 minutes)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(
        _entry,
        args=(world, free_port(), job, str(out_dir), args, timeout_s),
        nprocs=world,
        join=True,
    )
