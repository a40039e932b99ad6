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

What `prefetch` buys: one engine B per value of the connector's `prefetch` (auto, true: hits
only Redis holds load between engine steps, vLLM's async KV load; false: in the step that
schedules the request), each then serving 4 short requests that decode 48 tokens while
`--arrivals` prompts A stored arrive (after 3 steps): the arrivals' TTFT, and the decoders'
longest wait between two tokens (a load in the step stalls them).

    python -m lmcache_lab.experiments.bench_redis_ttft [--tokens 2000] [--prompts 3]
        [--prefetch auto true false] [--arrivals 2] [--json out.json]
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
from typing import Sequence

import numpy as np

from lmcache_lab.experiments.bench_redis import start_server
from lmcache_lab.experiments.bench_ttft import free_port

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


def measure_ttft(remote_tiers: dict, tokens: int, prompts: int, workdir: Path,
                 prefetch: Sequence[bool | str] = ("auto",), arrivals: int = 0,
                 decoders: int = 4) -> dict:
    """Median TTFTs of engine A (cold, APC warm) and of a second engine B (cold, warm through the
    remote tier in `remote_tiers`, e.g. {"s3": {...}} or {"redis": {...}}), both with a 512 MiB
    memory tier. See the module docstring for the sequence. One engine B per value of the
    connector's `prefetch` (the first one's numbers are top level, the others under
    "prefetch_<value>"). With `arrivals` > 0, each B then serves `decoders` short requests that
    decode 48 tokens, and `arrivals` prompts that A stored, submitted while they decode."""
    from lmcache_lab.experiments.tiny_model import TinyModelSpec, build_tiny_model

    model = str(build_tiny_model(MODEL_DIR / "llama-6l-512", TinyModelSpec()))
    rng = np.random.default_rng(0)
    prompt = lambda n=tokens: rng.integers(10, 4000, n).tolist()  # noqa: E731
    p = [prompt() for _ in range(prompts)]
    m = [prompt() for _ in range(arrivals)]              # stored by A, loaded by B while decoding
    warmup = {"op": "generate", "prompts": [prompt(300)], "max_tokens": 1}
    one = lambda xs, reset: [{"op": "generate", "prompts": [x], "max_tokens": 1,  # noqa: E731
                              "reset_each": reset} for x in xs]
    connector = {"chunk_size": 256, "tiers": {"cpu": {"capacity_bytes": "512MiB"}, **remote_tiers}}
    base = {"model": model, "dtype": "float32", "max_model_len": max(4096, tokens + 512)}
    store_m = [{"op": "generate", "prompts": m, "max_tokens": 1}] if arrivals else []
    a = run_engine({**base, "connector": connector,
                    "ops": [warmup] + one(p, True) + one(p, False) + store_m},
                   workdir / "a")["results"][1:]
    seconds = lambda rs: round(statistics.median(r["seconds"] for r in rs), 3)  # noqa: E731
    median = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    out = {"prompt_tokens": tokens, "prompts": prompts,
           "a_cold_s": seconds(a[:prompts]), "a_apc_warm_s": seconds(a[prompts:2 * prompts]),
           "a_apc_cached_tokens": [r["num_cached_tokens"][0] for r in a[prompts:2 * prompts]]}
    for i, pf in enumerate(prefetch):
        q = [prompt() for _ in range(prompts)]            # cold in this B (never stored before)
        batch = [{"op": "concurrent", "reset": True, "requests":
                  [{"prompt": prompt(256), "max_tokens": 48} for _ in range(decoders)]
                  + [{"prompt": x, "max_tokens": 1, "after_steps": 3} for x in m]}] if arrivals else []
        port = free_port()
        b = run_engine({**base, "connector": {**connector, "prefetch": pf, "metrics": {"port": port}},
                        "ops": [warmup] + one(q, True) + one(p, True) + batch
                        + [{"op": "scrape", "port": port}]},
                       workdir / f"b_prefetch_{pf}")["results"][1:]
        metrics = b.pop()
        got = {"prefetch": pf, "b_cold_s": seconds(b[:prompts]),
               "b_remote_warm_s": seconds(b[prompts:2 * prompts]),
               "b_remote_cached_tokens": [r["num_cached_tokens"][0] for r in b[prompts:2 * prompts]],
               "same_tokens": [r["tokens"] for r in b[prompts:2 * prompts]]
               == [r["tokens"] for r in a[:prompts]]}
        got["background_loaded_tokens"] = metrics.get("lmcache_lab_background_loaded_tokens_total", 0)
        got["remote_warm_vs_apc_warm"] = round(got["b_remote_warm_s"] / out["a_apc_warm_s"], 2)
        got["remote_warm_vs_cold"] = round(got["b_remote_warm_s"] / got["b_cold_s"], 3)
        if arrivals:
            r = b[2 * prompts]
            got["while_decoding"] = {
                "arrival_ttft_s": median(r["ttft_s"][decoders:]),
                "decoder_max_gap_s": median(r["max_gap_s"][:decoders]),
                "decoder_finish_s": median(r["finish_s"][:decoders]),
                "arrival_cached_tokens": r["num_cached_tokens"][decoders:],
                "same_tokens": r["tokens"][decoders:] == a[2 * prompts]["tokens"]}
        out.update(got) if i == 0 else out.update({f"prefetch_{pf}": got})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prefetch", nargs="+", default=["auto", "true", "false"],
                    help="engine B's `prefetch` values, one engine B each (the first: top level)")
    ap.add_argument("--arrivals", type=int, default=2,
                    help="then this many prompts A stored arrive while 4 short requests decode")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    prefetch = [{"true": True, "false": False}.get(v, v) for v in args.prefetch]
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(tmp)
        try:
            redis = {"redis": {"url": f"redis://127.0.0.1:{port}", "timeout_s": 5.0}}
            out = measure_ttft(redis, args.tokens, args.prompts, Path(tmp), prefetch, args.arrivals)
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
