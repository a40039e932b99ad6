"""Core benchmarks, each a ratio against a baseline measured in the same run:

  1. chunk keys/s of `ChunkKeyer` (xxh3_128 and sha256 over the token bytes) vs a plain-Python
     per-chunk sha256 that packs each token by hand;
  2. trace-replay throughput (requests/s) of the real tier + policy objects, every policy in
     POLICIES (offline ones given the future first, outside the timing), vs a bare
     `OrderedDict` LRU loop over the same trace. Beside them, two references written inline
     with C-level batches and no classes, each checked to keep the same cache as the replay:
     the dict work of a budgeted LRU tier (`inline_tier_lru_loop`: sizes, values and a recency
     order), and the replay's per-request protocol on one index (`one_index_lru_loop`), which
     shows what that protocol costs before any tier or class adds to it;
  3. with --mac, the store secret's cost per 1 and 8 MiB chunk: HMAC-SHA256 and keyed BLAKE2b
     (the candidate MACs) and `wire.decode` with the MAC, each against `wire.decode` without it
     (the read path every chunk already pays: checksum and header checks).

    python -m lmcache_lab.experiments.bench_core [--trace PATH] [--repeat 3] [--mac]
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import time
from collections import OrderedDict, deque
from itertools import chain, islice, repeat, takewhile
from typing import Sequence

import numpy as np
import torch

from lmcache_lab import wire
from lmcache_lab.cost import LLAMA3_8B
from lmcache_lab.experiments.replay import replay, replay_tier
from lmcache_lab.experiments.trace import load_trace, unique_blocks
from lmcache_lab.keys import ChunkKeyer, Namespace
from lmcache_lab.policies import POLICIES, make_policy


def plain_python_keys(tokens: list[int], chunk_size: int) -> list[bytes]:
    """Baseline: per chunk, pack each token with int.to_bytes and sha256 the chain."""
    prev, out = b"namespace", []
    for start in range(0, len(tokens) - chunk_size + 1, chunk_size):
        data = b"".join(t.to_bytes(4, "little") for t in tokens[start:start + chunk_size])
        prev = hashlib.sha256(prev + data).digest()
        out.append(prev)
    return out


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_hashing(num_tokens: int = 32768, chunk_size: int = 256, repeat: int = 5) -> dict:
    tokens = np.random.default_rng(0).integers(0, 128_000, num_tokens).tolist()
    chunks = num_tokens // chunk_size
    base = best_of(lambda: plain_python_keys(tokens, chunk_size), repeat)
    out = {"tokens": num_tokens, "chunks": chunks, "baseline_keys_per_s": chunks / base}
    for h in ("xxh3_128", "sha256"):
        keyer = ChunkKeyer(Namespace("bench"), chunk_size, h)
        t = best_of(lambda: keyer.keys(tokens), repeat)
        out[f"{h}_keys_per_s"] = chunks / t
        out[f"{h}_us_per_chunk"] = t / chunks * 1e6
        out[f"{h}_speedup"] = base / t
    return out


def bench_mac(sizes_mib: Sequence[int] = (1, 8), repeat: int = 5) -> dict:
    """Microseconds per chunk of each MAC candidate and of the read path with and without it."""
    key, mac = b"k" * 32, wire.mac_key(b"bench secret of 32 bytes........")
    out = {}
    for mib in sizes_mib:
        kv = {"kv": torch.randint(0, 255, (mib * 2**20,), dtype=torch.uint8)}
        plain, signed = bytes(wire.encode(key, kv)), bytes(wire.encode(key, kv, mac_key=mac))
        payload = memoryview(plain)[wire._PREFIX.size:]
        runs = {
            "decode": lambda: wire.decode(plain, key),
            "decode_mac": lambda: wire.decode(signed, key, mac_key=mac),
            "hmac_sha256": lambda: hmac.new(mac, payload, "sha256").digest(),
            "blake2b": lambda: hashlib.blake2b(payload, key=mac, digest_size=32).digest(),
        }
        times = {name: best_of(fn, repeat) for name, fn in runs.items()}
        for name, t in times.items():
            out[f"{mib}MiB_{name}_us"] = t * 1e6
            out[f"{mib}MiB_{name}_vs_decode"] = t / times["decode"]
    return out


def print_mac(m: dict, sizes_mib: Sequence[int], repeat: int) -> None:
    print(f"\nstore secret, per chunk (best of {repeat}); ratio against wire.decode without a MAC:")
    for mib in sizes_mib:
        for name, label in (("decode", "wire.decode, no secret"), ("decode_mac", "wire.decode with the MAC"),
                            ("hmac_sha256", "HMAC-SHA256 of the value"), ("blake2b", "keyed BLAKE2b of it")):
            us = m[f"{mib}MiB_{name}_us"]
            print(f"  {mib} MiB  {label:<28} {us:>9,.0f} us  {mib * 2**20 / us / 1e3:>6.2f} GB/s  "
                  f"{m[f'{mib}MiB_{name}_vs_decode']:>6.2f}x")


def bare_lru_loop(requests, capacity_blocks: int) -> float:
    """Baseline: the simplest LRU prefix-cache simulation, an OrderedDict and nothing else."""
    cache: OrderedDict = OrderedDict()
    hits = total = 0
    for req in requests:
        ids = req.hash_ids
        n = 0
        while n < len(ids) and ids[n] in cache:
            n += 1
        hits += n
        total += len(ids)
        for key in ids:
            if key in cache:
                cache.move_to_end(key)
            else:
                cache[key] = None
                if len(cache) > capacity_blocks:
                    cache.popitem(last=False)
    return hits / max(1, total)


def inline_tier_lru_loop(requests, capacity_blocks: int) -> float:
    """Reference: the dict work a byte-budgeted LRU tier does per block (a size index, a value index
    and a recency order holding each key's parent), written inline with C-level batches and no
    classes. The replay of the real objects does this work plus its calls; the gap between this
    loop and the bare one is what keeping values, sizes and tail-first order costs in CPython."""
    consume = deque(maxlen=0).extend
    sizes: dict = {}
    values: dict = {}
    order: OrderedDict = OrderedDict()
    block = object()
    hits = total = 0
    for req in requests:
        ids = req.hash_ids
        n = len(list(takewhile(sizes.__contains__, ids)))
        hits += n
        total += len(ids)
        consume(map(order.move_to_end, reversed(ids[:n])))
        if n < len(ids):
            new = ids[n:]
            over = len(order) + len(new) - capacity_blocks
            if over > 0:
                victims = list(islice(order, over))
                consume(map(order.pop, victims))
                consume(map(sizes.pop, victims))
                consume(map(values.pop, victims))
            sizes.update(zip(new, repeat(1)))
            values.update(zip(new, repeat(block)))
            tail_first = new[::-1]
            order.update(zip(tail_first, chain(islice(tail_first, 1, None), (ids[n - 1] if n else None,))))
        consume(map(order.move_to_end, reversed(ids)))
    return hits / max(1, total)


def one_index_lru_loop(requests, capacity_blocks: int) -> float:
    """Reference: the replay's per-request protocol (what a live engine does: look up, touch the
    loaded prefix, evict and store the rest tail first, touch the whole chain) for LRU on a single
    `OrderedDict` of key -> (value, parent), the least any tier and policy sharing one index would
    keep. No budget, pins or classes; the gap to the bare loop is what the protocol costs: the
    bare loop touches each block once, the protocol moves a hit three times (load, the parent
    raise that keeps ancestors newer than a stored chain, the final touch) and a stored block
    twice (insert, final touch)."""
    consume = deque(maxlen=0).extend
    index: OrderedDict = OrderedDict()   # key -> (value, parent), oldest first
    move, block = index.move_to_end, object()
    hits = total = 0
    for req in requests:
        ids = req.hash_ids
        n = len(list(takewhile(index.__contains__, ids)))
        hits += n
        total += len(ids)
        consume(map(move, reversed(ids[:n])))
        if n < len(ids):
            over = len(index) + len(ids) - n - capacity_blocks
            if over > 0:
                consume(map(index.pop, list(islice(index, over))))
            parent = ids[n - 1] if n else None
            tail_first = ids[n:][::-1]
            index.update(zip(tail_first, zip(repeat(block), chain(islice(tail_first, 1, None), (parent,)))))
            while parent is not None and parent in index:   # raise the parent and its ancestors
                move(parent)
                parent = index[parent][1]
        consume(map(move, reversed(ids)))
    return hits / max(1, total)


REFERENCES = {"inline_tier_lru": inline_tier_lru_loop, "one_index_lru": one_index_lru_loop}


def bench_replay(trace: str | None, fraction: float = 0.05, repeat: int = 3,
                 policies: Sequence[str] = tuple(POLICIES)) -> dict:
    """Every loop is timed in rounds beside the bare baseline (best of `repeat` each): these
    machines are shared, and a loop's speed also drifts with the heap the previous one left.
    Each reference and the real LRU replay must keep the same cache (same hit rate)."""
    requests = load_trace(trace)
    cap = int(fraction * unique_blocks(requests))
    longest = max(len(req.hash_ids) for req in requests)
    if cap < longest:
        raise ValueError(f"fraction {fraction}: a capacity of {cap} blocks cannot hold the longest request "
                         f"({longest} blocks), which the reference loops assume; use a larger fraction")
    block_bytes = 512 * LLAMA3_8B.kv_bytes_per_token
    lru_hit_rate = inline_tier_lru_loop(requests, cap)

    def reference(loop):
        def run():
            assert loop(requests, cap) == lru_hit_rate, f"{loop.__name__} keeps another cache than LRU"
        return run

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # name -> a run returning the seconds it took (a replay times its request loop only)
    out = {"trace": str(trace), "requests": len(requests), "capacity_blocks": cap}
    loops = [("bare_lru", lambda: timed(lambda: bare_lru_loop(requests, cap)))]
    loops += [(name, lambda loop=loop: timed(reference(loop))) for name, loop in REFERENCES.items()]
    for name in policies:
        def run(name=name):
            result = replay(requests, replay_tier(requests, make_policy(name, 512), cap * block_bytes), LLAMA3_8B)
            if name == "lru":
                assert result.chunk_hit_rate == lru_hit_rate, (result.chunk_hit_rate, lru_hit_rate)
            return result.seconds
        loops.append((name, run))
    for name, run in loops:
        times, bases = [], []
        for _ in range(repeat):
            bases.append(best_of(lambda: bare_lru_loop(requests, cap), 1))
            times.append(run())
        out[f"{name}_req_per_s"] = len(requests) / min(times)
        out[f"{name}_vs_bare"] = min(bases) / min(times)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="sample", help="Mooncake-format trace (default: the shipped sample)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.05, help="capacity, fraction of unique blocks")
    ap.add_argument("--skip-hashing", action="store_true")
    ap.add_argument("--mac", action="store_true", help="also measure the store secret's MAC per chunk")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    h = {} if args.skip_hashing else bench_hashing(repeat=args.repeat)
    if h:
        print_hashing(h, args.repeat)
    m = bench_mac(repeat=args.repeat) if args.mac else {}
    if m:
        print_mac(m, (1, 8), args.repeat)
    policies = [name for name in args.policies.split(",") if name]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        ap.error(f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    try:
        r = bench_replay(args.trace, fraction=args.fraction, repeat=args.repeat, policies=policies)
    except ValueError as e:
        ap.error(f"--{e}")
    print(f"\ntrace replay, {r['trace']}, {r['requests']} requests, capacity {r['capacity_blocks']} blocks "
          f"({args.fraction:.0%} of unique), best of {args.repeat}:")
    print(f"  bare OrderedDict LRU loop      {r['bare_lru_req_per_s']:>12,.0f} req/s  {r['bare_lru_vs_bare']:>5.2f}x")
    print(f"  inline tier+LRU dict work      {r['inline_tier_lru_req_per_s']:>12,.0f} req/s  "
          f"{r['inline_tier_lru_vs_bare']:>5.2f}x   (reference: no classes)")
    print(f"  replay protocol, one index     {r['one_index_lru_req_per_s']:>12,.0f} req/s  "
          f"{r['one_index_lru_vs_bare']:>5.2f}x   (reference: no tier, no classes)")
    for name in policies:
        print(f"  replay {name:<22}  {r[name + '_req_per_s']:>12,.0f} req/s  {r[name + '_vs_bare']:>5.2f}x")
    result = {"hashing": h, "mac": m, "replay": r}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


def print_hashing(h: dict, repeat: int) -> None:
    print(f"chunk hashing, {h['tokens']} tokens in {h['chunks']} chunks of 256 (best of {repeat}):")
    print(f"  plain-Python sha256 baseline   {h['baseline_keys_per_s']:>12,.0f} keys/s   1.00x")
    for name in ("xxh3_128", "sha256"):
        print(f"  ChunkKeyer {name:<10}          {h[name + '_keys_per_s']:>12,.0f} keys/s "
              f"{h[name + '_speedup']:>6.1f}x   ({h[name + '_us_per_chunk']:.2f} us/chunk)")


if __name__ == "__main__":
    main()
