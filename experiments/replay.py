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
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lmcache_lab.cost import MODELS, ModelCost
from lmcache_lab.experiments.trace import BLOCK_TOKENS, TraceRequest, load_trace, unique_blocks
from lmcache_lab.policies import make_policy
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
           block_tokens: int = BLOCK_TOKENS, progress: bool = False) -> ReplayResult:
    R = len(requests)
    hit_blocks = np.zeros(R, dtype=np.int64)
    blocks = np.zeros(R, dtype=np.int64)
    hit_tokens = np.zeros(R, dtype=np.int64)
    tokens = np.zeros(R, dtype=np.int64)
    block = Placeholder(block_tokens * model.kv_bytes_per_token)
    prefix_length, put_chain, touch = tier.prefix_length, tier.put_chain, tier.touch

    iterator = requests
    if progress:
        from tqdm import tqdm
        iterator = tqdm(requests, desc=f"replay {tier.policy.name}", unit="req", mininterval=0.5)
    t0 = time.perf_counter()
    for r, req in enumerate(iterator):
        ids = req.hash_ids
        n = prefix_length(ids)
        if n:
            touch(ids[:n])
        if n < len(ids):
            put_chain(ids[n:], block, ids[n - 1] if n else None, n * block_tokens, block_tokens)
        touch(ids)
        hit_blocks[r] = n
        blocks[r] = len(ids)
        last = req.last_block_tokens(block_tokens)
        tokens[r] = (len(ids) - 1) * block_tokens + last
        hit_tokens[r] = n * block_tokens if n < len(ids) else tokens[r]
    seconds = time.perf_counter() - t0
    # sum over hit chunks of chunk_flops(c, i*c) telescopes to prefix_flops(hit tokens)
    flops = np.vectorize(model.prefix_flops, otypes=[float])
    return ReplayResult(hit_blocks, blocks, hit_tokens, tokens,
                        flops_saved=float(flops(hit_tokens).sum()) if R else 0.0,
                        flops_total=float(flops(tokens).sum()) if R else 0.0,
                        bytes_written=tier.stats.bytes_written, evictions=tier.stats.evictions,
                        seconds=seconds)


def capacity_for(workload, requests: Sequence[TraceRequest], block_bytes: int,
                 default_bytes: int) -> tuple[int, int]:
    """(capacity_blocks, capacity_bytes): `capacity_fraction` of the trace's unique blocks when
    given, else `capacity_bytes` (or the CPU tier's budget) rounded down to whole blocks."""
    fraction = workload.get("capacity_fraction")
    if fraction is not None:
        if not 0 <= float(fraction) <= 1:
            raise ValueError(f"workload.capacity_fraction: must be in [0, 1], got {fraction!r}")
        blocks = int(float(fraction) * unique_blocks(list(requests)))
    else:
        from lmcache_lab.config import parse_size
        nbytes = parse_size(workload.get("capacity_bytes") or default_bytes, "workload.capacity_bytes")
        blocks = nbytes // block_bytes
    return blocks, blocks * block_bytes


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
    block_tokens = int(wl.get("block_tokens", BLOCK_TOKENS))
    requests = load_trace(wl.trace, limit=wl.get("limit"))
    block_bytes = block_tokens * model.kv_bytes_per_token
    cap_blocks, cap_bytes = capacity_for(wl, requests, block_bytes, cache_cfg.tiers.cpu.capacity_bytes)
    policy = make_policy(cache_cfg.policy.name, chunk_tokens=block_tokens, **cache_cfg.policy.params)
    tier = MemoryTier(cap_bytes, policy)
    result = replay(requests, tier, model, block_tokens, progress=bool(cfg.get("progress", True)))

    summary = {
        "experiment": "replay",
        "policy": cache_cfg.policy.name,
        "trace": str(wl.trace),
        "capacity_fraction": wl.get("capacity_fraction"),
        "capacity_blocks": cap_blocks,
        "capacity_bytes": cap_bytes,
        "block_tokens": block_tokens,
        "requests": len(requests),
        "blocks": int(result.blocks.sum()),
        "unique_blocks": unique_blocks(requests),
        "chunk_hit_rate": result.chunk_hit_rate,
        "token_hit_rate": result.token_hit_rate,
        "flops_saved": result.flops_saved,
        "flops_total": result.flops_total,
        "flops_saved_fraction": result.flops_saved / result.flops_total if result.flops_total else 0.0,
        "bytes_written": result.bytes_written,
        "evictions": result.evictions,
        "replay_seconds": result.seconds,
        **result.extra,
    }
    report.write_summary(out_dir, summary, cfg)
    report.plot_hit_rate_over_time(out_dir / "hit_rate_over_time.png", result.hit_blocks, result.blocks,
                                   title=f"{Path(str(wl.trace)).name} · {summary['policy']} · "
                                         f"{cap_blocks} blocks")
    report.print_summary(summary, ["policy", "requests", "capacity_blocks", "chunk_hit_rate", "token_hit_rate",
                                   "flops_saved_fraction", "bytes_written", "evictions", "replay_seconds"])
    print(f"run dir: {out_dir}")
    return summary
