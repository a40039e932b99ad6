from __future__ import annotations

import math

import numpy as np

from lmcache_lab.policies.sampled import ChunkInfo, ScoredPolicy

SEGMENT_EDGES = (2, 4, 16)        # new chunks of the request that last touched it: 1, 2-3, 4-15, 16+
CLASSES = 2 * 3 * 2 * (len(SEGMENT_EDGES) + 1)


def chunk_class(info: ChunkInfo) -> int:
    """(ends its request, uses so far 0/1/2+, request continued a cached prefix, bucket of the
    new segment of the request that last touched it)."""
    segment = sum(info.segment >= e for e in SEGMENT_EDGES)
    return ((info.tail * 3 + min(info.uses, 2)) * 2 + info.cont) * (len(SEGMENT_EDGES) + 1) + segment


def hit_density(hits: np.ndarray, evictions: np.ndarray, prior: float = 0.0) -> np.ndarray:
    """Hit density per (class, age bucket), LHD eq. (2):

        HD(a) = sum_{x>=a} hits(x) / sum_{x>=a} (x - a + 1) * (hits(x) + evictions(x))

    expected hits over expected remaining lifetime (in age buckets) of a chunk of age a. The last
    bucket holds every older event. Arrays are [classes, ages]. With `prior` > 0 each class is
    shrunk towards the all-class density by `prior` pseudo age-buckets of lifetime, so a class with
    few events reads as the average one rather than as 0 or 1."""
    rev = np.s_[..., ::-1]
    hits_above = np.cumsum(hits[rev], axis=-1)[rev]
    events_above = np.cumsum((hits + evictions)[rev], axis=-1)[rev]
    lifetime = np.cumsum(events_above[rev], axis=-1)[rev]
    overall = hits_above.sum(axis=0) / np.maximum(lifetime.sum(axis=0), 1e-12)
    return (hits_above + prior * overall) / np.maximum(lifetime + prior, 1e-12)


class HitDensityPolicy(ScoredPolicy):
    """Least hit density first (Beckmann, Chen & Cidon, "LHD: Improving Cache Hit Rate by
    Maximizing Hit Density", NSDI'18), with classes read from the prefix structure.

    A chunk's age is the requests since its last use (or store). For each class (`chunk_class`:
    request tail or not, uses so far, continuation or not, new-segment length bucket) the policy counts, per
    coarsened age, the uses (hits) and evictions it saw; every `reconfigure_every` requests it
    turns them into hit densities (`hit_density`, shrunk towards the all-class density with
    `prior` pseudo age-buckets of lifetime) and decays the counts by `decay` (an EWMA, as in the
    paper). The victim is the lowest density per byte among `samples` sampled leaves
    (`ScoredPolicy`): tail first by construction, O(samples) per eviction, O(classes * ages) per
    reconfiguration.

    Ages are coarsened into `ages` buckets of `granularity` requests; the granularity is fixed at
    the first eviction to `span` x (requests seen so far) / `ages`, so the buckets cover `span`
    cache lifetimes (the first eviction happens when the cache has filled once: about one
    lifetime). Before the first densities exist the oldest sampled leaf is evicted (LRU-like).
    """
    name = "lhd"

    def __init__(self, chunk_tokens: int = 256, samples: int = 32, seed: int = 0, ages: int = 128,
                 span: float = 4.0, reconfigure_every: int = 100, decay: float = 0.9, prior: float = 8.0,
                 **params):
        super().__init__(chunk_tokens, samples, seed, **params)
        if ages < 2 or span <= 0 or reconfigure_every < 1 or not 0 < decay <= 1 or prior < 0:
            raise ValueError(f"policy 'lhd': need ages >= 2, span > 0, reconfigure_every >= 1, 0 < decay <= 1, "
                             f"prior >= 0; got {ages}, {span}, {reconfigure_every}, {decay}, {prior}")
        self.ages, self.span, self.reconfigure_every = ages, span, reconfigure_every
        self.decay, self.prior = decay, prior
        self.granularity: int | None = None
        self._early: list[tuple[bool, int, int]] = []     # (hit, class, age) before the granularity is set
        self._hits = np.zeros((CLASSES, ages))
        self._evictions = np.zeros((CLASSES, ages))
        self.density: list[list[float]] | None = None

    def _bucket(self, age: int) -> int:
        b = age // self.granularity
        return b if b < self.ages else self.ages - 1

    def _event(self, hit: bool, cls: int, age: int) -> None:
        if self.granularity is None:
            self._early.append((hit, cls, age))
        else:
            (self._hits if hit else self._evictions)[cls, self._bucket(age)] += 1

    def _used(self, key, info, age):
        self._event(True, info.cls, age)

    def _touched(self, key, info):
        info.cls = chunk_class(info)

    def _stored(self, key, info):
        info.cls = chunk_class(info)

    def _evicted(self, key, info):
        if self.granularity is None:
            self.granularity = max(1, math.ceil(self.span * self.now / self.ages))
            early, self._early = self._early, []
            for hit, cls, age in early:
                self._event(hit, cls, age)
        self._event(False, info.cls, self.now - info.last)

    def _request_started(self):
        if self.granularity is not None and self.now % self.reconfigure_every == 0:
            self.reconfigure()

    def reconfigure(self) -> None:
        """Recompute the densities from the counts, then decay the counts."""
        self.density = hit_density(self._hits, self._evictions, self.prior).tolist()
        self._hits *= self.decay
        self._evictions *= self.decay

    def _score(self, info, now):
        if self.density is None:
            return info.last - now                 # oldest first until densities exist
        return self.density[info.cls][self._bucket(now - info.last)] / info.nbytes
