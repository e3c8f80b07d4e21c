"""torch.distributed: a failure or a misuse on one process reaches every process.

Each test runs 2 gloo processes (``tests/_distributed.py``) with a short process-group
timeout, so that a regression fails (gloo's timeout) instead of hanging for 30 minutes. The
jobs catch what each rank raises and write it down; the parent checks every rank's outcome.
Where the jobs call the same method again after a refused call, the second call checks that
the ranks' collectives still pair up (before, a rank that raised alone paired its next
collective with the other rank's pending one).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
import torch
from _distributed import run_gloo
from _helpers import make_tiny_cnn
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from captum_ext.metrics import score_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT_S = 30  # a collective that waits longer is a hang: the job fails


def _outcome(call) -> dict:
    """What ``call()`` did on this rank, as JSON: the error's type and message, or its value."""
    try:
        value = call()
    except Exception as error:  # every rank goes on, as a user looping over jobs would
        return {"error": type(error).__name__, "message": str(error)}
    return {"value": value}


def _write(out_dir: str, rank: int, results: dict) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _read(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


# ---------------------------------------------------------------------------- score_dataset


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(self.body(x))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Net().double().eval()


def _examples(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (n,), generator=g
    )


def _rows(dataset) -> dict:
    table = score_dataset(_net(), DataLoader(dataset, batch_size=5), ["softmax"], progress=False)
    return {"index": table["index"].tolist(), "softmax": table["softmax"].tolist()}


def _score_error_job(rank: int, world: int, out_dir: str) -> None:
    x, y = _examples()
    bad = y.clone()
    bad[7] = 99  # in batch 1 (examples 5..9), which rank 1 scores
    _write(
        out_dir,
        rank,
        {
            "A": _outcome(lambda: _rows(TensorDataset(x, bad))),
            "B": _outcome(lambda: _rows(TensorDataset(x[:20], y[:20]))),
        },
    )


def test_score_dataset_error_on_one_rank_raises_on_every_rank(tmp_path):
    """D1: rank 1 raised alone; rank 0's gather then paired with rank 1's gather of the next
    call and returned dataset B's shard merged into A's table, then the job hung."""
    run_gloo(_score_error_job, tmp_path, timeout_s=TIMEOUT_S)
    ranks = _read(tmp_path)
    assert ranks[1]["A"]["error"] == "ValueError"  # its own error
    assert "labels must be class indices" in ranks[1]["A"]["message"]
    assert ranks[0]["A"]["error"] == "ValueError"  # the other rank names it
    assert "score_dataset failed on rank 1 (ValueError: labels must be" in ranks[0]["A"]["message"]
    x, y = _examples()
    expected = _rows(TensorDataset(x[:20], y[:20]))
    for rank in ranks:  # the next call is not disturbed
        assert rank["B"] == {"value": expected}


def _score_datasets_job(rank: int, world: int, out_dir: str) -> None:
    x, y = _examples()
    full = TensorDataset(x, y)
    _write(
        out_dir,
        rank,
        {
            # each rank its own half, the usual DDP habit (20 examples each)
            "own": _outcome(lambda: _rows(Subset(full, list(range(rank, 40, 2))))),
            "uneven": _outcome(
                lambda: _rows(Subset(full, range(23) if rank == 0 else range(23, 40)))
            ),
            # the same Subset on both ranks is the same dataset
            "same_subset": _outcome(lambda: _rows(Subset(full, list(range(30))))),
            "full": _outcome(lambda: _rows(full)),
        },
    )


def test_score_dataset_refuses_ranks_given_different_datasets(tmp_path):
    """D2: each rank's own Subset (or 23 vs 17 examples) was scored without a word: half
    the data never scored, the table's index mixing both datasets."""
    run_gloo(_score_datasets_job, tmp_path, timeout_s=TIMEOUT_S)
    x, y = _examples()
    for rank in _read(tmp_path):
        assert rank["own"]["error"] == "ValueError", rank["own"]
        assert (
            "`dataloader` holds 20 examples on each of the 2 processes, but not the same"
            in (rank["own"]["message"])
        )
        assert rank["uneven"]["error"] == "ValueError", rank["uneven"]
        assert (
            "`dataloader` holds [23, 17] examples on the 2 processes" in rank["uneven"]["message"]
        )
        assert rank["same_subset"] == {"value": _rows(Subset(TensorDataset(x, y), range(30)))}
        assert rank["full"] == {"value": _rows(TensorDataset(x, y))}


# ---------------------------------------------------------------------------- mask net

TINY_LAYERS = ["features.1", "features.3", "head"]


def _mask_fit(dataset) -> int:
    from captum_ext.attr import ActivationMatchingMask

    explainer = ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS)
    explainer.fit(DataLoader(dataset, batch_size=3), epochs=1, lr=1e-2, seed=4, progress=False)
    return len(explainer.history)


def _images(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64))


def _mask_job(rank: int, world: int, out_dir: str) -> None:
    full = _images(12)
    nan = _images(12)
    nan.tensors[0][1, 0, 0, 0] = float("nan")  # in one rank's shard only
    _write(
        out_dir,
        rank,
        {
            "uneven": _outcome(lambda: _mask_fit(_images(12 if rank == 0 else 6, seed=rank))),
            "own": _outcome(lambda: _mask_fit(Subset(full, list(range(rank, 12, 2))))),
            "nan": _outcome(lambda: _mask_fit(nan)),
            "full": _outcome(lambda: _mask_fit(full)),
        },
    )


def test_mask_net_fit_refuses_ranks_given_different_data(tmp_path):
    """D3: 12 examples on rank 0 and 6 on rank 1 took 2 and 1 steps; rank 0 waited in DDP's
    all-reduce until the process group timed out. A NaN image in one rank's shard failed
    the batch's check there only, and the other rank waited in the same way."""
    run_gloo(_mask_job, tmp_path, timeout_s=TIMEOUT_S)
    ranks = _read(tmp_path)
    for rank in ranks:
        assert rank["uneven"]["error"] == "ValueError", rank["uneven"]
        assert "`data` holds [12, 6] examples on the 2 processes" in rank["uneven"]["message"]
        assert rank["own"]["error"] == "ValueError", rank["own"]
        assert "but not the same ones" in rank["own"]["message"]
        assert rank["nan"]["error"] == "ValueError", rank["nan"]
        assert rank["full"] == {"value": 2}  # 12 examples / 2 ranks / batch 3
    own = "`inputs` contains NaN or infinite values."
    failed = [r for r, rank in enumerate(ranks) if rank["nan"]["message"] == own]
    assert len(failed) == 1, ranks  # the rank whose shard holds the NaN image: its own error
    other = ranks[1 - failed[0]]["nan"]["message"]
    assert f"ActivationMatchingMask.fit failed on rank {failed[0]} (ValueError: {own})" in other


# ---------------------------------------------------------------------------- TIE

TIE_SMALL = {
    "input_shape": (3, 8, 8),
    "generator_steps": 2,
    "generator_batch_size": 6,
    "latent_dim": 8,
    "generator_width": 8,
    "batch_size": 16,
}


def _tie_fit(n: int, seed: int) -> int:
    from captum_ext.inversion.tie import TIE

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 5
    tie = TIE(make_tiny_cnn(dtype=torch.float32, num_classes=5), **TIE_SMALL, seed=5)
    return len(tie.fit(x, y, epochs=1, progress=False)["epoch"])


class _NaNLoss:
    """torch.nn.functional with a cross-entropy that is NaN: a batch that diverged."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def cross_entropy(*args, **kwargs):
        return torch.nn.functional.cross_entropy(*args, **kwargs) * float("nan")


def _diverged_on_rank_1(rank: int) -> int:
    import captum_ext.inversion.tie as tie_module

    if rank == 1:
        tie_module.F = _NaNLoss()
    try:
        return _tie_fit(20, seed=0)
    finally:
        tie_module.F = torch.nn.functional


def _tie_job(rank: int, world: int, out_dir: str) -> None:
    _write(
        out_dir,
        rank,
        {
            "uneven": _outcome(lambda: _tie_fit(64 if rank == 0 else 40, seed=rank)),
            "other_images": _outcome(lambda: _tie_fit(40, seed=rank)),
            "diverged": _outcome(lambda: _diverged_on_rank_1(rank)),
            "full": _outcome(lambda: _tie_fit(20, seed=0)),
        },
    )


def test_tie_fit_refuses_ranks_given_different_data(tmp_path):
    """D4: 64 images on rank 0 and 40 on rank 1 aborted the job inside gloo (SIGABRT). A
    loss that became NaN on one rank's batch raised FloatingPointError there only, and the
    other rank waited in the backward pass's all-reduce."""
    run_gloo(_tie_job, tmp_path, timeout_s=TIMEOUT_S)
    ranks = _read(tmp_path)
    for rank in ranks:
        assert rank["uneven"]["error"] == "ValueError", rank["uneven"]
        assert "`inputs` holds [64, 40] examples on the 2 processes" in rank["uneven"]["message"]
        assert rank["other_images"]["error"] == "ValueError", rank["other_images"]
        assert "but not the same ones" in rank["other_images"]["message"]
        assert "value" in rank["full"], rank["full"]  # fitted: the ranks still pair up
    said = "TIE.fit: the classifier's training loss became nan in epoch 1"
    assert ranks[1]["diverged"]["error"] == "FloatingPointError"
    assert ranks[1]["diverged"]["message"].startswith(said)
    assert ranks[0]["diverged"]["error"] == "ValueError"
    assert (
        f"TIE.fit failed on rank 1 (FloatingPointError: {said}" in (ranks[0]["diverged"]["message"])
    )


# ---------------------------------------------------------------------------- NetworkInversion


def _inversion():
    from captum_ext.inversion import ConditionedGenerator, NetworkInversion

    model = make_tiny_cnn(dtype=torch.float32, num_classes=5)
    torch.manual_seed(0)  # the same generator on every rank
    generator = ConditionedGenerator(
        5, (3, 8, 8), latent_dim=8, conditioning="vector_matrix", width=8, preprocess=(0.5, 0.25)
    )
    return NetworkInversion(model, generator, batch_size=4, seed=7)


def _inversion_buffers_job(rank: int, world: int, out_dir: str) -> None:
    inversion = _inversion()
    inversion.fit(3, progress=False)
    images, labels = inversion.sample_classes(2, generator=123)
    state = {k: v.clone() for k, v in inversion.generator.state_dict().items()}
    torch.save(
        {"state": state, "images": images, "one": inversion.sample(torch.tensor([3]))},
        Path(out_dir, f"rank{rank}.pt"),
    )


def test_network_inversion_generators_are_the_same_on_every_rank_after_fit(tmp_path):
    """DDP broadcasts rank 0's buffers at the start of each forward pass only: after fit each
    rank held the BatchNorm statistics its own last batch updated, and sample_classes with
    the same seed gave other images on each rank (max |diff| 1.9e-3)."""
    run_gloo(_inversion_buffers_job, tmp_path, timeout_s=TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert any("running_mean" in key for key in ranks[0]["state"])
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert torch.equal(ranks[0]["images"], ranks[1]["images"])
    assert torch.equal(ranks[0]["one"], ranks[1]["one"])


def _inversion_fit(**kwargs) -> int:
    return len(_inversion().fit(3, progress=False, **kwargs)["loss"])


def _diverged_at_step_2_on_rank_1(rank: int) -> int:
    import captum_ext.inversion.network_inversion as module

    original, calls = module.cross_entropy_to_labels, []

    def nan_from_step_2(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 2 else loss

    if rank == 1:
        module.cross_entropy_to_labels = nan_from_step_2
    try:
        return _inversion_fit()
    finally:
        module.cross_entropy_to_labels = original


def _inversion_failures_job(rank: int, world: int, out_dir: str) -> None:
    import captum_ext.inversion.network_inversion as module

    results = {"diverged": _outcome(lambda: _diverged_at_step_2_on_rank_1(rank))}
    original = module.save_checkpoint
    if rank == 0:  # rank 0's disk is full
        module.save_checkpoint = _failing
    try:
        results["checkpoint"] = _outcome(
            lambda: _inversion_fit(checkpoint=Path(out_dir, "inversion.pt"))
        )
    finally:
        module.save_checkpoint = original
    results["after"] = _outcome(_inversion_fit)  # the ranks' collectives still pair up
    _write(out_dir, rank, results)


def test_network_inversion_failures_on_one_rank_raise_on_every_rank(tmp_path):
    """A loss that became NaN on rank 1's batch raised FloatingPointError there only, and
    rank 0 waited in the backward pass's all-reduce; a checkpoint that rank 0 could not write
    raised there only, and the other rank waited at the barrier."""
    run_gloo(_inversion_failures_job, tmp_path, timeout_s=TIMEOUT_S)
    ranks = _read(tmp_path)
    said = "NetworkInversion.fit: the loss became nan at step 2"
    assert ranks[1]["diverged"]["error"] == "FloatingPointError", ranks[1]["diverged"]
    assert ranks[1]["diverged"]["message"].startswith(said)
    assert ranks[0]["diverged"]["error"] == "ValueError", ranks[0]["diverged"]
    assert (
        f"NetworkInversion.fit failed on rank 1 (FloatingPointError: {said}"
        in ranks[0]["diverged"]["message"]
    )
    assert ranks[0]["checkpoint"]["error"] == "OSError", ranks[0]["checkpoint"]
    assert ranks[1]["checkpoint"]["error"] == "ValueError", ranks[1]["checkpoint"]
    assert (
        "NetworkInversion.fit writing the checkpoint failed on rank 0 (OSError: [Errno 28] No "
        "space left on device" in ranks[1]["checkpoint"]["message"]
    )
    for rank in ranks:
        assert rank["after"] == {"value": 3}


# ---------------------------------------------------------------------------- introspection


def _toy_problem(n: int = 60):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    points = torch.randn(n, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        labels = model(points).argmax(1)
    return model, points, labels


def _head_fit(points, labels, model, **kwargs) -> str:
    from captum_ext.introspection import IntrospectiveNetwork

    IntrospectiveNetwork(model, hidden_width=8).fit(
        points, labels, epochs=1, batch_size=25, progress=False, **kwargs
    )
    return "trained"


def _introspection_job(rank: int, world: int, out_dir: str) -> None:
    model, points, labels = _toy_problem()
    wrong = labels.clone()
    if rank == 1:
        wrong[5] = 7  # a label outside the 3 classes in rank 1's data only
    few = 1 if rank == 0 else 40
    _write(
        out_dir,
        rank,
        {
            "few": _outcome(lambda: _head_fit(points[:few], labels[:few], model)),
            "label": _outcome(lambda: _head_fit(points, wrong, model)),
            "own": _outcome(lambda: _head_fit(points[rank::2], labels[rank::2], model)),
            "full": _outcome(lambda: _head_fit(points, labels, model)),
        },
    )


def test_introspection_fit_failures_on_one_rank_reach_every_rank(tmp_path):
    """Rank 0 raised "1 examples for 2 processes" before the collective count check, and a
    label outside the classes in rank 1's data only raised there: the other rank waited in
    the count check until the process group timed out."""
    run_gloo(_introspection_job, tmp_path, timeout_s=TIMEOUT_S)
    ranks = _read(tmp_path)
    for rank in ranks:
        assert rank["few"]["error"] == "ValueError", rank["few"]
        assert "holds [1, 40] examples on the 2 processes" in rank["few"]["message"]
        assert rank["own"]["error"] == "ValueError", rank["own"]
        assert (
            "`inputs_or_loader` holds 30 examples on each of the 2 processes, but not"
            in (rank["own"]["message"])
        )
        assert rank["full"] == {"value": "trained"}
    assert ranks[1]["label"]["error"] == "ValueError"
    assert ranks[1]["label"]["message"].startswith("`labels` must be class indices in [0, 2]")
    assert ranks[0]["label"]["error"] == "ValueError"
    assert (
        "IntrospectiveNetwork.fit failed on rank 1 (ValueError: `labels` must be"
        in (ranks[0]["label"]["message"])
    )


# ---------------------------------------------------------------------------- save


@contextlib.contextmanager
def _slow_atomic_path(path):
    from captum_ext._utils.training import atomic_path

    time.sleep(1.0)  # rank 0 is late writing: the other rank must wait for the file
    with atomic_path(path) as temp:
        yield temp


def _slow(function):
    def slowed(*args, **kwargs):
        time.sleep(1.0)
        return function(*args, **kwargs)

    return slowed


def _save_job(rank: int, world: int, out_dir: str) -> None:
    import captum_ext.attr.activation_matching as am_module
    import captum_ext.introspection.network as network_module
    from captum_ext.attr import ActivationMatchingMask
    from captum_ext.introspection import IntrospectiveNetwork

    if rank == 0:
        am_module.atomic_path = _slow_atomic_path
        network_module.save_checkpoint = _slow(network_module.save_checkpoint)
    results = {}
    path = Path(out_dir, "mask.pt")
    for i in range(2):  # the second save overwrites the first: no stale file either
        explainer = ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS)
        explainer.fit(_images(6, seed=i), batch_size=3, lr=1e-2, seed=i, progress=False)
        written = explainer.mask_net.state_dict()

        def save_and_load(explainer=explainer, written=written):
            explainer.save(path)
            loaded = ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS).load(path)
            state = loaded.mask_net.state_dict()
            return all(torch.equal(state[k], written[k]) for k in written)

        results[f"mask{i}"] = _outcome(save_and_load)
    model, points, labels = _toy_problem()
    head = Path(out_dir, "head.pt")
    for i in range(2):
        network = IntrospectiveNetwork(model, hidden_width=8).fit(
            points, labels, epochs=1, batch_size=25, progress=False, seed=i
        )
        written = network.head.state_dict()

        def save_and_load(network=network, written=written):
            network.save(head)
            state = IntrospectiveNetwork.load(head, model).head.state_dict()
            return all(torch.equal(state[k], written[k]) for k in written)

        results[f"head{i}"] = _outcome(save_and_load)
    _write(out_dir, rank, results)


def test_save_returns_on_every_rank_once_the_file_is_written(tmp_path):
    """D6: ranks other than 0 returned from save() before rank 0 had written: load() right
    after it found no file, or the file of an earlier save."""
    run_gloo(_save_job, tmp_path, timeout_s=TIMEOUT_S)
    for rank in _read(tmp_path):
        for name in ("mask0", "mask1", "head0", "head1"):
            assert rank[name] == {"value": True}, (name, rank[name])


def _failing(*args, **kwargs):
    raise OSError(28, "No space left on device", "the file")


@contextlib.contextmanager
def _full_disk(path):
    _failing()
    yield path


def _failed_write_job(rank: int, world: int, out_dir: str) -> None:
    import captum_ext.attr.activation_matching as am_module
    import captum_ext.introspection.network as network_module
    from captum_ext.attr import ActivationMatchingMask

    explainer = ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS)
    explainer.fit(_images(6), batch_size=3, lr=1e-2, progress=False)
    model, points, labels = _toy_problem()
    if rank == 0:  # rank 0's disk is full
        am_module.atomic_path = _full_disk
        network_module.save_checkpoint = _failing
    results = {
        "mask": _outcome(lambda: str(explainer.save(Path(out_dir, "mask.pt")))),
        "checkpoint": _outcome(lambda: _head_fit(points, labels, model, checkpoint_dir=out_dir)),
        # the ranks' collectives still pair up
        "after": _outcome(lambda: _head_fit(points, labels, model)),
    }
    _write(out_dir, rank, results)


def test_a_failed_write_on_rank_0_raises_on_every_rank(tmp_path):
    """save() and a trainer's checkpoint: rank 0's failed write raised there only; the other
    ranks returned (save) or waited at the barrier, pairing it with rank 0's next collective."""
    run_gloo(_failed_write_job, tmp_path, timeout_s=TIMEOUT_S)
    ranks = _read(tmp_path)
    for name, what in [("mask", "ActivationMatchingMask.save"), ("checkpoint", "writing the")]:
        assert ranks[0][name]["error"] == "OSError", ranks[0][name]
        assert ranks[1][name]["error"] == "ValueError", ranks[1][name]
        assert f"{what}" in ranks[1][name]["message"]
        assert (
            "failed on rank 0 (OSError: [Errno 28] No space left on device"
            in (ranks[1][name]["message"])
        )
    for rank in ranks:
        assert rank["after"] == {"value": "trained"}


# ---------------------------------------------------------------------------- the helpers


def _helpers_job(rank: int, world: int, out_dir: str) -> None:
    from captum_ext._utils.distributed import (
        agreed_batches,
        all_gather_or_raise,
        broadcast_buffers,
        raise_if_any_rank_failed,
        written_on_main_process,
    )

    def fail_on_rank_1():
        error = KeyError("only here") if rank == 1 else None
        return all_gather_or_raise(rank * 10, error, what="the step")

    def step_fails_on_rank_0():
        raise_if_any_rank_failed(None, what="the step")  # nobody failed: both go on
        raise_if_any_rank_failed(OSError("disk") if rank == 0 else None, what="the step")

    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(rank + 1))
    broadcast_buffers(bn)
    path = Path(out_dir, "written.txt")
    _write(
        out_dir,
        rank,
        {
            "gathered": _outcome(lambda: all_gather_or_raise(rank * 10, what="the step")),
            "failed": _outcome(fail_on_rank_1),
            "step": _outcome(step_fails_on_rank_0),
            # one rank holds a batch more: refused on both before the extra step
            "uneven": _outcome(
                lambda: list(agreed_batches(range(3 + rank), lambda b: b, what="the loop"))
            ),
            "even": _outcome(lambda: list(agreed_batches(range(3), lambda b: b, what="the loop"))),
            "buffers": bn.running_mean.tolist(),
            "written": _outcome(
                lambda: [
                    written_on_main_process(lambda: path.write_text("x"), what="w"),
                    path.read_text(),
                ]
            ),
        },
    )


def test_the_distributed_helpers_under_two_gloo_processes(tmp_path):
    run_gloo(_helpers_job, tmp_path, timeout_s=TIMEOUT_S)
    ranks = _read(tmp_path)
    for rank in ranks:
        assert rank["gathered"] == {"value": [0, 10]}
        assert rank["uneven"]["error"] == "ValueError"
        assert "the loop: 1 of the 2 processes ran out of batches" in rank["uneven"]["message"]
        assert rank["even"] == {"value": [0, 1, 2]}
        assert rank["buffers"] == [1.0, 1.0, 1.0]  # rank 0's
    assert ranks[1]["failed"] == {"error": "KeyError", "message": "'only here'"}
    assert ranks[0]["failed"]["error"] == "ValueError"
    assert "the step failed on rank 1 (KeyError: 'only here')" in ranks[0]["failed"]["message"]
    assert ranks[0]["step"] == {"error": "OSError", "message": "disk"}
    assert "the step failed on rank 0 (OSError: disk)" in ranks[1]["step"]["message"]
    assert ranks[0]["written"] == {"value": [1, "x"]}  # rank 0: write_text's result
    assert ranks[1]["written"] == {"value": [None, "x"]}  # the file is there on return
