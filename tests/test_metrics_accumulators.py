"""Accumulating metric classes: compute() equals the function on the concatenated data,
with uneven batches, after reset, and across 2 gloo processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _distributed import run_gloo
from _helpers import make_tiny_cnn

from captum_ext.metrics import (
    AUAC,
    AUFC,
    AUPR,
    AUROC,
    DeletionAUC,
    ExpectedCalibrationError,
    FPRAtTPR,
    InsertionAUC,
    MispredictionAUROC,
    auac,
    aufc,
    aupr,
    auroc,
    deletion,
    expected_calibration_error,
    fpr_at_tpr,
    insertion,
    misprediction_auroc,
)

SPLITS = [(0, 1), (1, 8), (8, 9), (9, 30)]  # uneven batch sizes 1, 7, 1, 21


def data(seed: int = 0, n: int = 30):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, generator=gen, dtype=torch.float64)
    scores[3] = scores[5]  # a tie
    correct = torch.rand(n, generator=gen) < 0.6
    correct[:2] = torch.tensor([True, False])
    predictions = torch.randint(0, 4, (n,), generator=gen)
    labels = torch.randint(0, 4, (n,), generator=gen)
    probabilities = torch.randn(n, 4, generator=gen, dtype=torch.float64).softmax(dim=1)
    out = torch.randn(n, generator=gen, dtype=torch.float64) - 0.5
    return scores, correct, predictions, labels, probabilities, out


def pairs():
    scores, correct, predictions, labels, probabilities, out = data()
    return [
        (AUAC(), (scores, correct), lambda: auac(scores, correct)),
        (MispredictionAUROC(), (scores, correct), lambda: misprediction_auroc(scores, correct)),
        (AUFC(), (scores, predictions, labels), lambda: aufc(scores, predictions, labels)),
        (AUROC(), (scores, out), lambda: auroc(scores, out)),
        (AUPR(positive="out"), (scores, out), lambda: aupr(scores, out, positive="out")),
        (FPRAtTPR(tpr=0.9), (scores, out), lambda: fpr_at_tpr(scores, out, tpr=0.9)),
        (
            ExpectedCalibrationError(n_bins=10),
            (probabilities, labels),
            lambda: expected_calibration_error(probabilities, labels, n_bins=10),
        ),
    ]


@pytest.mark.parametrize("index", range(7))
def test_compute_equals_function_on_uneven_batches_and_after_reset(index):
    metric, arrays, function = pairs()[index]
    expected = function()
    for start, stop in SPLITS:
        metric.update(*(a[start:stop] for a in arrays))
    assert metric.compute() == pytest.approx(expected, abs=1e-12)
    assert metric.n_seen == (60 if isinstance(metric, (AUROC, AUPR, FPRAtTPR)) else 30)
    # compute does not consume the state
    assert metric.compute() == pytest.approx(expected, abs=1e-12)
    metric.reset()
    assert metric.n_seen == 0
    half = [a[:15] for a in arrays]
    metric.update(*half)
    fresh = type(metric)(**{k: v for k, v in vars(metric).items() if not k.startswith("_")})
    fresh.update(*half)
    assert metric.compute() == pytest.approx(fresh.compute(), abs=1e-12)


def test_ood_updates_may_hold_only_one_side():
    scores, _, _, _, _, out = data()
    metric = AUROC()
    metric.update(in_scores=scores[:10])
    metric.update(out_scores=out[:4])
    metric.update(scores[10:], out[4:])
    assert metric.compute() == pytest.approx(auroc(scores, out), abs=1e-12)


def test_lengths_and_classes_are_checked():
    with pytest.raises(ValueError, match="`correct` has 2"):
        AUAC().update(torch.rand(3), torch.tensor([True, False]))
    ece = ExpectedCalibrationError()
    ece.update(torch.full((2, 3), 1 / 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same number of classes"):
        ece.update(torch.full((2, 4), 0.25), torch.tensor([0, 1]))


@pytest.mark.parametrize("batch_sizes", [(1,), (4,), (5,), (1, 4, 5)])
@pytest.mark.parametrize(("cls", "function"), [(DeletionAUC, deletion), (InsertionAUC, insertion)])
def test_perturbation_auc_equals_function(cls, function, batch_sizes):
    model = make_tiny_cnn()
    n = sum(batch_sizes)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, 6, 6, generator=gen, dtype=torch.float64)
    attr = torch.randn(n, 1, 3, 3, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (n,), generator=gen)
    expected = function(model, x, attr, target=target, n_steps=5, baselines="mean")
    metric = cls(model, n_steps=5, baselines="mean", batch_size=3)
    start = 0
    for size in batch_sizes:
        sl = slice(start, start + size)
        metric.update(x[sl], attr[sl], target=target[sl])
        start += size
    torch.testing.assert_close(metric.per_example(), expected, rtol=1e-12, atol=1e-12)
    assert metric.compute() == pytest.approx(float(expected.mean()), abs=1e-12)
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


def _job(rank: int, world: int, out_dir: str) -> None:
    scores, correct, predictions, labels, probabilities, out = data()
    # uneven shards: rank 0 gets 11 examples, rank 1 gets 19
    shard = slice(0, 11) if rank == 0 else slice(11, 30)
    results = {}
    for name, metric, arrays in [
        ("auac", AUAC(), (scores, correct)),
        ("aufc", AUFC(), (scores, predictions, labels)),
        ("auroc", AUROC(), (scores, out)),
        ("ece", ExpectedCalibrationError(), (probabilities, labels)),
    ]:
        metric.update(*(a[shard] for a in arrays))
        results[name] = metric.compute()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def test_distributed_compute_gathers_every_shard(tmp_path):
    run_gloo(_job, tmp_path)
    scores, correct, predictions, labels, probabilities, out = data()
    expected = {
        "auac": auac(scores, correct),
        "aufc": aufc(scores, predictions, labels),
        "auroc": auroc(scores, out),
        "ece": expected_calibration_error(probabilities, labels),
    }
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, abs=1e-12), (rank, name)


def _job_with_an_empty_rank(rank: int, world: int, out_dir: str) -> None:
    scores, correct, predictions, labels, probabilities, out = data()
    metric = ExpectedCalibrationError()
    if rank == 0:  # rank 1 holds nothing: its empty state was (0,) against rank 0's (N, C)
        metric.update(probabilities, labels)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"ece": metric.compute()}))


def test_a_rank_without_data_joins_the_gather(tmp_path):
    """ExpectedCalibrationError with (N, C) probabilities on one rank and none on the other
    aborted the whole job inside gloo ("Received data size doesn't match expected size")."""
    run_gloo(_job_with_an_empty_rank, tmp_path)
    _, _, _, labels, probabilities, _ = data()
    expected = expected_calibration_error(probabilities, labels)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["ece"] == pytest.approx(expected, abs=1e-12), rank


def _padding_job(rank: int, world: int, out_dir: str) -> None:
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    scores, correct, *_ = data(n=37)
    dataset = TensorDataset(scores, correct)
    results = {}
    for name, sampler in [
        ("distributed_sampler", DistributedSampler(dataset, shuffle=False)),
        ("recipe", list(range(rank, len(dataset), world))),  # the module docstring's
    ]:
        metric = AUAC()
        for s, c in DataLoader(dataset, batch_size=8, sampler=sampler):
            metric.update(s, c)
        results[name] = {"n_seen": metric.n_seen, "auac": metric.compute()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow  # documents the module docstring's padding paragraph and its recipe
def test_distributed_sampler_padding_is_counted_and_the_recipe_avoids_it(tmp_path):
    """37 examples on 2 processes: DistributedSampler gives rank 1 a repeat of example 0,
    which the accumulators count (38 rows); shards without padding give the value on the
    37 examples."""
    run_gloo(_padding_job, tmp_path, timeout_s=60)
    scores, correct, *_ = data(n=37)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    padded = [*range(0, 37, 2), *range(1, 37, 2), 0]  # rank 0's shard, then rank 1's
    assert [r["distributed_sampler"]["n_seen"] for r in ranks] == [19, 19]
    assert [r["recipe"]["n_seen"] for r in ranks] == [19, 18]
    for rank in ranks:
        assert rank["distributed_sampler"]["auac"] == pytest.approx(
            auac(scores[padded], correct[padded]), abs=1e-12
        )
        assert rank["recipe"]["auac"] == pytest.approx(auac(scores, correct), abs=1e-12)
    assert auac(scores[padded], correct[padded]) != pytest.approx(auac(scores, correct))


def test_accumulators_refuse_what_their_functions_refuse():
    """update() cast to integers before any check: a correctness of 0.7 was stored as 0 (and
    MispredictionAUROC returned 1.0), float predictions 1.7 became class 1, integer
    "confidences" were read as probabilities. Now update() raises what the function
    raises."""
    from captum_ext.metrics import AUAC, AUFC, ExpectedCalibrationError, MispredictionAUROC

    scores = torch.tensor([0.9, 0.8, 0.3, 0.1])
    for metric in (MispredictionAUROC(), AUAC()):
        with pytest.raises(ValueError, match="`correct` must hold booleans"):
            metric.update(scores, torch.tensor([1.0, 0.7, 0.0, 0.4]))
        metric.update(scores, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # 0/1 floats are fine
    with pytest.raises(TypeError, match="`predictions` must hold integer class indices"):
        AUFC().update(scores[:3], torch.tensor([1.7, 0.2, 2.0]), torch.tensor([1, 0, 2]))
    ece = ExpectedCalibrationError()
    with pytest.raises(ValueError, match="`labels` must hold booleans"):
        ece.update(torch.tensor([0.9, 0.8, 0.3]), torch.tensor([1.0, 0.0, 0.5]))
    with pytest.raises(TypeError, match="`labels` must hold integer class indices"):
        ece.update(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="must hold floating point values"):
        ece.update(torch.tensor([1, 0, 1]), torch.tensor([1, 0, 0]))


@pytest.mark.parametrize("index", range(7))
def test_a_batch_the_function_refuses_is_refused_by_update_and_not_stored(index):
    """NaN or infinite scores, probabilities above 1 and labels beyond the classes were
    stored by update(); every compute() after the pass over the dataset then raised, and
    only reset() could drop the batch."""
    metric, arguments, function = pairs()[index]
    bad = [a.clone() for a in arguments]
    if isinstance(metric, ExpectedCalibrationError):
        bad_cases = [(bad[0] * 3, bad[1]), (bad[0], bad[1] + 4)]  # above 1; labels >= C
    else:
        nan, inf = bad[0].clone(), bad[0].clone()
        nan[4], inf[2] = float("nan"), float("inf")
        bad_cases = [(nan, *bad[1:]), (inf, *bad[1:])]
    plain = {
        AUAC: auac,
        MispredictionAUROC: misprediction_auroc,
        AUFC: aufc,
        AUROC: auroc,
        AUPR: aupr,
        FPRAtTPR: fpr_at_tpr,
        ExpectedCalibrationError: expected_calibration_error,
    }[type(metric)]
    for case in bad_cases:
        with pytest.raises(ValueError):  # the function refuses it too
            plain(*case)
        with pytest.raises(ValueError):
            metric.update(*case)
        assert metric.n_seen == 0
    metric.update(*arguments)  # the accumulator is still usable
    assert metric.compute() == pytest.approx(function())


@pytest.mark.parametrize("index", range(6))
def test_boolean_scores_are_refused_as_the_functions_refuse_them(index):
    """The curve functions refuse boolean scores; their accumulators stored them as 0 and 1
    and returned a number (AUAC 50.0, AUROC 0.5, ...)."""
    scores = torch.tensor([True, False, True, False])
    correct = torch.tensor([True, False, False, True])
    classes = torch.tensor([1, 0, 2, 1])
    metric, arguments = [
        (AUAC(), (scores, correct)),
        (MispredictionAUROC(), (scores, correct)),
        (AUFC(), (scores, classes, classes)),
        (AUROC(), (scores, scores)),
        (AUPR(), (scores, scores)),
        (FPRAtTPR(), (scores, scores)),
    ][index]
    with pytest.raises(TypeError, match="scores` must be real numbers"):
        metric.update(*arguments)


def test_boolean_class_indices_are_refused_by_aufc_and_its_accumulator():
    scores = torch.tensor([0.9, 0.1])
    flags = torch.tensor([True, False])
    with pytest.raises(TypeError, match="`predictions` must hold integer class indices"):
        aufc(scores, flags, flags)
    with pytest.raises(TypeError, match="`predictions` must hold integer class indices"):
        AUFC().update(scores, flags, flags)


def test_integer_scores_beyond_float64s_integers_are_refused_not_tied():
    """Ranked in float64, 2**53 + 1 and 2**53 tied: auroc 0.625 where scikit-learn, ranking
    the int64 values, gives the exact 0.75."""
    big = 2**53
    inside = torch.tensor([big + 1, big + 3])
    outside = torch.tensor([big, big + 2])
    with pytest.raises(ValueError, match="2\\*\\*53"):
        auroc(inside, outside)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        AUROC().update(inside, outside)
    assert auroc(inside - big, outside - big) == 0.75  # the same ranks, exactly representable
    lowest = torch.tensor([torch.iinfo(torch.int64).min, 0])
    with pytest.raises(ValueError, match="2\\*\\*53"):
        auac(lowest, torch.tensor([True, False]))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_unsigned_integer_scores_are_ranked(dtype):
    """The 2**53 check called abs(), which torch lacks for uint16/32/64: every curve metric
    failed with NotImplementedError on scores that ranked fine before."""
    inside = np.array([5, 9, 7], dtype=dtype)
    outside = np.array([1, 6, 2], dtype=dtype)
    expected = auroc(inside.astype(np.float64), outside.astype(np.float64))
    assert auroc(inside, outside) == expected
    metric = AUROC()
    metric.update(inside, outside)
    assert metric.compute() == expected


@pytest.mark.parametrize("tpr", [np.float32(0.95), np.float32(1.0), np.int64(1), 0.95])
def test_tpr_takes_numpy_scalars(tpr):
    """np.float32(0.95) was refused as "not a number in (0, 1]"."""
    inside = torch.tensor([0.9, 0.8, 0.7, 0.4])
    outside = torch.tensor([0.5, 0.3, 0.2])
    assert fpr_at_tpr(inside, outside, tpr=tpr) == fpr_at_tpr(inside, outside, tpr=float(tpr))
    assert FPRAtTPR(tpr=tpr).tpr == tpr


def test_empty_batches_are_skipped_by_every_accumulator():
    """AUFC and ECE refused an empty list as "float" class indices, and an empty batch
    before (N, C) probabilities made every later batch "another number of classes"."""
    scores, correct, predictions, labels, probabilities, _ = data()
    aufc_metric = AUFC()
    aufc_metric.update([], [], [])
    aufc_metric.update(scores, predictions, labels)
    assert aufc_metric.compute() == aufc(scores, predictions, labels)
    ece = ExpectedCalibrationError()
    ece.update(torch.zeros(0), [])
    ece.update(probabilities, labels)
    assert ece.compute() == expected_calibration_error(probabilities, labels)


def test_float_zero_one_correctness_is_read_by_the_calibration_error():
    """Documented "booleans (or 0/1)", float 0/1 was refused by the calibration error (the
    curve metrics took it)."""
    confidences = torch.tensor([0.9, 0.6, 0.8, 0.3])
    correct = torch.tensor([True, False, True, True])
    expected = expected_calibration_error(confidences, correct)
    assert expected_calibration_error(confidences, correct.double()) == expected
    ece = ExpectedCalibrationError()
    ece.update(confidences, correct.float())
    assert ece.compute() == expected
    with pytest.raises(ValueError, match="booleans or 0/1"):
        expected_calibration_error(confidences, torch.tensor([1.0, 0.5, 0.0, 1.0]))


@pytest.mark.parametrize("index", range(7))
def test_a_refilled_buffer_does_not_change_what_was_accumulated(index):
    """update() kept the caller's float64 tensor itself: an audit loop refilling one buffer
    changed every earlier batch (AUAC 43.55 instead of 71.97)."""
    metric, arrays, function = pairs()[index]
    buffers = [torch.empty_like(a[:15]) for a in arrays]
    for first in (0, 15):
        for buffer, array in zip(buffers, arrays, strict=True):
            buffer.copy_(array[first : first + 15])
        metric.update(*buffers)
    for buffer in buffers:
        buffer.zero_()
    assert metric.compute() == pytest.approx(function(), abs=1e-12)


def test_boolean_class_labels_with_probabilities_are_refused_at_update():
    """The accumulator read booleans as classes 0 / 1 with (N, C) probabilities (and its
    compute() gave a number) where ``expected_calibration_error`` refuses them."""
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    flags = torch.tensor([True, False, True])
    said = "`labels` must hold integer class indices, got torch.bool."
    with pytest.raises(TypeError, match=said):
        expected_calibration_error(probabilities, flags)
    metric = ExpectedCalibrationError()
    with pytest.raises(TypeError, match=said):
        metric.update(probabilities, flags)
    with pytest.raises(TypeError, match="`labels` must hold integer class indices"):
        metric.update(probabilities.numpy(), flags.numpy())
    assert metric._values["values"] == []  # nothing stored
    # integer labels are taken, and (N,) confidences with boolean correctness, as documented
    metric.update(probabilities, torch.tensor([0, 1, 0]))
    assert metric.compute() == expected_calibration_error(probabilities, torch.tensor([0, 1, 0]))
    confidences = ExpectedCalibrationError()
    confidences.update(probabilities.max(1).values, flags)
    assert confidences.compute() == expected_calibration_error(probabilities.max(1).values, flags)
