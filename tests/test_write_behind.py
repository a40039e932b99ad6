"""WriteBehind: bounded, ordered, never blocking; and the worker cache's slow-tier path through it."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lmcache_lab.engine import CacheEngine
from lmcache_lab.integrations.vllm_cache import WorkerCache
from lmcache_lab.keys import Namespace
from lmcache_lab.write_behind import WriteBehind

CS = 8


def test_pending_bytes_never_exceed_the_budget_and_excess_is_skipped():
    gate = threading.Event()
    wb = WriteBehind(max_bytes=100)
    ran: list[int] = []
    assert wb.submit(60, lambda: (gate.wait(10), ran.append(0)))
    assert wb.submit(40, lambda: ran.append(1))
    assert not wb.submit(1, lambda: ran.append(2))          # full: skipped at once, not queued
    assert wb.submit(0, lambda: ran.append(3))              # a touch holds no bytes: always fits
    assert wb.stats.pending_bytes == 100 and wb.stats.skipped == 1 and wb.stats.skipped_bytes == 1
    gate.set()
    assert wb.flush(timeout=10)
    assert ran == [0, 1, 3]                                 # in order; the skipped one never ran
    assert wb.stats.pending_bytes == 0 and wb.stats.peak_bytes == 100
    assert wb.submit(100, lambda: ran.append(4)) and wb.flush(timeout=10)
    wb.close()
    with pytest.raises(RuntimeError):
        wb.submit(1, lambda: None)


def test_a_failing_job_is_counted_and_the_writer_goes_on():
    wb = WriteBehind(max_bytes=10)
    ran = []
    wb.submit(1, lambda: 1 / 0)
    wb.submit(1, lambda: ran.append("after"))
    assert wb.flush(timeout=10)
    assert ran == ["after"] and wb.stats.failed == 1 and wb.stats.pending_bytes == 0
    wb.close()


def test_close_runs_what_is_queued():
    wb = WriteBehind(max_bytes=10)
    ran = []
    for i in range(5):
        wb.submit(1, lambda i=i: ran.append(i))
    wb.close()
    assert ran == list(range(5))


def make_cache(tmp_path, write_behind: int) -> WorkerCache:
    cfg = {"chunk_size": CS, "write_behind": {"max_bytes": write_behind},
           "tiers": {"cpu": {"capacity_bytes": 10**6}, "disk": {"path": str(tmp_path)}}}
    return WorkerCache(CacheEngine(cfg, namespace=Namespace(model="m")))


def chunk(v: float) -> torch.Tensor:
    return torch.full((2, 1, CS, 2), v)


def test_a_stalled_slow_tier_blocks_neither_lookups_nor_memory_writes(tmp_path):
    """While the disk tier is held (a write in flight), the memory tier serves lookups, pins,
    the step's store check, loads and new writes; writes beyond the write-behind budget are
    skipped and counted."""
    cache = make_cache(tmp_path, write_behind=2 * chunk(0).nbytes)
    disk = cache.engine.tiers[1]
    toks = np.arange(4 * CS)
    keys = cache.engine.chunk_keys(toks)
    done = threading.Event()
    with disk.lock:                                          # the writer thread cannot proceed

        def serve():
            assert cache.lookup("r", toks, 0, 0) == 0                  # keyed, nothing looked up
            assert cache.missing("r", 0, 4) == (keys, [0, 1, 2, 3])   # asks the memory tier only
            for i in range(4):
                cache.write(keys, i, chunk(i))
            assert cache.lookup("r", toks, 4, 0) == 4
            assert len(cache.read("r", 0, 4)) == 4
            done.set()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        t.join(30)
        assert done.is_set(), "a lookup or a memory write waited for the stalled disk tier"
        delta = cache.take_delta()
        assert delta.write_behind_skipped_chunks == 2        # chunks 2 and 3: budget full
        assert delta.gauges["write_behind_pending_bytes"] <= 2 * chunk(0).nbytes
        assert delta.gauges["pinned_chunks"] == 0            # the load released its pins
    cache.flush()
    assert len(disk) == 2                                    # what was queued landed
    cache.close()
