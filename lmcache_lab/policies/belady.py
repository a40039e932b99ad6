"""Offline policies: they read the future of a trace, so they run only in the trace replay.

Belady, "A study of replacement algorithms for a virtual-storage computer" (IBM Systems Journal,
1966): evict the block whose next use is farthest in the future (MIN). With uniform chunk sizes
and the option not to store a chunk (bypass), MIN maximises the number of hits.

Prefix chains: a chain id stands for the chunk with its whole prefix, so every request that uses
a chunk uses its parent too: next_use(parent) <= next_use(child). Evicting the farthest next use,
ties to the deeper chunk, therefore evicts descendants before ancestors, the resident set stays
prefix-closed, and every resident chunk a request uses lies in its leading hit run. Hence
`belady_prefix` (farthest next use among leaves + bypass: a chunk whose next use is no nearer than
the farthest resident leaf is not stored, and with it the rest of its chain, whose next uses are
no nearer still) reaches the unconstrained MIN bound and is the ceiling for chunk hit rate.
`belady` is the greedy form without bypass: the replay stores every chunk it computed, as a live
engine does, and a tier never evicts the parent of the chunk being stored; a one-off chain then
pushes out chunks MIN would keep, and it can lose to LRU (tests keep such a trace).

The future comes through `prepare(chains)` (every request's chunk keys, in arrival order) and
`advance(t)` (request `t` is being served); the replay calls both. A tier refuses a policy whose
future was not given, so asking a live engine for `belady` fails at start-up.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Sequence

from lmcache_lab.policies.base import EvictionPolicy, Key

NEVER = float("inf")


class BeladyPolicy(EvictionPolicy):
    """Farthest next use first among unpinned leaves (never-reused first; ties: deeper first).

    Heap of leaves keyed by (-next_use, -position); entries are invalidated lazily by a per-key
    version, as in `cost_aware`: O(log n) per operation. `next_use(key)` is O(1) amortized: a
    pointer per key walks forward through the key's sorted occurrence list as time advances.
    """
    name = "belady"
    offline = True
    bypass = False

    def __init__(self, chunk_tokens: int = 256, **params):
        super().__init__(chunk_tokens, **params)
        self.prepared = False
        self.now = -1
        self._occ: dict[Key, list[int]] = {}
        self._ptr: dict[Key, int] = {}
        self._next: dict[Key, float] = {}
        self._pos: dict[Key, int] = {}
        self._heap: list = []
        self._version: dict = {}
        self._seq = itertools.count()

    # ---- the future ---------------------------------------------------------------------------
    def prepare(self, chains: Sequence[Sequence[Key]]) -> None:
        occ: dict[Key, list[int]] = {}
        for t, chain in enumerate(chains):
            for key in chain:
                lst = occ.get(key)
                if lst is None:
                    occ[key] = [t]
                elif lst[-1] != t:
                    lst.append(t)
        self._occ, self._ptr, self.prepared, self.now = occ, dict.fromkeys(occ, 0), True, -1

    def advance(self, t: int) -> None:
        assert t >= self.now, "time only moves forward"
        self.now = t

    def next_use(self, key: Key) -> float:
        """First request after the current one that uses `key` (inf: never)."""
        lst = self._occ.get(key)
        if lst is None:
            return NEVER
        i, now, n = self._ptr[key], self.now, len(lst)
        while i < n and lst[i] <= now:
            i += 1
        self._ptr[key] = i
        return lst[i] if i < n else NEVER

    # ---- policy ---------------------------------------------------------------------------------
    def _push(self, key):
        v = next(self._seq)
        self._version[key] = v
        heapq.heappush(self._heap, (-self._next[key], -self._pos[key], v, key))

    def _inserted(self, key, nbytes, position):
        self._pos[key] = position
        self._next[key] = self.next_use(key)
        self._push(key)

    def on_access(self, chain):
        children = self._children
        for key in reversed(chain):
            nxt = self.next_use(key)
            if nxt != self._next[key]:
                self._next[key] = nxt
                if key not in children:
                    self._push(key)

    def _removed(self, key):
        del self._next[key], self._pos[key], self._version[key]

    def _leaf_changed(self, key, is_leaf):
        if is_leaf:
            self._push(key)
        else:
            self._version[key] = None

    def _top(self):
        heap, version = self._heap, self._version
        while heap and version.get(heap[0][3]) != heap[0][2]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def victim(self, can_evict=None):
        skipped, found = [], None
        while (top := self._top()) is not None:
            if can_evict is None or can_evict(top[3]):
                found = top[3]
                break
            skipped.append(heapq.heappop(self._heap))
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found


class PrefixBeladyPolicy(BeladyPolicy):
    """`belady` plus bypass: a chunk is stored into a full tier only if its next use is nearer
    than the farthest resident leaf's (the one it would evict). Declining a chunk ends its chain's
    store, which loses nothing: the rest of the chain is used no sooner. The hit-rate ceiling."""
    name = "belady_prefix"
    admits_all = False

    def admit(self, key, nbytes, parent=None, position=0):
        top = self._top()
        return top is not None and self.next_use(key) < -top[0]
