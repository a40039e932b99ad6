"""A tier: a keyed chunk store with a hard byte budget and an eviction policy.

`BudgetedTier` holds what every tier shares: the index of resident keys and their sizes, pins, the
policy, and the budget rule. Subclasses only say how bytes are kept (`_write/_read/_drop`).

Invariants:
  * `used_bytes <= capacity_bytes` after every call; a value larger than the budget, or one that
    fits only by evicting pinned chunks, is refused (put returns False), never squeezed in.
  * a pinned key (pin count > 0) is never evicted; pins nest.
  * `get` returns a verified value or None. A value that fails verification is deleted and
    counted as `corrupt`; it is never returned.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

from lmcache_lab.policies import EvictionPolicy

Key = Hashable


def payload_nbytes(value: Any) -> int:
    """Bytes of a payload: a dict of tensors, or anything with `.nbytes` (a tensor, a placeholder)."""
    if isinstance(value, dict):
        return sum(t.nbytes for t in value.values())
    return int(value.nbytes)


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    evictions: int = 0
    rejected: int = 0   # puts refused: larger than the budget, or only pinned victims left
    corrupt: int = 0    # values that failed verification (counted misses)
    errors: int = 0     # backend faults (I/O errors, timeouts): counted misses


class BudgetedTier:
    name = "tier"

    def __init__(self, capacity_bytes: int, policy: EvictionPolicy):
        assert capacity_bytes >= 0
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.used_bytes = 0
        self.stats = TierStats()
        self._sizes: dict[Key, int] = {}
        self._pins: Counter = Counter()

    # ---- index ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: Key) -> bool:
        return key in self._sizes

    def contains(self, key: Key) -> bool:
        return key in self._sizes

    def prefix_length(self, keys: Sequence[Key]) -> int:
        """How many leading `keys` are resident."""
        sizes = self._sizes
        n = 0
        for key in keys:
            if key not in sizes:
                break
            n += 1
        return n

    def keys(self) -> list[Key]:
        return list(self._sizes)

    # ---- pins -------------------------------------------------------------------------------------
    def pin(self, key: Key) -> None:
        self._pins[key] += 1

    def unpin(self, key: Key) -> None:
        n = self._pins[key] - 1
        if n < 0:
            raise RuntimeError(f"{self.name}: unpin of a key that is not pinned")
        if n:
            self._pins[key] = n
        else:
            del self._pins[key]

    def _evictable(self, key: Key) -> bool:
        return key not in self._pins

    # ---- operations ---------------------------------------------------------------------------------
    def touch(self, chain: Sequence[Key]) -> None:
        """Tell the policy a request used these chunks (root first); absent keys are skipped."""
        sizes = self._sizes
        self.policy.on_access([k for k in chain if k in sizes])

    def put(self, key: Key, value: Any, parent: Key | None = None, position: int = 0) -> bool:
        """Make `key` resident. True if it is resident afterwards (already was, or written)."""
        if key in self._sizes:
            return True
        nbytes = self._stored_nbytes(key, value, parent, position)
        if nbytes > self.capacity_bytes or not self._make_room(nbytes):
            self.stats.rejected += 1
            return False
        if not self._write(key, value, nbytes):
            self.stats.errors += 1
            return False
        self._sizes[key] = nbytes
        self.used_bytes += nbytes
        self.stats.inserts += 1
        self.stats.bytes_written += nbytes
        self.policy.on_insert(key, nbytes, parent, position)
        return True

    def get(self, key: Key) -> Any | None:
        if key not in self._sizes:
            self.stats.misses += 1
            return None
        value = self._read(key)
        if value is None:
            self.stats.misses += 1
            if key in self._sizes:  # _read may have dropped it already
                self._forget(key)
            return None
        self.stats.hits += 1
        self.stats.bytes_read += self._sizes[key]
        return value

    def delete(self, key: Key) -> bool:
        if key not in self._sizes:
            return False
        if key in self._pins:
            raise RuntimeError(f"{self.name}: cannot delete a pinned chunk")
        self._drop(key)
        self._forget(key)
        return True

    def clear(self) -> None:
        for key in list(self._sizes):
            if key not in self._pins:
                self.delete(key)

    def _make_room(self, nbytes: int) -> bool:
        while self.used_bytes + nbytes > self.capacity_bytes:
            victim = self.policy.victim(self._evictable)
            if victim is None:
                return False
            self._drop(victim)
            self._forget(victim)
            self.stats.evictions += 1
        return True

    def _forget(self, key: Key) -> None:
        self.used_bytes -= self._sizes.pop(key)
        self.policy.on_remove(key)

    # ---- what a tier implements ---------------------------------------------------------------------
    def _stored_nbytes(self, key: Key, value: Any, parent: Key | None, position: int) -> int:
        return payload_nbytes(value)

    def _write(self, key: Key, value: Any, nbytes: int) -> bool:
        raise NotImplementedError

    def _read(self, key: Key) -> Any | None:
        raise NotImplementedError

    def _drop(self, key: Key) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass
