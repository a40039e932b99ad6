"""DiskTier throughput: P processes, on one shared folder or on a folder each (docs/disk.md).

    python -m lmcache_lab.experiments.bench_disk --dir D [--procs 1 2 4] [--n 200] [--chunk-kib 256]
        [--budget-frac 2 0.5] [--reps 3]

Each process (spawned) opens its own tier on D. Phases, all processes in step (a barrier before
each): put N keys of its own (a chain); contains of every key of every process (peers' chunks
included); get of N keys of the next process's chain (its own chunks when P = 1). A phase's rate
is all processes' operations over the phase's wall time (first start to last end); the median of
`reps` runs is printed. Budget = frac x (all chunks written)."""
import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time

PHASES = ("put", "contains", "get")


def key(p, j):
    return (p * 1_000_000 + j).to_bytes(16, "little")


def worker(root, p, procs, n, chunk, budget, barrier, out, mode):
    import torch
    from lmcache_lab.policies import make_policy
    from lmcache_lab.tiers import DiskTier
    if mode != "shared":
        root, budget = os.path.join(root, str(p)), budget // procs
    tier = DiskTier(root, budget, make_policy("lru"))
    value = {"kv": torch.full((chunk // 4,), float(p))}
    peer = (p + 1) % procs
    ops = {
        "put": [lambda j=j: tier.put(key(p, j), value, key(p, j - 1) if j else None) for j in range(n)],
        "contains": [lambda k=key(q, j): tier.contains(k) for q in range(procs) for j in range(n)],
        "get": [lambda j=j: tier.get(key(peer if mode == "shared" else p, j)) for j in range(n)],
    }
    spans = {}
    for phase in PHASES:
        barrier.wait()
        t0 = time.time()
        results = [op() for op in ops[phase]]
        spans[phase] = (t0, time.time(), len(results))
    hits = sum(r is not None for r in results) / n
    out.put((spans, hits, tier.stats.errors + tier.stats.corrupt))


def run_once(base, procs, n, chunk, frac, mode):
    root = tempfile.mkdtemp(dir=base)
    budget = int(frac * procs * n * (chunk + 300))
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=worker, args=(root, p, procs, n, chunk, budget, barrier, out, mode)) for p in range(procs)]
    for x in ps:
        x.start()
    results = [out.get() for _ in ps]
    for x in ps:
        x.join()
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs if f.endswith(".kvc"))
    shutil.rmtree(root)
    row = {}
    for phase in PHASES:
        start = min(s[phase][0] for s, _, _ in results)
        end = max(s[phase][1] for s, _, _ in results)
        row[phase] = sum(s[phase][2] for s, _, _ in results) / (end - start)
    row["hit"] = min(h for _, h, _ in results)
    row["errors"] = sum(e for _, _, e in results)
    row["ok"] = used <= budget
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--chunk-kib", type=int, default=256)
    ap.add_argument("--budget-frac", type=float, nargs="+", default=[2.0, 0.5])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["separate", "shared"],
                    help="shared: one folder for all; separate: a folder (and 1/P of the budget) "
                         "per process, the baseline")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    chunk = a.chunk_kib * 1024
    print(f"{a.dir}: {a.chunk_kib} KiB chunks, {a.n} puts per process, median of {a.reps} rounds, "
          f"modes interleaved within each round", flush=True)
    for frac in a.budget_frac:
        for procs in a.procs:
            rows = {m: [] for m in a.modes}
            for _ in range(a.reps):
                for m in a.modes:
                    rows[m].append(run_once(a.dir, procs, a.n, chunk, frac, m))
            for m in a.modes:
                med = {k: statistics.median(r[k] for r in rows[m]) for k in PHASES + ("hit",)}
                print(f"{m:8} P={procs} budget={frac:.1f}x  put {med['put']:6.0f}/s  "
                      f"contains {med['contains']:8.0f}/s  "
                      f"get {med['get']:6.0f}/s ({med['get'] * chunk / 2**30:4.2f} GiB/s)  get-hit {med['hit']:.2f}  "
                      f"errors {sum(r['errors'] for r in rows[m])}  on-disk<=budget {all(r['ok'] for r in rows[m])}",
                      flush=True)


if __name__ == "__main__":
    main()
