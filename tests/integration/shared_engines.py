"""What every shared tier (Redis, S3) must do, as checks both suites call."""
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


def check_tail_chunks_share_the_tier(make_tier, full: dict[str, torch.Tensor], key) -> None:
    """A tail chunk (a prompt's whole blocks past its last full chunk: the same tensors, shorter
    along one axis) lives in a shared tier beside full chunks. Written first, it does not lock
    this instance's full chunks out; an instance that knows the full layout (`expect_layout`, as
    the connector sets it) reads both and refuses anything wider.
    `full`: one full chunk's tensors, its third axis the one tails shorten."""
    tail = {name: t[:, :, :t.shape[2] // 2].contiguous() for name, t in full.items()}
    wide = {name: torch.cat([t, t], dim=2) for name, t in full.items()}
    writer, other, knows = make_tier(), make_tier(), make_tier()
    try:
        assert writer.put(key(0), tail) and writer.put(key(1), full)     # a tail first, then a full chunk
        assert other.put(key(2), tail)
        knows.expect_layout(full)
        for k, value in ((key(0), tail), (key(1), full), (key(2), tail)):
            got = knows.get(k)
            assert got is not None and all(torch.equal(got[n], value[n]) for n in value)
        assert not knows.put(key(3), wide) and not knows.contains(key(3))   # wider than a chunk
        assert writer.put(key(4), wide)           # this writer knows no full layout: it learns
        assert knows.get(key(4)) is None and knows.stats.corrupt == 1     # refused, deleted
        assert not writer.contains(key(4))
    finally:
        for t in (writer, other, knows):
            t.close()
