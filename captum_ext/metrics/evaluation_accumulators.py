r"""Accumulating classes for the ground-truth and soundness/completeness metrics.

Same contract as :mod:`captum_ext.metrics.accumulators` (``update`` per batch, ``compute``
over everything seen, ``reset``; values gathered from every process under
``torch.distributed``). Each stores one number per example and ``compute()`` is their mean.

==========================  ==============================================================
class                       per-example value
==========================  ==============================================================
:class:`PointingGame`       :func:`~captum_ext.metrics.pointing_game` (hit = 1)
:class:`EnergyPointingGame` :func:`~captum_ext.metrics.energy_pointing_game`
:class:`AttributionF1`      :func:`~captum_ext.metrics.attribution_f1`
:class:`ROAD`               mean over fractions of :func:`~captum_ext.metrics.road`'s
                            target probability
:class:`Completeness`       mean over thresholds of :func:`~captum_ext.metrics.completeness`'s
                            drop
:class:`Soundness`          mean over steps of :func:`~captum_ext.metrics.soundness`
==========================  ==============================================================

``Soundness(score="accuracy")`` takes its "no gain" decisions per batch given to ``update``
(the paper takes them over the whole dataset); use ``score="probability"`` (the default) for
per-example decisions that do not depend on the batching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from captum_ext.metrics.accumulators import _Accumulator, check_option_names
from captum_ext.metrics.ground_truth import attribution_f1, energy_pointing_game, pointing_game
from captum_ext.metrics.remove_and_debias import completeness, road, soundness

__all__ = [
    "ROAD",
    "AttributionF1",
    "Completeness",
    "EnergyPointingGame",
    "PointingGame",
    "Soundness",
]

_EMPTY = torch.zeros(0, dtype=torch.float64)
# a tiny valid map and object mask, to check an accumulator's options when it is made
_MAP = torch.linspace(0, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
_OBJECT = torch.zeros(1, 4, 4, dtype=torch.bool)
_OBJECT[0, 1:3, 1:3] = True


class _PerExampleMean(_Accumulator):
    _states = ("value",)

    def _store(self, values: Tensor) -> Tensor:
        # a copy: editing the returned values must not edit the accumulated ones
        self._append(value=values.detach().cpu().to(torch.float64, copy=True).reshape(-1))
        return values

    def per_example(self) -> Tensor:
        """(N,) float64 values of every example accumulated (all processes), in order."""
        return self._concatenated("value", _EMPTY)

    def compute(self) -> float:
        """The mean over every example accumulated."""
        values = self.per_example()
        if values.numel() == 0:
            raise ValueError(f"{type(self).__name__}.compute() called before any update().")
        return float(values.mean())


class PointingGame(_PerExampleMean):
    """Share of hits of :func:`~captum_ext.metrics.pointing_game` over a dataset.

    Examples::

        >>> import torch
        >>> game = PointingGame(tolerance=1)
        >>> maps = torch.zeros(2, 1, 8, 8); maps[0, 0, 2, 2] = 1; maps[1, 0, 7, 7] = 1
        >>> _ = game.update(maps, torch.tensor([[1, 1, 4, 4], [1, 1, 4, 4]]))
        >>> game.compute()
        0.5
    """

    def __init__(self, *, tolerance: int = 0) -> None:
        pointing_game(_MAP, _OBJECT, tolerance=tolerance)  # a bad option refused now
        self.tolerance = tolerance
        super().__init__()

    def update(self, attributions: Any, objects: Any) -> Tensor:
        """Play a batch; returns its (N,) bool hits."""
        hits = pointing_game(attributions, objects, tolerance=self.tolerance)
        self._store(hits)
        return hits


class EnergyPointingGame(_PerExampleMean):
    """Mean :func:`~captum_ext.metrics.energy_pointing_game` over a dataset."""

    def update(self, attributions: Any, objects: Any) -> Tensor:
        return self._store(energy_pointing_game(attributions, objects))


class AttributionF1(_PerExampleMean):
    """Mean :func:`~captum_ext.metrics.attribution_f1` over a dataset; ``**options`` as there
    (``sign``, ``selection``, ``threshold``)."""

    def __init__(self, **options: Any) -> None:
        attribution_f1(_MAP, _OBJECT.unsqueeze(1).float(), **options)  # refused now, not later
        self.options = options
        super().__init__()

    def update(self, attributions: Any, ground_truth: Any) -> Tensor:
        return self._store(attribution_f1(attributions, ground_truth, **self.options))


class _ModelMetric(_PerExampleMean):
    """A metric that runs the model: the function's curve ``_curve`` (a field of its result,
    (N, points)) averaged over its points is the per-example value."""

    _function: Callable = staticmethod(road)
    _curve: str = "probability"

    def __init__(self, forward_func: Callable, **options: Any) -> None:
        if not callable(forward_func):
            raise TypeError(f"`forward_func` must be callable, got {type(forward_func).__name__}.")
        check_option_names(type(self)._function, options, type(self).__name__)
        self.forward_func = forward_func
        self.options = options
        super().__init__()

    def update(
        self,
        inputs: Tensor,
        attributions: Any,
        *,
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        """Score a batch and store one value per example; returns them, (N,)."""
        result = type(self)._function(
            self.forward_func,
            inputs,
            attributions,
            target=target,
            additional_forward_args=additional_forward_args,
            **self.options,
        )
        return self._store(getattr(result, self._curve).cpu().double().mean(dim=1))


class ROAD(_ModelMetric):
    """Mean target probability along :func:`~captum_ext.metrics.road`'s removal curve
    (lower is better for ``order="morf"``, higher for ``"lerf"``)."""

    _function = staticmethod(road)
    _curve = "probability"


class Completeness(_ModelMetric):
    """Mean score drop along :func:`~captum_ext.metrics.completeness`'s thresholds (higher is
    better)."""

    _function = staticmethod(completeness)
    _curve = "drop"


class Soundness(_ModelMetric):
    """Mean of :func:`~captum_ext.metrics.soundness`'s curve over its steps (higher is
    better)."""

    _function = staticmethod(soundness)
    _curve = "soundness"
