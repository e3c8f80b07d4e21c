"""ROAD imputation on several CPU threads: whole groups of systems per thread, the same answer
as one thread, the caller's torch thread count untouched."""

from __future__ import annotations

import os
import signal
import threading
import warnings

import numpy as np
import pytest
import torch

import captum_ext.metrics.remove_and_debias as module
from captum_ext.metrics.remove_and_debias import road_imputation


@pytest.fixture
def three_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(threads)


def _batch(seed: int, n: int = 7, h: int = 12, w: int = 10):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 2, h, w, generator=generator, dtype=torch.float64)
    shares = torch.linspace(0.05, 0.95, n)[:, None, None]
    removed = torch.rand(n, h, w, generator=generator) < shares
    removed.view(n, -1)[:, 0] = False
    return images, removed


@pytest.mark.parametrize("solver", ["auto", "direct", "block", "nested"])
def test_several_threads_give_the_one_thread_answer(solver, three_threads):
    images, removed = _batch(1)
    torch.set_num_threads(1)
    single = road_imputation(images, removed, noise=0.0, solver=solver)
    torch.set_num_threads(3)
    threaded = road_imputation(images, removed, noise=0.0, solver=solver)
    np.testing.assert_allclose(threaded.numpy(), single.numpy(), atol=1e-12, rtol=0)
    assert torch.get_num_threads() == 3  # the caller's setting is left as it was


def test_each_thread_solves_whole_groups_with_one_torch_thread(monkeypatch, three_threads):
    """'auto' splits each route's systems into at most one part per thread (contiguous, every
    system once), and each part runs on a worker thread set to one torch thread."""
    images, removed = _batch(2, n=9)
    seen = []
    factorised = module._factorised
    lock = threading.Lock()

    def spy(inputs, mask, solver):
        with lock:
            seen.append((solver, inputs.shape[0], torch.get_num_threads(), threading.get_ident()))
        return factorised(inputs, mask, solver)

    monkeypatch.setattr(module, "_factorised", spy)
    filled = road_imputation(images, removed, noise=0.0)
    main = threading.get_ident()
    assert all(threads == 1 and ident != main for _, _, threads, ident in seen)
    per_route = {}
    for solver, count, _, _ in seen:
        per_route.setdefault(solver, []).append(count)
    assert set(per_route) == {"block", "direct"}
    assert all(1 <= len(parts) <= 3 for parts in per_route.values())
    dense = module._whole_grid_is_faster(removed, "block")
    assert sum(per_route["block"]) == int(dense.sum())
    assert sum(per_route["direct"]) == int((~dense).sum())
    monkeypatch.setattr(module, "_factorised", factorised)
    torch.set_num_threads(1)
    exact = road_imputation(images, removed, noise=0.0, solver="direct")
    np.testing.assert_allclose(filled.numpy(), exact.numpy(), atol=1e-10, rtol=0)


def test_one_thread_runs_inline(monkeypatch):
    """With one torch thread (the suite's setting) nothing is handed to another thread."""
    images, removed = _batch(3)
    idents = []
    factorised = module._factorised

    def spy(inputs, mask, solver):
        idents.append(threading.get_ident())
        return factorised(inputs, mask, solver)

    monkeypatch.setattr(module, "_factorised", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        road_imputation(images, removed, noise=0.0)
    finally:
        torch.set_num_threads(threads)
    assert idents and set(idents) == {threading.get_ident()}


def test_a_failure_on_a_worker_thread_reaches_the_caller(monkeypatch, three_threads):
    images, removed = _batch(4)

    def broken(inputs, mask, solver):
        raise RuntimeError(f"factorisation failed ({solver})")

    monkeypatch.setattr(module, "_factorised", broken)
    with pytest.raises(RuntimeError, match="factorisation failed"):
        road_imputation(images, removed, noise=0.0, solver="nested")


def test_rows_are_split_by_count_for_the_grid_and_by_removed_pixels_for_the_lu(monkeypatch):
    removed = torch.zeros(6, 4, 4, dtype=torch.bool)
    removed.view(6, -1)[:, :8] = True
    removed.view(6, -1)[5, :16] = True  # the last system: twice the unknowns of the others
    rows = torch.arange(6)
    grid = module._split_rows(rows, removed, "nested", 2)
    assert [part.tolist() for part in grid] == [[0, 1, 2], [3, 4, 5]]
    # 56 unknowns: one sparse LU unless the parts may be as small as half of them
    assert [part.tolist() for part in module._split_rows(rows, removed, "direct", 2)] == [
        rows.tolist()
    ]
    monkeypatch.setattr(module, "_DIRECT_PART_UNKNOWNS", 28)
    lu = module._split_rows(rows, removed, "direct", 2)
    assert [part.tolist() for part in lu] == [[0, 1, 2, 3], [4, 5]]  # 32 and 24 unknowns
    monkeypatch.setattr(module, "_DIRECT_PART_UNKNOWNS", 1)  # at most four parts per thread
    assert len(module._split_rows(rows, removed, "direct", 1)) == 1
    twenty = torch.ones(20, 4, 4, dtype=torch.bool)
    assert [len(p) for p in module._split_rows(torch.arange(20), twenty, "direct", 2)] == [
        3,
        2,
        3,
        2,
        3,
        2,
        3,
        2,
    ]
    assert [p.tolist() for p in module._split_rows(rows[:1], removed, "direct", 4)] == [[0]]
    assert module._split_rows(rows[:0], removed, "nested", 2) == []
    many = module._split_rows(rows, removed, "nested", 10)
    assert torch.equal(torch.cat(many), rows) and len(many) == 6


def test_the_threads_are_capped_whatever_the_core_count(monkeypatch, three_threads):
    """Each thread holds one chunk's factorisation: a 64-core machine must not hold 64."""
    images, removed = _batch(5, n=9)
    counts = []
    monkeypatch.setattr(module, "_MAX_SOLVER_THREADS", 2)
    split = module._split_rows

    def spy(rows, mask, method, workers):
        counts.append(workers)
        return split(rows, mask, method, workers)

    monkeypatch.setattr(module, "_split_rows", spy)
    road_imputation(images, removed, noise=0.0, solver="nested")
    assert counts == [2]


def test_after_a_failure_the_parts_not_started_are_dropped(monkeypatch):
    """Both threads busy, the first part fails: the parts still queued never run (a Ctrl-C or
    an error does not wait for the rest of the batch). The running parts are held until the
    pool has been shut down, so the verdict does not depend on the machine's speed."""
    from concurrent.futures import ThreadPoolExecutor

    both_busy = threading.Barrier(2)
    shut_down = threading.Event()
    ran = []

    class Pool(ThreadPoolExecutor):
        def shutdown(self, wait=True, *, cancel_futures=False):
            super().shutdown(wait=False, cancel_futures=cancel_futures)
            shut_down.set()  # the queue is settled: release the parts that run
            super().shutdown(wait=wait)

    monkeypatch.setattr(module, "ThreadPoolExecutor", Pool)

    def failing():
        both_busy.wait(timeout=30)
        raise RuntimeError("part 0 failed")

    def blocking(i):
        def task():
            if i == 1:
                both_busy.wait(timeout=30)
            ran.append(i)
            shut_down.wait(timeout=30)
            return torch.zeros(1)

        return task

    tasks = [failing] + [blocking(i) for i in range(1, 8)]
    with pytest.raises(RuntimeError, match="part 0 failed"):
        module._run_tasks(tasks, 2)
    assert 1 in ran and len(ran) <= 2  # part 1 and at most the one taken right after the failure


def test_threads_started_after_the_solvers_keep_the_callers_thread_count(three_threads):
    """torch starts each new thread with the thread count set last anywhere in the process:
    the workers' one thread stuck to every thread the caller started later."""
    images, removed = _batch(3)
    road_imputation(images, removed, noise=0.0, solver="nested")
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [3]


def test_threads_asking_for_one_plan_at_once_build_it_once(monkeypatch):
    """The nested-dissection plan (about 90 MB at 224 px) is built once when several threads
    miss the cache together, not once per thread."""
    builds = []
    build = module._built_nested_plan.__wrapped__
    gate = threading.Barrier(3)

    def counted(h, w, leaf):
        builds.append((h, w, leaf))
        return build(h, w, leaf)

    cached = __import__("functools").lru_cache(maxsize=4)(counted)
    monkeypatch.setattr(module, "_built_nested_plan", cached)

    def ask():
        gate.wait()
        module._nested_plan(23, 19, module._NESTED_LEAF)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [(23, 19, module._NESTED_LEAF)]


def test_a_plan_being_built_does_not_hold_up_another_grids_plan(monkeypatch):
    """One lock per grid: a thread asking for a cached 28 px plan waited for seconds while
    another thread built the 224 px one."""
    building = threading.Event()
    release = threading.Event()
    build = module._built_nested_plan

    def slow_for_one_grid(h, w, leaf):
        if (h, w) == (31, 29):
            building.set()
            release.wait(60)
        return build(h, w, leaf)

    monkeypatch.setattr(module, "_built_nested_plan", slow_for_one_grid)
    slow = threading.Thread(target=module._nested_plan, args=(31, 29, module._NESTED_LEAF))
    slow.start()
    try:
        assert building.wait(60)
        other = threading.Thread(target=module._nested_plan, args=(12, 10, module._NESTED_LEAF))
        other.start()
        other.join(60)  # a hang guard only: it must finish while the slow build is held
        assert not other.is_alive()
    finally:
        release.set()
        slow.join()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_fresh_plan_locks():
    """A fork taken while another thread holds a plan lock (a DataLoader worker started
    during a build) must not inherit the held lock: the child builds the plan itself."""
    key = (5, 5, module._NESTED_LEAF)
    lock = module._PLAN_LOCKS.setdefault(key, threading.Lock())
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(60)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
            pid = os.fork()
        if pid == 0:  # the child: exit 0 once built; killed by the alarm if it waits
            signal.alarm(60)
            try:
                module._nested_plan(*key)
            finally:
                os._exit(0 if module._PLAN_LOCKS.get(key) is not lock else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        release.set()
        holder.join()
