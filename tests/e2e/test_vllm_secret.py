"""vLLM engines sharing one Redis with a store secret: poisoned chunks never reach the outputs.

    ref     no connector: the reference greedy tokens
    first   secret S1 (from a file): stores the prompts' chunks in Redis
    other   secret S2 (from the environment), same Redis: sees none of first's chunks
    -- every chunk first stored is then overwritten with a well-formed chunk of random KV, as
       someone with write access to Redis but without S1 would: half without a MAC, half with a
       MAC under the attacker's own key --
    again   secret S1, a fresh process: the lookup finds the planted chunks, every load of one
            fails verification (counted), and the greedy tokens equal the reference
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from redis_servers import REDIS_SERVER, RedisProcess  # noqa: E402
from vllm_e2e import free_port, make_prompts, run_engine  # noqa: E402

from lmcache_lab import wire  # noqa: E402
from lmcache_lab.tiers.chunk_check import check_value, layout_of, value_cap  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.redis,
              pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")]

PROMPTS = make_prompts()
NAMES = list(PROMPTS)                       # long (700), diverge (550), exact (512), short (100)
S1, S2 = "first-deployment-secret-0123456789abcdef", "second-deployment-secret-0123456789abcdef"
ATTACKER_MAC = wire.mac_key(b"the attacker's own key, not S1")


def spec(model: str, connector: dict | None, port: int | None = None, env: dict | None = None) -> dict:
    ops = [{"op": "generate", "prompts": [PROMPTS[n] for n in NAMES], "max_tokens": 8, "reset_each": True}]
    if port:
        connector = {**connector, "metrics": {"port": port}}
        ops.append({"op": "scrape", "port": port})
    return {"model": model, "dtype": "float32", "connector": connector, "ops": ops, "env": env or {}}


def total(metrics: dict, name: str) -> float:
    return sum(v for k, v in metrics.items() if k.split("{")[0] == name)


def plant(client: redis.Redis) -> int:
    """Overwrite every stored chunk with a valid chunk of random KV of the same key, parent,
    position and layout; returns how many."""
    rkeys = sorted(client.scan_iter(match="lmcache_lab:*"))
    for n, rkey in enumerate(rkeys):
        value = client.get(rkey)
        hlen = wire._PREFIX.unpack_from(value)[2]
        header = json.loads(value[wire._PREFIX.size:wire._PREFIX.size + hlen])
        key = bytes.fromhex(header["key"])
        forged = {d["name"]: (torch.randn(d["shape"]) * 4).to(wire.DTYPES[d["dtype"]]) for d in header["tensors"]}
        planted = bytes(wire.encode(key, forged, bytes.fromhex(header["parent"]) if header["parent"] else None,
                                    header["position"], mac_key=ATTACKER_MAC if n % 2 else None))
        if n % 2 == 0:   # well-formed: a reader without a secret would load it
            assert check_value(planted, key, value_cap(layout_of(forged), 0), layout_of(forged))[1] is None
        client.set(rkey, planted)
    return len(rkeys)


def test_poisoned_chunks_never_load_and_other_secrets_see_nothing(tiny_model, tmp_path):
    server = RedisProcess(tmp_path / "redis", args=["--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"])
    client = redis.Redis.from_url(server.url)
    secret_file = tmp_path / "store_secret"
    secret_file.write_text(S1 + "\n")
    tiers = {"cpu": {"capacity_bytes": "64MiB"}, "redis": {"url": server.url, "timeout_s": 2.0}}
    mine = {"chunk_size": 256, "tiers": tiers, "store_secret": f"file:{secret_file}"}
    theirs = {"chunk_size": 256, "tiers": tiers, "store_secret": "env:OTHER_STORE_SECRET"}
    try:
        ref = run_engine(spec(tiny_model, None), False, tmp_path / "ref")["results"][0]
        first = run_engine(spec(tiny_model, mine), False, tmp_path / "first")["results"][0]
        assert first["tokens"] == ref["tokens"]
        assert first["num_cached_tokens"] == [0, 256, 0, 0]      # diverge shares long's first chunk
        assert int(server.cli("DBSIZE")) == 6      # long 2 chunks + a tail, diverge 1 new, exact 2

        other = run_engine(spec(tiny_model, theirs, free_port(), {"OTHER_STORE_SECRET": S2}),
                           False, tmp_path / "other")["results"]
        assert other[0]["num_cached_tokens"] == [0, 256, 0, 0]   # its own chunk only: none of first's
        assert total(other[1], "lmcache_lab_tier_corrupt_total") == 0
        assert total(other[1], "lmcache_lab_load_failures_total") == 0
        assert int(server.cli("DBSIZE")) == 12

        assert plant(client) == 12
        again = run_engine(spec(tiny_model, mine, free_port()), False, tmp_path / "again")["results"]
        assert again[0]["tokens"] == ref["tokens"]
        # long and exact are promised planted chunks by the lookup, and their loads fail
        assert total(again[1], "lmcache_lab_load_failures_total") >= 2
        assert total(again[1], "lmcache_lab_tier_corrupt_total") >= 2
        for run in ("first", "other", "again"):
            log = (tmp_path / run / "engine.log").read_text()
            assert S1 not in log and S2 not in log
    finally:
        client.close()
        server.kill()
