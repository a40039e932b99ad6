"""vLLM's own stats show the connector's counters, and its KV events show the connector's chunks.

One engine (CPU, in-process, log stats on, KV events published over ZMQ, vLLM's prefix cache
off), chunk 256, a CPU tier of two chunks: prompt A (2 chunks) is stored, served again, then
prompt B's two chunks evict A's.
"""
from __future__ import annotations

import pytest

from vllm_e2e import free_port, make_prompts, run_engine

pytestmark = pytest.mark.e2e

CHUNK_BYTES = 512 * 1024           # 2 layers x 2 KV heads x 64 dims x 256 tokens, K and V, fp32


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    p = make_prompts(3)
    a, b = p["long"], p["diverge"][::-1]                 # 700 and 550 tokens: 2 chunks each
    port, events = free_port(), f"tcp://127.0.0.1:{free_port()}"
    spec = {"model": tiny_model, "dtype": "float32", "enable_prefix_caching": False,
            "engine_args": {"disable_log_stats": False,
                            "kv_events_config": {"enable_kv_cache_events": True,
                                                 "publisher": "zmq", "endpoint": events}},
            "connector": {"chunk_size": 256, "tiers": {"cpu": {"capacity_bytes": 2 * CHUNK_BYTES}},
                          "metrics": {"port": port}},
            "ops": [{"op": "kv_events", "endpoint": events},
                    {"op": "generate", "prompts": [a, a, b], "max_tokens": 4, "sequential": True},
                    {"op": "vllm_stats"}, {"op": "scrape", "port": port}]}
    return run_engine(spec, False, tmp_path_factory.mktemp("stats") / "engine")


def test_vllm_stats_show_the_connector_counters(run):
    _, gen, vllm, ours = run["results"]
    assert gen["num_cached_tokens"] == [0, 512, 0]
    assert vllm["vllm:lmcache_lab_hit_tokens"] == ours["lmcache_lab_hit_tokens_total"] == 512
    assert vllm["vllm:lmcache_lab_lookup_tokens"] == ours["lmcache_lab_lookup_tokens_total"]
    assert vllm["vllm:lmcache_lab_stored_chunks"] == ours["lmcache_lab_stored_chunks_total"] == 4
    assert vllm["vllm:lmcache_lab_evicted_chunks"] == 2
    assert vllm["vllm:lmcache_lab_miss_tokens"] == (ours["lmcache_lab_lookup_tokens_total"]
                                                     - ours["lmcache_lab_hit_tokens_total"])


def test_kv_events_show_stored_and_evicted_chunks(run):
    events, *_ = run["results"]
    ours = [e for e in events if (e[1] or "").startswith("lmcache_lab:")]
    stored = [h for kind, _, hashes in ours if kind == "BlockStored" for h in hashes]
    removed = [h for kind, _, hashes in ours if kind == "BlockRemoved" for h in hashes]
    assert len(stored) == 4 and len(set(stored)) == 4
    assert len(removed) == 2 and set(removed) == set(stored[:2])      # A's chunks, evicted by B
    assert {e[1] for e in ours} == {"lmcache_lab:cpu"}
