from __future__ import annotations

from typing import Any, Sequence

from lmcache_lab.tiers.base import BudgetedTier, Key


class TieredStore:
    """Tiers ordered fastest first (GPU/CPU memory, disk, Redis).

    * Write-through: a stored chunk goes to every tier, each under its own budget and policy, so
      the disk tier holds what survives a restart and Redis what other replicas share.
    * A key is present if any tier holds it; `prefix_length` walks tier by tier in batches.
    * `get` walks fastest first and promotes a hit from a lower tier into every tier above it.
    """

    def __init__(self, tiers: Sequence[BudgetedTier]):
        self.tiers = list(tiers)

    def prefix_length(self, keys: Sequence[Key]) -> int:
        n = 0
        while n < len(keys):
            for tier in self.tiers:
                m = tier.prefix_length(keys[n:])
                if m:
                    n += m
                    break
            else:
                break
        return n

    def contains(self, key: Key) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def put(self, key: Key, value: Any, parent: Key | None = None, position: int = 0) -> bool:
        stored = False
        for tier in self.tiers:
            stored |= tier.put(key, value, parent, position)
        return stored

    def put_chain(self, keys: Sequence[Key], values: Sequence[Any], parent: Key | None = None,
                  position: int = 0, step: int = 0) -> int:
        """`BudgetedTier.put_chain` on every tier; how many leading keys the best tier holds."""
        return max((tier.put_chain(keys, values, parent, position, step) for tier in self.tiers), default=0)

    def get(self, key: Key, parent: Key | None = None, position: int = 0) -> Any | None:
        for i, tier in enumerate(self.tiers):
            value = tier.get(key)  # one round trip for a remote tier: no separate contains()
            if value is not None:
                for upper in self.tiers[:i]:
                    upper.put(key, value, parent, position)
                return value
        return None

    def touch(self, chain: Sequence[Key]) -> None:
        for tier in self.tiers:
            tier.touch(chain)

    def pin(self, keys: Sequence[Key]) -> None:
        for tier in self.tiers:
            for key in keys:
                tier.pin(key)

    def unpin(self, keys: Sequence[Key]) -> None:
        for tier in self.tiers:
            for key in keys:
                tier.unpin(key)

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
