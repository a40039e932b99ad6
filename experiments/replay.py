"""Trace replay: drive the real tier and policy objects with a request trace and measure hits.

The replay uses a `MemoryTier` with the configured policy, exactly as a live engine does, but
stores a size-only placeholder per block instead of tensors, so a trace of a production-sized
model (64 MiB of KV per 512-token block for Llama-3-8B) replays in seconds on a laptop. A trace
block is one chunk; its id is its key (ids are already prefix-chained).

Per request, in order (what a live engine does at lookup, load and store):
    hit = leading run of the request's blocks resident in the tier     (prefix rule)
    the hit chain is touched                                           (it was loaded)
    every block after the hit is stored (evicting as the policy says)  (the engine computed it)
    the request's resident chain is touched, deepest first             (tail-first recency)

Offline policies (`belady`, `belady_prefix`) get the future: `prepare(chains)` with every
request's block ids before the tier is built, and `advance(r)` before request `r` is served.

A trace captured by the connector (`trace.path`; its metadata in `trace.trace_meta`) is replayed
as the capturing cache ran: a block is one chunk of `chunk_tokens` tokens and `chunk_bytes`
bytes, the capacity is the CPU tier's `capacity_bytes` (unless `workload.capacity_fraction` is
given on the command line), and tokens count as the connector counts them: a request's lookup
tokens are its servable tokens (`servable_tokens`, with the engine's block size) and its hit is
its cached chunks' tokens, capped there.

Metrics besides hit rates (summary.json): prefill FLOPs saved (`lmcache_lab.cost`), bytes written
to the tier (every stored block; write amplification for disk/Redis), bytes loaded from it, and a
TTFT estimate per request from `TTFTModel` (prefill of the missed tokens at their positions + load
of the hit bytes), next to the same estimate with no cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lmcache_lab.cost import MODELS, ModelCost
from lmcache_lab.experiments.trace import (BLOCK_TOKENS, TraceRequest, load_trace, trace_meta,
                                           unique_blocks)
from lmcache_lab.experiments.ttft_model import TTFTModel
from lmcache_lab.integrations.vllm_plan import servable_tokens
from lmcache_lab.policies import EvictionPolicy, make_policy
from lmcache_lab.tiers import MemoryTier


@dataclass(frozen=True)
class Placeholder:
    """A payload that only has a size: what the replay stores instead of KV tensors."""
    nbytes: int


@dataclass
class ReplayResult:
    hit_blocks: np.ndarray      # [R] leading cached blocks per request
    blocks: np.ndarray          # [R] blocks per request
    hit_tokens: np.ndarray      # [R] cached prompt tokens per request
    tokens: np.ndarray          # [R] prompt tokens per request
    flops_saved: float
    flops_total: float
    bytes_written: int
    evictions: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def chunk_hit_rate(self) -> float:
        return float(self.hit_blocks.sum() / max(1, self.blocks.sum()))

    @property
    def token_hit_rate(self) -> float:
        return float(self.hit_tokens.sum() / max(1, self.tokens.sum()))


def replay(requests: Sequence[TraceRequest], tier: MemoryTier, model: ModelCost,
           block_tokens: int = BLOCK_TOKENS, progress: bool = False,
           block_bytes: int | None = None, engine_block: int | None = None) -> ReplayResult:
    """`block_bytes`: a block's size (default: its tokens' KV in `model`); `engine_block`: the
    engine block size of a captured trace, whose tokens then count as the connector counts
    them (`servable_tokens`)."""
    R = len(requests)
    hit_list: list[int] = []
    block = Placeholder(block_bytes or block_tokens * model.kv_bytes_per_token)
    prefix_length, put_chain, touch = tier.prefix_length, tier.put_chain, tier.touch

    iterator = requests
    if progress:
        from tqdm import tqdm
        iterator = tqdm(requests, desc=f"replay {tier.policy.name}", unit="req", mininterval=0.5)
    advance = tier.policy.advance if tier.policy.offline else None
    t0 = time.perf_counter()
    for r, req in enumerate(iterator):
        ids = req.hash_ids
        if advance is not None:
            advance(r)
        n = prefix_length(ids)
        if n:
            touch(ids[:n])
        if n < len(ids):
            put_chain(ids[n:], block, ids[n - 1] if n else None, n * block_tokens, block_tokens)
        touch(ids)
        hit_list.append(n)
    seconds = time.perf_counter() - t0
    hit_blocks = np.asarray(hit_list, dtype=np.int64)
    blocks = np.fromiter((len(req.hash_ids) for req in requests), dtype=np.int64, count=R)
    if engine_block is None:
        tokens = np.fromiter(((len(req.hash_ids) - 1) * block_tokens + req.last_block_tokens(block_tokens)
                              for req in requests), dtype=np.int64, count=R)
        hit_tokens = np.where(hit_blocks < blocks, hit_blocks * block_tokens, tokens)
    else:
        tokens = np.fromiter((servable_tokens(req.input_length, block_tokens, engine_block)
                              for req in requests), dtype=np.int64, count=R)
        hit_tokens = np.minimum(hit_blocks * block_tokens, tokens)
    # sum over hit chunks of chunk_flops(c, i*c) telescopes to prefix_flops(hit tokens)
    return ReplayResult(hit_blocks, blocks, hit_tokens, tokens,
                        flops_saved=float(model.prefix_flops(hit_tokens.astype(np.float64)).sum()) if R else 0.0,
                        flops_total=float(model.prefix_flops(tokens.astype(np.float64)).sum()) if R else 0.0,
                        bytes_written=tier.stats.bytes_written, evictions=tier.stats.evictions,
                        seconds=seconds)


def replay_tier(requests: Sequence[TraceRequest], policy: EvictionPolicy, capacity_bytes: int) -> MemoryTier:
    """The tier a replay drives; an offline policy is first given the trace's future."""
    if policy.offline:
        policy.prepare([req.hash_ids for req in requests])
    return MemoryTier(capacity_bytes, policy)


def infinite_cache(requests: Sequence[TraceRequest], model: ModelCost,
                   block_tokens: int = BLOCK_TOKENS) -> tuple[float, float]:
    """(chunk hit rate, prefill FLOPs saved fraction) of a cache that never evicts: the absolute
    ceiling of any policy at any capacity."""
    seen: set = set()
    hits = total = 0
    hit_tokens, tokens = [], []
    for req in requests:
        ids = req.hash_ids
        n = 0
        for key in ids:
            if key not in seen:
                break
            n += 1
        hits += n
        total += len(ids)
        seen.update(ids)
        t = (len(ids) - 1) * block_tokens + req.last_block_tokens(block_tokens)
        tokens.append(t)
        hit_tokens.append(n * block_tokens if n < len(ids) else t)
    flops_total = model.prefix_flops(np.asarray(tokens, dtype=np.float64)).sum()
    flops_saved = model.prefix_flops(np.asarray(hit_tokens, dtype=np.float64)).sum()
    return hits / max(1, total), float(flops_saved / flops_total) if flops_total else 0.0


def ttft_stats(result: ReplayResult, model: ModelCost, ttft: TTFTModel, block_bytes: int) -> dict:
    """Mean / p50 / p90 estimated TTFT (s) with this cache and with none."""
    total = model.prefix_flops(result.tokens.astype(np.float64))      # [R], elementwise
    miss_flops = total - model.prefix_flops(result.hit_tokens.astype(np.float64))
    with_cache = ttft.seconds(miss_flops, result.hit_blocks * float(block_bytes))
    cold = ttft.seconds(total, 0.0)
    out = {}
    for name, arr in (("ttft", with_cache), ("ttft_no_cache", cold)):
        if len(arr):
            out[f"{name}_mean_s"] = float(arr.mean())
            out[f"{name}_p50_s"] = float(np.percentile(arr, 50))
            out[f"{name}_p90_s"] = float(np.percentile(arr, 90))
    return out


def capacity_for(workload, requests: Sequence[TraceRequest], block_bytes: int,
                 default_bytes: int, use_fraction: bool = True) -> tuple[int, int]:
    """(capacity_blocks, capacity_bytes): `capacity_fraction` of the trace's unique blocks when
    given (and `use_fraction`), else `capacity_bytes` (or the CPU tier's budget) rounded down to
    whole blocks."""
    fraction = workload.get("capacity_fraction") if use_fraction else None
    if fraction is not None:
        if not 0 <= float(fraction) <= 1:
            raise ValueError(f"workload.capacity_fraction: must be in [0, 1], got {fraction!r}")
        blocks = int(float(fraction) * unique_blocks(list(requests)))
    else:
        from lmcache_lab.config import parse_size
        nbytes = parse_size(workload.get("capacity_bytes") or default_bytes, "workload.capacity_bytes")
        blocks = nbytes // block_bytes
    return blocks, blocks * block_bytes


_LOADED: dict = {}   # (trace, limit) -> (requests, unique blocks, infinite cache): a sweep loads once


def _load(trace, limit, model: ModelCost, block_tokens: int):
    key = (str(trace), limit, model, block_tokens)
    if key not in _LOADED:
        requests = load_trace(trace, limit=limit)
        _LOADED.clear()
        _LOADED[key] = requests, unique_blocks(requests), infinite_cache(requests, model, block_tokens)
    return _LOADED[key]


def captured_block_bytes(meta: dict, trace) -> int:
    """A captured chunk's stored size, or a ValueError naming what is missing."""
    if not meta.get("chunk_bytes"):
        raise ValueError(f"workload.trace: {trace} is a captured trace without chunk_bytes (no chunk "
                         "was stored while it was captured), so its chunks cannot be sized")
    return int(meta["chunk_bytes"])


def _given(key: str) -> bool:
    """Whether `key` was set on the command line of this Hydra run (False outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in HydraConfig.get().overrides.task)


def run_replay(cfg, out_dir: Path) -> dict:
    """Replay `cfg.workload.trace` under `cfg.policy` and write summary.json + plots."""
    from omegaconf import OmegaConf

    from lmcache_lab.config import load_config
    from lmcache_lab.experiments import report

    cache_cfg = load_config({k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                             for k in ("chunk_size", "hash", "policy", "tiers", "codec", "metrics")})
    wl = cfg.workload
    model = MODELS[cfg.model.name] if "name" in cfg.model and cfg.model.name in MODELS else ModelCost(
        **{k: cfg.model[k] for k in ("n_params", "n_layers", "d_attn", "kv_bytes_per_token")})
    meta = trace_meta(wl.trace)
    block_tokens = int(meta.get("chunk_tokens") or wl.get("block_tokens", BLOCK_TOKENS))
    requests, n_unique, (inf_hit, inf_flops) = _load(wl.trace, wl.get("limit"), model, block_tokens)
    block_bytes = captured_block_bytes(meta, wl.trace) if meta else block_tokens * model.kv_bytes_per_token
    use_fraction = not meta or _given("workload.capacity_fraction")
    cap_blocks, cap_bytes = capacity_for(wl, requests, block_bytes, cache_cfg.tiers.cpu.capacity_bytes,
                                         use_fraction)
    policy = make_policy(cache_cfg.policy.name, chunk_tokens=block_tokens, **cache_cfg.policy.params)
    tier = replay_tier(requests, policy, cap_bytes)
    result = replay(requests, tier, model, block_tokens, progress=bool(cfg.get("progress", True)),
                    block_bytes=block_bytes, engine_block=meta.get("block_size"))
    exp = cfg.get("experiment", {})
    ttft = TTFTModel(**{k: float(v) for k, v in exp.get("ttft", {}).items()})

    summary = {
        "experiment": "replay",
        "policy": cache_cfg.policy.name,
        "trace": str(wl.trace),
        "capacity_fraction": wl.get("capacity_fraction") if use_fraction else None,
        "captured": meta or None,
        "capacity_blocks": cap_blocks,
        "capacity_bytes": cap_bytes,
        "block_tokens": block_tokens,
        "requests": len(requests),
        "blocks": int(result.blocks.sum()),
        "unique_blocks": n_unique,
        "chunk_hit_rate": result.chunk_hit_rate,
        "token_hit_rate": result.token_hit_rate,
        "flops_saved": result.flops_saved,
        "flops_total": result.flops_total,
        "flops_saved_fraction": result.flops_saved / result.flops_total if result.flops_total else 0.0,
        "bytes_written": result.bytes_written,
        "evictions": result.evictions,
        "replay_seconds": result.seconds,
        "offline": policy.offline,
        "infinite_chunk_hit_rate": inf_hit,
        "infinite_flops_saved_fraction": inf_flops,
        "bytes_loaded": int(result.hit_blocks.sum()) * block_bytes,
        "write_amplification": result.bytes_written / max(1, int(result.blocks.sum()) * block_bytes),
        "declined": tier.stats.declined,
        **ttft_stats(result, model, ttft, block_bytes),
        "ttft_model": ttft.describe(),
        **result.extra,
        **(policy.replay_stats() if hasattr(policy, "replay_stats") else {}),   # e.g. a learned policy's training cost
    }
    report.write_summary(out_dir, summary, cfg)
    report.plot_hit_rate_over_time(out_dir / "hit_rate_over_time.png", result.hit_blocks, result.blocks,
                                   title=f"{Path(str(wl.trace)).name} · {summary['policy']} · "
                                         f"{cap_blocks} blocks")
    report.print_summary(summary, ["policy", "requests", "capacity_blocks", "chunk_hit_rate", "token_hit_rate",
                                   "flops_saved_fraction", "bytes_written", "ttft_mean_s", "ttft_no_cache_mean_s",
                                   "infinite_chunk_hit_rate", "replay_seconds"])
    print(f"run dir: {out_dir}")
    return summary
