"""Atomic files, checkpoints and the distributed helpers shared by every trainer."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from _distributed import run_gloo
from torch import nn

from captum_ext._utils.training import (
    atomic_path,
    distributed_shard,
    is_main_process,
    load_checkpoint,
    save_checkpoint,
    unwrap_distributed,
    wrap_distributed,
)


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with atomic_path(target) as temp:
        temp.write_text("first")
        assert not target.exists()
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as temp:
        temp.write_text("second")
        raise RuntimeError("boom")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_a_folder_as_the_path_is_refused_naming_it_and_leaves_nothing(tmp_path):
    """The rename failed with "Is a directory: '.../.tmp.XXXX.tmp' -> '...'", naming a
    temporary file the user never asked for."""
    from captum_ext.circuits import to_json

    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as caught, atomic_path(folder) as temp:
        temp.write_text("x")
    assert caught.value.filename == str(folder) and ".tmp" not in str(caught.value)
    import networkx as nx

    with pytest.raises(IsADirectoryError, match="a folder, not a file"):
        to_json(nx.DiGraph(), folder)
    assert list(folder.iterdir()) == [] and sorted(tmp_path.iterdir()) == [folder]


def test_a_symlink_is_written_through_and_a_fifo_in_place(tmp_path):
    """``os.replace`` over the path replaced a user's symbolic link with a file (its target
    never written) and a named pipe with a file (its reader got nothing); as root, ``--out
    /dev/null`` replaced the device."""
    import threading

    target = tmp_path / "real" / "scores.csv"
    target.parent.mkdir()
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    with atomic_path(link) as temp:
        temp.write_text("through the link")
    assert link.is_symlink() and target.read_text() == "through the link"

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this platform")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    with atomic_path(pipe) as temp:
        temp.write_bytes(b"to the reader")
    reader.join(timeout=60)
    assert received == [b"to the reader"]
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "pipe", "real"]

    # `--out /dev/stdout` into a pipe: /proc/self/fd/N links to "pipe:[...]", no path
    read_end, write_end = os.pipe()
    try:
        descriptor = Path(f"/proc/self/fd/{write_end}")
        if descriptor.exists():
            with atomic_path(descriptor) as temp:
                temp.write_bytes(b"piped")
            assert os.read(read_end, 100) == b"piped"
    finally:
        os.close(read_end)
        os.close(write_end)
    folder_link = tmp_path / "folder_link"
    folder_link.symlink_to(target.parent)
    with pytest.raises(IsADirectoryError) as caught, atomic_path(folder_link):
        pass
    assert caught.value.filename == str(folder_link)  # the path given, not its target


def test_checkpoint_round_trip_with_generator_state(tmp_path):
    model = nn.Linear(3, 2)
    generator = torch.Generator().manual_seed(5)
    path = save_checkpoint(
        {"model": model.state_dict(), "step": 7, "rng": generator.get_state()},
        tmp_path / "ckpt.pt",
    )
    state = load_checkpoint(path)
    assert state["step"] == 7
    restored = torch.Generator()
    restored.set_state(state["rng"])
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=restored))
    for name, value in model.state_dict().items():
        assert torch.equal(state["model"][name], value)


def test_load_checkpoint_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="`resume`: no checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt", argument="resume")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="`checkpoint`: .* is not a readable checkpoint"):
        load_checkpoint(broken)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pt")


def test_single_process_helpers():
    model = nn.Linear(2, 2)
    assert distributed_shard() is None
    assert is_main_process()
    assert wrap_distributed(model) is model
    assert unwrap_distributed(nn.DataParallel(model)) is model


def _job(rank: int, world: int, out_dir: str) -> None:
    model = wrap_distributed(nn.Linear(2, 1))
    result = {
        "shard": distributed_shard(),
        "main": is_main_process(),
        "ddp": type(model).__name__,
        "inner": type(unwrap_distributed(model)).__name__,
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_helpers_under_two_gloo_processes(tmp_path):
    run_gloo(_job, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["shard"] for r in results] == [(0, 2), (1, 2)]
    assert [r["main"] for r in results] == [True, False]
    assert {r["ddp"] for r in results} == {"DistributedDataParallel"}
    assert {r["inner"] for r in results} == {"Linear"}


def test_distributed_from_environment_is_a_no_op_in_a_plain_process(monkeypatch):
    import torch.distributed as dist

    from captum_ext._utils.training import distributed_from_environment

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_from_environment(torch.device("cpu")) as device:
        assert device == torch.device("cpu")
        assert not (dist.is_available() and dist.is_initialized())


def test_a_folder_that_refuses_the_temporary_file_names_the_file_asked_for(tmp_path, monkeypatch):
    """In a read-only folder the error named the random temporary (".net.pt.x1y2.tmp"),
    not the file the user asked to write. (Root ignores folder permissions, so the refusal
    is simulated.)"""
    import errno
    import tempfile

    def refuse(prefix, suffix, dir):
        name = f"{dir}/{prefix}abc123{suffix}"
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    target = tmp_path / "net.pt"
    with pytest.raises(OSError) as info:
        with atomic_path(target):
            pass
    assert info.value.filename == str(target)
    assert info.value.errno == errno.EACCES


def test_load_fitting_state_takes_extra_state_and_refuses_other_shapes():
    """Non-tensor entries (a module's `_extra_state`) were counted as misfits, so a mask net
    with extra state could no longer be loaded."""
    from captum_ext._utils.training import load_fitting_state

    class WithExtra(nn.Module):
        def __init__(self, width: int = 3) -> None:
            super().__init__()
            self.linear = nn.Linear(2, width)
            self.temperature = 1.0

        def get_extra_state(self):
            return {"temperature": self.temperature}

        def set_extra_state(self, state):
            self.temperature = state["temperature"]

    saved = WithExtra()
    saved.temperature = 0.5
    target = WithExtra()
    load_fitting_state(target, saved.state_dict(), "`path`")
    assert target.temperature == 0.5
    assert torch.equal(target.linear.weight, saved.linear.weight)
    before = WithExtra(width=4)
    weight = before.linear.weight.clone()
    with pytest.raises(ValueError, match="another architecture .* linear.weight"):
        load_fitting_state(before, saved.state_dict(), "`path`")
    assert torch.equal(before.linear.weight, weight)
