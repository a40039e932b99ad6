"""LMCacheLabConnector on a real vLLM engine (CPU), each engine in its own process.

Engines (run once per session, on demand; ~5 minutes on 2 cores in all):
  ref32 / ref16   no connector, fp32 / bf16: the reference greedy tokens
  conn32          connector, fp32, chunk 256, CPU + disk tier, vLLM's multi-process layout:
                  cold and warm runs (RUN below), metrics scraped
  restart32       a later process on conn32's disk tier only: hits from
                  disk, loaded between engine steps (prefetch: true, vLLM's async KV load); then a
                  stored chunk is corrupted after start-up, so the lookup promises it and the
                  background load fails -> recomputed, counted
  conn16          connector, bf16, on the same disk tier that holds conn32's fp32 chunks of the
                  same prompts: must see none of them, then hit its own
  mid32           connector, fp32, chunk 192 (1.5 blocks): hits that end mid-block
"""
from __future__ import annotations

from pathlib import Path

import pytest

from vllm_e2e import CPU_BLOCK, chunks_read, free_port, loadable, make_prompts, run_engine

pytestmark = pytest.mark.e2e

PROMPTS = make_prompts()
NAMES = list(PROMPTS)                 # long, diverge, exact, short
ALL = [PROMPTS[n] for n in NAMES]
MAX_TOKENS = 8


def gen(names, reset_each=True):
    """Generate `names` one at a time, each after reset_prefix_cache(): every cached token then
    comes from the connector, none from vLLM's own prefix cache."""
    return {"op": "generate", "prompts": [PROMPTS[n] for n in names], "max_tokens": MAX_TOKENS,
            "reset_each": reset_each}


# Every connector engine runs: op0 cold "long" (stored) -> op1 the others (diverge shares 300
# tokens with long, so its hit is long's first chunk) -> op2 all four again (all stored by now).
RUN = [gen(["long"]), gen(["diverge", "exact", "short"]), gen(NAMES)]


def hits(chunk: int) -> tuple[list[int], list[int]]:
    """Expected num_cached_tokens of op1 and op2: the chunk-aligned cached prefix, leaving at
    least one prompt token to compute."""
    served = {n: loadable(len(p), chunk) for n, p in PROMPTS.items()}
    op1 = [min(300 // chunk * chunk, served["diverge"]), 0, 0]
    return op1, [served[n] for n in NAMES]


class Engines:
    """Lazily runs and caches the engines of this module (order matters: restart32 reads the disk
    tier written by conn32, conn16 shares it)."""

    def __init__(self, model: str, root: Path):
        self.model, self.root = model, root
        self.disk = str(root / "disk-tier")
        self.ports = {"conn32": free_port(), "restart32": free_port()}
        self._runs: dict[str, dict] = {}

    def get(self, name: str) -> dict:
        if name not in self._runs:
            spec, mp = getattr(self, "_" + name)()
            self._runs[name] = run_engine({"model": self.model, **spec}, mp, self.root / name)
        return self._runs[name]

    def _ref32(self):
        return {"dtype": "float32", "connector": None, "ops": [gen(NAMES)]}, False

    def _ref16(self):
        return {"dtype": "bfloat16", "connector": None, "ops": [gen(NAMES)]}, False

    def _conn32(self):
        port = self.ports["conn32"]
        cfg = {"chunk_size": 256, "tiers": {"disk": {"path": self.disk}}, "metrics": {"port": port}}
        return {"dtype": "float32", "connector": cfg,
                "ops": RUN + [{"op": "scrape", "port": port}]}, True

    def _restart32(self):
        self.get("conn32")
        port = self.ports["restart32"]
        cfg = {"chunk_size": 256, "tiers": {"cpu": {"capacity_bytes": 0}, "disk": {"path": self.disk}},
               "metrics": {"port": port}, "prefetch": True}
        return {"dtype": "float32", "connector": cfg,
                "ops": [gen(NAMES), {"op": "corrupt", "path": self.disk, "positions": [256]},
                        gen(["long"]), {"op": "scrape", "port": port}]}, False

    def _conn16(self):
        self.get("conn32")
        cfg = {"chunk_size": 256, "tiers": {"disk": {"path": self.disk}}}
        return {"dtype": "bfloat16", "connector": cfg, "ops": RUN}, False

    def _mid32(self):
        return {"dtype": "float32", "connector": {"chunk_size": 192}, "ops": RUN}, False


@pytest.fixture(scope="session")
def engines(tiny_model, tmp_path_factory) -> Engines:
    return Engines(tiny_model, tmp_path_factory.mktemp("e2e"))


def tokens(run: dict, *ops: int) -> list[list[int]]:
    return [t for op in ops for t in run["results"][op]["tokens"]]


def cached(run: dict, op: int) -> list[int]:
    return run["results"][op]["num_cached_tokens"]


# --------------------------------------------------------------------------------------- fp32
def test_expected_hits_use_the_engines_own_block_size(engines):
    """`loadable` (the expected hits of every test here) assumes CPU_BLOCK: the engine says."""
    assert engines.get("conn32")["kv_cache"]["block_size"] == CPU_BLOCK


def test_fp32_same_tokens_with_and_without_connector(engines):
    ref = tokens(engines.get("ref32"), 0)
    assert all(len(t) == MAX_TOKENS for t in ref)
    run = engines.get("conn32")
    assert tokens(run, 0, 1) == ref       # cold (diverge partly warm)
    assert tokens(run, 2) == ref          # warm: loaded from the CPU tier


def test_after_reset_num_cached_tokens_is_the_chunk_aligned_prefix(engines):
    run = engines.get("conn32")
    op1, op2 = hits(256)
    assert cached(run, 0) == [0]
    assert cached(run, 1) == op1 == [256, 0, 0]
    # long: 2 chunks + its 1-block tail chunk; exact: 2nd chunk up to its 1st block
    assert cached(run, 2) == op2 == [640, 512, 384, 0]


def test_metrics_endpoint_counts_hits_and_bytes(engines):
    m = engines.get("conn32")["results"][3]
    op1, op2 = hits(256)
    assert m["lmcache_lab_requests_total"] == 8
    assert m["lmcache_lab_engine_prefix_hit_tokens_total"] == 0     # APC reset before each
    assert m["lmcache_lab_hit_tokens_total"] == sum(op1) + sum(op2)
    assert m["lmcache_lab_lookup_tokens_total"] == 640 + (512 + 384) + (640 + 512 + 384)
    # long 2 + its tail (1 block), diverge 1 new, exact 2
    assert m["lmcache_lab_stored_chunks_total"] == 2 + 1 + 1 + 2
    read = sum(chunks_read(h, 256) for h in op1 + op2)
    assert read == 1 + 3 + 2 + 2                                   # long's tail chunk read too
    assert m["lmcache_lab_retrieved_chunks_total"] == read
    chunk_bytes = 2 * 2 * 256 * 2 * 64 * 4                         # K+V, 2 layers, 256 tok, 2x64, fp32
    tail_bytes = chunk_bytes // 2                                  # one 128-token block
    assert m["lmcache_lab_stored_bytes_total"] == 5 * chunk_bytes + tail_bytes
    assert m["lmcache_lab_retrieved_bytes_total"] == chunk_bytes * (read - 1) + tail_bytes
    assert m['lmcache_lab_tier_chunks{tier="cpu"}'] == 6
    assert m['lmcache_lab_tier_used_bytes{tier="cpu"}'] == 5 * chunk_bytes + tail_bytes
    assert m["lmcache_lab_load_failures_total"] == 0
    assert m["lmcache_lab_load_seconds_count"] >= 1 and m["lmcache_lab_store_seconds_count"] >= 1
    assert m["lmcache_lab_background_loaded_tokens_total"] == 0     # memory hits: in the step


def test_hits_ending_mid_block(engines):
    ref = tokens(engines.get("ref32"), 0)
    run = engines.get("mid32")
    assert tokens(run, 0, 1) == ref and tokens(run, 2) == ref
    op1, op2 = hits(192)
    assert cached(run, 1) == op1 == [192, 0, 0]                     # 1.5 blocks of 128
    assert cached(run, 2) == op2 == [576, 384, 384, 0]              # 576 = 4.5 blocks


def test_second_engine_process_gets_hits_from_disk(engines):
    ref = tokens(engines.get("ref32"), 0)
    run = engines.get("restart32")
    assert tokens(run, 0) == ref
    # a fresh process with an empty CPU tier: every hit comes from the disk tier of conn32
    assert cached(run, 0) == hits(256)[1]


def test_chunk_lost_between_lookup_and_load_is_recomputed_and_counted(engines):
    ref = tokens(engines.get("ref32"), 0)
    run = engines.get("restart32")
    assert run["results"][1] >= 1                 # the stored chunk at position 256 was damaged
    assert tokens(run, 2) == [ref[NAMES.index("long")]]
    m = run["results"][3]
    assert m["lmcache_lab_load_failures_total"] == 1
    # every hit came from disk between engine steps; the failed one from its first chunk on
    loaded = sum(cached(run, 0)) + 256
    assert m["lmcache_lab_background_loaded_tokens_total"] == m["lmcache_lab_hit_tokens_total"] == loaded
    op0 = sum(chunks_read(h, 256) for h in hits(256)[1])
    assert m["lmcache_lab_retrieved_chunks_total"] == op0 + 1       # op0 all, op2 chunk 0 only
    assert m["lmcache_lab_stored_chunks_total"] == 1                # the lost chunk, recomputed


# --------------------------------------------------------------------------------------- bf16
def test_bf16_same_tokens_with_and_without_connector(engines):
    ref = tokens(engines.get("ref16"), 0)
    run = engines.get("conn16")
    assert tokens(run, 0, 1) == ref and tokens(run, 2) == ref
    assert cached(run, 2) == hits(256)[1]


def test_dtypes_sharing_one_store_never_see_each_others_chunks(engines):
    engines.get("conn32")             # fp32 chunks of the same prompts are on the shared disk
    run = engines.get("conn16")
    assert cached(run, 0) == [0]      # the fp32 chunks of "long" are not seen
    assert cached(run, 1) == hits(256)[0]


# --------------------------------------------------------------------------------------- server
def test_openai_server_with_the_connector(tiny_model, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server --kv-transfer-config '...'`: the second
    request of a prompt is served by the connector (vLLM's APC is off here)."""
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from vllm_e2e import ENGINE_TIMEOUT_S, free_port, scrape_metrics

    port, mport = free_port(), free_port()
    ktc = {"kv_connector": "LMCacheLabConnector",
           "kv_connector_module_path": "lmcache_lab.integrations.vllm", "kv_role": "kv_both",
           "kv_connector_extra_config": {"chunk_size": 256, "metrics": {"port": mport}}}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
         "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
         "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
         "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
         "--kv-transfer-config", json.dumps(ktc)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(1)

        def complete():
            body = json.dumps({"model": "tiny", "prompt": PROMPTS["long"], "max_tokens": MAX_TOKENS,
                               "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=120).read())

        first, second = complete(), complete()
        assert first["choices"][0]["text"] == second["choices"][0]["text"]
        details = second["usage"].get("prompt_tokens_details") or {}
        assert details.get("cached_tokens") == 640                  # 2 chunks + a 1-block tail
        m = scrape_metrics(mport)
        assert m["lmcache_lab_hit_tokens_total"] == 640
        assert m["lmcache_lab_stored_chunks_total"] == 3
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
