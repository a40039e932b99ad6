"""tiers.redis options: validated at start-up with a ConfigError that names the key."""
from __future__ import annotations

import pytest

from lmcache_lab.config import CacheConfig, ConfigError, RedisTierConfig


def redis(**kw) -> RedisTierConfig:
    return CacheConfig.from_dict({"tiers": {"redis": kw}}).tiers.redis


def test_defaults_leave_the_tier_off():
    cfg = RedisTierConfig()
    assert cfg.url is None and cfg.key_prefix == "lmcache_lab" and not cfg.cluster
    assert cfg.timeout_s > 0 and cfg.ttl_s is None and cfg.max_chunk_bytes == 256 * 2**20


def test_valid_options_are_kept_and_sizes_parsed():
    cfg = redis(url="rediss://h:6380/2", username="u", password="p", ssl_ca_certs="/ca.pem",
                ssl_certfile="/c.pem", ssl_keyfile="/k.pem", ttl_s=60, db=3, max_chunk_bytes="64MiB",
                capacity_bytes="1GiB", key_prefix="tenant-a:{x}")
    assert cfg.max_chunk_bytes == 64 * 2**20 and cfg.capacity_bytes == 2**30 and cfg.db == 3
    assert redis(url="redis://h:7000", cluster=True).cluster


@pytest.mark.parametrize("kw, key", [
    ({"url": "http://h"}, "tiers.redis.url"),
    ({"url": "redis://h", "timeout_s": 0}, "tiers.redis.timeout_s"),
    ({"url": "redis://h", "backoff_max_s": -1}, "tiers.redis.backoff_max_s"),
    ({"url": "redis://h", "ttl_s": 0}, "tiers.redis.ttl_s"),
    ({"url": "redis://h", "ttl_s": 1.5}, "tiers.redis.ttl_s"),
    ({"url": "redis://h", "db": -1}, "tiers.redis.db"),
    ({"url": "redis://h", "cluster": True, "db": 2}, "tiers.redis.db"),
    ({"url": "unix:///tmp/r.sock", "cluster": True}, "tiers.redis.cluster"),
    ({"url": "redis://h", "key_prefix": ""}, "tiers.redis.key_prefix"),
    ({"url": "redis://h", "key_prefix": "a b"}, "tiers.redis.key_prefix"),
    ({"url": "redis://h", "ssl_ca_certs": "/ca.pem"}, "tiers.redis.ssl_ca_certs"),
    ({"url": "rediss://h", "ssl_certfile": "/c.pem"}, "tiers.redis.ssl_certfile"),
    ({"url": "redis://h", "max_chunk_bytes": 0}, "tiers.redis.max_chunk_bytes"),
    ({"url": "redis://h", "max_chunk_bytes": "lots"}, "tiers.redis.max_chunk_bytes"),
    ({"url": "redis://h", "maxmemory": "1GiB"}, "tiers.redis.maxmemory"),
])
def test_invalid_options_fail_with_the_key_named(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        redis(**kw)
