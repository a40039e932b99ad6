"""vLLM engine processes sharing one S3 bucket (a real moto_server on loopback).

Engine A stores its prompts' chunks into the bucket. Engine B, a new process with an empty memory
tier and no disk tier, gets every cached token it reports through S3, and its greedy tokens equal
A's. Engine C starts after the server is killed: it runs, gets no hit from S3, and its tokens still
equal A's. The engines' metrics show where the tokens came from.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from s3_server import MOTO_SERVER, MotoServer, use_test_credentials  # noqa: E402
from vllm_e2e import free_port, loadable, make_prompts, run_engine  # noqa: E402

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(MOTO_SERVER is None, reason="moto_server not installed (moto[server])")]

PROMPTS = make_prompts()
NAMES = list(PROMPTS)                       # long (700), diverge (550), exact (512), short (100)
CHUNK = 256


def test_engines_share_chunks_through_a_bucket_and_only_miss_when_it_is_gone(tiny_model, tmp_path,
                                                                             monkeypatch):
    use_test_credentials(monkeypatch, tmp_path)   # the engine processes inherit this environment
    server = MotoServer(tmp_path / "moto")
    try:
        server.create_bucket("cache")
        tiers = {"cpu": {"capacity_bytes": "64MiB"}, "s3": {
            "url": "s3://cache/e2e", "endpoint_url": server.endpoint_url, "timeout_s": 2.0,
            "backoff_max_s": 0.5}}

        def engine(name: str) -> tuple[dict, dict]:
            """One engine process: its generate result and its metrics scraped after it."""
            port = free_port()
            spec = {"model": tiny_model, "dtype": "float32",
                    "connector": {"chunk_size": CHUNK, "tiers": tiers, "metrics": {"port": port}},
                    "ops": [{"op": "generate", "prompts": [PROMPTS[n] for n in NAMES], "max_tokens": 8,
                             "reset_each": True}, {"op": "scrape", "port": port}]}
            generated, metrics = run_engine(spec, False, tmp_path / name)["results"]
            return generated, metrics

        first, _ = engine("first")
        assert first["num_cached_tokens"] == [0, 256, 0, 0]   # diverge shares long's first chunk
        # long 2 chunks and a 1-block tail chunk, diverge 1 new, exact 2
        assert server.count_objects("cache", "e2e/") == 6

        second, metrics = engine("second")
        assert second["num_cached_tokens"] == [loadable(len(PROMPTS[n]), CHUNK)
                                               for n in NAMES] == [640, 512, 384, 0]
        assert second["tokens"] == first["tokens"]
        # long's 2 chunks and tail and exact's 2 exist only in S3 (diverge's one may come from
        # the copy promoted into memory)
        assert metrics['lmcache_lab_tier_requests_total{result="hit",tier="s3"}'] >= 5
        assert metrics["lmcache_lab_hit_tokens_total"] == sum(second["num_cached_tokens"])
        assert metrics['lmcache_lab_tier_op_seconds_count{op="get",tier="s3"}'] >= 1

        server.kill()
        third, metrics = engine("third")
        assert third["num_cached_tokens"] == first["num_cached_tokens"]   # only its own memory tier
        assert third["tokens"] == first["tokens"]
        assert metrics["lmcache_lab_hit_tokens_total"] == 256             # looked up, missed in S3
        assert metrics["lmcache_lab_lookup_tokens_total"] >= 512 + 512 + 256
        assert metrics.get('lmcache_lab_tier_requests_total{result="hit",tier="s3"}', 0) == 0
    finally:
        server.kill()
