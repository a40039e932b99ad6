"""S3 tier: throughput against the raw client, and a second engine's TTFT through S3.

From one run against one S3 endpoint (by default a local `moto_server` this benchmark starts on
loopback; `--endpoint-url`/`--url` point it at MinIO or AWS S3 instead):

  throughput  for realistic chunk sizes, MB/s of chunk payload moved by the tier's batch forms
              (`put_many`/`get_many`: wire encode/decode, checksum, checks, counters) and by the
              raw boto3 client (same `botocore` config, same connection pool) doing `put_object` /
              `get_object` of the very bytes the tier stores with the same parallelism (a thread
              pool of `max_connections`). MB/s are the best of `--repeat` rounds; the ratio
              tier/raw (target >= 0.8) is the median over rounds of two cases run back to back
              (`bench_redis.interleaved`: on a shared machine only adjacent runs see one load).
  TTFT        engine A (its own process) prefills prompts P cold, storing them into the bucket,
              then again with vLLM's prefix cache (APC) warm; engine B, a new process with an
              empty memory tier, prefills other prompts Q cold, then P with APC reset before each,
              so P's prefix comes through S3. TTFT = wall time of a generate call with
              max_tokens=1 (median over the prompts). Ratios: B's S3-warm / A's APC-warm and
              B's S3-warm / B's cold, at each `--tokens` length.

    python -m lmcache_lab.experiments.bench_s3 [--repeat 5] [--tokens 2000 8000] [--prompts 3]
        [--url s3://bucket/prefix --endpoint-url http://minio:9000] [--skip-ttft] [--json out.json]

Credentials come from the standard AWS chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
`AWS_PROFILE`, instance roles); against the local moto_server any pair works and test values are
set. The objects written under the prefix are deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from lmcache_lab import wire
from lmcache_lab.config import S3TierConfig
from lmcache_lab.experiments.bench_redis import CHUNKS, interleaved, markdown_table, ratio
from lmcache_lab.experiments.bench_redis_ttft import measure_ttft
from lmcache_lab.tiers.s3 import S3Tier, _make_client

MAX_CONNECTIONS = 16
LOCAL_BUCKET = "bench"
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}


# ---- the S3 endpoint ---------------------------------------------------------------------------------
@contextmanager
def local_moto_server(workdir: Path):
    """A moto_server on a free loopback port with an empty bucket LOCAL_BUCKET; yields its URL.
    Sets test credentials in this process's environment (engine processes inherit them)."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        raise SystemExit("moto_server not found: pip install 'moto[server]', or pass --endpoint-url")
    os.environ.update(LOCAL_CREDENTIALS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(workdir / "moto.log", "wb") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start; see {workdir / 'moto.log'}")
                time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{port}"
        _make_client(S3TierConfig(url=f"s3://{LOCAL_BUCKET}", endpoint_url=endpoint)).create_bucket(
            Bucket=LOCAL_BUCKET)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---- throughput ---------------------------------------------------------------------------------------
def bench_size(name: str, shape, batch: int, config: S3TierConfig, repeat: int) -> dict:
    """MB/s of one chunk size: tier put_many/get_many vs raw put_object/get_object, same bytes,
    same parallelism, same client configuration."""
    values = [{"kv": torch.randn(shape, generator=torch.Generator().manual_seed(i)).bfloat16()}
              for i in range(batch)]
    keys = [i.to_bytes(16, "little") for i in range(batch)]
    tier = S3Tier(config)
    raw = _make_client(config)
    pool = ThreadPoolExecutor(config.max_connections)
    okeys = [tier.object_key(k) for k in keys]
    blobs = [bytes(wire.encode(k, v)) for k, v in zip(keys, values)]
    payload = sum(v["kv"].nbytes for v in values)
    items = [(k, v, None, 0) for k, v in zip(keys, values)]

    def raw_put():
        list(pool.map(lambda kb: raw.put_object(Bucket=config.bucket, Key=kb[0], Body=kb[1]),
                      zip(okeys, blobs)))

    def read(okey):
        body = raw.get_object(Bucket=config.bucket, Key=okey)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def raw_get():
        assert all(map(len, pool.map(read, okeys)))

    def tier_put():
        assert all(tier.put_many(items))

    def tier_get():
        assert all(v is not None for v in tier.get_many(keys))

    def nothing():
        pass

    try:
        t = interleaved([("raw_put", raw_put, nothing), ("tier_put", tier_put, nothing),
                         ("raw_get", raw_get, nothing), ("tier_get", tier_get, nothing)], repeat)
        assert tier.stats.corrupt == 0 and tier.stats.errors == 0, tier.stats
    finally:
        tier.clear()
        tier.close()
        pool.shutdown()
        raw.close()
    mbps = {k: round(payload / min(v) / 1e6, 1) for k, v in t.items()}
    return {"chunk": name, "chunk_bytes": payload // batch, "batch": batch,
            **{f"{k}_MBps": v for k, v in mbps.items()},
            "put_tier_vs_raw": ratio(t, "tier_put", "raw_put"),
            "get_tier_vs_raw": ratio(t, "tier_get", "raw_get")}


# ---- TTFT ---------------------------------------------------------------------------------------------
# ---- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help=f"s3://bucket/prefix (default: s3://{LOCAL_BUCKET}/bench on a local moto_server)")
    ap.add_argument("--endpoint-url", help="an S3-compatible endpoint such as http://minio:9000 (default: "
                                           "AWS S3 when --url is given, else the local moto_server)")
    ap.add_argument("--region")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", help="throughput: only the chunk sizes whose name contains this")
    ap.add_argument("--tokens", type=int, nargs="*", default=[2000, 8000], help="TTFT prompt lengths")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.url:
            result = run_all(args, args.url, args.endpoint_url, workdir)
            result["store"] = f"{args.endpoint_url or 'AWS S3'}"
        else:
            with local_moto_server(workdir) as endpoint:
                result = run_all(args, f"s3://{LOCAL_BUCKET}/bench", endpoint, workdir)
            result["store"] = "moto_server on loopback (same machine)"
    print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def run_all(args, url: str, endpoint_url: str | None, workdir: Path) -> dict:
    config = S3TierConfig(url=url.rstrip("/") + "/throughput", endpoint_url=endpoint_url, region=args.region,
                          timeout_s=60.0, max_connections=MAX_CONNECTIONS)
    rows = [bench_size(name, shape, batch, config, args.repeat)
            for name, (shape, batch) in CHUNKS.items() if not args.only or args.only in name]
    ttft = []
    for tokens in [] if args.skip_ttft else args.tokens:
        s3 = {"s3": {"url": url.rstrip("/") + f"/ttft-{tokens}", "endpoint_url": endpoint_url,
                     "region": args.region, "timeout_s": 10.0}}
        ttft.append(measure_ttft(s3, tokens, args.prompts, workdir / f"ttft-{tokens}"))
        tier = S3Tier(S3TierConfig(**s3["s3"]))
        tier.clear()
        tier.close()
    import boto3
    import botocore

    gpu = "GPU" if torch.cuda.is_available() else "no GPU"
    return {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}; "
                       f"{torch.get_num_threads()} torch thread; load average {os.getloadavg()[0]:.1f}",
            "client": f"boto3 {boto3.__version__} / botocore {botocore.__version__}, "
                      f"{MAX_CONNECTIONS} connections and threads",
            "throughput": rows, "ttft": ttft,
            "ttft_model": "tiny Llama 6 layers ~40M, fp32, chunk 256 tokens"}


def print_tables(result: dict) -> None:
    print(f"{result['machine']}; {result['client']}; store: {result['store']}\n")
    cols = [("chunk", "chunk"), ("batch", "chunks per batch"), ("raw_put_MBps", "raw put MB/s"),
            ("tier_put_MBps", "tier put_many MB/s"), ("put_tier_vs_raw", "put tier/raw"),
            ("raw_get_MBps", "raw get MB/s"), ("tier_get_MBps", "tier get_many MB/s"),
            ("get_tier_vs_raw", "get tier/raw")]
    markdown_table(result["throughput"], cols)
    if result["ttft"]:
        print()
        markdown_table(result["ttft"], [
            ("prompt_tokens", "prompt tokens"), ("a_cold_s", "A cold s"), ("a_apc_warm_s", "A APC warm s"),
            ("b_cold_s", "B cold s"), ("b_remote_warm_s", "B S3 warm s"),
            ("remote_warm_vs_apc_warm", "S3 warm / APC warm"), ("remote_warm_vs_cold", "S3 warm / cold"),
            ("same_tokens", "same tokens")])



if __name__ == "__main__":
    main()
