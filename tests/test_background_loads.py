"""Loads between engine steps (vLLM's async KV load, config `prefetch`): the planner plans them
when vLLM allocates, the worker's answer says when a hit needs a slow tier, and the worker's
background thread reports every load once, with the blocks it could not fill."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from lmcache_lab.config import load_config
from lmcache_lab.engine import CacheEngine
from lmcache_lab.integrations.vllm_cache import WorkerCache
from lmcache_lab.integrations.vllm_loads import BackgroundLoads
from lmcache_lab.integrations.vllm_plan import LoadSpec, Planner, load_between_steps, slot_mapping
from lmcache_lab.keys import Namespace

CS, BS = 8, 4


class Present:
    """A lookup that finds the first `n` chunks."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, req_id, prompt, max_chunks, skip, identity=()):
        return min(self.n, max_chunks), 0


def parked(blocks: list[int], hit_chunks: int = 2, prompt_len: int = 30) -> tuple[Planner, int]:
    """A planner with request "a" allocated for a background load of its hit."""
    p = Planner(CS, BS, Present(hit_chunks))
    ext, _ = p.match("a", list(range(prompt_len)), 0)
    p.requests["a"].background = True        # the connector's call, from the worker's answer
    p.allocated("a", ext, blocks)
    return p, ext


# ------------------------------------------------------------------------------ planner
def test_background_load_is_planned_at_allocation_and_sent_once():
    blocks = [5, 9, 2, 7, 11, 3, 4, 6]
    p, ext = parked(blocks)
    plan = p.step([], [], {})                    # vLLM parks the request: it is not scheduled
    (load,) = plan.loads
    assert load.background and (load.start, load.end) == (0, ext) == (0, 16)
    assert load.slots.tolist() == slot_mapping(np.array(blocks), BS, 0, 16).tolist()
    assert p.step([], [], {}).loads == []
    # loaded: vLLM schedules it with the hit computed; only the chunk past the hit is stored
    plan = p.step([("a", blocks, 16)], [], {"a": 14})
    assert plan.loads == [] and [(s.first_chunk, s.last_chunk) for s in plan.stores] == [(2, 3)]


def test_failed_background_load_rolls_back_and_stores_the_recomputed_chunks():
    blocks = list(range(8))
    p, _ = parked(blocks)
    p.step([], [], {})
    # the worker reported chunk 1's blocks invalid: vLLM schedules from the first of them
    plan = p.step([("a", blocks, 8)], [], {"a": 22})
    assert plan.loads == [] and [(s.first_chunk, s.last_chunk) for s in plan.stores] == [(1, 3)]


def test_sync_hits_are_planned_in_the_step_that_schedules_them():
    p = Planner(CS, BS, Present(2))
    ext, _ = p.match("a", list(range(30)), 0)
    p.allocated("a", ext, [0, 1, 2, 3])             # block ids are ignored for a step load
    assert p.step([], [], {}).loads == []
    (load,) = p.step([("a", list(range(8)), 0)], [], {"a": 30}).loads
    assert not load.background and (load.start, load.end) == (0, 16)


def test_a_new_lookup_clears_the_background_mark():
    p = Planner(CS, BS, Present(0))                 # nothing pinned: the next lookup asks again
    p.match("a", list(range(30)), 0)
    p.requests["a"].background = True
    p.match("a", list(range(30)), 0)
    assert not p.requests["a"].background


# ------------------------------------------------------------------------------ worker answer
def chunk(value: float) -> torch.Tensor:
    return torch.full((2, 1, CS, 2), value)


def disk_cache(path, memory: bool = True) -> WorkerCache:
    tiers = {"disk": {"path": str(path)}}
    tiers["cpu"] = {"capacity_bytes": 10**6 if memory else 0}
    return WorkerCache(CacheEngine(load_config({"chunk_size": CS, "tiers": tiers}),
                                   namespace=Namespace(model="m")))


def test_answer_counts_the_pinned_chunks_no_memory_tier_holds(tmp_path):
    tokens = np.arange(40)
    cache = disk_cache(tmp_path)
    cache.answer("w", tokens, 0, 0)
    keys = cache.keys["w"]
    for i in range(3):
        cache.write(keys, i, chunk(i))
    cache.flush()
    hit, _, _, slow = cache.answer("a", tokens, 4, 0)
    assert (hit, slow) == (3, 0)                    # all three in memory
    cache.release("a")
    memory = cache.engine.tiers[0]
    with memory.lock:
        memory.delete(keys[2])                      # chunk 2 now on disk only
    assert cache.answer("b", tokens, 4, 0)[::3] == (3, 1)
    assert cache.answer("c", tokens, 4, 3)[::3] == (3, 0)        # skipped: not loaded, not slow
    assert cache.answer("d", tokens, 2, 0)[::3] == (2, 0)        # chunk 2 not asked for
    for rid in "bcd":
        cache.release(rid)
    cache.close()
    restarted = disk_cache(tmp_path)                # a new process: its memory tier is empty
    assert restarted.answer("e", tokens, 4, 0)[::3] == (3, 3)
    assert restarted.answer("f", np.arange(100, 140), 4, 0)[::3] == (0, 0)       # a miss
    assert restarted.slow_chunk_s == 0.0            # nothing read from disk yet
    assert len(restarted.read("e", 0, 3)) == 3
    assert restarted.slow_chunk_s > 0.0             # measured on the load
    assert restarted.answer("g", tokens, 4, 0)[::3] == (3, 0)    # promoted into memory
    restarted.close()


def test_without_slow_hits_the_answer_counts_none(tmp_path):
    """Where no load may run between steps (a CPU engine with `prefetch: auto`, or `false`), the
    worker neither counts slow chunks nor times their reads."""
    tokens = np.arange(40)
    cache = disk_cache(tmp_path)
    cache.answer("w", tokens, 0, 0)
    for i in range(3):
        cache.write(cache.keys["w"], i, chunk(i))
    cache.close()
    restarted = WorkerCache(CacheEngine(load_config({"chunk_size": CS, "tiers": {
        "disk": {"path": str(tmp_path)}}}), namespace=Namespace(model="m")), slow_hits=False)
    assert restarted.answer("e", tokens, 4, 0)[::3] == (3, 0)
    assert len(restarted.read("e", 0, 3)) == 3 and restarted.slow_chunk_s == 0.0
    restarted.close()


@pytest.mark.parametrize("load_s,others,step_s,between", [
    (0.2, 0, 0.01, False),      # alone in the engine: nothing to overlap
    (0.0, 8, 0.01, False),      # no slow load measured yet: measure one in the step
    (0.2, 4, 0.02, True),       # decoders would stall 4 x 200 ms; the request waits ~20 ms more
    (0.08, 2, 1.5, False),      # long prefill steps: the others lose less than a step
    (0.5, 4, 2.0, False),       # equal: the step keeps it
])
def test_load_between_steps_when_the_others_would_lose_more_than_a_step(load_s, others, step_s,
                                                                        between):
    assert load_between_steps(load_s, others, step_s) is between


# ------------------------------------------------------------------------------ background thread
def spec(req: str, blocks: list[int]) -> LoadSpec:
    slots = slot_mapping(np.array(blocks), BS, 0, BS * len(blocks))
    return LoadSpec(req, 0, len(slots), slots, background=True)


def wait_for(loads: BackgroundLoads, n: int, timeout_s: float = 10.0):
    done, invalid = set(), set()
    deadline = time.monotonic() + timeout_s
    while len(done) < n and time.monotonic() < deadline:
        d, i = loads.take()
        done |= d
        invalid |= i
        time.sleep(0.005)
    return done, invalid


def test_every_load_is_reported_once_with_the_blocks_it_could_not_fill():
    def load(s: LoadSpec) -> set[int]:
        if s.req_id == "raises":
            raise RuntimeError("a bug in the load")
        return {int(s.slots[-1]) // BS} if s.req_id == "short" else set()

    loads = BackgroundLoads(load, BS)
    for name, blocks in (("ok", [1, 2]), ("short", [3, 4]), ("raises", [5, 6])):
        loads.submit(spec(name, blocks))
    done, invalid = wait_for(loads, 3)
    assert done == {"ok", "short", "raises"}
    assert invalid == {4, 5, 6}                     # short's last block; all of the failed one
    assert loads.take() == (set(), set())           # reported once
    loads.close()


def test_a_load_cancelled_before_it_runs_is_skipped_and_still_reported():
    gate, ran = threading.Event(), []

    def load(s: LoadSpec) -> set[int]:
        gate.wait(10)
        ran.append(s.req_id)
        return set()

    loads = BackgroundLoads(load, BS)
    loads.submit(spec("first", [1]))                # blocks the thread until the gate opens
    loads.submit(spec("aborted", [2]))
    loads.cancel("aborted")
    loads.cancel("unknown")                         # nothing pending: nothing to cancel
    gate.set()
    done, invalid = wait_for(loads, 2)
    assert done == {"first", "aborted"} and ran == ["first"] and not invalid
    loads.submit(spec("aborted", [2]))              # a later load of the same id runs
    assert wait_for(loads, 1)[0] == {"aborted"} and ran == ["first", "aborted"]
    loads.close()


def test_done_and_invalid_blocks_come_from_one_critical_section():
    """However `take` interleaves with the thread, a request is never reported done before the
    blocks its load could not fill (vLLM must learn them no later than the request)."""
    n = 200
    loads = BackgroundLoads(lambda s: {int(s.slots[0]) // BS}, BS)
    seen_invalid: set[int] = set()
    for r in range(n):
        loads.submit(spec(f"r{r}", [r]))
    done_all: set[str] = set()
    deadline = time.monotonic() + 20
    while len(done_all) < n and time.monotonic() < deadline:
        done, invalid = loads.take()
        seen_invalid |= invalid
        for rid in done:
            assert int(rid[1:]) in seen_invalid, rid
        done_all |= done
    assert len(done_all) == n
    loads.close()


@pytest.mark.parametrize("prefetch", [True, False, "auto"])
def test_prefetch_is_auto_or_a_boolean(prefetch):
    assert load_config({"prefetch": prefetch}).prefetch == prefetch
    assert load_config({}).prefetch == "auto"
    for bad in ("yes", 1, 0, None):
        with pytest.raises(ValueError, match="prefetch: must be auto, true or false"):
            load_config({"prefetch": bad})


def test_wait_returns_once_a_load_is_done():
    """An idle step waits for the next finished load instead of spinning."""
    gate = threading.Event()
    loads = BackgroundLoads(lambda s: (gate.wait(10), set())[1], BS)
    loads.submit(spec("slow", [1]))
    threading.Timer(0.05, gate.set).start()
    loads.wait(30)                                  # returns when "slow" is done (or times out)
    assert loads.take() == ({"slow"}, set())
    loads.close()
