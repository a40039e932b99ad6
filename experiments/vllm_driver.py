"""Drive one real vLLM engine through a list of operations, in this process, and write JSON.

    python -m lmcache_lab.experiments.vllm_driver spec.json result.json

Each engine runs in its own process (tests and benchmarks start this module with `subprocess`),
so engines never share state except through what they are meant to share (a disk tier, Redis).

spec = {
  "model": "<dir>", "dtype": "float32" | "bfloat16",
  "connector": {...lmcache_lab config...} | null,      # LMCacheLabConnector with this extra config
  "example_connector": "<dir>" | null,                  # vLLM's in-tree ExampleConnector instead
  "kv_role": "kv_both",                                 # or kv_consumer (loads, never stores)
  "enable_prefix_caching": true, "max_model_len": 4096, "max_num_batched_tokens": null,
  "engine_args": {...},     # more keyword arguments of vllm.LLM, e.g. num_gpu_blocks_override,
                            # enable_lora, max_lora_rank, disable_log_stats (false: vllm_stats)
  "env": {...},             # environment set before vLLM is imported (overrides CPU_ENV)
  "ops": [
    {"op": "generate", "prompts": [[ids...], ...], "max_tokens": 8, "reset_each": false,
     "sequential": false, "salt": null, "lora": null},
                              # greedy; records tokens, num_cached_tokens, the call's wall time
                              # and its start/end (time.time()); reset_each: one prompt at a time,
                              # reset_prefix_cache() before each; sequential: one prompt at a time
                              # without a reset (seconds_each per prompt in both); salt: the
                              # prompts' cache_salt; lora: an adapter directory (LoRARequest)
    {"op": "concurrent", "reset": true,
     "requests": [{"prompt": [ids...], "max_tokens": 1, "after_steps": 0}, ...]}
                              # served together, each submitted once the engine ran after_steps
                              # steps (after reset_prefix_cache() with reset); per request its
                              # time to first token (ttft_s), to its end (finish_s), longest wait
                              # between two tokens (max_gap_s), engine steps from its submission
                              # to its first token (ttft_steps), tokens, num_cached_tokens
    {"op": "decode_sharing", "shared_prefix": [ids...], "private_prefixes": [[[ids...], ...], ...],
     "suffixes": [[[ids...], ...], ...], "max_tokens": 32}
                              # rounds of len(suffixes[r]) requests served together, alternating:
                              # even rounds share `shared_prefix`, odd rounds have the private
                              # prefixes of private_prefixes[r // 2]; each request is its
                              # prefix + its suffix. Per round kind: the seconds of every step
                              # after all of the round's requests had their first token (decode
                              # steps), num_cached_tokens
    {"op": "reset"},                               # llm.reset_prefix_cache()
    {"op": "scrape", "port": 9100},                # lmcache_lab_* samples from the endpoint
    {"op": "vllm_stats"},                          # vLLM's own counters and gauges (name ->
                                                   # value summed over labels), e.g.
                                                   # vllm:num_preemptions; needs log stats on
    {"op": "kv_events", "endpoint": "tcp://127.0.0.1:5557"}
                              # start collecting the engine's KV events (vLLM's ZMQ publisher,
                              # `engine_args.kv_events_config`); the result is filled as they
                              # arrive: [[event class, medium, block hashes], ...]
    {"op": "corrupt", "path": "<disk tier dir>", "positions": [256]},  # damage stored chunks
    {"op": "sleep", "seconds": 0.5},
    {"op": "barrier", "dir": "<dir>", "name": "a", "parties": 2, "timeout_s": 300},
                              # wait until `parties` engines have reached a barrier of this dir
    {"op": "redis", "url": "redis://...", "command": ["DEBUG", "SLEEP", "3"], "background": true},
                              # one Redis command, from a thread of its own when background; the
                              # result ({reply, start, end}) is filled when it returns
    {"op": "abort_before_load", "blocker": [ids...], "blocker_max_tokens": 64,
     "victim": [ids...], "steps": 3, "port": null}
                              # in-process engines only (VLLM_ENABLE_V1_MULTIPROCESSING=0): run
                              # `blocker`; add `victim` when the KV cache cannot take it, step
                              # `steps` times (the scheduler looks the victim up, asks the
                              # connector, fails to allocate), abort it, run the blocker to the
                              # end. Records what the scheduler asked the connector about the
                              # victim (matched / allocated external tokens), its status at the
                              # abort, the blocker's tokens, and with `port` the metrics scraped
                              # just before the abort.
  ]}
result = {"results": [one entry per op], "startup_s": float,
          "kv_cache": {"block_size": int, "num_blocks": int}}      # the engine's paged KV cache
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def kv_transfer_config(spec: dict) -> dict | None:
    if spec.get("connector") is not None:
        return {"kv_connector": "LMCacheLabConnector",
                "kv_connector_module_path": "lmcache_lab.integrations.vllm",
                "kv_role": spec.get("kv_role", "kv_both"),
                "kv_connector_extra_config": spec["connector"]}
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


def barrier(directory: str, name: str, parties: int, timeout_s: float = 300.0) -> float:
    """Mark `name` as arrived in `directory`; wait until `parties` have. Returns seconds waited."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.arrived").touch()
    t0 = time.monotonic()
    while len(list(d.glob("*.arrived"))) < parties:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"barrier {directory}: {parties} parties did not arrive")
        time.sleep(0.05)
    return time.monotonic() - t0


def redis_command(url: str, command: list, into: dict) -> None:
    """Run one Redis command on a connection of its own; its reply and wall times go to `into`."""
    import redis

    into["start"] = time.time()
    try:
        reply = redis.Redis.from_url(url, socket_timeout=60).execute_command(*command)
        into["reply"] = reply.decode() if isinstance(reply, bytes) else reply
    except Exception as e:  # reported, not raised: the engine's behaviour is what is measured
        into["error"] = repr(e)
    into["end"] = time.time()


def vllm_stats(llm) -> dict[str, float]:
    """vLLM's own counters and gauges, summed over labels (`llm.get_metrics()`)."""
    from vllm.v1.metrics.reader import Counter, Gauge

    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if isinstance(m, (Counter, Gauge)):
            out[m.name] = out.get(m.name, 0) + m.value
    return out


def collect_kv_events(endpoint: str, into: list, stop: threading.Event) -> threading.Thread:
    """Subscribe to vLLM's KV event publisher at `endpoint`; append [class name, medium, block
    hashes] per event to `into` until `stop` (a daemon thread; returns once subscribed). vLLM's
    publisher connects to an endpoint without a wildcard (`ZmqEventPublisher._is_bind_endpoint`),
    so the subscriber binds it."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.bind(endpoint)
    decode = msgspec.msgpack.Decoder(type=KVEventBatch).decode

    def run():
        while not stop.is_set():
            if sock.poll(100):
                _topic, _seq, payload = sock.recv_multipart()
                for e in decode(payload).events:
                    into.append([type(e).__name__, getattr(e, "medium", None),
                                 list(getattr(e, "block_hashes", []))])
        sock.close(0)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.5)      # a SUB socket sees only what is published after the link is up
    return thread


def abort_before_load(llm, op: dict, params_of) -> dict:
    """See the module docstring. The scheduler's connector is wrapped to record its calls about
    the victim (the KVConnectorBase_V1 hooks `get_num_new_matched_tokens`,
    `update_state_after_alloc`), so the caller can tell the victim was looked up, never loaded."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    core = getattr(engine.engine_core, "engine_core", None)
    if core is None:
        raise RuntimeError("abort_before_load needs an in-process engine "
                           "(VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    sched = core.scheduler
    conn = sched.connector
    matched, allocated = [], []
    lookup, after_alloc = conn.get_num_new_matched_tokens, conn.update_state_after_alloc

    def spy_lookup(request, num_computed):
        out = lookup(request, num_computed)
        if request.request_id.startswith("victim"):
            matched.append(out[0])
        return out

    def spy_alloc(request, blocks, num_external):
        if request.request_id.startswith("victim"):
            allocated.append(num_external)
        return after_alloc(request, blocks, num_external)

    conn.get_num_new_matched_tokens, conn.update_state_after_alloc = spy_lookup, spy_alloc
    try:
        engine.add_request("blocker", TokensPrompt(prompt_token_ids=list(op["blocker"])),
                           params_of(op["blocker_max_tokens"]))
        outputs = []
        while not sched.running:                 # the blocker is admitted (its blocks taken)
            outputs += engine.step()
        engine.add_request("victim", TokensPrompt(prompt_token_ids=list(op["victim"])),
                           params_of(8))
        for _ in range(op.get("steps", 3)):
            outputs += engine.step()
        victim = next(r for rid, r in sched.requests.items() if rid.startswith("victim"))
        status, computed = victim.status.name, victim.num_computed_tokens
        before = scrape(op["port"]) if op.get("port") else None
        engine.abort_request(["victim"])
        while engine.has_unfinished_requests():
            outputs += engine.step()
    finally:
        del conn.get_num_new_matched_tokens, conn.update_state_after_alloc   # the class's again
    blocker = [o for o in outputs if o.request_id.startswith("blocker") and o.finished]
    return {"victim_matched": matched, "victim_allocated": allocated, "victim_status": status,
            "victim_computed_tokens": computed, "metrics_before_abort": before,
            "victim_outputs": sum(o.request_id.startswith("victim") for o in outputs),
            "blocker_tokens": list(blocker[0].outputs[0].token_ids) if blocker else None}


def concurrent(llm, op: dict, params_of) -> dict:
    """Serve `op["requests"]` together (after `reset_prefix_cache()` with "reset"): each is
    submitted once the engine has run its `after_steps` steps, and the engine is stepped until
    all finish. Per request: seconds from its submission to its first token (ttft_s) and to its
    last (finish_s), the longest wait between two of its tokens (max_gap_s), tokens,
    num_cached_tokens; "seconds": until the last one finished."""
    from vllm.inputs import TokensPrompt

    if op.get("reset"):
        llm.reset_prefix_cache()
    engine = llm.llm_engine
    reqs = op["requests"]
    t0 = time.perf_counter()
    ids = [f"concurrent-{t0}-{i}" for i in range(len(reqs))]    # outputs carry these
    submitted: dict[str, float] = {}
    last: dict[str, tuple[int, float]] = {}      # request -> (tokens so far, when)
    gap: dict[str, float] = {}
    first: dict[str, float] = {}
    first_step: dict[str, int] = {}              # request -> engine steps run when its first token came
    added: dict[str, int] = {}                   # request -> engine steps run when it was added
    done: dict = {}
    steps = 0
    while len(done) < len(reqs):
        for rid, r in zip(ids, reqs):
            if rid not in submitted and r.get("after_steps", 0) <= steps:
                engine.add_request(rid, TokensPrompt(prompt_token_ids=list(r["prompt"])),
                                   params_of(r.get("max_tokens", 1)))
                submitted[rid] = last.setdefault(rid, (0, time.perf_counter()))[1]
                added[rid] = steps
        outs = engine.step()
        steps += 1
        now = time.perf_counter()
        for out in outs:
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            if n > last[out.request_id][0]:
                if last[out.request_id][0]:          # a wait between two tokens
                    gap[out.request_id] = max(gap.get(out.request_id, 0.0),
                                              now - last[out.request_id][1])
                first.setdefault(out.request_id, now - submitted[out.request_id])
                first_step.setdefault(out.request_id, steps)
                last[out.request_id] = (n, now)
            if out.finished:
                done[out.request_id] = out
    return {"seconds": time.perf_counter() - t0, "ttft_s": [first[r] for r in ids],
            "finish_s": [last[r][1] - submitted[r] for r in ids],
            "max_gap_s": [gap.get(r, 0.0) for r in ids],
            "ttft_steps": [first_step[r] - added[r] for r in ids],
            "tokens": [list(done[r].outputs[0].token_ids) for r in ids],
            "num_cached_tokens": [done[r].num_cached_tokens for r in ids]}


def decode_sharing(llm, op: dict, params_of) -> dict:
    """Decode steps of requests that share one prefix against requests of private prefixes, in
    alternating rounds of one engine. With the engine's prefix cache on, a shared round's requests
    point at one copy of the prefix's blocks (the caller serves the shared prefix once first), a
    private round's each read their own; a connector hit is always a private copy (vLLM gives it
    blocks of its own), so this is what a step costs a batch of connector hits against a batch of
    prefix-cache hits, with everything else equal."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = params_of(op["max_tokens"])
    out = {kind: {"step_s": [], "num_cached_tokens": []} for kind in ("shared", "private")}
    for r, suffixes in enumerate(op["suffixes"]):
        kind = "shared" if r % 2 == 0 else "private"
        prefixes = ([op["shared_prefix"]] * len(suffixes) if kind == "shared"
                    else op["private_prefixes"][r // 2])
        ids = [f"decode-sharing-{r}-{i}" for i in range(len(suffixes))]
        for rid, prefix, suffix in zip(ids, prefixes, suffixes):
            engine.add_request(rid, TokensPrompt(prompt_token_ids=list(prefix) + list(suffix)), params)
        started: set[str] = set()
        done: dict = {}
        while len(done) < len(ids):
            decoding = len(started) == len(ids)
            t = time.perf_counter()
            outs = engine.step()
            if decoding:
                out[kind]["step_s"].append(time.perf_counter() - t)
            for o in outs:
                if o.outputs and o.outputs[0].token_ids:
                    started.add(o.request_id)
                if o.finished:
                    done[o.request_id] = o
        out[kind]["num_cached_tokens"] += [done[i].num_cached_tokens for i in ids]
    return out


def run(spec: dict) -> dict:
    for k, v in CPU_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.update(spec.get("env", {}))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    t0 = time.perf_counter()
    kwargs = dict(model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=True,
                  seed=0, max_model_len=spec.get("max_model_len", 4096),
                  enable_prefix_caching=spec.get("enable_prefix_caching", True))
    if spec.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    kwargs.update(spec.get("engine_args", {}))
    ktc = kv_transfer_config(spec)
    if ktc is not None:
        kwargs["kv_transfer_config"] = ktc
    llm = LLM(**kwargs)
    results: list = []
    cc = llm.llm_engine.vllm_config.cache_config
    out = {"startup_s": time.perf_counter() - t0, "results": results,
           "kv_cache": {"block_size": cc.block_size, "num_blocks": cc.num_gpu_blocks}}
    loras: dict[str, LoRARequest] = {}
    background: list[threading.Thread] = []
    stop_events = threading.Event()

    def params_of(max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    for op in spec["ops"]:
        kind = op["op"]
        if kind == "generate":
            params = params_of(op.get("max_tokens", 8))
            extra = {"cache_salt": op["salt"]} if op.get("salt") else {}
            prompts = [TokensPrompt(prompt_token_ids=list(p), **extra) for p in op["prompts"]]
            lora = None
            if op.get("lora"):
                lora = loras.setdefault(op["lora"], LoRARequest(
                    f"adapter{len(loras) + 1}", len(loras) + 1, op["lora"]))
            start = time.time()
            if op.get("reset_each") or op.get("sequential"):   # one prompt at a time
                outs, each = [], []
                for p in prompts:
                    if op.get("reset_each"):                    # with the engine's APC empty
                        llm.reset_prefix_cache()
                    t = time.perf_counter()
                    outs += llm.generate([p], params, use_tqdm=False, lora_request=lora)
                    each.append(time.perf_counter() - t)
                seconds = sum(each)
            else:
                t = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
                seconds, each = time.perf_counter() - t, None
            results.append({"seconds": seconds, "seconds_each": each, "start": start,
                            "end": time.time(),
                            "tokens": [list(o.outputs[0].token_ids) for o in outs],
                            "num_cached_tokens": [o.num_cached_tokens for o in outs]})
        elif kind == "concurrent":
            results.append(concurrent(llm, op, params_of))
        elif kind == "decode_sharing":
            results.append(decode_sharing(llm, op, params_of))
        elif kind == "reset":
            results.append(llm.reset_prefix_cache())
        elif kind == "scrape":
            results.append(scrape(op["port"]))
        elif kind == "vllm_stats":
            results.append(vllm_stats(llm))
        elif kind == "kv_events":
            events: list = []
            collect_kv_events(op["endpoint"], events, stop_events)
            results.append(events)
        elif kind == "corrupt":
            results.append(corrupt(op["path"], op["positions"]))
        elif kind == "sleep":
            time.sleep(op["seconds"])
            results.append(None)
        elif kind == "barrier":
            results.append(barrier(op["dir"], op["name"], op["parties"], op.get("timeout_s", 300)))
        elif kind == "redis":
            into: dict = {}
            args = (op["url"], op["command"], into)
            if op.get("background"):
                background.append(threading.Thread(target=redis_command, args=args, daemon=True))
                background[-1].start()
            else:
                redis_command(*args)
            results.append(into)
        elif kind == "abort_before_load":
            results.append(abort_before_load(llm, op, params_of))
        else:
            raise ValueError(f"unknown op {kind!r}")
    for t in background:
        t.join(timeout=120)
    if any(op["op"] == "kv_events" for op in spec["ops"]):
        time.sleep(1.0)      # the publisher thread sends the last steps' batches
        stop_events.set()
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    out = run(spec)
    Path(argv[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
