"""Drive a real SGLang server that uses lmcache_lab as its HiCache storage backend (SGLang's L3).

    python -m lmcache_lab.experiments.sglang_driver --model <dir or hub id> [--redis-url URL]

sends a shared-prefix workload twice, flushing SGLang's own GPU and host caches in between, so the
second pass can only reuse the prefix through lmcache_lab, and prints per pass the prompt tokens
SGLang reports as cached and the time to first token.

SGLang's engine needs a CUDA GPU and SGLang's compiled kernels. Where it cannot run (these CPU
machines), `SGLangServer.start()` raises `SGLangUnavailable` saying so and why; the backend itself
is tested without an engine (tests/sglang, docs/sglang.md).

Driver interface (conf/engine/sglang.yaml names this class in `_target_`; the other keys are its
constructor's keyword arguments, plus `model`):

    driver = SGLangServer(model=..., cache={...lmcache_lab config...}, ...)
    driver.start()                       # launch on a free 127.0.0.1 port, wait until healthy
    rec = driver.generate(prompt_ids, max_tokens)   # streamed; -> Completion (TTFT, cached tokens)
    driver.flush()                       # drop SGLang's own device/host caches (not lmcache_lab's)
    driver.stop()                        # terminate the server's process group
    driver.run_arm(arm, requests, workdir, progress)  # the experiment runner's per-arm entry
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from lmcache_lab.experiments.engine_run import sse_messages, stop_process_group


class SGLangUnavailable(RuntimeError):
    """SGLang's serving engine cannot run on this machine (the message says why)."""


def engine_unavailable_reason() -> str | None:
    """Why SGLang's engine cannot run here, or None when it can be launched."""
    if importlib.util.find_spec("sglang") is None:
        return "the sglang package is not installed"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return ("no CUDA GPU is visible (SGLang's engine runs on GPUs; its CPU engine needs a "
                "source-built kernel package)")
    if importlib.util.find_spec("sgl_kernel") is None:
        return ("SGLang's compiled kernels (sgl_kernel) are not installed: install sglang with its "
                "dependencies on the GPU machine")
    return None


def require_engine() -> None:
    reason = engine_unavailable_reason()
    if reason is not None:
        raise SGLangUnavailable(
            f"SGLang's engine is not available here: {reason}. The lmcache_lab SGLang backend is "
            "tested without an engine (tests/sglang); run experiments/sglang_gpu_demo.sh on a GPU "
            "machine with SGLang installed (docs/sglang.md).")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Completion:
    """One streamed request as the client saw it (times in ms from sending)."""
    prompt_tokens: int
    cached_tokens: int       # prompt tokens SGLang did not compute (device, host or L3 hits)
    output_tokens: int
    ttft_ms: float
    latency_ms: float


class SGLangServer:
    """`python -m sglang.launch_server` with lmcache_lab as the `dynamic` HiCache storage backend."""
    name = "sglang"

    def __init__(self, model: str, cache: dict | None = None, page_size: int = 64,
                 hicache_ratio: float = 2.0, mem_layout: str = "layer_first",
                 prefetch_policy: str = "wait_complete", mem_fraction_static: float | None = None,
                 max_inflight: int = 4, startup_timeout_s: float = 900, request_timeout_s: float = 600,
                 extra_args: Sequence[str] = ()):
        self.model = str(model)
        self.cache = dict(cache or {})
        self.page_size = page_size
        self.hicache_ratio = hicache_ratio
        self.mem_layout = mem_layout
        self.prefetch_policy = prefetch_policy
        self.mem_fraction_static = mem_fraction_static
        self.max_inflight = max_inflight
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.extra_args = list(extra_args)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    # ---- the server --------------------------------------------------------------------------------
    def backend_config(self, cache: dict | None = None) -> dict:
        """The `--hicache-storage-backend-extra-config` object: SGLang's loader keys + ours."""
        return {"backend_name": "lmcache_lab", "module_path": "lmcache_lab.integrations.sglang",
                "class_name": "LMCacheLabStorage", "interface_v1": 1,
                **(self.cache if cache is None else cache)}

    def command(self, port: int, cache: dict | None = None, hierarchical: bool = True) -> list[str]:
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model,
               "--host", "127.0.0.1", "--port", str(port), "--page-size", str(self.page_size),
               "--enable-cache-report"]
        if hierarchical:
            cmd += ["--enable-hierarchical-cache", "--hicache-ratio", str(self.hicache_ratio),
                    "--hicache-mem-layout", self.mem_layout,
                    "--hicache-storage-prefetch-policy", self.prefetch_policy,
                    "--hicache-storage-backend", "dynamic",
                    "--hicache-storage-backend-extra-config", json.dumps(self.backend_config(cache))]
        if self.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(self.mem_fraction_static)]
        return cmd + self.extra_args

    def start(self, workdir: str | Path = ".", cache: dict | None = None, hierarchical: bool = True) -> None:
        """Launch the server (raises SGLangUnavailable where its engine cannot run) and wait until
        /health answers; the server's output goes to `workdir/sglang_server.log`."""
        require_engine()
        self.port = free_port()
        self.log_path = Path(workdir) / "sglang_server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as fh:
            self.proc = subprocess.Popen(self.command(self.port, cache, hierarchical), stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang server exited with {self.proc.returncode}:\n{self._tail()}")
            if self._get("/health", timeout=5) == 200:
                return
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"SGLang server not healthy after {self.startup_timeout_s}s:\n{self._tail()}")

    def stop(self, grace_s: float = 30) -> None:
        """Terminate the server's process group (scheduler and detokenizer included)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process_group(proc, grace_s)

    def flush(self, timeout_s: float = 120) -> None:
        """Drop SGLang's device and host prefix caches; lmcache_lab's tiers keep their pages.
        SGLang refuses while requests or cache write-backs are pending: retried until `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self._get("/flush_cache", timeout=60)
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"/flush_cache still answers HTTP {status} after {timeout_s}s")
            time.sleep(1.0)

    # ---- requests ------------------------------------------------------------------------------------
    def generate(self, prompt: Sequence[int], max_tokens: int = 8) -> Completion:
        """One greedy completion of token ids, streamed; TTFT = sending to the first token."""
        body = json.dumps({"model": "default", "prompt": list(prompt), "max_tokens": max_tokens,
                           "temperature": 0.0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.request_timeout_s)
        try:
            sent = time.perf_counter()
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
            first, usage = None, {}
            for msg in sse_messages(resp):
                if first is None and msg.get("choices"):      # the usage-only chunk has none
                    first = time.perf_counter()
                usage = msg.get("usage") or usage
            end = time.perf_counter()
        finally:
            conn.close()
        if first is None or not usage:
            raise RuntimeError("stream ended without tokens or usage")
        details = usage.get("prompt_tokens_details") or {}
        return Completion(int(usage["prompt_tokens"]), int(details.get("cached_tokens") or 0),
                          int(usage.get("completion_tokens") or 0), (first - sent) * 1e3, (end - sent) * 1e3)

    def run_arm(self, arm, requests, workdir: Path, progress: bool):
        """The experiment runner's entry (experiments/engine_run.py): one server per arm. Arms:
        `lmcache_lab` (hierarchical cache + our backend with the arm's config), `engine_cache`
        (SGLang's radix cache only), `cold` (radix cache off)."""
        from lmcache_lab.experiments.engine_run import ArmResult, Record, dispatch, scrape

        hierarchical = arm.connector is not None
        extra = [] if arm.prefix_caching or hierarchical else ["--disable-radix-cache"]
        self.extra_args, saved = self.extra_args + extra, self.extra_args
        t = time.perf_counter()
        try:
            self.start(workdir, cache=arm.connector, hierarchical=hierarchical)
            startup = time.perf_counter() - t

            def send(req, t0):
                sent = time.perf_counter() - t0
                c = self.generate(req.prompt, req.max_tokens)
                return Record(arm.name, req.index, req.group, req.round, req.arrival_s, sent, c.ttft_ms,
                              c.latency_ms, c.prompt_tokens, c.cached_tokens, c.output_tokens)
            records = dispatch(requests, send, self.max_inflight, progress, f"{arm.name:>12}")
            metrics = scrape(arm.metrics_port) if arm.metrics_port else {}
        finally:
            self.extra_args = saved
            self.stop()
        return ArmResult(records, startup, metrics)

    # ---- helpers ---------------------------------------------------------------------------------------
    def _get(self, path: str, timeout: float) -> int | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except OSError:
            return None
        finally:
            conn.close()

    def _tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError as e:
            return f"(no server log: {e})"


def shared_prefix_workload(num_requests: int = 8, prefix_tokens: int = 2048, suffix_tokens: int = 64,
                           vocab: int = 1000, seed: int = 0) -> list[list[int]]:
    """`num_requests` prompts of token ids: one shared prefix, then a distinct suffix each."""
    import random

    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab) for _ in range(prefix_tokens)]
    return [prefix + [rng.randrange(10, vocab) for _ in range(suffix_tokens)] for _ in range(num_requests)]


def run_twice(driver: SGLangServer, prompts: list[list[int]], max_tokens: int = 8,
              settle_s: float = 2.0) -> list[dict]:
    """The workload twice, SGLang's own caches flushed before each pass: pass 1 fills lmcache_lab,
    pass 2 can reuse the prefix only through it. One summary per pass."""
    out = []
    for name in ("first", "second"):
        time.sleep(settle_s)          # let the previous pass's write-backs to lmcache_lab finish
        driver.flush()
        done = [driver.generate(p, max_tokens) for p in prompts]
        prompt = sum(c.prompt_tokens for c in done)
        cached = sum(c.cached_tokens for c in done)
        ttft = sorted(c.ttft_ms for c in done)
        out.append({"pass": name, "requests": len(done), "prompt_tokens": prompt, "cached_tokens": cached,
                    "hit_rate": cached / prompt if prompt else 0.0, "ttft_ms_mean": sum(ttft) / len(ttft),
                    "ttft_ms_p50": ttft[len(ttft) // 2], "requests_detail": [asdict(c) for c in done]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory or hub id SGLang can load")
    ap.add_argument("--redis-url", default=None, help="share pages through this Redis (redis://...)")
    ap.add_argument("--cpu-capacity", default="8GiB", help="lmcache_lab CPU tier budget")
    ap.add_argument("--disk-path", default=None, help="lmcache_lab disk tier folder (off if unset)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--suffix-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--workdir", default="outputs/sglang_demo")
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    args = ap.parse_args(argv)

    cache = {"tiers": {"cpu": {"capacity_bytes": args.cpu_capacity},
                       "disk": {"path": args.disk_path}, "redis": {"url": args.redis_url}}}
    driver = SGLangServer(args.model, cache=cache, page_size=args.page_size)
    try:
        driver.start(args.workdir)
    except SGLangUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        prompts = shared_prefix_workload(args.requests, args.prefix_tokens, args.suffix_tokens)
        passes = run_twice(driver, prompts, args.max_tokens)
    finally:
        driver.stop()
    for p in passes:
        print(f"{p['pass']:>6} pass: {p['requests']} requests, {p['cached_tokens']}/{p['prompt_tokens']} "
              f"prompt tokens cached ({p['hit_rate']:.1%}), TTFT mean {p['ttft_ms_mean']:.1f} ms, "
              f"p50 {p['ttft_ms_p50']:.1f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(passes, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
