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

    def __init__(self, chunk_tokens: int = 256, **params):
        super().__init__(chunk_tokens, **params)
        self._freq: dict = {}
        self._buckets: dict[int, OrderedDict] = {}
        self._min = 0

    def _inserted(self, key, nbytes, position):
        self._freq[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min = 1

    def _hit(self, key):
        f = self._freq[key]
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
            if self._min == f:
                self._min = f + 1
        self._freq[key] = f + 1
        self._buckets.setdefault(f + 1, OrderedDict())[key] = None

    def _removed(self, key):
        f = self._freq.pop(key)
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
            if self._min == f:
                self._min = min(self._buckets, default=0)

    def _candidates(self):
        bucket = self._buckets.get(self._min)
        if bucket:
            yield from bucket
        for f in sorted(self._buckets):  # only reached when the lowest bucket is all pinned/parents
            if f != self._min:
                yield from self._buckets[f]
