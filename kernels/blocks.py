"""Block-native chunks: whole block records copied between the engine's paged cache and a chunk.

    records = block_records(layout)                        # None: this layout has no dense records
    chunk = gather_blocks(kv_caches, layout, block_ids)    # fresh [L, nb, R]
    scatter_blocks(chunk, kv_caches, layout, block_ids)    # in place
    views = block_buffers(kv_caches, layout, block_ids)    # CPU: byte views in chunk order
    cache = BlockCache(kv_caches, layout)                  # the same three, caches checked once:
    cache.gather(block_ids); cache.scatter(chunk, block_ids); cache.views(block_ids)

A paged KV cache stores each block's K and V of one layer somewhere inside the layer tensor. When
every element of block b lies in a few dense spans `[start_p + b * block_stride, + length_p)`
that hold nothing else (vLLM CPU_ATTN's `[B, H, N, 2*D]` record, whatever its ISA packs inside
it; FlashAttention's block-outermost `[B, H, N, 2*D]` / `[B, N, H, 2*D]`), a chunk can be those
spans copied verbatim: `[L, nb, R]`, R = sum of the span lengths, in the cache's own element
order. A copy is then one row gather/scatter per (layer, span) over whole blocks, at memory-copy
speed, instead of an element scatter that transposes K inside each record.

The token-major chunk `[2, L, N, H*D]` of `paged.py` is the portable format (codecs quantize it,
other engines could read it); a block-native chunk is only meaningful to an engine with the same
layout, so its format belongs in the cache namespace (the connector puts it there).

Invariants:
  * `block_records` accepts a layout only if the K and V elements of block 0 (of each tensor of a
    layer) are exactly the union of its spans (no element of another block, no padding) and every
    kv axis has the same block stride; blocks then never overlap (the layout is one-to-one);
  * gather then scatter restores the cache bit for bit; a block-native chunk holds exactly
    `num_kv * block_size * H * D` elements per block;
  * inputs are validated before any copy (block ids in range, scatter targets distinct).
There is no Triton kernel: a block record is a contiguous row, and index_select / index_copy_
already copy rows at memory bandwidth on both devices.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .layout import KVLayout, _grid, _layer_gap, validate_caches
from .paged import _INT_VIEW, _copy_rows, _flat

MAX_SPANS = 64          # more spans per block would make row copies too small to pay off


@dataclass(frozen=True)
class Span:
    tensor: int         # 0: the layer's K tensor (also V's when they share one), 1: its V tensor
    start: int          # element offset of block 0's span from the tensor's first element
    length: int         # elements


@dataclass(frozen=True)
class BlockRecords:
    block_stride: int           # elements between consecutive blocks in a layer tensor
    spans: tuple[Span, ...]

    @property
    def record(self) -> int:
        """R: elements of one block of one layer in a block-native chunk."""
        return sum(s.length for s in self.spans)

    def chunk_shape(self, num_layers: int, num_blocks: int) -> tuple[int, int, int]:
        return (num_layers, num_blocks, self.record)


@lru_cache(maxsize=64)
def block_records(layout: KVLayout) -> BlockRecords | None:
    """The dense spans of one block of one layer, or None when the layout has none (see the
    module docstring). Cached per layout: it enumerates one block's elements."""
    axes = layout.kv_axes
    if len({ax.block for ax in axes}) != 1 or layout.num_blocks < 1:
        return None
    tensors = [[0], [1]] if layout.separate_kv else [list(range(len(axes)))]
    spans = []
    for ti, kvs in enumerate(tensors):
        offsets = np.concatenate([
            ax.base + _grid([a for a in layout._axes(ax) if a[0] != "block"])
            for ax in (axes[i] for i in kvs)])                                      # [E]
        offsets.sort()
        if offsets.size != np.unique(offsets).size:
            return None
        breaks = np.flatnonzero(np.diff(offsets) != 1) + 1                          # span starts
        for run in np.split(offsets, breaks):
            spans.append(Span(ti, int(run[0]), int(run.size)))
    if len(spans) > MAX_SPANS:
        return None
    return BlockRecords(axes[0].block, tuple(spans))


# =================================================================================== public API
def gather_blocks(kv_caches, layout: KVLayout, block_ids: torch.Tensor, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy blocks `block_ids` of every layer into a block-native chunk `[L, nb, R]`."""
    return BlockCache(kv_caches, layout).gather(block_ids, out=out)


def scatter_blocks(chunk: torch.Tensor, kv_caches, layout: KVLayout, block_ids: torch.Tensor) -> None:
    """Write a block-native chunk `[L, nb, R]` into blocks `block_ids` of every layer."""
    BlockCache(kv_caches, layout).scatter(chunk, block_ids)


def block_buffers(kv_caches, layout: KVLayout, block_ids: torch.Tensor) -> list[memoryview]:
    """Writable byte views of blocks `block_ids` of every layer, in the element order of a
    block-native chunk `[L, nb, R]` (layer, then block, then span): filling them in order with a
    chunk's bytes is `scatter_blocks` without the chunk, e.g. a file read straight into the
    engine's cache (`os.preadv`). CPU caches only (a device has no memoryview)."""
    return BlockCache(kv_caches, layout).views(block_ids)


class BlockCache:
    """`gather_blocks`, `scatter_blocks` and `block_buffers` of fixed caches (an engine's, for
    its lifetime): the caches are validated and their row views built once, so a call only
    checks its block ids and copies. In an engine that saves ~2 ms of a 1,536-token load
    (6 chunks; 30% of it before, per a py-spy profile of concurrent hits)."""

    def __init__(self, kv_caches, layout: KVLayout):
        records, pairs, _ = _validate(kv_caches, layout, torch.zeros(0, dtype=torch.int64),
                                      distinct=True)
        self.records, self.num_layers, self.num_blocks = records, layout.num_layers, layout.num_blocks
        self.ref = pairs[0][0]
        # per span: [(layers, rows, first)]: rows[_index(first, ids)] are the span of blocks
        # ids of those layers (`_rows`)
        self._rows = [list(_rows(pairs, records, span, layout.num_blocks)) for span in records.spans]
        self._pairs = pairs
        self._bytes = None          # per layer, per tensor: a byte view (built on first `views`)

    def gather(self, block_ids: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        ids = self._ids(block_ids, distinct=False)
        shape = self.records.chunk_shape(self.num_layers, ids.numel())
        if out is None:
            out = torch.empty(shape, dtype=self.ref.dtype, device=self.ref.device)
        else:
            _check_chunk(out, shape, self.ref)
            if not out.is_contiguous():
                raise ValueError("out: not contiguous")
        offset = 0
        for span, groups in zip(self.records.spans, self._rows):
            for layers, rows, first in groups:
                dst = out[layers, :, offset:offset + span.length]                   # [Lg, nb, len]
                idx = _index(first, ids)                                            # [Lg * nb]
                if len(self.records.spans) == 1:                                    # contiguous
                    torch.index_select(rows, 0, idx, out=dst.view(-1, span.length))
                else:
                    dst.copy_(rows.index_select(0, idx).view(dst.shape))
            offset += span.length
        return out

    def scatter(self, chunk: torch.Tensor, block_ids: torch.Tensor) -> None:
        ids = self._ids(block_ids, distinct=True)
        _check_chunk(chunk, self.records.chunk_shape(self.num_layers, ids.numel()), self.ref)
        offset = 0
        for span, groups in zip(self.records.spans, self._rows):
            for layers, rows, first in groups:
                _copy_rows(rows, _index(first, ids), chunk[layers, :, offset:offset + span.length]
                           .reshape(-1, span.length))                               # [Lg * nb, len]
            offset += span.length

    def views(self, block_ids: torch.Tensor) -> list[memoryview]:
        if self.ref.device.type != "cpu":
            raise ValueError(f"block_buffers: caches on {self.ref.device}; only CPU memory has "
                             "byte views")
        ids = self._ids(block_ids, distinct=True)
        size = self.ref.element_size()
        if self._bytes is None:
            self._bytes = [[memoryview(_flat(t).view(_INT_VIEW[size]).numpy()).cast("B")
                            for t in pair] for pair in self._pairs]
        stride, spans = self.records.block_stride, self.records.spans
        out = []
        for flat in self._bytes:
            for b in ids.tolist():
                for s in spans:
                    start = (s.start + b * stride) * size
                    out.append(flat[s.tensor][start:start + s.length * size])
        return out

    def _ids(self, block_ids, distinct: bool) -> torch.Tensor:
        return _check_ids(block_ids, self.ref.device, self.num_blocks, distinct)


def gather_blocks_reference(kv_caches, layout: KVLayout, block_ids: torch.Tensor) -> torch.Tensor:
    """The spans spelt out with flat element offsets, one block at a time (slow, obviously right)."""
    records, pairs, ids = _validate(kv_caches, layout, block_ids, distinct=False)
    out = torch.empty(records.chunk_shape(layout.num_layers, ids.numel()), dtype=pairs[0][0].dtype)
    for layer, pair in enumerate(pairs):
        for j, b in enumerate(ids.tolist()):
            parts = [_flat(pair[s.tensor])[s.start + b * records.block_stride:][:s.length]
                     for s in records.spans]
            out[layer, j] = torch.cat(parts).cpu()
    return out.to(pairs[0][0].device)


# =================================================================================== internals
def _validate(kv_caches, layout: KVLayout, block_ids, distinct: bool):
    records = block_records(layout)
    if records is None:
        raise ValueError(f"layout {layout.name} has no dense block records; use the token-major "
                         "gather/scatter of kernels/paged.py")
    pairs = validate_caches(kv_caches, layout)
    return records, pairs, _check_ids(block_ids, pairs[0][0].device, layout.num_blocks, distinct)


def _check_ids(block_ids, device: torch.device, num_blocks: int, distinct: bool) -> torch.Tensor:
    if not isinstance(block_ids, torch.Tensor) or block_ids.dtype != torch.int64 \
            or block_ids.dim() != 1:
        raise TypeError("block_ids: expected a 1-D int64 tensor")
    if block_ids.device != device:
        raise ValueError(f"block_ids: on {block_ids.device}, kv_caches on {device}")
    host = block_ids.cpu().numpy()
    if host.size and (host.min() < 0 or host.max() >= num_blocks):
        raise ValueError(f"block_ids: {int(host.min())}..{int(host.max())} out of range; the "
                         f"layout has {num_blocks} blocks")
    if distinct and np.unique(host).size != host.size:
        raise ValueError("block_ids: a block appears twice; scatter targets must be distinct")
    return block_ids.contiguous()


def _check_chunk(chunk, shape: tuple[int, ...], ref: torch.Tensor) -> None:
    """Shape, dtype and device; any strides (a slice of a chunk's blocks is scattered as is)."""
    if not isinstance(chunk, torch.Tensor):
        raise TypeError(f"chunk: expected a tensor, got {type(chunk).__name__}")
    if tuple(chunk.shape) != shape:
        raise ValueError(f"chunk: shape {list(chunk.shape)}, expected [L, nb, R] = {list(shape)}")
    if chunk.dtype != ref.dtype or chunk.device != ref.device:
        raise ValueError(f"chunk: {chunk.dtype} on {chunk.device}, the caches are {ref.dtype} "
                         f"on {ref.device}")


def _rows(pairs, records: BlockRecords, span: Span, num_blocks: int):
    """(layers, rows, first) per group of layers: `rows[_index(first, ids)]` are the span of
    blocks `ids` of those layers, layer by layer (`[Lg * nb, len]`). Layers evenly spaced in
    one storage a whole number of blocks apart (one KV buffer, a stacked tensor) are one view
    and one index: a single copy for all."""
    tensors = [pair[span.tensor] for pair in pairs]
    gap = _layer_gap(tensors)
    stride = records.block_stride
    device = tensors[0].device
    if gap is not None and gap > 0 and gap % stride == 0:
        t, per_layer = tensors[0], gap // stride
        rows = t.as_strided(((len(tensors) - 1) * per_layer + num_blocks, span.length), (stride, 1),
                            t.storage_offset() + span.start)
        yield slice(0, len(tensors)), rows, torch.arange(len(tensors), device=device) * per_layer
        return
    for layer, t in enumerate(tensors):
        rows = t.as_strided((num_blocks, span.length), (stride, 1), t.storage_offset() + span.start)
        yield slice(layer, layer + 1), rows, None


def _index(first: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """Row indices `[Lg * nb]` of blocks `ids` in each layer of a group whose layers start at
    rows `first` (None: one layer, at row 0)."""
    return ids if first is None else (first[:, None] + ids[None, :]).view(-1)
