from __future__ import annotations

from collections import OrderedDict

from lmcache_lab.policies.base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    """Least recently used first. An OrderedDict keeps keys oldest -> newest: O(1) everything.

    `on_insert` and `pop_victim` are the base class's bookkeeping fused with LRU's (same result,
    fewer Python calls): they are the replay's and the store path's hot loop."""
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

    def on_insert(self, key, nbytes, parent=None, position=0):
        parents = self._parent
        assert key not in parents, "on_insert of a resident key"
        if parent is not None:
            if parent in parents:
                children = self._children
                children[parent] = children.get(parent, 0) + 1
            else:
                parent = None
        parents[key] = parent
        self._order[key] = None

    def pop_victim(self, can_evict=None):
        children, order = self._children, self._order
        for key in order:
            if key not in children and (can_evict is None or can_evict(key)):
                break
        else:
            return None
        del order[key]
        parent = self._parent.pop(key)
        if parent is not None:
            n = children[parent] - 1
            if n:
                children[parent] = n
            else:
                del children[parent]
        return key
