"""LMCacheLabConnector under real serving conditions, each engine in its own process.

What each group checks (engines are run once per session, on demand, and shared by the tests):
  (a) batch     18 prompts over 3 system prompts in one `llm.generate` call, chunked prefill
                (256-token steps) and a KV cache of 16 blocks, so the scheduler preempts
                (asserted from vLLM's own `vllm:num_preemptions`); vLLM's multi-process layout.
                Same greedy tokens as the run without the connector; after
                `reset_prefix_cache()` a second pass is served by the connector.
  (b) salt      a prompt stored under no salt / one `cache_salt` is no hit under another salt,
                and a hit under its own.
  (c) lora      a local random rank-8 adapter (PEFT files): its requests never get the base
                model's chunks (nor the base model theirs), equal the no-connector run with the
                adapter, and hit their own chunks.
  (d) disk      two engine processes write one disk directory at the same time with a budget
                smaller than their working set: correct tokens, chunk files within the budget,
                and a third, later engine loads what they stored.
  (e) abort     a request looked up (its hit promised and pinned) but not allocated because the
                KV cache is full, then aborted: no pin is left behind, and the promise is not
                counted as loaded tokens.
  (f) redis     Redis made slow (`DEBUG SLEEP 3`) while a stream of requests with new prefixes is
                served: every request finishes with the reference tokens, and the write-behind
                queue skips chunks instead of growing past its byte budget.

Engine facts used here come from the installed vLLM (checked by the first test):
  * `CacheConfig.num_gpu_blocks_override` sets the number of KV blocks
    (vllm/v1/core/kv_cache_utils.py `may_override_num_blocks`); on CPU `VLLM_CPU_KVCACHE_SPACE`
    only takes whole GiB (vllm/platforms/cpu.py), far too big to make the scheduler preempt.
  * one block is held back as the null block; the CPU block size is 128 (the driver reports
    both from the engine's cache config, and the tests use what it reports).
  * preemption: vllm/v1/core/sched/scheduler.py, the running-request loop (`allocate_slots`
    returns None -> `_preempt_request`), counted in `vllm:num_preemptions`
    (vllm/v1/metrics/loggers.py) when `disable_log_stats=False`.
  * abort between lookup and load: the waiting-request loop asks the connector
    (`get_num_new_matched_tokens`) before `allocate_slots`; when that returns None
    ("The request cannot be scheduled.") `update_state_after_alloc` is never called and the
    request stays WAITING, so `LLMEngine.abort_request` then finishes a request whose hit was
    promised but never loaded (`finish_requests` -> `_free_request` -> `request_finished`).
  * `cache_salt` is a field of `TokensPrompt` (vllm/inputs/llm.py); LoRA on the CPU build needs
    `enable_lora=True` and `max_lora_rank` >= the adapter's rank (vllm/config/lora.py).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from redis_servers import REDIS_SERVER, RedisProcess  # noqa: E402
from vllm_e2e import chunks_read, free_port, loadable, run_engine, run_engines_at_once  # noqa: E402

pytestmark = pytest.mark.e2e

CHUNK = 256
MAX_TOKENS = 8


# ------------------------------------------------------------------------------------ prompts
def _prompts(seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(10, 4000, int(n)).tolist()  # noqa: E731
    systems = [ids(n) for n in (300, 500, 700)]
    return {
        # (a) 3 system prompts x 6 distinct user suffixes, interleaved
        "batch": [systems[i % 3] + ids(rng.integers(30, 120)) for i in range(18)],
        # (b)
        "salted": ids(600),
        # (c) 2 full chunks each: hits of 512 and 256
        "lora": [ids(600), ids(450)],
        # (d) 2 prompts both writers run, 5 of each writer's own; 3 full chunks each
        "disk_shared": [ids(800) for _ in range(2)],
        "disk_a": [ids(800) for _ in range(5)],
        "disk_b": [ids(800) for _ in range(5)],
        # (e) the victim fits the cache alone, not beside the blocker
        "victim": ids(520), "blocker": ids(600),
        # (f) a warm-up prompt, then a stream of new prefixes, 8 full chunks (4 MiB) each
        "warm": ids(300), "stream": [ids(2048) for _ in range(12)],
    }


P = _prompts()
S1, S2 = P["disk_shared"]
WRITER_A = [S1] + P["disk_a"] + [S2]            # each writer ends with the prompt the other
WRITER_B = [S2] + P["disk_b"] + [S1]            # one started with: a chance to load its chunks
DISK_ALL = [S1, S2] + P["disk_a"] + P["disk_b"]
READER = [p for pair in zip(P["disk_a"][::-1], P["disk_b"][::-1]) for p in pair] + [S2, S1]

BATCH_ARGS = {"max_model_len": 1024, "max_num_batched_tokens": 256,
              "engine_args": {"num_gpu_blocks_override": 16, "enable_chunked_prefill": True,
                              "disable_log_stats": False}}
BATCH_MAX_TOKENS = 32
ABORT_ARGS = {"max_model_len": 1024, "engine_args": {"num_gpu_blocks_override": 9}}
DISK_BUDGET = "4MiB"             # 8 chunks; each writer stores 21
WRITE_BEHIND_BUDGET = 4 * 2**20


def gen(prompts, max_tokens=MAX_TOKENS, **kw) -> dict:
    return {"op": "generate", "prompts": prompts, "max_tokens": max_tokens, **kw}


def one_by_one(prompts, **kw) -> dict:
    """Each prompt alone, after reset_prefix_cache(): every cached token is the connector's."""
    return gen(prompts, reset_each=True, **kw)


def chunk_bytes(model: str) -> int:
    """Bytes of one fp32 chunk: K and V of every layer, CHUNK tokens, all KV heads (512 KiB
    for the 2-layer test model)."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * CHUNK * cfg["num_key_value_heads"] * head * 4


def chunk_files(path: str) -> list[Path]:
    return sorted(Path(path).glob("*/*.kvc"))


def metric(m: dict, name: str) -> float:
    names = sorted(k for k in m if not k.endswith("_created") and "_bucket" not in k)
    assert name in m, f"the connector's metrics endpoint has no `{name}` (it exports: {names})"
    return m[name]


# ------------------------------------------------------------------------------------ engines
class Engines:
    """Lazily runs and caches the engines of this module (a failed run too: it is not repeated
    for every test that reads it)."""

    def __init__(self, model: str, lora: str, root: Path):
        self.model, self.lora, self.root = model, lora, root
        self.disk = str(root / "shared-disk")
        self.ports = {n: free_port() for n in ("batch", "abort", "redis", "reader")}
        self.disk_bytes: dict[str, int] = {}
        self.redis: RedisProcess | None = None
        self._runs: dict[str, object] = {}

    def get(self, name: str):
        if name not in self._runs:
            try:
                self._runs[name] = getattr(self, "_" + name)()
            except BaseException as e:     # pytest's skip too
                self._runs[name] = e
        if isinstance(self._runs[name], BaseException):
            raise self._runs[name]
        return self._runs[name]

    def run(self, name: str, spec: dict, multiprocess: bool = False) -> dict:
        out = run_engine({"model": self.model, "dtype": "float32", **spec}, multiprocess,
                         self.root / name)
        return {**out, "spec_ops": spec["ops"]}

    def close(self) -> None:
        if self.redis is not None:
            self.redis.kill()

    # no connector: reference tokens of (b), (d), (e), (f)
    def _ref(self):
        return self.run("ref", {"connector": None, "ops": [
            one_by_one([P["salted"]]), one_by_one(DISK_ALL), one_by_one(P["stream"]),
            one_by_one([P["victim"]])]})

    # (a) ---------------------------------------------------------------------------------------
    def _batch_ops(self, scrape: int | None) -> list[dict]:
        stats = [{"op": "vllm_stats"}] + ([{"op": "scrape", "port": scrape}] if scrape else [])
        return ([gen(P["batch"], BATCH_MAX_TOKENS)] + stats + [{"op": "reset"}]
                + [gen(P["batch"], BATCH_MAX_TOKENS)] + stats)

    def _batch_ref(self):
        return self.run("batch_ref", {**BATCH_ARGS, "connector": None,
                                      "ops": self._batch_ops(None)})

    def _batch_conn(self):
        port = self.ports["batch"]
        return self.run("batch_conn", {**BATCH_ARGS, "connector": {
            "chunk_size": CHUNK, "metrics": {"port": port}}, "ops": self._batch_ops(port)},
            multiprocess=True)

    # (b) ---------------------------------------------------------------------------------------
    def _salt(self):
        x = [P["salted"]]
        return self.run("salt", {"connector": {"chunk_size": CHUNK}, "ops": [
            one_by_one(x), one_by_one(x, salt="alice"), one_by_one(x, salt="bob"),
            one_by_one(x, salt="alice"), one_by_one(x, salt="bob"), one_by_one(x)]})

    # (c) ---------------------------------------------------------------------------------------
    LORA_ARGS = {"max_model_len": 2048, "engine_args": {"enable_lora": True, "max_lora_rank": 8}}

    def _lora_ref(self):
        return self.run("lora_ref", {**self.LORA_ARGS, "connector": None, "ops": [
            one_by_one(P["lora"]), one_by_one(P["lora"], lora=self.lora)]})

    def _lora_conn(self):
        l1, l2 = ([p] for p in P["lora"])
        a = self.lora
        return self.run("lora_conn", {**self.LORA_ARGS, "connector": {"chunk_size": CHUNK}, "ops": [
            one_by_one(l1), one_by_one(l1, lora=a), one_by_one(l1, lora=a),      # base first
            one_by_one(l2, lora=a), one_by_one(l2), one_by_one(l2, lora=a)]})     # adapter first

    # (d) ---------------------------------------------------------------------------------------
    def disk_config(self, cpu: str | int) -> dict:
        return {"chunk_size": CHUNK, "tiers": {"cpu": {"capacity_bytes": cpu},
                                               "disk": {"path": self.disk,
                                                        "capacity_bytes": DISK_BUDGET}}}

    def _disk_writers(self):
        barrier = str(self.root / "barrier")

        def writer(name: str, core: str, prompts):
            return ({"model": self.model, "dtype": "float32",
                     "connector": self.disk_config("512KiB"),
                     "env": {"VLLM_CPU_OMP_THREADS_BIND": core},     # one core each
                     "ops": [{"op": "barrier", "dir": barrier, "name": name, "parties": 2},
                             one_by_one(prompts)]}, False, self.root / name)

        runs = run_engines_at_once([writer("writer_a", "0", WRITER_A),
                                    writer("writer_b", "1", WRITER_B)])
        self.disk_bytes["writers"] = sum(f.stat().st_size for f in chunk_files(self.disk))
        return runs

    def _disk_reader(self):
        self.get("disk_writers")
        self.disk_bytes["files_before_reader"] = len(chunk_files(self.disk))
        port = self.ports["reader"]
        # a consumer with no memory tier: every hit is a chunk file the writers left
        return self.run("disk_reader", {
            "connector": {**self.disk_config(0), "metrics": {"port": port}},
            "kv_role": "kv_consumer",
            "ops": [one_by_one(READER), {"op": "scrape", "port": port}]})

    # (e) ---------------------------------------------------------------------------------------
    def _abort(self):
        port = self.ports["abort"]
        return self.run("abort", {**ABORT_ARGS, "connector": {
            "chunk_size": CHUNK, "metrics": {"port": port}}, "ops": [
            gen([P["victim"]]),                             # stores the victim's 2 chunks
            {"op": "reset"},
            {"op": "abort_before_load", "blocker": P["blocker"], "blocker_max_tokens": 200,
             "victim": P["victim"], "steps": 3, "port": port},
            one_by_one([P["victim"]]),                      # still served, from the same chunks
            {"op": "scrape", "port": port}]})

    # (f) ---------------------------------------------------------------------------------------
    def _redis(self):
        if REDIS_SERVER is None:
            pytest.skip("redis-server not installed")
        self.redis = RedisProcess(self.root / "redis", args=[
            "--enable-debug-command", "yes", "--maxmemory", "256mb",
            "--maxmemory-policy", "allkeys-lru"])
        url, port = self.redis.url, self.ports["redis"]
        config = {"chunk_size": CHUNK,
                  "tiers": {"cpu": {"capacity_bytes": "64MiB"},
                            "redis": {"url": url, "timeout_s": 10.0}},   # slow, not failing
                  "write_behind": {"max_bytes": WRITE_BEHIND_BUDGET},
                  "lookup_timeout_s": 0.25,       # a lookup does not wait out the slow spell
                  "metrics": {"port": port}}
        try:
            return self.run("redis", {"connector": config, "ops": [
                gen([P["warm"]]),
                {"op": "redis", "url": url, "command": ["DEBUG", "SLEEP", "3"], "background": True},
                gen(P["stream"]),                           # all at once: stored at full speed
                {"op": "sleep", "seconds": 4},              # the write-behind drains
                one_by_one([P["warm"]]),                    # served after the slow spell
                {"op": "scrape", "port": port}]})
        finally:
            self.redis.kill()


@pytest.fixture(scope="session")
def engines(tiny_model, tiny_lora, tmp_path_factory):
    e = Engines(tiny_model, tiny_lora, tmp_path_factory.mktemp("serving"))
    yield e
    e.close()


def tokens(run: dict, op: int) -> list[list[int]]:
    return run["results"][op]["tokens"]


def cached(run: dict, op: int) -> list[int]:
    return run["results"][op]["num_cached_tokens"]


# ------------------------------------------------------------------------------ engine facts
def test_engine_facts_used_here_hold_in_the_installed_vllm():
    import dataclasses
    import typing

    from vllm.config import CacheConfig, LoRAConfig, SchedulerConfig
    from vllm.inputs import TokensPrompt

    fields = {f.name for f in dataclasses.fields(CacheConfig)}
    assert "num_gpu_blocks_override" in fields
    assert "enable_chunked_prefill" in {f.name for f in dataclasses.fields(SchedulerConfig)}
    assert "cache_salt" in typing.get_type_hints(TokensPrompt)
    lora = {f.name: f for f in dataclasses.fields(LoRAConfig)}
    assert 8 in typing.get_args(lora["max_lora_rank"].type)


# ------------------------------------------------------------------------------ (a) batch
def passes(run: dict) -> list[tuple[dict, dict, dict | None]]:
    """(generate, vLLM stats, connector metrics or None) of each pass of a batch run."""
    ops = [(o["op"], r) for o, r in zip(run["spec_ops"], run["results"])]
    out = []
    for i, (kind, r) in enumerate(ops):
        if kind == "generate":
            after = dict(ops[i + 1:i + 3])
            out.append((r, after["vllm_stats"], after.get("scrape")))
    return out


def test_batch_with_chunked_prefill_and_preemption_gives_the_reference_tokens(engines):
    (ref, _, _), _ = passes(engines.get("batch_ref"))
    run = engines.get("batch_conn")
    (first, stats, _), _ = passes(run)
    assert len(P["batch"]) >= 16 and len(first["tokens"]) == len(P["batch"])
    # every prompt is longer than one scheduler step: each is prefilled in several chunks
    assert min(map(len, P["batch"])) > BATCH_ARGS["max_num_batched_tokens"]
    kv = run["kv_cache"]
    assert kv["num_blocks"] == BATCH_ARGS["engine_args"]["num_gpu_blocks_override"], kv
    preempted = stats["vllm:num_preemptions"]
    assert preempted > 0, ("the scheduler did not preempt in the first pass: the test no longer "
                           f"covers preemption (KV cache {kv}); shrink the cache or lengthen "
                           "the outputs")
    assert all(len(t) == BATCH_MAX_TOKENS for t in ref["tokens"])
    bad = [i for i, (a, b) in enumerate(zip(first["tokens"], ref["tokens"])) if a != b]
    assert not bad, (f"prompts {bad} differ from the run without the connector "
                     f"({preempted:.0f} preemptions)")


def test_batch_second_pass_after_reset_is_served_by_the_connector(engines):
    _, (ref, _, _) = passes(engines.get("batch_ref"))
    (_, stats1, m1), (second, stats2, m2) = passes(engines.get("batch_conn"))
    # every prompt's full chunks were stored in the first pass: each is a hit of at least them
    want = [loadable(len(p), CHUNK) for p in P["batch"]]
    got = second["num_cached_tokens"]
    short = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g < w]
    assert not short, f"(prompt, num_cached_tokens, stored prefix) below the stored prefix: {short}"
    # vLLM's own count of the tokens the connector supplied, and the connector's
    loaded_by_connector = (stats2["vllm:external_prefix_cache_hits"]
                           - stats1["vllm:external_prefix_cache_hits"])
    assert loaded_by_connector > 0, "vLLM saw no external (connector) hits in the second pass"
    hits = metric(m2, "lmcache_lab_hit_tokens_total") - metric(m1, "lmcache_lab_hit_tokens_total")
    assert hits > 0
    bad = [i for i, (a, b) in enumerate(zip(second["tokens"], ref["tokens"])) if a != b]
    assert not bad, f"prompts {bad} differ from the run without the connector in the second pass"
    # preempted requests start over with a lookup: in this pass the connector serves them too
    preempted = stats2["vllm:num_preemptions"] - stats1["vllm:num_preemptions"]
    assert preempted > 0, "the scheduler did not preempt in the second pass"


# ------------------------------------------------------------------------------ (b) cache_salt
def test_cache_salt_separates_connector_hits(engines):
    run = engines.get("salt")
    full = loadable(len(P["salted"]), CHUNK)
    # ops: none, alice, bob, alice, bob, none -- each after reset_prefix_cache()
    got = [cached(run, i)[0] for i in range(6)]
    assert got[0] == 0
    assert got[1:3] == [0, 0], (f"num_cached_tokens {got[1:3]} under salts alice, bob: the "
                                "connector served chunks stored under another cache_salt (or "
                                "none); a salt must separate them")
    assert got[3:] == [full] * 3, f"each salt must hit its own chunks: {got[3:]} != {[full] * 3}"


def test_cache_salt_does_not_change_tokens(engines):
    ref = tokens(engines.get("ref"), 0)
    run = engines.get("salt")
    assert all(tokens(run, i) == ref for i in range(6))


# ------------------------------------------------------------------------------ (c) LoRA
def test_lora_adapter_changes_greedy_outputs(engines):
    ref = engines.get("lora_ref")
    base, adapted = tokens(ref, 0), tokens(ref, 1)
    same = [i for i, (a, b) in enumerate(zip(base, adapted)) if a == b]
    assert not same, f"the adapter leaves the greedy tokens of prompts {same} unchanged"


def test_lora_requests_never_see_the_base_models_chunks(engines):
    run = engines.get("lora_conn")
    assert cached(run, 0) == [0] and cached(run, 3) == [0]        # cold, base and adapter
    assert cached(run, 1) == [0], ("the adapter's request got a connector hit on chunks the base "
                                   f"model stored: num_cached_tokens {cached(run, 1)}")
    assert cached(run, 4) == [0], ("a base-model request got a connector hit on chunks stored "
                                   f"with the adapter: num_cached_tokens {cached(run, 4)}")


def test_lora_outputs_equal_the_run_without_the_connector(engines):
    ref, run = engines.get("lora_ref"), engines.get("lora_conn")
    (b1, b2), (a1, a2) = tokens(ref, 0), tokens(ref, 1)
    got = {"base 1": tokens(run, 0), "adapter 1 (after base)": tokens(run, 1),
           "adapter 1 again": tokens(run, 2), "adapter 2": tokens(run, 3),
           "base 2 (after adapter)": tokens(run, 4), "adapter 2 again": tokens(run, 5)}
    want = {"base 1": [b1], "adapter 1 (after base)": [a1], "adapter 1 again": [a1],
            "adapter 2": [a2], "base 2 (after adapter)": [b2], "adapter 2 again": [a2]}
    bad = [k for k in want if got[k] != want[k]]
    assert not bad, f"tokens differ from the no-connector run for: {bad}"


def test_repeated_lora_requests_hit(engines):
    run = engines.get("lora_conn")
    l1, l2 = (loadable(len(p), CHUNK) for p in P["lora"])
    assert cached(run, 2) == [l1] and cached(run, 5) == [l2]


# ------------------------------------------------------------------------------ (d) shared disk
def test_two_engines_writing_one_disk_directory_give_the_reference_tokens(engines):
    ref = dict(zip(map(tuple, DISK_ALL), tokens(engines.get("ref"), 1)))
    a, b = engines.get("disk_writers")
    for name, run, prompts in (("writer_a", a, WRITER_A), ("writer_b", b, WRITER_B)):
        bad = [i for i, (p, t) in enumerate(zip(prompts, tokens(run, 1))) if ref[tuple(p)] != t]
        assert not bad, f"{name}: prompts {bad} differ from the run without the connector"
    # the barrier started both streams together: their writes overlapped in time
    ra, rb = a["results"][1], b["results"][1]
    assert ra["start"] < rb["end"] and rb["start"] < ra["end"]


def test_shared_disk_directory_stays_within_its_budget(engines):
    from lmcache_lab.config import parse_size

    engines.get("disk_writers")
    budget = parse_size(DISK_BUDGET)
    per_writer = 3 * len(WRITER_A) * chunk_bytes(engines.model)
    assert per_writer > budget                       # each writer alone overflows the budget
    used = engines.disk_bytes["writers"]
    assert 0 < used <= budget, (f"two engines sharing the disk directory left {used} bytes of "
                                f"chunk files, over its budget of {budget}: the budget must hold "
                                "for all the processes writing the directory together")


def test_later_engine_loads_what_the_concurrent_writers_stored(engines):
    ref = dict(zip(map(tuple, DISK_ALL), tokens(engines.get("ref"), 1)))
    run = engines.get("disk_reader")
    bad = [i for i, (p, t) in enumerate(zip(READER, tokens(run, 0))) if ref[tuple(p)] != t]
    assert not bad, f"the reader's prompts {bad} differ from the run without the connector"
    got = cached(run, 0)
    assert all(c % CHUNK == 0 for c in got), got
    files = engines.disk_bytes["files_before_reader"]
    # the reader stores nothing (kv_consumer) and has no memory tier: every hit chunk is a
    # distinct file the writers left (the prompts share no prefix)
    assert 0 < sum(got) // CHUNK <= files, (f"hit chunks {sum(got) // CHUNK} of {files} "
                                            f"chunk files on disk; num_cached_tokens {got}")


# ------------------------------------------------------------------------------ (e) abort
def test_abort_scenario_looks_up_and_never_loads_the_victim(engines):
    """Checks the scenario itself: the victim's hit was promised, never allocated or loaded."""
    run = engines.get("abort")
    kv, r = run["kv_cache"], run["results"][2]
    bs = kv["block_size"]
    blocks = lambda n: math.ceil(n / bs)  # noqa: E731
    free_beside_blocker = kv["num_blocks"] - 1 - blocks(len(P["blocker"]))   # 1: the null block
    assert blocks(len(P["victim"])) > free_beside_blocker, (kv, "the victim would fit")
    assert blocks(len(P["victim"])) <= kv["num_blocks"] - 1, (kv, "the victim never fits")
    want = loadable(len(P["victim"]), CHUNK)
    assert cached(run, 0) == [0] and want > 0
    assert r["victim_matched"] and all(m == want for m in r["victim_matched"]), r["victim_matched"]
    # vLLM asked again every step the victim waited; only the first asked the worker
    reused = metric(r["metrics_before_abort"], 'lmcache_lab_lookups_total{answer="reused"}')
    assert len(r["victim_matched"]) >= 2 and reused >= len(r["victim_matched"]) - 1, (
        reused, r["victim_matched"])
    assert r["victim_allocated"] == [] and r["victim_status"] == "WAITING", r
    assert r["victim_computed_tokens"] == 0 and r["victim_outputs"] == 0, r
    assert r["blocker_tokens"] is not None and len(r["blocker_tokens"]) == 200


def test_request_aborted_between_lookup_and_load_leaves_no_pin(engines):
    run = engines.get("abort")
    ref = tokens(engines.get("ref"), 3)
    assert tokens(run, 0) == ref and tokens(run, 3) == ref
    assert cached(run, 3) == [loadable(len(P["victim"]), CHUNK)]    # its chunks still serve
    # while the victim waited, its promised chunks were pinned (the gauge does see pins) ...
    before = metric(run["results"][2]["metrics_before_abort"], "lmcache_lab_pinned_chunks")
    promised = chunks_read(loadable(len(P["victim"]), CHUNK), CHUNK)
    assert before >= promised, (f"{before:.0f} chunks pinned while the victim waited for blocks; "
                                f"its lookup promised {promised}")
    # ... and none is left once it was aborted and the other requests finished
    pinned = metric(run["results"][4], "lmcache_lab_pinned_chunks")
    assert pinned == 0, f"{pinned:.0f} chunks are still pinned after every request finished"


def test_aborted_promise_is_not_counted_as_loaded(engines):
    run = engines.get("abort")
    m = run["results"][4]
    loaded = sum(cached(run, 0)) + sum(cached(run, 3))       # APC was reset before each
    hit = metric(m, "lmcache_lab_hit_tokens_total")
    assert hit == loaded, (f"lmcache_lab_hit_tokens_total is {hit:.0f}, but {loaded} tokens were "
                           "loaded: the aborted request's promised hit was counted as loaded")


# ------------------------------------------------------------------------------ (f) slow Redis
@pytest.mark.redis
def test_slow_redis_does_not_stop_serving(engines):
    ref = tokens(engines.get("ref"), 2)
    run = engines.get("redis")
    slow, stream = run["results"][1], run["results"][2]
    assert slow.get("reply") == "OK", f"DEBUG SLEEP did not run: {slow}"
    # the slow spell overlapped the stream (else this test would not test it)
    assert slow["start"] < stream["end"] and slow["end"] > stream["start"], (slow, stream)
    assert len(stream["tokens"]) == len(P["stream"])
    bad = [i for i, (a, b) in enumerate(zip(stream["tokens"], ref)) if a != b]
    assert not bad, f"stream prompts {bad} differ from the run without the connector"
    assert tokens(run, 4) == tokens(run, 0)


@pytest.mark.redis
def test_write_behind_skips_chunks_instead_of_exceeding_its_budget(engines):
    run = engines.get("redis")
    m = run["results"][5]
    skipped = metric(m, "lmcache_lab_write_behind_skipped_chunks_total")
    peak = metric(m, "lmcache_lab_write_behind_peak_bytes")
    stream_chunks = sum(len(p) // CHUNK for p in P["stream"])
    assert stream_chunks * chunk_bytes(engines.model) > WRITE_BEHIND_BUDGET
    assert skipped > 0, (f"Redis slept 3 s while the stream stored {stream_chunks} chunks "
                         f"({stream_chunks * chunk_bytes(engines.model) / 2**20:.0f} MiB, "
                         f"budget {WRITE_BEHIND_BUDGET / 2**20:.0f} MiB), yet no write-behind "
                         "chunk was skipped")
    assert 0 < peak <= WRITE_BEHIND_BUDGET, f"write-behind peak {peak:.0f} B, budget " \
                                            f"{WRITE_BEHIND_BUDGET} B"
