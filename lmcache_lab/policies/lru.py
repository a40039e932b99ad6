from __future__ import annotations

from collections import OrderedDict

from lmcache_lab.policies.base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    """Least recently used first. An OrderedDict keeps keys oldest -> newest: O(1) everything."""
    name = "lru"

    def __init__(self, chunk_tokens: int = 256, **params):
        super().__init__(chunk_tokens, **params)
        self._order: OrderedDict = OrderedDict()

    def _inserted(self, key, nbytes, position):
        self._order[key] = None

    def _hit(self, key):
        self._order.move_to_end(key)

    def _removed(self, key):
        del self._order[key]

    def on_access(self, chain):
        move = self._order.move_to_end
        for key in reversed(chain):
            move(key)

    def _candidates(self):
        return self._order
