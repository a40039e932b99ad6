"""Prometheus metrics of the cache, safe in vLLM's multi-process layout.

Who records what:
  * the scheduler side counts lookups (`lookup_tokens`, `hit_tokens`, `engine_prefix_hit_tokens`)
    in its own process;
  * the worker side never touches Prometheus: it accumulates a `MetricsDelta` (plain numbers) per
    engine step and ships it to the scheduler inside vLLM's worker->scheduler connector metadata;
    deltas of several workers are summed by `MetricsDelta.aggregate`;
  * the scheduler side applies deltas to its `CacheMetrics`, whose private registry is served by
    one HTTP endpoint (`metrics.port`, bound to `metrics.host`, 127.0.0.1 by default).
So one endpoint per engine sees every process's numbers, whether the worker runs in the
scheduler's process (vLLM's `uni` executor) or in its own (`mp`).

Per tier (label `tier`): chunk reads by result (`tier_requests_total{result=hit|miss}`), bytes
read and written, errors, corrupt values, evictions, and for remote tiers (Redis, S3) a histogram of
each batch operation's time (`tier_op_seconds{op=lookup|get|put}`, timed in `tiers/remote.py`).

Misses: `miss_tokens_total{reason, tier}` splits lookup tokens minus hit tokens by reason
(`lmcache_lab.observe`): the scheduler counts each request's split when it finishes, the load's
shortfall (`load_failed`) arrives with the workers' deltas as `failed_load_tokens`.

Hit rate = rate(lmcache_lab_hit_tokens_total) / rate(lmcache_lab_lookup_tokens_total). Hit tokens
are counted when they are loaded into the engine, not when a lookup promises them: a promised
chunk that is gone by load time (evicted by another process from a shared tier, corrupt) counts
in lmcache_lab_failed_load_tokens_total instead, and is recomputed.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

PREFIX = "lmcache_lab_"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MAX_SAMPLES = 256  # latency samples carried per delta; more are folded into the last bucket sum


@dataclass
class MetricsDelta:
    """What one worker did since its last delta. Counters are increments; gauges are the latest
    absolute values (summed over workers, each holding its own tiers; peaks take the maximum)."""
    stored_chunks: int = 0
    stored_bytes: int = 0
    retrieved_chunks: int = 0
    retrieved_bytes: int = 0
    load_failures: int = 0
    store_failures: int = 0
    loaded_tokens: int = 0                 # tokens loaded into the engine (hits that happened)
    failed_load_tokens: int = 0            # tokens promised by a lookup that could not be loaded
    background_loaded_tokens: int = 0      # of loaded_tokens, those loaded between engine steps
    write_behind_skipped_chunks: int = 0   # slow-tier writes skipped: write-behind budget full
    evictions: dict[str, int] = field(default_factory=dict)          # tier -> count
    tier_used_bytes: dict[str, int] = field(default_factory=dict)    # tier -> bytes
    tier_capacity_bytes: dict[str, int] = field(default_factory=dict)
    tier_chunks: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)             # GAUGES name -> value
    load_seconds: list[float] = field(default_factory=list)
    store_seconds: list[float] = field(default_factory=list)
    tier_counts: dict[str, dict[str, int]] = field(default_factory=dict)   # tier -> TIER_COUNTERS
    tier_seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # tier -> op -> s

    COUNTERS = ("stored_chunks", "stored_bytes", "retrieved_chunks", "retrieved_bytes",
                "load_failures", "store_failures", "loaded_tokens", "failed_load_tokens",
                "background_loaded_tokens", "write_behind_skipped_chunks")

    def is_empty(self) -> bool:
        return not (any(getattr(self, c) for c in self.COUNTERS) or any(self.evictions.values())
                    or self.load_seconds or self.store_seconds or self.tier_used_bytes or self.gauges
                    or self.tier_counts or self.tier_seconds)

    def aggregate(self, other: "MetricsDelta") -> "MetricsDelta":
        def add(a: dict, b: dict) -> dict:
            return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}
        gauges = add(self.gauges, other.gauges)
        for k in gauges.keys() & PEAK_GAUGES:
            gauges[k] = max(self.gauges.get(k, 0), other.gauges.get(k, 0))
        return MetricsDelta(
            *(getattr(self, c) + getattr(other, c) for c in self.COUNTERS),
            add(self.evictions, other.evictions), add(self.tier_used_bytes, other.tier_used_bytes),
            add(self.tier_capacity_bytes, other.tier_capacity_bytes),
            add(self.tier_chunks, other.tier_chunks), gauges,
            (self.load_seconds + other.load_seconds)[-MAX_SAMPLES:],
            (self.store_seconds + other.store_seconds)[-MAX_SAMPLES:],
            tier_counts={t: add(self.tier_counts.get(t, {}), other.tier_counts.get(t, {}))
                         for t in self.tier_counts.keys() | other.tier_counts.keys()},
            tier_seconds={t: _join_samples(self.tier_seconds.get(t, {}), other.tier_seconds.get(t, {}))
                          for t in self.tier_seconds.keys() | other.tier_seconds.keys()})


def _join_samples(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, list[float]]:
    return {op: (a.get(op, []) + b.get(op, []))[-MAX_SAMPLES:] for op in a.keys() | b.keys()}


# Per-tier counters carried in `MetricsDelta.tier_counts`: `TierStats` field -> (metric, help).
# hits and misses are one metric, `tier_requests{result=hit|miss}`.
TIER_COUNTERS = {
    "hits": ("tier_requests", "Chunk reads asked of a tier, by result (hit, miss)"),
    "misses": ("tier_requests", ""),
    "bytes_read": ("tier_read_bytes", "Bytes of chunks read from a tier (hits)"),
    "bytes_written": ("tier_written_bytes", "Bytes of chunks written to a tier"),
    "errors": ("tier_errors", "Backend faults of a tier (I/O errors, timeouts, refused requests), "
                              "each answered as a miss"),
    "corrupt": ("tier_corrupt", "Values a tier held that failed verification (counted misses, deleted)"),
}
RESULT = {"hits": "hit", "misses": "miss"}


# Worker-side gauges carried in `MetricsDelta.gauges`: name -> help. Peaks aggregate by maximum.
GAUGES = {
    "pinned_chunks": "Chunks pinned between a lookup and its load (0 when no request is in between)",
    "write_behind_pending_bytes": "Chunk bytes waiting to be written to slow tiers (disk, Redis)",
    "write_behind_peak_bytes": "Highest write_behind_pending_bytes of any worker (<= write_behind.max_bytes)",
}
PEAK_GAUGES = {"write_behind_peak_bytes"}


class CacheMetrics:
    """The metric definitions, in a private registry (several engines in one process, and tests,
    never collide in the global one)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "Requests looked up in the cache", registry=r)
        self.lookup_tokens = Counter(PREFIX + "lookup_tokens",
                                     "Prompt tokens in full chunks asked about", registry=r)
        self.hit_tokens = Counter(PREFIX + "hit_tokens",
                                  "Prompt tokens loaded from the cache into the engine (not computed)",
                                  registry=r)
        self.failed_load_tokens = Counter(
            PREFIX + "failed_load_tokens",
            "Prompt tokens a lookup promised that could not be loaded (recomputed instead)", registry=r)
        self.background_loaded_tokens = Counter(
            PREFIX + "background_loaded_tokens",
            "Of the hit tokens, those loaded between engine steps (prefetch: vLLM's async KV load)",
            registry=r)
        self.write_behind_skipped_chunks = Counter(
            PREFIX + "write_behind_skipped_chunks",
            "Chunks not written to slow tiers because the write-behind budget was full", registry=r)
        self.engine_prefix_hit_tokens = Counter(
            PREFIX + "engine_prefix_hit_tokens",
            "Prompt tokens already served by the engine's own prefix cache (APC), not by this one",
            registry=r)
        self.miss_tokens = Counter(
            PREFIX + "miss_tokens", "Looked-up servable prompt tokens not loaded from the cache, by "
            "reason (engine_cache, partial, load_failed, refused, never_stored, evicted, "
            "skipped_store); tier: which tier evicted them (evicted only)", ["reason", "tier"],
            registry=r)
        self.stored_chunks = Counter(PREFIX + "stored_chunks", "Chunks newly stored", registry=r)
        self.stored_bytes = Counter(PREFIX + "stored_bytes", "Bytes of chunks newly stored", registry=r)
        self.retrieved_chunks = Counter(PREFIX + "retrieved_chunks", "Chunks loaded into the engine",
                                        registry=r)
        self.retrieved_bytes = Counter(PREFIX + "retrieved_bytes", "Bytes loaded into the engine",
                                       registry=r)
        self.load_failures = Counter(
            PREFIX + "load_failures",
            "Loads that fell short of the reported hit (chunk evicted or corrupt); recomputed",
            registry=r)
        self.store_failures = Counter(
            PREFIX + "store_failures", "Chunks that could not be stored (a future miss)", registry=r)
        self.lookup_errors = Counter(
            PREFIX + "lookup_errors", "Lookups the worker's cache could not answer (counted as misses)",
            registry=r)
        self.refused_requests = Counter(
            PREFIX + "refused_requests",
            "Requests neither looked up nor stored: their KV depends on more than token ids "
            "(prompt embeddings, multimodal inputs)", registry=r)
        self.plan_errors = Counter(
            PREFIX + "plan_errors",
            "Requests whose load or store could not be planned in a step (loads recomputed)",
            registry=r)
        self.lookups = Counter(
            PREFIX + "lookups", "Lookups the scheduler asked, by how they were answered: `worker` "
            "(a round trip to the worker's cache) or `reused` (a waiting request asked again, "
            "answered from its pinned first answer)", ["answer"], registry=r)
        self.evictions = Counter(PREFIX + "evictions", "Chunks evicted, per tier", ["tier"], registry=r)
        self.tier_used_bytes = Gauge(PREFIX + "tier_used_bytes", "Bytes held, per tier", ["tier"],
                                     registry=r)
        self.tier_capacity_bytes = Gauge(PREFIX + "tier_capacity_bytes", "Byte budget, per tier",
                                         ["tier"], registry=r)
        self.tier_chunks = Gauge(PREFIX + "tier_chunks", "Chunks held, per tier", ["tier"], registry=r)
        self.gauges = {name: Gauge(PREFIX + name, doc, registry=r) for name, doc in GAUGES.items()}
        self.load_seconds = Histogram(PREFIX + "load_seconds",
                                      "Time to load one request's hit chunks into the engine",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.store_seconds = Histogram(PREFIX + "store_seconds",
                                       "Time a step spends copying new chunks out of the engine",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.tier_counters = {}
        for metric, doc in TIER_COUNTERS.values():
            if metric not in self.tier_counters:
                labels = ["tier", "result"] if metric == "tier_requests" else ["tier"]
                self.tier_counters[metric] = Counter(PREFIX + metric, doc, labels, registry=r)
        self.tier_op_seconds = Histogram(
            PREFIX + "tier_op_seconds",
            "Time of one batch operation of a remote tier (op: lookup, get, put; one request or "
            "pipeline round per chunk batch)", ["tier", "op"], buckets=LATENCY_BUCKETS, registry=r)
        self._server = None
        self._interval: dict[str, int] = {}     # counts since `take_interval` (vLLM's stats)

    def _count(self, name: str, n: int) -> None:
        if n:
            self._interval[name] = self._interval.get(name, 0) + int(n)

    def take_interval(self) -> dict[str, int]:
        """What was counted since the last call: lookup_tokens, hit_tokens, stored_chunks,
        evicted_chunks and `miss_tokens:<reason>` (the connector's stats for vLLM)."""
        out, self._interval = self._interval, {}
        return out

    def record_lookup(self, lookup_tokens: int, engine_prefix_tokens: int) -> None:
        """One request looked up: its tokens in full chunks, and those the engine's own prefix
        cache already had. Hits are counted when they are loaded (`record_load`)."""
        self.requests.inc()
        self.lookup_tokens.inc(lookup_tokens)
        self._count("lookup_tokens", lookup_tokens)
        self.engine_prefix_hit_tokens.inc(engine_prefix_tokens)

    def record_load(self, loaded_tokens: int, failed_tokens: int) -> None:
        self.hit_tokens.inc(loaded_tokens)
        self.failed_load_tokens.inc(failed_tokens)
        self._count("hit_tokens", loaded_tokens)
        if failed_tokens:
            self.miss_tokens.labels("load_failed", "").inc(failed_tokens)
            self._count("miss_tokens:load_failed", failed_tokens)

    def record_misses(self, misses) -> None:
        """Add one request's missed tokens, a mapping (reason, tier) -> tokens
        (`observe.request_misses`)."""
        for (reason, tier), n in misses.items():
            if n:
                self.miss_tokens.labels(reason, tier).inc(n)
                self._count("miss_tokens:" + reason, n)

    def apply(self, d: MetricsDelta) -> None:
        """Fold a worker delta into the metrics (scheduler side)."""
        self.stored_chunks.inc(d.stored_chunks)
        self.stored_bytes.inc(d.stored_bytes)
        self._count("stored_chunks", d.stored_chunks)
        self._count("evicted_chunks", sum(d.evictions.values()))
        self.retrieved_chunks.inc(d.retrieved_chunks)
        self.retrieved_bytes.inc(d.retrieved_bytes)
        self.load_failures.inc(d.load_failures)
        self.store_failures.inc(d.store_failures)
        self.record_load(d.loaded_tokens, d.failed_load_tokens)
        self.background_loaded_tokens.inc(d.background_loaded_tokens)
        self.write_behind_skipped_chunks.inc(d.write_behind_skipped_chunks)
        for name, v in d.gauges.items():
            self.gauges[name].set(v)
        for tier, n in d.evictions.items():
            self.evictions.labels(tier).inc(n)
        for gauge, values in ((self.tier_used_bytes, d.tier_used_bytes),
                              (self.tier_capacity_bytes, d.tier_capacity_bytes),
                              (self.tier_chunks, d.tier_chunks)):
            for tier, v in values.items():
                gauge.labels(tier).set(v)
        for s in d.load_seconds:
            self.load_seconds.observe(s)
        for s in d.store_seconds:
            self.store_seconds.observe(s)
        for tier, counts in d.tier_counts.items():
            for name, n in counts.items():
                metric, _ = TIER_COUNTERS[name]
                labels = (tier, RESULT[name]) if name in RESULT else (tier,)
                self.tier_counters[metric].labels(*labels).inc(n)
        for tier, ops in d.tier_seconds.items():
            for op, samples in ops.items():
                histogram = self.tier_op_seconds.labels(tier, op)
                for s in samples:
                    histogram.observe(s)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (a daemon thread); returns the bound port (useful with 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = server.server_address[1]
        log.info("lmcache_lab metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def value(self, name: str, **labels) -> float:
        """Current value of a sample (tests, notebooks): e.g. value("lmcache_lab_hit_tokens_total")."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else v


class DeltaTracker:
    """Turns an engine's cumulative statistics into `MetricsDelta`s (worker side).

    Call `take(engine)` once per step, under the engine's lock; latencies are pushed with
    `observe_load/observe_store` as they happen (from any thread: background loads too)."""

    def __init__(self):
        self._samples_lock = threading.Lock()
        self._last: dict[str, int] = {}
        self._tier_last: dict[tuple[str, str], int] = {}   # (tier, TierStats field) -> last value
        self._load: list[float] = []
        self._store: list[float] = []
        self._gauges: dict[str, int] = {}
        self._gauges_due = True

    def observe_load(self, seconds: float) -> None:
        with self._samples_lock:
            self._load.append(seconds)
            del self._load[:-MAX_SAMPLES]

    def observe_store(self, seconds: float) -> None:
        with self._samples_lock:
            self._store.append(seconds)
            del self._store[:-MAX_SAMPLES]

    def take(self, engine, counters: dict[str, int] | None = None,
             gauges: dict[str, int] | None = None) -> MetricsDelta | None:
        """The delta since the previous call; None when nothing changed. `counters` are the
        caller's own cumulative counters (names of `MetricsDelta.COUNTERS`, beside the engine's
        statistics); `gauges` its current `GAUGES` values (sent when they change)."""
        s = engine.stats
        now = {"stored_chunks": s.stored_chunks, "stored_bytes": s.stored_bytes,
               "retrieved_chunks": s.retrieved_chunks, "retrieved_bytes": s.retrieved_bytes,
               "load_failures": s.load_failures, **(counters or {})}
        d = MetricsDelta(**{k: v - self._last.get(k, 0) for k, v in now.items()})
        self._last = now
        changed = any(getattr(d, c) for c in MetricsDelta.COUNTERS)
        for tier in engine.tiers:
            for name in ("evictions", *TIER_COUNTERS):
                now_n = getattr(tier.stats, name)
                n = now_n - self._tier_last.get((tier.name, name), 0)
                if n:
                    self._tier_last[tier.name, name] = now_n
                    if name == "evictions":
                        d.evictions[tier.name] = n
                    else:
                        d.tier_counts.setdefault(tier.name, {})[name] = n
                    changed = True
            seconds = tier.op_times.drain()
            if seconds:
                d.tier_seconds[tier.name] = seconds
        if changed or self._gauges_due:
            for tier in engine.tiers:
                d.tier_used_bytes[tier.name] = tier.used_bytes
                d.tier_capacity_bytes[tier.name] = tier.capacity_bytes
                d.tier_chunks[tier.name] = len(tier)
            self._gauges_due = False
        if gauges and gauges != self._gauges:
            d.gauges, self._gauges = dict(gauges), dict(gauges)
        with self._samples_lock:
            d.load_seconds, self._load = self._load, []
            d.store_seconds, self._store = self._store, []
        return None if d.is_empty() else d

    def refresh_gauges(self) -> None:
        """Send tier gauges with the next delta even if nothing else changed (e.g. after a
        write-behind finished)."""
        self._gauges_due = True
