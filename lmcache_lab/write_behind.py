"""Write-behind: slow-tier writes (disk, Redis, ...) off the engine's critical path, in bounded memory.

    wb = WriteBehind(max_bytes=256 * 2**20)
    wb.submit(nbytes, job)      # queue `job()`; False (counted) when it would exceed max_bytes
    wb.flush()                  # wait until every queued job has run
    wb.close()

Invariants:
  * `pending_bytes <= max_bytes` at every moment: a job is queued only if its bytes fit beside
    what is already pending; one that does not is skipped at once (`stats.skipped`), it never
    blocks the caller. A job of 0 bytes (a policy touch) always fits.
  * jobs run one at a time, in the order they were queued, on one daemon thread, so a chain's
    parent is written before its child and a request's final touch after its chunks;
  * a job that raises is logged with its traceback and counted (`stats.failed`): a failed slow
    write is a future miss, never an error in the engine;
  * the bytes of a job are released when it has run (or failed), not when it starts.
Both the vLLM connector and the SGLang backend write their slow tiers through this class.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class WriteBehindStats:
    queued: int = 0           # jobs accepted
    skipped: int = 0          # jobs refused because max_bytes was reached (slow-tier misses later)
    skipped_bytes: int = 0
    failed: int = 0           # jobs that raised
    pending_bytes: int = 0    # bytes of queued or running jobs
    peak_bytes: int = 0       # highest pending_bytes seen


class WriteBehind:
    """One writer thread over a FIFO of jobs, bounded by the bytes they hold (module docstring)."""

    def __init__(self, max_bytes: int, name: str = "lmcache-lab-writer"):
        if max_bytes < 0:
            raise ValueError(f"write_behind.max_bytes: must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.stats = WriteBehindStats()
        self._jobs: deque[tuple[int, Callable[[], object]]] = deque()
        self._cond = threading.Condition()
        self._unfinished = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def submit(self, nbytes: int, job: Callable[[], object]) -> bool:
        """Queue `job` holding `nbytes`; False (and counted) if that would exceed `max_bytes`."""
        with self._cond:
            if self._closed:
                raise RuntimeError("WriteBehind.submit after close()")
            s = self.stats
            if nbytes and s.pending_bytes + nbytes > self.max_bytes:
                s.skipped += 1
                s.skipped_bytes += nbytes
                return False
            s.queued += 1
            s.pending_bytes += nbytes
            s.peak_bytes = max(s.peak_bytes, s.pending_bytes)
            self._jobs.append((nbytes, job))
            self._unfinished += 1
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                nbytes, job = self._jobs.popleft()
            failed = False
            try:
                job()
            except Exception:
                failed = True
                log.exception("lmcache_lab: a write-behind job failed; its chunks will be misses")
            with self._cond:
                self.stats.pending_bytes -= nbytes
                self.stats.failed += failed
                self._unfinished -= 1
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job queued so far has run; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._unfinished == 0, timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Run what is queued, then stop the thread (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
