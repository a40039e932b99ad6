from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict

from lmcache_lab.cost import MODELS, ModelCost
from lmcache_lab.policies.base import EvictionPolicy


class CostAwarePolicy(EvictionPolicy):
    """Prefix-aware GreedyDual-Size-Frequency (Cherkasova, "Improving WWW proxies performance with
    Greedy-Dual-Size-Frequency caching policy", HP Labs 1998; GreedyDual: Young, 1994):

        priority(k) = clock + reuse(k) * freq(k) * cost(k) / bytes(k)

    evict the lowest priority, then set clock to it (ageing: untouched chunks sink below newly
    used ones).
      * cost(k): prefill FLOPs to recompute the chunk at its position in its prefix
        (`lmcache_lab.cost`), in units of a chunk at position 0: deep chunks of long contexts are
        worth more per byte.
      * freq(k): uses by later requests (the touch of the request that stored it is not a use),
        remembered for `ghost_factor` x resident keys after eviction, so a chunk that comes back
        re-enters with its history (as ARC's ghosts do).
      * reuse(k): the chain's predicted reuse, learned online per class of chunk: a chunk that
        ended the request that stored it (its tail: usually a partial block that no later prompt
        repeats) vs an interior chunk, each class with its running rate of chunks that were used
        again before eviction (Laplace-smoothed).
      * admission: a chunk that no request used yet (`freq` 0, not in the ghost) is stored into a
        full tier only while the victim's priority is below `clock + admit_ratio * its own`: a
        one-off long context cannot flush chunks whose priority was earned by reuse.

    Tail first: only leaves sit in the heap. A chunk that gains a resident child leaves the heap
    (its entry goes stale) and re-enters when its last child is removed. Heap entries are
    invalidated lazily by a per-key version number: O(log n) per operation.
    """
    name = "cost_aware"
    admits_all = False

    def __init__(self, chunk_tokens: int = 256, model: str | dict = "llama3_8b", ghost_factor: float = 1.0,
                 admit_ratio: float = 0.0, learn_reuse: bool = True, **params):
        super().__init__(chunk_tokens, **params)
        self.model = MODELS[model] if isinstance(model, str) else ModelCost(**model)
        self.ghost_factor = ghost_factor
        self.admit_ratio = admit_ratio
        self.learn_reuse = learn_reuse
        if admit_ratio <= 0:
            self.admits_all = True
        self.clock = 0.0
        self._unit = self.model.chunk_flops(chunk_tokens, 0)
        self._heap: list = []
        self._seq = itertools.count()
        self._version: dict = {}   # key -> version of its live heap entry (None: not in heap)
        self._freq: dict = {}
        self._h: dict = {}         # key -> priority earned at its last access
        self._value: dict = {}     # cost / bytes (x bytes of a chunk: dimensionless)
        self._cls: dict = {}       # key -> 0 interior, 1 tail of the request that stored it
        self._fresh: set = set()   # stored by the current request
        self._ghost: OrderedDict = OrderedDict()   # evicted key -> freq
        # per class (tail?, min(freq, 3)): [keys that were used again while in it + 1, keys that entered it + 2]
        self._stats = {(t, f): [1, 2] for t in (0, 1) for f in range(4)}

    def _class(self, key):
        return self._cls[key], min(self._freq[key], 3)

    def _reuse(self, key):
        if not self.learn_reuse:
            return 1.0 + self._freq[key]
        hit, n = self._stats[self._class(key)]
        return hit / n

    def _priority(self, key):
        return self.clock + self._reuse(key) * self._value[key]

    def _push(self, key, renew=True):
        """(Re)enter the heap; `renew` recomputes the priority (an access), else it keeps the one
        earned at the last access (a parent that becomes a leaf is not 'used' by that)."""
        if renew:
            self._h[key] = self._priority(key)
        v = next(self._seq)
        self._version[key] = v
        heapq.heappush(self._heap, (self._h[key], v, key))

    def _inserted(self, key, nbytes, position):
        cost = self.model.chunk_flops(self.chunk_tokens, position) / self._unit
        self._value[key] = cost * self.chunk_tokens * self.model.kv_bytes_per_token / max(nbytes, 1)
        self._freq[key] = self._ghost.pop(key, 0)
        self._cls[key] = 0
        self._fresh.add(key)
        self._stats[0, min(self._freq[key], 3)][1] += 1
        self._push(key)

    def on_access(self, chain):
        fresh, freq, children, stats = self._fresh, self._freq, self._children, self._stats
        last = chain[-1] if chain else None
        for key in reversed(chain):
            if key in fresh:
                fresh.discard(key)
                if key == last:
                    stats[0, min(freq[key], 3)][1] -= 1
                    self._cls[key] = 1
                    stats[1, min(freq[key], 3)][1] += 1
            else:
                c = self._cls[key]
                f = freq[key]
                stats[c, min(f, 3)][0] += 1
                freq[key] = f + 1
                stats[c, min(f + 1, 3)][1] += 1
            if key in children:
                self._h[key] = self._priority(key)
            else:
                self._push(key)

    def _removed(self, key):
        del self._cls[key]
        self._ghost[key] = self._freq.pop(key)
        limit = self.ghost_factor * len(self._value)
        while self._ghost and len(self._ghost) > limit:
            self._ghost.popitem(last=False)
        self._fresh.discard(key)
        del self._version[key], self._value[key], self._h[key]

    def _leaf_changed(self, key, is_leaf):
        if is_leaf:
            self._push(key, renew=False)
        else:
            self._version[key] = None

    def _top(self):
        heap, version = self._heap, self._version
        while heap and version.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def admit(self, key, nbytes, parent=None, position=0):
        if key in self._ghost:
            return True
        top = self._top()
        if top is None:
            return True
        cost = self.model.chunk_flops(self.chunk_tokens, position) / self._unit
        return top[0] < self.clock + self.admit_ratio * cost

    def victim(self, can_evict=None):
        skipped = []
        found = None
        while (top := self._top()) is not None:
            if can_evict is None or can_evict(top[2]):
                found = top[2]
                self.clock = top[0]
                break
            skipped.append(heapq.heappop(self._heap))
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found
