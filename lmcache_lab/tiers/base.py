"""A tier: a keyed chunk store with a hard byte budget and an eviction policy.

`BudgetedTier` holds what every tier shares: the index of resident keys and their sizes, pins, the
policy, and the budget rule. Subclasses only say how bytes are kept (`_write/_read/_drop`).

Invariants:
  * `used_bytes <= capacity_bytes` after every call; a value larger than the budget, or one that
    fits only by evicting pinned chunks, is refused (put returns False), never squeezed in.
  * a pinned key (pin count > 0) is never evicted; pins nest.
  * `get` returns a verified value or None. A value that fails verification is deleted and
    counted as `corrupt`; it is never returned.
  * a tier is not thread-safe by itself: callers that share one between threads hold its `lock`
    for each call (`TieredStore` does), so slow I/O in one tier never blocks another tier.
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_right
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate, repeat, takewhile
from typing import Any, Hashable, Sequence

from lmcache_lab.policies import EvictionPolicy

Key = Hashable


def payload_nbytes(value: Any) -> int:
    """Bytes of a payload: a dict of tensors, or anything with `.nbytes` (a tensor, a placeholder)."""
    if type(value) is dict:
        return sum(t.nbytes for t in value.values())
    return value.nbytes


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    evictions: int = 0
    rejected: int = 0   # puts refused: larger than the budget, or only pinned victims left
    declined: int = 0   # puts the policy chose not to admit (a full tier, `policy.admit` False)
    corrupt: int = 0    # values that failed verification (counted misses)
    errors: int = 0     # backend faults (I/O errors, timeouts): counted misses


OP_SAMPLES = 256   # durations kept per operation kind between two drains (the newest win)


class OpTimes:
    """Recent durations (seconds) of a tier's operations, by kind ("lookup", "get", "put"), kept
    until the metrics drain them. Safe to record from several threads (the write-behind's, the
    engine's): deque appends and pops are atomic. At most OP_SAMPLES per kind are kept."""

    def __init__(self):
        self._samples: dict[str, deque] = {}

    @contextmanager
    def timing(self, op: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record(op, time.perf_counter() - t0)

    def record(self, op: str, seconds: float) -> None:
        self._samples.setdefault(op, deque(maxlen=OP_SAMPLES)).append(seconds)

    def drain(self) -> dict[str, list[float]]:
        """The samples recorded since the previous drain, by kind (kinds without any left out)."""
        out = {}
        for op, samples in list(self._samples.items()):
            taken = []
            while samples:
                taken.append(samples.popleft())
            if taken:
                out[op] = taken
        return out


class BudgetedTier:
    name = "tier"
    encodes = False  # True where the stored size depends on encoding the value (disk, Redis)

    def __init__(self, capacity_bytes: int, policy: EvictionPolicy):
        assert capacity_bytes >= 0
        if policy is not None and policy.offline and not getattr(policy, "prepared", False):
            raise ValueError(f"policy {policy.name!r} is offline: it needs the future of a trace and runs "
                             f"only in the trace replay (experiment=replay); choose an online policy")
        assert policy is None or policy.admits_all or not policy.batch_evicts, "batch eviction skips admit"
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.used_bytes = 0
        self.stats = TierStats()
        self.op_times = OpTimes()   # filled by tiers that time their operations (remote stores)
        self._sizes: dict[Key, int] = {}
        self._max_nbytes = 1   # >= every resident chunk's size (sizes the eviction batches)
        self._pins: Counter = Counter()
        self.lock = threading.RLock()   # held by callers that share the tier between threads

    # ---- index ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: Key) -> bool:
        return key in self._sizes

    def contains(self, key: Key) -> bool:
        return key in self._sizes

    def prefix_length(self, keys: Sequence[Key]) -> int:
        """How many leading `keys` are resident."""
        return len(list(takewhile(self._sizes.__contains__, keys)))

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

    # ---- operations ---------------------------------------------------------------------------------
    def touch(self, chain: Sequence[Key]) -> None:
        """Tell the policy a request used these chunks (root first); absent keys are skipped."""
        sizes = self._sizes
        if not all(map(sizes.__contains__, chain)):
            chain = [k for k in chain if k in sizes]
        self.policy.on_access(chain)

    def put(self, key: Key, value: Any, parent: Key | None = None, position: int = 0) -> bool:
        """Make `key` resident. True if it is resident afterwards (already was, or written)."""
        if key in self._sizes:
            return True
        nbytes = self._stored_nbytes(key, value, parent, position)
        if self.used_bytes + nbytes > self.capacity_bytes:
            if not self.policy.admits_all and not self.policy.admit(key, nbytes, parent, position):
                self.stats.declined += 1
                return False
            if not self._make_room(nbytes, parent):
                self.stats.rejected += 1
                return False
        if not self._write(key, value, nbytes):
            self.stats.errors += 1
            return False
        self._sizes[key] = nbytes
        self._max_nbytes = max(self._max_nbytes, nbytes)
        self.used_bytes += nbytes
        stats = self.stats
        stats.inserts += 1
        stats.bytes_written += nbytes
        self.policy.on_insert(key, nbytes, parent, position)
        return True

    def put_chain(self, keys: Sequence[Key], values: Sequence[Any] | Any, parent: Key | None = None,
                  position: int = 0, step: int = 0) -> int:
        """Store consecutive chunks of one prefix chain: `keys[i]` has parent `keys[i-1]` (the first
        has `parent`) and starts at token `position + i*step`. `values` is one value per key, or a
        single value used for every key. Returns how many leading keys are resident afterwards
        (stops at the first refused chunk: a child without its parent would be an orphan).
        Making room never evicts the chain's own parent (it is a leaf until its child lands; its
        ancestors are not leaves), so the chain's own chunks are never victims while it is stored.

        Two paths with the same result as one `put` per key:
          * a chain of distinct new keys in a tier that stores values as given, under a policy
            whose victims do not depend on what is stored meanwhile (`batch_evicts`: LRU, LFU;
            such a policy admits all): victims are taken first, in one batch of as many as the
            missing bytes need, then every key is inserted at once;
          * anything else (resident keys inside the chain, encoding tiers whose writes can fail
            per key, other policies): one key at a time, evicting inline."""
        per_key = isinstance(values, (list, tuple))
        if not self.encodes and self.policy.batch_evicts:
            distinct = set(keys)
            if len(distinct) == len(keys) and self._sizes.keys().isdisjoint(distinct):
                return self._put_new_chain(keys, values, per_key, parent, position, step)
        return self._put_chain_each(keys, values, per_key, parent, position, step)

    def _put_new_chain(self, keys: Sequence[Key], values: Sequence[Any] | Any, per_key: bool,
                       parent: Key | None, position: int, step: int) -> int:
        """`put_chain` of keys none of which is resident, into a tier whose writes cannot fail."""
        sizes = [payload_nbytes(v) for v in values] if per_key else [payload_nbytes(values)] * len(keys)
        capacity = self.capacity_bytes
        # the leading keys that can be stored: each fits the budget alone, and all of them fit
        # beside what stays (pinned chunks and `parent`) once every other victim is gone
        fits = len(keys)
        if max(sizes, default=0) > capacity:
            fits = next(i for i, n in enumerate(sizes) if n > capacity)
        total = sum(sizes[:fits])
        if self.used_bytes + total > capacity:
            self._evict_bytes(self.used_bytes + total - capacity, parent)
            if self.used_bytes + total > capacity:
                fits = bisect_right(list(accumulate(sizes[:fits])), capacity - self.used_bytes)
        if fits < len(keys):
            self.stats.rejected += 1
            keys, sizes = keys[:fits], sizes[:fits]
            total = sum(sizes)
        if not fits:
            return 0
        self._write_new(keys, values, sizes, shared=not per_key)
        self._sizes.update(zip(keys, sizes))
        self._max_nbytes = max(self._max_nbytes, max(sizes))
        self.used_bytes += total
        self.stats.inserts += fits
        self.stats.bytes_written += total
        self.policy.on_insert_chain(keys, sizes, parent, position, step)
        return fits

    def _evict_bytes(self, deficit: int, protect: Key | None) -> None:
        """Evict policy victims (never pinned, never `protect`) until `deficit` bytes are freed or
        none is left. Victims come in batches of ceil(deficit / largest resident size): such a batch
        never frees more than the first victims that cover the deficit would, so this evicts exactly
        what evicting one victim at a time until the deficit is covered does."""
        sizes, pins, pop_victims = self._sizes, self._pins, self.policy.pop_victims
        while deficit > 0:
            want = -(-deficit // self._max_nbytes)
            victims = pop_victims(want, pins, protect)
            if victims:
                freed = sum(map(sizes.pop, victims))
                self._drop_many(victims)
                self.used_bytes -= freed
                self.stats.evictions += len(victims)
                deficit -= freed
            if len(victims) < want:
                return

    def _put_chain_each(self, keys, values, per_key, parent, position, step) -> int:
        sizes, stats, policy, write, drop = self._sizes, self.stats, self.policy, self._write, self._drop
        on_insert, pop_victim = policy.on_insert, policy.pop_victim
        admits_all = policy.admits_all
        fixed = None if per_key or self.encodes else payload_nbytes(values)
        capacity, pins = self.capacity_bytes, self._pins
        used = self.used_bytes

        def can_evict(k):  # reads `parent` as the loop moves it: never the chain's own parent
            return k != parent and k not in pins

        try:
            for i, key in enumerate(keys):
                if key not in sizes:
                    value = values[i] if per_key else values
                    pos = position + i * step
                    nbytes = fixed or self._stored_nbytes(key, value, parent, pos)
                    if used + nbytes > capacity:
                        if not admits_all and not policy.admit(key, nbytes, parent, pos):
                            stats.declined += 1
                            return i
                        if nbytes > capacity:
                            stats.rejected += 1
                            return i
                        while used + nbytes > capacity:
                            victim = pop_victim(can_evict)
                            if victim is None:
                                stats.rejected += 1
                                return i
                            drop(victim)
                            used -= sizes.pop(victim)
                            stats.evictions += 1
                    if not write(key, value, nbytes):
                        stats.errors += 1
                        return i
                    sizes[key] = nbytes
                    if nbytes > self._max_nbytes:
                        self._max_nbytes = nbytes
                    used += nbytes
                    stats.inserts += 1
                    stats.bytes_written += nbytes
                    on_insert(key, nbytes, parent, pos)
                parent = key
            return len(keys)
        finally:
            self.used_bytes = used

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

    def get_many(self, keys: Sequence[Key]) -> list[Any | None]:
        """`get` of each key (a remote tier answers in one round trip)."""
        return [self.get(key) for key in keys]

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

    def _make_room(self, nbytes: int, protect: Key | None = None) -> bool:
        """Evict policy victims, never a pinned key nor `protect`, until `nbytes` more fit.
        False when only protected chunks are left or it can never fit."""
        if nbytes > self.capacity_bytes:
            return False
        self._evict_bytes(self.used_bytes + nbytes - self.capacity_bytes, protect)
        return self.used_bytes + nbytes <= self.capacity_bytes

    def _forget(self, key: Key) -> None:
        self.used_bytes -= self._sizes.pop(key)
        self.policy.on_remove(key)

    # ---- what a tier implements ---------------------------------------------------------------------
    def _stored_nbytes(self, key: Key, value: Any, parent: Key | None, position: int) -> int:
        return payload_nbytes(value)

    def _write(self, key: Key, value: Any, nbytes: int) -> bool:
        raise NotImplementedError

    def _write_new(self, keys: Sequence[Key], values: Sequence[Any] | Any, sizes: Sequence[int],
                   shared: bool) -> None:
        """Write new keys: `values[i]` for `keys[i]` (zip stops at the end of `keys`), or one value
        for every key when `shared`. Only tiers whose writes cannot fail (`encodes` False) get here."""
        for key, value, nbytes in zip(keys, repeat(values) if shared else values, sizes):
            self._write(key, value, nbytes)

    def _drop_many(self, keys: Sequence[Key]) -> None:
        for key in keys:
            self._drop(key)

    def _read(self, key: Key) -> Any | None:
        raise NotImplementedError

    def _drop(self, key: Key) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass
