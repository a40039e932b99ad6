from __future__ import annotations

from collections import OrderedDict

from lmcache_lab.policies.sampled import ChunkInfo, ScoredPolicy

TAIL = -1      # class of a chunk that ended the request that last touched it


class ReuseRatePolicy(ScoredPolicy):
    """Learned reuse rate over age, request tails first.

    A chunk's class is how often it was used before (`uses` so far, 0 .. `max_uses`, the last
    bucket holding the rest), or TAIL if it ended the request that last touched it: the partial
    last block of a prompt, which the next turn of the same conversation does not reuse (its
    block id changes once the prompt grows). Per class the policy learns online

        reuse(c) = (uses of chunks of class c + 1) / (times a chunk entered class c + 2)

    where a use is a request hitting the chunk, or storing it again after it was evicted: a
    ghost list (`ghost_factor` x resident chunks + 64, keys only) remembers what was evicted and from
    which class, so the estimate is not only about what the policy chose to keep. The victim is
    the lowest

        reuse(class) / (age + 1) ** age_exponent / bytes

    among `samples` sampled leaves (`ScoredPolicy`: seeded, leaves only, pins skipped). `age` is
    in requests since the chunk's last use or store. It is hyperbolic caching (Blankstein et al.,
    ATC'17) with the per-chunk use count replaced by a reuse rate learned per class: request
    tails, which the prefix structure makes almost never reused on a conversation trace (about 1
    in 100), learn a rate near 0 and leave first, but only because the trace says so (a trace of
    block-aligned prompts would teach the opposite). Counting: a chunk enters a class once per
    request that touches it (the store and the touch after it are one request).

    O(samples) per eviction, O(1) per touched chunk, memory O(resident + ghost keys).
    """
    name = "reuse_rate"

    def __init__(self, chunk_tokens: int = 256, samples: int = 64, seed: int = 0, max_uses: int = 4,
                 ghost_factor: float = 2.0, age_exponent: float = 1.0, **params):
        super().__init__(chunk_tokens, samples, seed, **params)
        if max_uses < 0 or ghost_factor < 0 or age_exponent <= 0:
            raise ValueError(f"policy 'reuse_rate': need max_uses >= 0, ghost_factor >= 0, age_exponent > 0; "
                             f"got {max_uses}, {ghost_factor}, {age_exponent}")
        self.max_uses, self.ghost_factor, self.age_exponent = max_uses, ghost_factor, age_exponent
        self.stats: dict[int, list[float]] = {}       # class -> [uses + 1, entries + 2]
        self._ghost: OrderedDict = OrderedDict()      # evicted key -> (class, uses), oldest first

    def chunk_class(self, info: ChunkInfo) -> int:
        return TAIL if info.tail else min(info.uses, self.max_uses)

    def reuse(self, cls: int) -> float:
        """The learned reuse rate of a class (1/2 before any evidence)."""
        s = self.stats.get(cls)
        return s[0] / s[1] if s else 0.5

    def _credit(self, cls: int) -> None:
        s = self.stats.get(cls)
        if s is not None:
            s[0] += 1

    def _stored(self, key, info):
        g = self._ghost.pop(key, None) if self._ghost else None
        if g is not None:                 # stored again after an eviction: a use that was missed
            self._credit(g[0])
            info.uses = g[1] + 1
        info.cls = min(info.uses, self.max_uses)   # until the request's touch says more
        info.cache = None

    def _used(self, key, info, age):
        self._credit(info.cls)

    def _touched(self, key, info):
        cls = self.chunk_class(info)
        if info.cache != self.now:        # first touch by this request: the chunk enters a class
            info.cache = self.now
            s = self.stats.get(cls)
            if s is None:
                s = self.stats[cls] = [1.0, 2.0]
            s[1] += 1
        elif cls != info.cls:             # second touch of the same request (after its store)
            s = self.stats.get(cls)
            if s is None:
                s = self.stats[cls] = [1.0, 2.0]
            s[1] += 1
            self.stats[info.cls][1] -= 1
        info.cls = cls

    def _evicted(self, key, info):
        if not self.ghost_factor:
            return
        ghost = self._ghost
        ghost[key] = (info.cls, info.uses)
        limit = self.ghost_factor * len(self.info) + 64
        while len(ghost) > limit:
            ghost.popitem(last=False)

    def _score(self, info, now):
        return self.reuse(info.cls) / (now - info.last + 1) ** self.age_exponent / info.nbytes
