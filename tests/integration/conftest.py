"""Real `redis-server` processes for the Redis tier's integration tests.

Every server listens on 127.0.0.1 only, on a free port, with persistence off (`--save ""
--appendonly no`), and is killed at teardown. `RedisProcess` can be killed (SIGKILL), paused
(SIGSTOP: a server that accepts connections but never answers) and restarted on the same port, which
is how the fault tests simulate outages. Tests that need these are marked `redis` and skipped when
`redis-server` is not installed (scripts/setup.sh installs it).
"""
from __future__ import annotations

import subprocess
import time

import pytest

from redis_servers import (ACL_PASSWORD, ACL_USER, DEFAULT_PASSWORD, HOST, REDIS_CLI, REDIS_SERVER,
                           RedisProcess)


def pytest_collection_modifyitems(config, items):
    if REDIS_SERVER and REDIS_CLI:
        return
    skip = pytest.mark.skip(reason="redis-server/redis-cli not installed (run scripts/setup.sh)")
    for item in items:
        if "redis" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def redis_factory(tmp_path):
    """Start servers with `redis_factory(args=[...], tls=..., cluster=...)`; all killed after."""
    servers: list[RedisProcess] = []

    def make(**kw) -> RedisProcess:
        server = RedisProcess(tmp_path / f"redis-{len(servers)}", **kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def redis_server(redis_factory) -> RedisProcess:
    """A plain server with a 64 MiB maxmemory and LRU eviction (the configuration we document)."""
    return redis_factory(args=["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])


@pytest.fixture
def redis_auth(redis_factory) -> RedisProcess:
    """`requirepass` for the default user; ACL users: `app` (our key prefix only), `elsewhere`
    (another prefix), `noread` (our prefix, but GETRANGE denied)."""
    return redis_factory(args=["--requirepass", DEFAULT_PASSWORD,
                               "--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~lmcache_lab:*", "+@all",
                               "--user", "elsewhere", "on", ">elsewhere", "~other:*", "+@all",
                               "--user", "noread", "on", ">noread", "~lmcache_lab:*", "+@all", "-getrange"])


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> dict:
    """A self-signed certificate for 127.0.0.1 (CA = the certificate itself), made with openssl."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return {"cert": str(cert), "key": str(key), "ca": str(cert)}


@pytest.fixture
def redis_tls(redis_factory, tls_files) -> RedisProcess:
    return redis_factory(tls=tls_files)


@pytest.fixture
def redis_cluster(redis_factory):
    """Three masters, no replicas, `cluster-require-full-coverage no` (a dead node only loses its
    slots). Returns the list of nodes; the cluster is formed and all slots are served."""
    nodes = [redis_factory(cluster=True) for _ in range(3)]
    out = subprocess.run([REDIS_CLI, "--cluster", "create", *[f"{HOST}:{n.port}" for n in nodes],
                          "--cluster-replicas", "0", "--cluster-yes"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in nodes):
            return nodes
        time.sleep(0.1)
    raise RuntimeError("cluster did not reach cluster_state:ok")


def _wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture
def wait_until():
    """`wait_until(predicate, timeout)`: poll until true; returns the last answer."""
    return _wait_until


# ---- S3: moto's standalone S3 server ------------------------------------------------------------------

@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """A `moto_server` on a free loopback port with an empty bucket `cache`; AWS credentials for
    it in the environment (the tier reads the standard AWS chain). Killed after the test."""
    from s3_server import MOTO_SERVER, MotoServer, use_test_credentials

    if not MOTO_SERVER:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    use_test_credentials(monkeypatch, tmp_path)
    server = MotoServer(tmp_path / "moto")
    server.create_bucket("cache")
    yield server
    server.kill()
