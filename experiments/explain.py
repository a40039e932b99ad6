"""Lab tools that say how much of Belady a trace allows, one command each, each writing a figure
and a CSV table (and printing the table):

    python -m lmcache_lab.experiments.explain stack        --trace T [--out DIR]
    python -m lmcache_lab.experiments.explain belady-gap   --trace T [--capacity 0.05 0.1] [--out DIR]
    python -m lmcache_lab.experiments.explain noisy-oracle --trace T [--capacity 0.05 0.1] [--auc ...] [--out DIR]

`T` is a Mooncake-format trace (`sample`: the bundled one). Capacities are fractions of the
trace's unique blocks, as in the replay.

stack        Mattson stack distances (Mattson, Gecsei, Slutz & Traiger, IBM Systems Journal 1970)
             with the prefix rule: LRU's hit rate at every capacity in one pass (`lru_stack_hits`).
belady-gap   where Belady's extra hits over LRU come from: per block reference, hit under the
             ceiling (`belady_prefix`) minus hit under LRU, summed by class (`block_classes`).
noisy-oracle hit rate of a policy that is told, at each use of a chunk, a noisy prediction of
             whether it is used again within the cache's size in requests, for predictors of a
             given AUC simulated from the trace's future (`NoisyOraclePolicy`).
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from statistics import NormalDist
from typing import Sequence

import numpy as np

from lmcache_lab.cost import LLAMA3_8B
from lmcache_lab.experiments.replay import replay, replay_tier
from lmcache_lab.experiments.trace import TraceRequest, load_trace, unique_blocks
from lmcache_lab.policies import make_policy
from lmcache_lab.policies.learned import roc_auc
from lmcache_lab.policies.sampled import ScoredPolicy

BLOCK_BYTES = 512 * LLAMA3_8B.kv_bytes_per_token


def replay_hits(requests: Sequence[TraceRequest], policy, capacity_blocks: int) -> np.ndarray:
    """Leading hit blocks per request of one replay (the replay's own counting)."""
    if isinstance(policy, str):
        policy = make_policy(policy, 512)
    return replay(requests, replay_tier(requests, policy, capacity_blocks * BLOCK_BYTES), LLAMA3_8B).hit_blocks


# ---- (c) stack distances --------------------------------------------------------------------------
def lru_stack_hits(chains: Sequence[Sequence[int]]) -> np.ndarray:
    """hits[c] = blocks LRU hits over the trace at a capacity of c blocks, for every c, in one pass.

    After each request the LRU order is the request's blocks (first block most recent) above the
    previous order, and LRU at capacity c holds the top c blocks (the replay evicts the oldest
    leaves, and under LRU the oldest blocks are leaves). A block is resident at capacity c iff its
    stack distance (distinct blocks used more recently) is < c; under the prefix rule the request
    hits its block i iff every block up to i is, i.e. iff the running maximum d_i of the distances
    along the chain is < c. So hits[c] = #{block references with d_i < c}: a histogram of d.
    Exact for every c >= the longest request (a shorter cache cannot hold a request's chain and
    the replay stores only part of it). Distances come from a Fenwick tree over access times:
    O(log n) per block reference."""
    total = sum(len(c) for c in chains)
    tree = [0] * (total + 2)
    marked = 0
    last: dict[int, int] = {}
    counts = np.zeros(total + 2, dtype=np.int64)     # counts[d]: references with running max d
    t = 0

    def add(i, v):
        while i < len(tree):
            tree[i] += v
            i += i & -i

    def prefix(i):
        s = 0
        while i > 0:
            s += tree[i]
            i -= i & -i
        return s

    for chain in chains:
        running = -1
        for key in chain:
            at = last.get(key)
            if at is None:
                running = math.inf
            elif running != math.inf:
                running = max(running, marked - prefix(at))
            if running != math.inf:        # a first use (and what follows it) misses at every capacity
                counts[running] += 1
        for key in reversed(chain):
            t += 1
            at = last.get(key)
            if at is not None:
                add(at, -1)
                marked -= 1
            add(t, 1)
            marked += 1
            last[key] = t
    return np.concatenate([[0], np.cumsum(counts)])[: total + 2]


def stack_curve(requests: Sequence[TraceRequest]) -> tuple[np.ndarray, np.ndarray, int]:
    """(capacities in blocks, LRU chunk hit rate at each, longest request) up to the unique blocks."""
    chains = [r.hash_ids for r in requests]
    hits = lru_stack_hits(chains)
    n_unique = unique_blocks(list(requests))
    total = sum(len(c) for c in chains)
    caps = np.arange(0, n_unique + 1)
    return caps, hits[np.minimum(caps, len(hits) - 1)] / max(1, total), max(len(c) for c in chains)


# ---- (a) Belady's extra hits by class ---------------------------------------------------------------
TURN_EDGES = (1, 2, 3, 5, 9)
USES_EDGES = (0, 1, 2, 4, 8)
DEPTH_EDGES = (0, 1, 4, 16, 64)


def _bucket(value: float, edges: Sequence[int]) -> str:
    i = sum(value >= e for e in edges) - 1
    lo = edges[i]
    return f"{lo}+" if i == len(edges) - 1 else (f"{lo}" if edges[i + 1] == lo + 1 else f"{lo}-{edges[i + 1] - 1}")


def block_classes(requests: Sequence[TraceRequest]) -> dict[str, list[str]]:
    """Per block reference (requests in order, blocks in chain order), its class on three axes:
      turn   1 + earlier requests with the same first two blocks (the session or document the
             request continues; the root block alone is often a shared system prompt)
      uses   earlier requests that used this block (0: its first use)
      depth  its position in the chain, in blocks"""
    seen_session: dict[tuple, int] = {}
    uses: dict[int, int] = {}
    out: dict[str, list[str]] = {"turn": [], "uses": [], "depth": []}
    for req in requests:
        ids = req.hash_ids
        session = tuple(ids[:2])
        turn = seen_session.get(session, 0) + 1
        seen_session[session] = turn
        turn_b = _bucket(turn, TURN_EDGES)
        for depth, key in enumerate(ids):
            out["turn"].append(turn_b)
            out["uses"].append(_bucket(uses.get(key, 0), USES_EDGES))
            out["depth"].append(_bucket(depth, DEPTH_EDGES))
        for key in set(ids):
            uses[key] = uses.get(key, 0) + 1
    return out


def hit_mask(requests: Sequence[TraceRequest], hit_blocks: np.ndarray) -> np.ndarray:
    """Per block reference: 1 if the request's leading hit run covers it."""
    return np.concatenate([np.arange(len(r.hash_ids)) < n for r, n in zip(requests, hit_blocks)]).astype(np.int64)


def belady_gap(requests: Sequence[TraceRequest], capacity_blocks: int, ceiling: str = "belady_prefix") -> list[dict]:
    """Rows (axis, class, references, LRU hits, ceiling hits, extra, share of the total extra)."""
    lru = hit_mask(requests, replay_hits(requests, "lru", capacity_blocks))
    best = hit_mask(requests, replay_hits(requests, ceiling, capacity_blocks))
    extra_total = int(best.sum() - lru.sum())
    rows = []
    for axis, labels in block_classes(requests).items():
        labels = np.asarray(labels)
        edges = {"turn": TURN_EDGES, "uses": USES_EDGES, "depth": DEPTH_EDGES}[axis]
        for cls in dict.fromkeys(_bucket(e, edges) for e in edges):
            sel = labels == cls
            extra = int(best[sel].sum() - lru[sel].sum())
            rows.append(dict(axis=axis, cls=cls, refs=int(sel.sum()), lru_hits=int(lru[sel].sum()),
                             ceiling_hits=int(best[sel].sum()), extra=extra,
                             share=extra / extra_total if extra_total else 0.0))
    return rows


# ---- (b) noisy oracle -------------------------------------------------------------------------------
def noise_for_auc(auc: float) -> float:
    """Standard deviation of Gaussian noise added to a 0/1 label so that the score has ROC AUC
    `auc` (binormal equal-variance model: AUC = Phi(1 / (sigma * sqrt 2))); 0 for auc = 1."""
    if not 0.5 < auc <= 1:
        raise ValueError(f"--auc: each value must be in (0.5, 1], got {auc!r}")
    return 0.0 if auc == 1 else 1.0 / (math.sqrt(2) * NormalDist().inv_cdf(auc))


class NoisyOraclePolicy(ScoredPolicy):
    """Offline, for the noisy-oracle curve: at each request that uses or stores a chunk, the policy
    is told `y + sigma * eps` where y = 1 if the chunk's next use is within `horizon` requests and
    eps ~ N(0, 1) (seeded, one draw per block reference). It evicts the sampled leaf whose
    prediction has expired (age > horizon) first, oldest first, else the lowest prediction
    (ties: oldest first)."""
    name = "noisy_oracle"
    offline = True

    def __init__(self, horizon: float, sigma: float, chunk_tokens: int = 512, samples: int = 32, seed: int = 0):
        super().__init__(chunk_tokens, samples, seed)
        self.horizon, self.sigma, self.seed = horizon, sigma, seed
        self.prepared = False
        self.scores: list[np.ndarray] = []   # per request: the prediction told for each block
        self.labels: list[np.ndarray] = []   # per request: 1 if the block's next use is within the horizon
        self._told: list[dict] = []
        self._r = -1

    def prepare(self, chains):
        next_use: dict = {}
        rng = np.random.default_rng(self.seed)
        self.scores, self.labels, self._told = [None] * len(chains), [None] * len(chains), [None] * len(chains)
        for r in range(len(chains) - 1, -1, -1):
            chain = chains[r]
            y = np.fromiter((next_use.get(k, math.inf) - r <= self.horizon for k in chain), dtype=np.float64,
                            count=len(chain))
            s = y + self.sigma * rng.standard_normal(len(chain))
            self.labels[r], self.scores[r] = y, s
            self._told[r] = dict(zip(chain, s.tolist()))
            for k in chain:
                next_use[k] = r
        self.prepared = True

    def advance(self, r):
        self._r = r

    def _touched(self, key, info):
        info.cache = self._told[self._r][key]

    def _stored(self, key, info):
        info.cache = self._told[self._r][key]

    def _score(self, info, now):
        age = now - info.last
        return info.last - now - 1e9 if age > self.horizon else info.cache - 1e-9 * age


HORIZON_FACTORS = (1, 2, 4, 8, 16)


def noisy_oracle(requests: Sequence[TraceRequest], capacity_blocks: int, aucs: Sequence[float],
                 seed: int = 0) -> list[dict]:
    """Rows (auc asked, auc measured over all block references, horizon, chunk hit rate).

    The horizon is part of the policy: the cache's size in requests under LRU (capacity / mean
    new blocks per request) times the factor in `HORIZON_FACTORS` that the perfect predictor
    (AUC 1) does best with, then kept for every AUC (a policy that keeps only what comes back
    soon holds chunks longer than LRU does)."""
    base = capacity_blocks / (unique_blocks(list(requests)) / max(1, len(requests)))
    total = sum(len(r.hash_ids) for r in requests)

    def run(horizon, auc):
        policy = NoisyOraclePolicy(horizon, noise_for_auc(auc), seed=seed)
        return policy, float(replay_hits(requests, policy, capacity_blocks).sum()) / total

    horizon = max((base * f for f in HORIZON_FACTORS), key=lambda h: run(h, 1.0)[1])
    rows = []
    for auc in aucs:
        policy, rate = run(horizon, auc)
        measured = roc_auc(np.concatenate(policy.scores), np.concatenate(policy.labels))
        rows.append(dict(auc=auc, measured_auc=measured, horizon_requests=horizon,
                         chunk_hit_rate=rate))
    return rows


# ---- command line ---------------------------------------------------------------------------------
def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{path}:")
    for row in rows:
        print("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def main(argv: Sequence[str] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(prog="python -m lmcache_lab.experiments.explain", description=__doc__.split("\n\n")[0])
    ap.add_argument("tool", choices=["stack", "belady-gap", "noisy-oracle"])
    ap.add_argument("--trace", default="sample", help="Mooncake-format trace (sample: the bundled one)")
    ap.add_argument("--capacity", type=float, nargs="+", default=[0.05, 0.1], help="fractions of the unique blocks")
    ap.add_argument("--auc", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0])
    ap.add_argument("--out", default=".", help="folder for the figure and the table")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for c in args.capacity:
        if not 0 < c <= 1:
            raise SystemExit(f"--capacity: each value must be in (0, 1], got {c}")
    requests = load_trace(args.trace)
    name = Path(args.trace).stem if args.trace != "sample" else "sample"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_unique = unique_blocks(requests)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))

    if args.tool == "stack":
        caps, rate, longest = stack_curve(requests)
        step = max(1, len(caps) // 400)
        _write(out / f"stack_{name}.csv", [dict(capacity_blocks=int(c), capacity_fraction=c / n_unique,
                                                lru_chunk_hit_rate=float(h))
                                           for c, h in zip(caps[::step], rate[::step])])
        ax.plot(caps / n_unique, rate)
        ax.axvline(longest / n_unique, ls=":", c="grey",
                   label=f"longest request ({longest} blocks): exact to the right")
        for c in args.capacity:
            ax.axvline(c, ls="--", lw=0.8, c="k")
        ax.set(xlabel="capacity (fraction of unique blocks)", ylabel="LRU chunk hit rate",
               title=f"{name}: LRU stack curve")
        ax.legend(fontsize=8)
        fig.savefig(out / f"stack_{name}.png", dpi=120, bbox_inches="tight")
    elif args.tool == "belady-gap":
        rows = []
        for c in args.capacity:
            rows += [dict(capacity_fraction=c, **r) for r in belady_gap(requests, int(c * n_unique))]
        _write(out / f"belady_gap_{name}.csv", rows)
        fig.set_size_inches(11, 3.6)
        fig.clear()
        axes = fig.subplots(1, 3, sharey=True)
        width = 0.8 / len(args.capacity)
        for a, axis in zip(axes, ("turn", "uses", "depth")):
            for j, c in enumerate(args.capacity):
                sel = [r for r in rows if r["axis"] == axis and r["capacity_fraction"] == c]
                a.bar(np.arange(len(sel)) + j * width, [r["share"] for r in sel], width, label=f"{c:.0%}")
                a.set_xticks(np.arange(len(sel)) + width * (len(args.capacity) - 1) / 2, [r["cls"] for r in sel])
            a.set(xlabel=axis)
        axes[0].set_ylabel("share of Belady's extra hits over LRU")
        axes[0].legend(title="capacity", fontsize=8)
        fig.suptitle(f"{name}: where the ceiling's extra hits are")
        fig.savefig(out / f"belady_gap_{name}.png", dpi=120, bbox_inches="tight")
    else:
        rows = []
        for c in args.capacity:
            cap = int(c * n_unique)
            lru = float(replay_hits(requests, "lru", cap).sum()) / sum(len(r.hash_ids) for r in requests)
            best = float(replay_hits(requests, "belady_prefix", cap).sum()) / sum(len(r.hash_ids) for r in requests)
            for r in noisy_oracle(requests, cap, args.auc, args.seed):
                gap = (r["chunk_hit_rate"] - lru) / (best - lru) if best > lru else 0.0
                rows.append(dict(capacity_fraction=c, lru=lru, belady_prefix=best, **r, gap_closed=gap))
        _write(out / f"noisy_oracle_{name}.csv", rows)
        for c in args.capacity:
            sel = [r for r in rows if r["capacity_fraction"] == c]
            ax.plot([r["measured_auc"] for r in sel], [r["gap_closed"] for r in sel], "o-", label=f"{c:.0%}")
        ax.axhline(0, c="grey", lw=0.8)
        ax.set(xlabel="AUC of the reuse predictor", ylabel="share of the LRU → Belady gap closed",
               title=f"{name}: noisy-oracle curve")
        ax.legend(title="capacity", fontsize=8)
        fig.savefig(out / f"noisy_oracle_{name}.png", dpi=120, bbox_inches="tight")
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
