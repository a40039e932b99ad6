from __future__ import annotations

from collections import OrderedDict

from lmcache_lab.policies.sampled import ChunkInfo, ScoredPolicy

NEW = 100        # classes NEW + b: never used yet, b = bucket of the new segment that stored the chunk
SEGMENT_EDGES = (1, 3, 15, 63)   # new-segment buckets: 1, 2-3, 4-15, 16-63, 64+ chunks


def segment_bucket(n: int) -> int:
    """0 for a 1-chunk new segment, 1 for 2-3, 2 for 4-15, 3 for 16-63, 4 for 64+."""
    for b, edge in enumerate(SEGMENT_EDGES):
        if n <= edge:
            return b
    return len(SEGMENT_EDGES)


class ExposureRatePolicy(ScoredPolicy):
    """Reuse rate per unit of time, learned per class with censored exposure, counted per request.

    Class of a chunk: its uses so far, 1 .. `max_uses` (the last bucket holding the rest), or, for
    a chunk not used yet, NEW + the bucket of the new segment its request stored (1, 2-3, 4-15,
    16-63, 64+ chunks: on a document trace the length of a first request says whether the
    document comes back). Per class the policy estimates a Poisson rate of reuse,

        rate(c) = (reuses in c + prior * R) / (exposure in c + prior),
        R = (all reuses + 0.001) / (all exposure + 1)   (positive before any reuse)

    where a chunk is *exposed* in its class from the request that put it there until its next
    use, or until it is forgotten: after an eviction its key stays on a ghost list
    (`ghost_factor` x resident chunks + 64, keys only), and a store of a ghost key is a reuse of
    the class it left (the use the cache missed), while a key that falls off the ghost list closes
    its exposure with no reuse. Censoring is thus handled as in survival analysis: a chunk the
    policy evicted young still adds exposure, not a lost observation (LHD's hit density counts
    only ages a chunk lived in the cache, so a class evicted young never shows its later hits).
    Reuses and exposure of a chunk are weighted by 1 / the length of the request that last
    touched it: a request is the unit (one return of a 100-chunk document is one observation,
    not 100), so a class's rate is how often its requests come back. The victim is the lowest

        rate(class) * (tail_weight if the chunk ended its request) / (age + 1) ** age_exponent / bytes

    among `samples` sampled leaves (`ScoredPolicy`: seeded, leaves only, pins skipped); age in
    requests since the last use or store. A request's last chunk is usually a partial block that
    the next request of the same prompt does not ask for again, hence `tail_weight`.
    O(samples) per eviction, O(1) per touched chunk, rates recomputed once per request
    (O(classes)), memory O(resident + ghost keys).
    """
    name = "exposure_rate"

    def __init__(self, chunk_tokens: int = 256, samples: int = 64, seed: int = 0, max_uses: int = 2,
                 ghost_factor: float = 4.0, age_exponent: float = 0.5, tail_weight: float = 0.05,
                 prior: float = 10.0, **params):
        super().__init__(chunk_tokens, samples, seed, **params)
        if max_uses < 1 or ghost_factor < 0 or age_exponent < 0 or not 0 < tail_weight <= 1 or prior <= 0:
            raise ValueError(f"policy 'exposure_rate': need max_uses >= 1, ghost_factor >= 0, age_exponent >= 0, "
                             f"0 < tail_weight <= 1, prior > 0; got {max_uses}, {ghost_factor}, {age_exponent}, "
                             f"{tail_weight}, {prior}")
        self.max_uses, self.ghost_factor, self.age_exponent = max_uses, ghost_factor, age_exponent
        self.tail_weight, self.prior = tail_weight, prior
        # class -> [weighted reuses, closed weighted exposure, open weight, open weight * start]
        self.stats: dict[int, list[float]] = {}
        self._ghost: OrderedDict = OrderedDict()      # evicted key -> (class, start, uses, weight)
        self._rates: dict[int, float] = {}
        self._overall = 1e-3
        self._rates_at = -1

    # ---- classes and rates ------------------------------------------------------------------------
    def chunk_class(self, info: ChunkInfo) -> int:
        if info.uses:
            return min(info.uses, self.max_uses)
        return NEW + segment_bucket(info.segment)

    def exposure(self, cls: int, now: int | None = None) -> float:
        """Weighted exposure of a class up to `now` (closed episodes and the open ones)."""
        s = self.stats.get(cls)
        if s is None:
            return 0.0
        now = self.now if now is None else now
        return s[1] + s[2] * now - s[3]

    def rates(self) -> dict[int, float]:
        """rate(class) for every class seen, as of the current request."""
        now = self.now
        if self._rates_at != now:
            raw, reuses, exposure = {}, 0.0, 0.0
            for cls, s in self.stats.items():
                x = s[1] + s[2] * now - s[3]
                raw[cls] = (s[0], x)
                reuses += s[0]
                exposure += x
            # kept positive before any reuse, so that recency still orders the victims
            overall = self._overall = (reuses + 1e-3) / (exposure + 1.0)
            m = self.prior
            self._rates = {cls: (e + m * overall) / (x + m) for cls, (e, x) in raw.items()}
            self._rates_at = now
        return self._rates

    def rate(self, cls: int) -> float:
        r = self.rates()
        return r[cls] if cls in r else self._overall

    # ---- exposure episodes ------------------------------------------------------------------------
    def _open_episode(self, cls: int, start: int, weight: float) -> None:
        s = self.stats.get(cls)
        if s is None:
            s = self.stats[cls] = [0.0, 0.0, 0.0, 0.0]
        s[2] += weight
        s[3] += weight * start

    def _drop_episode(self, cls: int, start: int, weight: float) -> list[float]:
        s = self.stats[cls]
        s[2] -= weight
        s[3] -= weight * start
        return s

    def _close_episode(self, cls: int, start: int, weight: float, reused: bool) -> None:
        s = self._drop_episode(cls, start, weight)
        s[1] += weight * (self.now - start)
        if reused:
            s[0] += weight

    # ---- hooks --------------------------------------------------------------------------------------
    def _stored(self, key, info):
        g = self._ghost.pop(key, None) if self._ghost else None
        if g is not None:                 # stored again after an eviction: a reuse the cache missed
            cls, start, uses, weight = g
            self._close_episode(cls, start, weight, True)
            info.uses = uses + 1
        info.cls = self.chunk_class(info)  # until the request's touch says more
        info.cache = (self.now, 1.0)       # (start of the open exposure, its weight)
        self._open_episode(info.cls, self.now, 1.0)

    def _used(self, key, info, age):
        start, weight = info.cache
        self._close_episode(info.cls, start, weight, True)
        info.cache = None

    def _touched(self, key, info):
        cls, weight = self.chunk_class(info), 1.0 / info.length
        if info.cache is None:             # used by this request: a new episode starts now
            info.cache = (self.now, weight)
            self._open_episode(cls, self.now, weight)
        else:                              # stored by this request, or its second touch: same episode
            start, old = info.cache
            if cls != info.cls or old != weight:
                self._drop_episode(info.cls, start, old)
                self._open_episode(cls, start, weight)
                info.cache = (start, weight)
        info.cls = cls

    def _evicted(self, key, info):
        start, weight = info.cache
        if not self.ghost_factor:
            self._close_episode(info.cls, start, weight, False)
            return
        ghost = self._ghost
        ghost[key] = (info.cls, start, info.uses, weight)
        limit = self.ghost_factor * len(self.info) + 64
        while len(ghost) > limit:
            _, (cls, start, _, weight) = ghost.popitem(last=False)
            self._close_episode(cls, start, weight, False)

    def _score(self, info, now):
        r = self.rate(info.cls)
        if info.tail:
            r *= self.tail_weight
        return r / (now - info.last + 1) ** self.age_exponent / info.nbytes
