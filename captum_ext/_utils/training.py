r"""Machinery for long-running work: atomic files, checkpoints, progress bars, torch.distributed.

Every trainer in captum-ext (the amortised mask net, the inversion generator, TIE) and the
dataset scorer use these, so that they all

* write files atomically (to a temporary file in the same folder, then ``os.replace``), so a
  crash never leaves a half-written checkpoint or table; the file gets the permissions of any
  new file (``0o666`` less the umask), and the temporary files a killed run left behind are
  removed by the next write of the same file;
* store a SHA-256 checksum of a checkpoint's content in it and verify it on load, and read
  checkpoints with ``torch.load(weights_only=True)`` only;
* show one tqdm bar on stderr, on rank 0, that ``progress=False`` turns off; when stderr is
  not a terminal (CI logs, files) a few plain lines (0, 25, 50, 75 and 100 %) instead;
* run unchanged under ``torchrun``: when a process group is initialised the trained module is
  wrapped in ``DistributedDataParallel`` and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layers import unwrap_distributed

__all__ = [
    "CHECKSUM_KEY",
    "PlainProgress",
    "atomic_path",
    "checkpoint_digest",
    "barrier",
    "distributed_shard",
    "is_main_process",
    "load_checkpoint",
    "load_fitting_state",
    "progress_bar",
    "save_checkpoint",
    "unwrap_distributed",
    "wrap_distributed",
]


def _umask() -> int:
    """The process's umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (what the umask stays is unchanged)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the ``.NAME.XXXXXXXX.tmp`` files that :func:`atomic_path` made for ``path`` and
    a killed process never renamed or deleted. Only names of exactly that form are touched."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, rename it over
    ``path`` (atomic on POSIX and Windows); when it raises (or is interrupted), delete it.

    The folder is created if needed. The file gets the mode of any newly created file,
    ``0o666`` less the umask (not the ``0o600`` of ``tempfile``). Temporary files of the same
    ``path`` left by a process that was killed before it could clean up
    (``.NAME.XXXXXXXX.tmp``) are removed first; two processes must not write the same
    ``path`` at the same time (under ``torch.distributed`` only rank 0 writes)."""
    path, special = _write_target(path)
    if special:  # a pipe or device (/dev/stdout): written in place, after the block succeeds
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        try:
            handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as error:  # a read-only folder: name the file asked for, not the temp
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    try:
        os.close(handle)
        yield Path(temp)
        if special:
            with open(temp, "rb") as source, open(path, "wb") as destination:
                shutil.copyfileobj(source, destination)
            os.unlink(temp)
        else:
            os.chmod(temp, 0o666 & ~_umask())
            os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        named = _named_write_error(error, path)
        if named is not None:
            raise named from error
        raise


def _write_target(path: str | os.PathLike) -> tuple[Path, bool]:
    """Where writing ``path`` must go, and whether it is a pipe or device written in place.

    What ``path`` is, is read as ``open`` would see it (symbolic links followed). A symbolic
    link to a regular file (or to nothing yet) is followed to its target (renaming over the
    link would replace the user's link with a file and leave its target unwritten); a pipe
    or device, also through a link (``/dev/stdout`` piped: ``/proc/self/fd/1`` leads to
    ``pipe:[...]``, which is no path), is written in place as given (renaming over
    ``/dev/null`` as root replaced the device); a folder, a socket or a link loop is
    refused naming ``path`` as given."""
    given = Path(path).expanduser()
    try:
        mode = os.stat(given).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:  # a link loop, a name too long, ...
        raise OSError(error.errno, error.strerror or str(error), str(given)) from None
    if mode is not None and stat.S_ISDIR(mode):  # else the rename names the temporary file
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file to write", str(given))
    if mode is not None and stat.S_ISSOCK(mode):
        raise OSError(errno.EINVAL, "a socket, not a file to write", str(given))
    if mode is not None and not stat.S_ISREG(mode):
        return given, True
    return (given.resolve() if given.is_symlink() else given), False


def _named_write_error(error: BaseException, path: Path) -> OSError | None:
    """An OSError naming ``path`` for a failed write whose own error does not: torch's zip
    writer reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc] ...
    unexpected pos``, safetensors as ``SafetensorError``, and Python's ``write`` gives no
    file name. None where the error is not a failed write (a bug, an interrupt)."""
    if isinstance(error, OSError):
        if error.filename is not None:
            return None
        return OSError(error.errno, error.strerror or str(error), str(path))
    if isinstance(error, Exception) and _disk_is_full(path.parent):
        return OSError(
            errno.ENOSPC,
            f"No space left on device while writing {str(path)!r} ({error}); the file there "
            "before, if any, is kept",
            str(path),
        )
    return None


def check_writable(path: str | os.PathLike, *, folder: bool) -> None:
    """Raise the OSError (naming the place) that writing ``path`` (a file, or with ``folder``
    a folder to write files in) would meet, before any work: a scratch file must be
    creatable in it, or, when it does not exist yet, in its nearest existing parent (nothing
    is created there; the error names that folder, as the user wrote it, not the scratch
    file), and the disk must not be full (under 1 MiB free). The temporaries of
    an earlier writer of ``path`` that was killed are removed."""
    path = Path(path).expanduser()
    if not folder:
        path, special = _write_target(path)
        if special:  # written in place: it must be writable itself
            if not os.access(path, os.W_OK):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return
    target = path if folder else path.parent
    existing = target.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
    try:
        handle, scratch = tempfile.mkstemp(prefix=".captum-ext-check.", dir=existing)
    except OSError as error:  # named by the folder, not by the scratch file's random name
        raise _folder_error(error, _as_given(target, existing)) from None
    os.close(handle)
    os.unlink(scratch)
    if _disk_is_full(existing):
        raise OSError(errno.ENOSPC, "No space left on device", str(existing))
    if existing == target.absolute() and not folder:
        _remove_stale_temporaries(path)


def _as_given(target: Path, existing: Path) -> Path:
    """The nearest existing folder of ``target`` (``existing``, absolute) as the user wrote
    it (``out`` for ``out/new/s.csv``), or ``existing`` where that is the current folder."""
    given = target
    while not given.exists() and given != given.parent:
        given = given.parent
    return existing if str(given) in ("", ".") else given


def _folder_error(error: OSError, folder: Path) -> OSError:
    """``error`` (creating a scratch file in ``folder`` failed) naming ``folder``: its
    errno and reason kept (so ``PermissionError`` stays one), its file name the folder's."""
    if error.errno is None:
        return OSError(f"{error.strerror or error}: {str(folder)!r}")
    return OSError(error.errno, error.strerror or os.strerror(error.errno), str(folder))


def writable_path_argument(path: str | os.PathLike | None, argument: str, *, folder: bool = False):
    """``path`` checked by :func:`check_writable` before a fit's work, as a ValueError naming
    ``argument`` (None passes)."""
    if path is None:
        return None
    try:
        check_writable(path, folder=folder)
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        where = f": {error.filename!r}" if error.filename else ""
        raise ValueError(
            f"`{argument}` {str(path)!r} cannot be written ({reason}{where}); nothing was trained."
        ) from None
    return path


def _disk_is_full(folder: Path, *, below: int = 1 << 20) -> bool:
    """Whether the file system holding ``folder`` has less than ``below`` bytes free."""
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return stats.f_bavail * stats.f_frsize < below


#: The key under which :func:`save_checkpoint` stores the checksum of the other entries.
CHECKSUM_KEY = "captum_ext_sha256"


def _feed(digest: Any, value: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``value`` to ``digest``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.layout != torch.strided or tensor.is_quantized:
            tensor = tensor.to_dense() if tensor.layout != torch.strided else tensor.dequantize()
        tensor = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(value.shape)}:".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"M{len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, float):
        digest.update(f"F{value.hex() if math.isfinite(value) else value!r};".encode())
    else:  # str, int, bool, None, torch.dtype, torch.Size, ...
        text = repr(value)
        digest.update(f"{type(value).__name__}{len(text)}:{text}".encode())


def checkpoint_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's content: every key and value, tensors by dtype, shape
    and bytes, in order; the entry :data:`CHECKSUM_KEY` is left out. It depends on the values
    only, not on how ``torch.save`` laid them out, nor on the device they are loaded to."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return digest.hexdigest()


class _Checkpoint(dict):
    """The dict :func:`load_checkpoint` returns: a missing entry is a ``ValueError`` naming
    the file (the error is also a ``KeyError`` for code that catches that)."""

    _source = ""
    _argument = "checkpoint"

    def __missing__(self, key: Any):
        raise _MissingEntry(
            f"`{self._argument}`: {self._source!r} has no {key!r} entry; it was not written by "
            "this trainer or by this version of captum-ext."
        )


class _MissingEntry(ValueError, KeyError):
    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save(state)`` atomically, with a SHA-256 checksum of the content under
    :data:`CHECKSUM_KEY` (see :func:`checkpoint_digest`). The file stays a plain dict that
    ``torch.load(path, weights_only=True)`` reads. ``state`` should hold only what
    ``torch.load(weights_only=True)`` reads back: tensors, state dicts, numbers, strings,
    lists, tuples and dicts of those (a ``torch.Generator``'s ``get_state()`` is a tensor)."""
    path = Path(path).expanduser()
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    state[CHECKSUM_KEY] = checkpoint_digest(state)
    with atomic_path(path) as temp:
        torch.save(state, temp)
    return path


def load_fitting_state(module: nn.Module, state: Any, what: str) -> None:
    """``module.load_state_dict(state)`` after checking that every key and shape fits, so
    that a state of another architecture changes nothing: ``load_state_dict`` copies every
    tensor that fits before it raises for the others. ``what`` names the source in the
    ValueError (the argument and, where known, the file)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} does not hold a state dict ({type(state).__name__}).")
    current = module.state_dict()
    misfits = sorted(set(current) ^ set(state)) + [
        key  # (non-tensor entries, a module's `_extra_state`, are the module's to check)
        for key in sorted(set(current) & set(state))
        if isinstance(current[key], torch.Tensor)
        and (not isinstance(state[key], torch.Tensor) or state[key].shape != current[key].shape)
    ]
    if misfits:
        shown = ", ".join(misfits[:5]) + (", ..." if len(misfits) > 5 else "")
        raise ValueError(
            f"{what} belongs to another architecture than this {type(module).__name__} (keys "
            f"missing, unexpected or of another shape: {shown}); nothing was loaded."
        )
    module.load_state_dict(state)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    argument: str = "checkpoint",
    keys: Iterable[str] = (),
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True`` and
    verify its checksum.

    Raises a ``ValueError`` naming ``argument`` and the file when the file is missing, is not
    a checkpoint dictionary, its content does not match its checksum (the file was corrupted
    or edited), or it lacks one of ``keys``. Reading an entry the file does not have from the
    returned dict is a ``ValueError`` too (not a bare ``KeyError``).

    A checkpoint without a checksum (written by captum-ext before checksums were added, or
    by another program) is refused with a ``ValueError``: its integrity cannot be verified,
    and a damaged checksum entry must not pass for an old file. Such a fit is started afresh.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"`{argument}`: no checkpoint file at {str(path)!r}.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle errors, truncated files, non-weights content
        first = " ".join(str(error).split())[:300]
        raise ValueError(
            f"`{argument}`: {str(path)!r} is not a readable checkpoint "
            f"({type(error).__name__}: {first}); the file may be corrupted."
        ) from error
    if not isinstance(state, dict):
        raise ValueError(
            f"`{argument}`: {str(path)!r} holds a {type(state).__name__}, not a checkpoint dict."
        )
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise ValueError(
            f"`{argument}`: {str(path)!r} has no checksum, so its integrity cannot be "
            "verified: it was written by another program, by a captum-ext version without "
            "checkpoint checksums, or its checksum entry was damaged. Start the fit afresh "
            "(delete the file, or resume=False)."
        )
    try:
        actual = checkpoint_digest(state)
    except Exception as error:  # content torch.load accepted but we cannot encode
        raise ValueError(
            f"`{argument}`: {str(path)!r} cannot be verified ({type(error).__name__}: "
            f"{error}); the file may be corrupted."
        ) from error
    if not isinstance(stored, str) or stored != actual:
        raise ValueError(
            f"`{argument}`: {str(path)!r} is corrupted: its content does not match the "
            "checksum stored in it (the file changed after it was written)."
        )
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(
            f"`{argument}`: {str(path)!r} lacks the entries {missing}; it was not written by "
            "this trainer or by this version of captum-ext."
        )
    result = _Checkpoint(state)
    result._source, result._argument = str(path), argument
    return result


@contextmanager
def distributed_from_environment(device: torch.device) -> Iterator[torch.device]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): initialise the process group for this
    process (NCCL on CUDA, gloo otherwise), yield this process's device (CUDA devices follow
    ``LOCAL_RANK`` when no index was given) and destroy the group on exit if it was created
    here. In a plain process it yields ``device`` and does nothing."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        yield device
        return
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    finished = False
    try:
        yield device
        finished = True
    finally:
        if created:
            if finished:  # every process done before any tears the group down: rank 0
                # hosts the store, and a process leaving while its peer still talks to it
                # ended in SIGABRT ("terminate called without an active exception")
                with contextlib.suppress(RuntimeError):  # a peer that failed meanwhile
                    dist.barrier()
            dist.destroy_process_group()


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


class PlainProgress:
    """A progress report for logs: one line at 0, 25, 50, 75 and 100 % of ``total`` (at the
    start and at the end when ``total`` is unknown), instead of the many carriage-return
    updates of a tqdm bar. Lines after the first say the time so far and, before the end,
    about how long is left at the pace so far (a log of a long run then says whether to
    wait). Offers the part of tqdm's interface the trainers use (``update``,
    ``set_postfix``, ``close``, use as a context manager)."""

    _MARKS = (0, 25, 50, 75, 100)

    def __init__(self, total: int | None, *, desc: str, unit: str, initial: int = 0, file=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, int(initial)
        self.file = sys.stderr if file is None else file
        self.postfix = ""
        self._start, self._initial = time.monotonic(), int(initial)
        self._next = 0  # index into _MARKS of the next line to print
        self._closed = False
        self._report()

    def _line(self, percent: int | None) -> None:
        if self.total:
            text = f"{self.desc}: {percent:3d}% ({self.n}/{self.total} {self.unit})"
        else:
            text = f"{self.desc}: {self.n} {self.unit}"
        done = self.n - self._initial
        elapsed = time.monotonic() - self._start if done > 0 else 0.0
        if elapsed >= 1:  # a run of under a second needs no clock
            text += f", {_duration(elapsed)}"
            if self.total and self.n < self.total:
                text += f", about {_duration(elapsed / done * (self.total - self.n))} left"
        if self.postfix:
            text += f" {self.postfix}"
        print(text, file=self.file, flush=True)

    def _report(self) -> None:
        if not self.total:
            if self._next == 0:
                self._line(None)
                self._next = 1
            return
        done = 100 * min(self.n, self.total) / self.total
        reached = None
        while self._next < len(self._MARKS) and done >= self._MARKS[self._next]:
            reached = self._MARKS[self._next]
            self._next += 1
        if reached is not None:  # a jump over several marks prints one line
            self._line(int(done) if done < 100 else 100)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._report()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**dict(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{key}={value}" for key, value in items.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.total:
            self._line(None)
        elif self._next < len(self._MARKS) and self.n > 0:  # stopped early: say where
            self._line(int(100 * min(self.n, self.total) / self.total))

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __bool__(self) -> bool:
        return True


def _duration(seconds: float) -> str:
    """``seconds`` for a person: "12 s", "4.5 min", "1.2 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_bar(
    total: int | None, enabled: bool, *, desc: str, unit: str, initial: int = 0, file=None
):
    """A tqdm bar on stderr (or ``file``), or ``None`` when ``enabled`` is false, on ranks
    other than 0 or when tqdm (the ``report`` extra) is not installed. When the stream is not
    a terminal (a CI log, a file, a pipe) a :class:`PlainProgress` prints a few plain lines
    instead. Callers guard with ``if bar``."""
    if not enabled or not is_main_process():
        return None
    stream = sys.stderr if file is None else file
    if not _is_terminal(stream):
        return PlainProgress(total, desc=desc, unit=unit, initial=initial, file=stream)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the `report` extra; no bar without it
        return None
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=stream,
        dynamic_ncols=True,
    )


@contextmanager
def undone_on_failure(enabled: bool, save: Callable[[], Any], restore: Callable[[Any], None]):
    """Run the block; if it raises or is interrupted and ``enabled``, put back what ``save()``
    copied before it (``restore(copy)``). A fit with a checkpoint uses it, so that an object
    interrupted before (or while) writing its first checkpoint resumes with
    ``resume=True`` from where the call started, bit for bit, not from its partly trained
    state."""
    snapshot = save() if enabled else None
    try:
        yield
    except BaseException:
        if enabled:
            restore(snapshot)
        raise


def optimiser_step(optimiser: torch.optim.Optimizer) -> None:
    """``optimiser.step()``, then forget autocast's cached low-precision weights.

    Inside the caller's ``torch.autocast`` block torch keeps the float16 / bfloat16 copy of
    each weight until the outermost block exits; a fit run there would keep computing with
    the weights of its first step (losses flat, a head at chance) unless the cache is
    cleared after every in-place update."""
    optimiser.step()
    torch.clear_autocast_cache()
