r"""Dataset-scale trust scoring: every example of a DataLoader, one process or many.

:func:`score_dataset` runs a classifier over a whole dataset and returns a
:class:`ScoreTable` of per-example predictions and trust scores (GradTrust and the baselines
of :mod:`captum_ext.metrics.trust`) in dataset order. The same code runs unchanged under
``torchrun``: when ``torch.distributed`` is initialised, the dataset's batches are sharded
with a ``DistributedSampler``, each process scores its shard, and the shards are gathered back
so that every process returns the full table, in dataset order.
"""

from __future__ import annotations

import csv
import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captum_ext._utils.batched_grad import call_model, in_model_precision
from captum_ext._utils.batches import dict_batch
from captum_ext._utils.caller import user_stacklevel
from captum_ext._utils.deprecation import moved_names
from captum_ext._utils.distributed import (
    all_gather_or_raise,
    checked_on_every_rank,
    dataset_fingerprint,
)
from captum_ext._utils.model_state import preserved_state
from captum_ext._utils.training import atomic_path, distributed_shard, progress_bar
from captum_ext._utils.validation import map_per_example, parse_device, take_rows
from captum_ext.metrics.trust import (
    energy,
    gradnorm,
    gradtrust,
    log_likelihood,
    margin,
    mc_dropout,
    negative_entropy,
    odin,
    purview,
    softmax_confidence,
)

__all__ = ["GRADTRUST_SCORES", "TRUST_SCORES", "ScoreTable", "score_dataset"]

#: The scores :func:`score_dataset` knows, by name: ``name -> function(model, inputs, **kw)``,
#: each returning one value per example, higher = more trusted. ``"gradtrust"`` is the natural
#: log of GradTrust (``gradtrust(..., form="topk", log=True)``): the score itself exceeds the
#: float32 range on confident models (top-1/top-2 logit gaps above about 44), its log stays
#: finite and ranks the examples the same way. ``"gradtrust_reference"`` (in [1, C]) is the
#: score itself. (Named ``SCORES`` before; that name still works, with a DeprecationWarning.)
TRUST_SCORES: dict[str, Callable[..., Tensor]] = {
    "gradtrust": functools.partial(gradtrust, form="topk", log=True),
    "gradtrust_reference": functools.partial(gradtrust, form="reference"),
    "softmax": softmax_confidence,
    "entropy": negative_entropy,
    "margin": margin,
    "log_likelihood": log_likelihood,
    "odin": odin,
    "energy": energy,
    "mc_dropout": mc_dropout,
    "gradnorm": gradnorm,
    "purview": purview,
}

#: The GradTrust entries of :data:`TRUST_SCORES`; the CLI passes them its ``layer`` (the
#: final linear layer of the model).
GRADTRUST_SCORES = ("gradtrust", "gradtrust_reference")

#: the columns every :class:`ScoreTable` starts with, before the score columns
BASE_COLUMNS = ("index", "label", "prediction", "correct")


# ---------------------------------------------------------------------------------------------
# the table


class ScoreTable:
    r"""Per-example results of :func:`score_dataset`: a small, pandas-free table.

    A table is an ordered mapping of column name to a 1-D CPU tensor, all of the same length,
    one row per example in dataset order:

    - ``index`` (int64): the example's position in the dataset (``0 .. N-1``);
    - ``label`` (int64): the true class, or ``-1`` where the loader gave no label;
    - ``prediction`` (int64): the model's arg-max class;
    - ``correct`` (bool): ``prediction == label`` (always False where ``label == -1``, which
      :meth:`to_csv` writes as an empty cell: unknown, not wrong);
    - then one column per score, named as in :data:`TRUST_SCORES` (higher = more trusted;
      ``gradtrust`` holds the natural log of GradTrust, finite also on confident models).

    ``table["softmax"]`` is a column, ``len(table)`` the number of rows, ``table.columns``
    the names in order. For pandas: ``pandas.DataFrame({c: table[c].numpy() for c in
    table.columns})``.

    Args:
        columns (Mapping[str, Tensor]): the columns, in order; 1-D tensors of equal length.
    """

    def __init__(self, columns: Mapping[str, Tensor]) -> None:
        if not isinstance(columns, Mapping):
            raise TypeError(
                f"`columns` must be a mapping of column names to 1-D tensors, got "
                f"{type(columns).__name__}."
            )
        data: dict[str, Tensor] = {}
        length = None
        for name, column in columns.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"column names must be non-empty strings, got {name!r}.")
            if not isinstance(column, Tensor):
                column = torch.as_tensor(column)
            if column.dim() != 1:
                raise ValueError(f"column {name!r} must be 1-D, got shape {tuple(column.shape)}.")
            if length is None:
                length = column.shape[0]
            elif column.shape[0] != length:
                raise ValueError(
                    f"column {name!r} has {column.shape[0]} rows, the others {length}."
                )
            data[name] = column.detach().cpu()
        self._columns = data

    @property
    def columns(self) -> tuple[str, ...]:
        """The column names, in order."""
        return tuple(self._columns)

    @property
    def score_names(self) -> tuple[str, ...]:
        """The names of the score columns (every column but ``index``, ``label``,
        ``prediction`` and ``correct``)."""
        return tuple(name for name in self._columns if name not in BASE_COLUMNS)

    def __len__(self) -> int:
        return next(iter(self._columns.values())).shape[0] if self._columns else 0

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._columns[name]
        except KeyError:
            raise KeyError(
                f"no column {name!r}; the columns are {', '.join(self._columns)}."
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._columns

    def __iter__(self):
        return iter(self._columns)

    def to_dict(self) -> dict[str, Tensor]:
        """The columns as a new ``{name: tensor}`` dict (the tensors are shared)."""
        return dict(self._columns)

    def __repr__(self) -> str:
        return f"ScoreTable({len(self)} rows; columns: {', '.join(self._columns)})"

    def to_csv(self, path: str | os.PathLike, *, extra: Mapping[str, Sequence] | None = None):
        r"""Write the table as a CSV file with a header row; returns the path.

        The file is written atomically: to a temporary file in the same folder, then renamed
        over ``path``, so readers never see a half-written file. Floats are written with
        Python's ``repr`` (exact round trip), ``correct`` as ``True`` / ``False``, and as an
        empty cell where the label is unknown (``label == -1``: nothing to be correct about;
        :meth:`from_csv` reads it back as False, as the table holds it). Under
        ``torch.distributed`` call it on one rank only (rank 0), as :func:`score_dataset`'s
        callers and the ``captum-ext score`` command do.

        Args:
            path (str or PathLike): the file; its folder is created if needed.
            extra (Mapping[str, Sequence], optional): additional text columns (for example
                file names), one value per row, written right after ``index``.

        Returns:
            Path: ``path``.
        """
        path = Path(path).expanduser()
        extra = dict(extra or {})
        for name, values in extra.items():
            if name in self._columns:
                raise ValueError(f"extra column {name!r} is already a column of the table.")
            if len(values) != len(self):
                raise ValueError(
                    f"extra column {name!r} has {len(values)} values for {len(self)} rows."
                )
        names = list(self._columns)
        header = names[:1] + list(extra) + names[1:]
        cells = {name: _format_column(column) for name, column in self._columns.items()}
        if "correct" in cells and "label" in self._columns:
            cells["correct"] = _unknown_left_empty(cells["correct"], self._columns["label"])
        cells.update({name: [str(v) for v in values] for name, values in extra.items()})
        with atomic_path(path) as temp, temp.open("w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(header)
            writer.writerows(zip(*(cells[name] for name in header)))
            file.flush()
            os.fsync(file.fileno())
        return path

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> ScoreTable:
        r"""Read a table written by :meth:`to_csv`.

        ``index``, ``label`` and ``prediction`` are read as int64, ``correct`` as bool and
        every other numeric column as float64; text columns (such as the ``path`` column of
        ``captum-ext score``) are skipped.
        """
        with Path(path).expanduser().open(encoding="utf-8", newline="") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if not header:
                raise ValueError(f"{str(path)!r} is empty; expected a CSV file with a header.")
            rows = list(reader)
        columns: dict[str, Tensor] = {}
        for j, name in enumerate(header):
            values = [row[j] for row in rows]
            if name in ("index", "label", "prediction"):
                columns[name] = torch.tensor([int(v) for v in values], dtype=torch.int64)
            elif name == "correct":
                columns[name] = torch.tensor([v == "True" for v in values], dtype=torch.bool)
            else:
                try:
                    columns[name] = torch.tensor([float(v) for v in values], dtype=torch.float64)
                except ValueError:
                    continue  # a text column
        return cls(columns)


def _unknown_left_empty(correct: list[str], label: Tensor) -> list[str]:
    """The ``correct`` cells with those of unlabelled rows (``label == -1``) left empty: their
    ``False`` says "wrong", where whether the prediction is right is unknown."""
    return ["" if known == -1 else cell for cell, known in zip(correct, label.tolist())]


def _format_column(column: Tensor) -> list[str]:
    if column.dtype == torch.bool:
        return ["True" if v else "False" for v in column.tolist()]
    if column.is_floating_point():
        return [repr(float(v)) for v in column.tolist()]
    return [str(v) for v in column.tolist()]


# ---------------------------------------------------------------------------------------------
# arguments


def _score_names(scores: Any) -> list[str]:
    if isinstance(scores, str):
        scores = [name.strip() for name in scores.split(",") if name.strip()]
    if not isinstance(scores, Iterable):
        raise TypeError(f"`scores` must be a sequence of score names, got {type(scores).__name__}.")
    names = list(scores)
    bad = [name for name in names if not isinstance(name, str) or name not in TRUST_SCORES]
    if bad:
        shown = ", ".join(repr(name) for name in bad)
        raise ValueError(
            f"unknown score{'s' if len(bad) > 1 else ''} {shown}; known scores: "
            f"{', '.join(TRUST_SCORES)}."
        )
    return list(dict.fromkeys(names))  # in the order given, once each


def _score_options(score_kwargs: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    if score_kwargs is None:
        return {}
    if not isinstance(score_kwargs, Mapping):
        raise TypeError(
            "`score_kwargs` must map score names to dicts of keyword arguments, e.g. "
            "{'mc_dropout': {'n_passes': 10, 'generator': 0}}."
        )
    options = {}
    for name, kwargs in score_kwargs.items():
        if name not in names:
            raise ValueError(
                f"`score_kwargs` has options for {name!r}, which is not among the requested "
                f"scores ({', '.join(names) or 'none'})."
            )
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"`score_kwargs[{name!r}]` must be a dict of keyword arguments.")
        options[name] = dict(kwargs)
    return options


def _model_device(model: nn.Module) -> torch.device | None:
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    if len(devices) == 1:
        return devices.pop()
    return None  # no parameters, or spread over several devices


def _unwrap(model: Any) -> nn.Module:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def _split_batch(batch: Any) -> tuple[tuple[Tensor, ...], Any]:
    """``(inputs, labels or None)`` of one batch; ``inputs`` is a tuple of one tensor, or of
    several for a model with several inputs (``((x_1, x_2, ...), labels)`` batches)."""
    if isinstance(batch, Tensor):
        return (batch,), None
    if isinstance(batch, Mapping):
        inputs, labels = dict_batch(batch, "dataloader")
        return (inputs,), labels
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        inputs = batch[0]
        labels = batch[1] if len(batch) == 2 else None
        if isinstance(inputs, Tensor):
            return (inputs,), labels
        if (
            isinstance(inputs, (tuple, list))
            and inputs
            and all(isinstance(x, Tensor) for x in inputs)
        ):
            return _several_inputs(tuple(inputs)), labels
    described = (
        f"a {type(batch).__name__} of {len(batch)}"
        if isinstance(batch, (tuple, list))
        else f"a {type(batch).__name__}"
    )
    hint = ""
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        hint = (
            " (A TensorDataset(x_1, x_2, labels) yields such lists: give the DataLoader a "
            "collate_fn that returns ((x_1, x_2), labels), or pass the per-example x_2 as "
            "`additional_forward_args`.)"
        )
    raise ValueError(
        "the DataLoader must yield `inputs` tensors, `(inputs, labels)` pairs, "
        "`((input_1, input_2, ...), labels)` pairs for a model with several inputs, or dicts "
        f"with 'pixel_values' (and 'labels'), got {described}.{hint}"
    )


def _several_inputs(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The tensors of a ``((x_1, x_2, ...), labels)`` batch, checked to hold the same number
    of examples (examples first)."""
    sizes = [x.shape[0] if x.dim() else None for x in inputs]
    if None in sizes or len(set(sizes)) != 1:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise ValueError(
            f"the DataLoader yielded a batch of {len(inputs)} inputs of shapes {shapes}; the "
            "inputs of a `((input_1, input_2, ...), labels)` batch must hold the same number "
            "of examples, examples first."
        )
    return inputs


def _labels_tensor(labels: Any, n: int) -> Tensor:
    if labels is None:
        return torch.full((n,), -1, dtype=torch.int64)
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.numel() != n:
        raise ValueError(
            f"labels must be {n} integer class indices per batch of {n} inputs, got a "
            f"{labels.dtype} tensor of shape {tuple(labels.shape)}."
        )
    return labels.reshape(n).to(device="cpu", dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# loaders


def _batch_size(loader: Any) -> int:
    batch_size = loader.batch_size
    if batch_size is None:
        batch_size = getattr(loader.batch_sampler, "batch_size", None)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            "score_dataset needs a DataLoader that batches (batch_size, or a batch_sampler "
            "with a batch_size attribute)."
        )
    return batch_size


def _rebuilt_loader(loader: Any, batches: list[list[int]]) -> Any:
    """A loader like ``loader`` (dataset, collate_fn, workers) that yields exactly ``batches``."""
    from torch.utils.data import DataLoader

    options: dict[str, Any] = {
        "batch_sampler": batches,
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        # the user's generator: without it iterating draws a base seed from the global one
        "generator": loader.generator,
    }
    if loader.num_workers > 0:
        options["multiprocessing_context"] = loader.multiprocessing_context
        options["prefetch_factor"] = loader.prefetch_factor
        options["persistent_workers"] = loader.persistent_workers
    return DataLoader(loader.dataset, **options)


def _plan(
    dataloader: Any, shard: tuple[int, int] | None
) -> tuple[Any, list[int] | None, list[int] | None]:
    """The loader to iterate, the dataset index of each example it yields and the number of
    each batch it yields among all the dataset's batches (None: 0, 1, ... in order, for
    iterable datasets).

    The dataset is cut into consecutive batches ``[0, b), [b, 2b), ...`` (b the loader's batch
    size). One process scores them all; under torch.distributed, ``DistributedSampler`` deals
    the *batches* out to the processes (``shuffle=False, drop_last=False``: the last processes
    may get a duplicate of the first batches, dropped when gathering). Every example is thus
    computed in the same batch, next to the same examples, whatever the number of processes,
    and the gathered table equals the single-process table bit for bit.
    """
    from torch.utils.data import DataLoader, IterableDataset, SequentialSampler
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            f"`dataloader` must be a torch.utils.data.DataLoader, got {type(dataloader).__name__}."
        )
    dataset = dataloader.dataset
    if isinstance(dataset, IterableDataset):
        if shard is not None:
            raise ValueError(
                "score_dataset cannot shard an IterableDataset under torch.distributed; use a "
                "map-style dataset (with __len__ and __getitem__)."
            )
        return dataloader, None, None
    size = len(dataset)
    if shard is None and (
        isinstance(dataloader.sampler, SequentialSampler)
        and dataloader.batch_size is not None
        and not dataloader.drop_last
    ):
        return dataloader, list(range(size)), list(range(len(dataloader)))  # as it is
    step = _batch_size(dataloader)
    batches = [list(range(start, min(start + step, size))) for start in range(0, size, step)]
    numbers = list(range(len(batches)))
    if shard is not None:
        rank, world = shard
        sampler = DistributedSampler(
            batches, num_replicas=world, rank=rank, shuffle=False, drop_last=False
        )
        numbers = list(sampler)
        batches = [batches[i] for i in numbers]
    return (
        _rebuilt_loader(dataloader, batches),
        [i for batch in batches for i in batch],
        numbers,
    )


# ---------------------------------------------------------------------------------------------
# scoring


def _gather(local: dict[str, Tensor] | None, error: Exception | None) -> dict[str, Tensor]:
    """Every process's columns in one ``all_gather_object`` (a process that failed sends its
    failure instead, and then every process raises: see ``all_gather_or_raise``), merged."""
    return _merged(all_gather_or_raise(local, error, what="score_dataset"))


def _merged(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The processes' columns concatenated, DistributedSampler's padding duplicates dropped
    and sorted by dataset index."""
    merged = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    index = merged["index"]
    order = torch.sort(index, stable=True).indices
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    keep = order[first]
    return {name: column[keep] for name, column in merged.items()}


@torch.no_grad()
def _predict(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    label: Tensor,
    additional_forward_args: Any,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    """The model's classes for ``inputs`` (and the batch's ``additional_forward_args``, with
    the model's output read by ``output_transform``, as the scores get them); the batch's
    labels are checked against its number of classes C (``-1``, no label, is the one value
    allowed outside ``0 .. C-1``: another one made every such example count as wrong
    without a word)."""
    logits = call_model(model, inputs, _as_tuple(additional_forward_args))
    if output_transform is not None:
        logits = output_transform(logits)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        if output_transform is not None:
            raise ValueError(f"`output_transform` must return (N, C) logits, got {got}.")
        raise ValueError(
            f"the model must return (N, C) logits, got {got}; pass "
            "score_dataset(..., output_transform=...) to map its output to them."
        )
    classes = logits.shape[1]
    wrong = label[(label != -1) & ((label < 0) | (label >= classes))]
    if wrong.numel():
        raise ValueError(
            f"labels must be class indices in 0 .. {classes - 1} (the model's {classes} "
            f"classes) or -1 for no label, got {sorted(set(wrong.tolist()))[:5]}."
        )
    return logits.argmax(1)


def _as_tuple(additional_forward_args: Any) -> tuple[Any, ...]:
    """Captum's reading of ``additional_forward_args``: None is no argument, a tuple its
    items, anything else one argument."""
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def _batch_forward_args(
    additional_forward_args: Any, index: Tensor, size: int | None, device: torch.device
) -> Any:
    """``additional_forward_args`` for the batch of dataset rows ``index``: every tensor
    whose first dimension is the dataset's length ``size`` (one row per example), also inside
    tuples, lists, dicts and dataclasses (:func:`map_per_example`), is cut to the batch's rows
    and moved to ``device``; anything else is passed as given (None for ``size``: a dataset
    without a length, nothing is cut)."""
    if size is None:
        return additional_forward_args
    return map_per_example(
        additional_forward_args,
        size,
        lambda value: take_rows(value, index).to(device, non_blocking=True),
    )


def _comparable(tensor: Tensor) -> Any:
    """What two equal sparse or nested tensors share, without making them dense: a nested
    tensor's rows; a sparse tensor's layout, shape and coalesced COO indices and values."""
    if tensor.is_nested:
        return list(tensor.unbind())
    if tensor.layout == torch.strided:
        return tensor
    coo = (tensor if tensor.layout == torch.sparse_coo else tensor.to_sparse_coo()).coalesce()
    return (str(tensor.layout), tuple(tensor.shape), coo.indices(), coo.values())


def _equal_with_nans(a: Tensor, b: Tensor) -> bool:
    """Equal floating tensors where NaN (a missing value) counts as equal to NaN."""
    if not (a.is_floating_point() or a.is_complex()) or a.layout != torch.strided:
        return False
    nans = a.isnan()
    return bool(torch.equal(nans, b.isnan())) and bool(
        torch.equal(a.masked_fill(nans, 0), b.masked_fill(nans, 0))
    )


def _same_arguments(a: Any, b: Any) -> bool:
    """Whether two ``additional_forward_args`` are the same: the same objects, or equal
    tensors (shape, dtype, device and values) and equal other values, item by item."""
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_arguments, a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return (
            type(a) is type(b)
            and a.keys() == b.keys()
            and all(_same_arguments(a[key], b[key]) for key in a)
        )
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.layout != torch.strided or b.layout != torch.strided or a.is_nested or b.is_nested:
            return _same_arguments(_comparable(a), _comparable(b))
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and (bool(torch.equal(a, b)) or _equal_with_nans(a, b))
        )
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


#: how the error messages of :func:`_prediction_option` name what an option gives the
#: ``prediction`` column
_PREDICTION_OPTIONS = {
    "additional_forward_args": "the one set the model runs with",
    "output_transform": "the one reading of the model's output as logits",
}


def _takes(name: str, keyword: str) -> bool:
    """Whether the score ``name`` of :data:`TRUST_SCORES` takes ``keyword``."""
    try:
        parameters = inspect.signature(TRUST_SCORES[name]).parameters
    except (TypeError, ValueError):  # no signature to read: give it, as before
        return True
    return keyword in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _prediction_option(
    key: str, value: Any, options: dict[str, dict[str, Any]], names: list[str]
) -> Any:
    """The ``key`` (``"additional_forward_args"`` or ``"output_transform"``) of the
    ``prediction`` column. Given to :func:`score_dataset` (``value`` not None) it goes to
    every score that takes it as well (and must not be given again in ``score_kwargs``);
    otherwise that of ``score_kwargs``: ``additional_forward_args`` must then be the same
    for every requested score, so that the prediction is the class the scores score; an
    ``output_transform`` given to every score alike is the prediction's too, one given to
    some scores only (or differing) is theirs alone."""
    given = [name for name in names if key in options.get(name, {})]
    if value is not None:
        if given:
            raise ValueError(
                f"`{key}` is given to score_dataset and in `score_kwargs` "
                f"(for {', '.join(given)}); give it once: score_dataset's applies to the "
                "prediction and to every score."
            )
        if key == "additional_forward_args":  # every score needs the model's extra inputs
            unable = [name for name in names if not _takes(name, key)]
            if unable:
                raise ValueError(
                    f"`additional_forward_args` is given, but the score(s) {', '.join(unable)} "
                    "of TRUST_SCORES take no `additional_forward_args` parameter, so they "
                    "would call the model without them; add the parameter to the score "
                    "function or leave those scores out."
                )
        for name in names:  # a transform only to the scores that take one
            if _takes(name, key):
                options.setdefault(name, {})[key] = value
        return value
    if not given:
        return None
    first = options[given[0]][key]
    missing = [name for name in names if name not in given]
    differ = [name for name in given if not _same_arguments(options[name][key], first)]
    if key == "output_transform" and (missing or differ):
        # a transform some scores take for themselves (log-probabilities for one of them,
        # say): the prediction is the model's own arg-max, as before this option existed
        return None
    if missing or differ:
        problem = f"not to {', '.join(missing)}" if missing else f"others to {', '.join(differ)}"
        raise ValueError(
            f"`score_kwargs` gives `{key}` to {given[0]} but {problem}; the "
            f"`prediction` and `correct` columns need {_PREDICTION_OPTIONS[key]}: pass it "
            f"once as score_dataset(..., {key}=...), which every score gets."
        )
    return first


def _dataset_length(dataloader: Any) -> int | None:
    """The number of examples of ``dataloader.dataset``; None where it has no length."""
    try:
        return len(dataloader.dataset)
    except TypeError:
        return None


def score_dataset(
    model: nn.Module,
    dataloader: Any,
    scores: Sequence[str] | str = ("gradtrust", "softmax"),
    device: str | torch.device | None = None,
    progress: bool = True,
    score_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> ScoreTable:
    r"""Predictions and trust scores for every example of a dataset, in dataset order.

    The model runs over ``dataloader.dataset`` batch by batch; for each batch it records the
    prediction (arg-max of the logits) and calls every requested score of :data:`TRUST_SCORES`
    (``scores_fn(model, inputs, **score_kwargs[name])``). The model is in eval mode while it
    is scored (batch norm uses its running statistics, dropout is off except inside
    ``mc_dropout``), and is left exactly as it was found: training flags,
    ``requires_grad`` and ``.grad`` are restored, also when a score raises.

    **Batches.** The loader must yield ``inputs`` tensors, ``(inputs, labels)`` pairs
    (labels: integer class indices of the model's ``C`` classes, ``0 .. C-1``, or ``-1`` for
    an unlabelled example; other values are refused) or dicts as Hugging Face datasets give
    them, the inputs
    under one of ``"pixel_values"``, ``"image"``, ``"images"``, ``"inputs"``, ``"input"``
    and the labels (optional) under one of ``"labels"``, ``"label"``, ``"targets"``,
    ``"target"``; other keys are ignored. Without labels, ``label`` is ``-1`` (and ``correct``
    False in the table, an empty cell in :meth:`ScoreTable.to_csv`'s file).

    **Models with several inputs** (``model(x_1, x_2, ...)``, e.g. an image and its
    metadata) are scored in either of two ways. (1) The batches carry them: the loader
    yields ``((x_1, x_2, ...), labels)`` (a dataset whose items are ``((x_1, x_2), y)``,
    which the default collate turns into such batches), every tensor holding the batch's
    examples first; the prediction is ``model(x_1, x_2, ...)`` and every score gets the
    tuple ``(x_1, x_2, ...)`` as its ``inputs`` (so ``odin`` perturbs all of them). A
    ``TensorDataset(x_1, x_2, labels)`` yields ``[x_1, x_2, labels]`` instead, which is
    refused (it cannot be told from a pair of inputs without labels): give its loader a
    ``collate_fn`` that returns ``((x_1, x_2), labels)``. (2) ``additional_forward_args``
    (see Args): the model is called as ``model(inputs, *additional_forward_args)`` for the
    prediction and inside every score, each tensor of it with one row per example of the
    dataset (first dimension ``len(dataloader.dataset)``) cut to the rows of each batch.

    **Order.** Every example is scored exactly once, in dataset order: a loader with a
    sequential sampler is used as it is; otherwise (``shuffle=True``, a custom sampler,
    ``drop_last=True``) a loader with the same ``dataset``, ``collate_fn``, ``num_workers``
    and ``pin_memory`` yielding the consecutive batches ``[0, b), [b, 2b), ...`` (``b`` its
    batch size) is used instead.
    Iterable-style datasets are scored in the order they yield; with ``num_workers > 0`` each
    worker iterates its own copy, so the dataset must split its stream by
    ``torch.utils.data.get_worker_info()`` (otherwise every example is scored once per worker;
    a dataset with a ``__len__`` is then warned about).

    **torch.distributed.** When a process group is initialised by the caller (e.g. under
    ``torchrun``) with more than one process, *every* process must call ``score_dataset``
    with the same arguments, the whole dataset included (not its own shard: score_dataset
    shards it itself). The datasets are compared before any scoring, by their lengths and,
    at no cost, the indices of a ``Subset`` (also one of ``random_split``) and the first
    and last rows of a ``TensorDataset``; processes given different ones are refused with a
    ``ValueError`` on every process. The consecutive batches above are dealt out to the processes
    with ``DistributedSampler(batches, shuffle=False, drop_last=False)`` (the sampler pads
    with repeats of the first batches when their number is not a multiple of the world size),
    each process scores its batches on its ``device`` in a new loader as above, and the
    results are gathered (``all_gather_object``, so with NCCL each process must have set its
    CUDA device), the padding duplicates dropped and dataset order restored: every process
    returns the same full table. Write files from rank 0 only
    (``torch.distributed.get_rank() == 0``). Sharding whole batches, not single examples,
    keeps every example next to the same batch-mates as in one process: float kernels
    (matrix products, vectorised ``exp``) give results that depend on the batch in the last
    bit, so this is what makes the gathered table equal the single-process table bit for bit
    (same devices and library versions). ``mc_dropout`` with an int ``generator`` seed is
    reproducible in the same way (batch ``b`` uses seed ``s * 2**20 + b``). An error on one
    process (a label outside the model's classes in its shard, a batch its collate_fn
    cannot stack) is raised on every process when the shards are gathered: that process
    raises its own exception, the others a ``ValueError`` naming its rank and message, so
    that no process waits for the others nor pairs its gather with a later call's.

    Args:
        model (nn.Module): a classifier returning ``(N, C)`` logits. ``DataParallel`` and
            ``DistributedDataParallel`` wrappers are unwrapped (scoring runs on
            ``model.module``).
        dataloader (DataLoader): the examples (map-style dataset; or iterable-style in a
            single process).
        scores (sequence of str or str, optional): names from :data:`TRUST_SCORES`
            (``"gradtrust"`` (its natural log), ``"gradtrust_reference"``, ``"softmax"``,
            ``"entropy"``, ``"margin"``, ``"log_likelihood"``, ``"odin"``, ``"energy"``,
            ``"mc_dropout"``, ``"gradnorm"``, ``"purview"``), or one comma-separated
            string. Default: ``("gradtrust", "softmax")``.
        device (str or torch.device, optional): where the batches go. Default: the model's
            device. It must be the device the model is on (the model is not moved).
        progress (bool, optional): show a tqdm progress bar (batches) on stderr, on rank 0
            only. Default: True.
        score_kwargs (Mapping[str, Mapping], optional): keyword arguments per score, e.g.
            ``{"gradtrust": {"k": 3}, "mc_dropout": {"n_passes": 10, "generator": 0}}``. An int
            ``generator`` for ``mc_dropout`` gives every batch its own seed (see above); a
            ``torch.Generator`` is used as it is, batch after batch. An
            ``additional_forward_args`` given here is read as the argument below (cut per
            batch); when given for one score it must be given, the same, for every
            requested score (the prediction needs one set), or given once as the argument
            below instead. An ``output_transform`` given here alike to every requested
            score reads the prediction too; one given to some scores only (or differing) is
            theirs alone, and the prediction is the arg-max of the model's own output.
        additional_forward_args (Any, optional): further arguments of the model, after the
            inputs: ``model(inputs, *additional_forward_args)`` (a non-tuple is one
            argument), for the ``prediction`` column and in every score. Each tensor whose
            first dimension is the dataset's length ``len(dataloader.dataset)`` holds one
            row per example, in dataset order, and each batch gets its own examples' rows
            (on ``device``); any other value (a tensor of another length, a flag) goes to
            every batch as it is. With a dataset that has no length (iterable-style),
            nothing is cut: let the batches carry per-example inputs instead (see above).
            Default: None.
        output_transform (Callable, optional): maps the model's output to ``(N, C)``
            logits (e.g. ``lambda out: out["logits"]``, or
            :func:`captum_ext.data.two_class_logits` for a binary model with one logit),
            for the ``prediction`` column and in every score (each score's own
            ``output_transform``; a score registered in :data:`TRUST_SCORES` without that
            parameter does without). Given here, it must not also be given in
            ``score_kwargs``. Default: None (the output is the logits).

    Returns:
        ScoreTable: columns ``index``, ``label``, ``prediction``, ``correct``, then one per
        score (in the order requested), as CPU tensors.

    Raises:
        ValueError: unknown score names (the message lists the known ones), an empty dataset,
            a batch that is not ``inputs``, ``(inputs, labels)`` or
            ``((x_1, x_2, ...), labels)``, a ``device`` the model is not on,
            ``additional_forward_args`` or ``output_transform`` given both here and in
            ``score_kwargs``, or ``additional_forward_args`` given in ``score_kwargs`` to
            some scores and not (or not the same) to others, ``additional_forward_args``
            given for a score registered in :data:`TRUST_SCORES` without that parameter;
            under torch.distributed, processes given different datasets, or an error on
            another process (named with its rank).

    Examples::

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import load_sample_digits
        >>> from captum_ext.metrics import score_dataset
        >>> images, labels = load_sample_digits()
        >>> loader = DataLoader(TensorDataset(images, labels), batch_size=16)
        >>> table = score_dataset(load_bundled_model(), loader, ["gradtrust", "softmax"])
        >>> table.columns
        ('index', 'label', 'prediction', 'correct', 'gradtrust', 'softmax')
        >>> table.to_csv("scores.csv")  # under torchrun: on rank 0 only
        PosixPath('scores.csv')
    """
    shard = distributed_shard()
    # under torch.distributed every check before the scoring ends in one gathering step: a
    # failure on one process is raised on all of them (not only there, while the others go
    # on to wait in the final gather), and processes given different datasets are refused
    with checked_on_every_rank("score_dataset") as agreement:
        names = _score_names(scores)
        options = _score_options(score_kwargs, names)
        prediction_args = _prediction_option(
            "additional_forward_args", additional_forward_args, options, names
        )
        prediction_transform = _prediction_option(
            "output_transform", output_transform, options, names
        )
        if prediction_transform is not None and not callable(prediction_transform):
            raise TypeError(
                "`output_transform` must be a callable mapping the model's output to (N, C) "
                f"logits, got {type(prediction_transform).__name__}."
            )
        model = _unwrap(model)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        model_device = _model_device(model)
        if device is None:
            device = model_device or torch.device("cpu")
        else:
            device = parse_device(device)
            if model_device is not None and _same_device(model_device, device) is False:
                raise ValueError(
                    f"`device`={str(device)!r} but the model is on {str(model_device)!r}; move "
                    "the model first (model.to(device)) or leave `device` out."
                )
        loader, indices, numbers = _plan(dataloader, shard)
        if shard is not None:  # a map-style dataset (_plan refuses the others)
            dataset = dataloader.dataset
            agreement.same_data("`dataloader`", len(dataset), dataset_fingerprint(dataset))

    error: Exception | None = None
    local: dict[str, Tensor] | None = None
    try:
        local = _score_shard(
            model,
            loader,
            indices,
            numbers,
            names,
            options,
            device,
            progress,
            prediction_args,
            _dataset_length(dataloader),
            prediction_transform,
        )
    except Exception as failure:
        if shard is None:
            raise
        # not raised yet: the other processes are (or will be) in the gather below, which
        # would otherwise pair with this process's next collective (another call's gather)
        error = failure
    columns = _gather(local, error) if shard is not None else local
    if columns["index"].numel() == 0:
        raise ValueError("the dataset is empty; nothing to score.")
    if indices is None:
        _check_iterable_length(dataloader, columns["index"].numel())
    return ScoreTable(columns)


def _check_iterable_length(dataloader: Any, rows: int) -> None:
    """Warn where an iterable-style dataset with a ``__len__`` yielded another number of
    examples than it says it holds (less the last partial batch under ``drop_last``; not
    checked where the loader's ``batch_size`` is None: the dataset yields batches, and its
    ``__len__`` may count them, as torch's does): with ``num_workers > 0`` every worker
    iterates its own copy of the dataset, so a dataset that does not split its stream by
    ``torch.utils.data.get_worker_info()`` is yielded once per worker (each example scored
    ``num_workers`` times), and torch's own length warning does not reach a loop that stops
    where the loader does."""
    try:
        size = len(dataloader.dataset)
    except TypeError:
        return
    batch_size = getattr(dataloader, "batch_size", None)
    if batch_size is None:  # the dataset yields whole batches: its __len__ counts them
        return
    expected = size // batch_size * batch_size if dataloader.drop_last else size
    if rows == expected:
        return
    workers = getattr(dataloader, "num_workers", 0)
    cause = (
        f" With num_workers={workers} every worker iterates its own copy of the dataset: split "
        "the stream in __iter__ by torch.utils.data.get_worker_info() (worker id and count), "
        "or use num_workers=0."
        if workers > 0 and rows > expected
        else ""
    )
    dropped = " (less the last partial batch: drop_last)" if expected != size else ""
    warnings.warn(
        f"score_dataset: the iterable dataset yielded {rows} examples but its __len__ says "
        f"{size}{dropped}; the table has {rows} rows, in the order they were yielded.{cause}",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _score_shard(
    model: nn.Module,
    loader: Any,
    indices: list[int] | None,
    numbers: list[int] | None,
    names: list[str],
    options: Mapping[str, Mapping[str, Any]],
    device: torch.device,
    progress: bool,
    prediction_args: Any = None,
    size: int | None = None,
    prediction_transform: Callable[[Any], Tensor] | None = None,
) -> dict[str, Tensor]:
    """This process's columns: every batch of ``loader`` scored (the body of
    :func:`score_dataset`)."""
    try:
        total: int | None = len(loader)
    except TypeError:
        total = None
    bar = progress_bar(total, bool(progress), desc="scoring", unit="batch")

    chunks: dict[str, list[Tensor]] = {name: [] for name in (*BASE_COLUMNS, *names)}
    seen = 0
    try:
        with preserved_state([model]):
            model.eval()
            for b, batch in enumerate(loader):
                inputs, labels = _split_batch(batch)
                n = inputs[0].shape[0]
                inputs = tuple(x.to(device, non_blocking=True) for x in inputs)
                inputs = in_model_precision(model, inputs)  # float32 pixels, half model
                label = _labels_tensor(labels, n)
                if indices is None:
                    index = torch.arange(seen, seen + n, dtype=torch.int64)
                else:
                    index = torch.tensor(indices[seen : seen + n], dtype=torch.int64)
                batch_args = _batch_forward_args(prediction_args, index, size, device)
                prediction = _predict(model, inputs, label, batch_args, prediction_transform).cpu()
                chunks["index"].append(index)
                chunks["label"].append(label)
                chunks["prediction"].append(prediction)
                chunks["correct"].append(prediction == label)
                number = b if numbers is None else numbers[b]
                scored = inputs[0] if len(inputs) == 1 else inputs
                for name in names:
                    kwargs = _batch_options(name, options.get(name, {}), number)
                    if "additional_forward_args" in kwargs:  # a new dict: options stay whole
                        kwargs = {
                            **kwargs,
                            "additional_forward_args": _batch_forward_args(
                                kwargs["additional_forward_args"], index, size, device
                            ),
                        }
                    values = TRUST_SCORES[name](model, scored, **kwargs)
                    chunks[name].append(values.detach().reshape(n).cpu())
                seen += n
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    if indices is not None and seen != len(indices):
        raise RuntimeError(
            f"the loader yielded {seen} examples, its sampler {len(indices)}; score_dataset "
            "needs a collate_fn that keeps one row per example."
        )
    return {name: torch.cat(parts) if parts else _empty(name) for name, parts in chunks.items()}


def _batch_options(name: str, kwargs: dict[str, Any], number: int) -> dict[str, Any]:
    seed = kwargs.get("generator")
    if name != "mc_dropout" or isinstance(seed, bool) or not isinstance(seed, int):
        return kwargs
    # an int seed s: batch number b draws its dropout masks from seed s * 2**20 + b, so that
    # the masks do not repeat from batch to batch and do not depend on the number of processes
    return {**kwargs, "generator": (seed * 2**20 + number) % 2**63}


def _empty(name: str) -> Tensor:
    if name == "correct":
        return torch.zeros(0, dtype=torch.bool)
    if name in BASE_COLUMNS:
        return torch.zeros(0, dtype=torch.int64)
    return torch.zeros(0, dtype=torch.get_default_dtype())


def _same_device(a: torch.device, b: torch.device) -> bool | None:
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        if a.type == "cuda":
            current = torch.cuda.current_device() if torch.cuda.is_available() else 0
            return (a.index if a.index is not None else current) == (
                b.index if b.index is not None else current
            )
        return True
    return a.index == b.index


#: the old name of :data:`TRUST_SCORES`
__getattr__ = moved_names(__name__, {"SCORES": f"{__name__}:TRUST_SCORES"})
