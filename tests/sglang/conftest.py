"""Fixtures for the SGLang backend tests: SGLang's own factory and config classes, host pools,
and real `redis-server` processes (tests/integration/redis_servers.py).

SGLang's Python package is installed without its CUDA dependencies (scripts/setup.sh); its engine
cannot run here, but `HiCacheStorageConfig` and `StorageBackendFactory` are the real classes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory",
                    reason="SGLang's Python package is not installed (run scripts/setup.sh)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from redis_servers import REDIS_CLI, REDIS_SERVER, RedisProcess  # noqa: E402

from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402
from sglang_config import storage_config  # noqa: E402


@pytest.fixture
def make_backend():
    """`make_backend(extra, pool=..., **storage_config kwargs)`: a backend made the way SGLang
    makes it (factory, then register_mem_pool_host); all closed at teardown."""
    made = []

    def make(extra: dict | None = None, pool=None, **kw):
        backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra, **kw), pool)
        made.append(backend)
        if pool is not None:
            backend.register_mem_pool_host(pool)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def redis_server(tmp_path):
    if not (REDIS_SERVER and REDIS_CLI):
        pytest.skip("redis-server/redis-cli not installed (run scripts/setup.sh)")
    server = RedisProcess(tmp_path / "redis", args=["--maxmemory", "64mb",
                                                    "--maxmemory-policy", "allkeys-lru"])
    yield server
    server.kill()
