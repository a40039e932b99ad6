"""Loads the vLLM connector runs between engine steps (vLLM's async KV load protocol).

A hit that only a slow tier (disk, Redis, S3) holds is not read in the step that schedules its
request, where every other request of the batch would wait for it. The scheduler answers
`get_num_new_matched_tokens` with `load_kv_async=True`; vLLM allocates the request's blocks and
parks it (WAITING_FOR_REMOTE_KVS) while the engine keeps stepping the others; the worker reads
the chunks into those blocks on one background thread (`BackgroundLoads`) and reports the
request in `get_finished`'s receiving set; vLLM schedules it in a later step.

Invariants:
  * every submitted load is reported done exactly once, also one that failed, raised or was
    cancelled: vLLM frees an aborted request's blocks only when its receive is reported, so a
    lost report would leak them;
  * the blocks a load could not fill are handed over together with its request id (`take`), so
    vLLM learns them no later than the pass that reports the request done (its rule), and
    recomputes from the first of them;
  * a request that finished (aborted) before its load ran is not read; one that finishes during
    its read completes the read (vLLM keeps its blocks until the report);
  * loads run one at a time, in submission order, on one daemon thread: a slow tier serves one
    chain at a time and the engine's own threads keep the rest of the machine.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from lmcache_lab.integrations.vllm_plan import LoadSpec

log = logging.getLogger(__name__)


class BackgroundLoads:
    """`load(spec) -> blocks it could not fill`, run for each submitted spec off the step."""

    def __init__(self, load: Callable[[LoadSpec], set[int]], block_size: int):
        self._load = load
        self.block_size = block_size
        self._queue: queue.Queue[LoadSpec | None] = queue.Queue()
        self._lock = threading.Lock()          # guards the four sets below
        self._finished = threading.Condition(self._lock)   # notified when a load is done
        self._pending: dict[str, int] = {}     # req_id -> loads submitted, not yet done
        self._cancelled: set[str] = set()
        self._done: set[str] = set()
        self._invalid: set[int] = set()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lmcache-lab-loads")
        self._thread.start()

    def submit(self, spec: LoadSpec) -> None:
        with self._lock:
            self._pending[spec.req_id] = self._pending.get(spec.req_id, 0) + 1
        self._queue.put(spec)

    def cancel(self, req_id: str) -> None:
        """The request finished: skip its loads not yet started (they are still reported)."""
        with self._lock:
            if req_id in self._pending:
                self._cancelled.add(req_id)

    def take(self) -> tuple[set[str], set[int]]:
        """(requests whose loads are done, blocks those loads could not fill) since the last
        call; both from one critical section."""
        with self._lock:
            done, self._done = self._done, set()
            invalid, self._invalid = self._invalid, set()
        return done, invalid

    def _run(self) -> None:
        while (spec := self._queue.get()) is not None:
            with self._lock:
                skip = spec.req_id in self._cancelled
            invalid: set[int] = set()
            if not skip:
                try:
                    invalid = self._load(spec)
                except Exception:     # `load` counts its own faults; this is a bug: log it
                    log.exception("lmcache_lab: background load of request %s failed; its "
                                  "blocks are recomputed", spec.req_id)
                    invalid = set((spec.slots // self.block_size).tolist())
            with self._lock:
                self._invalid |= invalid
                self._done.add(spec.req_id)
                self._pending[spec.req_id] -= 1
                if not self._pending[spec.req_id]:
                    del self._pending[spec.req_id]
                    self._cancelled.discard(spec.req_id)
                self._finished.notify_all()

    def wait(self, timeout_s: float) -> None:
        """Block until a load is done (and not yet taken) or `timeout_s` passed; at once when
        none is pending."""
        with self._finished:
            if self._pending and not self._done:
                self._finished.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)
