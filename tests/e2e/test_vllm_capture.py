"""Capture live traffic of a real vLLM engine and replay it: the replay, with the capturing
run's capacity and policy, gives the connector's measured token hit rate.

One engine (CPU, in-process, vLLM's own prefix cache off so every cached token is the
connector's), chunk 256, a CPU tier of 6 chunks (it evicts), capture on; chat-like prompts over a
few shared documents, one at a time. Then `python -m lmcache_lab.run experiment=replay` on the
captured trace with the same capacity and policy.

The engine runs without tail chunks (`tail_blocks: false`): a Mooncake trace has one id per
chunk, so a prompt's blocks past its last full chunk have none, and the replay models the
connector's full chunks only (docs/observability.md).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_e2e import free_port, loadable, run_engine

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 256
TOLERANCE = 0.01          # the bound: within 1 percentage point


def prompts(seed: int = 0, n: int = 24) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(10, 4000, CHUNK * k).tolist() for k in (3, 5, 4)]
    out = []
    for _ in range(n):
        doc = docs[rng.integers(len(docs))]
        depth = int(rng.integers(1, len(doc) // CHUNK + 1)) * CHUNK
        out.append(doc[:depth] + rng.integers(10, 4000, int(rng.integers(1, 200))).tolist())
    return out


@pytest.fixture(scope="module")
def captured(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    port, trace = free_port(), root / "cap.jsonl"
    ps = prompts()
    spec = {"model": tiny_model, "dtype": "float32", "enable_prefix_caching": False,
            "connector": {"chunk_size": CHUNK, "policy": {"name": "lru"}, "tail_blocks": False,
                          "tiers": {"cpu": {"capacity_bytes": 6 * 512 * 1024}},
                          "metrics": {"port": port}, "trace": {"path": str(trace)}},
            "ops": [{"op": "generate", "prompts": ps, "max_tokens": 4, "sequential": True},
                    {"op": "scrape", "port": port}]}
    out = run_engine(spec, False, root / "engine")
    return ps, out, trace, root


def test_replay_of_the_captured_trace_gives_the_live_token_hit_rate(captured):
    ps, out, trace, root = captured
    gen, m = out["results"]
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    meta = {k: v for x in lines if "lmcache_lab_trace" in x for k, v in x["lmcache_lab_trace"].items()}
    records = [x for x in lines if "hash_ids" in x]
    assert [r["input_length"] for r in records] == [len(p) for p in ps]
    assert all(len(r["hash_ids"]) == len(p) // CHUNK for r, p in zip(records, ps))
    assert meta["chunk_tokens"] == CHUNK and meta["chunk_bytes"] > 0
    assert m['lmcache_lab_evictions_total{tier="cpu"}'] > 0       # the tier was small enough
    lookup, hit = m["lmcache_lab_lookup_tokens_total"], m["lmcache_lab_hit_tokens_total"]
    assert lookup == sum(loadable(len(p), CHUNK, tails=False) for p in ps)
    assert hit == sum(gen["num_cached_tokens"])
    live = hit / lookup
    assert 0.05 < live < 0.95

    run = root / "replay"
    res = subprocess.run(
        [sys.executable, "-m", "lmcache_lab.run", "experiment=replay", "policy=lru",
         f"workload.trace={trace}", f"tiers.cpu.capacity_bytes={6 * 512 * 1024}",
         "progress=false", f"hydra.run.dir={run}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    replayed = json.loads((run / "summary.json").read_text())["token_hit_rate"]
    print(f"token hit rate: live {live:.4f}, replayed {replayed:.4f}")
    assert abs(replayed - live) <= TOLERANCE, (replayed, live)


def test_miss_reasons_add_up_to_the_tokens_not_served(captured):
    _, out, _, _ = captured
    m = out["results"][1]
    misses = {k: v for k, v in m.items() if k.startswith("lmcache_lab_miss_tokens_total{")}
    lookup, hit = m["lmcache_lab_lookup_tokens_total"], m["lmcache_lab_hit_tokens_total"]
    assert sum(misses.values()) == lookup - hit
    assert misses['lmcache_lab_miss_tokens_total{reason="never_stored",tier=""}'] > 0
    assert misses['lmcache_lab_miss_tokens_total{reason="evicted",tier="cpu"}'] > 0
