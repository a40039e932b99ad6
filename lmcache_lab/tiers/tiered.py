from __future__ import annotations

from typing import Any, Sequence

from lmcache_lab.tiers.base import BudgetedTier, Key


class TieredStore:
    """Tiers ordered fastest first (GPU/CPU memory, disk, Redis).

    * Write-through: a stored chunk goes to every tier, each under its own budget and policy, so
      the disk tier holds what survives a restart and Redis what other replicas share.
    * A key is present if any tier holds it; `prefix_length` walks tier by tier in batches.
    * `get` / `get_chain` walk fastest first and promote a hit from a lower tier into every tier
      above it.
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
        values = self.get_chain([key], parent, position)
        return values[0] if values else None

    def get_chain(self, keys: Sequence[Key], parent: Key | None = None, position: int = 0,
                  step: int = 0) -> list[Any]:
        """The values of consecutive chunks of one prefix chain (`keys[i]`'s parent is `keys[i-1]`,
        the first's is `parent`; `keys[i]` starts at token `position + i*step`), up to the first
        one no tier holds. Each tier is asked once, for every key the tiers above it lacked, so
        a remote tier gets one pipelined batch. Hits from lower tiers within the returned prefix
        are then promoted into every tier above them, parents first (past the first missing chunk
        a value would be an orphan there)."""
        values: list[Any] = [None] * len(keys)
        source = [0] * len(keys)   # index of the tier each value came from
        missing = list(range(len(keys)))
        for t, tier in enumerate(self.tiers):
            if not missing:
                break
            for i, value in zip(missing, tier.get_many([keys[i] for i in missing])):
                values[i], source[i] = value, t
            missing = [i for i in missing if values[i] is None]
        found = missing[0] if missing else len(keys)
        for i in range(found):
            for upper in self.tiers[:source[i]]:
                upper.put(keys[i], values[i], keys[i - 1] if i else parent, position + i * step)
        return values[:found]

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
