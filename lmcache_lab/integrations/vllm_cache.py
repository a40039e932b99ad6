"""Worker-side cache state of the vLLM connector, and the lookup channel the scheduler uses.

vLLM runs the scheduler and the workers in different processes (on CPU always: its executor is
`mp`). The chunks live with the worker, so the worker owns the `CacheEngine`, the chunk keys of
each live request and the pins; the scheduler asks it through a local socket:

    scheduler  LookupClient.lookup(req_id, prompt, max_chunks, skip)  --unix socket-->
    worker     WorkerCache.lookup: key the prompt, count the cached prefix, pin the chunks the
               answer promises (beyond `skip`), all under one lock -> reply with the count

Invariants:
  * one lock serialises every operation on the engine (lookup thread, the step's loads and
    stores, the write-behind thread), so a chunk counted by a lookup is pinned before anything
    else can evict it, and stays pinned until the request's load ran, its hit was declined, it
    was looked up again, or it finished;
  * the wire messages are a small JSON header plus raw little-endian uint32 tokens; nothing is
    unpickled; the socket lives in a private per-engine directory (0700) and the listener
    requires vLLM's engine id as authentication key;
  * slow tiers (disk, Redis) are written behind the step by one thread; `flush()` waits for it.
"""
from __future__ import annotations

import json
import logging
import os
import queue
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
from lmcache_lab.metrics import DeltaTracker
from lmcache_lab.tiers import MemoryTier

log = logging.getLogger(__name__)


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

    def __init__(self, engine: CacheEngine):
        self.engine = engine
        self.lock = threading.RLock()
        self.keys: dict[str, list[bytes]] = {}      # req_id -> keys of its full prompt chunks
        self.pins: dict[str, list[bytes]] = {}      # req_id -> keys pinned for its load
        self.fast = [i for i, t in enumerate(engine.tiers) if isinstance(t, MemoryTier)]
        self.slow = [i for i, t in enumerate(engine.tiers) if not isinstance(t, MemoryTier)]
        self.deltas = DeltaTracker()
        self.store_failures = 0
        self._queue: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        self._listener: Listener | None = None
        if self.slow:
            self._queue = queue.Queue()
            self._writer = threading.Thread(target=self._write_behind, daemon=True,
                                            name="lmcache-lab-writer")
            self._writer.start()

    # ---- requests ---------------------------------------------------------------------------------
    def lookup(self, req_id: str, tokens: np.ndarray, max_chunks: int, skip: int) -> int:
        """Key `tokens` (all full chunks, kept for the request's stores), count the cached prefix
        among the first `max_chunks`, pin chunks [skip, hit) for the request's load."""
        keys = self.engine.chunk_keys(tokens)
        with self.lock:
            self._unpin(req_id)
            self.keys[req_id] = keys
            hit = self.engine.lookup_keys(keys[:max_chunks]) if max_chunks > 0 else 0
            if hit > skip:
                pins = keys[skip:hit]
                self.engine.pin_keys(pins)
                self.pins[req_id] = pins
        return hit

    def release(self, req_id: str) -> None:
        with self.lock:
            self._unpin(req_id)

    def forget(self, req_id: str) -> None:
        with self.lock:
            self._unpin(req_id)
            self.keys.pop(req_id, None)

    def _unpin(self, req_id: str) -> None:
        pins = self.pins.pop(req_id, None)
        if pins:
            self.engine.unpin(pins)

    def read(self, req_id: str, first: int, last: int) -> list[torch.Tensor]:
        """Chunks [first, last) of the request, stopping at the first unreadable one (counted as a
        load failure); releases the request's pins."""
        with self.lock:
            try:
                keys = self.keys.get(req_id)
                if keys is None or len(keys) < last:
                    self.engine.stats.load_failures += 1
                    return []
                return self.engine.retrieve_keyed(keys[:last], first)
            finally:
                self._unpin(req_id)

    def missing(self, req_id: str, first: int, last: int) -> tuple[list[bytes], list[int]]:
        """(the request's keys, indices in [first, last) of chunks no tier holds)."""
        with self.lock:
            keys = self.keys.get(req_id)
            if keys is None:
                return [], []
            contains = self.engine.store_.contains
            return keys, [i for i in range(first, min(last, len(keys))) if not contains(keys[i])]

    def write(self, keys: list[bytes], index: int, chunk: torch.Tensor) -> None:
        """Store a fresh chunk tensor: memory tiers now, slow tiers behind the step."""
        if self.fast:
            with self.lock:
                self.engine.store_keyed(keys, [chunk], index, tiers=self.fast)
        if self._queue is not None:
            self._queue.put((keys[:index + 1], index, chunk))

    def _write_behind(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                keys, index, chunk = item
                with self.lock:
                    self.engine.store_keyed(keys, [chunk], index, tiers=self.slow)
                    self.deltas.refresh_gauges()
            except Exception:  # a failed slow write is a future miss, never a crash
                log.exception("lmcache_lab: write-behind of a chunk failed; it will be a miss")
                with self.lock:
                    self.store_failures += 1
            finally:
                q.task_done()

    def flush(self) -> None:
        """Wait until every chunk handed to `write` is in every tier."""
        if self._queue is not None:
            self._queue.join()

    def take_delta(self):
        with self.lock:
            return self.deltas.take(self.engine, self.store_failures)

    # ---- lookup server ----------------------------------------------------------------------------
    def serve(self, path: str, authkey: bytes) -> None:
        """Answer `LookupClient`s on a unix socket at `path` (a daemon thread per connection)."""
        if os.path.exists(path):
            os.unlink(path)
        self._listener = Listener(path, family="AF_UNIX", authkey=authkey)
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
                        reply = {"hit": self.lookup(str(h["req"]), tokens, int(h["max"]),
                                                    int(h["skip"]))}
                    else:
                        raise ValueError(f"unknown op {h['op']!r}")
                except Exception as e:  # answered as an error: the scheduler counts a miss
                    log.exception("lmcache_lab: lookup failed")
                    reply = {"error": str(e)}
                conn.send_bytes(json.dumps(reply).encode())

    def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            address = listener.address
            listener.close()
            try:
                os.unlink(address)
            except OSError:
                pass
        if self._writer is not None:
            self.flush()
            self._queue.put(None)
            self._writer.join(timeout=60)
            self._writer = None


class LookupClient:
    """Scheduler side of the lookup channel, one connection per worker rank. A rank that cannot
    be reached answers 0 (a miss) and the failure is counted in `errors`."""

    def __init__(self, paths: Sequence[str], authkey: bytes, connect_timeout_s: float = 30.0):
        self.paths, self.authkey = list(paths), authkey
        self.connect_timeout_s = connect_timeout_s
        self._conns: list = [None] * len(self.paths)
        self.errors = 0

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

    def lookup(self, req_id: str, prompt: Sequence[int], max_chunks: int, skip: int) -> int:
        """Cached prefix in chunks, the minimum over ranks (each rank holds its own shard)."""
        tokens = np.asarray(prompt, dtype="<u4").tobytes()
        msg = json.dumps({"op": "lookup", "req": req_id, "max": max_chunks,
                          "skip": skip}).encode() + b"\0" + tokens
        hit = None
        for i in range(len(self.paths)):
            try:
                conn = self._conn(i)
                conn.send_bytes(msg)
                reply = json.loads(conn.recv_bytes())
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                n = int(reply["hit"])
            except Exception:
                log.exception("lmcache_lab: lookup on rank %d failed; counted as a miss", i)
                self.errors += 1
                self._drop(i)
                n = 0
            hit = n if hit is None else min(hit, n)
        return hit or 0

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
