from __future__ import annotations

import json
import logging
import os
import struct
import uuid
from pathlib import Path

import torch

from lmcache_lab import wire
from lmcache_lab.tiers.base import BudgetedTier

log = logging.getLogger(__name__)
SUFFIX = ".kvc"


class DiskTier(BudgetedTier):
    """Chunks as files under `path/<2 hex>/<key hex>.kvc`, in the versioned wire format.

    * Survives a restart: the index is rebuilt from the files at start-up (oldest first, so the
      policy's recency order roughly resumes), reading each file's header for its parent link.
    * Atomic: a file is written under a temporary name in the same folder and renamed into place,
      so a crash never leaves a half-written chunk under a real name; leftovers are removed at
      start-up. A file damaged anyway (truncated, bit rot) fails its checksum on read: a miss.
    * Bounded: the budget counts file bytes; files beyond it at start-up are evicted.
    Keys are bytes (chunk keys).
    """
    name = "disk"
    encodes = True

    def __init__(self, path: str | os.PathLike, capacity_bytes: int, policy,
                 max_payload: int | None = None):
        super().__init__(capacity_bytes, policy)
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_payload = max_payload
        self._encoded: tuple[bytes, bytes] | None = None  # (key, bytes) between size and write
        self._rebuild_index()

    def _file(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / (h + SUFFIX)

    def _rebuild_index(self) -> None:
        found = []
        for f in self.root.glob("*/*"):
            if f.name.startswith(".tmp-"):
                f.unlink(missing_ok=True)
                continue
            if f.suffix != SUFFIX:
                continue
            try:
                key = bytes.fromhex(f.stem)
                st = f.stat()
            except (ValueError, OSError):
                continue
            found.append((st.st_mtime_ns, key, st.st_size, f))
        found.sort()
        for _, key, size, f in found:
            parent = self._read_parent(f)
            if size > self.capacity_bytes or not self._make_room(size):
                f.unlink(missing_ok=True)
                continue
            self._sizes[key] = size
            self._max_nbytes = max(self._max_nbytes, size)
            self.used_bytes += size
            self.policy.on_insert(key, size, parent)

    @staticmethod
    def _read_parent(f: Path) -> bytes | None:
        try:
            with open(f, "rb") as fh:
                prefix = fh.read(wire._PREFIX.size)
                _, _, hlen, _ = wire._PREFIX.unpack(prefix)
                if hlen > wire.MAX_HEADER:
                    return None
                parent = json.loads(fh.read(hlen)).get("parent")
            return bytes.fromhex(parent) if parent else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
            log.debug("disk tier: unreadable header in %s: %s", f, e)
            return None

    def _stored_nbytes(self, key, value, parent, position):
        enc = wire.prepare(key, value, parent=parent, position=position)
        self._encoded = (key, enc)
        return enc.nbytes

    def _write(self, key, value, nbytes):
        assert self._encoded is not None and self._encoded[0] == key
        enc, self._encoded = self._encoded[1], None
        target = self._file(key)
        tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            target.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.writelines(enc.parts())
            os.replace(tmp, target)
            return True
        except OSError as e:
            log.warning("disk tier: write of %s failed: %s", target, e)
            tmp.unlink(missing_ok=True)
            return False

    def _read(self, key):
        f = self._file(key)
        try:
            with open(f, "rb", buffering=0) as fh:
                # read once into uninitialized memory (no zero-fill pass), decoded in place
                data = memoryview(torch.empty(os.fstat(fh.fileno()).st_size, dtype=torch.uint8).numpy())
                data = data[:fh.readinto(data)]
            return wire.decode(data, expected_key=key, max_payload=self.max_payload).tensors
        except FileNotFoundError:
            self.stats.errors += 1
        except OSError as e:
            log.warning("disk tier: read of %s failed: %s", f, e)
            self.stats.errors += 1
        except wire.WireError as e:
            log.warning("disk tier: %s is not a valid chunk (%s); removing it", f, e)
            self.stats.corrupt += 1
            f.unlink(missing_ok=True)
        return None

    def _drop(self, key):
        self._file(key).unlink(missing_ok=True)
