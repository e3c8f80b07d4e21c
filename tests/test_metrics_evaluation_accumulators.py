"""Accumulating classes of the ground-truth and soundness/completeness metrics: compute() is
the mean of the function's per-example values over every batch given to update()."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients

from captum_ext.metrics import (
    ROAD,
    AttributionF1,
    Completeness,
    EnergyPointingGame,
    PointingGame,
    Soundness,
    attribution_f1,
    completeness,
    energy_pointing_game,
    pointing_game,
    road,
    soundness,
)
from captum_ext.testing import dominant_colour_oracle


@pytest.fixture(scope="module")
def oracle_maps():
    oracle = dominant_colour_oracle(7, colours=3, size=10, seed=1)
    maps = IntegratedGradients(oracle.model).attribute(
        oracle.inputs, baselines=oracle.baselines, target=oracle.target, n_steps=16
    )
    return oracle, maps


def test_map_only_metrics_accumulate_to_the_function_on_all_data(oracle_maps):
    oracle, maps = oracle_maps
    boxes = torch.tensor([[0, 0, 5, 5]] * 7)
    for metric, function, second in (
        (PointingGame(tolerance=1), lambda a, b: pointing_game(a, b, tolerance=1), boxes),
        (EnergyPointingGame(), energy_pointing_game, boxes),
        (
            AttributionF1(sign="negative"),
            lambda a, b: attribution_f1(a, b, sign="negative"),
            oracle.ground_truth,
        ),
    ):
        for start, stop in ((0, 3), (3, 4), (4, 7)):  # uneven batches
            metric.update(maps[start:stop], second[start:stop])
        expected = function(maps, second).double().mean().item()
        assert metric.compute() == pytest.approx(expected, abs=1e-12)
        assert metric.n_seen == 7
        metric.reset()
        with pytest.raises(ValueError, match="before any update"):
            metric.compute()


class _Scaled(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) / 30.0


def test_model_metrics_accumulate_to_the_function_on_all_data(oracle_maps):
    oracle, maps = oracle_maps
    model = _Scaled(oracle.model).eval()
    options = {
        "road": {"percentages": [0.2, 0.6], "noise": 0.0},
        "completeness": {"thresholds": [0.3, 0.7], "noise": 0.0},
        "soundness": {"removed_fractions": [0.8, 0.5, 0.2], "noise": 0.0},
    }
    for cls, function, reduce, key in (
        (ROAD, road, lambda r: r.probability.double().mean(1), "road"),
        (Completeness, completeness, lambda r: r.drop.double().mean(1), "completeness"),
        (Soundness, soundness, lambda r: r.soundness.double().mean(1), "soundness"),
    ):
        metric = cls(model, **options[key])
        for start, stop in ((0, 4), (4, 7)):
            metric.update(
                oracle.inputs[start:stop], maps[start:stop], target=oracle.target[start:stop]
            )
        whole = reduce(function(model, oracle.inputs, maps, target=oracle.target, **options[key]))
        # without imputation noise the per-example values do not depend on the batching
        torch.testing.assert_close(metric.per_example(), whole, atol=1e-6, rtol=0)
        assert metric.compute() == pytest.approx(whole.mean().item(), abs=1e-6)
    with pytest.raises(TypeError, match="forward_func"):
        ROAD("not a model")
