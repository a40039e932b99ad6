"""Two engine processes share chunks through one Redis: keys agree across processes, concurrent
writers of the same chunks are harmless, and a third engine loads exactly what they stored."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from lmcache_lab.engine import CacheEngine
from lmcache_lab.keys import Namespace

pytestmark = pytest.mark.redis

CHUNK, CHUNKS = 16, 6
WRITER = textwrap.dedent("""
    import json, sys, torch
    from lmcache_lab.engine import CacheEngine
    from lmcache_lab.keys import Namespace
    url, chunk, chunks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    eng = CacheEngine({"chunk_size": chunk, "tiers": {"cpu": {"capacity_bytes": 0}, "redis": {"url": url}}},
                      namespace=Namespace(model="shared-model", kv_dtype="bfloat16"))
    tokens = list(range(7, 7 + chunk * chunks + 3))
    kv = [torch.randn(2, 2, chunk, 64, generator=torch.Generator().manual_seed(i)).bfloat16()
          for i in range(chunks)]
    stored = eng.store(tokens, kv)
    print(json.dumps({"stored": stored, "keys": [k.hex() for k in eng.chunk_keys(tokens)],
                      "redis": vars(eng.tiers[-1].stats)}))
    eng.close()
""")


def expected_kv() -> list[torch.Tensor]:
    return [torch.randn(2, 2, CHUNK, 64, generator=torch.Generator().manual_seed(i)).bfloat16()
            for i in range(CHUNKS)]


def test_engines_in_different_processes_share_chunks(redis_server):
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, redis_server.url, str(CHUNK), str(CHUNKS)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    reports = []
    for w in writers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert reports[0]["keys"] == reports[1]["keys"]             # process-stable chained keys
    assert all(r["redis"]["errors"] == 0 for r in reports)
    assert sum(r["redis"]["inserts"] for r in reports) == CHUNKS  # SET NX: each chunk written once

    reader = CacheEngine({"chunk_size": CHUNK, "tiers": {"cpu": {"capacity_bytes": 0},
                                                          "redis": {"url": redis_server.url}}},
                         namespace=Namespace(model="shared-model", kv_dtype="bfloat16"))
    other_model = CacheEngine({"chunk_size": CHUNK, "tiers": {"cpu": {"capacity_bytes": 0},
                                                               "redis": {"url": redis_server.url}}},
                              namespace=Namespace(model="another-model", kv_dtype="bfloat16"))
    try:
        tokens = list(range(7, 7 + CHUNK * CHUNKS + 3))
        assert [k.hex() for k in reader.chunk_keys(tokens)] == reports[0]["keys"]
        assert reader.lookup(tokens) == CHUNK * CHUNKS
        got = reader.retrieve(tokens, CHUNK * CHUNKS)
        assert len(got) == CHUNKS and all(torch.equal(g, e) for g, e in zip(got, expected_kv()))
        assert reader.tiers[-1].stats.hits == CHUNKS and reader.tiers[-1].stats.corrupt == 0
        assert other_model.lookup(tokens) == 0                   # the namespace separates models
    finally:
        reader.close()
        other_model.close()
