"""Trace capture: the connector's requests as a Mooncake trace, and its replay predicting the
live cache's token hit rate."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcache_lab.cost import LLAMA3_8B
from lmcache_lab.engine import CacheEngine
from lmcache_lab.experiments.replay import replay, replay_tier
from lmcache_lab.experiments.trace import load_trace, trace_meta
from lmcache_lab.integrations.vllm_cache import WorkerCache
from lmcache_lab.integrations.vllm_plan import Planner, servable_tokens
from lmcache_lab.keys import ChunkKeyer, Namespace
from lmcache_lab.policies import make_policy
from lmcache_lab.observe import TraceWriter, trace_id

CS, BS = 16, 4
CHUNK = torch.zeros(2, 1, CS, 4)
ROOT = Path(__file__).resolve().parents[1]


def keyer() -> ChunkKeyer:
    return ChunkKeyer(Namespace(model="trace"), CS)


def prompts(seed: int = 0, n: int = 120) -> list[np.ndarray]:
    """Chat-like prompts: a few shared documents cut at random depths, distinct tails."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 1000, CS * k) for k in (3, 6, 10, 4)]
    out = []
    for _ in range(n):
        doc = docs[rng.integers(len(docs))][:CS * int(rng.integers(1, 11))]
        out.append(np.concatenate([doc, rng.integers(1000, 2000, int(rng.integers(1, 3 * CS)))]))
    return out


def test_the_trace_holds_chunk_ids_lengths_and_metadata_not_tokens(tmp_path):
    path = tmp_path / "cap.jsonl"
    w = TraceWriter(path, keyer(), {"chunk_tokens": CS, "block_size": BS})
    a = list(range(100, 100 + 3 * CS + 5))
    b = a[:2 * CS] + [7] * (CS + 3)
    w.submit(w._t0 + 0.5, a, (), 4)
    w.submit(w._t0 + 1.5, b, (), 9)
    w.chunk_bytes(4096)
    w.flush()
    w.close()
    reqs = load_trace(str(path))
    assert [(r.input_length, r.output_length) for r in reqs] == [(len(a), 4), (len(b), 9)]
    assert [r.timestamp_ms for r in reqs] == [500.0, 1500.0]
    ka = [trace_id(k) for k in keyer().keys(a)]
    assert reqs[0].hash_ids == tuple(ka) and len(ka) == 3
    assert reqs[1].hash_ids[:2] == reqs[0].hash_ids[:2] and reqs[1].hash_ids[2] != ka[2]
    assert trace_meta(str(path)) == {"version": 1, "chunk_tokens": CS, "block_size": BS,
                                     "chunk_bytes": 4096}
    text = path.read_text()
    assert "100, 101, 102" not in text and "prompt" not in text


def test_a_full_queue_drops_records_and_never_waits(tmp_path):
    gate = threading.Event()

    class SlowKeyer:
        def keys(self, tokens, identity=()):
            gate.wait(30)
            return keyer().keys(tokens)

    w = TraceWriter(tmp_path / "t.jsonl", SlowKeyer(), {}, max_pending=1)
    for _ in range(5):                 # one in the thread (stalled), one queued, three dropped
        w.submit(0.0, list(range(40)), (), 1)
    assert w.dropped >= 3
    gate.set()
    w.flush()
    w.close()
    assert w.written + w.dropped == 5 and w.written >= 1


def test_sampling_keeps_requests_by_their_first_chunk(tmp_path):
    w = TraceWriter(tmp_path / "s.jsonl", keyer(), {}, sample=0.5)
    ps = prompts(1, 200)
    for p in ps:
        w.submit(0.0, p.tolist(), (), 1)
    w.flush()
    w.close()
    kept = {r.hash_ids[0] for r in load_trace(str(tmp_path / "s.jsonl")) if r.hash_ids}
    firsts = {trace_id(keyer().keys(p)[0]) for p in ps if len(p) >= CS}
    assert kept == {i for i in firsts if i / 2**63 < 0.5} and 0 < len(kept) < len(firsts)
    with pytest.raises(ValueError, match="trace.sample"):
        TraceWriter(tmp_path / "x.jsonl", keyer(), {}, sample=0.0)


def live(ps: list[np.ndarray], policy: str, capacity: int, path: Path) -> float:
    """The connector's calls for each request, one after another (lookup, load of the accepted
    hit, stores of the computed chunks, end), with the capture on; its token hit rate."""
    cache = WorkerCache(CacheEngine({"chunk_size": CS, "policy": {"name": policy},
                                     "tiers": {"cpu": {"capacity_bytes": capacity}}},
                                    namespace=Namespace(model="m")))
    planner = Planner(CS, BS, lambda rid, p, m, s, i: cache.answer(rid, np.asarray(p), m, s, i)[:2])
    writer = TraceWriter(path, keyer(), {"chunk_tokens": CS, "block_size": BS,
                                         "policy": policy, "capacity_bytes": capacity})
    writer.chunk_bytes(CHUNK.nbytes)
    lookup = hit = 0
    for r, p in enumerate(ps):
        rid = f"r{r}"
        ext, _ = planner.match(rid, p.tolist(), 0)
        planner.allocated(rid, ext)
        if ext:
            hit += min(ext, len(cache.read(rid, 0, -(-ext // CS))) * CS)
        lookup += servable_tokens(len(p), CS, BS)
        keys, missing = cache.missing(rid, 0, len(p) // CS)
        for i in missing:
            cache.write(keys, i, CHUNK.clone())
        planner.finished(rid)
        cache.forget(rid)
        writer.submit(writer._t0 + r, p.tolist(), (), 1)
    writer.close()
    cache.close()
    return hit / lookup


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "lfu"])
def test_replaying_the_captured_trace_gives_the_live_token_hit_rate(tmp_path, policy):
    path = tmp_path / "cap.jsonl"
    capacity = 12 * CHUNK.nbytes
    want = live(prompts(), policy, capacity, path)
    meta = trace_meta(str(path))
    reqs = load_trace(str(path))
    tier = replay_tier(reqs, make_policy(policy, chunk_tokens=CS), capacity)
    got = replay(reqs, tier, LLAMA3_8B, CS, block_bytes=meta["chunk_bytes"],
                 engine_block=meta["block_size"])
    assert tier.stats.evictions > 0 and 0 < want < 1
    assert got.token_hit_rate == pytest.approx(want, abs=1e-12)


def test_replay_command_sizes_chunks_from_the_captured_trace(tmp_path):
    path = tmp_path / "cap.jsonl"
    want = live(prompts(), "lru", 12 * CHUNK.nbytes, path)
    out = subprocess.run(
        [sys.executable, "-m", "lmcache_lab.run", "experiment=replay", "policy=lru",
         f"workload.trace={path}", f"tiers.cpu.capacity_bytes={12 * CHUNK.nbytes}",
         "progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["capacity_blocks"] == 12 and summary["block_tokens"] == CS
    assert summary["token_hit_rate"] == pytest.approx(want, abs=1e-12)


def test_a_sweep_over_a_captured_trace_draws_belady_and_the_lru_curve_through_the_lru_points(tmp_path):
    import pandas as pd

    path = tmp_path / "cap.jsonl"
    live(prompts(), "lru", 12 * CHUNK.nbytes, path)
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "lmcache_lab.run", "-m", "experiment=replay", "policy=lru,belady",
         f"workload.trace={path}", "workload.capacity_fraction=0.3,0.6", "progress=false",
         f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = pd.read_csv(sweep / "replay_sweep.csv")
    curve = pd.read_csv(sweep / "lru_stack_cap.csv").set_index("capacity_blocks")["chunk_hit_rate"]
    lru = runs[runs["policy"] == "lru"]
    assert len(lru) == 2 and set(runs["policy"]) == {"lru", "belady"}
    for cap, rate in zip(lru["capacity_blocks"], lru["chunk_hit_rate"]):
        assert curve[cap] == rate                       # exactly: one pass == the replays
    belady = runs[runs["policy"] == "belady"].set_index("capacity_blocks")["chunk_hit_rate"]
    assert all(belady[c] >= r for c, r in zip(lru["capacity_blocks"], lru["chunk_hit_rate"]))
    assert (sweep / "hit_rate_vs_capacity_cap.png").stat().st_size > 0
