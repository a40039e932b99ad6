"""Two SGLang backends sharing pages through a real Redis; hostile values and a hung server."""
from __future__ import annotations

import time

import pytest
import redis
import torch
from host_pool import HostPool, page_indices
from test_sglang_backend import PAGE, page_hashes, pool

from lmcache_lab import wire

pytestmark = pytest.mark.redis


def redis_cfg(server, **redis_extra) -> dict:
    return {"interface_v1": 1, "tiers": {"cpu": {"capacity_bytes": "16MiB"},
                                         "redis": {"url": server.url, **redis_extra}}}


def test_two_instances_share_pages_through_redis(make_backend, redis_server):
    src, dst = pool(seed=11), pool()
    a = make_backend(redis_cfg(redis_server), pool=src)
    b = make_backend(redis_cfg(redis_server), pool=dst)      # empty CPU tier of its own
    keys = page_hashes(list(range(6 * PAGE)))
    assert b.batch_exists(keys) == 0
    assert a.batch_set_v1(keys[:4], page_indices(0, 4, PAGE)) == [True] * 4
    a.flush()                                              # slow tiers are written behind
    assert b.batch_exists(keys) == 4
    assert b.batch_get_v1(keys, page_indices(10, 6, PAGE)) == [True] * 4 + [False] * 2
    for i in range(4):
        assert torch.equal(dst.get_data_page((10 + i) * PAGE), src.get_data_page(i * PAGE))
    assert b.stats()["tiers"]["redis"]["hits"] == 4
    assert len(b.engine.tiers[0]) == 4                        # promoted into b's CPU tier
    # and the generic path of a third instance sees them too
    c = make_backend(redis_cfg(redis_server), pool=pool())
    got = c.batch_get(keys[:4])
    assert all(torch.equal(g.view(-1), src.get_data_page(i * PAGE)) for i, g in enumerate(got))


def test_corrupted_and_foreign_redis_values_are_misses(make_backend, redis_server):
    src, dst = pool(seed=12), pool()
    cfg = redis_cfg(redis_server)
    cfg["tiers"]["cpu"]["capacity_bytes"] = 0                 # Redis only: every read goes there
    a = make_backend(cfg, pool=src)
    keys = page_hashes(list(range(4 * PAGE)))
    assert a.batch_set_v1(keys, page_indices(0, 4, PAGE)) == [True] * 4
    a.flush()                                              # slow tiers are written behind
    tier = a.engine.tiers[0]
    client = redis.Redis.from_url(redis_server.url)
    rkeys = [tier.redis_key(a.tier_key(k)) for k in keys]
    good = client.get(rkeys[0])
    client.set(rkeys[1], good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit: checksum fails
    # a valid chunk of the wrong shape under the right key: decodes, but is not a page
    client.set(rkeys[2], wire.encode(a.tier_key(keys[2]), {"kv": torch.zeros(3)}))
    b = make_backend(cfg, pool=dst)
    assert b.batch_exists(keys) == 4                          # present, yet unreadable:
    assert b.batch_get_v1(keys, page_indices(0, 4, PAGE)) == [True, False, False, False]
    assert torch.count_nonzero(dst.get_data_page(PAGE)) == 0 and torch.count_nonzero(dst.get_data_page(2 * PAGE)) == 0
    assert b.stats()["tiers"]["redis"]["corrupt"] == 1
    assert client.exists(rkeys[1]) == 0                       # deleted, so the next store rewrites it
    # the wrong-shaped one is a miss on its own
    assert b.batch_get(keys[2:3]) == [None]
    assert b.stats()["backend"]["wrong_pages"] == 1
    assert b.metrics.value("lmcache_lab_load_failures_total") == 2
    # rewriting heals the chain
    assert a.batch_set_v1(keys[1:2], page_indices(1, 1, PAGE)) == [True]
    a.flush()                                              # slow tiers are written behind
    assert b.batch_get_v1(keys[:2], page_indices(8, 2, PAGE)) == [True, True]
    assert torch.equal(dst.get_data_page(9 * PAGE), src.get_data_page(PAGE))


def test_a_hung_redis_times_out_into_misses(make_backend, redis_server):
    src = pool(seed=13)
    cfg = redis_cfg(redis_server, timeout_s=5.0)              # the tier itself would wait 5 s
    cfg["tiers"]["cpu"]["capacity_bytes"] = 0
    cfg["io_timeout_s"] = 0.3
    cfg["max_pending"] = 2
    a = make_backend(cfg, pool=src)
    keys = page_hashes(list(range(2 * PAGE)))
    assert a.batch_set_v1(keys, page_indices(0, 2, PAGE)) == [True, True]
    a.flush()                                              # slow tiers are written behind
    redis_server.pause()                                      # accepts connections, never answers
    try:
        dst = HostPool(2, 64, 2, 8, PAGE)                     # same geometry: same namespace
        a.register_mem_pool_host(dst)
        t = time.perf_counter()
        assert a.batch_exists(keys) == 0
        assert a.batch_get_v1(keys, page_indices(4, 2, PAGE)) == [False, False]
        assert a.batch_get(keys) == [None, None]
        elapsed = time.perf_counter() - t
        assert elapsed < 4.0, elapsed                         # io_timeout_s, not the 5 s per read
        assert a.stats()["backend"]["timeouts"] == 2          # two operations wait on the server,
        assert a.stats()["backend"]["overloaded"] == 1        # the third is refused at once
        assert torch.count_nonzero(dst.kv_buffer) == 0
    finally:
        redis_server.resume()
    deadline = time.monotonic() + 20                          # the server answers again
    while a.batch_exists(keys) != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert a.batch_exists(keys) == 2
