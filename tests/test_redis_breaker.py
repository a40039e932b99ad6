"""The reconnect breaker of remote tiers: requests never wait; probes back off; close() stops it."""
from __future__ import annotations

import threading
import time

from lmcache_lab.tiers.breaker import Breaker


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.005)
    return predicate()


def test_probes_back_off_until_the_endpoint_answers_then_it_closes():
    calls = []

    def probe():
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise ConnectionError("still down")

    b = Breaker("t", base_s=0.02, max_s=0.2)
    t0 = time.monotonic()
    b.trip("server", probe, "test")
    assert b.is_open("server") and not b.all_closed and b.open_endpoints() == ["server"]
    assert time.monotonic() - t0 < 0.01          # tripping never runs the probe in the caller
    assert wait_until(lambda: b.all_closed)
    assert len(calls) == 4 and b.trips == 1 and b.recoveries == 1
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[2] > gaps[0] * 1.5               # backoff doubles (with +-25% jitter)
    b.close()


def test_a_second_trip_of_an_open_endpoint_is_ignored_and_endpoints_are_independent():
    gate = threading.Event()

    def slow_probe():
        if not gate.is_set():
            raise ConnectionError("down")

    b = Breaker("t", base_s=0.01, max_s=0.02)
    b.trip("a", slow_probe)
    b.trip("a", slow_probe)
    b.trip("b", lambda: None)
    assert b.trips == 2
    assert wait_until(lambda: not b.is_open("b"))
    assert b.is_open("a")
    gate.set()
    assert wait_until(lambda: b.all_closed)
    b.close()


def test_close_stops_the_probe_thread():
    b = Breaker("t", base_s=0.01, max_s=0.01)

    def down():
        raise ConnectionError("down")
    b.trip("a", down)
    thread = b._thread
    b.close()
    assert not thread.is_alive() and b.all_closed
    b.trip("a", down)                            # after close, nothing restarts
    assert b.all_closed
