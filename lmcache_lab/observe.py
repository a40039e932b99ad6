"""Why a looked-up token was not served, and a capture of live traffic as a replayable trace.

Miss reasons. Every servable prompt token a lookup asks about (`servable_tokens` in
`integrations/vllm_plan.py`) is either loaded (a hit) or missed for exactly one reason:

    engine_cache   vLLM's own prefix cache (APC) had it: the connector was not asked for it
    partial        the lookup offered it, the engine took fewer tokens (it trims a hit's end)
    load_failed    offered and accepted, but the load fell short (corrupt, gone, tier fault), or
                   the lookup itself failed (worker unreachable, timeout)
    refused        the request is not served at all (prompt embeddings, multimodal inputs)
    never_stored   past the cached prefix: its first missing chunk was never stored here (or
                   was forgotten by the bounded ghost index, `observability.ghost_entries`)
    evicted        ... was stored and then evicted; the label `tier` names the last tier that
                   evicted it
    skipped_store  ... was stored in memory only: the write-behind budget was full, so the
                   slow tiers never got it, and memory has evicted it since

The prefix rule makes every token after the first missing chunk unservable, so the tail of a
request takes the reason of its first missing chunk. Per request the reasons therefore sum to
its lookup tokens minus its hit tokens (`request_misses` plus the load's shortfall).

Trace capture (`trace.path`): each finished request becomes one line of a Mooncake trace
(timestamp in ms, input_length, output_length, hash_ids = its full chunks' keys as 63-bit
integers); no token ids or text. A metadata line `{"lmcache_lab_trace": {...}}` first (chunk
tokens, the engine's block size, policy, capacity), and one more with `chunk_bytes` once the
first chunk was stored, tell the replay how to size chunks. Hashing and writing run on one
background thread behind a bounded queue: a full queue drops the record (counted), never waits.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

META_KEY = "lmcache_lab_trace"      # the key of a captured trace's metadata lines

MISS_REASONS = ("engine_cache", "partial", "load_failed", "refused", "never_stored", "evicted",
                "skipped_store")
Miss = tuple[str, str]          # (reason, tier); tier is "" except for `evicted`
NEVER_STORED: Miss = ("never_stored", "")
TRACE_QUEUE = 4096              # records waiting for the writer thread; beyond: dropped (counted)


class GhostIndex:
    """What became of chunks that are no longer held: key -> (reason, tier), at most `capacity`
    entries, the oldest forgotten first (a forgotten key reads as never stored). Thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[bytes, Miss] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, keys: Sequence[bytes], reason: str, tier: str = "") -> None:
        self._put(keys, lambda _old: (reason, tier))

    def evicted(self, tier: str, keys: Sequence[bytes]) -> None:
        """`keys` were evicted from `tier`; a key whose slow-tier store was skipped keeps that
        reason (it is why no slower tier still holds it)."""
        evicted: Miss = ("evicted", tier)
        self._put(keys, lambda old: old if old[0] == "skipped_store" else evicted)

    def _put(self, keys: Sequence[bytes], miss_of) -> None:
        """Set each key's entry to `miss_of(its current entry)`, newest last; trim the oldest."""
        if self.capacity <= 0:
            return
        with self._lock:
            entries = self._entries
            for key in keys:
                entries[key] = miss_of(entries.pop(key, NEVER_STORED))
            while len(entries) > self.capacity:
                entries.popitem(last=False)

    def forget(self, key: bytes) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def why(self, key: bytes) -> Miss:
        """Why `key`, not held now, misses."""
        with self._lock:
            return self._entries.get(key, NEVER_STORED)

    def __len__(self) -> int:
        return len(self._entries)


def request_misses(lookup_tokens: int, engine_tokens: int, hit_tokens: int, accepted: int,
                   tail: Miss) -> Counter:
    """The scheduler's split of one request's missed tokens: (reason, tier) -> tokens.

    `lookup_tokens` servable tokens were asked about; the engine's prefix cache had the first
    `engine_tokens`; the lookup found a hit up to token `hit_tokens`, of which the engine
    accepted `accepted` tokens to load; `tail` is the reason of the first chunk the cache lacks.
    The accepted tokens are either loaded (hits) or `load_failed` (counted where the load runs),
    so these counts plus the load's shortfall sum to `lookup_tokens` minus the hit tokens."""
    engine = min(engine_tokens, lookup_tokens)
    offered = max(0, min(hit_tokens, lookup_tokens) - engine)
    accepted = min(max(0, accepted), offered)
    out: Counter = Counter()
    out["engine_cache", ""] += engine
    out["partial", ""] += offered - accepted
    out[tail] += lookup_tokens - engine - offered
    return +out


def trace_id(key: bytes) -> int:
    """A chunk key as a process-stable, JSON-safe 63-bit integer (Mooncake `hash_ids`)."""
    return int.from_bytes(key[:8], "big") >> 1


class TraceWriter:
    """Appends requests to a Mooncake-format JSONL trace from a background thread.

    `submit` costs the caller a queue put; the thread keys the prompt (`keyer.keys`, the same
    chain as the cache's keys up to the namespace, so equal prefixes get equal ids), applies the
    sampling (by the request's first chunk id, so requests sharing a first chunk are kept or
    dropped together) and writes one line."""

    def __init__(self, path: str | Path, keyer, meta: dict[str, Any], sample: float = 1.0,
                 max_pending: int = TRACE_QUEUE):
        if not 0.0 < sample <= 1.0:
            raise ValueError(f"trace.sample: must be in (0, 1], got {sample!r}")
        self.path, self.keyer, self.sample = Path(path), keyer, sample
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self._file.write(json.dumps({META_KEY: {"version": 1, **meta}}) + "\n")
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._t0 = time.time()
        self.written = self.dropped = 0
        self._chunk_bytes: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="lmcache-lab-trace")
        self._thread.start()

    def submit(self, arrival_s: float, prompt: Sequence[int], identity, output_length: int) -> None:
        """Queue one finished request (`arrival_s`: its arrival, seconds since the epoch)."""
        try:
            self._queue.put_nowait(("request", (arrival_s, prompt, tuple(identity), output_length)))
        except queue.Full:
            self.dropped += 1

    def chunk_bytes(self, nbytes: int) -> None:
        """The stored size of one chunk (written once, as a metadata line)."""
        if self._chunk_bytes is None and nbytes > 0:
            self._chunk_bytes = nbytes
            self._queue.put(("meta", {"chunk_bytes": int(nbytes)}))

    def _line(self, arrival_s: float, prompt, identity, output_length: int) -> str | None:
        ids = [trace_id(k) for k in self.keyer.keys(prompt, identity=identity)]
        if self.sample < 1.0 and ids and ids[0] / 2**63 >= self.sample:
            return None
        return json.dumps({"timestamp": round((arrival_s - self._t0) * 1000.0, 3),
                           "input_length": len(prompt), "output_length": int(output_length),
                           "hash_ids": ids})

    def _run(self) -> None:
        while True:
            kind, item = self._queue.get()
            try:
                if kind == "stop":
                    return
                if kind == "meta":
                    self._file.write(json.dumps({META_KEY: item}) + "\n")
                    continue
                line = self._line(*item)
                if line is not None:
                    self._file.write(line + "\n")
                    self.written += 1
            except Exception:
                self.dropped += 1
                log.exception("lmcache_lab: a trace record could not be written; dropped")
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued record is written."""
        self._queue.join()
        self._file.flush()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(("stop", None))
            self._thread.join()
        self._file.close()
