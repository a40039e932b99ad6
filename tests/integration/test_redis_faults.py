"""Faults and hostile data: every one is a counted miss, never an exception or a wrong chunk."""
from __future__ import annotations

import struct
import time

import pytest
import redis
import torch
import xxhash

from lmcache_lab import wire
from lmcache_lab.config import RedisTierConfig
from lmcache_lab.engine import CacheEngine
from lmcache_lab.tiers import RedisTier

pytestmark = pytest.mark.redis

SHAPE = (2, 2, 16, 64)


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(f"chunk-{i}".encode())


def chunk(i: int, shape=SHAPE, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"kv": torch.randn(shape, generator=g).to(dtype)}


def tier(url: str, **kw) -> RedisTier:
    kw.setdefault("backoff_max_s", 0.2)
    return RedisTier(RedisTierConfig(url=url, **kw))


def engine(url: str, **redis_kw) -> CacheEngine:
    return CacheEngine({"chunk_size": 16, "tiers": {"cpu": {"capacity_bytes": 0},
                                                    "redis": {"url": url, "backoff_max_s": 0.2, **redis_kw}}})


TOKENS = list(range(500, 500 + 16 * 3))
KV = [chunk(100 + i)["kv"] for i in range(3)]


# ---- availability -----------------------------------------------------------------------------------
def test_down_at_start_up_serves_misses_then_reconnects_by_itself(redis_factory, wait_until):
    server = redis_factory()
    server.kill()                                  # the port is known, nothing listens on it
    eng = engine(server.url)
    try:
        redis_tier = eng.tiers[-1]
        assert not redis_tier.available
        t0 = time.monotonic()
        assert eng.lookup(TOKENS) == 0
        assert eng.store(TOKENS, KV) == 0          # refused quietly
        assert eng.retrieve(TOKENS) == []
        assert time.monotonic() - t0 < 1.0         # no request waits for the dead server
        assert redis_tier.stats.skipped > 0
        server.start()
        assert wait_until(lambda: redis_tier.available, timeout=10)
        assert eng.store(TOKENS, KV) == 3
        assert eng.lookup(TOKENS) == 48
        assert all(torch.equal(a, b) for a, b in zip(eng.retrieve(TOKENS), KV))
    finally:
        eng.close()


def test_killed_mid_run_and_restarted_nothing_raises_nothing_wrong_loads_hits_resume(redis_server, wait_until):
    eng = engine(redis_server.url)
    try:
        redis_tier = eng.tiers[-1]
        assert eng.store(TOKENS, KV) == 3 and eng.lookup(TOKENS) == 48
        redis_server.kill()
        assert eng.lookup(TOKENS) == 0             # the first failure trips the breaker
        assert eng.retrieve(TOKENS, 48) == []
        assert eng.store(TOKENS, KV) == 0
        assert redis_tier.stats.errors >= 1 and not redis_tier.available
        redis_server.start()                       # no persistence: the data is gone
        assert wait_until(lambda: redis_tier.available, timeout=10)
        assert eng.lookup(TOKENS) == 0
        assert eng.store(TOKENS, KV) == 3
        got = eng.retrieve(TOKENS, 48)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, KV))
        assert redis_tier.stats.corrupt == 0
    finally:
        eng.close()


def test_an_unresponsive_server_costs_one_timeout_then_misses_until_it_answers(redis_server, wait_until):
    t = tier(redis_server.url, timeout_s=0.2)
    try:
        assert t.put(key(0), chunk(0))
        redis_server.pause()                       # accepts connections, never answers
        t0 = time.monotonic()
        assert t.get(key(0)) is None
        assert time.monotonic() - t0 < 1.0
        assert t.stats.timeouts == 1 and not t.available
        t0 = time.monotonic()
        assert t.get(key(0)) is None and t.prefix_length([key(0)]) == 0
        assert time.monotonic() - t0 < 0.3 and t.stats.skipped == 2   # two timeouts would be 0.4 s
        redis_server.resume()
        assert wait_until(lambda: t.available, timeout=10)
        assert torch.equal(t.get(key(0))["kv"], chunk(0)["kv"])
    finally:
        t.close()


# ---- hostile or damaged values --------------------------------------------------------------------
def _good(i: int = 0, **kw) -> bytes:
    return wire.encode(key(i), kw.pop("tensors", None) or chunk(i), **kw)


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0xFF
    return bytes(b)


def _reversion(data: bytes) -> bytes:
    return data[:4] + struct.pack("<H", wire.VERSION + 1) + data[6:]


PLANTED = {
    "flipped payload byte": lambda: _flip(_good(), -100),
    "flipped header byte": lambda: _flip(_good(), 30),
    "truncated": lambda: _good()[:-1000],
    "truncated to the prefix": lambda: _good()[:10],
    "wrong version": lambda: _reversion(_good()),
    "bad magic": lambda: b"PKL!" + _good()[4:],
    "pickle": lambda: b"\x80\x04\x95" + b"\x00" * 64,
    "wrong dtype": lambda: _good(tensors={"kv": chunk(0)["kv"].half()}),            # same byte count
    "wrong dtype and size": lambda: _good(tensors={"kv": chunk(0)["kv"].float()}),
    "wrong shape": lambda: _good(tensors={"kv": chunk(0, shape=(2, 1, 8, 64))["kv"]}),   # not a tail
    "wider": lambda: _good(tensors={"kv": chunk(0, shape=(2, 2, 32, 64))["kv"]}),
    "wrong tensor name": lambda: _good(tensors={"k": chunk(0)["kv"]}),
    "another key's chunk": lambda: _good(1),
    "oversized": lambda: _good(tensors={"kv": torch.zeros(2, 2, 4096, 512, dtype=torch.bfloat16)}),
}


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_planted_values_are_counted_misses_and_removed(redis_server, kind):
    t = tier(redis_server.url)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        t.put(key(5), chunk(5))                    # the tier learns the chunk layout from its own write
        rkey = t.redis_key(key(0))
        raw.set(rkey, PLANTED[kind]())
        sent = raw.info("stats")["total_net_output_bytes"]
        assert t.contains(key(0))
        assert t.get(key(0)) is None
        assert t.stats.corrupt == 1 and t.stats.misses == 1 and t.stats.hits == 0
        assert raw.exists(rkey) == 0               # removed, so the next store rewrites it
        read = raw.info("stats")["total_net_output_bytes"] - sent
        assert read < 200_000                      # never more than one chunk's worth is read
    finally:
        raw.close()
        t.close()


def test_a_value_of_the_wrong_redis_type_is_a_counted_miss(redis_server):
    t = tier(redis_server.url)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        raw.rpush(t.redis_key(key(0)), b"x")
        assert t.get(key(0)) is None and t.stats.corrupt == 1
        assert raw.exists(t.redis_key(key(0))) == 0
    finally:
        raw.close()
        t.close()


def test_without_a_known_layout_sizes_are_capped_by_max_chunk_bytes(redis_server):
    t = tier(redis_server.url, max_chunk_bytes="64KiB")
    raw = redis.Redis.from_url(redis_server.url)
    try:
        raw.set(t.redis_key(key(0)), _good(tensors={"kv": torch.zeros(4, 2**20, dtype=torch.uint8)}))  # 4 MiB
        sent = raw.info("stats")["total_net_output_bytes"]
        assert t.get(key(0)) is None and t.stats.corrupt == 1
        assert raw.info("stats")["total_net_output_bytes"] - sent < 200_000
    finally:
        raw.close()
        t.close()


def test_an_engine_never_loads_a_planted_chunk(redis_server):
    eng = engine(redis_server.url)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        redis_tier = eng.tiers[-1]
        assert eng.store(TOKENS, KV) == 3
        keys = eng.chunk_keys(TOKENS)
        raw.set(redis_tier.redis_key(keys[1]), _flip(raw.get(redis_tier.redis_key(keys[1])), -7))
        got = eng.retrieve(TOKENS, 48)
        assert len(got) == 1 and torch.equal(got[0], KV[0])
        assert eng.stats.load_failures == 1 and redis_tier.stats.corrupt == 1
        assert eng.lookup(TOKENS) == 16            # the bad chunk is gone; the next store rewrites it
        assert eng.store(TOKENS, KV) == 1          # only the removed chunk is written again
        assert eng.lookup(TOKENS) == 48
    finally:
        raw.close()
        eng.close()
