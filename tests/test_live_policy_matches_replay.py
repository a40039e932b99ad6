"""The live connector's store path gives each tier's policy exactly what the trace replay gives it.

The replay (experiments/replay.py) drives a tier per request with: prefix lookup, one touch of the
hit chain, the missing chunks stored as one chain, one touch of the whole chain. The vLLM worker
cache sees the same request as a lookup, a load of the hit, chunk writes spread over several engine
steps (chunked prefill), and the request's end. If those calls touched the prefix once per stored
chunk (as they once did), LFU would count a request's root once per chunk and recency orders would
differ from the replay's: hit rates measured offline would not carry over. This test replays one
request sequence both ways and compares the policies' resident sets and eviction orders.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcache_lab.cost import ModelCost
from lmcache_lab.engine import CacheEngine
from lmcache_lab.experiments.replay import replay
from lmcache_lab.experiments.trace import TraceRequest
from lmcache_lab.integrations.vllm_cache import WorkerCache
from lmcache_lab.integrations.vllm_plan import servable_tokens
from lmcache_lab.keys import Namespace
from lmcache_lab.policies import OFFLINE, POLICIES, make_policy
from lmcache_lab.tiers import MemoryTier

CS = 4
CHUNK = torch.zeros(2, 1, CS, 2)                     # one chunk's KV: 64 bytes
ONLINE = sorted(set(POLICIES) - OFFLINE)


def requests(seed: int = 0, n: int = 60) -> list[np.ndarray]:
    """Prompts over a few shared prefixes (documents, earlier turns) with distinct tails; every
    prompt ends in a partial chunk, so all its full chunks are loadable."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 1000, CS * k) for k in (3, 5, 8)]
    out = []
    for _ in range(n):
        doc = docs[rng.integers(len(docs))][:CS * int(rng.integers(1, 9))]
        tail = rng.integers(1000, 2000, CS * int(rng.integers(0, 4)) + int(rng.integers(1, CS)))
        out.append(np.concatenate([doc, tail]))
    return out


def live(prompts, policy: str, capacity: int) -> MemoryTier:
    """The worker cache's calls for each request, as the connector makes them."""
    engine = CacheEngine({"chunk_size": CS, "policy": {"name": policy},
                          "tiers": {"cpu": {"capacity_bytes": capacity}}}, namespace=Namespace(model="m"))
    cache = WorkerCache(engine)
    for r, tokens in enumerate(prompts):
        rid = f"req-{r}"
        n = servable_tokens(len(tokens), CS, CS) // CS
        hit = cache.lookup(rid, tokens, n, 0)
        if hit:
            assert len(cache.read(rid, 0, hit)) == hit
        else:
            cache.release(rid)
        keys, missing = cache.missing(rid, hit, n)
        half = len(missing) // 2                     # chunked prefill: two steps store the rest
        for step in (missing[:half], missing[half:]):
            for i in step:
                cache.write(keys, i, CHUNK.clone())
        cache.forget(rid)
    return engine.tiers[0]


def replayed(prompts, policy: str, capacity: int) -> MemoryTier:
    keyer = CacheEngine({"chunk_size": CS}, namespace=Namespace(model="m")).keyer
    trace = [TraceRequest(0.0, len(t), 1, tuple(keyer.keys(t))) for t in prompts]
    tier = MemoryTier(capacity, make_policy(policy, chunk_tokens=CS))
    model = ModelCost(n_params=1e6, n_layers=1, d_attn=8, kv_bytes_per_token=CHUNK.nbytes // CS)
    replay(trace, tier, model, block_tokens=CS)
    return tier


@pytest.mark.parametrize("policy", ONLINE)
@pytest.mark.parametrize("chunks", [12, 30])
def test_live_store_path_leaves_the_policy_where_the_replay_does(policy, chunks):
    prompts = requests()
    a = live(prompts, policy, chunks * CHUNK.nbytes)
    b = replayed(prompts, policy, chunks * CHUNK.nbytes)
    assert a.stats.evictions == b.stats.evictions and a.stats.evictions > 0
    assert set(a.keys()) == set(b.keys())
    # what each would evict next, in order, until empty: the policies' whole state as it matters
    order_a = a.policy.pop_victims(len(a))
    order_b = b.policy.pop_victims(len(b))
    assert order_a == order_b and len(order_a) == len(a)
