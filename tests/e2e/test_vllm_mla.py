"""LMCacheLabConnector on an MLA model (DeepSeek-V2-style latent cache) in a real vLLM CPU engine,
each engine in its own process.

vLLM's CPU platform serves MLA with the CPU_MLA backend (block size forced to 16, latent width
kv_lora_rank + rope = 512 + 64 = 576, one "head", no V) and turns vLLM's own prefix cache and
chunked prefill off for MLA (vllm/platforms/cpu.py, `check_and_update_config`): every cached
token these engines report comes from the connector. The model uses DeepSeek-V2's YaRN RoPE (factor
1): with plain RoPE, vLLM's CPU `ops.rotary_embedding` rotates some positions differently
depending on how many tokens share the step, so no cache could reproduce a cold prefill
(`TinyMLASpec.rope`).

On a CPU with AMX tiles vLLM picks AMX_MLA instead unless CPU_MLA is asked for; AMX_MLA takes no
fp32 weights ("expect weight to be bfloat16, float16, int8, ..." at load), so the fp32 engines
ask for CPU_MLA (`attention_backend`) and run the same backend on every CPU. AMX_MLA keeps vLLM's
own prefix cache (block size 128 by default): on such CPUs the amx engines check that a
connector hit gives the tokens an APC hit of the same length gives.

Engines (run once per session, on demand):
  ref32       no connector, fp32: the reference greedy tokens
  conn32      connector, fp32, chunk 256, CPU + disk tier, vLLM's multi-process layout:
              cold and warm runs (RUN below), metrics scraped
  restart32   a later process on conn32's disk tier only (CPU tier capacity 0): hits from disk
  ref16 / conn16   the same in bf16 (CPU tier only)
  amx_ref16 / amx16  AMX_MLA, bf16 (CPUs with AMX tiles only): each prompt cold, then again with
                   vLLM's own prefix cache warm (the reference for a hit); the connector's RUN
"""
from __future__ import annotations

from pathlib import Path

import logging
import time
from types import SimpleNamespace

import pytest
import torch

from vllm_e2e import MODELS_DIR, free_port, loadable, make_prompts, run_engine

e2e = pytest.mark.e2e          # the engine tests; the connector unit tests below start no engine

PROMPTS = make_prompts()
NAMES = list(PROMPTS)                 # long 700, diverge 550 (300 shared), exact 512, short 100
ALL = [PROMPTS[n] for n in NAMES]
MAX_TOKENS = 8
CHUNK = 256                           # 16 blocks of CPU_MLA's forced block size 16
MLA_BLOCK = 16
LAYERS, LATENT = 2, 512 + 64          # the latent cache: one head of kv_lora_rank + rope dims


@pytest.fixture(scope="session")
def tiny_mla_model() -> str:
    """A 2-layer random DeepSeek-V2-style MLA model, no MoE (built once, reused across sessions)."""
    from lmcache_lab.experiments.tiny_model import TinyMLASpec, build_tiny_mla_model

    return str(build_tiny_mla_model(MODELS_DIR / "mla-2l-256", TinyMLASpec(layers=LAYERS)))


def gen(names, reset_each=True):
    return {"op": "generate", "prompts": [PROMPTS[n] for n in names], "max_tokens": MAX_TOKENS,
            "reset_each": reset_each}


# op0 cold "long" (stored) -> op1 the others (diverge shares long's first chunk) -> op2 all again
RUN = [gen(["long"]), gen(["diverge", "exact", "short"]), gen(NAMES)]


def hits(chunk: int) -> tuple[list[int], list[int]]:
    """Expected num_cached_tokens of op1 and op2: the chunk-aligned cached prefix, leaving at
    least one prompt token to compute."""
    served = {n: loadable(len(p), chunk, MLA_BLOCK) for n, p in PROMPTS.items()}
    op1 = [min(300 // chunk * chunk, served["diverge"]), 0, 0]
    return op1, [served[n] for n in NAMES]


class Engines:
    """Lazily runs and caches the engines (restart32 reads the disk tier conn32 wrote)."""

    def __init__(self, model: str, root: Path):
        self.model, self.root = model, root
        self.disk = str(root / "disk-tier")
        self.port = free_port()
        self._runs: dict[str, dict] = {}

    def get(self, name: str) -> dict:
        if name not in self._runs:
            spec, mp = getattr(self, "_" + name)()
            backend = spec.pop("backend", "CPU_MLA")
            self._runs[name] = run_engine({"model": self.model, "max_model_len": 2048, **spec,
                                           "engine_args": {"attention_backend": backend}},
                                          mp, self.root / name)
        return self._runs[name]

    def _ref32(self):
        return {"dtype": "float32", "connector": None, "ops": [gen(NAMES)]}, False

    def _conn32(self):
        cfg = {"chunk_size": CHUNK, "tiers": {"disk": {"path": self.disk}},
               "metrics": {"port": self.port}}
        return {"dtype": "float32", "connector": cfg,
                "ops": RUN + [{"op": "scrape", "port": self.port}]}, True

    def _ref16(self):
        return {"dtype": "bfloat16", "connector": None, "ops": [gen(NAMES)]}, False

    def _conn16(self):     # its own CPU tier only: bf16 chunks never meet conn32's fp32 ones
        return {"dtype": "bfloat16", "connector": {"chunk_size": CHUNK}, "ops": RUN}, False

    def _amx_ref16(self):  # vLLM's own choice on a CPU with AMX tiles: cold, then an APC hit
        ops = [{**gen([n]), "reset_each": not again} for n in NAMES for again in (False, True)]
        return {"dtype": "bfloat16", "connector": None, "ops": ops, "backend": "AMX_MLA"}, False

    def _amx16(self):
        return {"dtype": "bfloat16", "connector": {"chunk_size": CHUNK}, "ops": RUN,
                "backend": "AMX_MLA"}, False

    def _restart32(self):
        self.get("conn32")
        cfg = {"chunk_size": CHUNK,
               "tiers": {"cpu": {"capacity_bytes": 0}, "disk": {"path": self.disk}}}
        return {"dtype": "float32", "connector": cfg, "ops": [gen(NAMES)]}, False


@pytest.fixture(scope="session")
def mla_engines(tiny_mla_model, tmp_path_factory) -> Engines:
    return Engines(tiny_mla_model, tmp_path_factory.mktemp("e2e-mla"))


def tokens(run: dict, *ops: int) -> list[list[int]]:
    return [t for op in ops for t in run["results"][op]["tokens"]]


def cached(run: dict, op: int) -> list[int]:
    return run["results"][op]["num_cached_tokens"]


@e2e
def test_mla_engine_is_deterministic_and_uses_the_latent_cache(mla_engines):
    run = mla_engines.get("ref32")
    ref = tokens(run, 0)
    assert all(len(t) == MAX_TOKENS for t in ref)
    assert len({tuple(t) for t in ref}) == len(ref)      # distinct prompts, distinct outputs
    assert run["kv_cache"]["block_size"] == MLA_BLOCK     # CPU_MLA's forced block size
    assert cached(run, 0) == [0, 0, 0, 0]                 # no prefix cache of vLLM's own on MLA


@e2e
@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="vLLM uses AMX_MLA only with AMX tiles")
def test_amx_mla_connector_hit_gives_the_tokens_of_an_apc_hit(mla_engines):
    """AMX_MLA (vLLM's MLA backend on CPUs with AMX tiles) keeps vLLM's prefix cache on, in
    blocks of 128. A connector hit after `reset_prefix_cache()` covers what an APC hit of the
    same prompt covers (the chunk-aligned prefix plus whole-block tails), and the engine then
    computes the same tokens with the same kernel: the greedy tokens equal the APC hit's."""
    ref = mla_engines.get("amx_ref16")
    block = ref["kv_cache"]["block_size"]
    assert block % 32 == 0                                   # AMX_MLA's kernel block sizes
    cold, warm = tokens(ref, *range(0, 8, 2)), tokens(ref, *range(1, 8, 2))
    apc = [cached(ref, op)[0] for op in range(1, 8, 2)]
    assert apc == [loadable(len(PROMPTS[n]), CHUNK, block) for n in NAMES] == [640, 512, 384, 0]
    run = mla_engines.get("amx16")
    assert tokens(run, 0, 1) == cold
    assert cached(run, 2) == apc
    assert tokens(run, 2) == warm


@e2e
def test_mla_same_tokens_with_and_without_connector(mla_engines):
    ref = tokens(mla_engines.get("ref32"), 0)
    run = mla_engines.get("conn32")
    assert tokens(run, 0, 1) == ref       # cold (diverge partly warm)
    assert tokens(run, 2) == ref          # warm: loaded from the CPU tier


@e2e
def test_mla_bf16_same_tokens_and_hits(mla_engines):
    """bf16: runs that store give the reference tokens exactly. A prefill over loaded KV sums in
    another order than one over the whole prompt (vLLM turns its own prefix cache off for MLA on
    CPU, so there is no engine-side reference for a hit), and bf16 greedy decoding can then part
    at a near-tie some tokens later: measured here, "short" served 96 of its 100 tokens differs
    at its 8th token. So the hits' first tokens (the prefill's own output) must equal the
    reference; exact equality of every token after a hit is the fp32 test's."""
    ref = tokens(mla_engines.get("ref16"), 0)
    run = mla_engines.get("conn16")
    assert tokens(run, 0, 1) == ref
    assert [t[0] for t in tokens(run, 2)] == [t[0] for t in ref]
    assert cached(run, 2) == hits(CHUNK)[1]


@e2e
def test_mla_hits_are_the_chunk_aligned_prefix(mla_engines):
    run = mla_engines.get("conn32")
    op1, op2 = hits(CHUNK)
    assert cached(run, 0) == [0]
    assert cached(run, 1) == op1 == [256, 0, 0]
    # long, diverge, short: full chunks + a tail chunk of 16-token blocks (11, 2, 6 blocks);
    # exact: its 2nd chunk up to the block before its last token
    assert cached(run, 2) == op2 == [688, 544, 496, 96]


@e2e
def test_mla_chunks_are_k_only_and_counted_in_bytes(mla_engines):
    """One latent row per token: a chunk is [1, L, 256, 576], half of what a K+V chunk would be."""
    m = mla_engines.get("conn32")["results"][3]
    op1, op2 = hits(CHUNK)
    token_bytes = 1 * LAYERS * LATENT * 4                          # K only, fp32
    # chunks: long 2 + tail, diverge 1 + tail, exact 2, short a tail only (no full chunk)
    assert m["lmcache_lab_stored_chunks_total"] == 2 + 1 + 1 + 1 + 2 + 1
    stored = 2 * CHUNK + 176 + CHUNK + 32 + 2 * CHUNK + 96         # tokens; tails 11, 2, 6 blocks
    assert m["lmcache_lab_stored_bytes_total"] == stored * token_bytes
    # loads read whole values: op1 diverge chunk 0; op2 long 2 + tail, diverge 2 + tail,
    # exact 2 (its 2nd served in part), short its tail
    read = CHUNK + (2 * CHUNK + 176) + (2 * CHUNK + 32) + 2 * CHUNK + 96
    assert m["lmcache_lab_retrieved_bytes_total"] == read * token_bytes
    assert m['lmcache_lab_tier_used_bytes{tier="cpu"}'] == stored * token_bytes
    assert m["lmcache_lab_load_failures_total"] == 0
    assert m["lmcache_lab_store_failures_total"] == 0


@e2e
def test_mla_restart_reloads_from_disk(mla_engines):
    """A new engine process with an empty CPU tier finds every chunk conn32 wrote on disk."""
    ref = tokens(mla_engines.get("ref32"), 0)
    run = mla_engines.get("restart32")
    assert cached(run, 0) == hits(CHUNK)[1]
    assert tokens(run, 0) == ref


# ============================================================ connector unit tests (no engine)
def _mla_worker(monkeypatch, codec: str, tp_rank: int, tp_size: int):
    """A worker-side connector over two CPU_MLA layers shaped as the CPU engine registers them
    ([blocks, 1, 16, 576]), on tensor rank `tp_rank` of `tp_size`."""
    import vllm.distributed as dist
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec, MLAAttentionSpec

    from lmcache_lab.integrations import vllm as connector_mod
    from lmcache_lab.keys import Namespace

    monkeypatch.setattr(dist, "get_tensor_model_parallel_rank", lambda: tp_rank)
    monkeypatch.setattr(dist, "get_tensor_model_parallel_world_size", lambda: tp_size)
    seen = {}

    def namespace(vllm_config, config, layout, kv_dtype, rank, size, *args):
        seen["layout"] = layout                       # no model behind this VllmConfig
        return Namespace(model="m", kv_dtype="float32", layout=layout.name, codec=config.codec)

    monkeypatch.setattr(connector_mod, "make_namespace", namespace)
    config = VllmConfig(kv_transfer_config=KVTransferConfig(
        kv_connector="LMCacheLabConnector", kv_role="kv_both",
        kv_connector_module_path="lmcache_lab.integrations.vllm",
        engine_id=f"mla-{time.monotonic_ns()}-{tp_rank}",
        kv_connector_extra_config={"chunk_size": 32, "codec": codec}))
    config.cache_config.kv_cache_layout = "LBNHC"
    spec = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=LATENT, dtype=torch.float32)
    kv = {f"model.layers.{i}.self_attn.attn": torch.randn(4, 1, 16, LATENT) for i in range(2)}
    ctx = config.compilation_config.static_forward_context
    for name in kv:
        ctx[name] = SimpleNamespace(attn_backend=CPUMLABackend)
    kv_config = SimpleNamespace(kv_cache_groups=[KVCacheGroupSpec(list(kv), spec)])
    conn = connector_mod.LMCacheLabConnector(config, KVConnectorRole.WORKER, kv_config)
    return conn, kv, seen


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_mla_quantizing_codec_is_refused_at_registration(monkeypatch, caplog, codec):
    """int8/fp8 quantize K and V chunks [2, ...]: an MLA cache with them is refused once, with a
    warning that says why, and the engine runs on without the connector."""
    conn, kv, _ = _mla_worker(monkeypatch, codec, 0, 1)
    with caplog.at_level(logging.WARNING, logger="lmcache_lab.integrations.vllm"):
        conn.register_kv_caches(kv)
    try:
        text = " ".join(r.getMessage() for r in caplog.records)
        assert f"codec {codec!r}" in text and "K-only chunks [1, ...]" in text and "CPU_MLA" in text
        assert conn._cache is None
    finally:
        conn.shutdown()


def test_mla_codec_error_names_the_k_only_chunk():
    from lmcache_lab.codecs import get_codec

    with pytest.raises(ValueError,
                       match=r"K-only \(MLA\) chunk \[1, 2, 16, 576\] needs codec 'none'"):
        get_codec("int8").encode(torch.zeros(1, 2, 16, LATENT))


@pytest.mark.parametrize("tp_rank,stores", [(0, True), (1, False)])
def test_mla_rank_zero_stores_every_rank_serves(monkeypatch, tp_rank, stores):
    """The latent cache is served K-only ([1, L, N, 576] chunks); with tensor parallelism only
    rank 0 writes (one copy serves all ranks), every rank keeps its cache for loads."""
    conn, kv, seen = _mla_worker(monkeypatch, "none", tp_rank, 2)
    conn.register_kv_caches(kv)
    try:
        assert conn._cache is not None and conn._layout.v is None
        assert seen["layout"].name == "vllm:CPU_MLA:LBNHC"
        assert conn._stores_here is stores
        from lmcache_lab.kernels.paged import gather
        chunk = gather(conn._layers, conn._layout, torch.arange(32))
        assert chunk.shape == (1, 2, 32, LATENT)
        assert torch.equal(chunk[0, 1, 17], kv["model.layers.1.self_attn.attn"][1, 0, 1])
    finally:
        conn.shutdown()


def test_mla_namespace_is_rank_free_and_says_mla(monkeypatch):
    from lmcache_lab.config import load_config
    from lmcache_lab.integrations import vllm as connector_mod
    from lmcache_lab.kernels.layout import AxisStrides, KVLayout

    monkeypatch.setattr(connector_mod, "model_fingerprint", lambda cfg: "fp")
    cfg = SimpleNamespace(model_config=SimpleNamespace(model="m", revision=None),
                          parallel_config=SimpleNamespace(decode_context_parallel_size=1,
                                                          prefill_context_parallel_size=1))
    k = AxisStrides(0, 16 * LATENT, LATENT, LATENT, 1)
    mla = KVLayout("vllm:CPU_MLA:LBNHC", 2, 4, 16, 1, LATENT, (4, 1, 16, LATENT), k, None)
    ns = [connector_mod.make_namespace(cfg, load_config({}), mla, torch.float32, r, 2)
          for r in (0, 1)]
    assert ns[0] == ns[1] and ns[0].tp_rank == 0 and ns[0].tp_size == 1
    assert ns[0].extra.startswith("mla;")
