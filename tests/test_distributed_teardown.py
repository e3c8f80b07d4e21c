"""Under torchrun, the CLI's process group is torn down only after every process is done (a
barrier first): a process leaving while its peer still talked to the store aborted the peer
("terminate called without an active exception"). The order is checked with torch.distributed
replaced by a recorder; the real two-process runs are in test_cli_score.py."""

from __future__ import annotations

import pytest
import torch

from captum_ext._utils import training


class _Recorder:
    def __init__(self, barrier_error: Exception | None = None) -> None:
        self.calls: list[str] = []
        self.initialized = False
        self.barrier_error = barrier_error

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self.initialized

    def init_process_group(self, backend: str) -> None:
        self.calls.append(f"init:{backend}")
        self.initialized = True

    def barrier(self) -> None:
        self.calls.append("barrier")
        if self.barrier_error is not None:
            raise self.barrier_error

    def destroy_process_group(self) -> None:
        self.calls.append("destroy")


@pytest.fixture
def recorder(monkeypatch):
    import torch.distributed

    made = _Recorder()
    for name in ("is_available", "is_initialized", "init_process_group", "barrier"):
        monkeypatch.setattr(torch.distributed, name, getattr(made, name))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", made.destroy_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    return made


def test_every_process_is_done_before_the_group_is_destroyed(recorder):
    with training.distributed_from_environment(torch.device("cpu")):
        recorder.calls.append("work")
    assert recorder.calls == ["init:gloo", "work", "barrier", "destroy"]


def test_an_error_skips_the_barrier_and_still_destroys(recorder):
    with pytest.raises(KeyError), training.distributed_from_environment(torch.device("cpu")):
        raise KeyError("boom")
    assert recorder.calls == ["init:gloo", "destroy"]


def test_a_peer_that_failed_at_the_barrier_does_not_hide_the_teardown(recorder):
    recorder.barrier_error = RuntimeError("Connection closed by peer")
    with training.distributed_from_environment(torch.device("cpu")):
        pass
    assert recorder.calls == ["init:gloo", "barrier", "destroy"]
