"""Shared machinery of the scored policies (`lhd`, `learned`): request clock, per-chunk history
and eviction of the lowest-scored of a seeded random sample of leaves.

Request clock. A tier touches a request's chunks once or twice: `touch(hit prefix)` when they are
loaded, then `touch(whole chain)` after the missing chunks were stored (the replay and a live
engine both do this). A call that continues the previous call's chain (same first key, and the
previous call's last key at the same place) and follows a call with no newly stored chunk is the
second touch of the same request; any other call starts a request and advances `now` by one. So
`now` counts requests, and a chunk's use by one request is counted once. A chunk stored by the
current request is `fresh`: its first touch is not a use.

Per chunk, kept while resident (`ChunkInfo`): time of the last use (or store), uses so far,
gap between its last two uses, whether it ended the request that last touched it, its depth
(position // chunk_tokens), whether that request continued a cached prefix (hit run > 1 chunk),
the length of that request's new segment and of the request, and its size.

Eviction: `samples` leaves drawn with a seeded `random.Random`, lowest `score(info, now)` first
(ties: the first drawn); pinned draws are skipped, and if every draw is pinned all leaves are
scanned. Only leaves are ever drawn, so the tail-first invariant holds by construction. A leaf
list with swap-removal keeps draws O(1): O(samples) per eviction (Psounis & Prabhakar,
INFOCOM'01, sampled eviction; LHD and LRB evict the same way).
"""
from __future__ import annotations

import random
from lmcache_lab.policies.base import EvictionPolicy, Key, LeafList

NO_GAP = -1


class ChunkInfo:
    """What a scored policy knows about one resident chunk (see the module docstring)."""
    __slots__ = ("last", "uses", "gap", "tail", "depth", "cont", "segment", "length", "nbytes", "cls", "cache")

    def __init__(self, now: int, depth: int, nbytes: int):
        self.last = now
        self.uses = 0
        self.gap = NO_GAP
        self.tail = False
        self.depth = depth
        self.cont = False
        self.segment = 1
        self.length = 1
        self.nbytes = max(1, nbytes)
        self.cls = 0        # policy-defined class or model input, set by `_touched`
        self.cache = None   # policy-defined cached score parts


class ScoredPolicy(EvictionPolicy):
    """Base of sampled-eviction policies. Subclasses implement `_score(info, now)` (lower is
    evicted first) and may hook `_used(key, info, age)` (a counted use, before `info` is
    updated), `_touched(key, info)` (after a request touched it), `_evicted(key, info)`,
    `_request_started()` and `_stored(key, info)`."""

    def __init__(self, chunk_tokens: int = 256, samples: int = 32, seed: int = 0, **params):
        super().__init__(chunk_tokens, **params)
        if samples < 1:
            raise ValueError(f"policy {self.name!r}: samples must be >= 1, got {samples!r}")
        self.samples = samples
        self._rng = random.Random(seed)
        self.now = 0
        self.info: dict[Key, ChunkInfo] = {}
        self._fresh: set = set()
        self._open: tuple | None = None   # (first key, last key, length) of a request's first touch
        self._leaves = LeafList()

    def _leaf_changed(self, key, is_leaf):
        self._leaves.set(key, is_leaf)

    # ---- hooks of the base class ----------------------------------------------------------------
    def _inserted(self, key, nbytes, position):
        info = self.info[key] = ChunkInfo(self.now, position // self.chunk_tokens, nbytes)
        self._fresh.add(key)
        self._leaves.set(key, True)
        self._stored(key, info)

    def _removed(self, key):
        self._leaves.set(key, False)
        self._fresh.discard(key)
        self._evicted(key, self.info.pop(key))

    def on_access(self, chain):
        if not chain:
            return
        fresh, info = self._fresh, self.info
        has_fresh = bool(fresh) and any(k in fresh for k in chain)
        opened = self._open
        if (opened is not None and len(chain) >= opened[2] and chain[0] == opened[0]
                and chain[opened[2] - 1] == opened[1]):
            self._open = None                       # the same request's touch after its store
        else:
            self.now += 1
            self._request_started()
            self._open = None if has_fresh else (chain[0], chain[-1], len(chain))
        now = self.now
        new = sum(1 for k in chain if k in fresh) if has_fresh else 0
        cont, length, last = len(chain) - new > 1, len(chain), chain[-1]
        for key in chain:
            c = info[key]
            if key in fresh:
                fresh.discard(key)
            elif c.last != now:                      # first touch of this chunk by this request
                age = now - c.last
                self._used(key, c, age)
                c.gap = age
                c.uses += 1
            c.last = now
            c.tail = key == last
            c.cont, c.segment, c.length = cont, max(new, 1), length
            self._touched(key, c)

    # ---- what a subclass implements ---------------------------------------------------------------
    def _score(self, info: ChunkInfo, now: int) -> float:
        raise NotImplementedError

    def _used(self, key, info: ChunkInfo, age: int) -> None:
        pass

    def _touched(self, key, info: ChunkInfo) -> None:
        pass

    def _stored(self, key, info: ChunkInfo) -> None:
        pass

    def _evicted(self, key, info: ChunkInfo) -> None:
        pass

    def _request_started(self) -> None:
        pass

    # ---- eviction -------------------------------------------------------------------------------
    def victim(self, can_evict=None):
        leaves = self._leaves
        n = len(leaves)
        if not n:
            return None
        info, now, score = self.info, self.now, self._score
        best, best_s = None, None
        draws = self._rng.choices(leaves, k=self.samples) if n > self.samples else list(leaves)
        for key in draws:
            if can_evict is not None and not can_evict(key):
                continue
            s = score(info[key], now)
            if best_s is None or s < best_s:
                best, best_s = key, s
        if best is None and n > self.samples:
            for key in leaves:
                if can_evict is None or can_evict(key):
                    s = score(info[key], now)
                    if best_s is None or s < best_s:
                        best, best_s = key, s
        return best
