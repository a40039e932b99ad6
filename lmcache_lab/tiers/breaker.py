"""Per-endpoint circuit breaker with background reconnect probes.

A remote tier must never make a request wait for a server that is down. Each endpoint (the
server, or one cluster node) is either closed (in use) or open (down). While open:

  * operations on the endpoint are not attempted: the caller answers them as misses at once;
  * one daemon thread probes open endpoints, waiting `base_s, 2*base_s, ...` (capped at `max_s`,
    with +-25% jitter so many replicas do not reconnect in lockstep) between probes;
  * a probe that returns closes the endpoint; one that raises keeps it open.

Invariants: a request thread never calls a probe and never sleeps here; at most one probe thread
runs per breaker; `close()` stops it within one probe timeout.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

Probe = Callable[[], None]


class Breaker:
    def __init__(self, name: str, base_s: float = 0.05, max_s: float = 2.0):
        self.name = name
        self.base_s = base_s
        self.max_s = max(max_s, base_s)
        self._open: dict[str, tuple[Probe, float, float]] = {}  # endpoint -> (probe, delay, due)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.trips = 0         # closed -> open transitions
        self.recoveries = 0    # open -> closed transitions

    def is_open(self, endpoint: str) -> bool:
        return endpoint in self._open

    def open_endpoints(self) -> list[str]:
        with self._lock:
            return list(self._open)

    @property
    def all_closed(self) -> bool:
        return not self._open

    def trip(self, endpoint: str, probe: Probe, reason: object = "") -> None:
        """Mark `endpoint` down; `probe()` (raising while still down) is retried in the background."""
        with self._lock:
            if self._stopped or endpoint in self._open:
                return
            self.trips += 1
            self._open[endpoint] = (probe, self.base_s, time.monotonic() + self._jitter(self.base_s))
            log.warning("%s: %s unavailable (%s); answering its chunks as misses, reconnecting in "
                        "the background", self.name, endpoint, reason)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"{self.name}-reconnect", daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._open.clear()
            self._wake.notify()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    def _jitter(self, delay: float) -> float:
        return delay * random.uniform(0.75, 1.25)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped or not self._open:
                    return
                now = time.monotonic()
                endpoint, (probe, delay, due) = min(self._open.items(), key=lambda kv: kv[1][2])
                if due > now:
                    self._wake.wait(timeout=due - now)
                    continue
            try:
                probe()
            except Exception as e:  # noqa: BLE001 - any failure means "still down"; logged
                log.debug("%s: probe of %s failed: %r", self.name, endpoint, e)
                with self._lock:
                    if endpoint in self._open:
                        delay = min(delay * 2, self.max_s)
                        self._open[endpoint] = (probe, delay, time.monotonic() + self._jitter(delay))
                continue
            with self._lock:
                if self._open.pop(endpoint, None) is not None:
                    self.recoveries += 1
                    log.warning("%s: %s reachable again", self.name, endpoint)
