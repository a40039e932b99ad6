"""The connector's counters as vLLM connector stats, and its chunks as vLLM KV cache events."""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm.distributed.kv_events import BlockRemoved, BlockStored

from lmcache_lab.engine import CacheEngine
from lmcache_lab.integrations.vllm_cache import WorkerCache
from lmcache_lab.integrations.vllm_stats import LMCacheLabPromMetrics, LMCacheLabStats, kv_events
from lmcache_lab.keys import Namespace
from lmcache_lab.metrics import CacheMetrics, MetricsDelta
from lmcache_lab.observe import trace_id

CS = 8
CHUNK = torch.zeros(2, 1, CS, 2)


class _Config:           # what KVConnectorPromMetrics reads of a VllmConfig
    kv_transfer_config = None


def test_stored_and_evicted_chunks_become_vllm_block_events():
    cache = WorkerCache(CacheEngine({"chunk_size": CS,
                                     "tiers": {"cpu": {"capacity_bytes": 2 * CHUNK.nbytes}}},
                                    namespace=Namespace(model="m")), events=True)
    a, b = np.arange(2 * CS + 1), np.arange(100, 100 + 2 * CS + 1)
    keys_a, keys_b = cache.engine.chunk_keys(a), cache.engine.chunk_keys(b)
    for keys in (keys_a, keys_b):                  # b's two chunks evict a's two
        for i in range(2):
            cache.write(keys, i, CHUNK.clone())
    events = kv_events(cache.take_events())
    stored = [e for e in events if isinstance(e, BlockStored)]
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert [e.block_hashes[0] for e in stored] == [trace_id(k) for k in keys_a + keys_b]
    assert [e.parent_block_hash for e in stored] == [None, trace_id(keys_a[0]), None,
                                                     trace_id(keys_b[0])]
    assert {e.block_size for e in stored} == {CS} and {e.medium for e in events} == {"lmcache_lab:cpu"}
    assert sorted(e.block_hashes[0] for e in removed) == sorted(trace_id(k) for k in keys_a)
    assert cache.take_events() == []               # taken once
    cache.write(keys_b, 0, CHUNK.clone())           # present already: no event
    assert cache.take_events() == []
    cache.close()


def test_no_events_are_kept_unless_asked_for():
    cache = WorkerCache(CacheEngine({"chunk_size": CS}, namespace=Namespace(model="m")))
    keys = cache.engine.chunk_keys(np.arange(CS))
    cache.write(keys, 0, CHUNK.clone())
    assert cache.take_events() == [] and cache.events is None
    cache.close()


def test_interval_counts_reach_vllm_stats_and_its_prometheus_counters():
    m = CacheMetrics()
    m.record_lookup(512, 0)
    m.record_load(256, 128)
    m.record_misses({("evicted", "cpu"): 100, ("never_stored", ""): 28})
    m.apply(MetricsDelta(stored_chunks=3, stored_bytes=30, evictions={"cpu": 2}))
    stats = LMCacheLabStats(m.take_interval())
    assert stats.data == {"lookup_tokens": 512, "hit_tokens": 256, "miss_tokens:load_failed": 128,
                          "miss_tokens:evicted": 100, "miss_tokens:never_stored": 28,
                          "stored_chunks": 3, "evicted_chunks": 2}
    assert m.take_interval() == {} and LMCacheLabStats({}).is_empty()
    both = stats.aggregate(LMCacheLabStats({"lookup_tokens": 512, "hit_tokens": 512}))
    assert both.reduce()["hit_rate"] == 0.75 and both.data["lookup_tokens"] == 1024

    registry = CollectorRegistry()
    types = {t: partial(t, registry=registry) for t in (Counter, Gauge, Histogram)}
    prom = LMCacheLabPromMetrics(_Config(), types, ["engine"], {0: ["0"]})
    prom.observe(both.data, 0)
    value = registry.get_sample_value
    assert value("vllm:lmcache_lab_hit_tokens_total", {"engine": "0"}) == 768
    assert value("vllm:lmcache_lab_miss_tokens_total", {"engine": "0", "reason": "evicted"}) == 100
