from __future__ import annotations

from collections import OrderedDict

from lmcache_lab.policies.base import EvictionPolicy


class ARCPolicy(EvictionPolicy):
    """ARC, Adaptive Replacement Cache (Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead
    Replacement Cache", FAST'03).

    T1 holds keys seen by one request, T2 keys seen by two or more (each LRU-ordered); B1 and B2
    are ghosts of keys evicted from T1 and T2. A stored key found in B1 means T1 was too small:
    the target size p of T1 grows; found in B2, p shrinks. The victim is T1's LRU key when
    |T1| > p, else T2's LRU key. The cache size c is the number of resident keys when an eviction
    is asked for (a tier budgets bytes, not entries); ghosts are trimmed to |T1|+|B1| <= c and
    |B1|+|B2| <= c as in the paper.

    Adaptation to prefix chains: the access that stores a chunk is the same request, not a
    second use (the key stays in T1); the victim is the first unpinned leaf in LRU order of the
    chosen list, falling back to the other list (tail first). O(1) apart from skipping.
    """
    name = "arc"

    def __init__(self, chunk_tokens: int = 256, **params):
        super().__init__(chunk_tokens, **params)
        self._t1: OrderedDict = OrderedDict()
        self._t2: OrderedDict = OrderedDict()
        self._b1: OrderedDict = OrderedDict()
        self._b2: OrderedDict = OrderedDict()
        self.p = 0.0
        self._fresh: set = set()

    def _inserted(self, key, nbytes, position):
        b1, b2 = self._b1, self._b2
        if key in b1:
            self.p = min(float(len(self)), self.p + max(len(b2) / len(b1), 1.0))
            del b1[key]
            self._t2[key] = None
        elif key in b2:
            self.p = max(0.0, self.p - max(len(b1) / len(b2), 1.0))
            del b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
            self._fresh.add(key)

    def on_access(self, chain):
        t1, t2, fresh = self._t1, self._t2, self._fresh
        for key in reversed(chain):
            if key in fresh:
                fresh.discard(key)
                t1.move_to_end(key)
            elif key in t1:
                del t1[key]
                t2[key] = None
            else:
                t2.move_to_end(key)

    def _removed(self, key):
        self._fresh.discard(key)
        if key in self._t1:
            del self._t1[key]
            self._b1[key] = None
        else:
            del self._t2[key]
            self._b2[key] = None
        c = len(self)
        b1, b2 = self._b1, self._b2
        while b1 and len(self._t1) + len(b1) > c:
            b1.popitem(last=False)
        while b2 and len(b1) + len(b2) > c:
            b2.popitem(last=False)

    def _candidates(self):
        if self._t1 and len(self._t1) > self.p:
            yield from self._t1
            yield from self._t2
        else:
            yield from self._t2
            yield from self._t1
