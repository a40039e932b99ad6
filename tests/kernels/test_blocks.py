"""Block-native chunks (`kernels/blocks.py`) against caches allocated and written by vLLM itself.

For every backend x layout x dtype of the layout matrix (tests/kernels/test_vllm_layouts.py:
vLLM's own allocation, its own write ops), block records gathered from a vLLM-written cache and
scattered into a fresh allocation at other block ids give, read back token by token through the
derived layout (itself checked against vLLM there), exactly the values vLLM wrote. A record
format that missed or misplaced one element of a block fails here.
"""
from __future__ import annotations

import pytest
import torch

from lmcache_lab.kernels.blocks import (MAX_SPANS, BlockRecords, block_buffers, block_records, gather_blocks,
                                        gather_blocks_reference, scatter_blocks)
from lmcache_lab.kernels.layout import AxisStrides, KVLayout
from lmcache_lab.kernels.paged import gather

from test_vllm_layouts import (MATRIX, _cuda_copy_ops_on_cpu, allocate,  # noqa: F401 (autouse)
                               bits, derive, vllm_write)


def block_slots(ids: list[int], bs: int) -> torch.Tensor:
    """Every slot of blocks `ids`, block by block."""
    return torch.tensor([b * bs + o for b in ids for o in range(bs)], dtype=torch.int64)


@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_block_records_move_whole_blocks_as_vllm_wrote_them(case):
    kv, spec, layout = allocate(case)
    first = next(iter(kv.values()))
    vllm_write(case, kv, torch.randperm(first.shape[0] * first.shape[2],
                                        generator=torch.Generator().manual_seed(0)))
    derived = derive(case, kv, spec, layout)
    records = block_records(derived)
    assert records is not None, f"{case}: no dense block records"
    # a block's K and V elements, nothing else, once each
    assert records.record == derived.num_kv * derived.block_size * derived.hidden

    src, dst = [2, 0], [1, 2]
    layers = list(kv.values())
    chunk = gather_blocks(layers, derived, torch.tensor(src))
    assert chunk.shape == (case.layers, 2, records.record)
    assert torch.equal(bits(chunk), bits(gather_blocks_reference(layers, derived, torch.tensor(src))))

    fresh, _, _ = allocate(case)
    scatter_blocks(chunk, list(fresh.values()), derived, torch.tensor(dst))
    bs = derived.block_size
    want = gather(layers, derived, block_slots(src, bs))
    got = gather(list(fresh.values()), derived, block_slots(dst, bs))
    assert torch.equal(bits(got), bits(want)), case


@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_chunk_bytes_poured_into_block_buffers_equal_a_scatter(case):
    """Filling `block_buffers` in order with a chunk's bytes (what a file read straight into the
    engine does) writes exactly what `scatter_blocks` writes, and nothing else."""
    kv, spec, layout = allocate(case)
    first = next(iter(kv.values()))
    vllm_write(case, kv, torch.randperm(first.shape[0] * first.shape[2],
                                        generator=torch.Generator().manual_seed(1)))
    derived = derive(case, kv, spec, layout)
    chunk = gather_blocks(list(kv.values()), derived, torch.tensor([2, 0]))
    dst = torch.tensor([1, 2])
    scattered, _, _ = allocate(case)
    scatter_blocks(chunk, list(scattered.values()), derived, dst)
    poured, _, _ = allocate(case)
    views = block_buffers(list(poured.values()), derived, dst)
    data = memoryview(chunk.contiguous().view(-1).view(torch.uint8).numpy())
    assert sum(len(v) for v in views) == len(data)
    offset = 0
    for v in views:
        v[:] = data[offset:offset + len(v)]
        offset += len(v)
    for a, b in zip(scattered.values(), poured.values()):
        assert torch.equal(bits(a), bits(b)), case


@pytest.mark.parametrize("stacked", [False, True], ids=["layer-tensors", "one-buffer"])
def test_a_slice_of_a_chunks_blocks_scatters_in_place(stacked):
    """A load that starts inside a chunk scatters the chunk's later blocks only (a strided
    slice, no copy); layers in one buffer are copied with one index for all of them."""
    layout = KVLayout.vllm_cpu(3, 6, 16, 2, 32)

    def caches_of(make):
        if stacked:
            return list(make((3, *layout.layer_shape)).unbind(0))
        return [make(layout.layer_shape) for _ in range(3)]

    caches = caches_of(torch.randn)
    chunk = gather_blocks(caches, layout, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(chunk, gather_blocks_reference(caches, layout, torch.tensor([0, 1, 2, 3])))
    fresh = caches_of(torch.zeros)
    scatter_blocks(chunk[:, 2:], fresh, layout, torch.tensor([5, 4]))
    assert torch.equal(gather(fresh, layout, block_slots([5, 4], 16)),
                       gather(caches, layout, block_slots([2, 3], 16)))
    assert all(torch.count_nonzero(t[:4]) == 0 for t in fresh)


def _offset_outer(bs: int) -> KVLayout:
    """Per layer [bs, B, 2, H, D]: a block's tokens lie bs rows apart (one span per token)."""
    b, h, d = 4, 1, 8
    shape = (bs, b, 2, h, d)
    return KVLayout("offset-outer", 1, b, bs, h, d, layer_shape=shape,
                    k=AxisStrides(0, 2 * h * d, b * 2 * h * d, d, 1),
                    v=AxisStrides(h * d, 2 * h * d, b * 2 * h * d, d, 1))


def test_a_layout_without_dense_records_is_told_apart():
    few = block_records(_offset_outer(4))
    assert isinstance(few, BlockRecords) and len(few.spans) == 4
    assert block_records(_offset_outer(MAX_SPANS + 1)) is None
    layout = _offset_outer(MAX_SPANS + 1)
    with pytest.raises(ValueError, match="no dense block records"):
        gather_blocks([torch.zeros(layout.layer_shape)], layout, torch.tensor([0]))


def test_bad_block_ids_are_refused_before_any_copy():
    layout = KVLayout.vllm_cpu(2, 4, 16, 1, 32)
    caches = [torch.randn(layout.layer_shape) for _ in range(2)]
    before = [t.clone() for t in caches]
    chunk = gather_blocks(caches, layout, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        gather_blocks(caches, layout, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="appears twice"):
        scatter_blocks(chunk, caches, layout, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"expected \[L, nb, R\]"):
        scatter_blocks(chunk[:, :1], caches, layout, torch.tensor([2, 3]))
    with pytest.raises(TypeError, match="int64"):
        gather_blocks(caches, layout, torch.tensor([0], dtype=torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(caches, before))


@pytest.mark.parametrize("threads", [1, 2], ids=["numpy-copy", "index_copy"])
@pytest.mark.parametrize("stacked", [False, True], ids=["layer-tensors", "one-buffer"])
def test_one_block_cache_serves_many_copies_as_fresh_calls_do(stacked, threads):
    """A `BlockCache` built once (as the connector builds it at registration) gives, call after
    call, the bits of the reference gather, whichever copy `_copy_rows` picks for the number of
    torch threads; it keeps nothing of one call for the next."""
    from lmcache_lab.kernels.blocks import BlockCache

    layout = KVLayout.vllm_cpu(3, 8, 16, 2, 32)
    make = (lambda f: list(f((3, *layout.layer_shape)).unbind(0))) if stacked else \
        (lambda f: [f(layout.layer_shape) for _ in range(3)])
    source, engine = make(torch.randn), make(torch.zeros)
    blocks = BlockCache(engine, layout)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for src, dst in [([0, 1], [7, 2]), ([5], [0]), ([2, 3, 4], [3, 1, 6])]:
            chunk = gather_blocks_reference(source, layout, torch.tensor(src))
            blocks.scatter(chunk, torch.tensor(dst))
            assert torch.equal(blocks.gather(torch.tensor(dst)), chunk)
            assert torch.equal(blocks.gather(torch.tensor(dst)),
                               gather_blocks(engine, layout, torch.tensor(dst)))
    finally:
        torch.set_num_threads(before)
    written = [7, 2, 0, 3, 1, 6]
    assert all(torch.count_nonzero(t[[4, 5]]) == 0 for t in engine)        # never written
    assert all(torch.count_nonzero(t[written]) > 0 for t in engine)
