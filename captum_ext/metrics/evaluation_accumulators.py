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

``ROAD``, ``Completeness`` and ``Soundness`` take their function's options, among them
``channel_reduction``: ``"sum"`` (default, the signed sum of a multi-channel map's channels)
or ``"sum_abs"`` (:func:`~captum_ext.metrics.deletion`'s default ``sum_c |a_c|``).

``Soundness`` keeps each example's masses and scores per step and applies the soundness rule
in ``compute()``, so that ``Soundness(score="accuracy")`` takes its "no gain" decisions from
the accuracy over the whole dataset, as the paper does, whatever the batching.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from captum_ext.metrics.accumulators import _Accumulator, check_option_names
from captum_ext.metrics.ground_truth import attribution_f1, energy_pointing_game, pointing_game
from captum_ext.metrics.remove_and_debias import (
    _accumulated_soundness,
    _check_channel_reduction,
    _soundness_parts,
    _soundness_rule,
    completeness,
    road,
    soundness,
)

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
        >>> from captum_ext.metrics import PointingGame
        >>> boxes = torch.tensor([[1, 1, 4, 4], [1, 1, 4, 4]])  # pixels 1..3 (x1, y1 exclusive)
        >>> maps = torch.zeros(2, 1, 8, 8); maps[0, 0, 2, 4] = 1; maps[1, 0, 7, 7] = 1
        >>> PointingGame().update(maps, boxes)  # tolerance 0: the maximum inside the object
        tensor([False, False])
        >>> game = PointingGame(tolerance=2)  # closer than 2 pixels: the near miss at x = 4
        >>> game.update(maps, boxes)
        tensor([ True, False])
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
        if "channel_reduction" in options:  # refused now, not at the first update
            _check_channel_reduction(options["channel_reduction"])
        self.forward_func = forward_func
        # a one-shot iterable (a generator of percentages) would be used up by the first batch
        self.options = {
            name: tuple(value) if isinstance(value, Iterator) else value
            for name, value in options.items()
        }
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
    (lower is better for ``order="morf"``, higher for ``"lerf"``); ``**options`` as there,
    ``channel_reduction`` included (checked when the accumulator is made)."""

    _function = staticmethod(road)
    _curve = "probability"


class Completeness(_ModelMetric):
    """Mean score drop along :func:`~captum_ext.metrics.completeness`'s thresholds (higher is
    better)."""

    _function = staticmethod(completeness)
    _curve = "drop"


_RULE = ("score", "threshold", "score_floor")


class Soundness(_ModelMetric):
    """Mean of :func:`~captum_ext.metrics.soundness`'s curve over its steps (higher is
    better), ``**options`` as there.

    ``update`` imputes and scores a batch and keeps, per example and step, the attribution
    mass kept and re-added and the score; ``compute()`` and ``per_example()`` apply the
    soundness rule to everything accumulated. So the values equal the function's on all the
    examples at once, also with ``score="accuracy"``, whose "no gain" decisions come from the
    accuracy over the whole dataset (the paper's), not over one batch.

    Examples::

        >>> import torch
        >>> from captum_ext.metrics import Soundness
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> metric = Soundness(model, removed_fractions=(0.75, 0.5, 0.25), noise=0.0)
        >>> images, maps = torch.rand(4, 1, 4, 4), torch.rand(4, 1, 4, 4)
        >>> _ = metric.update(images[:3], maps[:3], target=0)
        >>> _ = metric.update(images[3:], maps[3:], target=0)
        >>> 0.0 <= metric.compute() <= 1.0
        True
    """

    _function = staticmethod(soundness)
    _curve = "soundness"
    _states = ("remaining", "added", "measured")

    def __init__(self, forward_func: Callable, **options: Any) -> None:
        super().__init__(forward_func, **options)
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(soundness).parameters.items()
            if parameter.kind is parameter.KEYWORD_ONLY
        }
        chosen = {**defaults, **self.options}
        self._rule = _soundness_rule(*(chosen[name] for name in _RULE))  # refused now
        self._parts_options = {
            name: value
            for name, value in chosen.items()
            if name not in (*_RULE, "target", "additional_forward_args")
        }

    def update(
        self,
        inputs: Tensor,
        attributions: Any,
        *,
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        """Score a batch and keep its masses and scores; returns the batch's own (N,)
        values (with ``score="accuracy"``, decided on this batch's accuracy alone)."""
        parts = _soundness_parts(
            self.forward_func,
            inputs,
            attributions,
            target=target,
            additional_forward_args=additional_forward_args,
            **self._parts_options,
        )
        measured = parts.probability if self._rule[0] == "probability" else parts.correct
        self._append(remaining=parts.remaining, added=parts.added, measured=measured)
        curves, _ = _accumulated_soundness(parts.remaining, parts.added, measured, *self._rule)
        return curves.mean(dim=1)

    def per_example(self) -> Tensor:
        """(N,) soundness of every example accumulated (all processes), in order, with the
        rule applied to all of them at once."""
        steps = len(self._parts_options["removed_fractions"])
        empty = torch.zeros(0, steps, dtype=torch.float64)
        remaining, added, measured = (self._concatenated(name, empty) for name in self._states)
        if remaining.shape[0] == 0:
            return _EMPTY
        curves, _ = _accumulated_soundness(remaining, added, measured, *self._rule)
        return curves.mean(dim=1)
