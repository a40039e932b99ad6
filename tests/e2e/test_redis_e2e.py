"""Two vLLM engine processes, same model, same Redis: the second one loads the first one's chunks.

The second engine has an empty memory tier and no disk tier, so every cached token it reports
came through Redis; its greedy tokens must equal the first engine's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from redis_servers import REDIS_SERVER, RedisProcess  # noqa: E402
from vllm_e2e import loadable, make_prompts, run_engine  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.redis,
              pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")]

PROMPTS = make_prompts()
NAMES = list(PROMPTS)                       # long (700), diverge (550), exact (512), short (100)
CHUNK = 256


def test_second_engine_process_gets_hits_through_redis_and_the_same_tokens(tiny_model, tmp_path):
    server = RedisProcess(tmp_path / "redis", args=["--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"])
    try:
        config = {"chunk_size": CHUNK, "tiers": {"cpu": {"capacity_bytes": "64MiB"},
                                                 "redis": {"url": server.url, "timeout_s": 2.0}}}
        spec = {"model": tiny_model, "dtype": "float32", "connector": config,
                "ops": [{"op": "generate", "prompts": [PROMPTS[n] for n in NAMES], "max_tokens": 8,
                         "reset_each": True}]}
        first = run_engine(spec, False, tmp_path / "first")["results"][0]
        stored = int(server.cli("DBSIZE"))
        assert stored == 6                  # long 2 chunks + a 1-block tail, diverge 1 new, exact 2
        second = run_engine(spec, False, tmp_path / "second")["results"][0]
        assert second["num_cached_tokens"] == [loadable(len(PROMPTS[n]), CHUNK)
                                               for n in NAMES] == [640, 512, 384, 0]
        assert second["tokens"] == first["tokens"]
        assert first["num_cached_tokens"] == [0, 256, 0, 0]   # diverge shares long's first chunk
    finally:
        server.kill()
