r"""Dataset-scale metrics as accumulating objects: ``update`` per batch, ``compute`` at the end.

Each class pairs with a function and follows the torchmetrics contract without depending on
it: ``update(...)`` stores the batch's values, ``compute()`` returns what the function returns
on all the data seen so far (in the order given), ``reset()`` forgets it. Under
``torch.distributed`` (initialised process group) ``compute()`` first gathers the stored
values of every process (``all_gather``, uneven sizes and ranks without data allowed), so
every rank gets the value on everything the processes were updated with, concatenated in
rank order. It is a collective call: every rank must call it (``if rank == 0:
metric.compute()`` waits for the other ranks until the process group times out); print or
save the value on rank 0 afterwards.

**DistributedSampler pads.** What the processes were updated with is the dataset only when
their shards split it exactly. The usual ``DataLoader(dataset, sampler=DistributedSampler(
dataset))`` does not when ``len(dataset)`` is not a multiple of the number of processes:
the sampler (``drop_last=False``, its default) repeats the first examples to give every
process as many, and the accumulators count the repeats like any other example (they
cannot tell them apart): 37 examples on 2 processes give 38 rows, one example counted
twice, and a value slightly off the single-process one (``drop_last=True`` leaves examples
out instead). For the value on the dataset exactly, give each process a shard without
padding, which the accumulators allow (uneven shards)::

    shard = range(rank, len(dataset), world_size)   # 19 and 18 of 37 examples
    loader = DataLoader(dataset, batch_size=64, sampler=list(shard))

or score with :func:`~captum_ext.metrics.score_dataset`, which drops the repeats when it
gathers its table (one row per example, in dataset order), and give its columns to the
functions (``auac(table["softmax"], table["correct"])``).

=========================  =========================================================
class                      function
=========================  =========================================================
:class:`AUAC`              :func:`~captum_ext.metrics.auac`
:class:`AUFC`              :func:`~captum_ext.metrics.aufc`
:class:`MispredictionAUROC`  :func:`~captum_ext.metrics.misprediction_auroc`
:class:`AUROC`             :func:`~captum_ext.metrics.auroc` (in / out scores)
:class:`AUPR`              :func:`~captum_ext.metrics.aupr`
:class:`FPRAtTPR`          :func:`~captum_ext.metrics.fpr_at_tpr`
:class:`ExpectedCalibrationError`  :func:`~captum_ext.metrics.expected_calibration_error`
:class:`DeletionAUC`       mean of :func:`~captum_ext.metrics.deletion`
:class:`InsertionAUC`      mean of :func:`~captum_ext.metrics.insertion`
=========================  =========================================================
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from captum_ext._utils.precision import array_like_tensor
from captum_ext.metrics.calibration import _confidence_and_correct, expected_calibration_error
from captum_ext.metrics.curves import (
    auac,
    aufc,
    aupr,
    auroc,
    finite_scores,
    fpr_at_tpr,
    misprediction_auroc,
)
from captum_ext.metrics.deletion_insertion import deletion, insertion

__all__ = [
    "AUAC",
    "AUFC",
    "AUPR",
    "AUROC",
    "DeletionAUC",
    "ExpectedCalibrationError",
    "FPRAtTPR",
    "InsertionAUC",
    "MispredictionAUROC",
]


def _as_stored(
    values: Any,
    argument: str,
    dtype: torch.dtype,
    *,
    rows: bool = False,
    kind: str | None = None,
) -> Tensor:
    """A detached CPU copy of one batch's values: 1-D, or (N, C) when ``rows``; checked as
    the metric's function checks them (``kind``: ``"scores"`` real numbers, not booleans;
    ``"indices"`` integer class indices, not booleans; ``"correct"`` booleans or 0/1;
    ``"probabilities"`` floating point), so that the cast to ``dtype`` never turns into a
    number what the function would refuse (a correctness of 0.7 stored as 0, boolean
    scores or class labels stored as 0 and 1). An empty batch (``[]``) is stored as empty
    whatever its dtype."""
    try:
        tensor = array_like_tensor(values).detach()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`{argument}` must be a tensor or array-like: {error}") from None
    if tensor.dim() == 1 and tensor.numel() == 0:  # [] reads as float64: nothing to check
        return torch.zeros(0, dtype=dtype)
    if tensor.dim() != (2 if rows else 1) and not (rows and tensor.dim() == 1):
        raise ValueError(
            f"`{argument}` must be {'(N, C) or (N,)' if rows else '1-D (N,)'}, got shape "
            f"{tuple(tensor.shape)}."
        )
    if tensor.is_complex():  # the functions refuse it; a cast would drop the imaginary part
        raise TypeError(f"`{argument}` must hold real values, got {tensor.dtype}.")
    if kind == "indices" and (tensor.is_floating_point() or tensor.dtype == torch.bool):
        raise TypeError(f"`{argument}` must hold integer class indices, got {tensor.dtype}.")
    if kind == "scores" and tensor.numel():
        # the function's own check, now: a NaN stored here would make every compute() fail
        # after the pass over the dataset, with no way to drop the batch but reset()
        finite_scores(tensor, argument)
    if kind == "correct" and tensor.dtype != torch.bool:
        if tensor.is_complex() or not bool(((tensor == 0) | (tensor == 1)).all()):
            raise ValueError(
                f"`{argument}` must hold booleans (or 0/1): True = correct prediction."
            )
    if kind == "probabilities" and not tensor.is_floating_point():
        raise TypeError(f"`{argument}` must hold floating point values, got {tensor.dtype}.")
    if tensor.dtype == torch.bool and dtype != torch.bool:
        tensor = tensor.to(torch.long)
    # moved first (MPS tensors cannot be float64); always a copy: the caller's buffer may be
    # refilled with the next batch
    return tensor.cpu().to(dtype, copy=True)


def _checked_options(function: Callable, *example: Any, **options: Any) -> None:
    """Run ``function`` once on a tiny valid ``example`` with the accumulator's ``options``,
    so that a bad option is refused when the accumulator is made, by the function's own
    checks, not at ``compute()`` after a pass over a whole dataset."""
    function(*example, **options)


_SCORES = torch.tensor([0.9, 0.2, 0.6, 0.4], dtype=torch.float64)
_CORRECT = torch.tensor([True, False, True, False])


#: arguments that an accumulator's ``update`` takes with each batch
PER_BATCH = ("target", "additional_forward_args")


def check_option_names(function: Callable, options: dict[str, Any], owner: str) -> None:
    """Refuse keyword ``options`` that ``function`` does not take, and those ``update``
    takes with each batch (:data:`PER_BATCH`), when the accumulator is made (their values
    are checked by the function at the first ``update``)."""
    import inspect

    per_batch = [name for name in PER_BATCH if name in options]
    if per_batch:
        raise TypeError(
            f"{owner}: `{per_batch[0]}` goes with each batch, to update(..., "
            f"{per_batch[0]}=...), not to the constructor."
        )

    taken = {
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(options) - taken)
    if unknown:
        raise TypeError(
            f"{owner}: unknown options {unknown}; {function.__name__} takes "
            f"{', '.join(sorted(taken))}."
        )


_MAX_DIMS = 8  # of an accumulated state: (N,) or (N, C) here


def _gather(tensor: Tensor) -> Tensor:
    """Concatenation over all processes (rank order) of a tensor whose first dimension may
    differ between processes; the tensor itself when torch.distributed is not initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    local = tensor.to(device)
    # exchange the shapes first: the first dimension differs between ranks, and a rank
    # without data holds (0,) where the others hold (N, C) (all_gather needs equal sizes)
    shape = torch.full((1 + _MAX_DIMS,), -1, dtype=torch.long, device=device)
    shape[0] = local.dim()
    shape[1 : 1 + local.dim()] = torch.tensor(local.shape, dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    filled = [s for s in shapes if int(s[1]) > 0]
    if filled and local.shape[0] == 0:
        first = filled[0]
        local = local.reshape(0, *(int(d) for d in first[2 : 1 + int(first[0])]))
    sizes = [s[1] for s in shapes]
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(tensor.device)


class _Accumulator:
    """Lists of per-batch tensors, one list per state name; concatenated (and gathered) on
    compute."""

    _states: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._values: dict[str, list[Tensor]] = {name: [] for name in self._states}

    def _append(self, **batch: Tensor) -> None:
        for name, tensor in batch.items():
            self._values[name].append(tensor)

    def _concatenated(self, name: str, empty: Tensor) -> Tensor:
        parts = self._values[name]
        local = torch.cat(parts) if parts else empty
        return _gather(local)

    @property
    def n_seen(self) -> int:
        """Examples accumulated by this process (first state)."""
        return sum(int(t.shape[0]) for t in self._values[self._states[0]])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_seen={self.n_seen})"


def _check_same_length(**tensors: Tensor) -> None:
    lengths = {name: int(t.shape[0]) for name, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"`{k}` has {v}" for k, v in lengths.items())
        raise ValueError(f"one value per example expected in every argument: {shown}.")


_F64 = torch.float64
_EMPTY_F64 = torch.zeros(0, dtype=_F64)
_EMPTY_LONG = torch.zeros(0, dtype=torch.long)


class _ScoresAndCorrect(_Accumulator):
    _states = ("scores", "correct")

    def update(self, scores: Any, correct: Any) -> None:
        """Add a batch: trust ``scores`` (N,) and ``correct`` (N,) booleans or 0/1."""
        s = _as_stored(scores, "scores", _F64, kind="scores")
        c = _as_stored(correct, "correct", torch.long, kind="correct")
        _check_same_length(scores=s, correct=c)
        self._append(scores=s, correct=c)

    def _data(self) -> tuple[Tensor, Tensor]:
        return self._concatenated("scores", _EMPTY_F64), self._concatenated("correct", _EMPTY_LONG)


class AUAC(_ScoresAndCorrect):
    r"""Area under the accuracy-retention curve, accumulated over batches.

    ``compute()`` equals :func:`~captum_ext.metrics.auac` on the concatenated scores and
    correctness of all batches (and of all processes under ``torch.distributed``).

    Args:
        percentiles (array-like, optional): as in :func:`~captum_ext.metrics.auac`.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import AUAC
        >>> metric = AUAC()
        >>> metric.update(torch.tensor([0.9, 0.2]), torch.tensor([True, False]))
        >>> metric.update(torch.tensor([0.7]), torch.tensor([True]))
        >>> round(metric.compute(), 2)
        88.67
    """

    def __init__(self, *, percentiles: Any = None) -> None:
        _checked_options(auac, _SCORES, _CORRECT, percentiles=percentiles)  # warns here, once
        self.percentiles = percentiles
        super().__init__()

    def compute(self) -> float:
        """AUAC in percent on everything accumulated."""
        scores, correct = self._data()
        with warnings.catch_warnings():  # said once, when the metric was made
            warnings.filterwarnings("ignore", message="`percentiles`", category=UserWarning)
            return auac(scores, correct, percentiles=self.percentiles)


class MispredictionAUROC(_ScoresAndCorrect):
    r"""AUROC of telling correct from wrong predictions by a trust score, over batches.

    ``compute()`` equals :func:`~captum_ext.metrics.misprediction_auroc` on the concatenated
    data.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import MispredictionAUROC
        >>> metric = MispredictionAUROC()
        >>> metric.update(torch.tensor([0.9, 0.2]), torch.tensor([True, False]))
        >>> metric.compute()
        1.0
    """

    def compute(self) -> float:
        """The AUROC on everything accumulated."""
        scores, correct = self._data()
        return misprediction_auroc(scores, correct)


class AUFC(_Accumulator):
    r"""Area under the macro-F1-retention curve, accumulated over batches.

    ``compute()`` equals :func:`~captum_ext.metrics.aufc` on the concatenated data.

    Args:
        percentiles (array-like, optional): as in :func:`~captum_ext.metrics.aufc`.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import AUFC
        >>> metric = AUFC()
        >>> metric.update(torch.tensor([0.9, 0.2, 0.5]), torch.tensor([1, 0, 2]),
        ...               torch.tensor([1, 1, 2]))
        >>> 0 <= metric.compute() <= 100
        True
    """

    _states = ("scores", "predictions", "labels")

    def __init__(self, *, percentiles: Any = None) -> None:
        labels = torch.tensor([0, 1, 1, 0])
        _checked_options(aufc, _SCORES, labels, torch.tensor([0, 0, 1, 1]), percentiles=percentiles)
        self.percentiles = percentiles
        super().__init__()

    def update(self, scores: Any, predictions: Any, labels: Any) -> None:
        """Add a batch: ``scores``, predicted classes and true labels, each (N,)."""
        s = _as_stored(scores, "scores", _F64, kind="scores")
        p = _as_stored(predictions, "predictions", torch.long, kind="indices")
        y = _as_stored(labels, "labels", torch.long, kind="indices")
        _check_same_length(scores=s, predictions=p, labels=y)
        self._append(scores=s, predictions=p, labels=y)

    def compute(self) -> float:
        """AUFC in percent on everything accumulated."""
        return aufc(
            self._concatenated("scores", _EMPTY_F64),
            self._concatenated("predictions", _EMPTY_LONG),
            self._concatenated("labels", _EMPTY_LONG),
            percentiles=self.percentiles,
        )


class _InOut(_Accumulator):
    _states = ("in_scores", "out_scores")

    def update(self, in_scores: Any = (), out_scores: Any = ()) -> None:
        """Add scores of in-distribution and/or out-of-distribution examples (higher = more
        in-distribution); either may be empty in a batch."""
        inside = _as_stored(in_scores, "in_scores", _F64, kind="scores")
        outside = _as_stored(out_scores, "out_scores", _F64, kind="scores")
        self._append(in_scores=inside, out_scores=outside)

    def _data(self) -> tuple[Tensor, Tensor]:
        return self._concatenated("in_scores", _EMPTY_F64), self._concatenated(
            "out_scores", _EMPTY_F64
        )

    @property
    def n_seen(self) -> int:
        """In- plus out-of-distribution examples accumulated by this process."""
        return sum(int(t.shape[0]) for v in self._values.values() for t in v)


class AUROC(_InOut):
    r"""Out-of-distribution AUROC, accumulated over batches.

    ``compute()`` equals :func:`~captum_ext.metrics.auroc` on the concatenated in- and
    out-of-distribution scores.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import AUROC
        >>> metric = AUROC()
        >>> metric.update(in_scores=torch.tensor([0.9, 0.8]))
        >>> metric.update(out_scores=torch.tensor([0.1, 0.85]))
        >>> metric.compute()
        0.75
    """

    def compute(self) -> float:
        """The AUROC on everything accumulated."""
        return auroc(*self._data())


class AUPR(_InOut):
    r"""Out-of-distribution AUPR, accumulated over batches.

    ``compute()`` equals :func:`~captum_ext.metrics.aupr` on the concatenated scores.

    Args:
        positive (str, optional): ``"in"`` (default) or ``"out"``, as in
            :func:`~captum_ext.metrics.aupr`.
    """

    def __init__(self, *, positive: str = "in") -> None:
        _checked_options(aupr, _SCORES[:2], _SCORES[2:], positive=positive)
        self.positive = positive
        super().__init__()

    def compute(self) -> float:
        """The AUPR on everything accumulated."""
        return aupr(*self._data(), positive=self.positive)


class FPRAtTPR(_InOut):
    r"""False positive rate at a true positive rate (default 95 %), over batches.

    ``compute()`` equals :func:`~captum_ext.metrics.fpr_at_tpr` on the concatenated scores.

    Args:
        tpr (float, optional): the true positive rate. Default: 0.95.
        positive (str, optional): ``"in"`` (default) or ``"out"``, as in
            :func:`~captum_ext.metrics.fpr_at_tpr`.
    """

    def __init__(self, *, tpr: float = 0.95, positive: str = "in") -> None:
        _checked_options(fpr_at_tpr, _SCORES[:2], _SCORES[2:], tpr=tpr, positive=positive)
        self.tpr = tpr
        self.positive = positive
        super().__init__()

    def compute(self) -> float:
        """The FPR at ``tpr`` on everything accumulated."""
        return fpr_at_tpr(*self._data(), tpr=self.tpr, positive=self.positive)


class ExpectedCalibrationError(_Accumulator):
    r"""Expected calibration error over equal-width bins, accumulated over batches.

    ``compute()`` equals :func:`~captum_ext.metrics.expected_calibration_error` on the
    concatenated data (probabilities of all batches must have the same number of classes).

    Args:
        n_bins (int, optional): number of bins. Default: 15.
        norm (str, optional): ``"l1"`` (ECE, default), ``"l2"`` or ``"max"``.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import ExpectedCalibrationError
        >>> metric = ExpectedCalibrationError()
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1]))
        >>> metric.update(torch.tensor([[0.3, 0.7]]), torch.tensor([1]))
        >>> round(metric.compute(), 4)
        0.3333
    """

    _states = ("values", "labels")

    def __init__(self, *, n_bins: int = 15, norm: str = "l1") -> None:
        _checked_options(expected_calibration_error, _SCORES, _CORRECT, n_bins=n_bins, norm=norm)
        self.n_bins = n_bins
        self.norm = norm
        super().__init__()

    def update(self, probabilities_or_confidences: Any, labels: Any) -> None:
        """Add a batch: (N, C) probabilities with (N,) integer class labels, or (N,)
        confidences with (N,) correctness (booleans or 0/1). What
        :func:`~captum_ext.metrics.expected_calibration_error` refuses (boolean class labels
        with (N, C) probabilities, say) is refused here, not at ``compute()``."""
        values = _as_stored(
            probabilities_or_confidences,
            "probabilities_or_confidences",
            _F64,
            rows=True,
            kind="probabilities",
        )
        # (N,) confidences take correctness (booleans or 0/1), (N, C) probabilities integer
        # class indices (booleans refused, as the function refuses them: stored as 0 / 1
        # they would be taken here and refused by nothing)
        y = _as_stored(
            labels, "labels", torch.long, kind="correct" if values.dim() == 1 else "indices"
        )
        _check_same_length(probabilities_or_confidences=values, labels=y)
        if values.shape[0] == 0:  # an empty batch fixes no number of classes
            return
        _confidence_and_correct(values, y)  # the function's range and label checks, now
        earlier = self._values["values"]
        if earlier and earlier[0].shape[1:] != values.shape[1:]:
            raise ValueError(
                f"this batch has shape {tuple(values.shape)} but earlier batches had "
                f"{tuple(earlier[0].shape)}; give every batch the same number of classes."
            )
        self._append(values=values, labels=y)

    def compute(self) -> float:
        """The calibration error on everything accumulated."""
        parts = self._values["values"]
        empty = torch.zeros((0, *parts[0].shape[1:]) if parts else (0,), dtype=_F64)
        return expected_calibration_error(
            self._concatenated("values", empty),
            self._concatenated("labels", _EMPTY_LONG),
            n_bins=self.n_bins,
            norm=self.norm,
        )


class _PerturbationAUC(_Accumulator):
    _states = ("auc",)
    _function: Callable = staticmethod(deletion)

    def __init__(self, forward_func: Callable, **options: Any) -> None:
        if not callable(forward_func):
            raise TypeError(f"`forward_func` must be callable, got {type(forward_func).__name__}.")
        if "return_curves" in options:
            raise TypeError("`return_curves` is not an option here: the AUCs are accumulated.")
        check_option_names(type(self)._function, options, type(self).__name__)
        self.forward_func = forward_func
        self.options = options
        super().__init__()

    def update(
        self,
        inputs: Tensor | tuple[Tensor],
        attributions: Tensor | tuple[Tensor],
        *,
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        """Score a batch and store its per-example AUCs; returns them, (N,)."""
        auc = type(self)._function(
            self.forward_func,
            inputs,
            attributions,
            target=target,
            additional_forward_args=additional_forward_args,
            **self.options,
        )
        self._append(auc=auc.detach().cpu().to(_F64, copy=True))  # not the returned tensor
        return auc

    def per_example(self) -> Tensor:
        """(N,) float64 AUCs of every example accumulated (all processes), in order."""
        return self._concatenated("auc", _EMPTY_F64)

    def compute(self) -> float:
        """The mean AUC over every example accumulated."""
        values = self.per_example()
        if values.numel() == 0:
            raise ValueError(f"{type(self).__name__}.compute() called before any update().")
        return float(values.mean())


class DeletionAUC(_PerturbationAUC):
    r"""Mean deletion AUC over a dataset, accumulated batch by batch.

    ``update(inputs, attributions, target=...)`` runs :func:`~captum_ext.metrics.deletion`
    on the batch and stores the per-example AUCs; ``compute()`` is their mean, equal to
    ``deletion(...)`` on the concatenated batches, averaged.

    Args:
        forward_func (Callable or nn.Module): the model.
        **options: keyword options of :func:`~captum_ext.metrics.deletion` (``baselines``,
            ``n_steps``, ``batch_size``, ``channel_reduction``, ``blur_kernel_size``,
            ``blur_sigma``).

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits
        >>> from captum_ext.metrics import DeletionAUC
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> cam = LayerGradCam(model, model.get_submodule(BUNDLED_CAM_LAYER))
        >>> metric = DeletionAUC(model, n_steps=14)
        >>> for start in (0, 4):
        ...     x, y = images[start : start + 4], labels[start : start + 4]
        ...     _ = metric.update(x, cam.attribute(x, target=y), target=y)
        >>> 0.0 <= metric.compute() <= 1.0
        True
    """

    _function = staticmethod(deletion)


class InsertionAUC(_PerturbationAUC):
    r"""Mean insertion AUC over a dataset, accumulated batch by batch.

    As :class:`DeletionAUC`, with :func:`~captum_ext.metrics.insertion`.

    Args:
        forward_func (Callable or nn.Module): the model.
        **options: keyword options of :func:`~captum_ext.metrics.insertion`.
    """

    _function = staticmethod(insertion)
