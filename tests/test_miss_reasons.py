"""Miss reasons: every looked-up servable token that is not loaded has exactly one reason, and a
request's reasons sum to its lookup tokens minus its hit tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcache_lab.engine import CacheEngine
from lmcache_lab.integrations.vllm_cache import WorkerCache, refuse_lookup
from lmcache_lab.integrations.vllm_plan import Planner, servable_tokens
from lmcache_lab.keys import Namespace
from lmcache_lab.metrics import CacheMetrics
from lmcache_lab.observe import MISS_REASONS, GhostIndex, request_misses

CS, BS = 8, 4
CHUNK = torch.zeros(2, 1, CS, 2)


def make_cache(capacity_chunks: int, **extra) -> WorkerCache:
    cfg = {"chunk_size": CS, "tiers": {"cpu": {"capacity_bytes": capacity_chunks * CHUNK.nbytes}},
           **extra}
    return WorkerCache(CacheEngine(cfg, namespace=Namespace(model="m")))


def store_all(cache: WorkerCache, rid: str, tokens) -> None:
    keys, missing = cache.missing(rid, 0, len(tokens) // CS)
    for i in missing:
        cache.write(keys, i, CHUNK.clone())


def test_request_misses_cover_every_unloaded_token_once():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        lookup = int(rng.integers(0, 100))
        engine, hit, accepted = (int(x) for x in rng.integers(0, 120, 3))
        misses = request_misses(lookup, engine, hit, accepted, ("evicted", "cpu"))
        offered = max(0, min(hit, lookup) - min(engine, lookup))
        taken = min(accepted, offered)
        loaded = int(rng.integers(0, taken + 1))         # the rest of the load failed
        assert all(n > 0 for n in misses.values())
        assert {r for r, _ in misses} <= set(MISS_REASONS)
        assert sum(misses.values()) + (taken - loaded) == lookup - loaded


def test_request_misses_name_each_part():
    # 40 servable tokens; the engine's prefix cache had 8; the cache offered up to 32 and the
    # engine took 16 of the 24 offered; the tail [32, 40) was evicted from the cpu tier
    got = request_misses(40, 8, 32, 16, ("evicted", "cpu"))
    assert got == {("engine_cache", ""): 8, ("partial", ""): 8, ("evicted", "cpu"): 8}


def test_ghost_index_is_bounded_and_forgets_the_oldest():
    ghost = GhostIndex(3)
    ghost.record([b"a", b"b", b"c"], "evicted", "cpu")
    ghost.record([b"d"], "skipped_store")
    assert len(ghost) == 3 and ghost.why(b"a") == ("never_stored", "")
    assert ghost.why(b"d") == ("skipped_store", "")
    ghost.evicted("disk", [b"d", b"b"])                 # a skipped store keeps its reason
    assert ghost.why(b"d") == ("skipped_store", "") and ghost.why(b"b") == ("evicted", "disk")
    assert GhostIndex(0).why(b"a") == ("never_stored", "")


def test_first_missing_chunk_says_never_stored_then_evicted_by_its_tier():
    cache = make_cache(capacity_chunks=2)
    a, b = np.arange(2 * CS + 1), np.arange(1000, 1000 + 2 * CS + 1)
    assert cache.lookup_why("a", a, 2, 0) == (0, ("never_stored", ""))
    store_all(cache, "a", a)
    cache.forget("a")
    assert cache.lookup_why("a2", a, 2, 0) == (2, ("never_stored", ""))    # all asked hit
    cache.release("a2")
    cache.lookup_why("b", b, 2, 0)
    store_all(cache, "b", b)                             # evicts a's two chunks
    cache.forget("b")
    assert cache.lookup_why("a3", a, 2, 0) == (0, ("evicted", "cpu"))
    cache.close()


def test_a_chunk_whose_slow_store_was_skipped_says_skipped_store(tmp_path):
    cache = make_cache(capacity_chunks=1, write_behind={"max_bytes": 0},
                       tiers={"cpu": {"capacity_bytes": CHUNK.nbytes},
                              "disk": {"path": str(tmp_path)}})
    a, b = np.arange(CS + 1), np.arange(500, 500 + CS + 1)
    for rid, tokens in (("a", a), ("b", b)):            # b's chunk evicts a's from memory
        cache.lookup_why(rid, tokens, 1, 0)
        store_all(cache, rid, tokens)
        cache.forget(rid)
    cache.flush()
    assert cache.lookup_why("a2", a, 1, 0) == (0, ("skipped_store", ""))
    cache.close()


def test_a_refused_cache_answers_refused():
    assert refuse_lookup("r", np.arange(3), 1, 0) == (0, 0, ("refused", ""), 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_each_requests_reasons_sum_to_its_lookup_minus_hit_tokens(seed):
    """Requests over shared prefixes through the planner and a worker cache too small to keep
    them, some with part of the prompt in the engine's prefix cache, some hits trimmed by the
    engine: per request, reasons + the load's shortfall == lookup tokens - loaded tokens; the
    metrics add up the same way."""
    rng = np.random.default_rng(seed)
    cache = make_cache(capacity_chunks=6)
    metrics = CacheMetrics()
    answers = {}

    def lookup(rid, prompt, max_chunks, skip, identity):
        hit, tail, answers[rid], _ = cache.answer(rid, np.asarray(prompt), max_chunks, skip, identity)
        return hit, tail

    planner = Planner(CS, BS, lookup)
    docs = [rng.integers(0, 1000, CS * k) for k in (2, 4, 7)]
    seen = set()
    for r in range(80):
        rid = f"r{r}"
        doc = docs[rng.integers(len(docs))][:CS * int(rng.integers(1, 8))]
        prompt = np.concatenate([doc, rng.integers(1000, 2000, int(rng.integers(1, 2 * CS)))])
        computed = int(rng.choice([0, 0, BS, CS]))         # the engine's prefix cache
        ext, hit = planner.match(rid, prompt.tolist(), computed)
        t = planner.requests[rid]
        t.miss = answers[rid]
        trim = int(rng.integers(0, 2)) * min(ext, BS)      # the engine may take less
        planner.allocated(rid, ext - trim)
        lookup_tokens = servable_tokens(len(prompt), CS, BS)
        metrics.record_lookup(lookup_tokens, min(computed, lookup_tokens))
        loaded = 0
        if ext - trim > 0:
            start, end = computed, computed + ext - trim
            got = cache.read(rid, start // CS, -(-end // CS))
            loaded = min(end, (start // CS + len(got)) * CS) - start
        failed = max(0, ext - trim - loaded)
        metrics.record_load(loaded, failed)
        keys, missing = cache.missing(rid, 0, len(prompt) // CS)
        for i in missing:
            cache.write(keys, i, CHUNK.clone())
        misses = request_misses(lookup_tokens, t.matched_from, t.hit_tokens, t.accepted, t.miss)
        metrics.record_misses(misses)
        assert sum(misses.values()) + failed == lookup_tokens - loaded, (r, misses)
        seen.update(reason for reason, _ in misses)
        planner.finished(rid)
        cache.forget(rid)
    assert {"engine_cache", "partial", "never_stored", "evicted"} <= seen
    total = sum(metrics.value("lmcache_lab_miss_tokens_total", reason=r, tier=t)
                for r in MISS_REASONS for t in ("", "cpu"))
    assert total == (metrics.value("lmcache_lab_lookup_tokens_total")
                     - metrics.value("lmcache_lab_hit_tokens_total"))
    cache.close()


def test_engine_summary_holds_the_miss_reasons_of_the_endpoint():
    from lmcache_lab.experiments.engine_run import ArmResult, Record, arm_summary
    from lmcache_lab.experiments.vllm_driver import scrape

    m = CacheMetrics()
    m.record_lookup(1024, 0)
    m.record_load(256, 0)
    m.record_misses({("evicted", "cpu"): 512, ("never_stored", ""): 256})
    port = m.serve(0)
    try:
        scraped = scrape(port)
    finally:
        m.close()
    rec = Record("lmcache_lab", 0, "g", 0, 0.0, 0.0, 1.0, 1.0, 1100, 256, 1)
    out = arm_summary(ArmResult([rec], 1.0, scraped))["connector"]
    assert out["miss_tokens"] == {"evicted:cpu": 512.0, "never_stored": 256.0}
    assert sum(out["miss_tokens"].values()) == out["lookup_tokens"] - out["hit_tokens"]
