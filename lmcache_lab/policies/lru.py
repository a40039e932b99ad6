from __future__ import annotations

from collections import OrderedDict, deque
from itertools import chain, islice

from lmcache_lab.policies.base import EvictionPolicy

_consume = deque(maxlen=0).extend   # runs an iterator to its end in C


class LRUPolicy(EvictionPolicy):
    """Least recently used first, tail first, with one OrderedDict (key -> parent, oldest first).

    Invariant (I): every resident key is older than its resident parent. Then the oldest keys are
    always leaves, and any run of oldest keys holds every resident child of its members, so the
    `count` oldest unpinned keys are exactly what `count` single tail-first evictions take: the
    eviction step is a slice of the order, with no child counts to keep. I is kept by:
      * `on_insert`: the new key is newest; its parent and their ancestors are then moved after it
        (storing a chunk uses its prefix, as the request that stored it did);
      * `on_access(chain)`: deepest first, so each key lands after its child (a chain is a prefix
        chain: each key's parent is the key before it), then the first key's ancestors;
      * a removed key is dropped from the order only: children that named it keep the name; it
        reads as "no parent" (not resident), and if the key comes back it is the newest key, so
        those children are older than it, as I wants.
    Pinned keys and the protected key are skipped; their ancestors are then not leaves (a child
    stays), and the scan skips them too (`_scan`). Operations are O(1) per key, plus the depth of
    the ancestors moved, which the request that stores or uses a chain pays anyway.
    """
    name = "lru"
    batch_evicts = True   # new chunks are newest and protected

    def __init__(self, chunk_tokens: int = 256, **params):
        super().__init__(chunk_tokens, **params)
        self._order: OrderedDict = OrderedDict()
        self._parent = self._order   # the base class's membership and length read the same index

    def is_leaf(self, key):
        return key not in set(self._order.values())   # O(n): for inspection, not the hot path

    def on_insert(self, key, nbytes, parent=None, position=0):
        order = self._order
        assert key not in order, "on_insert of a resident key"
        order[key] = parent
        self._raise(parent)

    def on_insert_chain(self, keys, sizes, parent=None, position=0, step=0):
        # deepest first, so each key is older than its parent: I holds inside the chain at once
        tail_first = keys[::-1]
        self._order.update(zip(tail_first, chain(islice(tail_first, 1, None), (parent,))))
        self._raise(parent)

    def on_access(self, chain):
        # `chain` is a prefix chain (each key's parent is the key before it, or none), as every
        # chain of content-addressed keys is: moved deepest first, each key lands after its child
        if chain:
            order = self._order
            _consume(map(order.move_to_end, reversed(chain)))
            self._raise(order[chain[0]])

    def on_remove(self, key):
        del self._order[key]

    def _raise(self, key):
        """Move `key` and its resident ancestors to the newest end, root last."""
        order = self._order
        while key is not None and key in order:
            order.move_to_end(key)
            key = order[key]

    def _scan(self, count, can_evict):
        """Up to `count` oldest tail-first victims (not popped). A skipped key keeps its parent a
        non-leaf; by I that parent comes later in the order, so it is marked as the scan passes."""
        out, blocked = [], set()
        for key, parent in self._order.items():
            if key in blocked or (can_evict is not None and not can_evict(key)):
                blocked.add(parent)
                continue
            out.append(key)
            if len(out) == count:
                break
        return out

    def victim(self, can_evict=None):
        found = self._scan(1, can_evict)
        return found[0] if found else None

    def pop_victims(self, count, pinned=(), protect=None):
        order = self._order
        oldest = list(islice(order, count))
        if (len(oldest) < count or (protect is not None and protect in oldest)
                or (pinned and any(map(pinned.__contains__, oldest)))):
            oldest = self._scan(count, lambda k: k != protect and k not in pinned)
        _consume(map(order.pop, oldest))
        return oldest
