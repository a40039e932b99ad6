"""The S3 tier against a real S3 API server (moto_server on loopback): round trips, prefix
semantics, isolation, outages, start-up errors, corrupted objects, concurrent writers, wiring."""
from __future__ import annotations

import threading
import time

import pytest
import torch
import xxhash

from lmcache_lab import wire
from lmcache_lab.config import S3TierConfig, load_config
from lmcache_lab.tiers import build_tiers
from lmcache_lab.tiers.s3 import S3Tier, S3TierError

from shared_engines import (check_a_fresh_engine_loads_what_another_stored,
                            check_tail_chunks_share_the_tier)

pytestmark = pytest.mark.timeout(60)

SHAPE = (2, 2, 16, 64)  # 8 KiB in bf16


def key(i: int, ns: str = "model-a") -> bytes:
    return xxhash.xxh3_128_digest(f"{ns}/chunk-{i}".encode())


def chunk(i: int, shape=SHAPE, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"kv": torch.randn(shape, generator=g).to(dtype)}


def same(a: dict | None, b: dict) -> bool:
    return a is not None and a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def make_tier(s3_server):
    tiers: list[S3Tier] = []

    def make(url: str = "s3://cache/deploy-a", **kw) -> S3Tier:
        kw.setdefault("timeout_s", 1.0)
        kw.setdefault("backoff_max_s", 0.2)
        t = S3Tier(S3TierConfig(url=url, endpoint_url=s3_server.endpoint_url, **kw))
        tiers.append(t)
        return t

    yield make
    for t in tiers:
        t.close()


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_round_trip_between_two_instances(make_tier):
    a, b = make_tier(), make_tier()
    keys = [key(i) for i in range(6)]
    assert a.put_chain(keys, [chunk(i) for i in range(6)], step=16) == 6
    got = b.get_many(keys + [key(99)])
    assert all(same(got[i], chunk(i)) for i in range(6)) and got[6] is None
    assert b.stats.hits == 6 and b.stats.misses == 1 and b.stats.corrupt == 0 and b.stats.errors == 0
    assert sorted(b.keys()) == sorted(keys) and b.count_objects() == 6 and wait_until(lambda: len(b) == 6)
    big = {"k": torch.randn(8, 256, 256), "v": torch.randn(8, 256, 256)}   # 4 MiB fp32, two tensors
    assert a.put(key(50), big) is False   # another layout than the learned one: refused
    c = make_tier("s3://cache/deploy-big")
    assert c.put(key(50), big) and same(c.get(key(50)), big)


def test_prefix_stops_at_the_first_missing_chunk(make_tier):
    t = make_tier()
    for i in (0, 1, 3):
        assert t.put(key(i), chunk(i))
    keys = [key(i) for i in range(4)]
    assert t.prefix_length(keys) == 2
    assert t.prefix_length([]) == 0
    assert t.exists_many([key(0), key(2), key(3)]) == [True, False, True]
    assert t.contains(key(3)) and not t.contains(key(2)) and key(1) in t
    assert t.delete(key(1)) and t.prefix_length(keys) == 1


def test_prefixes_and_namespaces_never_see_each_other(make_tier):
    a, b = make_tier("s3://cache/deploy-a"), make_tier("s3://cache/deploy-b")
    assert a.put(key(0), chunk(0))
    assert not b.contains(key(0)) and b.get(key(0)) is None
    assert b.put(key(0), chunk(7))   # same chunk key, other deployment
    assert same(a.get(key(0)), chunk(0)) and same(b.get(key(0)), chunk(7))
    # one prefix, two namespaces: the chunk keys differ, so do the objects
    assert a.put(key(1, "model-b"), chunk(1))
    assert a.prefix_length([key(1, "model-a")]) == 0 and a.contains(key(1, "model-b"))
    b.clear()
    assert b.count_objects() == 0 and a.count_objects() == 2


def test_server_killed_mid_run_then_restarted(make_tier, s3_server):
    t = make_tier()
    keys = [key(i) for i in range(4)]
    assert t.put_chain(keys, chunk(0)) == 4
    s3_server.kill()
    assert t.get_many(keys) == [None] * 4            # misses, no exception
    assert t.prefix_length(keys) == 0 and t.put(key(9), chunk(9)) is False
    assert t.stats.errors >= 1 and not t.available
    t0 = time.monotonic()
    assert t.get(key(0)) is None and time.monotonic() - t0 < 0.5   # breaker open: skipped at once
    assert t.stats.skipped >= 1
    s3_server.start()            # moto keeps nothing: an empty store on the same port
    s3_server.create_bucket("cache")
    assert wait_until(lambda: t.available, 10)
    assert t.put_chain(keys, chunk(0)) == 4
    assert all(same(v, chunk(0)) for v in t.get_many(keys))


def test_missing_bucket_stops_start_up(s3_server):
    with pytest.raises(S3TierError, match=r"s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        S3Tier(S3TierConfig(url="s3://no-such-bucket/x", endpoint_url=s3_server.endpoint_url))
    with pytest.raises(S3TierError, match="does not exist"):
        build_tiers(load_config({"tiers": {"cpu": {"capacity_bytes": 0}, "s3": {
            "url": "s3://no-such-bucket", "endpoint_url": s3_server.endpoint_url}}}, environ={}))


def test_missing_credentials_stop_start_up(s3_server, monkeypatch):
    # moto accepts any credentials, so refused ones cannot be shown here; absent ones can
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(S3TierError, match=r"s3://cache/p: no AWS credentials found"):
        S3Tier(S3TierConfig(url="s3://cache/p", endpoint_url=s3_server.endpoint_url))


def test_refused_credentials_stop_start_up(s3_server, tmp_path):
    # a second server that authenticates every request after the bucket is made: it knows no
    # access key, so the ones in the environment are refused
    from s3_server import MotoServer
    strict = MotoServer(tmp_path / "strict", env={"INITIAL_NO_AUTH_ACTION_COUNT": "1"})
    try:
        strict.create_bucket("cache")
        with pytest.raises(S3TierError, match=r"s3://cache/p: the store refused the credentials or access "
                                              r"to bucket 'cache' \(403\)") as e:
            S3Tier(S3TierConfig(url="s3://cache/p", endpoint_url=strict.endpoint_url))
        assert "testing" not in str(e.value)   # the secret is never in the message
    finally:
        strict.kill()


def test_unreachable_store_at_start_up_is_only_unavailable(monkeypatch):
    from s3_server import CREDENTIALS, free_port
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    t = S3Tier(S3TierConfig(url="s3://cache/p", endpoint_url=f"http://127.0.0.1:{free_port()}", timeout_s=0.5))
    try:
        assert not t.available and t.get(key(0)) is None and t.put(key(0), chunk(0)) is False
    finally:
        t.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "foreign", "oversized", "empty"])
def test_bad_objects_are_counted_misses_and_deleted(make_tier, s3_server, damage):
    t = make_tier()
    t.expect_layout(chunk(0))
    good = bytes(wire.encode(key(0), chunk(0)))
    data = {"garbage": b"not a chunk at all" * 100,
            "truncated": good[:len(good) // 2],
            "flipped": good[:-1] + bytes([good[-1] ^ 1]),
            "foreign": bytes(wire.encode(key(1), chunk(1))),   # a valid chunk of another key
            "oversized": bytes(wire.encode(key(0), chunk(0, shape=(2, 2, 64, 64)))),
            "empty": b""}[damage]
    raw = s3_server.client()
    raw.put_object(Bucket="cache", Key=t.object_key(key(0)), Body=data)
    assert t.get(key(0)) is None
    assert t.stats.corrupt == 1 and t.stats.misses == 1 and t.stats.hits == 0
    assert not t.contains(key(0))    # deleted: the next store rewrites it
    assert t.put(key(0), chunk(0)) and same(t.get(key(0)), chunk(0))


def test_tail_chunks_live_beside_full_chunks(make_tier):
    check_tail_chunks_share_the_tier(make_tier, chunk(0), key)


def test_concurrent_writers_of_one_key(make_tier):
    writers = [make_tier(max_connections=4) for _ in range(3)]
    reader = make_tier()
    values = [chunk(100 + w) for w in range(3)]   # distinct values under one key: worst case
    stop = threading.Event()
    seen, bad = [], []

    def write(w):
        while not stop.is_set():
            writers[w].put_many([(key(0), values[w], None, 0)])

    def read():
        while not stop.is_set():
            got = reader.get(key(0))
            if got is not None:
                (seen if any(same(got, v) for v in values) else bad).append(got)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)] + [threading.Thread(target=read)]
    for th in threads:
        th.start()
    time.sleep(2.0)
    stop.set()
    for th in threads:
        th.join(timeout=10)
    # moto answers some racing requests with HTTP 500: those are counted errors (misses), never
    # a partial value
    assert not bad and seen and reader.stats.corrupt == 0
    assert any(same(reader.get(key(0)), v) for v in values)


def test_config_keys_and_wiring(s3_server):
    env = {"LMCACHE_LAB_TIERS__S3__URL": "s3://cache/from-env",
           "LMCACHE_LAB_TIERS__S3__ENDPOINT_URL": s3_server.endpoint_url,
           "LMCACHE_LAB_TIERS__S3__CAPACITY_BYTES": "1GiB",
           "LMCACHE_LAB_TIERS__CPU__CAPACITY_BYTES": "1MiB"}
    config = load_config(None, environ=env)
    assert config.tiers.s3.capacity_bytes == 2**30 and config.tiers.s3.prefix == "from-env/"
    assert "testing" not in repr(config) and "testing" not in str(config.to_dict())
    tiers = build_tiers(config)
    try:
        assert [t.name for t in tiers] == ["cpu", "s3"] or tiers[-1].name == "s3"
        s3 = tiers[-1]
        assert s3.capacity_bytes == 2**30 and s3.put(key(0), chunk(0)) and same(s3.get(key(0)), chunk(0))
    finally:
        for t in tiers:
            t.close()


def test_a_fresh_engine_loads_what_another_engine_stored(s3_server):
    from lmcache_lab.engine import CacheEngine

    config = {"chunk_size": 16, "tiers": {"cpu": {"capacity_bytes": "1MiB"}, "s3": {
        "url": "s3://cache/engines", "endpoint_url": s3_server.endpoint_url, "backoff_max_s": 0.2}}}
    tokens = check_a_fresh_engine_loads_what_another_stored(config, [chunk(i)["kv"] for i in range(4)])
    s3_server.kill()          # the store goes away: a fresh engine only misses
    third = CacheEngine(config)
    try:
        assert third.lookup(tokens) == 0 and third.retrieve(tokens) == []
    finally:
        third.close()


def test_values_are_authenticated_with_a_store_secret(make_tier, s3_server):
    """With a MAC key every object carries its tag; an object without it, or tagged under another
    secret, is a counted miss and deleted, never loaded."""
    mine, theirs = wire.mac_key(b"a deployment secret, 32 bytes.."), wire.mac_key(b"another secret")
    writer = make_tier(url="s3://cache/shared")
    writer.mac_key = mine
    assert writer.put(key(1), chunk(1))
    reader = make_tier(url="s3://cache/shared")
    reader.mac_key = mine
    assert same(reader.get(key(1)), chunk(1))
    for planter_key in (None, theirs):            # a writer without the secret, or with another
        planter = make_tier(url="s3://cache/shared")
        planter.mac_key = planter_key
        assert planter.put(key(2), chunk(2))
        corrupt = reader.stats.corrupt
        assert reader.get(key(2)) is None and reader.stats.corrupt == corrupt + 1
        assert not reader.contains(key(2))        # deleted, so a rightful store rewrites it


def test_an_engine_with_a_store_secret_authenticates_its_s3_tier(s3_server, monkeypatch):
    from lmcache_lab.engine import CacheEngine

    monkeypatch.setenv("TEST_STORE_SECRET", "a deployment secret of 32 bytes")
    config = {"chunk_size": 16, "store_secret": "env:TEST_STORE_SECRET",
              "tiers": {"cpu": {"capacity_bytes": "1MiB"}, "s3": {
                  "url": "s3://cache/secret", "endpoint_url": s3_server.endpoint_url}}}
    tokens = list(range(3000, 3000 + 16 * 2 + 1))
    writer, reader = CacheEngine(config), CacheEngine(config)
    try:
        assert writer.tiers[-1].mac_key is not None
        assert writer.store(tokens, [chunk(i)["kv"] for i in range(2)]) == 2
        assert reader.lookup(tokens) == 32 and len(reader.retrieve(tokens)) == 2
    finally:
        writer.close()
        reader.close()


def test_a_chain_is_fetched_and_probed_concurrently(make_tier):
    t = make_tier()
    keys = [key(i) for i in range(4)]
    assert t.put_chain(keys, [chunk(i) for i in range(4)]) == 4
    for op in ("GetObject", "HeadObject"):
        # every request waits until all four are in flight: serial requests would break the barrier
        barrier = threading.Barrier(4, timeout=5)

        def hook(barrier=barrier, **kw):
            barrier.wait()   # returns None: a value from a before-send hook would replace the response
        t.client.meta.events.register(f"before-send.s3.{op}", hook)
        try:
            if op == "GetObject":
                assert all(same(v, chunk(i)) for i, v in enumerate(t.get_many(keys)))
            else:
                assert t.prefix_length(keys) == 4
        finally:
            t.client.meta.events.unregister(f"before-send.s3.{op}", hook)
    assert t.stats.errors == 0


@pytest.mark.parametrize("bad, message", [
    ({"url": "http://bucket/x"}, "must be s3://bucket"),
    ({"url": "s3://Bad_Bucket"}, "must be s3://bucket"),
    ({"url": "s3://ok-bucket", "endpoint_url": "minio:9000"}, "must start with http"),
    ({"url": "s3://ok-bucket", "timeout_s": 0}, "timeout_s: must be > 0"),
    ({"url": "s3://ok-bucket", "max_connections": 0}, "max_connections"),
    ({"url": "s3://ok-bucket", "max_chunk_bytes": "lots"}, "max_chunk_bytes"),
])
def test_invalid_config_is_refused_with_the_key(bad, message):
    from lmcache_lab.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        load_config({"tiers": {"s3": bad}}, environ={})
    ok = load_config({"tiers": {"s3": {"url": "s3://ok-bucket/a/b/", "max_chunk_bytes": "8MiB"}}}, environ={})
    assert (ok.tiers.s3.bucket, ok.tiers.s3.prefix, ok.tiers.s3.max_chunk_bytes) == ("ok-bucket", "a/b/", 8 * 2**20)
    assert load_config({}, environ={}).tiers.s3.url is None   # off by default


def test_an_engine_rides_out_an_outage_then_hits_resume(s3_server, wait_until):
    from lmcache_lab.engine import CacheEngine

    config = {"chunk_size": 16, "tiers": {"cpu": {"capacity_bytes": 0}, "s3": {
        "url": "s3://cache/outage", "endpoint_url": s3_server.endpoint_url, "timeout_s": 1.0,
        "backoff_max_s": 0.2}}}
    tokens = list(range(2000, 2000 + 16 * 3 + 1))
    kv = [chunk(i)["kv"] for i in range(3)]
    engine = CacheEngine(config)
    try:
        s3 = engine.tiers[-1]
        assert engine.store(tokens, kv) == 3 and engine.lookup(tokens) == 48
        s3_server.kill()
        # nothing raises into the engine: every operation answers as a miss
        assert engine.lookup(tokens) == 0 and engine.retrieve(tokens) == []
        assert engine.store(tokens, kv) == 0
        assert s3.stats.errors >= 1
        s3_server.start()          # an empty store on the same port
        s3_server.create_bucket("cache")
        assert wait_until(lambda: s3.available, 10)
        assert engine.lookup(tokens) == 0           # the outage lost the objects: misses
        assert engine.store(tokens, kv) == 3 and engine.lookup(tokens) == 48
        got = engine.retrieve(tokens)
        assert len(got) == 3 and all(torch.equal(g, k) for g, k in zip(got, kv))
    finally:
        engine.close()
