"""Full disks and interrupted fits (USER_NEEDS: long runs on shared machines).

Before: torch's zip writer reported a full disk as ``RuntimeError: [enforce fail at
inline_container.cc] ... unexpected pos``, naming neither the file nor the disk; a bad
``checkpoint`` path failed only at the first save, after that much training; an object
interrupted before its first checkpoint continued with ``resume=True`` from its partly
trained state (8 steps instead of 6, other weights); ``to_json`` and the report's PNGs were
written in place (a full disk left a truncated file where a good one was); a resumed mask
fit ignored a different ``batch_size``.
"""

from __future__ import annotations

import errno

import networkx as nx
import pytest
import torch
from _helpers import make_tiny_cnn
from torch.utils.data import DataLoader, TensorDataset

import captum_ext._utils.training as training
from captum_ext._utils.training import load_checkpoint, save_checkpoint
from captum_ext.attr import ActivationMatchingMask
from captum_ext.circuits import to_json
from captum_ext.introspection import IntrospectiveNetwork
from captum_ext.inversion import ConditionedGenerator, NetworkInversion

SHAPE, CLASSES = (3, 8, 8), 5


def test_a_full_disk_during_torch_save_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, target)

    def torch_full(state, file):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832")

    monkeypatch.setattr(training.torch, "save", torch_full)
    monkeypatch.setattr(training, "_disk_is_full", lambda folder, **_: True)
    with pytest.raises(OSError) as info:
        save_checkpoint({"step": 2}, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert "No space left on device" in str(info.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert load_checkpoint(target)["step"] == 1


def test_a_failing_write_with_free_space_is_not_blamed_on_the_disk(tmp_path, monkeypatch):
    def broken(state, file):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(training.torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        save_checkpoint({"step": 2}, tmp_path / "ckpt.pt")


def test_an_oserror_without_a_file_name_gets_the_path(tmp_path):
    with pytest.raises(OSError) as info:
        with training.atomic_path(tmp_path / "table.csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(tmp_path / "table.csv")


def test_to_json_and_figures_never_truncate_an_earlier_file(tmp_path, monkeypatch):
    from captum_ext.viz._figures import new_figure, save_figure

    graph = nx.DiGraph()
    graph.add_edge("a", "b", weight=1.0)
    path = tmp_path / "circuit.json"
    to_json(graph, path)
    before = path.read_text(encoding="utf-8")
    figure_path = tmp_path / "figure.png"
    save_figure(new_figure(20, 20), figure_path)
    png = figure_path.read_bytes()

    real_write = type(path).write_text

    def half_then_full(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", half_then_full)
    with pytest.raises(OSError):
        to_json(graph, path)
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == before

    class Broken:
        def savefig(self, file, **kwargs):
            with open(file, "wb") as handle:
                handle.write(b"\x89PNG")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        save_figure(Broken(), figure_path)
    assert figure_path.read_bytes() == png
    assert sorted(p.name for p in tmp_path.iterdir()) == ["circuit.json", "figure.png"]


def _inversion() -> NetworkInversion:
    torch.manual_seed(0)
    generator = ConditionedGenerator(CLASSES, SHAPE, latent_dim=8, width=8, preprocess=(0.5, 0.25))
    classifier = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES)
    return NetworkInversion(classifier, generator, batch_size=4, seed=1)


def test_a_bad_checkpoint_path_is_refused_before_any_step(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    inversion = _inversion()
    with pytest.raises(ValueError, match=r"`checkpoint` .* cannot be written"):
        inversion.fit(3, progress=False, checkpoint=tmp_path / "afile" / "ckpt.pt")
    assert inversion.history["step"] == []  # nothing was trained
    head = IntrospectiveNetwork(make_tiny_cnn(dtype=torch.float32), layer="classifier")
    x = torch.randn(6, 3, 6, 6)
    with pytest.raises(ValueError, match=r"`checkpoint_dir` .* cannot be written"):
        head.fit(
            x, torch.arange(6) % 2, epochs=1, progress=False, checkpoint_dir=tmp_path / "afile"
        )


def test_an_inversion_interrupted_before_its_first_checkpoint_resumes_bit_for_bit(
    tmp_path, monkeypatch
):
    reference = _inversion()
    expected = reference.fit(6, progress=False, checkpoint=tmp_path / "a.pt", checkpoint_every=4)

    interrupted = _inversion()
    record = NetworkInversion._record
    calls = []

    def stop_at_step_three(self, *args):
        record(self, *args)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(NetworkInversion, "_record", stop_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(6, progress=False, checkpoint=tmp_path / "b.pt", checkpoint_every=4)
    monkeypatch.undo()
    assert not (tmp_path / "b.pt").exists() and interrupted.history["step"] == []
    resumed = interrupted.fit(
        6, progress=False, checkpoint=tmp_path / "b.pt", checkpoint_every=4, resume=True
    )
    assert resumed.keys() == expected.keys()
    for key in expected:  # NaN where a loss term is not used
        torch.testing.assert_close(
            torch.tensor(resumed[key]), torch.tensor(expected[key]), rtol=0, atol=0, equal_nan=True
        )
    for got, want in zip(interrupted.generator.parameters(), reference.generator.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _mask_data():
    images = torch.randn(
        6, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    return DataLoader(TensorDataset(images, torch.zeros(6, dtype=torch.long)), batch_size=3)


def test_a_resumed_mask_fit_refuses_another_batch_size(tmp_path):
    explainer = ActivationMatchingMask(make_tiny_cnn(), ["features.1", "head"])
    explainer.fit(_mask_data(), epochs=1, progress=False, checkpoint=tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"`batch_size`=2, but `checkpoint` was written with 3"):
        explainer.fit(
            _mask_data(), epochs=2, batch_size=2, progress=False,
            checkpoint=tmp_path / "m.pt", resume=True,
        )  # fmt: skip


def test_save_on_a_rank_other_than_zero_writes_nothing(tmp_path, monkeypatch):
    """Called on every rank of a torchrun script, two ranks wrote one file and one removed
    the other's temporary as stale (a FileNotFoundError in 2-35 % of the saves)."""
    import captum_ext._utils.distributed as distributed

    explainer = ActivationMatchingMask(make_tiny_cnn(), ["features.1", "head"])
    explainer.fit(_mask_data(), epochs=1, progress=False)
    head = IntrospectiveNetwork(make_tiny_cnn(dtype=torch.float32), layer="classifier")
    head.fit(torch.randn(6, 3, 6, 6), torch.arange(6) % 2, epochs=1, progress=False)
    # rank 1 of 2 (the agreement after rank 0's write is tested with two real processes in
    # test_distributed_agreement.py)
    monkeypatch.setattr(distributed, "distributed_shard", lambda: (1, 2))
    monkeypatch.setattr(distributed, "all_gather_or_raise", lambda *args, **kwargs: None)
    assert explainer.save(tmp_path / "m.pt") == tmp_path / "m.pt"
    assert head.save(tmp_path / "h.pt") == tmp_path / "h.pt"
    assert list(tmp_path.iterdir()) == []
