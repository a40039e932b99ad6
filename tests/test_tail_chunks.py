"""Tail chunks: a prompt's whole blocks past its last full chunk, stored and served like a chunk
(`tail_blocks`), so a connector hit ends where the engine's own prefix cache would.

Planner (scheduler side) and WorkerCache (worker side) without an engine; the vLLM end-to-end
tests run the same path inside a real engine (tests/e2e/test_vllm_serving.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcache_lab.engine import CacheEngine
from lmcache_lab.integrations.vllm_cache import LookupClient, WorkerCache, socket_path
from lmcache_lab.integrations.vllm_plan import Planner, servable_tokens, slot_mapping
from lmcache_lab.keys import ChunkKeyer, Namespace

CS, BS = 16, 4          # a chunk of four 4-token blocks


def chunk(value: float, n: int = CS) -> torch.Tensor:
    return torch.full((2, 1, n, 2), value)


def make_cache(chunk_size: int = CS) -> WorkerCache:
    eng = CacheEngine({"chunk_size": chunk_size, "tiers": {"cpu": {"capacity_bytes": 10**6}}},
                      namespace=Namespace(model="m"))
    return WorkerCache(eng, tail_block=BS)


def store_prompt(cache: WorkerCache, rid: str, tokens: np.ndarray) -> int:
    """What the connector stores for a computed prompt: its full chunks and its tail chunk.
    Returns the tail's blocks."""
    cache.answer(rid, tokens, 0, 0)
    keys, missing = cache.missing(rid, 0, len(tokens) // CS)
    for i in missing:
        cache.write(keys, i, chunk(i))
    n = len(tokens) // CS
    blocks = (len(tokens) - n * CS) // BS
    chain = cache.tail_chain(rid, n, blocks) if blocks else None
    if chain is not None:
        cache.write(chain, n, chunk(100 + blocks, blocks * BS), tokens=blocks * BS)
    cache.forget(rid)
    return blocks


class FakeLookup:
    def __init__(self, chunks: int, tail: int):
        self.answer = (chunks, tail)

    def __call__(self, req_id, prompt, max_chunks, skip, identity=()):
        return min(self.answer[0], max_chunks), self.answer[1]


# ------------------------------------------------------------------------------ planner
@pytest.mark.parametrize("n", [0, 1, 4, 5, 16, 17, 29, 32, 33])
def test_with_tails_every_whole_block_before_the_last_token_is_servable(n):
    assert servable_tokens(n, CS, BS, tails=True) == max(0, n - 1) // BS * BS
    assert servable_tokens(n, CS, BS, tails=True) >= servable_tokens(n, CS, BS)


def test_a_tail_hit_extends_the_hit_and_its_load_by_whole_blocks():
    p = Planner(CS, BS, FakeLookup(1, 2), tails=True)
    prompt = list(range(30))                  # chunk 0, then 14 tokens: 3 whole blocks
    assert p.match("r", prompt, 0) == (24, 24)
    p.allocated("r", 24)
    plan = p.step([("r", list(range(8)), 24)], [], {"r": 6})
    (load,) = plan.loads
    assert (load.start, load.end) == (0, 24)
    # the prompt's own tail (3 blocks) is longer than the 2 it hit: stored as a new tail chunk
    (tail,) = plan.stores
    assert (tail.first_chunk, tail.last_chunk, tail.tail_blocks) == (1, 1, 3)
    assert tail.slots.tolist() == slot_mapping(np.arange(8), BS, 16, 28).tolist()


def test_the_tail_store_is_planned_once_when_the_prompt_is_computed():
    p = Planner(CS, BS, FakeLookup(0, 0), tails=True)
    p.match("r", list(range(38)), 0)          # 2 chunks + 6 tokens: a 1-block tail
    p.allocated("r", 0)
    plan = p.step([("r", list(range(10)), 0)], [], {"r": 20})          # chunked prefill
    assert [(s.first_chunk, s.last_chunk, s.tail_blocks) for s in plan.stores] == [(0, 1, 0)]
    plan = p.step([], [("r", None, False, 20)], {"r": 18})             # the prompt completes
    assert [(s.first_chunk, s.last_chunk, s.tail_blocks) for s in plan.stores] == [(1, 2, 0), (2, 2, 1)]
    assert plan.stores[1].slots.tolist() == slot_mapping(np.arange(10), BS, 32, 36).tolist()
    plan = p.step([], [("r", None, False, 38)], {"r": 1})              # decoding
    assert not plan.stores
    # preempted and recomputed from token 20: the tail is planned again with the chunks
    plan = p.step([], [("r", list(range(20, 30)), True, 20)], {"r": 18})
    assert [(s.first_chunk, s.last_chunk, s.tail_blocks) for s in plan.stores] == [(1, 2, 0), (2, 2, 1)]


def test_a_tail_that_was_hit_is_not_stored_again_and_no_tail_without_tails():
    p = Planner(CS, BS, FakeLookup(2, 1), tails=True)
    assert p.match("r", list(range(38)), 0) == (36, 36)
    p.allocated("r", 36)
    assert not p.step([("r", list(range(10)), 36)], [], {"r": 2}).stores
    off = Planner(CS, BS, FakeLookup(2, 1))          # tails off: the answer's tail is ignored
    assert off.match("r", list(range(38)), 0) == (32, 32)
    off.allocated("r", 0)
    plan = off.step([("r", list(range(10)), 0)], [], {"r": 38})
    assert [s.tail_blocks for s in plan.stores] == [0]


# ------------------------------------------------------------------------------ worker cache
def test_a_later_prompt_that_extends_a_stored_one_hits_its_tail():
    cache = make_cache()
    history = np.arange(1000, 1030)                       # chunk 0 + 14 tokens: 3-block tail
    assert store_prompt(cache, "turn1", history) == 3
    turn2 = np.concatenate([history, np.arange(5000, 5040)])
    hit, tail = cache.answer("turn2", turn2, 4, 0)[:2]
    assert (hit, tail) == (1, 3)
    assert len(cache.pins["turn2"]) == 2 and cache.engine.store_.pinned() == 2   # chunk 0 + tail
    assert cache.tail_at("turn2") == (1, 3)
    chunks = cache.read("turn2", 0, 2)
    assert torch.equal(chunks[0], chunk(0)) and torch.equal(chunks[1], chunk(103, 12))
    assert cache.engine.store_.pinned() == 0              # read released the pins
    # a prompt that differs inside the tail's blocks gets the blocks before the difference only
    other = turn2.copy()
    other[16 + 5] += 1                                    # in the tail's second block
    cache.write(*_tail(cache, "turn1b", history, 1))      # a 1-block tail of the history
    assert cache.answer("other", other, 4, 0)[:2] == (1, 1)
    cache.release("other")


def _tail(cache: WorkerCache, rid: str, tokens: np.ndarray, blocks: int):
    cache.answer(rid, tokens, 0, 0)
    return cache.tail_chain(rid, 1, blocks), 1, chunk(100 + blocks, blocks * BS)


def test_the_longest_tail_wins_and_a_tail_never_reaches_the_last_token():
    cache = make_cache()
    history = np.arange(30)
    for blocks in (1, 3):
        chain, index, value = _tail(cache, f"h{blocks}", history, blocks)
        cache.write(chain, index, value, tokens=blocks * BS)
    assert cache.answer("long", np.arange(40), 4, 0)[:2] == (0, 0)   # chunk 0 was never stored
    keys = cache.engine.chunk_keys(history)
    cache.engine.store_keyed(keys, [chunk(0)], 0)
    assert cache.answer("a", np.arange(40), 4, 0)[:2] == (1, 3)
    # 16 + 9 tokens: whole blocks before the last token are 2, so the 3-block tail cannot serve
    assert cache.answer("b", np.arange(25), 4, 0)[:2] == (1, 1)
    # a tail belongs to its chain: the same tokens after another first chunk do not hit it
    assert cache.answer("c", np.concatenate([np.arange(1, 17), np.arange(16, 30)]), 4, 0)[:2] == (0, 0)
    for rid in ("a", "b"):
        cache.release(rid)
    assert cache.engine.store_.pinned() == 0


def test_a_present_tail_is_not_written_again():
    cache = make_cache()
    history = np.arange(30)
    store_prompt(cache, "a", history)
    cache.answer("b", history, 0, 0)
    assert cache.tail_chain("b", 1, 3) is None and cache.tail_chain("b", 1, 2) is not None


def test_tail_keys_are_keyed_like_chunks_of_their_tokens():
    keyer = ChunkKeyer(Namespace(model="m"), CS)
    keys = keyer.keys(np.arange(32))
    assert keyer.tail_key(keys[0], np.arange(16, 24)) not in keys
    assert keyer.tail_key(keys[0], np.arange(16, 24)) != keyer.tail_key(keys[0], np.arange(16, 28))
    with pytest.raises(ValueError, match="tail"):
        keyer.tail_key(keys[0], np.arange(16, 32))      # a whole chunk is not a tail


def test_tensor_ranks_agree_on_a_tail_only_where_their_chunks_end_together(tmp_path):
    """Rank 0 holds chunk 0 and a tail after it; rank 1 holds chunks 0 and 1: a tail at chunk 1
    would be rank 1's full chunk, another value, so the answer is chunk 0 and no tail."""
    ranks = [make_cache(), make_cache()]
    history, longer = np.arange(30), np.arange(40)
    store_prompt(ranks[0], "a", history)
    store_prompt(ranks[1], "a", longer)
    store_prompt(ranks[1], "b", history)      # rank 1 also holds history's tail
    paths = [socket_path("tails-unit", r) for r in range(2)]
    for cache, path in zip(ranks, paths):
        cache.serve(path, b"k")
    client = LookupClient(paths, b"k", connect_timeout_s=5)
    try:
        assert ranks[0].answer("x", longer, 4, 0)[:2] == (1, 3)
        assert ranks[1].answer("x", longer, 4, 0)[:2] == (2, 0)
        assert client.lookup("r", longer.tolist(), 4, 0) == (1, 0)
        assert client.lookup("s", history.tolist(), 4, 0) == (1, 3)        # both: chunk 0 + tail
    finally:
        client.close()
        for cache in ranks:
            cache.close()
