from __future__ import annotations

from collections import OrderedDict

from lmcache_lab.policies.base import EvictionPolicy


class LFUPolicy(EvictionPolicy):
    """Least frequently used first; ties go to the least recently used.

    O(1) LFU (Shah, Mitra & Matani, "An O(1) algorithm for implementing the LFU cache eviction
    scheme", 2010): one recency-ordered bucket per frequency and the minimum frequency tracked.
    A parent is accessed whenever a child is, so its count is never below its children's, and
    within a count the deepest-first touch keeps children older: LFU evicts tails first.
    """
    name = "lfu"
    batch_evicts = True   # new chunks are newest leaves, behind the older ones, and protected

    def __init__(self, chunk_tokens: int = 256, **params):
        super().__init__(chunk_tokens, **params)
        self._freq: dict = {}
        self._buckets: dict[int, OrderedDict] = {}
        self._min = 0
        # count 1 (stored, not touched since): kept apart from the buckets, leaves and parents
        # separately, so a chain being stored (all parents but its protected tail) is never
        # rescanned for each chunk stored; their leaves are the first candidates (lowest count)
        self._new_leaves: OrderedDict = OrderedDict()
        self._new_parents: set = set()

    def _inserted(self, key, nbytes, position):
        self._freq[key] = 1
        self._new_leaves[key] = None

    def _leaf_changed(self, key, is_leaf):
        if is_leaf:
            if key in self._new_parents:
                self._new_parents.discard(key)
                self._new_leaves[key] = None
        elif key in self._new_leaves:
            del self._new_leaves[key]
            self._new_parents.add(key)

    def _hit(self, key):
        f = self._freq[key]
        if f == 1:
            if key in self._new_leaves:
                del self._new_leaves[key]
            else:
                self._new_parents.discard(key)
        else:
            bucket = self._buckets[f]
            del bucket[key]
            if not bucket:
                del self._buckets[f]
        self._freq[key] = f + 1
        self._buckets.setdefault(f + 1, OrderedDict())[key] = None
        if not self._min or f + 1 < self._min or (self._min == f and f not in self._buckets):
            self._min = f + 1

    def _removed(self, key):
        f = self._freq.pop(key)
        if f == 1:
            if key in self._new_leaves:
                del self._new_leaves[key]
            else:
                self._new_parents.discard(key)
            return
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
            if self._min == f:
                self._min = min(self._buckets, default=0)

    def _candidates(self):
        yield from self._new_leaves
        bucket = self._buckets.get(self._min)
        if bucket:
            yield from bucket
        for f in sorted(self._buckets):  # only reached when the lowest bucket is all pinned/parents
            if f != self._min:
                yield from self._buckets[f]
