"""DiskTier: chunks as files in one directory, which several processes may share.

Layout under the tier's path:

    <2 hex>/<key hex>.kvc           a chunk in the wire format: complete, and never changed once it
                                    has this name (written under a temporary name, then renamed)
    <2 hex>/.tmp-<n>-<random hex>   a write in flight that reserved `n` bytes; its writer holds an
                                    exclusive flock on it until it is renamed or removed
    .ledger                         the shared budget: bytes and number of chunk files, plus the
                                    bytes reserved by temporary files; its flock guards the budget

Invariants, for every process sharing the directory:
  * L (ledger): while nobody holds the ledger's flock, `used` = the bytes of all chunk files + the
    bytes reserved by the temporary files present, and `count` = the number of chunk files. Only a
    holder of the flock creates a temporary file, renames one to a chunk name or unlinks a chunk
    file; writing a temporary file's bytes (the slow part) happens outside it. A holder marks the
    ledger dirty before it changes anything and clean when done, so a holder that dies or fails
    half-way leaves it dirty, and the next holder recounts it from the files.
  * B (budget): a write reserves its bytes (evicting first if needed) before any of them reaches
    the disk, so the chunk files never hold more than `used` bytes, and a put never leaves `used`
    above this process's `capacity_bytes`.
  * A temporary file whose flock can be taken belongs to a dead writer: a recount removes it and
    drops its reservation. A live writer's file is never touched.
  * A lookup (`contains`, `prefix_length`, `get`) asks the file system: one stat or open per key,
    so chunks written by any process are found at once, and none rescans the directory.

Each process keeps a local index (`_sizes`) of the chunks it knows: those present at its start-up,
those it wrote, and those it found by lookups. Its eviction policy orders that index. Peers may
remove indexed chunks; a lookup that finds the file gone drops the key. `docs/disk.md` gives the
reasons and the measurements.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import struct
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import torch

from lmcache_lab import wire
from lmcache_lab.policies import EvictionPolicy
from lmcache_lab.tiers.base import BudgetedTier, Key, TierStats
from lmcache_lab.tiers.chunk_check import layout_nbytes

log = logging.getLogger(__name__)
SUFFIX = ".kvc"
TMP_PREFIX = ".tmp-"
LEDGER_NAME = ".ledger"
# the ledger file: magic, version, used bytes, chunk-file count, dirty flag
_LEDGER = struct.Struct("<4sHqq?")
_LEDGER_MAGIC, _LEDGER_VERSION = b"LMDL", 1
# a process whose policy has no victim left rescans the directory at once if it holds chunks the
# process does not know (by count), else at most this often (a recount may still find the
# reservations of dead writers to drop)
RESCAN_INTERVAL_S = 1.0
# a local index may hold this many keys beyond twice the directory's chunks before it is checked
# for keys whose files peers removed
STALE_SLACK = 4096

ChunkFile = tuple[int, bytes, int]   # (mtime_ns, key, size) of a chunk file


@dataclass
class Ledger:
    """The shared budget, as read and changed under the ledger's flock (invariant L)."""
    used: int    # bytes of chunk files + bytes reserved by temporary files
    count: int   # chunk files


@dataclass
class DiskTierStats(TierStats):
    recounts: int = 0   # times the ledger was rebuilt from the files (start-up, after a dirty exit)
    reaped: int = 0     # temporary files of dead writers removed


def read_fully(fh: BinaryIO, size: int) -> memoryview:
    """The first `size` bytes of `fh`, or all of it if it ends sooner. `readinto` is called until
    the buffer is full or it returns 0 (end of file): a short read only means "call again"."""
    # uninitialized memory (no zero-fill pass); the decoded tensors share it
    buffer = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
    got = 0
    while got < size:
        n = fh.readinto(buffer[got:])
        if not n:
            break
        got += n
    return buffer[:got]


def preadv_fully(fd: int, buffers: list[memoryview], offset: int) -> int:
    """Fill `buffers` in order from `fd` at `offset` (`os.preadv` until they are full or the file
    ends; a short read only means "call again"). Returns the bytes read."""
    got, i, first = 0, 0, 0          # bytes read; buffers[i][first:] is the next to fill
    while i < len(buffers):
        n = os.preadv(fd, [buffers[i][first:], *buffers[i + 1:i + 1024]], offset + got)
        if not n:
            break
        got += n
        n += first
        while i < len(buffers) and n >= len(buffers[i]):
            n -= len(buffers[i])
            i += 1
        first = n
    return got


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def reserved_bytes(tmp_name: str) -> int:
    """Bytes a temporary file reserves, from its name `.tmp-<n>-<hex>` (0 for other names)."""
    count, _, _ = tmp_name[len(TMP_PREFIX):].partition("-")
    return int(count) if count.isdigit() else 0


def key_of(chunk_name: str) -> bytes | None:
    """The key of a chunk file name `<key hex>.kvc`; None for a name that is not one."""
    try:
        return bytes.fromhex(chunk_name[:-len(SUFFIX)])
    except ValueError:
        return None


class DiskTier(BudgetedTier):
    """Chunks as files under `path/<2 hex>/<key hex>.kvc`, in the versioned wire format; one
    budget for the directory, whichever processes use it (see the module docstring).

    * Survives a restart: at start-up the ledger is recounted from the files (dead writers'
      temporary files removed) and every chunk joins the local index, oldest file first, with its
      parent link read from its header, so the policy's recency order roughly resumes. Chunks
      beyond this process's budget are then evicted.
    * Atomic: a crash never leaves a half-written chunk under a real name, nor a ledger that stays
      wrong. A file damaged anyway (truncated, bit rot) fails its checksum on read: a counted
      miss (`stats.corrupt`), removed.
    * `used_bytes` and `len()` are the directory's (the shared ledger), `keys()` the local index.
    Keys are bytes (chunk keys). Calls on one tier must be serialized by the caller; separate
    tiers (in any processes, or in one) exclude each other through the ledger's flock.
    """
    name = "disk"
    encodes = True

    def __init__(self, path: str | os.PathLike, capacity_bytes: int, policy: EvictionPolicy,
                 max_payload: int | None = None, mac_key: bytes | None = None):
        super().__init__(capacity_bytes, policy)
        self.stats = DiskTierStats()
        self.mac_key = mac_key   # `wire.mac_key(store secret)`: files written and read are authenticated
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root)
        self.max_payload = max_payload
        self._rescanned_at = -math.inf
        self._folders: set[str] = set()
        self._seen = Ledger(0, 0)   # the ledger as this tier last read or wrote it
        self._open_ledger()
        self._load_index()

    # ---- the ledger -------------------------------------------------------------------------------
    def _open_ledger(self) -> None:
        """Open this tier's two descriptors on the ledger: one for changes (exclusive flock), one
        for `_peek` (shared flock). A flock belongs to an open file description, not to a thread
        or a process: on the same description, another thread's shared lock would replace this
        tier's exclusive one, and a forked child would share its parent's locks."""
        self._ledger_pid = os.getpid()
        path = os.path.join(self._root, LEDGER_NAME)
        fds = [os.open(path, os.O_RDWR | os.O_CREAT, 0o644) for _ in range(2)]
        self._change_fd, self._peek_fd = fds
        self._close_ledger = weakref.finalize(self, _close_all, fds)

    def _fds(self) -> tuple[int, int]:
        """(change, peek) descriptors of this process (a forked child opens its own)."""
        if self._ledger_pid != os.getpid():
            self._close_ledger()
            self._open_ledger()
        return self._change_fd, self._peek_fd

    def _read_ledger(self, fd: int) -> tuple[Ledger, bool] | None:
        """(ledger, dirty) as stored; None if the file holds no valid ledger (new or foreign)."""
        data = os.pread(fd, _LEDGER.size, 0)
        if len(data) != _LEDGER.size:
            return None
        magic, version, used, count, dirty = _LEDGER.unpack(data)
        if magic != _LEDGER_MAGIC or version != _LEDGER_VERSION:
            return None
        return Ledger(used, count), dirty

    @staticmethod
    def _write_ledger(fd: int, ledger: Ledger, dirty: bool) -> None:
        os.pwrite(fd, _LEDGER.pack(_LEDGER_MAGIC, _LEDGER_VERSION, ledger.used, ledger.count, dirty), 0)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Ledger]:
        """Hold the ledger's flock and yield the ledger, exact (invariant L; recounted from the
        files if it was left dirty or is missing). It is stored dirty while held and written back
        clean on a normal exit; an exception leaves it dirty for the next holder to recount."""
        fd, _ = self._fds()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            state = self._read_ledger(fd)
            if state is None or state[1]:
                if state is not None:
                    log.warning("disk tier: the ledger of %s was left dirty (a process died or failed "
                                "while changing the directory); recounting it", self._root)
                ledger = Ledger(0, 0)
                self._recount(ledger)
            else:
                ledger = state[0]
            self._write_ledger(fd, ledger, dirty=True)
            yield ledger
            self._write_ledger(fd, ledger, dirty=False)
            self._seen = Ledger(ledger.used, ledger.count)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _peek(self) -> Ledger:
        """The ledger as last written, read under a shared flock (never a half-written record)
        without waiting for it: while some process holds the ledger, the last one this tier saw."""
        _, fd = self._fds()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._seen
        try:
            state = self._read_ledger(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if state is not None:
            self._seen = state[0]
        return self._seen

    @property
    def used_bytes(self) -> int:
        """Bytes of the directory's chunk files plus writes in flight, whichever process wrote them."""
        return self._peek().used

    @used_bytes.setter
    def used_bytes(self, value: int) -> None:
        # BudgetedTier.__init__ starts its own count at 0; here the shared ledger is the only count
        assert value == 0, "the disk tier's usage lives in its shared ledger"

    def __len__(self) -> int:
        """Chunk files in the directory (all processes)."""
        return self._peek().count

    def _recount(self, ledger: Ledger) -> list[ChunkFile]:
        """Set `ledger` from the directory (flock held): chunk files' bytes and count plus live
        writers' reservations; dead writers' temporary files are removed. Returns every chunk file."""
        files: list[ChunkFile] = []
        reserved = 0
        for folder in os.scandir(self._root):
            if len(folder.name) != 2 or not folder.is_dir():
                continue
            for entry in os.scandir(folder.path):
                key = key_of(entry.name) if entry.name.endswith(SUFFIX) else None
                if key is not None:
                    with contextlib.suppress(FileNotFoundError):   # removed by hand meanwhile
                        st = entry.stat()
                        files.append((st.st_mtime_ns, key, st.st_size))
                elif entry.name.startswith(TMP_PREFIX):
                    reserved += self._reap_or_reserve(entry.path)
        ledger.used = sum(size for _, _, size in files) + reserved
        ledger.count = len(files)
        self.stats.recounts += 1
        return files

    def _reap_or_reserve(self, tmp: str) -> int:
        """Bytes the temporary file `tmp` reserves if its writer is alive (it holds the file's
        flock); a dead writer's file is removed and reserves nothing (flock held)."""
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return reserved_bytes(os.path.basename(tmp))
            os.unlink(tmp)
        finally:
            os.close(fd)
        self.stats.reaped += 1
        log.info("disk tier: removed %s, left by a writer that died", tmp)
        return 0

    # ---- the local index ---------------------------------------------------------------------------
    def _load_index(self) -> None:
        """Start-up: recount the ledger (a machine crash may have left it stale; this also removes
        dead writers' files), index every chunk with its parent link, evict to this budget."""
        with self._locked() as ledger:
            files = self._recount(ledger)
        self._sync_index(files, read_parents=True)
        if self.used_bytes > self.capacity_bytes:
            with self._locked() as ledger:
                self._make_room(ledger, 0, None)

    def _sync_index(self, files: list[ChunkFile], read_parents: bool) -> None:
        """Make the local index match `files` (from `_recount`): keys whose file is gone leave it,
        the others join oldest file first (mtime: last written or read by any process), so a
        recency-ordered policy evicts the least recently used file first. With `read_parents`
        (start-up, no flock held) each joins under the parent link in its header, and the policy
        keeps its chains tail first; without (a rescan under the flock, where one stat per file
        is all peers should wait for) each joins as a root."""
        on_disk = {key for _, key, _ in files}
        for key in [k for k in self._sizes if k not in on_disk]:
            self._forget(key)
        for _, key, size in sorted(files):
            if key in self._sizes:
                continue
            try:
                parent = self._header_parent(key) if read_parents else None
            except FileNotFoundError:
                continue   # removed by a peer since the scan
            self._adopt(key, size, parent)

    def _header_parent(self, key: bytes) -> bytes | None:
        """The parent key named in a chunk file's header; None if it names none or cannot be
        read (a damaged file is found, counted and removed when it is loaded). Raises
        FileNotFoundError if the file is gone."""
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                _, _, hlen, _ = wire._PREFIX.unpack(fh.read(wire._PREFIX.size))
                if hlen > wire.MAX_HEADER:
                    raise ValueError(f"header length {hlen} exceeds {wire.MAX_HEADER}")
                parent = json.loads(fh.read(hlen)).get("parent")
            return bytes.fromhex(parent) if parent else None
        except FileNotFoundError:
            raise
        except (OSError, ValueError, AttributeError, TypeError, struct.error) as e:
            log.warning("disk tier: unreadable header in %s (%s); indexed without its parent", path, e)
            return None

    def _adopt(self, key: bytes, size: int, parent: bytes | None, position: int = 0) -> None:
        """Index a chunk file that exists (written by any process)."""
        if key not in self._sizes:
            self._sizes[key] = size
            self.policy.on_insert(key, size, parent, position)

    def _adopt_found(self, key: bytes, size: int, parent: bytes | None) -> None:
        """Index a chunk a lookup found (no flock held). A process that writes little evicts
        little, so keys whose files peers removed could pile up in its index: once it holds more
        than twice the directory's chunks (+ STALE_SLACK), the stale ones are dropped."""
        self._adopt(key, size, parent)
        limit = len(self._sizes) - STALE_SLACK
        if limit > 2 * self._seen.count and limit > 2 * self._peek().count:
            self._drop_stale()

    def _drop_stale(self) -> None:
        """Forget indexed keys whose file is gone: one stat per key."""
        for key in list(self._sizes):
            path = self._path(key)
            try:
                os.stat(path)
            except FileNotFoundError:
                self._forget(key)
            except OSError as e:
                log.warning("disk tier: stat of %s failed: %s", path, e)
                self.stats.errors += 1

    def _forget(self, key: bytes) -> None:
        """Drop a key whose file is gone from the local index (the ledger is not this index's)."""
        if self._sizes.pop(key, None) is not None:
            self.policy.on_remove(key)

    # ---- paths ---------------------------------------------------------------------------------------
    def _path(self, key: bytes) -> str:
        h = key.hex()
        return f"{self._root}/{h[:2]}/{h}{SUFFIX}"

    def _file(self, key: bytes) -> Path:
        """The chunk file of `key`."""
        return Path(self._path(key))

    # ---- lookups ---------------------------------------------------------------------------------------
    def contains(self, key: Key) -> bool:
        """Whether `key`'s chunk file exists (one stat; written by any process)."""
        return self._present(key, None)

    __contains__ = contains

    def prefix_length(self, keys: Sequence[Key]) -> int:
        """How many leading `keys` have a chunk file: one stat per key, up to the first absent."""
        parent = None
        for n, key in enumerate(keys):
            if not self._present(key, parent):
                return n
            parent = key
        return len(keys)

    def _present(self, key: bytes, parent: bytes | None) -> bool:
        """Stat `key`'s file and bring the local index in line: found files join it (under
        `parent`), vanished ones leave it. A stat that fails otherwise is a logged, counted error."""
        path = self._path(key)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            self._forget(key)
            return False
        except OSError as e:
            log.warning("disk tier: stat of %s failed: %s", path, e)
            self.stats.errors += 1
            return False
        self._adopt_found(key, size, parent)
        return True

    def get(self, key: Key) -> Any | None:
        """The verified value of `key`'s chunk file (written by any process), or None (a miss)."""
        value, nbytes = self._load(key)
        if value is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.bytes_read += nbytes
        return value

    @property
    def read_cap(self) -> int:
        """Largest file a read accepts: a valid chunk of `max_payload` bytes when set, else the
        budget (a put refuses any chunk larger than it)."""
        if self.max_payload is None:
            return self.capacity_bytes
        return wire.OVERHEAD + wire.MAX_HEADER + self.max_payload

    def _load(self, key: bytes) -> tuple[dict[str, torch.Tensor] | None, int]:
        """(tensors, file size), or (None, 0) for an absent, unreadable or invalid file. A file
        that fails verification (or exceeds `read_cap`, read no further) is counted as corrupt
        and removed; an I/O fault counts an error. A hit sets the file's mtime: the access time
        that rescans and restarts order by."""
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as fh:
                st = os.fstat(fh.fileno())
                if st.st_size > self.read_cap:
                    data = None
                else:
                    data = read_fully(fh, st.st_size)
                    os.utime(fh.fileno())
        except FileNotFoundError:
            self._forget(key)      # never stored, or evicted by some process
            return None, 0
        except OSError as e:
            log.warning("disk tier: read of %s failed: %s", path, e)
            self.stats.errors += 1
            return None, 0
        try:
            if data is None:
                raise wire.WireError(f"{st.st_size} bytes exceed the read cap of {self.read_cap}")
            record = wire.decode(data, expected_key=key, max_payload=self.max_payload, mac_key=self.mac_key)
        except wire.WireError as e:
            log.warning("disk tier: %s is not a valid chunk (%s); removing it", path, e)
            self.stats.corrupt += 1
            self._remove_damaged(key, path, st.st_ino)
            return None, 0
        self._adopt_found(key, st.st_size, record.parent)
        return record.tensors, st.st_size

    def get_into(self, key: Key, payload: list[memoryview], layout) -> int:
        """Read `key`'s chunk file straight into place: `payload` are writable buffers that take
        its payload bytes in order, `layout` the tensors it must declare ((name, dtype name,
        shape), as `chunk_check.layout_of`). Verified as `get` verifies (checksum, MAC, key) and
        counted as `get` counts; the file must be exactly the size that layout gives. Returns the
        bytes read, or 0 for a miss, after which the buffers hold anything. The value is not
        decoded into a tensor of its own: one copy, from the page cache into the buffers.
        Buffers that do not add up to `layout` are the caller's error (ValueError), never a
        reason to call the file damaged."""
        path = self._path(key)
        want = sum(len(b) for b in payload)
        if want != layout_nbytes(layout):
            raise ValueError(f"get_into: buffers of {want} bytes for tensors {list(layout)} of "
                             f"{layout_nbytes(layout)}")
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._forget(key)
            self.stats.misses += 1
            return 0
        except OSError as e:
            return self._read_error(path, e)
        try:
            st = os.fstat(fd)
            size, inode = st.st_size, st.st_ino
            prefix = os.pread(fd, wire.PREFIX_SIZE, 0)
            base = wire.head_size(prefix)
            if size != base + want:
                raise wire.WireError(f"{size} bytes, a value of layout {list(layout)} has {base + want}")
            head = prefix + os.pread(fd, base - len(prefix), len(prefix))
            if len(head) != base or preadv_fully(fd, payload, base) != want:
                raise wire.WireError("shorter than its size when read")
            record = wire.verify_into(head, payload, key, layout, self.mac_key)
            os.utime(fd)
        except wire.WireError as e:
            log.warning("disk tier: %s is not a valid chunk (%s); removing it", path, e)
            self.stats.corrupt += 1
            self.stats.misses += 1
            self._remove_damaged(key, path, inode)
            return 0
        except OSError as e:
            return self._read_error(path, e)
        finally:
            os.close(fd)
        self._adopt_found(key, size, record.parent)
        self.stats.hits += 1
        self.stats.bytes_read += size
        return size

    def _read_error(self, path: str, e: OSError) -> int:
        log.warning("disk tier: read of %s failed: %s", path, e)
        self.stats.errors += 1
        self.stats.misses += 1
        return 0

    def _remove_damaged(self, key: bytes, path: str, inode: int) -> None:
        """Remove a file that failed verification, unless a process replaced it meanwhile (another
        inode). It was changed outside this protocol, so the ledger is recounted."""
        try:
            with self._locked() as ledger:
                with contextlib.suppress(FileNotFoundError):   # a peer removed it already
                    if os.stat(path).st_ino == inode:
                        os.unlink(path)
                self._recount(ledger)
        except OSError as e:
            log.warning("disk tier: could not remove the damaged %s: %s", path, e)
            self.stats.errors += 1
        self._forget(key)

    # ---- writes --------------------------------------------------------------------------------------
    def put(self, key: Key, value: Any, parent: Key | None = None, position: int = 0) -> bool:
        """Make `key` resident. True if its chunk file exists afterwards (already did, or written)."""
        return self._put(key, value, parent, position)

    def put_chain(self, keys: Sequence[Key], values: Sequence[Any] | Any, parent: Key | None = None,
                  position: int = 0, step: int = 0) -> int:
        """`put` of consecutive chunks of one prefix chain (`keys[i]`'s parent is `keys[i-1]`, the
        first's is `parent`; `keys[i]` starts at token `position + i*step`); `values` is one value
        per key or one for all. Returns how many leading keys are resident afterwards: it stops at
        the first refused chunk (a child without its parent would be an orphan). Making room never
        evicts the chunk's own parent."""
        per_key = isinstance(values, (list, tuple))
        for i, key in enumerate(keys):
            if not self._put(key, values[i] if per_key else values, parent, position + i * step):
                return i
            parent = key
        return len(keys)

    def _put(self, key: bytes, value: Any, parent: bytes | None, position: int) -> bool:
        """Reserve the encoded size under the flock (evicting if needed), write a temporary file
        outside it, rename it into place under the flock. A fault is logged, counted in
        `stats.errors`, and refuses the chunk."""
        if self._present(key, parent):
            return True
        encoding = wire.prepare(key, value, parent=parent, position=position, mac_key=self.mac_key)
        nbytes = encoding.nbytes
        if nbytes > self.capacity_bytes:
            self.stats.rejected += 1
            return False
        path = self._path(key)
        try:
            self._make_folder(os.path.dirname(path))
            with self._locked() as ledger:
                if not self._fit(ledger, key, nbytes, parent, position):
                    return False
                fh, tmp = self._reserve(ledger, path, nbytes)
        except OSError as e:
            log.warning("disk tier: could not reserve %d bytes for %s: %s", nbytes, path, e)
            self.stats.errors += 1
            return False
        with fh:   # its flock marks the write as live until it is renamed or removed
            written = self._fill(fh, tmp, encoding)
            try:
                with self._locked() as ledger:
                    landed = self._land(ledger, tmp, path, nbytes, written)
            except OSError as e:
                log.warning("disk tier: could not rename %s to %s: %s", tmp, path, e)
                self.stats.errors += 1
                return False
        if not written:
            return False
        if landed:
            self.stats.inserts += 1
            self.stats.bytes_written += nbytes
        self._adopt(key, nbytes, parent, position)
        return True

    def _fit(self, ledger: Ledger, key: bytes, nbytes: int, parent: bytes | None, position: int) -> bool:
        """Flock held: make `nbytes` more fit this budget, asking the policy's admission first
        when that takes an eviction. False (counted as declined or rejected) if it cannot."""
        if ledger.used + nbytes <= self.capacity_bytes:
            return True
        if not self.policy.admits_all and not self.policy.admit(key, nbytes, parent, position):
            self.stats.declined += 1
            return False
        if not self._make_room(ledger, nbytes, parent):
            self.stats.rejected += 1
            return False
        return True

    def _make_room(self, ledger: Ledger, nbytes: int, protect: bytes | None) -> bool:
        """Flock held: evict until `nbytes` more fit, never a pinned key nor `protect`. Victims
        come from this process's policy over its local index; a victim a peer removed already
        frees nothing. When the policy has none left, a rescan (see RESCAN_INTERVAL_S) recounts
        the ledger and indexes every chunk file, oldest first, and the policy goes on. False when
        only protected chunks are left."""
        pins = self._pins

        def can_evict(k):
            return k != protect and k not in pins

        while ledger.used + nbytes > self.capacity_bytes:
            victim = self.policy.pop_victim(can_evict)
            if victim is not None:
                del self._sizes[victim]
                if self._unlink(ledger, victim):
                    self.stats.evictions += 1
            elif ledger.count > len(self._sizes) or time.monotonic() - self._rescanned_at >= RESCAN_INTERVAL_S:
                self._rescanned_at = time.monotonic()
                self._sync_index(self._recount(ledger), read_parents=False)
            else:
                return False
        return True

    def _unlink(self, ledger: Ledger, key: bytes) -> bool:
        """Flock held: remove `key`'s chunk file and take it off the ledger. False if it is gone."""
        path = self._path(key)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return False
        ledger.used -= size
        ledger.count -= 1
        return True

    def _make_folder(self, folder: str) -> None:
        """Create a chunk folder if needed (no flock: folders are never removed, so once per process)."""
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)

    @staticmethod
    def _reserve(ledger: Ledger, path: str, nbytes: int) -> tuple[BinaryIO, str]:
        """Flock held: create a temporary file beside `path` whose name records `nbytes`, flock it
        (the mark of a live writer) and add `nbytes` to the ledger. Returns it open for writing."""
        tmp = f"{os.path.dirname(path)}/{TMP_PREFIX}{nbytes}-{uuid.uuid4().hex}"
        fh = open(tmp, "xb")
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ledger.used += nbytes
        return fh, tmp

    def _fill(self, fh: BinaryIO, tmp: str, encoding: wire.Encoding) -> bool:
        """Write the chunk into its temporary file (no flock: the reservation covers it)."""
        try:
            fh.writelines(encoding.parts())
            fh.flush()
            return True
        except OSError as e:
            log.warning("disk tier: write of %s failed: %s", tmp, e)
            self.stats.errors += 1
            return False

    @staticmethod
    def _land(ledger: Ledger, tmp: str, path: str, nbytes: int, written: bool) -> bool:
        """Flock held: rename the filled temporary file to the chunk name, or remove it and
        release its reservation if the write failed or some process stored the chunk meanwhile
        (same key, same content). True if this created the chunk file."""
        if written and not os.path.exists(path):
            os.replace(tmp, path)
            ledger.count += 1
            return True
        os.unlink(tmp)
        ledger.used -= nbytes
        return False

    def delete(self, key: Key) -> bool:
        """Remove `key`'s chunk file, whichever process wrote it. True if a file was removed."""
        if key in self._pins:
            raise RuntimeError(f"{self.name}: cannot delete a pinned chunk")
        try:
            with self._locked() as ledger:
                removed = self._unlink(ledger, key)
        except OSError as e:
            log.warning("disk tier: delete of %s failed: %s", self._path(key), e)
            self.stats.errors += 1
            return False
        self._forget(key)
        return removed

    def close(self) -> None:
        self._close_ledger()
