from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from lmcache_lab.tiers.base import BudgetedTier, Key


@dataclass(frozen=True)
class InPlace:
    """`get_chain`'s entry for a value a tier read straight into the caller's buffers (`into`)."""
    nbytes: int


Destination = Callable[[int], tuple[list[memoryview], Any]]
"""into(i) -> (writable buffers that take the payload of chain entry i in order, the tensors its
value must declare as `chunk_check.Layout`)."""


class TieredStore:
    """Tiers ordered fastest first (GPU/CPU memory, disk, Redis).

    * Write-through: a stored chunk goes to every tier, each under its own budget and policy, so
      the disk tier holds what survives a restart and Redis what other replicas share.
    * A key is present if any tier holds it; `prefix_length` walks tier by tier in batches.
    * `get` / `get_chain` walk fastest first and promote a hit from a lower tier into every tier
      above it.
    * Thread-safe per tier: every call on a tier holds that tier's `lock` and no other, so a slow
      disk or Redis call never blocks the memory tier.
    * Pins are shared by all tiers (one count per key, under a lock of their own, never a tier's):
      pinning never waits for a tier's I/O. A caller that needs several calls to see one state
      (count, then load) pins first: a tier decides and performs an eviction under its lock, so
      a count taken under that lock after the pin can only see keys no eviction will take.
    """

    def __init__(self, tiers: Sequence[BudgetedTier]):
        self.tiers = list(tiers)
        self._pins: Counter = Counter()
        self._pin_lock = threading.Lock()
        for tier in self.tiers:
            tier._pins = self._pins

    def observe_evictions(self, listener: Callable[[str, list[Key]], None]) -> None:
        """Call `listener(tier_name, keys)` with the chunks each tier evicts, under that tier's
        lock (keep it short). A tier evicts exactly the victims its policy hands out
        (`pop_victim`, `pop_victims` in `BudgetedTier`), so wrapping those two methods sees every
        eviction and nothing else (a deleted corrupt value is not one). A policy whose
        `pop_victims` calls its own `pop_victim` reports each victim once. A tier without a
        policy (Redis, S3: the store evicts by itself) reports nothing."""
        for tier in self.tiers:
            if tier.policy is not None:
                _report_victims(tier.name, tier.policy, listener)

    def select(self, indices: Sequence[int] | None) -> list[BudgetedTier]:
        return self.tiers if indices is None else [self.tiers[i] for i in indices]

    def prefix_length(self, keys: Sequence[Key]) -> int:
        n = 0
        while n < len(keys):
            for tier in self.tiers:
                with tier.lock:
                    m = tier.prefix_length(keys[n:])
                if m:
                    n += m
                    break
            else:
                break
        return n

    def contains(self, key: Key, tiers: Sequence[BudgetedTier] | None = None) -> bool:
        for tier in self.tiers if tiers is None else tiers:
            with tier.lock:
                if tier.contains(key):
                    return True
        return False

    def put(self, key: Key, value: Any, parent: Key | None = None, position: int = 0) -> bool:
        stored = False
        for tier in self.tiers:
            with tier.lock:
                stored |= tier.put(key, value, parent, position)
        return stored

    def put_chain(self, keys: Sequence[Key], values: Sequence[Any], parent: Key | None = None,
                  position: int = 0, step: int = 0) -> int:
        """`BudgetedTier.put_chain` on every tier; how many leading keys the best tier holds."""
        best = 0
        for tier in self.tiers:
            with tier.lock:
                best = max(best, tier.put_chain(keys, values, parent, position, step))
        return best

    def get(self, key: Key, parent: Key | None = None, position: int = 0) -> Any | None:
        values = self.get_chain([key], parent, position)
        return values[0] if values else None

    def get_chain(self, keys: Sequence[Key], parent: Key | None = None, position: int = 0,
                  step: int = 0, into: Destination | None = None) -> list[Any]:
        """The values of consecutive chunks of one prefix chain (`keys[i]`'s parent is `keys[i-1]`,
        the first's is `parent`; `keys[i]` starts at token `position + i*step`), up to the first
        one no tier holds. Each tier is asked once, for every key the tiers above it lacked, so
        a remote tier gets one pipelined batch. Hits from lower tiers within the returned prefix
        are then promoted into every tier above them, parents first (past the first missing chunk
        a value would be an orphan there).

        With `into`, a tier that reads values straight into memory (`get_into`: the disk tier)
        reads chunk i into `into(i)`'s buffers, in chain order up to its first miss; such an entry
        is `InPlace` and is not promoted (it has no tensor of its own: the page cache keeps a hot
        file in memory)."""
        values: list[Any] = [None] * len(keys)
        source = [0] * len(keys)   # index of the tier each value came from
        missing = list(range(len(keys)))
        for t, tier in enumerate(self.tiers):
            if not missing:
                break
            with tier.lock:
                if into is not None and hasattr(tier, "get_into"):
                    got = []
                    for i in missing:
                        nbytes = tier.get_into(keys[i], *into(i))
                        if not nbytes:
                            break
                        got.append(InPlace(nbytes))
                else:
                    got = tier.get_many([keys[i] for i in missing])
            for i, value in zip(missing, got):
                values[i], source[i] = value, t
            missing = [i for i in missing if values[i] is None]
        found = missing[0] if missing else len(keys)
        for u, upper in enumerate(self.tiers):
            promote = [i for i in range(found) if source[i] > u and not isinstance(values[i], InPlace)]
            if promote:
                with upper.lock:
                    for i in promote:
                        upper.put(keys[i], values[i], keys[i - 1] if i else parent, position + i * step)
        return values[:found]

    def touch(self, chain: Sequence[Key], tiers: Sequence[BudgetedTier] | None = None) -> None:
        for tier in self.tiers if tiers is None else tiers:
            with tier.lock:
                tier.touch(chain)

    def pin(self, keys: Sequence[Key]) -> None:
        """No tier evicts these keys until they are unpinned; pins nest."""
        with self._pin_lock:
            self._pins.update(keys)

    def unpin(self, keys: Sequence[Key]) -> None:
        with self._pin_lock:
            for key in keys:
                n = self._pins[key] - 1
                if n < 0:
                    del self._pins[key]
                    raise RuntimeError("unpin of a key that is not pinned")
                if n:
                    self._pins[key] = n
                else:
                    del self._pins[key]

    def pinned(self) -> int:
        """Keys with a pin (a gauge for leaks: zero when no request is between lookup and load)."""
        with self._pin_lock:
            return len(self._pins)

    def close(self) -> None:
        for tier in self.tiers:
            with tier.lock:
                tier.close()


def _report_victims(name: str, policy, listener: Callable[[str, list[Key]], None]) -> None:
    one, many = policy.pop_victim, policy.pop_victims
    batch = threading.local()

    def pop_victim(*args, **kwargs):
        key = one(*args, **kwargs)
        if key is not None and not getattr(batch, "on", False):
            listener(name, [key])
        return key

    def pop_victims(*args, **kwargs):
        batch.on = True
        try:
            keys = many(*args, **kwargs)
        finally:
            batch.on = False
        if keys:
            listener(name, list(keys))
        return keys

    policy.pop_victim, policy.pop_victims = pop_victim, pop_victims
