r"""torch.distributed steps shared by the dataset scorer, the trainers and ``save``.

A collective call (``all_gather_object``, DDP's gradient all-reduce, a barrier) waits for
every process. A process that raises before it (a check that fails on its own data only, a
file that rank 0 cannot write) leaves the others waiting until the process group times out
(30 minutes by default); when the caller catches the error and goes on, its next collective
pairs with the one the others are still in, and they exchange the wrong data without a word.
So every step that can fail on one process only ends in one gathering step at which every
process learns whether another one failed, and then all of them raise:

* :func:`all_gather_or_raise`: one ``all_gather_object`` of a value, or of this process's
  failure; the failing process re-raises its own exception, the others a ``ValueError``
  naming the rank that failed and its message;
* :func:`checked_on_every_rank`: a block of checks (before the first collective of a fit or
  of a scoring run) whose failure on any process is raised on every process, and which
  refuses processes given different data (:meth:`DataAgreement.same_data`);
* :func:`agreed_batches`, :func:`raise_if_any_rank_failed`: a training loop's batches,
  read and checked, or any per-step check (a non-finite loss), with one small all-reduce
  per step through which a failure on one process reaches every process;
* :func:`written_on_main_process`: rank 0 writes a file, every process returns once it is
  written (a collective call: every process must make it);
* :func:`dataset_fingerprint`, :func:`tensor_fingerprint`: cheap digests that tell apart
  data of the same length (each process's own ``Subset`` of one dataset, say);
* :func:`broadcast_buffers`: rank 0's buffers (BatchNorm statistics) on every process.

In a single process (no process group, or a group of one) none of these communicates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from .layers import unwrap_distributed
from .training import distributed_shard

__all__ = [
    "DataAgreement",
    "agreed_batches",
    "all_gather_or_raise",
    "broadcast_buffers",
    "checked_on_every_rank",
    "dataset_fingerprint",
    "raise_if_any_rank_failed",
    "tensor_fingerprint",
    "written_on_main_process",
]

T = TypeVar("T")


class _Failure(NamedTuple):
    """What a process sends instead of its value when it raised (picklable, module level)."""

    rank: int
    kind: str
    message: str


def all_gather_or_raise(value: Any, error: BaseException | None = None, *, what: str) -> list:
    """Every process's ``value`` in rank order, gathered in one ``all_gather_object``; or,
    when ``error`` is given (this process failed) or another process sent its failure, an
    exception on every process: the failing process raises ``error`` itself, the others a
    ``ValueError`` naming ``what``, the rank that failed and its message.

    In a single process: ``[value]``, or ``error`` raised."""
    shard = distributed_shard()
    if shard is None:
        if error is not None:
            raise error
        return [value]
    import torch.distributed as dist

    rank, world = shard
    mine = value if error is None else _Failure(rank, type(error).__name__, str(error))
    parts: list[Any] = [None] * world
    try:
        dist.all_gather_object(parts, mine)
    except Exception:
        if error is None:
            raise
        # else this process's own failure below, which is what its caller must see
    if error is not None:
        raise error
    failed = [part for part in parts if isinstance(part, _Failure)]
    if failed:
        first = failed[0]
        also = [part.rank for part in failed[1:]]
        raise ValueError(
            f"{what} failed on rank {first.rank} ({first.kind}: {first.message})"
            + (f"; also on rank{'s' if len(also) > 1 else ''} {also}" if also else "")
            + f"; rank {rank} stops as well, so that no process waits for the others."
        )
    return parts


class DataAgreement:
    """The handle of :func:`checked_on_every_rank`: say what data this process holds."""

    def __init__(self) -> None:
        self.data: tuple[str, int, str | None, str] | None = None

    def same_data(
        self,
        argument: str,
        count: int,
        fingerprint: str | None = None,
        *,
        whole: str = "the same, whole dataset",
    ) -> None:
        """At the end of the block, every process must hold ``count`` examples with the same
        ``fingerprint`` (:func:`dataset_fingerprint`, :func:`tensor_fingerprint`; None: only
        the counts are compared), else every process raises a ``ValueError`` naming
        ``argument`` (as in a message, e.g. "`data`") and what each process holds; ``whole``
        says what every process must pass instead."""
        self.data = (argument, int(count), fingerprint, whole)


@contextmanager
def checked_on_every_rank(what: str) -> Iterator[DataAgreement]:
    """A block of checks that every process runs before the first collective of ``what``
    (e.g. "TIE.fit"), ending in one gathering step: an ``Exception`` raised in the block on
    any process is raised on every process (as :func:`all_gather_or_raise`), and data that
    differ between the processes (:meth:`DataAgreement.same_data`) are refused on every
    process. Nothing is communicated in a single process (the block's exceptions pass as
    they are) or when the block is left by a ``KeyboardInterrupt`` or ``SystemExit``.

    The block itself must not call collectives: a process that raised before one would
    leave the others in it."""
    agreement = DataAgreement()
    try:
        yield agreement
    except Exception as error:
        all_gather_or_raise(None, error, what=what)  # raises on every process
        raise
    parts = all_gather_or_raise(agreement.data, what=what)
    if len(parts) > 1 and all(part is not None for part in parts):
        _refuse_different_data(parts, what)


def _refuse_different_data(parts: list[tuple[str, int, str | None, str]], what: str) -> None:
    argument, _, _, whole = parts[0]
    world = len(parts)
    counts = [part[1] for part in parts]
    if len(set(counts)) > 1:
        raise ValueError(
            f"{argument} holds {counts} examples on the {world} processes; every process must "
            f"pass {whole} ({what} shards it itself)."
        )
    prints = [part[2] for part in parts]
    if None in prints or len(set(prints)) == 1:
        return
    other = next(rank for rank, value in enumerate(prints) if value != prints[0])
    raise ValueError(
        f"{argument} holds {counts[0]} examples on each of the {world} processes, but not the "
        f"same ones (ranks 0 and {other} differ: other examples, labels or order); every "
        f"process must pass {whole} ({what} shards it itself)."
    )


def _collective_device() -> torch.device:
    """Where a tensor for a collective must be: the current CUDA device with NCCL, else
    the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _step_flags(error: Exception | None, done: bool) -> tuple[int, int]:
    """How many processes failed, and how many are done, in one all-reduce."""
    import torch.distributed as dist

    flags = torch.tensor([int(error is not None), int(done)], device=_collective_device())
    dist.all_reduce(flags)
    failed, finished = (int(v) for v in flags.tolist())
    return failed, finished


def raise_if_any_rank_failed(error: Exception | None, *, what: str) -> None:
    """A step of a training loop at which every process learns, in one all-reduce, whether
    another one failed (``error``: this process's failure, e.g. a non-finite loss of its
    batch, or None), before the collectives of the step (DDP's all-reduce) that a failed
    process would leave the others waiting in; then every process raises (as
    :func:`all_gather_or_raise`). A collective call, at every step, on every process. In a
    single process: ``error`` raised, if any."""
    if distributed_shard() is None:
        if error is not None:
            raise error
        return
    failed, _ = _step_flags(error, False)
    if failed:
        all_gather_or_raise(None, error, what=what)  # raises on every process


def agreed_batches(
    batches: Iterable[Any], prepare: Callable[[Any], T], *, what: str
) -> Iterator[T]:
    """``prepare(batch)`` for each of ``batches``, in a training loop whose steps are
    collectives (DDP's all-reduce). Reading or preparing a batch can fail on one process
    only (a NaN image in its shard, a file its loader cannot read) while the others go on
    into the step and wait there until the process group times out. Under torch.distributed
    every process therefore learns before each step, in one all-reduce of two numbers,
    whether another one failed or ran out of batches, and all of them raise together (as
    :func:`all_gather_or_raise`: the failing process its own error, the others a
    ``ValueError`` naming ``what`` and the rank). In a single process: plain iteration."""
    shard = distributed_shard()
    if shard is None:
        for batch in batches:
            yield prepare(batch)
        return
    world = shard[1]
    iterator = None
    while True:
        error: Exception | None = None
        done, prepared = False, None
        try:
            if iterator is None:
                iterator = iter(batches)
            prepared = prepare(next(iterator))
        except StopIteration:
            done = True
        except Exception as failure:
            error = failure
        failed, finished = _step_flags(error, done)
        if failed:
            all_gather_or_raise(None, error, what=what)  # raises on every process
        if finished == world:
            return
        if finished:
            raise ValueError(
                f"{what}: {finished} of the {world} processes ran out of batches before the "
                "others; every process must pass the same, whole dataset."
            )
        yield prepared


def written_on_main_process(write: Callable[[], T], *, what: str) -> T | None:
    """``write()`` on rank 0 only; a collective call under torch.distributed: every process
    returns once rank 0 has written (``write``'s result on rank 0, None on the others), and
    a failed write raises on every process (rank 0 its own error, the others a
    ``ValueError`` naming ``what``) instead of leaving them waiting or reading a file that
    is not there yet. In a single process: ``write()``."""
    shard = distributed_shard()
    if shard is None:
        return write()
    result, error = None, None
    if shard[0] == 0:
        try:
            result = write()
        except Exception as failure:
            error = failure
    all_gather_or_raise(None, error, what=what)
    return result


def _feed_tensor(digest: Any, tensor: Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}:".encode())
    flat = tensor.to("cpu").contiguous().reshape(-1)
    if flat.numel():
        digest.update(flat.view(torch.uint8).numpy().tobytes())


def tensor_fingerprint(*tensors: Tensor) -> str:
    """A digest of the dtypes, shapes and exact bytes of ``tensors`` (e.g. a data set's
    first and last examples and its labels): equal on every process that holds the same
    values, whatever the number of threads (no floating-point sum is involved)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        _feed_tensor(digest, tensor)
    return digest.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """A digest of what tells a map-style dataset apart without reading an example through
    its transforms (random augmentations would differ between the processes): the indices of
    a ``Subset`` (also nested, and those of ``random_split``), the parts of a
    ``ConcatDataset`` and the first and last rows of a ``TensorDataset``'s tensors. Other
    datasets add nothing: for them only the length tells processes apart."""
    digest = hashlib.blake2b(digest_size=16)
    _feed_dataset(digest, dataset, depth=0)
    return digest.hexdigest()


def _feed_dataset(digest: Any, dataset: Any, depth: int) -> None:
    from torch.utils.data import ConcatDataset, Subset, TensorDataset

    if depth > 32:  # a cycle of wrappers; the length still counts
        return
    if isinstance(dataset, Subset):
        indices = dataset.indices
        if isinstance(indices, range):
            digest.update(f"R{indices.start},{indices.stop},{indices.step};".encode())
        elif isinstance(indices, Tensor):
            _feed_tensor(digest, indices.to(torch.int64))
        else:
            _feed_tensor(digest, torch.as_tensor(list(indices), dtype=torch.int64))
        _feed_dataset(digest, dataset.dataset, depth + 1)
    elif isinstance(dataset, ConcatDataset):
        digest.update(f"C{len(dataset.datasets)};".encode())
        for part in dataset.datasets:
            digest.update(f"N{len(part)};".encode())
            _feed_dataset(digest, part, depth + 1)
    elif isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            _feed_tensor(digest, tensor[:1])
            _feed_tensor(digest, tensor[-1:])


def broadcast_buffers(module: nn.Module) -> None:
    """Give every process rank 0's buffers: after training in ``DistributedDataParallel``
    (which broadcasts rank 0's buffers at the start of each forward pass) every process
    holds the BatchNorm running statistics that its own last batch updated, so models that
    should be identical differ. A collective call: every process must make it. Nothing in a
    single process. ``module`` may be wrapped in DDP."""
    if distributed_shard() is None:
        return
    import torch.distributed as dist

    for buffer in unwrap_distributed(module).buffers():
        dist.broadcast(buffer.data, src=0)
