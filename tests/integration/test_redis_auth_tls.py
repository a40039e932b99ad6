"""Credentials, ACL users and TLS: working set-ups work; wrong ones fail at start-up, clearly and fast."""
from __future__ import annotations

import time

import pytest
import torch

from lmcache_lab.config import RedisTierConfig
from lmcache_lab.engine import CacheEngine
from lmcache_lab.tiers import RedisTier, RedisTierError

from redis_servers import ACL_PASSWORD, ACL_USER, DEFAULT_PASSWORD, HOST

pytestmark = pytest.mark.redis

CHUNK = {"kv": torch.arange(2 * 16 * 8, dtype=torch.float32).reshape(2, 16, 8)}
KEY = b"\x01" * 16


def round_trip(**cfg) -> RedisTier:
    t = RedisTier(RedisTierConfig(**cfg))
    try:
        assert t.available
        assert t.put(KEY, CHUNK)
        assert torch.equal(t.get(KEY)["kv"], CHUNK["kv"])
    finally:
        t.close()
    return t


def refused(match: str, **cfg) -> RedisTierError:
    t0 = time.monotonic()
    with pytest.raises(RedisTierError, match=match) as info:
        RedisTier(RedisTierConfig(**cfg))
    assert time.monotonic() - t0 < 3.0, "a misconfiguration must fail fast, not hang"
    return info.value


def test_acl_user_and_requirepass_work(redis_auth):
    round_trip(url=f"redis://{HOST}:{redis_auth.port}", username=ACL_USER, password=ACL_PASSWORD)
    round_trip(url=f"redis://{ACL_USER}:{ACL_PASSWORD}@{HOST}:{redis_auth.port}/0")
    round_trip(url=redis_auth.url, password=DEFAULT_PASSWORD)


@pytest.mark.parametrize("cfg", [
    {},                                                   # no password where one is required
    {"password": "wrong"},
    {"username": ACL_USER, "password": "wrong"},
    {"username": "nobody", "password": ACL_PASSWORD},
], ids=["none", "wrong-default", "wrong-acl", "unknown-user"])
def test_wrong_credentials_fail_at_start_up_with_a_clear_error(redis_auth, cfg):
    error = refused("refused our credentials", url=redis_auth.url, **cfg)
    assert "tiers.redis.username/password" in str(error)


def test_credentials_never_appear_in_the_error(redis_auth):
    error = refused("refused our credentials", url=f"redis://app:hunter2@{HOST}:{redis_auth.port}")
    assert "hunter2" not in str(error) and ":***@" in str(error)


def test_an_acl_user_without_rights_on_the_key_prefix_fails_at_start_up(redis_auth):
    refused("ACL user lacks a permission", url=redis_auth.url, username="elsewhere", password="elsewhere")


def test_a_refused_read_is_a_counted_error_not_a_corrupt_value(redis_auth):
    writer = RedisTier(RedisTierConfig(url=redis_auth.url, username=ACL_USER, password=ACL_PASSWORD))
    reader = RedisTier(RedisTierConfig(url=redis_auth.url, username="noread", password="noread"))
    try:
        assert writer.put(KEY, CHUNK) and reader.contains(KEY)
        assert reader.get(KEY) is None
        assert reader.stats.errors == 1 and reader.stats.corrupt == 0
        assert writer.contains(KEY)                      # a refusal never deletes the value
    finally:
        writer.close()
        reader.close()


def test_an_engine_does_not_start_with_wrong_credentials(redis_auth):
    with pytest.raises(RedisTierError):
        CacheEngine({"tiers": {"redis": {"url": redis_auth.url, "password": "wrong"}}})


def test_tls_with_the_servers_ca_and_a_client_certificate(redis_tls, tls_files):
    round_trip(url=redis_tls.url, ssl_ca_certs=tls_files["ca"])
    round_trip(url=redis_tls.url, ssl_ca_certs=tls_files["ca"], ssl_certfile=tls_files["cert"],
               ssl_keyfile=tls_files["key"])


def test_plain_connection_to_a_tls_server_says_tls_is_required(redis_tls):
    refused("requires TLS", url=redis_tls.url.replace("rediss://", "redis://"))


def test_tls_to_a_plain_server_says_it_does_not_speak_tls(redis_server, tls_files):
    refused("does not speak TLS", url=redis_server.url.replace("redis://", "rediss://"),
            ssl_ca_certs=tls_files["ca"], timeout_s=0.3)


def test_an_untrusted_certificate_is_a_clear_error(redis_tls):
    refused("certificate is not trusted", url=redis_tls.url)
