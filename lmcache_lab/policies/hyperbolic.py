from __future__ import annotations

import random

from lmcache_lab.cost import MODELS, ModelCost
from lmcache_lab.policies.base import EvictionPolicy, LeafList


class HyperbolicPolicy(EvictionPolicy):
    """Hyperbolic caching (Blankstein, Sen & Freedman, "Hyperbolic Caching: Flexible Caching for
    Web Applications", USENIX ATC'17): a chunk's priority is its use rate since it was stored,

        priority(k) = uses(k) / (now - stored(k) + 1)  *  (cost(k) / cost at position 0) ** cost_exponent

    and the victim is the lowest priority among `samples` leaves drawn at random (priorities
    change with time, so no heap can hold them; sampling is the paper's method). Popular chunks
    keep a high rate; a one-off long context starts high and decays as 1/age, so it leaves
    before chunks that earned reuse. `now` counts requests (touches); the touch of the request
    that stored a chunk is not a use.

    Tail first: only leaves are sampled (a list with swap-removal keeps them: O(1) add/remove);
    pinned samples are skipped; if every sample is pinned, all leaves are scanned. Deterministic:
    the sampler is seeded. O(samples) per eviction.
    """
    name = "hyperbolic"

    def __init__(self, chunk_tokens: int = 256, model: str | dict = "llama3_8b", samples: int = 16,
                 cost_exponent: float = 0.5, seed: int = 0, **params):
        super().__init__(chunk_tokens, **params)
        assert samples >= 1
        self.model = MODELS[model] if isinstance(model, str) else ModelCost(**model)
        self.samples = samples
        self.cost_exponent = cost_exponent
        self._rng = random.Random(seed)
        self.now = 0
        self._unit = self.model.chunk_flops(chunk_tokens, 0)
        self._uses: dict = {}
        self._born: dict = {}
        self._weight: dict = {}
        self._fresh: set = set()
        self._leaves = LeafList()

    def _inserted(self, key, nbytes, position):
        self._uses[key] = 1
        self._born[key] = self.now
        self._weight[key] = (self.model.chunk_flops(self.chunk_tokens, position) / self._unit) ** self.cost_exponent
        self._fresh.add(key)
        self._leaves.set(key, True)

    def on_access(self, chain):
        self.now += 1
        fresh, uses = self._fresh, self._uses
        for key in chain:
            if key in fresh:
                fresh.discard(key)
            else:
                uses[key] += 1

    def _removed(self, key):
        self._leaves.set(key, False)
        del self._uses[key], self._born[key], self._weight[key]
        self._fresh.discard(key)

    def _leaf_changed(self, key, is_leaf):
        self._leaves.set(key, is_leaf)

    def victim(self, can_evict=None):
        leaves = self._leaves
        if not leaves:
            return None
        uses, born, weight, now = self._uses, self._born, self._weight, self.now + 1
        rand = self._rng.randrange
        best, best_p = None, None
        n = len(leaves)
        for _ in range(self.samples if n > self.samples else n):
            key = leaves[rand(n)]
            if can_evict is not None and not can_evict(key):
                continue
            p = uses[key] * weight[key] / (now - born[key])
            if best_p is None or p < best_p:
                best, best_p = key, p
        if best is None:
            for key in leaves:
                if can_evict is None or can_evict(key):
                    p = uses[key] * weight[key] / (now - born[key])
                    if best_p is None or p < best_p:
                        best, best_p = key, p
        return best
