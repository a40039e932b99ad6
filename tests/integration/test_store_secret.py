"""store_secret against a real redis-server (and a shared disk folder): values planted or altered
by anyone without the secret are counted misses, and deployments with different secrets never see
each other's chunks."""
from __future__ import annotations

import json
import os
import logging

import pytest
import redis
import torch
import xxhash

from lmcache_lab import wire
from lmcache_lab.config import load_config
from lmcache_lab.engine import CacheEngine
from lmcache_lab.keys import Namespace

pytestmark = pytest.mark.redis

CHUNK = 16
SECRET, OTHER = "first-deployment-secret-0123456789", "second-deployment-secret-987654321"
TOKENS = list(range(100, 100 + 4 * CHUNK))      # 4 full chunks
NS = Namespace(model="tiny")


def kv(i: int) -> torch.Tensor:
    return torch.randn((2, 2, CHUNK, 64), generator=torch.Generator().manual_seed(i)).bfloat16()


def engine(url: str | None = None, secret: str | None = None, disk: str | None = None) -> CacheEngine:
    tiers = {"cpu": {"capacity_bytes": 0}}       # every hit comes through the shared tier
    if url:
        tiers["redis"] = {"url": url, "timeout_s": 2.0}
    if disk:
        tiers["disk"] = {"path": disk, "capacity_bytes": "64MiB"}
    config = {"chunk_size": CHUNK, "tiers": tiers, **({"store_secret": secret} if secret else {})}
    return CacheEngine(load_config(config, environ={}), namespace=NS)


def store_all(e: CacheEngine) -> None:
    assert e.store(TOKENS, [kv(i) for i in range(4)]) == 4


def corrupt(e: CacheEngine) -> int:
    return sum(t.stats.corrupt for t in e.tiers)


def test_a_well_formed_chunk_planted_without_the_secret_under_the_looked_up_key_is_a_miss(redis_server):
    """The attacker knows the key (read from Redis, or computed) and writes a valid chunk of its
    choosing under it, with no MAC or with a MAC under another secret: the engine loads nothing."""
    e = engine(redis_server.url, SECRET)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        keys = e.chunk_keys(TOKENS)
        tier = e.tiers[0]
        for n, mac in enumerate((None, wire.mac_key(OTHER.encode())), start=1):
            raw.set(tier.redis_key(keys[0]), bytes(wire.encode(keys[0], {"kv": kv(99)}, mac_key=mac)))
            assert e.lookup(TOKENS) == CHUNK                  # present under the key ...
            assert e.retrieve(TOKENS, CHUNK) == []            # ... but never loaded
            assert corrupt(e) == n and e.stats.load_failures == n
            assert raw.exists(tier.redis_key(keys[0])) == 0   # removed, so the next store rewrites it
        store_all(e)
        loaded = e.retrieve(TOKENS)
        assert len(loaded) == 4 and all(torch.equal(loaded[i], kv(i)) for i in range(4))
    finally:
        raw.close()
        e.close()


def test_a_tampered_payload_byte_is_detected_even_with_the_checksum_fixed_up(redis_server):
    e = engine(redis_server.url, SECRET)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        store_all(e)
        rkey = e.tiers[0].redis_key(e.chunk_keys(TOKENS)[1])
        value = bytearray(raw.get(rkey))
        value[-7] ^= 0x40                                     # one bit of one KV element
        value[10:18] = xxhash.xxh3_64_intdigest(bytes(value[wire._PREFIX.size:])).to_bytes(8, "little")
        raw.set(rkey, bytes(value))
        loaded = e.retrieve(TOKENS, 4 * CHUNK)
        assert len(loaded) == 1 and torch.equal(loaded[0], kv(0))   # stops before the altered chunk
        assert corrupt(e) == 1 and e.stats.load_failures == 1 and raw.exists(rkey) == 0
    finally:
        raw.close()
        e.close()


def test_engines_with_different_secrets_on_one_redis_get_no_hits_from_each_other(redis_server):
    a, b, none = engine(redis_server.url, SECRET), engine(redis_server.url, OTHER), engine(redis_server.url)
    try:
        store_all(a)
        assert int(redis_server.cli("DBSIZE")) == 4
        assert b.lookup(TOKENS) == 0 and none.lookup(TOKENS) == 0     # not even a promised hit
        store_all(b)
        store_all(none)
        assert int(redis_server.cli("DBSIZE")) == 12                   # three disjoint key sets
        for e in (a, b, none):
            assert e.lookup(TOKENS) == 4 * CHUNK and len(e.retrieve(TOKENS)) == 4
            assert corrupt(e) == 0
    finally:
        for e in (a, b, none):
            e.close()


def test_the_secret_from_a_file_or_the_environment_is_the_same_secret(redis_server, tmp_path, monkeypatch):
    (tmp_path / "secret").write_text(SECRET + "\n")
    monkeypatch.setenv("STORE_SECRET_UNDER_TEST", SECRET)
    writer = engine(redis_server.url, SECRET)
    readers = [engine(redis_server.url, f"file:{tmp_path / 'secret'}"),
               engine(redis_server.url, "env:STORE_SECRET_UNDER_TEST")]
    try:
        store_all(writer)
        for r in readers:
            loaded = r.retrieve(TOKENS)
            assert len(loaded) == 4 and torch.equal(loaded[3], kv(3)) and corrupt(r) == 0
    finally:
        for e in (writer, *readers):
            e.close()


def test_a_shared_disk_folder_is_authenticated_the_same_way(tmp_path):
    folder = str(tmp_path / "disk")
    a, b, none = engine(secret=SECRET, disk=folder), engine(secret=OTHER, disk=folder), engine(disk=folder)
    try:
        store_all(a)
        assert b.lookup(TOKENS) == 0 and none.lookup(TOKENS) == 0
        keys = a.chunk_keys(TOKENS)
        path = a.tiers[0]._path(keys[2])
        with open(path, "wb") as fh:                                     # planted: valid, no MAC
            fh.write(wire.encode(keys[2], {"kv": kv(99)}))
        loaded = a.retrieve(TOKENS, 4 * CHUNK)
        assert len(loaded) == 2 and corrupt(a) == 1 and a.stats.load_failures == 1
        assert not os.path.exists(path)                                  # removed
    finally:
        for e in (a, b, none):
            e.close()


def test_the_secret_is_never_in_repr_logs_or_the_experiment_summary(redis_server, tmp_path, monkeypatch, caplog):
    """Experiments pass the secret through the environment: the arms' connector config and
    summary.json (the Hydra config and the arms) never hold it, nor do the tiers' warnings."""
    from omegaconf import OmegaConf

    from lmcache_lab.experiments import engine_run, report

    monkeypatch.setenv("LMCACHE_LAB_STORE_SECRET", SECRET)
    caplog.set_level(logging.DEBUG)
    cache = load_config({"chunk_size": CHUNK,
                         "tiers": {"cpu": {"capacity_bytes": 0}, "redis": {"url": redis_server.url}}})
    assert cache.store_secret.reveal() == SECRET.encode()
    e = CacheEngine(cache, namespace=NS)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        key0 = e.chunk_keys(TOKENS)[0]
        raw.set(e.tiers[0].redis_key(key0), bytes(wire.encode(key0, {"kv": kv(1)})))
        assert e.retrieve(TOKENS, CHUNK) == [] and corrupt(e) == 1           # logs a warning
        cfg = OmegaConf.create({"chunk_size": CHUNK, "tiers": {"redis": {"url": redis_server.url}},
                                "engine": {"prefix_caching": True}, "arms": ["lmcache_lab"]})
        arms = engine_run.arm_specs(cfg, cache.to_dict())
        path = report.write_summary(tmp_path, {"arms": [arm.connector for arm in arms]}, cfg)
        shown = [repr(e.config), repr(cache), json.dumps(cache.to_dict()), caplog.text, path.read_text()]
        assert caplog.text and not any(SECRET in text for text in shown)
    finally:
        raw.close()
        e.close()
