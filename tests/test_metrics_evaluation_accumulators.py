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


def test_with_the_default_noise_an_example_scores_the_same_alone_or_anywhere(oracle_maps):
    """The imputation noise was one draw for the whole stacked batch, so an example's ROAD,
    completeness and soundness scores moved (by up to 0.01 in probability) with the other
    images beside it, their order, and the accumulator's batching. Each example's noise now
    comes from the seed, its own pixels and its removal mask (not the position of the step
    in the list, which tied a fraction's score to the other fractions asked for)."""
    oracle, maps = oracle_maps
    model = _Scaled(oracle.model).eval()
    x, target = oracle.inputs, oracle.target
    options = {
        "road": {"percentages": [0.2, 0.6]},
        "completeness": {"thresholds": [0.3, 0.7]},
        "soundness": {"removed_fractions": [0.8, 0.5, 0.2], "score_floor": None},
    }
    order = torch.tensor([6, 2, 5, 0, 3, 1, 4])
    for cls, function, field, key in (
        (ROAD, road, "probability", "road"),
        (Completeness, completeness, "drop", "completeness"),
        (Soundness, soundness, "soundness", "soundness"),
    ):
        whole = getattr(function(model, x, maps, target=target, **options[key]), field)
        alone = getattr(
            function(model, x[3:4], maps[3:4], target=target[3:4], **options[key]), field
        )
        shuffled = getattr(
            function(model, x[order], maps[order], target=target[order], **options[key]), field
        )
        torch.testing.assert_close(alone[0], whole[3], atol=1e-12, rtol=0)
        torch.testing.assert_close(shuffled, whole[order], atol=1e-12, rtol=0)
        other_seed = getattr(function(model, x, maps, target=target, seed=1, **options[key]), field)
        if key != "soundness":  # the noise is real: another seed moves the scores
            assert float((other_seed - whole).abs().max()) > 0
        metric = cls(model, **options[key])
        for start, stop in ((0, 4), (4, 7)):
            metric.update(x[start:stop], maps[start:stop], target=target[start:stop])
        torch.testing.assert_close(metric.per_example(), whole.double().mean(1), atol=1e-12, rtol=0)


def test_the_soundness_floor_is_each_examples_own_probability():
    """With score="probability" the floor compared the batch's mean probability: an example
    whose target has probability 0 at every step (nothing to gain, so no mass is false)
    got false mass 64 next to a confident image and none alone. Now the floor reads each
    example's own probability; with score="accuracy" it stays the batch's (soco's rule)."""
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import load_sample_digits

    model = load_bundled_model().eval()
    x, labels = load_sample_digits()
    x, labels = x[:2], labels[:2]
    least_likely = model(x).argmin(dim=1)
    target = torch.stack([least_likely[0], labels[1]])
    maps = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    options = {"removed_fractions": [0.8, 0.6, 0.4, 0.2], "noise": 0.0}
    both = soundness(model, x, maps, target=target, **options)
    alone = soundness(model, x[:1], maps[:1], target=target[:1], **options)
    assert float(both.score[0].max()) < 0.04  # the premise: never above the floor
    assert float(both.false_mass[0]) == 0.0 == float(alone.false_mass[0])
    torch.testing.assert_close(both.soundness[0], alone.soundness[0], atol=0, rtol=0)
    accuracy = soundness(model, x, maps, target=target, score="accuracy", **options)
    assert accuracy.score.shape == both.score.shape


@pytest.mark.parametrize("cls", [ROAD, Completeness, Soundness])
@pytest.mark.parametrize("option", ["target", "additional_forward_args"])
def test_per_batch_arguments_are_refused_by_the_constructor(cls, option):
    """ROAD(model, target=1) was accepted, then every update() failed with "got multiple
    values for keyword argument 'target'"."""
    oracle = dominant_colour_oracle(2, size=6)
    with pytest.raises(TypeError, match=f"`{option}` goes with each batch, to update"):
        cls(oracle.model, **{option: 1})


def test_accuracy_soundness_takes_its_decisions_over_the_whole_dataset():
    """Soundness(score="accuracy") decided "no gain" from each batch's accuracy, so the same
    16 digits scored 1.000 in one batch and 0.899 in batches of one; the paper (and the
    function on all the data) decide from the dataset's accuracy. A hand-written loop over
    the function's own per-step scores and masses gives the expected values."""
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import load_sample_digits

    model = load_bundled_model().eval()
    x, labels = load_sample_digits()
    x, labels = x[:10], labels[:10]
    maps = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    ratios = [0.9, 0.7, 0.5, 0.3, 0.1]
    options = {"removed_fractions": ratios, "noise": 0.0, "score": "accuracy"}
    whole = soundness(model, x, maps, target=labels, **options)
    # the rule by hand: masses from the maps, decisions from the mean correctness
    flat = maps.flatten(1).double()
    flat = (flat - flat.min(1, keepdim=True).values) / (
        flat.max(1, keepdim=True).values - flat.min(1, keepdim=True).values
    )
    ranked = flat.sort(dim=1, descending=True).values  # no ties in uniform noise
    kept = [ranked[:, : 784 - int(784 * r)].sum(1) for r in ratios]
    expected = torch.empty(10, len(ratios), dtype=torch.float64)
    false_mass, previous, previous_kept = torch.zeros(10, dtype=torch.float64), 0.0, 0.0
    for j, mass in enumerate(kept):
        expected[:, j] = (mass - false_mass) / (mass + 1e-6)
        accuracy = float(whole.score[:, j].mean())
        if accuracy - previous <= 0.01 and accuracy > 0.04:
            false_mass = false_mass + (mass - previous_kept)
        previous, previous_kept = accuracy, mass
    torch.testing.assert_close(whole.soundness, expected, atol=1e-9, rtol=0)
    for batches in ((10,), (1,) * 10, (3, 7), (6, 1, 3)):
        metric = Soundness(model, **options)
        start = 0
        for size in batches:
            metric.update(
                x[start : start + size],
                maps[start : start + size],
                target=labels[start : start + size],
            )
            start += size
        torch.testing.assert_close(metric.per_example(), expected.mean(1), atol=1e-9, rtol=0)
    # the premise: batches of one decide otherwise than the dataset
    one = torch.stack(
        [
            soundness(
                model, x[i : i + 1], maps[i : i + 1], target=labels[i : i + 1], **options
            ).soundness[0]
            for i in range(10)
        ]
    )
    assert float((one.mean(1) - expected.mean(1)).abs().max()) > 1e-3


def test_nan_outputs_give_nan_not_a_score():
    """NaN logits were "correct" whenever the target was class 0 (argmax of a NaN row is 0),
    and their soundness counted no false mass (a NaN gain is never "no gain"), so the
    example scored about 1.0 and Soundness.compute() stayed finite."""
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))

    def model(x):
        out = inner(x)
        return torch.where(x.flatten(1).mean(1, keepdim=True) > 10, float("nan"), out)

    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    x[2] += 20.0  # example 2's outputs are NaN, imputed (from its bright pixels) or not
    maps = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    target = torch.zeros(4, dtype=torch.long)
    with pytest.warns(RuntimeWarning):
        curves = road(model, x, maps, target=target, percentages=[0.3, 0.6], noise=0.0)
    assert curves.correct[2].isnan().all() and not curves.correct[[0, 1, 3]].isnan().any()
    for score in ("probability", "accuracy"):
        with pytest.warns(RuntimeWarning):
            result = soundness(
                model,
                x,
                maps,
                target=target,
                score=score,
                removed_fractions=[0.8, 0.5, 0.2],
                noise=0.0,
            )
        assert result.soundness[2].isnan().all() and result.false_mass[2].isnan()
        assert not result.soundness[[0, 1, 3]].isnan().any()
        metric = Soundness(model, score=score, removed_fractions=[0.8, 0.5, 0.2], noise=0.0)
        with pytest.warns(RuntimeWarning):
            metric.update(x, maps, target=target)
        assert torch.isnan(torch.tensor(metric.compute()))


def test_options_given_as_one_shot_iterables_serve_every_batch(oracle_maps):
    oracle, maps = oracle_maps
    metric = ROAD(_Scaled(oracle.model).eval(), percentages=(p for p in (0.2, 0.6)), noise=0.0)
    for start, stop in ((0, 4), (4, 7)):
        metric.update(oracle.inputs[start:stop], maps[start:stop], target=oracle.target[start:stop])
    assert metric.n_seen == 7
