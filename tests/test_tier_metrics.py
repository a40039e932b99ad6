"""Per-tier Prometheus metrics of the remote tiers, against real servers (moto_server for S3,
redis-server for Redis): reads by result, bytes, errors, corrupt values and per-operation latency
histograms travel from a worker's tiers through `DeltaTracker`/`MetricsDelta` into `CacheMetrics`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
from redis_servers import REDIS_SERVER, RedisProcess  # noqa: E402
from s3_server import MOTO_SERVER, MotoServer, use_test_credentials  # noqa: E402

from lmcache_lab.engine import CacheEngine  # noqa: E402
from lmcache_lab.metrics import CacheMetrics, DeltaTracker, MetricsDelta  # noqa: E402

pytestmark = pytest.mark.timeout(120)

CHUNK = 16
TOKENS = list(range(1000, 1000 + CHUNK * 4 + 5))   # 4 full chunks


class S3Store:
    name = "s3"

    def __init__(self, tmp_path, monkeypatch):
        use_test_credentials(monkeypatch, tmp_path)
        self.server = MotoServer(tmp_path / "moto")
        self.server.create_bucket("cache")
        self.tier_config = {"url": "s3://cache/metrics", "endpoint_url": self.server.endpoint_url,
                            "timeout_s": 1.0, "backoff_max_s": 0.2}

    def plant_garbage(self, tier, key: bytes) -> None:
        self.server.client().put_object(Bucket="cache", Key=tier.object_key(key), Body=b"x" * 100)

    def kill(self) -> None:
        self.server.kill()


class RedisStore:
    name = "redis"

    def __init__(self, tmp_path, monkeypatch):
        self.server = RedisProcess(tmp_path / "redis")
        self.tier_config = {"url": self.server.url, "timeout_s": 1.0, "backoff_max_s": 0.2}

    def plant_garbage(self, tier, key: bytes) -> None:
        self.server.cli("SET", tier.redis_key(key).decode(), "x" * 100)

    def kill(self) -> None:
        self.server.kill()


@pytest.fixture(params=["s3", "redis"])
def store(request, tmp_path, monkeypatch):
    if request.param == "s3" and MOTO_SERVER is None:
        pytest.skip("moto_server not installed (moto[server])")
    if request.param == "redis" and REDIS_SERVER is None:
        pytest.skip("redis-server not installed")
    s = (S3Store if request.param == "s3" else RedisStore)(tmp_path, monkeypatch)
    yield s
    s.kill()


def engine(store) -> CacheEngine:
    return CacheEngine({"chunk_size": CHUNK, "tiers": {"cpu": {"capacity_bytes": "1MiB"},
                                                       store.name: store.tier_config}})


def kv(i: int) -> torch.Tensor:
    return torch.randn((2, 2, CHUNK, 64), generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)


def test_remote_tier_metrics_count_reads_bytes_faults_and_time_each_batch(store):
    writer, reader = engine(store), engine(store)
    try:
        w_metrics, w_tracker = CacheMetrics(), DeltaTracker()
        assert writer.store(TOKENS, [kv(i) for i in range(4)]) == 4
        w_metrics.apply(w_tracker.take(writer))
        written = writer.tiers[-1].stats.bytes_written
        assert written > 4 * kv(0).nbytes   # the wire format's headers on top of the payload
        assert w_metrics.value("lmcache_lab_tier_written_bytes_total", tier=store.name) == written
        assert w_metrics.value("lmcache_lab_tier_op_seconds_count", tier=store.name, op="put") >= 1

        metrics, tracker = CacheMetrics(), DeltaTracker()
        assert reader.lookup(TOKENS) == 4 * CHUNK
        assert len(reader.retrieve(TOKENS)) == 4          # four hits from the remote tier
        metrics.apply(tracker.take(reader))
        tier = reader.tiers[-1]
        value = lambda name, **labels: metrics.value(f"lmcache_lab_tier_{name}", tier=store.name, **labels)  # noqa: E731
        assert value("requests_total", result="hit") == 4
        assert value("read_bytes_total") == written       # the same objects, read back
        assert value("op_seconds_count", op="lookup") >= 1 and value("op_seconds_count", op="get") >= 1
        gets = value("op_seconds_count", op="get")

        keys = reader.chunk_keys(TOKENS)
        store.plant_garbage(tier, keys[1])
        missing = reader.chunk_keys(list(range(5000, 5000 + CHUNK)))[0]
        assert tier.get_many([keys[1], missing]) == [None, None]   # one batch: corrupt, absent
        metrics.apply(tracker.take(reader))
        assert value("requests_total", result="miss") == 2 and value("corrupt_total") == 1
        assert value("op_seconds_count", op="get") == gets + 1    # one batch, one sample
        assert value("op_seconds_sum", op="get") > 0
        assert value("errors_total") == 0

        store.kill()
        assert tier.get(keys[0]) is None                          # a fault: a counted miss
        metrics.apply(tracker.take(reader))
        assert value("errors_total") >= 1 and value("requests_total", result="miss") == 3
        assert value("requests_total", result="hit") == 4
        assert tracker.take(reader) is None                       # nothing new since
    finally:
        writer.close()
        reader.close()


def test_deltas_of_several_workers_add_per_tier_and_keep_the_newest_samples():
    a = MetricsDelta(tier_counts={"s3": {"hits": 2, "bytes_read": 100}},
                     tier_seconds={"s3": {"get": [0.01] * 200}})
    b = MetricsDelta(tier_counts={"s3": {"hits": 1, "errors": 1}, "cpu": {"misses": 3}},
                     tier_seconds={"s3": {"get": [0.02] * 100, "put": [0.5]}})
    both = a.aggregate(b)
    assert both.tier_counts == {"s3": {"hits": 3, "bytes_read": 100, "errors": 1}, "cpu": {"misses": 3}}
    assert both.tier_seconds["s3"]["get"] == [0.01] * 156 + [0.02] * 100   # MAX_SAMPLES newest
    assert both.tier_seconds["s3"]["put"] == [0.5]
    metrics = CacheMetrics()
    metrics.apply(both)
    assert metrics.value("lmcache_lab_tier_requests_total", tier="cpu", result="miss") == 3
    assert metrics.value("lmcache_lab_tier_errors_total", tier="s3") == 1
    assert metrics.value("lmcache_lab_tier_op_seconds_count", tier="s3", op="get") == 256
    assert metrics.value("lmcache_lab_tier_op_seconds_bucket", tier="s3", op="put", le="0.5") == 1
    assert not both.is_empty() and MetricsDelta().is_empty()
