"""The Redis tier against a real redis-server: sharing, batches, TTL, isolation, usage, wiring."""
from __future__ import annotations

import torch
import xxhash
import pytest

from lmcache_lab.config import CacheConfig, RedisTierConfig
from lmcache_lab.tiers import RedisTier, build_tiers

from shared_engines import (check_a_fresh_engine_loads_what_another_stored,
                            check_tail_chunks_share_the_tier)

pytestmark = pytest.mark.redis

SHAPE = (2, 2, 16, 64)  # [K/V, layers, chunk tokens, heads*dim]: 8 KiB in bf16
BIG = (2, 4, 256, 256)   # 1 MiB in bf16


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(f"chunk-{i}".encode())


def chunk(i: int, shape=SHAPE, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"kv": torch.randn(shape, generator=g).to(dtype)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def tier(url: str, **kw) -> RedisTier:
    return RedisTier(RedisTierConfig(url=url, **kw))


def test_chunks_written_by_one_instance_are_seen_by_another(redis_server):
    a, b = tier(redis_server.url), tier(redis_server.url)
    try:
        assert a.available and b.available
        for i in range(3):
            assert a.put(key(i), chunk(i), key(i - 1) if i else None, i * 16)
        assert b.contains(key(1)) and not b.contains(key(7))
        assert b.prefix_length([key(0), key(1), key(2), key(3)]) == 3
        got = b.get(key(2))
        assert got is not None and same(got, chunk(2))
        assert b.stats.hits == 1 and b.stats.corrupt == 0
        assert b.get(key(9)) is None and b.stats.misses == 1
    finally:
        a.close()
        b.close()


def test_prefix_stops_at_the_first_missing_chunk(redis_server):
    t = tier(redis_server.url)
    try:
        for i in (0, 1, 3):
            t.put(key(i), chunk(i))
        assert t.prefix_length([key(i) for i in range(4)]) == 2
        assert t.prefix_length([]) == 0
        assert t.exists_many([key(0), key(2), key(3)]) == [True, False, True]
    finally:
        t.close()


def test_batches_and_a_second_writer_of_the_same_key_are_harmless(redis_server):
    a, b = tier(redis_server.url), tier(redis_server.url)
    try:
        items = [(key(i), chunk(i), None, 0) for i in range(8)]
        assert a.put_many(items) == [True] * 8
        assert a.stats.inserts == 8
        assert b.put_many(items[:4]) == [True] * 4        # already there: SET NX does nothing
        assert b.stats.inserts == 0 and b.stats.bytes_written == 0
        values = b.get_many([key(i) for i in range(10)])
        assert all(same(values[i], chunk(i)) for i in range(8))
        assert values[8] is None and values[9] is None
        assert b.stats.hits == 8 and b.stats.misses == 2
    finally:
        a.close()
        b.close()


def test_ttl_is_set_on_write_and_renewed_when_a_request_uses_the_chunk(redis_server):
    t = tier(redis_server.url, ttl_s=100)
    try:
        t.put(key(0), chunk(0))
        rkey = t.redis_key(key(0)).decode()
        assert 90 <= int(redis_server.cli("TTL", rkey)) <= 100
        redis_server.cli("EXPIRE", rkey, "5")
        t.touch([key(0), key(1)])
        assert int(redis_server.cli("TTL", rkey)) > 5
    finally:
        t.close()


def test_without_ttl_keys_do_not_expire_and_touch_keeps_them(redis_server):
    t = tier(redis_server.url)
    try:
        t.put(key(0), chunk(0))
        t.touch([key(0)])
        assert redis_server.cli("TTL", t.redis_key(key(0)).decode()) == "-1"
    finally:
        t.close()


def test_key_prefix_and_database_separate_deployments(redis_server):
    a = tier(redis_server.url, key_prefix="tenant-a")
    b = tier(redis_server.url, key_prefix="tenant-b")
    c = tier(redis_server.url, key_prefix="tenant-a", db=3)
    d = tier(redis_server.url + "/3", key_prefix="tenant-a")
    try:
        a.put(key(0), chunk(0))
        assert a.contains(key(0))
        assert not b.contains(key(0)) and not c.contains(key(0))
        c.put(key(1), chunk(1))
        assert d.contains(key(1)) and not a.contains(key(1))
        assert a.keys() == [key(0)] and c.keys() == [key(1)] and c.usage().keys == 1
        a.clear()
        assert not a.contains(key(0)) and c.contains(key(1))
    finally:
        for t in (a, b, c, d):
            t.close()


def test_usage_reports_the_servers_memory_budget(redis_server):
    t = tier(redis_server.url)
    try:
        before = t.usage()
        t.put_many([(key(i), chunk(i, shape=BIG), None, 0) for i in range(4)])  # 4 x 1 MiB
        usage = t.usage()
        assert usage.available and usage.endpoints_down == []
        assert usage.maxmemory == 64 * 2**20 and usage.maxmemory_policy == "allkeys-lru"
        assert usage.used_bytes >= before.used_bytes + 4 * 2**20
        assert t.capacity_bytes == 64 * 2**20 and t.used_bytes == usage.used_bytes
        assert usage.keys == 4 and len(t) == 4
    finally:
        t.close()


def test_chunks_larger_than_the_cap_are_refused(redis_server):
    t = tier(redis_server.url, max_chunk_bytes="4KiB")
    try:
        assert t.put(key(0), chunk(0)) is False   # 8 KiB
        assert t.stats.rejected == 1 and not t.contains(key(0))
    finally:
        t.close()


def test_a_full_server_that_does_not_evict_refuses_writes_without_raising(redis_factory):
    server = redis_factory(args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
    t = tier(server.url)
    try:
        results = [t.put(key(i), chunk(i, shape=BIG)) for i in range(6)]  # 1 MiB each
        assert results[0] is True and results[-1] is False
        assert t.stats.rejected >= 1
        assert t.get(key(0)) is not None
    finally:
        t.close()


def test_build_tiers_orders_cpu_disk_redis(redis_server, tmp_path):
    config = CacheConfig.from_dict({"tiers": {"cpu": {"capacity_bytes": "1MiB"},
                                              "disk": {"path": str(tmp_path)},
                                              "redis": {"url": redis_server.url, "key_prefix": "x"}}})
    tiers = build_tiers(config)
    try:
        assert [t.name for t in tiers] == ["cpu", "disk", "redis"]
        assert isinstance(tiers[-1], RedisTier) and tiers[-1].available
    finally:
        for t in tiers:
            t.close()


def test_a_fresh_engine_loads_what_another_engine_stored(redis_server):
    config = {"chunk_size": 16, "tiers": {"cpu": {"capacity_bytes": "1MiB"}, "redis": {"url": redis_server.url}}}
    check_a_fresh_engine_loads_what_another_stored(config, [chunk(i)["kv"] for i in range(4)])


def test_tail_chunks_live_beside_full_chunks(redis_server):
    check_tail_chunks_share_the_tier(lambda: tier(redis_server.url), chunk(0), key)


def test_large_batches_go_in_bounded_pipelines_small_ones_share_one(redis_server, monkeypatch):
    from lmcache_lab.tiers import redis as redis_tier_module

    t = tier(redis_server.url)
    calls = []
    run = t._run
    monkeypatch.setattr(t, "_run", lambda keys, command: calls.append(len(keys)) or run(keys, command))
    try:
        big = [(key(i), chunk(i, shape=BIG), None, 0) for i in range(10)]          # 1 MiB each
        assert t.put_many(big) == [True] * 10
        per_pipeline = redis_tier_module.PIPELINE_BYTES // 2**20
        assert calls == [per_pipeline] * (10 // per_pipeline) + [10 % per_pipeline] * bool(10 % per_pipeline)
        calls.clear()
        values = t.get_many([key(i) for i in range(10)])
        assert all(torch.equal(v["kv"], chunk(i, shape=BIG)["kv"]) for i, v in enumerate(values))
        assert max(calls) <= per_pipeline and sum(calls) == 10
    finally:
        t.close()
    small = tier(redis_server.url, key_prefix="small")
    calls.clear()
    run_small = small._run
    monkeypatch.setattr(small, "_run", lambda keys, command: calls.append(len(keys)) or run_small(keys, command))
    try:
        assert all(small.put_many([(key(i), chunk(i), None, 0) for i in range(40)]))   # 8 KiB each
        assert all(v is not None for v in small.get_many([key(i) for i in range(40)]))
        assert calls == [40, 40]                                 # one pipeline each way
    finally:
        small.close()


def test_unix_socket_url(redis_factory, tmp_path):
    sock = tmp_path / "redis.sock"
    redis_factory(args=["--unixsocket", str(sock), "--unixsocketperm", "700"])
    t = tier(f"unix://{sock}", db=2)
    try:
        assert t.available and t.put(key(0), chunk(0))
        assert torch.equal(t.get(key(0))["kv"], chunk(0)["kv"])
    finally:
        t.close()
