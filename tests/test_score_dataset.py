"""Dataset-scale scoring: one process against direct calls, CSV, and 2 gloo processes."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from _distributed import run_gloo
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from captum_ext.metrics import (
    ScoreTable,
    energy,
    gradnorm,
    gradtrust,
    log_likelihood,
    margin,
    mc_dropout,
    negative_entropy,
    odin,
    purview,
    score_dataset,
    softmax_confidence,
)
from captum_ext.metrics.dataset import TRUST_SCORES  # noqa: I001

N_EXAMPLES, BATCH = 37, 6  # 7 batches: neither divides evenly among 2 or 3 processes
DETERMINISTIC = [name for name in TRUST_SCORES if name != "mc_dropout"]
MC = {"mc_dropout": {"n_passes": 3, "generator": 5}}


class TinyNet(nn.Module):
    def __init__(self, features: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, 12), nn.Tanh(), nn.Dropout(0.3))
        self.mid = nn.Sequential(nn.Linear(12, 8), nn.ReLU())
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.mid(self.body(x)))


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().double().eval()


def make_data(n: int = N_EXAMPLES, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (n,), generator=g
    )


def loader(x, y=None, **kwargs) -> DataLoader:
    dataset = TensorDataset(x, y) if y is not None else TensorDataset(x)
    return DataLoader(dataset, batch_size=kwargs.pop("batch_size", BATCH), **kwargs)


def direct(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functions = {
        "gradtrust": lambda: gradtrust(model, x, log=True),  # the column holds the log
        "gradtrust_reference": lambda: gradtrust(model, x, form="reference"),
        "softmax": lambda: softmax_confidence(model, x),
        "entropy": lambda: negative_entropy(model, x),
        "margin": lambda: margin(model, x),
        "log_likelihood": lambda: log_likelihood(model, x),
        "odin": lambda: odin(model, x),
        "energy": lambda: energy(model, x),
        "gradnorm": lambda: gradnorm(model, x),
        "purview": lambda: purview(model, x),
    }
    return functions[name]()


def test_table_equals_direct_calls_on_the_concatenated_data():
    model = make_model()
    x, y = make_data()
    table = score_dataset(model, loader(x, y), DETERMINISTIC, progress=False)
    assert isinstance(table, ScoreTable) and len(table) == N_EXAMPLES
    assert table.columns == ("index", "label", "prediction", "correct", *DETERMINISTIC)
    assert table.score_names == tuple(DETERMINISTIC)
    assert torch.equal(table["index"], torch.arange(N_EXAMPLES))
    assert torch.equal(table["label"], y)
    prediction = model(x).argmax(1)
    assert torch.equal(table["prediction"], prediction)
    assert torch.equal(table["correct"], prediction == y)
    for name in DETERMINISTIC:
        expected = direct(name, model, x)
        assert table[name].dtype == torch.float64, name
        torch.testing.assert_close(table[name], expected, rtol=1e-10, atol=1e-12, msg=name)


def test_mc_dropout_seeds_each_batch():
    model = make_model()
    x, y = make_data()
    table = score_dataset(model, loader(x, y), ["mc_dropout"], progress=False, score_kwargs=MC)
    expected = torch.cat(
        [
            mc_dropout(model, x[start : start + BATCH], n_passes=3, generator=5 * 2**20 + b)
            for b, start in enumerate(range(0, N_EXAMPLES, BATCH))
        ]
    )
    assert torch.equal(table["mc_dropout"], expected)


def test_dataset_order_with_a_shuffling_loader_and_no_labels():
    model = make_model()
    x, y = make_data()
    reference = score_dataset(model, loader(x, y), ["softmax", "margin"], progress=False)
    shuffled = loader(x, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))
    table = score_dataset(model, shuffled, ["softmax", "margin"], progress=False)
    assert torch.equal(table["index"], torch.arange(N_EXAMPLES))
    assert torch.equal(table["label"], torch.full((N_EXAMPLES,), -1))
    assert not table["correct"].any()
    for name in ("prediction", "softmax", "margin"):
        assert torch.equal(table[name], reference[name]), name
    # plain tensors (no tuple) from the loader
    plain = DataLoader(x, batch_size=BATCH)
    assert torch.equal(
        score_dataset(model, plain, "softmax", progress=False)["softmax"], reference["softmax"]
    )


def test_a_loader_with_its_own_generator_leaves_the_global_one_alone():
    """The loader rebuilt for a shuffling (or sharded) loader dropped the user's generator,
    so iterating it drew a base seed from the global generator."""
    model = make_model()
    x, y = make_data()
    shuffled = loader(x, y, shuffle=True, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    expected = torch.rand(2)
    torch.manual_seed(11)
    score_dataset(model, shuffled, ["softmax"], progress=False)
    assert torch.equal(torch.rand(2), expected)


class DigitsByIndex(Dataset):
    """Example i is a function of i only, so the order can be checked from the values."""

    def __len__(self) -> int:
        return 23

    def __getitem__(self, i: int):
        return torch.full((6,), float(i), dtype=torch.float64) / 10, i % 4


def test_order_is_dataset_order():
    model = make_model()
    table = score_dataset(
        model, DataLoader(DigitsByIndex(), batch_size=4), ["softmax"], progress=False
    )
    x = torch.stack([DigitsByIndex()[i][0] for i in range(23)])
    torch.testing.assert_close(table["softmax"], softmax_confidence(model, x), rtol=1e-12, atol=0)
    assert table["label"].tolist() == [i % 4 for i in range(23)]


def test_model_is_left_unchanged():
    model = make_model().train()
    model.fc.weight.requires_grad_(False)
    model.body[0].weight.grad = torch.ones_like(model.body[0].weight)
    before = copy.deepcopy(model.state_dict())
    x, y = make_data()
    table = score_dataset(
        model,
        loader(x, y),
        ["gradtrust", "mc_dropout", "odin"],
        progress=False,
        score_kwargs={"mc_dropout": {"n_passes": 3, "generator": 0}},
    )
    assert len(table) == N_EXAMPLES
    assert all(m.training for m in model.modules())
    assert not model.fc.weight.requires_grad and model.fc.bias.requires_grad
    assert torch.equal(model.body[0].weight.grad, torch.ones_like(model.body[0].weight))
    assert model.fc.weight.grad is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_csv_round_trip(tmp_path):
    model = make_model()
    x, y = make_data()
    table = score_dataset(model, loader(x, y), ["gradtrust", "softmax"], progress=False)
    path = table.to_csv(
        tmp_path / "sub" / "scores.csv", extra={"name": [f"x{i}" for i in range(N_EXAMPLES)]}
    )
    assert path == tmp_path / "sub" / "scores.csv"
    assert [p.name for p in path.parent.iterdir()] == ["scores.csv"]  # no temporary left
    lines = path.read_text().splitlines()
    assert lines[0] == "index,name,label,prediction,correct,gradtrust,softmax"
    assert len(lines) == N_EXAMPLES + 1
    back = ScoreTable.from_csv(path)
    assert back.columns == table.columns
    for name in table.columns:
        assert torch.equal(back[name], table[name].to(back[name].dtype)), name


def test_unknown_score_name():
    x, y = make_data()
    with pytest.raises(ValueError, match=r"unknown score 'softmx'; known scores: gradtrust, "):
        score_dataset(make_model(), loader(x, y), ["gradtrust", "softmx"], progress=False)
    with pytest.raises(ValueError, match="not among the requested"):
        score_dataset(
            make_model(), loader(x, y), ["softmax"], score_kwargs={"odin": {}}, progress=False
        )


def test_bad_batches_and_devices():
    model = make_model()
    x, y = make_data()
    triples = DataLoader(TensorDataset(x, y, y), batch_size=BATCH)
    with pytest.raises(ValueError, match=r"\(inputs, labels\)"):
        score_dataset(model, triples, ["softmax"], progress=False)
    with pytest.raises(ValueError, match="empty"):
        score_dataset(model, loader(x[:0], y[:0]), ["softmax"], progress=False)
    with pytest.raises(ValueError, match="the model is on 'cpu'"):
        score_dataset(model, loader(x, y), ["softmax"], device="meta", progress=False)


@pytest.mark.parametrize("offset", [-3, -2, 0, 53])
def test_labels_outside_the_models_classes_are_refused(offset):
    """Labels of another label space (1-based, or a superset) counted every example as
    wrong without a word; only -1 (no label) may lie outside 0 .. C-1."""
    model = make_model()
    x, y = make_data()
    classes = model(x[:1]).shape[1]
    labels = y.clone()
    labels[5] = offset if offset < 0 else classes + offset
    with pytest.raises(ValueError, match=rf"labels must be class indices in 0 \.\. {classes - 1}"):
        score_dataset(model, loader(x, labels), ["softmax"], progress=False)
    labels[5] = -1  # no label: allowed
    table = score_dataset(model, loader(x, labels), ["softmax"], progress=False)
    assert table["label"][5] == -1 and not table["correct"][5]


class _DictDataset(Dataset):
    """Examples as Hugging Face datasets give them: dicts with extra keys."""

    def __init__(self, x, y, input_key="pixel_values", label_key="labels"):
        self.x, self.y, self.input_key, self.label_key = x, y, input_key, label_key

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        item = {self.input_key: self.x[i], "id": i}
        if self.label_key is not None:
            item[self.label_key] = self.y[i]
        return item


@pytest.mark.parametrize(("input_key", "label_key"), [("pixel_values", "labels"), ("image", None)])
def test_dict_batches_score_as_pairs(input_key, label_key):
    model = make_model()
    x, y = make_data()
    pairs = score_dataset(model, loader(x, y), ["softmax", "margin"], progress=False)
    dicts = DataLoader(_DictDataset(x, y, input_key, label_key), batch_size=BATCH)
    table = score_dataset(model, dicts, ["softmax", "margin"], progress=False)
    for name in ("prediction", "softmax", "margin"):
        torch.testing.assert_close(table[name], pairs[name])
    expected_labels = pairs["label"] if label_key else torch.full_like(pairs["label"], -1)
    torch.testing.assert_close(table["label"], expected_labels)


def test_dict_batches_without_one_input_key_are_refused():
    x, y = make_data()
    ambiguous = DataLoader(
        [{"image": a, "pixel_values": a, "labels": b} for a, b in zip(x, y)], batch_size=BATCH
    )
    with pytest.raises(ValueError, match=r"keys \['image', 'labels', 'pixel_values'\]"):
        score_dataset(make_model(), ambiguous, ["softmax"], progress=False)
    unnamed = DataLoader([{"x": a} for a in x], batch_size=BATCH)
    with pytest.raises(ValueError, match="exactly one tensor of"):
        score_dataset(make_model(), unnamed, ["softmax"], progress=False)


def test_progress_bar_on_stderr(capsys):
    x, y = make_data()
    score_dataset(make_model(), loader(x, y), ["softmax"], progress=True)
    captured = capsys.readouterr()
    assert "7/7" in captured.err and captured.out == ""
    score_dataset(make_model(), loader(x, y), ["softmax"], progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# torch.distributed: 2 CPU processes, gloo


def _worker(rank: int, world: int, out_dir: str) -> None:
    x, y = make_data()
    table = score_dataset(
        make_model(), loader(x, y), list(TRUST_SCORES), progress=False, score_kwargs=MC
    )
    torch.save(table.to_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_shards_for_sizes_not_divisible_by_the_world(monkeypatch):
    """37 examples in 7 batches over 3 (simulated) processes: DistributedSampler deals out
    the batches and pads with repeats of batches 0 and 1, which the gather step drops."""
    from captum_ext.metrics import dataset as module

    x, y = make_data()
    model = make_model()
    names = [*DETERMINISTIC, "mc_dropout"]
    single = score_dataset(model, loader(x, y), names, progress=False, score_kwargs=MC)
    shards = []
    monkeypatch.setattr(module, "_gather", lambda local, error: shards.append(local) or local)
    for rank in range(3):
        monkeypatch.setattr(module, "distributed_shard", lambda rank=rank: (rank, 3))
        score_dataset(model, loader(x, y), names, progress=False, score_kwargs=MC)
    monkeypatch.undo()
    # batches 0, 3, 6 | 1, 4, 0 | 2, 5, 1 (batch 6 holds the last example only)
    assert [len(shard["index"]) for shard in shards] == [13, 18, 18]
    assert shards[1]["index"][-6:].tolist() == list(range(6))
    everything = sorted(torch.cat([shard["index"] for shard in shards]).tolist())
    assert everything == sorted([*range(37), *range(12)])

    gathered = module._merged(shards)
    assert list(gathered) == list(single.columns)
    for name in single.columns:
        assert torch.equal(gathered[name], single[name]), name


def test_two_gloo_processes_give_the_single_process_table(tmp_path):
    x, y = make_data()
    single = score_dataset(
        make_model(), loader(x, y), list(TRUST_SCORES), progress=False, score_kwargs=MC
    )
    run_gloo(_worker, tmp_path)
    for rank in range(2):
        table = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert list(table) == list(single.columns)
        for name in single.columns:
            assert torch.equal(table[name], single[name]), (rank, name)


def test_old_scores_name_warns_and_still_works():
    import captum_ext.metrics.dataset as dataset

    with pytest.warns(DeprecationWarning, match="TRUST_SCORES"):
        old = dataset.SCORES
    assert old is TRUST_SCORES


class _Stream(torch.utils.data.IterableDataset):
    """40 examples streamed; ``split``: each DataLoader worker yields its own share."""

    def __init__(self, split: bool) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.rand(40, 1, 8, 8, generator=generator)
        self.split = split

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rows = range(40)
        if self.split and info is not None:
            rows = range(info.id, 40, info.num_workers)
        return iter(self.x[i] for i in rows)

    def __len__(self) -> int:
        return 40


def _tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()


def test_an_iterable_dataset_yielded_once_per_worker_is_warned_about():
    """Two workers that do not split the stream yield every example twice: 80 rows for a
    dataset whose __len__ is 40, which torch's own length warning did not report here."""
    loader = DataLoader(_Stream(split=False), batch_size=8, num_workers=2)
    with pytest.warns(RuntimeWarning, match=r"yielded 80 examples but its __len__ says 40"):
        table = score_dataset(_tiny_classifier(), loader, ["softmax"], progress=False)
    assert len(table) == 80


def test_an_iterable_dataset_split_by_worker_is_scored_without_warning(recwarn):
    loader = DataLoader(_Stream(split=True), batch_size=8, num_workers=2)
    table = score_dataset(_tiny_classifier(), loader, ["softmax"], progress=False)
    assert len(table) == 40
    assert not [w for w in recwarn if "__len__" in str(w.message)]


class _BatchStream(torch.utils.data.IterableDataset):
    """5 ready-made batches of 8; ``__len__`` counts batches, as torch's convention for
    ``DataLoader(batch_size=None)`` has it."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        return iter(torch.rand(8, 1, 8, 8, generator=generator) for _ in range(5))

    def __len__(self) -> int:
        return 5


def test_iterable_datasets_as_the_user_asked_are_not_warned_about(recwarn):
    """Batches yielded whole (batch_size=None, __len__ counting batches) and drop_last's
    missing last batch are what the user asked for: no length warning."""
    table = score_dataset(
        _tiny_classifier(), DataLoader(_BatchStream(), batch_size=None), ["softmax"], progress=False
    )
    assert len(table) == 40
    dropped = DataLoader(_Stream(split=False), batch_size=16, drop_last=True)
    table = score_dataset(_tiny_classifier(), dropped, ["softmax"], progress=False)
    assert len(table) == 32
    assert not [w for w in recwarn if "__len__" in str(w.message)]
