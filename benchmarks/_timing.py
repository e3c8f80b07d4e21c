"""Timing helpers shared by the benchmark scripts (private to ``benchmarks/``).

``time_call`` runs a callable a few times to warm up (allocator, oneDNN primitives, CUDA
kernels), then times repeats with ``time.perf_counter`` and reports the median. On a CUDA device
the timer synchronises before starting and before stopping each repeat, so queued kernels are
counted in the call that launched them. ``environment`` records what the figures depend on.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 5,
    min_repeats: int = 3,
    budget_s: float | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs.

    Args:
        fn: the call to time, without arguments.
        warmup: untimed runs first.
        repeats: timed runs.
        min_repeats: with ``budget_s``, stop after this many timed runs once the timed runs
            have taken ``budget_s`` seconds in all (keeps slow settings within a time budget).
        budget_s: see ``min_repeats``; None times all ``repeats``.
        device: synchronise this device around each timed run (CUDA).

    Returns:
        dict with ``median_s``, ``min_s``, ``max_s``, ``repeats``, ``warmup`` and ``times_s``.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
        if budget_s is not None and len(times) >= min_repeats and spent >= budget_s:
            break
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "warmup": warmup,
        "times_s": times,
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_repeats: int = 3,
    budget_s: float | None = None,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several callables in rounds (each once per round) and report each one's median.

    Interleaving keeps slow drifts of a shared machine (other load, clock changes) out of the
    ratios between the callables. ``budget_s`` bounds the time of all rounds together once
    ``min_repeats`` rounds are done.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    for done in range(1, repeats + 1):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent += elapsed
        if budget_s is not None and done >= min_repeats and spent >= budget_s:
            break
    return {
        name: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "repeats": len(values),
            "warmup": warmup,
            "times_s": values,
        }
        for name, values in times.items()
    }


def time_each(
    calls: list[Callable[[], Any]],
    *,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Time each call of ``calls`` once (after ``warmup`` untimed runs of the first).

    For loops whose iterations differ only in an argument (one class per call): the per-call
    median and mean, and the total of the timed calls.
    """
    if not calls:
        raise ValueError("no calls to time")
    for _ in range(warmup):
        calls[0]()
    times = []
    for fn in calls:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "total_s": sum(times),
        "calls": len(times),
        "warmup": warmup,
        "times_s": times,
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_stat_seconds() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="utf-8") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system + irq + softirq) / tick, steal / tick


class CpuShare:
    """How much CPU other processes (and the hypervisor, as steal) took while timing.

    ``other_cpu_s`` is the machine's busy CPU time minus this process's own; on a machine
    shared with other work, figures taken while it is large are inflated.
    """

    def __init__(self) -> None:
        self._start = _proc_stat_seconds()
        self._own = self._own_seconds()
        self._wall = time.perf_counter()

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system

    def report(self) -> dict[str, float] | None:
        end = _proc_stat_seconds()
        if self._start is None or end is None:
            return None
        busy = end[0] - self._start[0]
        own = self._own_seconds() - self._own
        return {
            "wall_s": round(time.perf_counter() - self._wall, 1),
            "own_cpu_s": round(own, 1),
            "other_cpu_s": round(max(busy - own, 0.0), 1),
            "steal_s": round(end[1] - self._start[1], 1),
        }


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine distorts CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def environment(device: torch.device | str) -> dict[str, Any]:
    """Versions, thread count, CPU count and device name the timings were taken with."""
    device = torch.device(device)
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cpus = os.cpu_count()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "captum": _version("captum"),
        "grad_cam": _version("grad-cam"),
        "captum_ext": _version("captum-ext"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_name": _cpu_name(),
        "device": str(device),
        "loadavg_1min": load_average(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device_name"] = info["cpu_name"]
    return info
