from __future__ import annotations

from lmcache_lab.policies.base import EvictionPolicy


class SievePolicy(EvictionPolicy):
    """SIEVE (Zhang et al., "SIEVE is Simpler than LRU: an Efficient Turn-Key Eviction Algorithm
    for Web Caches", NSDI'24).

    Keys sit in one FIFO queue, newest at the head, each with a `visited` bit set by a hit. A hand
    walks from the tail (oldest) towards the head, wrapping around: a visited key has its bit
    cleared and stays where it is; the first unvisited key is the victim, and the hand stays at
    its place. New keys are not moved by hits (lazy promotion), so one-hit chunks leave quickly.

    Adaptation to prefix chains: the access that stores a chunk does not count as a hit (it is
    the same request), and the hand passes over non-leaves and pinned keys without clearing
    their bit, so the victim is always an unpinned leaf (tail first). O(1) amortized: a full turn
    of the hand clears every bit it passes.

    Queue: a doubly linked list in two dicts (`_newer`, `_older`); the head is the newest key.
    """
    name = "sieve"

    def __init__(self, chunk_tokens: int = 256, **params):
        super().__init__(chunk_tokens, **params)
        self._newer: dict = {}
        self._older: dict = {}
        self._head = self._tail = None   # newest, oldest
        self._hand = None
        self._visited: set = set()
        self._fresh: set = set()         # stored by the current request: its first touch is not a hit

    def _link_head(self, key):
        self._older[key] = self._head
        self._newer[key] = None
        if self._head is not None:
            self._newer[self._head] = key
        else:
            self._tail = key
        self._head = key

    def _unlink(self, key):
        newer, older = self._newer.pop(key), self._older.pop(key)
        if newer is None:
            self._head = older
        else:
            self._older[newer] = older
        if older is None:
            self._tail = newer
        else:
            self._newer[older] = newer
        if self._hand == key:
            self._hand = newer

    def _inserted(self, key, nbytes, position):
        self._link_head(key)
        self._fresh.add(key)

    def on_access(self, chain):
        fresh, visited = self._fresh, self._visited
        for key in reversed(chain):
            if key in fresh:
                # stored by this request: not a hit, but requeue deepest first so that in the
                # new segment a parent is newer than its child (the hand meets tails first)
                fresh.discard(key)
                if self._head != key:
                    self._unlink(key)
                    self._link_head(key)
            else:
                visited.add(key)

    def _removed(self, key):
        self._unlink(key)
        self._visited.discard(key)
        self._fresh.discard(key)

    def victim(self, can_evict=None):
        children, visited, newer = self._children, self._visited, self._newer
        key = self._hand if self._hand is not None else self._tail
        for _ in range(2 * len(newer) + 1):   # two turns: the first clears every bit it passes
            if key is None:
                key = self._tail
                if key is None:
                    break
            if key in visited:
                if key not in children:
                    visited.discard(key)
            elif key not in children and (can_evict is None or can_evict(key)):
                self._hand = newer[key]
                return key
            key = newer[key]
        return None
