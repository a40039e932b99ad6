"""The Redis tier on a 3-master Redis Cluster: keys spread over nodes; a dead node loses only its keys."""
from __future__ import annotations

import time

import pytest
import torch
import xxhash

from lmcache_lab.config import RedisTierConfig
from lmcache_lab.tiers import RedisTier

pytestmark = pytest.mark.redis

N = 24


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(f"cluster-chunk-{i}".encode())


def chunk(i: int) -> dict[str, torch.Tensor]:
    return {"kv": torch.full((2, 16, 32), float(i), dtype=torch.bfloat16)}


def cluster_tier(node) -> RedisTier:
    return RedisTier(RedisTierConfig(url=node.url, cluster=True, timeout_s=0.3, backoff_max_s=0.2))


def test_cluster_spreads_chunks_and_another_instance_reads_them(redis_cluster):
    a, b = cluster_tier(redis_cluster[0]), cluster_tier(redis_cluster[2])
    try:
        assert a.available and b.available
        assert a.put_many([(key(i), chunk(i), None, 0) for i in range(N)]) == [True] * N
        per_node = [int(n.cli("DBSIZE")) for n in redis_cluster]
        assert sum(per_node) == N and all(per_node), per_node      # every master holds some
        assert b.prefix_length([key(i) for i in range(N)]) == N
        values = b.get_many([key(i) for i in range(N)])
        assert all(torch.equal(v["kv"], chunk(i)["kv"]) for i, v in enumerate(values))
        assert sorted(b.keys()) == sorted(key(i) for i in range(N))
        usage = b.usage()
        assert usage.available and usage.used_bytes > 0
    finally:
        a.close()
        b.close()


def test_a_killed_node_loses_only_its_keys_and_nothing_raises(redis_cluster, wait_until):
    t = cluster_tier(redis_cluster[0])
    try:
        assert all(t.put_many([(key(i), chunk(i), None, 0) for i in range(N)]))
        victim = redis_cluster[1]
        lost = {i for i in range(N) if t.backend._client.get_node_from_key(t.redis_key(key(i))).port == victim.port}
        assert 0 < len(lost) < N
        victim.kill()
        t0 = time.monotonic()
        values = t.get_many([key(i) for i in range(N)])
        assert time.monotonic() - t0 < 2.0
        for i, v in enumerate(values):
            if i in lost:
                assert v is None
            else:
                assert v is not None and torch.equal(v["kv"], chunk(i)["kv"])
        assert not t.available and t.usage().endpoints_down == [f"127.0.0.1:{victim.port}"]
        # one at a time, as single-key calls do: survivors hit, lost keys miss without waiting
        assert [t.get(key(i)) is not None for i in range(N)] == [i not in lost for i in range(N)]
        assert t.exists_many([key(i) for i in range(N)]) == [i not in lost for i in range(N)]
        assert t.stats.skipped >= 2 * len(lost)
        assert t.stats.corrupt == 0
        # the node returns (empty, no persistence): the tier uses it again by itself
        victim.start()
        assert wait_until(lambda: t.available, timeout=15)
        assert wait_until(lambda: t.put(key(min(lost)), chunk(min(lost))), timeout=10)
        assert torch.equal(t.get(key(min(lost)))["kv"], chunk(min(lost))["kv"])
    finally:
        t.close()
