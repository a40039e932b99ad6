from __future__ import annotations

from collections import OrderedDict

from lmcache_lab.policies.base import EvictionPolicy


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., "FIFO Queues are All You Need for Cache Eviction", SOSP'23).

    Three FIFO queues: a small queue S (`small_fraction` of the resident bytes, 10% in the paper)
    that new keys enter, a main queue M, and a ghost queue G of keys recently dropped from S
    (as many keys as M holds). Each resident key has a 2-bit use counter (capped at 3).
      * store: a key found in G enters M, else S.
      * evict from S (while S holds more than its share): the oldest key of S moves to M if it
        was used at least `promote_at` times since it was stored, else it leaves (into G).
      * evict from M: the oldest key of M is reinserted at M's head with its counter decremented
        while the counter is positive, else it leaves.
    One-hit chunks therefore leave from S, quickly, and never displace reused ones in M.

    Adaptation to prefix chains: the access that stores a chunk does not count as a use (same
    request); the victim is always an unpinned leaf: a non-leaf or pinned key met at a queue's
    tail is requeued instead of evicted (a parent at S's tail moves to M: it stays while its
    children do; a pinned key goes back to S's head). O(1) amortized.
    """
    name = "s3fifo"

    def __init__(self, chunk_tokens: int = 256, small_fraction: float = 0.1, promote_at: int = 1, **params):
        super().__init__(chunk_tokens, **params)
        assert 0 < small_fraction < 1 and promote_at >= 1
        self.small_fraction = small_fraction
        self.promote_at = promote_at
        self._small: OrderedDict = OrderedDict()   # key -> nbytes, oldest first
        self._main: OrderedDict = OrderedDict()
        self._ghost: OrderedDict = OrderedDict()
        self._freq: dict = {}
        self._small_bytes = 0
        self._bytes = 0
        self._fresh: set = set()

    def _inserted(self, key, nbytes, position):
        self._freq[key] = 0
        self._bytes += nbytes
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = nbytes
        else:
            self._small[key] = nbytes
            self._small_bytes += nbytes
            self._fresh.add(key)

    def on_access(self, chain):
        freq, fresh, small = self._freq, self._fresh, self._small
        for key in reversed(chain):
            if key in fresh:
                # stored by this request: no use, but requeue deepest first so that within
                # the new segment a parent is newer than its child (tail leaves S first)
                fresh.discard(key)
                if key in small:
                    small.move_to_end(key)
            else:
                f = freq[key]
                if f < 3:
                    freq[key] = f + 1

    def _removed(self, key):
        del self._freq[key]
        self._fresh.discard(key)
        if key in self._small:
            nbytes = self._small.pop(key)
            self._small_bytes -= nbytes
            self._ghost[key] = None
            while len(self._ghost) > max(1, len(self._main)):
                self._ghost.popitem(last=False)
        else:
            nbytes = self._main.pop(key)
        self._bytes -= nbytes

    def victim(self, can_evict=None):
        small, main, freq, children = self._small, self._main, self._freq, self._children
        budget = 3 * (len(small) + len(main)) + 8   # every key is requeued at most ~3 times a call
        while budget and (small or main):
            budget -= 1
            if small and (not main or self._small_bytes > self.small_fraction * self._bytes):
                key = next(iter(small))
                if key in children or freq[key] >= self.promote_at:
                    # earned M, or a parent of resident chunks: it stays while they do
                    nbytes = small.pop(key)
                    self._small_bytes -= nbytes
                    main[key] = nbytes
                    freq[key] = 0
                elif can_evict is None or can_evict(key):
                    return key
                else:
                    small.move_to_end(key)
                continue
            key = next(iter(main))
            f = freq[key]
            if f > 0:
                freq[key] = f - 1
            elif key not in children and (can_evict is None or can_evict(key)):
                return key
            main.move_to_end(key)
        # S over its share but stuck: fall back to any unpinned leaf
        for queue in (small, main):
            for key in queue:
                if key not in children and (can_evict is None or can_evict(key)):
                    return key
        return None
