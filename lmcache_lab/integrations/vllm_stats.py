"""The connector's counters in vLLM's own stats, and its chunks as vLLM KV cache events.

Stats: the scheduler-side connector hands vLLM one `LMCacheLabStats` per step
(`get_kv_connector_stats`: what its `CacheMetrics` counted since the last call). vLLM sends it to
its front end with the scheduler stats, where it is logged with the throughput line ("KV Transfer
metrics: ...") and recorded by `LMCacheLabPromMetrics` in vLLM's own Prometheus registry, beside
the engine's metrics (`/metrics` of `vllm serve`, `LLM.get_metrics()`):

    vllm:lmcache_lab_lookup_tokens_total, vllm:lmcache_lab_hit_tokens_total,
    vllm:lmcache_lab_stored_chunks_total, vllm:lmcache_lab_evicted_chunks_total,
    vllm:lmcache_lab_miss_tokens_total{reason}

Events: a chunk stored in, or evicted from, the worker's tiers becomes a `BlockStored` /
`BlockRemoved` (medium `lmcache_lab:<tier>`, block size = chunk size, hashes = chunk keys as
63-bit integers, `observe.trace_id`), so a router reading vLLM's KV events sees which prefixes
this cache holds. They travel to the scheduler in the worker metadata, bounded per step
(`vllm_cache.MAX_EVENTS`; beyond, they are dropped and counted), and `take_events` hands them to vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)

from lmcache_lab.observe import trace_id

STAT_COUNTERS = ("lookup_tokens", "hit_tokens", "stored_chunks", "evicted_chunks")
MISS_PREFIX = "miss_tokens:"       # data key of one miss reason's tokens


@dataclass
class LMCacheLabStats(KVConnectorStats):
    """`data`: counter name (`STAT_COUNTERS`, or `miss_tokens:<reason>`) -> increment."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "LMCacheLabStats":
        data = dict(self.data)
        for k, v in other.data.items():
            data[k] = data.get(k, 0) + v
        return LMCacheLabStats(data)

    def reduce(self) -> dict[str, int | float]:
        out = dict(self.data)
        lookup = out.get("lookup_tokens", 0)
        out["hit_rate"] = round(out.get("hit_tokens", 0) / lookup, 4) if lookup else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class LMCacheLabPromMetrics(KVConnectorPromMetrics):
    """`LMCacheLabStats` as counters in vLLM's registry, one series per engine."""

    def __init__(self, vllm_config, metric_types, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        docs = {"lookup_tokens": "Prompt tokens lmcache_lab was asked about",
                "hit_tokens": "Prompt tokens loaded from lmcache_lab",
                "stored_chunks": "Chunks lmcache_lab stored",
                "evicted_chunks": "Chunks lmcache_lab's tiers evicted"}
        self._counters = {name: self._counter_cls(name=f"vllm:lmcache_lab_{name}",
                                                  documentation=doc, labelnames=labelnames)
                          for name, doc in docs.items()}
        self._misses = self._counter_cls(
            name="vllm:lmcache_lab_miss_tokens",
            documentation="Prompt tokens lmcache_lab did not serve, by reason",
            labelnames=labelnames + ["reason"])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, n in transfer_stats_data.items():
            if not n:
                continue
            if name.startswith(MISS_PREFIX):
                self._misses.labels(*labels, name[len(MISS_PREFIX):]).inc(n)
            elif name in self._counters:
                self._counters[name].labels(*labels).inc(n)


def kv_events(raw: list[tuple]) -> list[KVCacheEvent]:
    """vLLM events from the worker's raw ones: ("stored", tier, key, parent key or None,
    chunk_size) and ("removed", tier, key)."""
    out: list[KVCacheEvent] = []
    for e in raw:
        if e[0] == "stored":
            _, tier, key, parent, size = e
            out.append(BlockStored(block_hashes=[trace_id(key)],
                                   parent_block_hash=None if parent is None else trace_id(parent),
                                   token_ids=[], block_size=size, lora_id=None,
                                   medium=f"lmcache_lab:{tier}", lora_name=None))
        else:
            _, tier, key = e
            out.append(BlockRemoved(block_hashes=[trace_id(key)], medium=f"lmcache_lab:{tier}"))
    return out
