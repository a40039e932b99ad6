"""Worker-side cache state of the vLLM connector, and the lookup channel the scheduler uses.

vLLM runs the scheduler and the workers in different processes (on CPU always: its executor is
`mp`). The chunks live with the worker, so the worker owns the `CacheEngine`, the chunk keys of
each live request and the pins; the scheduler asks it through a local socket:

    scheduler  LookupClient.lookup(req_id, prompt, identity, max_chunks, skip)  --unix socket-->
    worker     WorkerCache.lookup: key the prompt under the request's identity, pin the chunks
               the answer may promise (beyond `skip`), count the cached prefix, unpin the rest
               -> reply with the count, and why the first chunk it lacks misses

Invariants:
  * a chunk counted by a lookup is pinned before it is counted (`CacheEngine.lookup_and_pin`),
    so nothing evicts it from this process's tiers before the worker has loaded it; it stays
    pinned until the request's load ran, its hit was declined, it was looked up again, or it
    finished. A shared tier (Redis, a disk directory) can still lose it to another process: the
    load then falls short, the missing tokens are recomputed and counted as failed loads;
  * locks: `lock` guards only the per-request dicts and is never held during tier I/O; each tier
    has its own lock (`TieredStore`), so a slow disk or Redis write never blocks a lookup or a
    load served by the memory tier;
  * slow tiers (disk, Redis) are written behind the step by one `WriteBehind` thread in at most
    `write_behind.max_bytes` of pending chunks; a chunk that does not fit is skipped for them
    (counted), never waited for;
  * the tiers' policies see one touch per request and tier on the store path, at its end (the
    chunks of a request are stored over several steps without touching), as the trace replay
    does; a load touches the loaded chain, as the replay's hit touch;
  * a miss's reason comes from the ghost index (`observe.GhostIndex`): every eviction of every
    tier and every write-behind skip is recorded there, bounded by `observability.ghost_entries`;
  * the wire messages are a small JSON header plus raw little-endian uint32 tokens; nothing is
    unpickled; the socket lives in a private per-engine directory (0700) and the listener
    requires vLLM's engine id as authentication key; a lookup not answered within
    `lookup_timeout_s` is a miss (counted), and its connection is dropped with any late reply.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import xxhash

from lmcache_lab.engine import CacheEngine
from lmcache_lab.keys import Identity
from lmcache_lab.metrics import DeltaTracker
from lmcache_lab.observe import NEVER_STORED, GhostIndex, Miss
from lmcache_lab.tiers import MemoryTier, payload_nbytes
from lmcache_lab.write_behind import WriteBehind

log = logging.getLogger(__name__)

MAX_EVENTS = 4096      # chunk events held between two steps; more are dropped (counted)


def socket_path(endpoint: str, rank: int) -> str:
    """Where rank `rank` of an engine listens (AF_UNIX paths are <= 107 bytes: `endpoint` is
    hashed when long), in a per-user directory only its owner can enter."""
    base = Path(tempfile.gettempdir()) / f"lmcl-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    if len(endpoint) > 48:
        endpoint = xxhash.xxh3_128_hexdigest(endpoint.encode())
    return str(base / f"{endpoint}-{rank}.sock")


class WorkerCache:
    """The worker's cache: engine + per-request keys and pins + write-behind + lookup server."""

    def __init__(self, engine: CacheEngine, events: bool = False, tail_block: int = 0,
                 slow_hits: bool = True):
        """`events`: collect chunk stores and evictions for vLLM's KV events (`take_events`).
        `tail_block`: the engine's block size when tail chunks (a prompt's whole blocks past its
        last full chunk, `ChunkKeyer.tail_key`) are served and stored; 0: off. `slow_hits`: tell
        the scheduler which hits only a slow tier holds, and measure their reads (where hits may
        load between engine steps, config `prefetch`); else the answer's slow count is 0."""
        self.engine = engine
        self.tail_block = tail_block
        self.slow_hits = slow_hits
        self.lock = threading.Lock()                # guards keys, pins and the counters below
        self.keys: dict[str, list[bytes]] = {}      # req_id -> keys of its full prompt chunks
        self.pins: dict[str, list[bytes]] = {}      # req_id -> keys pinned for its load
        self.prompts: dict[str, tuple[bytes, np.ndarray]] = {}   # req_id -> (chain root, tokens)
        self.tail_hits: dict[str, tuple[int, bytes, int]] = {}  # req_id -> (chunk, key, blocks)
        self.fast = [i for i, t in enumerate(engine.tiers) if isinstance(t, MemoryTier)]
        self.slow = [i for i, t in enumerate(engine.tiers) if not isinstance(t, MemoryTier)]
        self.deltas = DeltaTracker()
        # seconds a load spent per chunk read from a slow tier (moving average over loads; 0
        # until one was measured): the lookup answer estimates a hit's slow read time from it
        self.slow_chunk_s = 0.0
        self.counters = {"store_failures": 0, "loaded_tokens": 0, "failed_load_tokens": 0,
                         "background_loaded_tokens": 0}
        self.writer = WriteBehind(engine.config.write_behind.max_bytes) if self.slow else None
        self.ghost = GhostIndex(engine.config.observability.ghost_entries)
        self.events: list[tuple] | None = [] if events else None    # raw, for vllm_stats.kv_events
        self.events_dropped = 0
        engine.store_.observe_evictions(self._evicted)
        self._server: LookupServer | None = None

    def count(self, **increments: int) -> None:
        with self.lock:
            for name, n in increments.items():
                self.counters[name] += n

    def _evicted(self, tier: str, keys: list[bytes]) -> None:
        self.ghost.evicted(tier, keys)
        self._event(*(("removed", tier, k) for k in keys))

    def _event(self, *events: tuple) -> None:
        if self.events is None:
            return
        with self.lock:
            room = MAX_EVENTS - len(self.events)
            self.events.extend(events[:max(0, room)])
            self.events_dropped += max(0, len(events) - max(0, room))

    def take_events(self) -> list[tuple]:
        """Raw chunk events since the last call (`vllm_stats.kv_events` turns them into vLLM's)."""
        if self.events is None:
            return []
        with self.lock:
            out, self.events = self.events, []
        return out

    # ---- requests ---------------------------------------------------------------------------------
    def lookup(self, req_id: str, tokens: np.ndarray, max_chunks: int, skip: int,
               identity: Identity = ()) -> int:
        """Key `tokens` (all full chunks, kept for the request's stores) under the request's
        `identity`, count the cached prefix among the first `max_chunks`, pin chunks [skip, hit)
        for the request's load (replacing any pins of an earlier lookup of it)."""
        return self.lookup_why(req_id, tokens, max_chunks, skip, identity)[0]

    def lookup_why(self, req_id: str, tokens: np.ndarray, max_chunks: int, skip: int,
                   identity: Identity = ()) -> tuple[int, Miss]:
        """`lookup`, and why the first chunk past the hit misses (`never_stored` when every
        chunk asked about is a hit)."""
        hit, _, miss, _ = self.answer(req_id, tokens, max_chunks, skip, identity)
        return hit, miss

    def answer(self, req_id: str, tokens: np.ndarray, max_chunks: int, skip: int,
               identity: Identity = ()) -> tuple[int, int, Miss, int]:
        """`lookup_why`, plus the blocks of a tail chunk found (and pinned) right after the hit
        (0 without tail chunks, or when the hit stops before `skip` or reaches `max_chunks`),
        and how many chunks it pinned no memory tier holds (their load reads a slow tier)."""
        hit, tail, keys, pinned = self._lookup(req_id, tokens, max_chunks, skip, identity)
        miss = self.ghost.why(keys[hit]) if hit < min(max_chunks, len(keys)) else NEVER_STORED
        return hit, tail, miss, self._slow_count(pinned) if self.slow_hits else 0

    def _slow_count(self, keys: Sequence[bytes]) -> int:
        """How many of `keys` no memory tier holds."""
        store = self.engine.store_
        if not self.fast:
            return len(keys)
        fast = store.select(self.fast)
        return sum(not store.contains(k, fast) for k in keys)

    def _lookup(self, req_id: str, tokens: np.ndarray, max_chunks: int, skip: int,
                identity: Identity) -> tuple[int, int, list[bytes], list[bytes]]:
        """(hit chunks, tail blocks, the prompt's keys, the keys pinned for its load)."""
        keys = self.engine.chunk_keys(tokens, identity=identity)
        root = self.engine.keyer.request_root(identity) if self.tail_block else b""
        with self.lock:
            self.keys[req_id] = keys
            if self.tail_block:
                self.prompts[req_id] = (root, tokens)
            self.tail_hits.pop(req_id, None)
            old = self.pins.pop(req_id, None)
        if old:
            self.engine.unpin(old)
        hit = self.engine.lookup_and_pin(keys[:max_chunks], skip) if max_chunks > 0 else 0
        pinned = keys[skip:hit]
        tail = 0
        if self.tail_block and skip <= hit < max_chunks:
            tail, key = self._find_tail(hit, keys, root, tokens)
            if tail:
                pinned = pinned + [key]
                with self.lock:
                    self.tail_hits[req_id] = (hit, key, tail)
        if pinned:
            with self.lock:
                old = self.pins.pop(req_id, None)
                self.pins[req_id] = pinned
            if old:
                self.engine.unpin(old)
        return hit, tail, keys, pinned

    def _tail_key(self, chunk: int, blocks: int, keys: list[bytes], root: bytes,
                  tokens: np.ndarray) -> bytes:
        """Key of the tail chunk of `blocks` whole blocks at chunk index `chunk` of a prompt
        (`keys`: its full chunks' keys, `root`: its chain root)."""
        start = chunk * self.engine.chunk_size
        return self.engine.keyer.tail_key(keys[chunk - 1] if chunk else root,
                                          tokens[start:start + blocks * self.tail_block])

    def _find_tail(self, chunk: int, keys: list[bytes], root: bytes,
                   tokens: np.ndarray) -> tuple[int, bytes]:
        """(blocks, key) of the longest tail chunk present at chunk index `chunk` that ends
        before the prompt's last token, pinned; (0, b"") if none. Longest first: a tail is a
        prompt's whole blocks, so a longer one holds more of a repeated history."""
        bs, cs = self.tail_block, self.engine.chunk_size
        for m in range(min(cs // bs - 1, (len(tokens) - 1 - chunk * cs) // bs), 0, -1):
            key = self._tail_key(chunk, m, keys, root, tokens)
            self.engine.pin_keys([key])            # pinned before counted, as lookup_and_pin
            if self.engine.store_.contains(key):
                self.engine.count(hit_tokens=m * bs)
                return m, key
            self.engine.unpin([key])
        return 0, b""
    def tail_at(self, req_id: str) -> tuple[int, int] | None:
        """(chunk index, blocks) of the tail chunk the request's lookup found, if any."""
        with self.lock:
            tail = self.tail_hits.get(req_id)
        return None if tail is None else (tail[0], tail[2])

    def release(self, req_id: str) -> None:
        """Drop the request's pins (its hit was declined, or its load ran)."""
        with self.lock:
            pins = self.pins.pop(req_id, None)
        if pins:
            self.engine.unpin(pins)

    def forget(self, req_id: str) -> None:
        """The request finished: one touch of its chain per tier (slow tiers after its queued
        writes), then drop its keys and pins."""
        with self.lock:
            keys = self.keys.pop(req_id, None)
            self.prompts.pop(req_id, None)
            self.tail_hits.pop(req_id, None)
        self.release(req_id)
        if not keys:
            return
        self.engine.touch(keys, self.fast)
        if self.writer is not None:
            self.writer.submit(0, lambda: self.engine.touch(keys, self.slow))

    def read(self, req_id: str, first: int, last: int, into=None) -> list[torch.Tensor | None]:
        """Chunks [first, last) of the request, stopping at the first unreadable one (counted as a
        load failure); releases the request's pins. `into(i)`: where a tier may read chunk i
        straight into place (`CacheEngine.retrieve_keyed`); such a chunk's entry is None."""
        with self.lock:
            keys = self.keys.get(req_id)
            tail = self.tail_hits.get(req_id)
        try:
            if keys is not None and tail is not None and tail[0] == last - 1:
                keys = keys[:last - 1] + [tail[1]]           # the load ends in the tail chunk
            if keys is None or len(keys) < last:
                self.engine.count(load_failures=1)
                return []
            slow = self._slow_count(keys[first:last]) if self.slow_hits else 0
            t0 = time.perf_counter()
            chunks = self.engine.retrieve_keyed(keys[:last], first, touch_tiers=self.fast, into=into)
            if slow and len(chunks) == last - first:
                sample = (time.perf_counter() - t0) / slow
                self.slow_chunk_s = sample if not self.slow_chunk_s else \
                    0.8 * self.slow_chunk_s + 0.2 * sample
            if self.writer is not None:     # the slow tiers' touch waits behind their writes
                chain = keys[:first + len(chunks)]
                self.writer.submit(0, lambda: self.engine.touch(chain, self.slow))
            return chunks
        finally:
            self.release(req_id)

    def missing(self, req_id: str, first: int, last: int) -> tuple[list[bytes], list[int]]:
        """(the request's keys, indices in [first, last) of chunks to store). With a memory tier,
        only it is asked (it runs on the step's critical path: never wait for disk or Redis; the
        write-behind skips chunks the slow tiers hold already); without one, every tier."""
        with self.lock:
            keys = self.keys.get(req_id)
        if keys is None:
            return [], []
        store = self.engine.store_
        tiers = store.select(self.fast) if self.fast else None
        return keys, [i for i in range(first, min(last, len(keys)))
                      if not store.contains(keys[i], tiers)]

    def tail_chain(self, req_id: str, chunk: int, blocks: int) -> list[bytes] | None:
        """The chain to `write` the request's tail chunk under (its full chunks' keys before
        `chunk`, then the key of `blocks` whole blocks at `chunk`), or None when it is present
        (asked of the memory tiers only, as `missing` asks) or the request is unknown."""
        with self.lock:
            keys, prompt = self.keys.get(req_id), self.prompts.get(req_id)
        if keys is None or prompt is None or len(keys) < chunk:
            return None
        key = self._tail_key(chunk, blocks, keys, *prompt)
        store = self.engine.store_
        if store.contains(key, store.select(self.fast) if self.fast else None):
            return None
        return keys[:chunk] + [key]

    def write(self, keys: list[bytes], index: int, chunk: torch.Tensor, tokens: int | None = None) -> None:
        """Store a fresh chunk tensor as chunk `index` of the chain `keys` (`tokens`: its length,
        when it is a tail chunk): memory tiers now, slow tiers behind the step if the
        write-behind budget has room (else skipped, counted)."""
        parent = keys[index - 1] if index else None
        tokens = tokens or self.engine.chunk_size
        if self.fast and self.engine.store_keyed(keys, [chunk], index, tiers=self.fast, touch=False):
            self._stored(keys[index], parent, self.fast, tokens)
        if self.writer is not None:
            chain = keys[:index + 1]

            def store_slow():
                if self.engine.store_keyed(chain, [chunk], index, tiers=self.slow, touch=False):
                    self._stored(chain[index], parent, self.slow, tokens)

            queued = self.writer.submit(payload_nbytes(chunk), store_slow)
            if queued:
                self.ghost.forget(keys[index])
            else:
                self.ghost.record([keys[index]], "skipped_store")

    def _stored(self, key: bytes, parent: bytes | None, tiers: list[int], tokens: int) -> None:
        self._event(*(("stored", self.engine.tiers[i].name, key, parent, tokens) for i in tiers))

    def flush(self) -> None:
        """Wait until every chunk handed to `write` is in every slow tier (or skipped)."""
        if self.writer is not None:
            self.writer.flush()

    def take_delta(self):
        with self.lock:
            counters = dict(self.counters)
        gauges = {"pinned_chunks": self.engine.store_.pinned()}
        if self.writer is not None:
            ws = self.writer.stats
            counters["write_behind_skipped_chunks"] = ws.skipped
            counters["store_failures"] += ws.failed
            gauges["write_behind_pending_bytes"] = ws.pending_bytes
            gauges["write_behind_peak_bytes"] = ws.peak_bytes
        return self.deltas.take(self.engine, counters, gauges)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def serve(self, path: str, authkey: bytes) -> None:
        """Answer the scheduler's lookups on a unix socket at `path`."""
        self._server = LookupServer(path, authkey, self.answer, lambda: self.slow_chunk_s)


def refuse_lookup(req_id: str, tokens: np.ndarray, max_chunks: int, skip: int,
                  identity: Identity = ()) -> tuple[int, int, Miss, int]:
    """The answer of a worker whose KV cache lmcache_lab refused: nothing is cached, at once."""
    return 0, 0, ("refused", ""), 0


class LookupServer:
    """Answers `LookupClient`s on a unix socket with `answer(req_id, tokens, max_chunks, skip,
    identity)` -> (hit chunks, tail blocks, miss reason, chunks only a slow tier holds) (a daemon
    thread per connection), and the estimated seconds to read those (`slow_chunk_s`). A failing answer
    is sent back as an error, which the scheduler counts as a miss."""

    def __init__(self, path: str, authkey: bytes, answer, slow_chunk_s=lambda: 0.0):
        self.answer = answer
        self.slow_chunk_s = slow_chunk_s
        if os.path.exists(path):
            os.unlink(path)
        self._listener: Listener | None = Listener(path, family="AF_UNIX", authkey=authkey)
        threading.Thread(target=self._accept, daemon=True, name="lmcache-lab-lookup").start()

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                conn = listener.accept()
            except OSError:
                return  # closed
            except Exception:
                log.exception("lmcache_lab: lookup connection refused")
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True,
                             name="lmcache-lab-lookup-conn").start()

    def _answer(self, conn) -> None:
        with conn:
            while True:
                try:
                    msg = conn.recv_bytes()
                except (EOFError, OSError):
                    return
                try:
                    head, _, body = msg.partition(b"\0")
                    h = json.loads(head)
                    if h["op"] == "lookup":
                        tokens = np.frombuffer(body, dtype="<u4")
                        identity = tuple((str(t), str(v)) for t, v in h.get("id", ()))
                        hit, tail, miss, slow = self.answer(str(h["req"]), tokens, int(h["max"]),
                                                            int(h["skip"]), identity)
                        reply = {"hit": hit, "tail": tail, "miss": list(miss), "slow": slow,
                                 "slow_s": slow * self.slow_chunk_s()}
                    else:
                        raise ValueError(f"unknown op {h['op']!r}")
                except Exception as e:  # answered as an error: the scheduler counts a miss
                    log.exception("lmcache_lab: lookup failed")
                    reply = {"error": str(e)}
                try:
                    conn.send_bytes(json.dumps(reply).encode())
                except OSError:
                    return  # the scheduler gave up on this lookup (timeout) and hung up

    def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            address = listener.address
            listener.close()
            try:
                os.unlink(address)
            except OSError:
                pass


class LookupClient:
    """Scheduler side of the lookup channel, one connection per worker rank. A rank that cannot
    be reached, or does not answer within `timeout_s` (a worker stalled by slow I/O), answers 0
    (a miss); the failure is counted in `errors` and the connection is dropped, so a late reply
    is never read as the answer to a later lookup. `last_miss` is why the last lookup's first
    missing chunk missed (that of the rank with the smallest hit; `load_failed` on a fault);
    `last_slow` whether some rank's load of it would read a slow tier (disk, Redis, S3), and
    `last_slow_s` the longest such read a rank estimates (seconds; 0 before one was measured)."""

    def __init__(self, paths: Sequence[str], authkey: bytes, connect_timeout_s: float = 30.0,
                 timeout_s: float = 2.0):
        self.paths, self.authkey = list(paths), authkey
        self.connect_timeout_s, self.timeout_s = connect_timeout_s, timeout_s
        self._conns: list = [None] * len(self.paths)
        self.errors = 0
        self.last_miss: Miss = NEVER_STORED
        self.last_slow = False
        self.last_slow_s = 0.0

    def _conn(self, i: int):
        if self._conns[i] is None:
            deadline = time.monotonic() + self.connect_timeout_s
            while True:
                try:
                    self._conns[i] = Client(self.paths[i], family="AF_UNIX", authkey=self.authkey)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        return self._conns[i]

    def lookup(self, req_id: str, prompt: Sequence[int], max_chunks: int, skip: int,
               identity: Identity = ()) -> tuple[int, int]:
        """(cached prefix in chunks, blocks of a tail chunk after it): the minimum over ranks
        (each rank holds its own shard); a tail counts only where every rank's chunks end at
        the same place (a rank with more full chunks would read another value there)."""
        tokens = np.asarray(prompt, dtype="<u4").tobytes()
        msg = json.dumps({"op": "lookup", "req": req_id, "max": max_chunks, "skip": skip,
                          "id": [list(p) for p in identity]}).encode() + b"\0" + tokens
        hit, self.last_miss, answers = None, NEVER_STORED, []
        self.last_slow, self.last_slow_s = False, 0.0
        for i in range(len(self.paths)):
            try:
                conn = self._conn(i)
                conn.send_bytes(msg)
                if not conn.poll(self.timeout_s):
                    raise TimeoutError(f"no answer within lookup_timeout_s={self.timeout_s}")
                reply = json.loads(conn.recv_bytes())
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                n, tail = int(reply["hit"]), int(reply.get("tail", 0))
                miss = tuple(reply.get("miss") or NEVER_STORED)
                self.last_slow |= bool(reply.get("slow"))
                self.last_slow_s = max(self.last_slow_s, float(reply.get("slow_s", 0.0)))
            except TimeoutError as e:
                log.warning("lmcache_lab: lookup on rank %d: %s; counted as a miss", i, e)
                self.errors += 1
                self._drop(i)
                n, tail, miss = 0, 0, ("load_failed", "")
            except Exception:
                log.exception("lmcache_lab: lookup on rank %d failed; counted as a miss", i)
                self.errors += 1
                self._drop(i)
                n, tail, miss = 0, 0, ("load_failed", "")
            if hit is None or n < hit:
                self.last_miss = miss
            hit = n if hit is None else min(hit, n)
            answers.append((n, tail))
        if not answers:
            return 0, 0
        same = len({n for n, _ in answers}) == 1
        return hit, min(t for _, t in answers) if same else 0

    def _drop(self, i: int) -> None:
        conn, self._conns[i] = self._conns[i], None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        for i in range(len(self._conns)):
            self._drop(i)
