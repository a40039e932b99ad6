"""Drive one real vLLM engine through a list of operations, in this process, and write JSON.

    python -m lmcache_lab.experiments.vllm_driver spec.json result.json

Each engine runs in its own process (tests and benchmarks start this module with `subprocess`),
so engines never share state except through what they are meant to share (a disk tier).

spec = {
  "model": "<dir>", "dtype": "float32" | "bfloat16",
  "connector": {...lmcache_lab config...} | null,      # LMCacheLabConnector with this extra config
  "example_connector": "<dir>" | null,                  # vLLM's in-tree ExampleConnector instead
  "enable_prefix_caching": true, "max_model_len": 4096, "max_num_batched_tokens": null,
  "ops": [
    {"op": "generate", "prompts": [[ids...], ...], "max_tokens": 8, "reset_each": false},
                                                   # greedy; records tokens, num_cached_tokens and
                                                   # the call's wall time; reset_each: one prompt
                                                   # at a time, reset_prefix_cache() before each
    {"op": "reset"},                               # llm.reset_prefix_cache()
    {"op": "scrape", "port": 9100},                # lmcache_lab_* samples from the endpoint
    {"op": "corrupt", "path": "<disk tier dir>", "positions": [256]},  # damage stored chunks
    {"op": "sleep", "seconds": 0.5}
  ]}
result = {"results": [one entry per op], "startup_s": float}
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def kv_transfer_config(spec: dict) -> dict | None:
    if spec.get("connector") is not None:
        return {"kv_connector": "LMCacheLabConnector",
                "kv_connector_module_path": "lmcache_lab.integrations.vllm",
                "kv_role": "kv_both", "kv_connector_extra_config": spec["connector"]}
    if spec.get("example_connector"):
        return {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"shared_storage_path": spec["example_connector"]}}
    return None


def scrape(port: int) -> dict[str, float]:
    """lmcache_lab_* samples of the metrics endpoint, `name{labels}` -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("lmcache_lab_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def corrupt(path: str, positions: list[int]) -> int:
    """Flip payload bytes of the stored chunks at these token positions; returns files hit."""
    from lmcache_lab import wire

    hit = 0
    for f in Path(path).glob("*/*.kvc"):
        data = bytearray(f.read_bytes())
        _, _, hlen, _ = wire._PREFIX.unpack_from(data)
        header = json.loads(bytes(data[wire._PREFIX.size:wire._PREFIX.size + hlen]))
        if header["position"] in positions:
            data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
            f.write_bytes(bytes(data))
            hit += 1
    return hit


def run(spec: dict) -> dict:
    for k, v in CPU_ENV.items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    kwargs = dict(model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=True,
                  seed=0, max_model_len=spec.get("max_model_len", 4096),
                  enable_prefix_caching=spec.get("enable_prefix_caching", True))
    if spec.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    ktc = kv_transfer_config(spec)
    if ktc is not None:
        kwargs["kv_transfer_config"] = ktc
    llm = LLM(**kwargs)
    results: list = [] 
    out = {"startup_s": time.perf_counter() - t0, "results": results}
    for op in spec["ops"]:
        kind = op["op"]
        if kind == "generate":
            params = SamplingParams(temperature=0.0, max_tokens=op.get("max_tokens", 8),
                                    ignore_eos=True)
            prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in op["prompts"]]
            if op.get("reset_each"):   # one prompt at a time, each with the engine's APC empty
                outs, seconds = [], 0.0
                for p in prompts:
                    llm.reset_prefix_cache()
                    t = time.perf_counter()
                    outs += llm.generate([p], params, use_tqdm=False)
                    seconds += time.perf_counter() - t
            else:
                t = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - t
            results.append({"seconds": seconds,
                            "tokens": [list(o.outputs[0].token_ids) for o in outs],
                            "num_cached_tokens": [o.num_cached_tokens for o in outs]})
        elif kind == "reset":
            results.append(llm.reset_prefix_cache())
        elif kind == "scrape":
            results.append(scrape(op["port"]))
        elif kind == "corrupt":
            results.append(corrupt(op["path"], op["positions"]))
        elif kind == "sleep":
            time.sleep(op["seconds"])
            results.append(None)
        else:
            raise ValueError(f"unknown op {kind!r}")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    out = run(spec)
    Path(argv[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
