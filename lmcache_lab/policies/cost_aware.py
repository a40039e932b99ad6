from __future__ import annotations

import heapq
import itertools

from lmcache_lab.cost import MODELS, ModelCost
from lmcache_lab.policies.base import EvictionPolicy


class CostAwarePolicy(EvictionPolicy):
    """GreedyDual-Size-Frequency (Cherkasova, "Improving WWW proxies performance with
    Greedy-Dual-Size-Frequency caching policy", HP Labs 1998):

        priority(k) = clock + freq(k) * cost(k) / bytes(k)

    evict the lowest priority, then set clock to it (ageing: untouched chunks sink below newly
    used ones). cost(k) is the prefill FLOPs to recompute the chunk at its position in its prefix
    (`lmcache_lab.cost`), so deep chunks of long contexts are worth more per byte.

    Tail first: only leaves sit in the heap. A chunk that gains a resident child leaves the heap
    (its entry goes stale) and re-enters when its last child is removed. Heap entries are
    invalidated lazily by a per-key version number: O(log n) per operation.
    """
    name = "cost_aware"

    def __init__(self, chunk_tokens: int = 256, model: str | dict = "llama3_8b", **params):
        super().__init__(chunk_tokens, **params)
        self.model = MODELS[model] if isinstance(model, str) else ModelCost(**model)
        self.clock = 0.0
        self._heap: list = []
        self._seq = itertools.count()
        self._version: dict = {}   # key -> version of its live heap entry (None: not in heap)
        self._freq: dict = {}
        self._value: dict = {}     # cost / bytes

    def _push(self, key):
        v = next(self._seq)
        self._version[key] = v
        heapq.heappush(self._heap, (self.clock + self._freq[key] * self._value[key], v, key))

    def _inserted(self, key, nbytes, position):
        cost = self.model.chunk_flops(self.chunk_tokens, position)
        self._value[key] = cost / max(nbytes, 1)
        self._freq[key] = 1
        self._push(key)

    def _hit(self, key):
        self._freq[key] += 1
        if self.is_leaf(key):
            self._push(key)

    def _removed(self, key):
        del self._version[key], self._freq[key], self._value[key]

    def _leaf_changed(self, key, is_leaf):
        if is_leaf:
            self._push(key)
        else:
            self._version[key] = None

    def victim(self, can_evict=None):
        skipped = []
        found = None
        while self._heap:
            prio, v, key = self._heap[0]
            if self._version.get(key) != v:
                heapq.heappop(self._heap)  # stale
                continue
            if can_evict is None or can_evict(key):
                found = key
                self.clock = prio
                break
            skipped.append(heapq.heappop(self._heap))
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found
