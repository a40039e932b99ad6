"""Redis tier throughput against a local redis-server this benchmark starts itself.

For realistic chunk sizes, MB/s of chunk payload moved by, all in one run on one server:

  * raw redis-py, pipelined SET/GET of the very bytes the tier stores (the baseline), and SET
    again through the tier's `ZeroCopyPacker` (redis-py's default packer copies each value twice),
  * the tier's batch forms (`put_many` / `get_many`: wire encode/decode + checksum + checks),
  * both again one chunk per round trip (raw SET/GET, tier `put`/`get`),
  * `redis-benchmark` (the server's own client, 1 connection) SET/GET of the same value size.

MB/s are the best of `--repeat` rounds. Ratios (tier/raw, target >= 0.7; pipelined/one-by-one)
are the median over rounds of the ratio of two cases run back to back in that round: on a shared
machine the load changes by several times within seconds, and only adjacent runs see the same
load. The keys are deleted before every write so each write moves the bytes anew.

    python -m lmcache_lab.experiments.bench_redis [--repeat 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import redis
import torch

from lmcache_lab import wire
from lmcache_lab.config import RedisTierConfig
from lmcache_lab.tiers.redis import RedisTier
from lmcache_lab.tiers.redis_client import ZeroCopyPacker

# name -> (shape [K/V, layers, tokens, kv_heads*head_dim], chunks per batch); all bf16
CHUNKS = {
    "8B-class, 256 tok, 32 MiB": ((2, 32, 256, 8 * 128), 8),     # 32 layers x 8 KV heads x 128
    "6-layer 41M, 256 tok, 3 MiB": ((2, 6, 256, 4 * 128), 32),   # the test model of DESIGN.md
    "6-layer 41M, 16 tok, 192 KiB": ((2, 6, 16, 4 * 128), 128),  # one GPU page per chunk
}


def start_server(workdir: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
                             "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir,
                             "--maxmemory", "2gb", "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def interleaved(cases: list[tuple[str, object, object]], repeat: int) -> dict[str, list[float]]:
    """Times of each case over `repeat` rounds; every round runs every case once, in order, so
    the cases compared in a ratio run back to back and share the same moments of a busy machine."""
    times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(repeat):
        for label, fn, setup in cases:
            setup()
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], faster: str, baseline: str) -> float:
    """Median over rounds of baseline_time / faster_time (throughput of `faster` / `baseline`)."""
    return round(statistics.median(b / a for a, b in zip(times[faster], times[baseline])), 2)


def bench_size(name: str, shape, batch: int, url: str, repeat: int) -> dict:
    values = [{"kv": torch.randn(shape, generator=torch.Generator().manual_seed(i)).bfloat16()}
              for i in range(batch)]
    keys = [i.to_bytes(16, "little") for i in range(batch)]
    tier = RedisTier(RedisTierConfig(url=url, key_prefix="bench", timeout_s=10.0))
    raw = redis.Redis.from_url(url, socket_timeout=10.0)
    raw_zc = redis.Redis.from_url(url, socket_timeout=10.0, command_packer=ZeroCopyPacker())
    rkeys = [tier.redis_key(k) for k in keys]
    blobs = [wire.encode(k, v) for k, v in zip(keys, values)]
    payload = sum(v["kv"].nbytes for v in values)

    def flush():
        raw.delete(*rkeys)

    def nothing():
        pass

    def raw_set_pipe():
        p = raw.pipeline(transaction=False)
        for k, b in zip(rkeys, blobs):
            p.set(k, b)
        p.execute()

    def raw_set_pipe_zero_copy():
        p = raw_zc.pipeline(transaction=False)
        for k, b in zip(rkeys, blobs):
            p.set(k, b)
        p.execute()

    def raw_get_pipe():
        p = raw.pipeline(transaction=False)
        for k in rkeys:
            p.get(k)
        assert all(p.execute())

    def raw_set_one():
        for k, b in zip(rkeys, blobs):
            raw.set(k, b)

    def raw_get_one():
        for k in rkeys:
            assert raw.get(k)

    items = [(k, v, None, 0) for k, v in zip(keys, values)]

    def tier_put_many():
        assert all(tier.put_many(items))

    def tier_get_many():
        assert all(v is not None for v in tier.get_many(keys))

    def tier_put_one():
        for k, v in zip(keys, values):
            assert tier.put(k, v)

    def tier_get_one():
        for k in keys:
            assert tier.get(k) is not None

    t = interleaved([
        ("raw_set_pipelined", raw_set_pipe, flush), ("tier_put_many", tier_put_many, flush),
        ("raw_set_pipelined_zero_copy", raw_set_pipe_zero_copy, flush),
        ("raw_get_pipelined", raw_get_pipe, nothing), ("tier_get_many", tier_get_many, nothing),
        ("raw_set_one", raw_set_one, flush), ("tier_put_one", tier_put_one, flush),
        ("raw_get_one", raw_get_one, nothing), ("tier_get_one", tier_get_one, nothing)], repeat)
    mbps = {k: payload / min(v) / 1e6 for k, v in t.items()}
    assert tier.stats.corrupt == 0 and tier.stats.errors == 0
    flush()
    tier.close()
    raw.close()
    raw_zc.close()
    out = {"chunk": name, "chunk_bytes": payload // batch, "batch": batch,
           **{f"{k}_MBps": round(v, 1) for k, v in mbps.items()},
           "put_tier_vs_raw": ratio(t, "tier_put_many", "raw_set_pipelined"),
           "put_tier_vs_raw_zero_copy": ratio(t, "tier_put_many", "raw_set_pipelined_zero_copy"),
           "get_tier_vs_raw": ratio(t, "tier_get_many", "raw_get_pipelined"),
           "put_tier_vs_raw_one": ratio(t, "tier_put_one", "raw_set_one"),
           "get_tier_vs_raw_one": ratio(t, "tier_get_one", "raw_get_one"),
           "put_pipelined_vs_one": ratio(t, "tier_put_many", "tier_put_one"),
           "get_pipelined_vs_one": ratio(t, "tier_get_many", "tier_get_one")}
    out.update(redis_benchmark(url, len(blobs[0]), batch))
    return out


def redis_benchmark(url: str, value_bytes: int, batch: int) -> dict:
    """The server's own client: SET/GET of `value_bytes` values, 1 connection, as MB/s."""
    exe = shutil.which("redis-benchmark")
    if not exe:
        return {}
    port = url.rsplit(":", 1)[1]
    n = max(4, min(2 * batch, 64))
    try:
        res = subprocess.run([exe, "-h", "127.0.0.1", "-p", port, "-t", "set,get", "-d", str(value_bytes),
                              "-n", str(n), "-c", "1", "--csv"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {}
    out = {}
    for line in res.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] in ("SET", "GET"):
            out[f"redis_benchmark_{cells[0].lower()}_MBps"] = round(float(cells[1]) * value_bytes / 1e6, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", help="run only the chunk sizes whose name contains this")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        proc, port = start_server(workdir)
        try:
            rows = [bench_size(name, shape, batch, f"redis://127.0.0.1:{port}", args.repeat)
                    for name, (shape, batch) in CHUNKS.items() if not args.only or args.only in name]
        finally:
            proc.kill()
            proc.wait()
    gpu = "GPU" if torch.cuda.is_available() else "no GPU"
    result = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}; "
                         f"{torch.get_num_threads()} torch thread; load average {os.getloadavg()[0]:.1f}",
              "redis_server": subprocess.run(["redis-server", "--version"], capture_output=True,
                                             text=True).stdout.split()[2], "rows": rows}
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


def print_table(rows: list[dict]) -> None:
    cols = [("chunk", "chunk"), ("batch", "batch"), ("raw_set_pipelined_MBps", "raw SET pipe"),
            ("tier_put_many_MBps", "tier put_many"), ("put_tier_vs_raw", "put tier/raw"),
            ("raw_set_pipelined_zero_copy_MBps", "raw SET pipe, zero-copy packer"),
            ("put_tier_vs_raw_zero_copy", "put tier/raw zero-copy"),
            ("raw_get_pipelined_MBps", "raw GET pipe"), ("tier_get_many_MBps", "tier get_many"),
            ("get_tier_vs_raw", "get tier/raw"), ("put_tier_vs_raw_one", "put tier/raw 1-by-1"),
            ("get_tier_vs_raw_one", "get tier/raw 1-by-1"), ("tier_put_one_MBps", "tier put 1-by-1"),
            ("tier_get_one_MBps", "tier get 1-by-1"), ("put_pipelined_vs_one", "put pipe/1"),
            ("get_pipelined_vs_one", "get pipe/1"), ("redis_benchmark_set_MBps", "redis-benchmark SET"),
            ("redis_benchmark_get_MBps", "redis-benchmark GET")]
    markdown_table(rows, cols)


def markdown_table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    """Print `rows` as a Markdown table of `cols` ((key, heading) pairs); a missing key is n/a."""
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "n/a")) for k, _ in cols) + " |")


if __name__ == "__main__":
    main()
