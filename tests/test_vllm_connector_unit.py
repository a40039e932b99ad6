"""Scheduler-side planning and the worker's cache of the vLLM connector, without an engine."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lmcache_lab.engine import CacheEngine
from lmcache_lab.integrations.vllm_cache import LookupClient, WorkerCache, socket_path
from lmcache_lab.integrations.vllm_plan import Planner, servable_tokens, slot_mapping
from lmcache_lab.keys import Namespace
from lmcache_lab.metrics import CacheMetrics, DeltaTracker, MetricsDelta

CS, BS = 8, 4          # chunk of 8 tokens over blocks of 4 slots


def chunk(value: float, n: int = CS) -> torch.Tensor:
    return torch.full((2, 1, n, 2), value)


def make_cache(capacity: int = 10**6) -> WorkerCache:
    eng = CacheEngine({"chunk_size": CS, "tiers": {"cpu": {"capacity_bytes": capacity}}},
                      namespace=Namespace(model="m"))
    return WorkerCache(eng)


def fill(cache: WorkerCache, tokens, n_chunks: int) -> None:
    keys = cache.engine.chunk_keys(tokens)
    for i in range(n_chunks):
        cache.engine.store_keyed(keys, [chunk(i)], i)


# ------------------------------------------------------------------------------ pure helpers
def test_slot_mapping_is_block_table_arithmetic():
    blocks = np.array([7, 2, 9], dtype=np.int64)
    got = slot_mapping(blocks, BS, 2, 10)
    want = [7 * 4 + 2, 7 * 4 + 3, 2 * 4, 2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 9 * 4, 9 * 4 + 1]
    assert got.dtype == np.int64 and got.tolist() == want
    assert slot_mapping(blocks, BS, 5, 5).size == 0
    with pytest.raises(ValueError):
        slot_mapping(blocks, BS, 0, 13)


@pytest.mark.parametrize("n,expect", [(0, 0), (1, 0), (7, 0), (8, 4), (9, 8), (12, 8), (16, 12),
                                      (17, 16)])
def test_servable_tokens_leave_one_token_and_cut_the_last_chunk_to_blocks(n, expect):
    """Whole chunks; a chunk that ends the prompt is served up to its last whole block before
    the prompt's last token (as vLLM's own prefix cache would), never below the chunks before."""
    assert servable_tokens(n, CS, BS) == expect
    assert servable_tokens(n, CS, CS) == max(0, n - 1) // CS * CS


# ------------------------------------------------------------------------------ planner
class FakeLookup:
    def __init__(self, present: int):
        self.present, self.calls = present, []

    def __call__(self, req_id, prompt, max_chunks, skip, identity=()):
        self.calls.append((req_id, len(prompt), max_chunks, skip))
        return min(self.present, max_chunks), 0


def test_hit_is_chunk_aligned_and_leaves_a_token_to_compute():
    lk = FakeLookup(present=10)
    p = Planner(CS, BS, lk)
    assert p.match("a", list(range(16)), 0) == (12, 12)      # 2 chunks, the 2nd up to a block
    assert p.match("b", list(range(17)), 0) == (16, 16)
    assert p.match("c", list(range(7)), 0) == (0, 0)         # shorter than a chunk
    assert lk.calls[0] == ("a", 16, 2, 0)


def test_local_prefix_hit_reduces_the_external_part():
    p = Planner(CS, BS, FakeLookup(present=3))
    assert p.match("a", list(range(30)), 12) == (12, 24)     # APC has 12 (3 blocks)
    assert p.match("b", list(range(30)), 24) == (0, 24)
    p.allocated("a", 12)
    plan = p.step([("a", list(range(8)), 12)], [], {"a": 6})
    (load,) = plan.loads
    assert (load.start, load.end) == (12, 24)
    assert load.slots.tolist() == slot_mapping(np.arange(8), BS, 12, 24).tolist()


def test_step_plans_loads_then_stores_each_chunk_once_across_chunked_prefill():
    p = Planner(CS, BS, FakeLookup(present=1))
    prompt = list(range(40))                                  # 5 full chunks
    ext, hit = p.match("r", prompt, 0)
    assert (ext, hit) == (8, 8)
    p.allocated("r", ext)
    # step 1: tokens 8..20 computed (chunked prefill), blocks 0..4
    plan = p.step([("r", [10, 11, 12, 13, 14], 8)], [], {"r": 12})
    assert [(s.start, s.end) for s in plan.loads] == [(0, 8)]
    assert [(s.first_chunk, s.last_chunk) for s in plan.stores] == [(1, 2)]
    assert plan.stores[0].slots.tolist() == slot_mapping(np.array([10, 11, 12, 13, 14]), BS, 8, 16).tolist()
    # step 2: tokens 20..40 computed, 5 more blocks
    plan = p.step([], [("r", [15, 16, 17, 18, 19], False, 20)], {"r": 20})
    assert not plan.loads
    assert [(s.first_chunk, s.last_chunk) for s in plan.stores] == [(2, 5)]
    # decode steps: nothing more to do
    plan = p.step([], [("r", None, False, 41)], {"r": 1})
    assert not plan.loads and not plan.stores


def test_rolled_back_request_stores_the_recomputed_chunks_again():
    p = Planner(CS, BS, FakeLookup(present=2))
    ext, _ = p.match("r", list(range(30)), 0)
    p.allocated("r", ext)
    plan = p.step([("r", list(range(8)), 16)], [], {"r": 14})
    assert [(s.first_chunk, s.last_chunk) for s in plan.stores] == [(2, 3)]
    # the load of chunk 1 failed: vLLM recomputes from token 8 on
    plan = p.step([], [("r", None, False, 8)], {"r": 22})
    assert [(s.first_chunk, s.last_chunk) for s in plan.stores] == [(1, 3)]


def test_resumed_request_replaces_its_blocks():
    p = Planner(CS, BS, FakeLookup(present=0))
    p.match("r", list(range(16)), 0)
    p.allocated("r", 0)
    p.step([("r", [1, 2], 0)], [], {"r": 4})
    plan = p.step([], [("r", [5, 6, 7, 8], True, 4)], {"r": 12})
    assert plan.stores[0].slots.tolist() == slot_mapping(np.array([5, 6, 7, 8]), BS, 0, 16).tolist()


def test_declined_hits_and_finished_requests_are_released():
    p = Planner(CS, BS, FakeLookup(present=2))
    p.match("a", list(range(30)), 0)
    p.allocated("a", 0)                       # the scheduler did not take the hit
    p.match("b", list(range(30)), 0)
    p.finished("b")
    plan = p.step([], [], {})
    assert plan.release == ["a"] and plan.finished == ["b"]
    assert p.step([], [], {}).release == []


def test_load_starts_where_vllm_computed_and_follows_its_trim():
    """vLLM 0.32 defines the external tokens as starting at the `num_computed_tokens` it passed
    to get_num_new_matched_tokens, and may trim them from the end (to a block boundary): the load
    is [num_computed, num_computed + accepted), not a window ending at the hit."""
    p = Planner(CS, BS, FakeLookup(present=3))
    assert p.match("r", list(range(30)), 4) == (20, 24)       # APC has one block
    p.allocated("r", 16)                                      # vLLM trimmed 4 tokens off the end
    (load,) = p.step([("r", list(range(8)), 4)], [], {"r": 10}).loads
    assert (load.start, load.end, load.failed) == (4, 20, False)
    assert load.slots.tolist() == slot_mapping(np.arange(8), BS, 4, 20).tolist()


def test_chunk_not_a_multiple_of_the_block_size():
    cs, bs = 6, 4                                            # hits end mid-block
    p = Planner(cs, bs, FakeLookup(present=3))
    assert p.match("r", list(range(20)), 0) == (18, 18)
    p.allocated("r", 18)
    plan = p.step([("r", [3, 1, 4, 1, 5], 0)], [], {"r": 2})
    (load,) = plan.loads
    assert (load.start, load.end) == (0, 18)
    assert load.slots.tolist() == slot_mapping(np.array([3, 1, 4, 1, 5]), bs, 0, 18).tolist()
    assert not plan.stores                                    # chunks 0..2 are cached; 20 < 4*6


def test_a_load_beyond_the_hit_or_an_unplannable_one_never_raises():
    p = Planner(CS, BS, FakeLookup(present=1))
    p.match("r", list(range(30)), 0)
    p.allocated("r", 16)                                      # more than the 8-token hit: no raise
    assert p.errors == 1
    (load,) = p.step([("r", list(range(8)), 0)], [], {"r": 14}).loads
    assert (load.start, load.end) == (0, 16)                  # the worker loads what exists
    p.match("s", list(range(30)), 0)
    p.allocated("s", 8)
    plan = p.step([("s", [9], 0)], [], {"s": 14})             # too few blocks for the slots
    (load,) = plan.loads
    assert load.failed and load.blocks.tolist() == [9] and not plan.stores
    assert p.errors == 2


def test_a_lookup_without_a_hit_is_released_too():
    """A lookup answered after the scheduler's timeout may have pinned chunks the scheduler never
    heard of: a declined or empty hit always releases."""
    p = Planner(CS, BS, FakeLookup(present=0))
    p.match("a", list(range(30)), 0)
    p.allocated("a", 0)
    assert p.step([], [], {}).release == ["a"]


def test_a_waiting_request_is_answered_from_its_pinned_first_lookup():
    """vLLM asks again, every step, for a request it could not schedule: while the worker holds
    the first answer's pins (same num_computed), the planner answers without a round trip."""
    lk = FakeLookup(present=2)
    p = Planner(CS, BS, lk)
    assert p.match("a", list(range(30)), 0) == (16, 16)
    assert p.match("a", list(range(30)), 0) == (16, 16)           # not scheduled: asked again
    assert len(lk.calls) == 1 and p.reused_lookups == 1
    assert p.match("a", list(range(30)), 8) == (8, 16)            # another local hit: ask
    assert len(lk.calls) == 2
    p.allocated("a", 8)                                           # pins now belong to the load
    p.step([("a", list(range(8)), 8)], [], {"a": 22})
    p.match("a", list(range(30)), 8)                              # e.g. preempted, back again
    assert len(lk.calls) == 3


def test_an_answer_that_pinned_nothing_is_asked_again():
    """No pins, no guarantee: chunks stored since (another request with the same prefix) must
    be found, so an empty answer is never reused."""
    lk = FakeLookup(present=0)
    p = Planner(CS, BS, lk)
    assert p.match("a", list(range(30)), 0) == (0, 0)
    lk.present = 2
    assert p.match("a", list(range(30)), 0) == (16, 16)
    assert len(lk.calls) == 2 and p.reused_lookups == 0


def test_load_disabled_never_reports_hits_but_stores():
    lk = FakeLookup(present=5)
    p = Planner(CS, BS, lk, load_enabled=False)
    assert p.match("a", list(range(30)), 0) == (0, 0)
    assert lk.calls[0][2] == 0                # still keyed in the cache, nothing looked up
    p.allocated("a", 0)
    plan = p.step([("a", list(range(8)), 0)], [], {"a": 30})
    assert [(s.first_chunk, s.last_chunk) for s in plan.stores] == [(0, 3)]


# ------------------------------------------------------------------------------ worker cache
def test_lookup_pins_what_it_reports_until_the_load():
    cache = make_cache(capacity=chunk(0).nbytes * 3)
    toks = np.arange(40)
    fill(cache, toks, 3)
    assert cache.lookup("r", toks, max_chunks=4, skip=0) == 3
    # eviction pressure between lookup and load: pinned chunks survive, the put is refused
    other = cache.engine.chunk_keys(np.arange(100, 140))
    assert cache.engine.store_keyed(other, [chunk(9)], 0) == 0
    got = cache.read("r", 0, 3)
    assert [float(c[0, 0, 0, 0]) for c in got] == [0.0, 1.0, 2.0]
    assert cache.engine.stats.load_failures == 0
    # pins are released by the read: now the same put evicts (tail first)
    assert cache.engine.store_keyed(other, [chunk(9)], 0) == 1


def test_chunk_vanishing_before_the_load_is_a_counted_short_read(tmp_path):
    eng = CacheEngine({"chunk_size": CS, "tiers": {"cpu": {"capacity_bytes": 0},
                                                   "disk": {"path": str(tmp_path)}}},
                      namespace=Namespace(model="m"))
    cache = WorkerCache(eng)
    toks = np.arange(40)
    fill(cache, toks, 3)
    assert cache.lookup("r", toks, 4, 0) == 3
    eng.tiers[0]._file(cache.keys["r"][1]).unlink()       # gone behind the index
    got = cache.read("r", 0, 3)
    assert len(got) == 1
    assert eng.stats.load_failures == 1
    assert not cache.pins
    cache.close()


def test_release_and_forget_drop_pins():
    cache = make_cache()
    toks = np.arange(24)
    fill(cache, toks, 2)
    cache.lookup("r", toks, 2, 0)
    assert sum(cache.engine.tiers[0]._pins.values()) == 2
    cache.lookup("r", toks, 2, 1)             # looked up again: previous pins dropped first
    assert sum(cache.engine.tiers[0]._pins.values()) == 1
    cache.release("r")
    assert not cache.engine.tiers[0]._pins
    cache.forget("r")
    assert "r" not in cache.keys


def test_missing_and_write_skip_present_chunks(tmp_path):
    eng = CacheEngine({"chunk_size": CS, "tiers": {"disk": {"path": str(tmp_path)}}},
                      namespace=Namespace(model="m"))
    cache = WorkerCache(eng)
    toks = np.arange(24)
    cache.lookup("r", toks, 0, 0)
    keys, missing = cache.missing("r", 0, 3)
    assert missing == [0, 1, 2]
    for i in missing:
        cache.write(keys, i, chunk(i))
    cache.flush()                              # disk is written behind the step
    assert cache.missing("r", 0, 3)[1] == []
    assert eng.stats.stored_chunks == 3
    cache.close()


def test_lookup_over_the_socket_matches_the_local_answer():
    cache = make_cache()
    toks = np.arange(40)
    fill(cache, toks, 2)
    engine_id = "unit-test-engine"
    cache.serve(socket_path(engine_id, 0), b"secret")
    client = LookupClient([socket_path(engine_id, 0)], b"secret", connect_timeout_s=5)
    try:
        assert client.lookup("r", toks.tolist(), 4, 0) == (2, 0)
        assert cache.pins["r"] == cache.keys["r"][:2]
        assert client.lookup("s", list(range(500, 540)), 4, 0) == (0, 0)
        assert client.errors == 0
    finally:
        client.close()
        cache.close()
    # a worker that is gone: a counted miss, not an exception
    gone = LookupClient([socket_path(engine_id, 0)], b"secret", connect_timeout_s=0.1)
    assert gone.lookup("r", toks.tolist(), 4, 0) == (0, 0) and gone.errors == 1


def test_identity_travels_over_the_socket():
    cache = make_cache()
    toks = np.arange(40)
    keys = cache.engine.chunk_keys(toks, identity=(("cache_salt", "tenant-a"),))
    for i in range(2):
        cache.engine.store_keyed(keys, [chunk(i)], i)
    cache.serve(socket_path("unit-identity", 0), b"k")
    client = LookupClient([socket_path("unit-identity", 0)], b"k", connect_timeout_s=5)
    try:
        assert client.lookup("r", toks.tolist(), 4, 0) == (0, 0)                     # no salt
        assert client.lookup("r", toks.tolist(), 4, 0, (("cache_salt", "tenant-b"),)) == (0, 0)
        assert client.lookup("r", toks.tolist(), 4, 0, (("lora", "tenant-a"),)) == (0, 0)
        assert client.lookup("r", toks.tolist(), 4, 0, (("cache_salt", "tenant-a"),)) == (2, 0)
    finally:
        client.close()
        cache.close()


def test_a_stalled_worker_is_a_counted_miss_and_its_late_answer_is_dropped():
    cache = make_cache()
    toks = np.arange(40)
    fill(cache, toks, 2)
    cache.serve(socket_path("unit-stall", 0), b"k")
    client = LookupClient([socket_path("unit-stall", 0)], b"k", connect_timeout_s=5, timeout_s=0.2)
    tier = cache.engine.tiers[0]
    try:
        with tier.lock:                                   # the worker cannot answer meanwhile
            assert client.lookup("r", toks.tolist(), 4, 0) == (0, 0)
        assert client.errors == 1
        # the late answer (2) went with the dropped connection; this one is fresh
        assert client.lookup("s", list(range(500, 540)), 4, 0) == (0, 0) and client.errors == 1
        assert client.lookup("r", toks.tolist(), 4, 0) == (2, 0)
    finally:
        client.close()
        cache.close()


def test_wrong_authkey_is_refused():
    cache = make_cache()
    cache.serve(socket_path("unit-auth", 0), b"right")
    client = LookupClient([socket_path("unit-auth", 0)], b"wrong", connect_timeout_s=1)
    try:
        assert client.lookup("r", list(range(16)), 1, 0) == (0, 0) and client.errors == 1
    finally:
        cache.close()


# ------------------------------------------------------------------------------ metrics
def test_deltas_from_the_worker_add_up_in_the_scheduler_metrics():
    cache = make_cache(capacity=chunk(0).nbytes * 2)
    metrics = CacheMetrics()
    tracker = DeltaTracker()
    toks = np.arange(40)
    fill(cache, toks, 2)
    fill(cache, np.arange(100, 140), 1)        # evicts the tail of the first prompt
    cache.lookup("r", toks, 4, 0)
    cache.read("r", 0, 1)
    tracker.observe_load(0.002)
    d = tracker.take(cache.engine)
    metrics.apply(d.aggregate(MetricsDelta(stored_chunks=1)))
    assert metrics.value("lmcache_lab_stored_chunks_total") == 3 + 1
    assert metrics.value("lmcache_lab_retrieved_chunks_total") == 1
    assert metrics.value("lmcache_lab_evictions_total", tier="cpu") == 1
    assert metrics.value("lmcache_lab_tier_chunks", tier="cpu") == 2
    assert metrics.value("lmcache_lab_load_seconds_count") == 1
    assert tracker.take(cache.engine) is None  # nothing new
    metrics.record_lookup(32, 8)
    assert metrics.value("lmcache_lab_hit_tokens_total") == 0    # promised is not loaded
    assert metrics.value("lmcache_lab_engine_prefix_hit_tokens_total") == 8


def test_hit_tokens_count_loaded_tokens_and_failed_loads_their_own():
    """The connector's load reports what it loaded and what fell short; the scheduler's metrics
    count hits from that, not from the lookup's promise."""
    metrics = CacheMetrics()
    tracker = DeltaTracker()
    cache = make_cache()
    counters = {"loaded_tokens": 16, "failed_load_tokens": 8}
    metrics.apply(tracker.take(cache.engine, counters, {"pinned_chunks": 3}))
    metrics.apply(tracker.take(cache.engine, {"loaded_tokens": 24, "failed_load_tokens": 8},
                               {"pinned_chunks": 0}))
    assert metrics.value("lmcache_lab_hit_tokens_total") == 24
    assert metrics.value("lmcache_lab_failed_load_tokens_total") == 8
    assert metrics.value("lmcache_lab_pinned_chunks") == 0
    a = MetricsDelta(gauges={"write_behind_peak_bytes": 5, "pinned_chunks": 1})
    b = MetricsDelta(gauges={"write_behind_peak_bytes": 7, "pinned_chunks": 2})
    assert a.aggregate(b).gauges == {"write_behind_peak_bytes": 7, "pinned_chunks": 3}


def test_metrics_endpoint_serves_on_loopback():
    import urllib.request

    metrics = CacheMetrics()
    port = metrics.serve(0)
    try:
        metrics.record_load(256, 0)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "lmcache_lab_hit_tokens_total 256.0" in body
    finally:
        metrics.close()


def test_lookups_and_writes_from_threads_keep_pins_consistent():
    cache = make_cache(capacity=chunk(0).nbytes * 4)
    toks = np.arange(40)
    fill(cache, toks, 2)
    errors = []

    def reader(i):
        try:
            for _ in range(50):
                hit = cache.lookup(f"r{i}", toks, 4, 0)
                assert len(cache.read(f"r{i}", 0, hit)) == hit   # pinned: never short
        except Exception as e:  # surfaced below
            errors.append(e)

    def writer():
        for j in range(50):
            keys = cache.engine.chunk_keys(np.arange(1000 + 16 * j, 1016 + 16 * j))
            cache.write(keys, 0, chunk(j))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.engine.stats.load_failures == 0


def test_a_literal_store_secret_is_refused_in_the_extra_config():
    """vLLM logs kv_connector_extra_config: only file:/env: references pass there."""
    from lmcache_lab.config import ConfigError
    from lmcache_lab.integrations.vllm import refuse_literal_secret

    with pytest.raises(ConfigError, match="file:/path or env:NAME") as e:
        refuse_literal_secret({"store_secret": "hunter2-but-much-longer-than-16"})
    assert "hunter2" not in str(e.value)
    refuse_literal_secret({"store_secret": "env:LMCACHE_SECRET"})
    refuse_literal_secret({"store_secret": "file:/run/secrets/kv"})
    refuse_literal_secret({})
