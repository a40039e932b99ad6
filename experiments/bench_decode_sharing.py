"""What a decode step costs a batch of connector hits against a batch of prefix-cache hits.

    python -m lmcache_lab.experiments.bench_decode_sharing [--rounds 12] [--requests 4] [--json out.json]

vLLM's prefix cache (APC) admits requests that share a prefix by reference: their block tables
point at one copy of the prefix's KV. A KV connector cannot do that: vLLM gives each request that
the connector serves blocks of its own and the connector fills them, so N concurrent hits on one
prefix leave N copies, and every decode step's attention reads all of them.

Each engine below serves rounds of `--requests` requests together, alternating (the driver's
`decode_sharing` op): even rounds share one prefix, odd rounds have private prefixes of the same
length; each request adds its own suffix and decodes `--max-tokens` tokens. Only steps after all of
a round's requests had their first token are timed, and the two kinds are compared inside one
engine process (process-to-process speed differs by 10-30% on a small VM):

  apc   no connector, prefix cache on: shared rounds read one copy (their requests report the
        prefix as cached), private rounds N copies
  lab   the connector (CPU tier, chunk 256), prefix cache off: shared rounds are connector hits
        (loaded into blocks of their own), private rounds are cold prefixes

`shared / private` is below 1 in `apc` by what sharing the prefix's blocks saves per step, and
about 1 in `lab`, whose hits decode like private prefixes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lmcache_lab.experiments.bench_ttft import gen, run_engine

CHUNK = 256


def model_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def kv_bytes_per_token(c: dict) -> int:
    """K and V of every layer for one token: 2 * layers * kv_heads * head_dim * dtype bytes
    (fp32 here), from the model's config.json."""
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * 4


def sharing_op(rounds: int, requests: int, prefix_tokens: int, suffix_tokens: int,
               max_tokens: int, vocab: int, seed: int) -> tuple[list[list[int]], dict]:
    """(prompts to serve first, the `decode_sharing` op): a warm-up prompt, then the shared prefix
    with a suffix of its own, so that it is in APC's cache or the connector's tier before round 0."""
    rng = np.random.default_rng(seed)
    draw = lambda n: rng.integers(10, vocab, n).tolist()    # noqa: E731
    shared = draw(prefix_tokens)
    op = {"op": "decode_sharing", "shared_prefix": shared, "max_tokens": max_tokens,
          "private_prefixes": [[draw(prefix_tokens) for _ in range(requests)]
                               for _ in range((rounds + 1) // 2)],
          "suffixes": [[draw(suffix_tokens) for _ in range(requests)] for _ in range(rounds)]}
    return [draw(300), shared + draw(suffix_tokens)], op


def summarize(result: dict) -> dict:
    ms = {kind: 1e3 * statistics.median(result[kind]["step_s"]) for kind in ("shared", "private")}
    return {"shared_step_ms": round(ms["shared"], 2), "private_step_ms": round(ms["private"], 2),
            "shared_over_private": round(ms["shared"] / ms["private"], 3),
            "decode_steps": {k: len(result[k]["step_s"]) for k in ("shared", "private")},
            "cached_tokens_median": {k: statistics.median(result[k]["num_cached_tokens"])
                                     for k in ("shared", "private")}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir",
                    default=str(Path(tempfile.gettempdir()) / "lmcache_lab_models" / "llama-6l-512"))
    ap.add_argument("--model", default=None,
                    help="an existing model directory, used as it is (default: the tiny Llama under --model-dir)")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default="bench_decode_sharing.json")
    ap.add_argument("--rounds", type=int, default=12, help="rounds per engine, shared and private alternating")
    ap.add_argument("--requests", type=int, default=4, help="requests served together per round")
    ap.add_argument("--prefix-tokens", type=int, default=1536)
    ap.add_argument("--suffix-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    # at least one round of each kind, and one decode step after the first token
    least = {"rounds": 2, "requests": 1, "prefix_tokens": 1, "suffix_tokens": 1, "max_tokens": 2}
    for name, low in least.items():
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")

    from lmcache_lab.experiments.tiny_model import TinyModelSpec, build_tiny_model

    model = args.model or str(build_tiny_model(args.model_dir, TinyModelSpec()))
    config = model_config(model)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_decode_sharing-"))
    vocab = min(16000, config["vocab_size"])
    first, op = sharing_op(args.rounds, args.requests, args.prefix_tokens, args.suffix_tokens,
                           args.max_tokens, vocab, seed=0)
    ops = [gen([p]) for p in first] + [op]
    base = {"model": model, "dtype": "float32", "max_model_len": args.prefix_tokens + args.suffix_tokens
            + args.max_tokens + 256}
    engines = {"apc": {**base, "connector": None},
               "lab": {**base, "connector": {"chunk_size": CHUNK}, "enable_prefix_caching": False}}
    t0 = time.perf_counter()
    out: dict = {"args": vars(args), "engines": {},
                 "prefix_kv_mib_per_request": round(args.prefix_tokens * kv_bytes_per_token(config) / 2**20, 1),
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "processor": platform.machine()}}
    for name, spec in engines.items():
        print(f"[bench_decode_sharing] engine {name}: {args.rounds} rounds of {args.requests} requests", flush=True)
        run = run_engine({**spec, "ops": ops}, work / name)
        out["engines"][name] = summarize(run["results"][-1])
    out["seconds"] = round(time.perf_counter() - t0, 1)

    print(f"\n{args.requests} requests per round, prefix {args.prefix_tokens} tokens "
          f"({out['prefix_kv_mib_per_request']} MiB of KV each), suffix {args.suffix_tokens}, "
          f"{args.max_tokens} tokens decoded; medians of decode steps")
    print("| engine | shared-prefix step (ms) | private-prefix step (ms) | shared / private "
          "| cached tokens (shared / private) |")
    print("|---|---|---|---|---|")
    for name, s in out["engines"].items():
        c = s["cached_tokens_median"]
        print(f"| {name} | {s['shared_step_ms']} | {s['private_step_ms']} | **{s['shared_over_private']}** "
              f"| {c['shared']:g} / {c['private']:g} |")
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.json} ({out['seconds']} s)")
    return out


if __name__ == "__main__":
    main()
