"""Time to first token of a second vLLM engine that loads a prefix through Redis.

One run, one local redis-server, two engine processes with the LMCacheLabConnector (memory tier +
Redis tier), the tiny random Llama of `lmcache_lab.experiments.tiny_model` (6 layers, ~40M parameters):

  engine A   cold prefill of prompts P1..Pn (stored to Redis), then the same prompts again with
             vLLM's own prefix cache (APC) warm: the APC-warm TTFT
  engine B   (a new process, empty memory tier) cold prefill of other prompts Q1..Qn: its cold
             TTFT; then P1..Pn with APC reset before each, so the prefix comes through Redis

TTFT = wall time of a generate call with max_tokens=1 (median over the n prompts). Ratios: B's
Redis-warm vs A's APC-warm and vs B's own cold. `measure_ttft` runs the same sequence for any
remote tier (bench_s3 uses it for S3).

    python -m lmcache_lab.experiments.bench_redis_ttft [--tokens 2000] [--prompts 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from lmcache_lab.experiments.bench_redis import start_server

MODEL_DIR = Path(os.environ.get("LMCACHE_LAB_TEST_MODELS", Path(tempfile.gettempdir()) / "lmcache_lab_test_models"))


def run_engine(spec: dict, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    with open(workdir / "engine.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "lmcache_lab.experiments.vllm_driver",
                               str(workdir / "spec.json"), str(workdir / "out.json")],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=900)
    if proc.returncode != 0:
        tail = "\n".join((workdir / "engine.log").read_text().splitlines()[-30:])
        raise RuntimeError(f"engine failed (rc={proc.returncode}):\n{tail}")
    return json.loads((workdir / "out.json").read_text())


def measure_ttft(remote_tiers: dict, tokens: int, prompts: int, workdir: Path) -> dict:
    """Median TTFTs of engine A (cold, APC warm) and of a second engine B (cold, warm through the
    remote tier in `remote_tiers`, e.g. {"s3": {...}} or {"redis": {...}}), both with a 512 MiB
    memory tier. See the module docstring for the sequence."""
    from lmcache_lab.experiments.tiny_model import TinyModelSpec, build_tiny_model

    model = str(build_tiny_model(MODEL_DIR / "llama-6l-512", TinyModelSpec()))
    rng = np.random.default_rng(0)
    prompt = lambda: rng.integers(10, 4000, tokens).tolist()  # noqa: E731
    p = [prompt() for _ in range(prompts)]
    q = [prompt() for _ in range(prompts)]
    warmup = {"op": "generate", "prompts": [prompt()[:300]], "max_tokens": 1}
    one = lambda xs, reset: [{"op": "generate", "prompts": [x], "max_tokens": 1,  # noqa: E731
                              "reset_each": reset} for x in xs]
    connector = {"chunk_size": 256, "tiers": {"cpu": {"capacity_bytes": "512MiB"}, **remote_tiers}}
    base = {"model": model, "dtype": "float32", "connector": connector,
            "max_model_len": max(4096, tokens + 512)}
    a = run_engine({**base, "ops": [warmup] + one(p, True) + one(p, False)}, workdir / "a")["results"][1:]
    b = run_engine({**base, "ops": [warmup] + one(q, True) + one(p, True)}, workdir / "b")["results"][1:]
    seconds = lambda rs: round(statistics.median(r["seconds"] for r in rs), 3)  # noqa: E731
    out = {"prompt_tokens": tokens, "prompts": prompts,
           "a_cold_s": seconds(a[:prompts]), "a_apc_warm_s": seconds(a[prompts:]),
           "b_cold_s": seconds(b[:prompts]), "b_remote_warm_s": seconds(b[prompts:]),
           "b_remote_cached_tokens": [r["num_cached_tokens"][0] for r in b[prompts:]],
           "a_apc_cached_tokens": [r["num_cached_tokens"][0] for r in a[prompts:]],
           "same_tokens": [r["tokens"] for r in b[prompts:]] == [r["tokens"] for r in a[:prompts]]}
    out["remote_warm_vs_apc_warm"] = round(out["b_remote_warm_s"] / out["a_apc_warm_s"], 2)
    out["remote_warm_vs_cold"] = round(out["b_remote_warm_s"] / out["b_cold_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(tmp)
        try:
            redis = {"redis": {"url": f"redis://127.0.0.1:{port}", "timeout_s": 5.0}}
            out = measure_ttft(redis, args.tokens, args.prompts, Path(tmp))
        finally:
            proc.kill()
            proc.wait()
    out = {"model": "tiny Llama 6 layers ~40M, fp32",
           "machine": f"{os.cpu_count()}-core CPU, load average {os.getloadavg()[0]:.1f}", **out}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
