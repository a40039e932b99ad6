"""One disk-tier directory shared by several processes (real, spawned ones).

Values are derived from their key, so any process can check what it reads back. Every child is
joined with a timeout and must exit 0; a child's assertion failure shows in its stderr."""
from __future__ import annotations

import contextlib
import fcntl
import multiprocessing as mp
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from lmcache_lab.policies import make_policy
from lmcache_lab.tiers import DiskTier
from lmcache_lab.tiers import disk as disk_module

SPAWN = mp.get_context("spawn")
N = 1024   # floats per value: 4 KiB, plus the header
TIMEOUT_S = 40


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def value(i: int) -> dict[str, torch.Tensor]:
    return {"kv": torch.arange(N, dtype=torch.float32) + i}


def open_tier(root, capacity: int) -> DiskTier:
    return DiskTier(root, capacity, make_policy("lru"))


def chunk_size(tmp_path) -> int:
    """Bytes of one stored value with a parent link (one without is a little smaller)."""
    probe = open_tier(tmp_path / "probe", 1 << 30)
    probe.put(key(1), value(1), parent=key(0))
    return probe.used_bytes


def chunk_files(root) -> list[Path]:
    return list(Path(root).glob("*/*.kvc"))


def temp_files(root) -> list[Path]:
    return list(Path(root).glob(f"*/{disk_module.TMP_PREFIX}*"))


def chunk_bytes(root) -> int:
    return sum(f.stat().st_size for f in chunk_files(root))


def chunk_bytes_locked(root) -> int:
    """Chunk-file bytes under the ledger's flock: no process renames or removes a chunk meanwhile,
    so this is the directory at one moment."""
    fd = os.open(os.path.join(root, disk_module.LEDGER_NAME), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return chunk_bytes(root)
    finally:
        os.close(fd)


def run_children(target, args_list, timeout=TIMEOUT_S, while_running=None) -> None:
    """Run `target(*args)` in one spawned process per entry; all must exit 0 within `timeout`.
    `while_running()` is called repeatedly until they are done."""
    procs = [SPAWN.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if while_running:
                while_running()
            time.sleep(0.01)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        assert all(not p.is_alive() for p in procs), "a child did not finish in time"
        assert [p.exitcode for p in procs] == [0] * len(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def assert_consistent(root, capacity: int) -> DiskTier:
    """A process starting now finds: no temporary files, a ledger equal to the chunk files, and
    the budget held."""
    tier = open_tier(root, capacity)
    files = chunk_files(root)
    assert not temp_files(root)
    assert tier.used_bytes == chunk_bytes(root) <= capacity
    assert len(tier) == len(files)
    return tier


# ---- children (module level: spawn imports them by name) -------------------------------------------
def churn(root, capacity, seed, keyspace, barrier, seconds):
    """Store and read back chains of a shared key space for `seconds`; every value read must be
    the one derived from its key, and no operation may fail."""
    rng = random.Random(seed)
    tier = open_tier(root, capacity)
    barrier.wait()
    end = time.monotonic() + seconds
    reads = 0
    while time.monotonic() < end:
        start = rng.randrange(keyspace - 4)
        chain = [key(i) for i in range(start, start + 4)]   # key i's parent is always key i-1
        tier.put_chain(chain, [value(i) for i in range(start, start + 4)], key(start - 1) if start else None)
        hit = tier.prefix_length(chain)
        for i in range(start, start + hit):
            got = tier.get(key(i))
            if got is not None:
                assert torch.equal(got["kv"], value(i)["kv"]), f"key {i}: wrong value"
                reads += 1
        tier.touch(chain[:hit])
    assert tier.stats.errors == tier.stats.corrupt == 0, tier.stats
    assert reads > 0


def wait_then_read(root, capacity, ready, written, done):
    """Start before any chunk exists; after the parent writes, find and read them (no restart)."""
    tier = open_tier(root, capacity)
    ready.set()
    assert written.wait(TIMEOUT_S)
    keys = [key(i) for i in range(3)]
    assert tier.contains(keys[0])
    assert tier.prefix_length(keys + [key(3)]) == 3
    for i, k in enumerate(keys):
        assert torch.equal(tier.get(k)["kv"], value(i)["kv"])
    assert tier.stats.hits == 3 and tier.stats.errors == 0
    done.set()


def wait_then_put(root, capacity, ready, filled):
    """Start on an empty directory, then store one chunk once the parent has filled the budget:
    it fits only by evicting chunks this process never saw."""
    tier = open_tier(root, capacity)
    ready.set()
    assert filled.wait(TIMEOUT_S)
    assert tier.put(key(100), value(100))
    assert tier.stats.evictions >= 1 and tier.stats.rejected == 0


def hang_mid_write(root, capacity, ready):
    """Reserve and half-write a chunk, then hang inside the write (the parent kills us)."""
    tier = open_tier(root, capacity)

    def fill(fh, tmp, encoding):
        fh.write(b"LMCK half a chunk")
        fh.flush()
        ready.set()
        time.sleep(3 * TIMEOUT_S)
    tier._fill = fill
    tier.put(key(99), value(99))


def hang_holding_ledger(root, capacity, ready):
    """Evict one chunk while holding the ledger's flock, then hang before the ledger is written
    back (the parent kills us): the ledger is left dirty and no longer matches the files."""
    tier = open_tier(root, capacity)
    unlink = tier._unlink

    def unlink_and_hang(ledger, k):
        removed = unlink(ledger, k)
        ready.set()
        time.sleep(3 * TIMEOUT_S)
        return removed
    tier._unlink = unlink_and_hang
    tier.put(key(99), value(99))


def write_forever(root, capacity, ready):
    tier = open_tier(root, capacity)
    ready.set()
    i = 1000
    while True:
        tier.put_chain([key(i), key(i + 1)], [value(i), value(i + 1)])
        i += 2


@contextlib.contextmanager
def running(target, *args):
    """A spawned child running `target(*args)`, killed on the way out if it still runs."""
    p = SPAWN.Process(target=target, args=args)
    p.start()
    try:
        yield p
    finally:
        if p.is_alive():
            p.kill()
            p.join()


def kill(p) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.join(TIMEOUT_S)
    assert p.exitcode == -signal.SIGKILL


# ---- tests ---------------------------------------------------------------------------------------------
def test_processes_share_one_budget_and_read_back_what_was_written(tmp_path):
    root, procs = tmp_path / "disk", 3
    capacity = 16 * chunk_size(tmp_path)          # the shared key space holds 40 chunks
    barrier = SPAWN.Barrier(procs)
    samples = []

    def sample():
        if (root / disk_module.LEDGER_NAME).exists():
            samples.append(chunk_bytes_locked(root))

    run_children(churn, [(root, capacity, seed, 40, barrier, 1.5) for seed in range(procs)],
                 while_running=sample)
    assert samples and max(samples) <= capacity
    assert_consistent(root, capacity)


def test_a_chunk_written_by_one_process_is_read_by_another_without_restart(tmp_path):
    root = tmp_path / "disk"
    ready, written, done = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    with running(wait_then_read, root, 1 << 20, ready, written, done) as reader:
        assert ready.wait(TIMEOUT_S)
        writer = open_tier(root, 1 << 20)
        assert writer.put_chain([key(i) for i in range(3)], [value(i) for i in range(3)]) == 3
        written.set()
        reader.join(TIMEOUT_S)
        assert reader.exitcode == 0 and done.is_set()


def test_a_process_evicts_chunks_only_its_peers_wrote_oldest_first(tmp_path):
    root = tmp_path / "disk"
    size = chunk_size(tmp_path)
    ready, filled = SPAWN.Event(), SPAWN.Event()
    with running(wait_then_put, root, 4 * size, ready, filled) as child:
        assert ready.wait(TIMEOUT_S)
        writer = open_tier(root, 4 * size)
        for i in range(4):   # four unrelated roots, the first the least recently used
            assert writer.put(key(i), value(i))
        for i in range(4):
            os.utime(writer._file(key(i)), ns=(10**18 + i * 10**9,) * 2)
        filled.set()
        child.join(TIMEOUT_S)
        assert child.exitcode == 0
    assert not writer.contains(key(0)) and all(writer.contains(key(i)) for i in (1, 2, 3, 100))
    assert_consistent(root, 4 * size)


def test_a_live_writers_temp_file_survives_start_up_and_a_dead_ones_is_removed(tmp_path):
    root = tmp_path / "disk"
    capacity = 1 << 20
    open_tier(root, capacity).put(key(1), value(1))
    ready = SPAWN.Event()
    with running(hang_mid_write, root, capacity, ready) as writer:
        assert ready.wait(TIMEOUT_S)
        [tmp] = temp_files(root)
        peer = open_tier(root, capacity)                  # start-up while the write is in flight
        assert tmp.exists() and peer.stats.reaped == 0
        assert peer.used_bytes == chunk_bytes(root) + disk_module.reserved_bytes(tmp.name)
        kill(writer)
    after = assert_consistent(root, capacity)             # start-up after the writer died
    assert after.stats.reaped == 1 and not tmp.exists()
    assert len(after) == 1 and not after.contains(key(99))


def test_a_running_peer_reclaims_a_dead_writers_reservation_when_it_needs_the_room(tmp_path):
    root = tmp_path / "disk"
    size = chunk_size(tmp_path)
    peer = open_tier(root, size)                          # started before the writer died
    ready = SPAWN.Event()
    with running(hang_mid_write, root, size, ready) as writer:
        assert ready.wait(TIMEOUT_S)
        kill(writer)
    [tmp] = temp_files(root)
    assert peer.used_bytes == disk_module.reserved_bytes(tmp.name)   # the dead write holds the budget
    assert peer.put(key(1), value(1))                     # fits only once that reservation goes
    assert peer.stats.reaped == 1 and not temp_files(root)
    assert peer.used_bytes == chunk_bytes(root) > 0


@pytest.mark.parametrize("when", ["mid_write", "holding_the_ledger", "at_random"])
def test_a_process_killed_mid_change_leaves_the_directory_consistent(tmp_path, when):
    root = tmp_path / "disk"
    size = chunk_size(tmp_path)
    capacity = 5 * size
    first = open_tier(root, capacity)
    assert first.put_chain([key(i) for i in range(5)], [value(i) for i in range(5)]) == 5   # full
    target = {"mid_write": hang_mid_write, "holding_the_ledger": hang_holding_ledger,
              "at_random": write_forever}[when]
    ready = SPAWN.Event()
    with running(target, root, capacity, ready) as child:
        assert ready.wait(TIMEOUT_S)
        if when == "at_random":
            time.sleep(random.uniform(0.05, 0.4))
        kill(child)
    *_, dirty = disk_module._LEDGER.unpack((root / disk_module.LEDGER_NAME).read_bytes())
    if when != "at_random":                                # (a random kill may land either way)
        assert dirty == (when == "holding_the_ledger")
    tier = assert_consistent(root, capacity)
    assert tier.put(key(200), value(200))                  # and it goes on working
    assert tier.used_bytes == chunk_bytes(root) <= capacity
    for f in chunk_files(root):
        i = int.from_bytes(bytes.fromhex(f.stem), "little")
        assert torch.equal(tier.get(key(i))["kv"], value(i)["kv"])
    assert tier.stats.corrupt == tier.stats.errors == 0


def test_a_short_read_is_retried_not_taken_as_corrupt(tmp_path, monkeypatch):
    tier = open_tier(tmp_path, 1 << 20)
    tier.put(key(7), value(7))
    calls = []

    class ShortReads:
        """A real file whose reads return at most 1000 bytes, as a pipe or a network file may."""
        def __init__(self, raw):
            self.raw = raw

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.raw.close()

        def fileno(self):
            return self.raw.fileno()

        def readinto(self, buffer):
            calls.append(len(buffer))
            return self.raw.readinto(memoryview(buffer)[:1000])

    monkeypatch.setattr(disk_module, "open", lambda *a, **k: ShortReads(open(*a, **k)), raising=False)
    assert torch.equal(tier.get(key(7))["kv"], value(7)["kv"])
    assert len(calls) > 4 and tier.stats.corrupt == 0 and tier.contains(key(7))


def test_read_fully_stops_only_at_end_of_file():
    class Pieces:
        def __init__(self, data, step):
            self.data, self.at, self.step = data, 0, step

        def readinto(self, buffer):
            n = min(self.step, len(buffer), len(self.data) - self.at)
            buffer[:n] = self.data[self.at:self.at + n]
            self.at += n
            return n

    data = bytes(range(256)) * 10
    assert bytes(disk_module.read_fully(Pieces(data, 7), len(data))) == data
    assert bytes(disk_module.read_fully(Pieces(data[:100], 7), len(data))) == data[:100]   # truncated


def test_two_tiers_in_one_process_share_the_budget(tmp_path):
    size = chunk_size(tmp_path)
    a, b = open_tier(tmp_path / "d", 3 * size), open_tier(tmp_path / "d", 3 * size)
    assert a.put_chain([key(i) for i in range(3)], [value(i) for i in range(3)]) == 3
    assert b.put(key(10), value(10))                      # evicts one of a's chunks
    assert a.used_bytes == b.used_bytes == chunk_bytes(tmp_path / "d") <= 3 * size
    assert len(a) == len(b) == 3
    gone = [i for i in range(3) if not a.contains(key(i))]   # b knew none of them: a rescan
    assert len(gone) == 1 and key(gone[0]) not in a.keys()     # indexed them; a's index followed
    assert a.get(key(10)) is not None and a.delete(key(10)) and not b.contains(key(10))


def test_reading_the_usage_from_another_thread_neither_waits_nor_releases_a_change(tmp_path):
    tier = open_tier(tmp_path, 1 << 20)
    tier.put(key(1), value(1))
    seen = []
    with tier._locked() as ledger:
        ledger.used += 1000                               # a change in progress, not yet written
        reader = threading.Thread(target=lambda: seen.append((tier.used_bytes, len(tier))))
        reader.start()
        reader.join(TIMEOUT_S)
        assert seen == [(chunk_bytes(tmp_path), 1)]       # the last value written, at once
        probe = os.open(tmp_path / disk_module.LEDGER_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):          # and the change still excludes peers
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
        ledger.used -= 1000
    assert tier.used_bytes == chunk_bytes(tmp_path)


def test_a_reader_drops_keys_its_peers_removed_once_its_index_outgrows_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_module, "STALE_SLACK", 2)
    writer, reader = open_tier(tmp_path, 1 << 20), open_tier(tmp_path, 1 << 20)
    for i in range(6):                                    # the reader finds each chunk, then a
        writer.put(key(i), value(i))                      # peer removes it: it never evicts,
        assert reader.contains(key(i))                    # so only the check keeps its index small
        writer.delete(key(i))
    assert len(reader) == 0 and len(reader.keys()) <= 2     # not all six stale keys
