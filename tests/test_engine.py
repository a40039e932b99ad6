import pytest
import torch

from lmcache_lab import CacheEngine, Namespace


def chunks_for(tokens, chunk_size, start=0):
    """Deterministic stand-in KV: chunk i filled with the sum of its tokens."""
    n = len(tokens) // chunk_size
    return [torch.full((2, 3, chunk_size, 4), float(sum(tokens[i * chunk_size:(i + 1) * chunk_size])))
            for i in range(start, n)]


@pytest.fixture
def engine(tmp_path):
    return CacheEngine({"chunk_size": 4, "tiers": {"cpu": {"capacity_bytes": "1MiB"},
                                                   "disk": {"path": str(tmp_path / "d")}}},
                       Namespace(model="test"))


def test_store_lookup_retrieve_round_trip(engine):
    toks = list(range(10))                     # 2 full chunks + a partial one
    assert engine.lookup(toks) == 0
    assert engine.store(toks, chunks_for(toks, 4)) == 2
    assert engine.lookup(toks) == 8            # partial chunk never stored
    got = engine.retrieve(toks)
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, chunks_for(toks, 4)))
    assert engine.lookup(toks[:7]) == 4        # a shorter prompt hits its own full chunks
    assert engine.store(toks, chunks_for(toks, 4)) == 0   # already present: only touched


def test_divergent_suffix_hits_shared_prefix_only(engine):
    a = list(range(12))
    engine.store(a, chunks_for(a, 4))
    b = a[:6] + [99] * 6
    assert engine.lookup(b) == 4


def test_store_with_start_and_bounds(engine):
    toks = list(range(12))
    engine.store(toks, chunks_for(toks, 4)[:1])
    assert engine.store(toks, chunks_for(toks, 4, start=1), start=1) == 2
    assert engine.lookup(toks) == 12
    with pytest.raises(ValueError, match="exceed"):
        engine.store(toks, chunks_for(toks, 4), start=1)


def test_vanished_chunk_is_a_counted_load_failure(engine):
    toks = list(range(12))
    engine.store(toks, chunks_for(toks, 4))
    keys = engine.chunk_keys(toks)
    for tier in engine.tiers:                  # chunk 1 disappears from every tier after lookup
        tier._file(keys[1]).write_bytes(b"junk") if hasattr(tier, "_file") else tier.delete(keys[1])
    assert engine.lookup(toks) == 12           # the damaged disk file is still there
    got = engine.retrieve(toks, num_tokens=12)
    assert len(got) == 1 and engine.stats.load_failures == 1
    assert engine.lookup(toks) == 4            # the corrupt file was dropped


def test_pins_protect_chunks_between_lookup_and_load():
    eng = CacheEngine({"chunk_size": 4, "tiers": {"cpu": {"capacity_bytes": 2 * 384}}}, Namespace("t"))
    a, b = list(range(8)), list(range(100, 108))
    eng.store(a, chunks_for(a, 4)[:1])
    keys = eng.pin(a, 4)
    eng.store(b, chunks_for(b, 4))             # needs room for 2 x 384 bytes, but a's chunk is pinned
    assert eng.lookup(b) == 4
    assert eng.lookup(a) == 4
    eng.unpin(keys)


def test_namespace_codec_must_match_config():
    with pytest.raises(ValueError, match="codec"):
        CacheEngine({"codec": "none"}, Namespace("m", codec="int8"))
