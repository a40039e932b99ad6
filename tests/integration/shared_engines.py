"""What every shared tier (Redis, S3) must do for two engines, as one check both suites call."""
from __future__ import annotations

import torch

from lmcache_lab.engine import CacheEngine


def check_a_fresh_engine_loads_what_another_stored(config: dict, kv: list[torch.Tensor]) -> list[int]:
    """A writer engine stores `kv` (one tensor per chunk) as the full chunks of a prompt; a second
    engine with an empty memory tier finds them in the shared tier (the config's last), loads
    equal tensors, and serves a repeat from its memory tier (promoted). Returns the prompt."""
    cs = config["chunk_size"]
    tokens = list(range(1000, 1000 + cs * len(kv) + 5))
    writer, reader = CacheEngine(config), CacheEngine(config)
    try:
        assert writer.store(tokens, kv) == len(kv)
        assert reader.lookup(tokens) == cs * len(kv)
        got = reader.retrieve(tokens)
        assert len(got) == len(kv) and all(torch.equal(g, k) for g, k in zip(got, kv))
        assert reader.tiers[-1].stats.hits == len(kv)
        reader.retrieve(tokens)   # now served by the reader's memory tier (promoted)
        assert reader.tiers[-1].stats.hits == len(kv) and reader.tiers[0].stats.hits == len(kv)
    finally:
        writer.close()
        reader.close()
    return tokens
