from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict

from lmcache_lab.cost import MODELS, ModelCost
from lmcache_lab.policies.base import EvictionPolicy


class CostAwarePolicy(EvictionPolicy):
    """Prefix-structure-aware cost-aware eviction: GreedyDual-Size-Frequency (Cherkasova, "Improving
    WWW proxies performance with Greedy-Dual-Size-Frequency caching policy", HP Labs 1998) with the
    frequency term replaced by a reuse probability learned online per class of chunk, and the
    GreedyDual clock by request time (as in hyperbolic caching, Blankstein et al., ATC'17, the
    value of keeping an item is its expected reuse rate, not its raw count):

        priority(k) = t_used(k) + horizon * reuse(class(k)) / mean_reuse * cost(k) / bytes(k)

    the lowest priority is evicted. t_used is the request count at the chunk's last use, horizon
    the running mean age (requests since last use) of evicted chunks, so a chunk of an average class
    lives about as long as under LRU, a likely-reused one longer, an unlikely one shorter.
      * cost(k)/bytes(k): prefill FLOPs to recompute the chunk at its position in its prefix
        (`lmcache_lab.cost`) per byte, in units of a chunk at position 0.
      * class(k), read from the chain when a request stores or uses it:
          stored: (is the request's last chunk, did the request continue an earlier prefix,
                   log2 of the new segment's length);   used again: ("hit", min(uses, 3)).
        A request's last chunk is usually a partial block no later prompt repeats; a long new
        segment after a long hit is a one-off continuation more often than a short one.
      * reuse(c): (reused + 1) / (entered + 2) over chunks that entered class c, where "reused"
        means used again while resident or while remembered in a ghost list of 2x the resident
        count after eviction (so classes the cache evicts early are not starved of evidence).
      * admission: with `admit_min` > 0, a new chunk whose class is still unknown (no stored
        class yet: it is being stored now) is always admitted; classes decide only eviction.
        One-off long contexts are then the first victims instead of flushing reused prefixes.

    Tail first: only leaves sit in the heap; a parent re-enters when its last child leaves, with
    the priority it earned at its last use. Heap entries are invalidated lazily by a per-key
    version number: O(log n) per operation.
    """
    name = "cost_aware"

    def __init__(self, chunk_tokens: int = 256, model: str | dict = "llama3_8b", ghost_factor: float = 2.0,
                 weight: float = 1.0, cost_exponent: float = 0.5, **params):
        super().__init__(chunk_tokens, **params)
        assert ghost_factor >= 0 and weight > 0
        self.model = MODELS[model] if isinstance(model, str) else ModelCost(**model)
        self.ghost_factor = ghost_factor
        self.weight = weight
        self.cost_exponent = cost_exponent
        self.now = 0                 # requests seen (on_access calls that carried a new segment or a hit)
        self.horizon = 1.0           # running mean age of evicted chunks, in requests
        self._unit = self.model.chunk_flops(chunk_tokens, 0)
        self._heap: list = []
        self._seq = itertools.count()
        self._version: dict = {}     # key -> version of its live heap entry (None: not in heap)
        self._h: dict = {}           # key -> priority earned at its last use
        self._t: dict = {}           # key -> request count at its last use
        self._value: dict = {}       # cost / bytes in units of a position-0 chunk
        self._cls: dict = {}         # key -> class
        self._uses: dict = {}
        self._fresh: set = set()     # stored by the current request, class not yet known
        self._ghost: OrderedDict = OrderedDict()   # evicted key -> its class when evicted
        self._stats: dict = {}       # class -> [reused + 1, entered + 2]
        self._total = [1, 2]

    # ---- learned reuse ------------------------------------------------------------------------
    def _enter(self, key, cls):
        self._cls[key] = cls
        s = self._stats.get(cls)
        if s is None:
            s = self._stats[cls] = [1, 2]
        s[1] += 1
        self._total[1] += 1

    def _reused(self, cls):
        self._stats[cls][0] += 1
        self._total[0] += 1

    def reuse_estimate(self, key) -> float:
        """Learned probability that a chunk of `key`'s class is used again."""
        hit, n = self._stats[self._cls[key]]
        return hit / n

    def _priority(self, key):
        hit, n = self._stats[self._cls[key]]
        mean_hit, mean_n = self._total
        rate = (hit / n) / (mean_hit / mean_n)
        return self.now + self.weight * self.horizon * rate * self._value[key]

    def _push(self, key, renew=True):
        if renew:
            self._t[key] = self.now
            self._h[key] = self._priority(key)
        v = next(self._seq)
        self._version[key] = v
        heapq.heappush(self._heap, (self._h[key], v, key))

    # ---- policy hooks -------------------------------------------------------------------------
    def _inserted(self, key, nbytes, position):
        cost = self.model.chunk_flops(self.chunk_tokens, position) / self._unit
        saved_per_byte = cost * self.chunk_tokens * self.model.kv_bytes_per_token / max(nbytes, 1)
        self._value[key] = saved_per_byte ** self.cost_exponent
        cls = self._ghost.pop(key, None)
        if cls is not None:
            self._reused(cls)        # came back soon after eviction: its class was worth keeping
        self._uses[key] = 0
        self._enter(key, ("new",))   # provisional, until the request's touch gives the segment
        self._fresh.add(key)
        self._push(key)

    def on_access(self, chain):
        if not chain:
            return
        self.now += 1
        fresh, children, uses = self._fresh, self._children, self._uses
        new = sum(1 for k in chain if k in fresh) if fresh else 0
        cont = len(chain) - new > 1
        seg = min(new, 256).bit_length()
        last = chain[-1]
        for key in reversed(chain):
            if key in fresh:
                fresh.discard(key)
                self._stats[self._cls[key]][1] -= 1
                self._total[1] -= 1
                self._enter(key, (key == last, cont, seg))
            else:
                self._reused(self._cls[key])
                u = uses[key] = uses[key] + 1
                self._enter(key, ("hit", min(u, 3)))
            if key in children:
                self._t[key] = self.now
                self._h[key] = self._priority(key)
            else:
                self._push(key)

    def _removed(self, key):
        self.horizon += 0.01 * ((self.now - self._t.pop(key)) - self.horizon)
        self._ghost[key] = self._cls.pop(key)
        limit = self.ghost_factor * len(self._value)
        while self._ghost and len(self._ghost) > limit:
            self._ghost.popitem(last=False)
        self._fresh.discard(key)
        del self._version[key], self._value[key], self._h[key], self._uses[key]

    def _leaf_changed(self, key, is_leaf):
        if is_leaf:
            self._push(key, renew=False)
        else:
            self._version[key] = None

    def victim(self, can_evict=None):
        heap, version = self._heap, self._version
        skipped, found = [], None
        while heap:
            top = heap[0]
            if version.get(top[2]) != top[1]:
                heapq.heappop(heap)
                continue
            if can_evict is None or can_evict(top[2]):
                found = top[2]
                break
            skipped.append(heapq.heappop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found
