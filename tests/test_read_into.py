"""Chunk files read straight into place: `DiskTier.get_into`, `wire.verify_into`, and the tiered
store / engine path that uses them (`TieredStore.get_chain(into=...)`).

A value read into the caller's buffers is checked exactly as a decoded one is (checksum, MAC,
key) and also against the tensors the caller expects; whatever fails is a counted miss and, for
a damaged file, removed, as `get` does.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from lmcache_lab import wire
from lmcache_lab.engine import CacheEngine
from lmcache_lab.policies import make_policy
from lmcache_lab.tiers import DiskTier, MemoryTier
from lmcache_lab.tiers.disk import preadv_fully
from lmcache_lab.tiers.tiered import InPlace

SHAPE = (3, 2, 40)          # [L, nb, R] of a block-native chunk
LAYOUT = (("kv", "float32", SHAPE),)
MAC = wire.mac_key(b"a store secret")


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def chunk(i: int) -> torch.Tensor:
    return torch.arange(np.prod(SHAPE), dtype=torch.float32).reshape(SHAPE) + 1000 * i


def tier(path, mac: bytes | None = None) -> DiskTier:
    t = DiskTier(path, 1 << 30, make_policy("lru"))
    t.mac_key = mac
    return t


def buffers(sizes: list[int]) -> tuple[torch.Tensor, list[memoryview]]:
    """One destination of sum(sizes) bytes, cut into consecutive views of those sizes."""
    dest = torch.full((sum(sizes),), 0xAA, dtype=torch.uint8)
    mv, views, at = memoryview(dest.numpy()), [], 0
    for n in sizes:
        views.append(mv[at:at + n])
        at += n
    return dest, views


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("mac", [None, MAC], ids=["no-secret", "secret"])
@pytest.mark.parametrize("cuts", [[960], [160] * 6, [7, 953], [1] * 960],
                         ids=["one", "six", "odd", "bytes"])
def test_a_chunk_file_read_into_buffers_is_the_stored_bytes(tmp_path, mac, cuts):
    t = tier(tmp_path, mac)
    assert t.put(key(1), {"kv": chunk(1)}, parent=key(0))
    dest, views = buffers(cuts)
    size = t.get_into(key(1), views, LAYOUT)
    assert size == os.path.getsize(t._path(key(1)))
    assert torch.equal(dest, as_bytes(chunk(1)))
    assert (t.stats.hits, t.stats.misses, t.stats.bytes_read) == (1, 0, size)


def test_preadv_fully_fills_more_buffers_than_one_call_takes(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(data)
    dest, views = buffers([1] * 2500 + [3] * 500 + [999])          # 3001 buffers > IOV_MAX
    fd = os.open(path, os.O_RDONLY)
    try:
        assert preadv_fully(fd, views, 1) == 4999
        assert bytes(dest.numpy()) == data[1:]
        dest2, views2 = buffers([4000, 2000])                      # the file ends first
        assert preadv_fully(fd, views2, 0) == 5000
    finally:
        os.close(fd)


def damage(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x55]))


@pytest.mark.parametrize("fault", ["payload", "header", "truncated", "grown", "other-key",
                                   "other-secret", "no-secret", "wrong-layout"])
def test_a_bad_file_is_a_counted_miss_and_is_removed(tmp_path, fault):
    t = tier(tmp_path, MAC)
    layout = LAYOUT
    writer = tier(tmp_path, wire.mac_key(b"another") if fault == "other-secret" else
                  None if fault == "no-secret" else MAC)
    if fault == "other-key":       # a valid value of key 2, found under key 1's name
        writer.put(key(2), {"kv": chunk(2)})
        os.makedirs(os.path.dirname(t._path(key(1))), exist_ok=True)
        os.replace(writer._path(key(2)), t._path(key(1)))
    else:
        writer.put(key(1), {"kv": chunk(1)})
    path = t._path(key(1))
    size = os.path.getsize(path)
    if fault == "payload":
        damage(path, size - 5)
    elif fault == "header":
        damage(path, wire.PREFIX_SIZE + 3)
    elif fault == "truncated":
        os.truncate(path, size - 4)
    elif fault == "grown":
        with open(path, "ab") as f:
            f.write(b"\0" * 4)
    elif fault == "wrong-layout":  # same bytes, another shape: not what the caller expects
        layout = (("kv", "float32", (2, 3, 40)),)
    dest, views = buffers([960])
    assert t.get_into(key(1), views, layout) == 0
    assert (t.stats.hits, t.stats.misses, t.stats.corrupt) == (0, 1, 1)
    assert not os.path.exists(path), "a file that failed verification is removed"


def test_buffers_that_do_not_fit_the_layout_are_the_callers_error(tmp_path):
    t = tier(tmp_path)
    t.put(key(1), {"kv": chunk(1)})
    dest, views = buffers([959])
    with pytest.raises(ValueError, match="buffers of 959 bytes"):
        t.get_into(key(1), views, LAYOUT)
    assert os.path.exists(t._path(key(1))) and t.stats.corrupt == 0


def test_an_absent_file_is_a_plain_miss(tmp_path):
    t = tier(tmp_path)
    dest, views = buffers([960])
    assert t.get_into(key(9), views, LAYOUT) == 0
    assert (t.stats.misses, t.stats.corrupt, t.stats.errors) == (1, 0, 0)


def test_the_tiered_store_reads_disk_chunks_into_place_and_keeps_memory_hits(tmp_path):
    """A chunk in the memory tier comes back as its tensor; the disk tier's chunks land in the
    caller's buffers (`InPlace`), in chain order up to its first miss, and are not promoted."""
    mem = MemoryTier(1 << 30, make_policy("lru"))
    disk = tier(tmp_path / "disk")
    engine = CacheEngine({"chunk_size": 16}, tiers=[mem, disk])
    keys = [key(i) for i in range(4)]
    mem.put(keys[0], {"kv": chunk(0)})
    for i in range(3):
        disk.put(keys[i], {"kv": chunk(i)}, keys[i - 1] if i else None, i * 16)
    dests = {i: buffers([960]) for i in range(4)}
    got = engine.retrieve_keyed(keys, 0, into=lambda i: (dests[i][1], LAYOUT))
    assert len(got) == 3 and torch.equal(got[0], chunk(0)) and got[1] is None and got[2] is None
    for i in (1, 2):
        assert torch.equal(dests[i][0], as_bytes(chunk(i)))
    assert not mem.contains(keys[1]) and not mem.contains(keys[2])
    assert engine.stats.load_failures == 1      # chunk 3 was asked for and is nowhere
    assert engine.stats.retrieved_chunks == 3

    values = engine.store_.get_chain(keys[1:3], keys[0], 16, 16,
                                     into=lambda i: (dests[i + 1][1], LAYOUT))
    assert [type(v) for v in values] == [InPlace, InPlace]


def test_reads_into_place_need_the_lossless_codec(tmp_path):
    engine = CacheEngine({"chunk_size": 16, "codec": "int8"}, tiers=[tier(tmp_path)])
    with pytest.raises(ValueError, match="codec 'none'"):
        engine.retrieve_keyed([key(0)], into=lambda i: ([], LAYOUT))


def test_the_connector_reads_partial_and_tail_chunks_into_the_engines_blocks(tmp_path):
    """The vLLM connector's load path with a disk tier only, on a CPU cache laid out as vLLM's
    CPU backend lays it out: a load that starts inside a tail chunk, then one that ends inside a
    full chunk, each read straight into the blocks (blocks outside the load into scratch). The
    loaded blocks equal the source's, the others stay untouched, nothing is counted corrupt."""
    from lmcache_lab.config import load_config
    from lmcache_lab.integrations.vllm import LMCacheLabConnector
    from lmcache_lab.integrations.vllm_cache import WorkerCache
    from lmcache_lab.integrations.vllm_plan import LoadSpec, slot_mapping
    from lmcache_lab.kernels.blocks import BlockCache, gather_blocks
    from lmcache_lab.kernels.layout import KVLayout
    from lmcache_lab.keys import Namespace

    cs, bs, layers = 16, 4, 2
    layout = KVLayout.vllm_cpu(layers, 16, bs, 1, 8)
    source = [torch.randn(16, 1, bs, 16) for _ in range(layers)]       # [B, H, bs, 2*D]
    config = load_config({"chunk_size": cs, "tiers": {"cpu": {"capacity_bytes": 0},
                                                      "disk": {"path": str(tmp_path)}}})
    cache = WorkerCache(CacheEngine(config, namespace=Namespace(model="m")), tail_block=bs)
    history = np.arange(100, 128)                                      # chunk 0 + 3-block tail
    cache.answer("a", history, 0, 0)
    keys = cache.keys["a"]
    cache.write(keys, 0, gather_blocks(source, layout, torch.arange(0, 4)))
    cache.write(cache.tail_chain("a", 1, 3), 1, gather_blocks(source, layout, torch.arange(4, 7)),
                tokens=3 * bs)
    cache.flush()

    conn = object.__new__(LMCacheLabConnector)
    engine = [torch.zeros_like(t) for t in source]
    conn.config, conn.block_size, conn._cache = config, bs, cache
    conn._layers, conn._layout = engine, layout
    conn._blocks, conn._reads_into = BlockCache(engine, layout), True
    conn._scratch = threading.local()
    blocks = np.arange(16, dtype=np.int64)                             # request "b": same ids

    def load(prompt, start, end):
        cache.answer("b", prompt, 4, start // cs)
        return conn._load(LoadSpec("b", start, end, slot_mapping(blocks, bs, start, end)))

    # 1. the tail chunk (3 blocks) loaded from its 2nd block on: its 1st block goes to scratch
    assert load(np.concatenate([history, np.arange(900, 940)]), 20, 28) == set()   # nothing invalid
    # 2. a full chunk loaded up to its 1st block only: its last blocks go to scratch
    assert load(np.concatenate([history, np.arange(900, 940)]), 0, 4) == set()
    assert cache.engine.tiers[0].stats.corrupt == 0
    for e, s in zip(engine, source):
        assert torch.equal(e[[0, 5, 6]], s[[0, 5, 6]])                 # the loaded blocks
        assert not e[[1, 2, 3, 4, 7]].any()                            # the others untouched
    assert cache.counters["loaded_tokens"] == 8 + 4

    # 3. a load from inside chunk 0 to inside the tail chunk: both have blocks outside it
    assert load(np.concatenate([history, np.arange(900, 940)]), 12, 20) == set()
    assert cache.engine.tiers[0].stats.corrupt == 0
    for e, s in zip(engine, source):
        assert torch.equal(e[[3, 4]], s[[3, 4]])
    cache.close()
