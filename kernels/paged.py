"""Paged gather (engine cache -> chunk) and scatter (chunk -> engine cache), for any `KVLayout`.

    chunk = gather(kv_caches, layout, slot_mapping)      # fresh [2, L, N, H*D], padding rows zero
    scatter(chunk, kv_caches, layout, slot_mapping)      # in place; slots of -1 skipped

`slot_mapping` is int64 `[N]` on the caches' device, `slot = block * block_size + offset`, -1 for
padding. `chunk[0]` holds K and `chunk[1]` holds V, `[layer, token, head * head_size + dim]`; a
K-only layout (MLA latent, `layout.v is None`) gathers `[1, L, N, D]`. Layer tensors may be
strided views of one buffer (vLLM's block-outermost layouts): every backend addresses them
through the layout's strides and each layer's own data pointer.

Backends (keyword `backend`):
  * "triton": one launch for all layers (compiled on CUDA, the interpreter on CPU when
    `TRITON_INTERPRET=1` was set before this module was imported);
  * "torch": strided views + index_select / index_copy_ per layer (the CPU hot path);
  * "reference": the address formula of `kernels/layout.py` spelt out with flat indices (slow,
    obviously right; tests compare the other two against it);
  * "auto" (default): "triton" for CUDA tensors, "torch" otherwise.

Invariants: every input is validated before any backend runs (dtype, shape, contiguity, device,
-1 <= slot < num_slots, scatter slots distinct), so no out-of-range address reaches a kernel.
All backends are bit-exact copies: gather followed by scatter restores the cache exactly.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .layout import AxisStrides, KVLayout, validate_caches

BACKENDS = ("auto", "triton", "torch", "reference")
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# =================================================================================== validation
def _check_slots(slot_mapping, layout: KVLayout, device: torch.device,
                 distinct: bool) -> np.ndarray:
    """Validate the slot mapping; return it as a host int64 array (one device sync on CUDA:
    the range check must finish before any launch)."""
    if not isinstance(slot_mapping, torch.Tensor):
        raise TypeError(f"slot_mapping: expected an int64 tensor, got {type(slot_mapping).__name__}")
    if slot_mapping.dtype != torch.int64:
        raise TypeError(f"slot_mapping: dtype must be torch.int64, got {slot_mapping.dtype}")
    if slot_mapping.dim() != 1:
        raise ValueError(f"slot_mapping: must be 1-D [N], got shape {list(slot_mapping.shape)}")
    if not slot_mapping.is_contiguous():
        raise ValueError("slot_mapping: not contiguous")
    if slot_mapping.device != device:
        raise ValueError(f"slot_mapping: on {slot_mapping.device}, kv_caches on {device}")
    host = slot_mapping.detach().cpu().numpy()                                   # [N] int64
    if host.size == 0:
        return host
    lo, hi = int(host.min()), int(host.max())
    if lo < -1 or hi >= layout.num_slots:
        bad = lo if lo < -1 else hi
        raise ValueError(f"slot_mapping: slot {bad} out of range; layout {layout.name} has "
                         f"{layout.num_slots} slots (valid: 0..{layout.num_slots - 1}, or -1 = padding)")
    if distinct:
        valid = host[host >= 0] if lo < 0 else host
        if np.unique(valid).size != valid.size:
            raise ValueError("slot_mapping: a slot appears twice; scatter targets must be distinct")
    return host


def _check_chunk(chunk, layout: KVLayout, n: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(chunk, torch.Tensor):
        raise TypeError(f"chunk: expected a tensor, got {type(chunk).__name__}")
    want = layout.chunk_shape(n)
    if tuple(chunk.shape) != want:
        raise ValueError(f"chunk: shape {list(chunk.shape)}, expected "
                         f"[{layout.num_kv}, L, N, H*D] = {list(want)}")
    if chunk.dtype != dtype:
        raise TypeError(f"chunk: dtype {chunk.dtype} differs from the caches' {dtype}")
    if chunk.device != device:
        raise ValueError(f"chunk: on {chunk.device}, kv_caches on {device}")
    if not chunk.is_contiguous():
        raise ValueError("chunk: not contiguous")


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not _INTERPRET:
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "lmcache_lab.kernels.paged is imported")
    return backend


# =================================================================================== public API
def gather(kv_caches, layout: KVLayout, slot_mapping: torch.Tensor, *,
           out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Copy K and V of the tokens at `slot_mapping` from every layer into one contiguous chunk
    `[2, L, N, H*D]` (`[1, ...]` for a K-only layout; rows of padding slots are zero). `out`, if
    given, is filled and returned."""
    pairs = validate_caches(kv_caches, layout)
    ref = pairs[0][0]
    host = _check_slots(slot_mapping, layout, ref.device, distinct=False)
    n = slot_mapping.numel()
    if out is None:
        out = torch.empty(layout.chunk_shape(n), dtype=ref.dtype, device=ref.device)
    else:
        _check_chunk(out, layout, n, ref.dtype, ref.device)
    if n == 0:
        return out
    chosen = _pick_backend(backend, ref.device)
    if chosen == "torch":
        _gather_torch(pairs, layout, slot_mapping, out, host)
    else:
        {"triton": _gather_triton, "reference": gather_reference}[chosen](pairs, layout, slot_mapping, out)
    return out


def scatter(chunk: torch.Tensor, kv_caches, layout: KVLayout, slot_mapping: torch.Tensor, *,
            backend: str = "auto") -> None:
    """Write `chunk` `layout.chunk_shape(N)` into every layer's cache at `slot_mapping`, in place;
    tokens whose slot is -1 are skipped. Slots other than -1 must be distinct."""
    pairs = validate_caches(kv_caches, layout)
    ref = pairs[0][0]
    host = _check_slots(slot_mapping, layout, ref.device, distinct=True)
    n = slot_mapping.numel()
    _check_chunk(chunk, layout, n, ref.dtype, ref.device)
    if n == 0:
        return
    chosen = _pick_backend(backend, ref.device)
    if chosen == "torch":
        _scatter_torch(pairs, layout, slot_mapping, chunk, host)
    else:
        {"triton": _scatter_triton, "reference": scatter_reference}[chosen](pairs, layout, slot_mapping, chunk)


# =================================================================================== reference
def _flat_index(layout: KVLayout, kv: int, slots: torch.Tensor) -> torch.Tensor:
    """int64 [N, H*D]: element offset from each layer tensor's first element of each
    (token, head, dim) of K (kv=0) or V (kv=1), tiles included."""
    ax = layout.kv_axes[kv]
    blk, off = slots // layout.block_size, slots % layout.block_size            # [N], [N]
    col = torch.arange(layout.hidden, device=slots.device)                        # [H*D]
    head, dim = col // layout.head_size, col % layout.head_size                   # [H*D], [H*D]
    row = (ax.base + blk * ax.block + off // ax.offset_tile * ax.offset
           + off % ax.offset_tile * ax.offset_inner)                              # [N]
    colo = (head * ax.head + dim // ax.dim_tile * ax.dim
            + dim % ax.dim_tile * ax.dim_inner)                                   # [H*D]
    return row[:, None] + colo[None, :]                                           # [N, H*D]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """1-D view of the memory a layer tensor spans (contiguous or strided: a view of the same
    storage from its first element), so that `_flat_index` offsets address it."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.as_strided((extent,), (1,), t.storage_offset())


def gather_reference(pairs, layout: KVLayout, slots: torch.Tensor, out: torch.Tensor) -> None:
    """out[kv, l, n, h*D+d] = layer_l[addr_kv(slot_n, h, d)], zero where slot_n == -1."""
    valid = slots >= 0                                                            # [N]
    safe = torch.where(valid, slots, torch.zeros_like(slots))                     # [N]
    for kv in range(layout.num_kv):
        idx = _flat_index(layout, kv, safe)                                       # [N, H*D]
        for layer, pair in enumerate(pairs):
            vals = _flat(pair[kv])[idx]                                           # [N, H*D]
            out[kv, layer] = torch.where(valid[:, None], vals, torch.zeros_like(vals))


def scatter_reference(pairs, layout: KVLayout, slots: torch.Tensor, chunk: torch.Tensor) -> None:
    """layer_l[addr_kv(slot_n, h, d)] = chunk[kv, l, n, h*D+d] for every slot_n != -1."""
    valid = slots >= 0                                                            # [N]
    for kv in range(layout.num_kv):
        idx = _flat_index(layout, kv, slots[valid])                               # [M, H*D]
        for layer, pair in enumerate(pairs):
            _flat(pair[kv])[idx] = chunk[kv, layer][valid]                        # [M, H*D]


# =================================================================================== torch path
# Strategy: view K (or V) of a group of layers as one strided tensor, so each copy covers many
# layers. Layouts whose slots are one stride apart (vLLM flash, SGLang, vLLM CPU V) use one
# index_select / index_copy_ per group. vLLM CPU K is transposed inside each block, so every copy
# is an element transpose; there the slot mapping is split into runs of consecutive slots inside
# one block (a chunk of whole blocks has one run per block) and each run is one strided copy,
# falling back to advanced indexing when the slots are scattered. Tiled layouts (vLLM CPU with
# AMX) are viewed with their tiles as axes of their own and always copied by advanced indexing.
_MAX_RUN_FRACTION = 8      # use runs when there are at most N / 8 of them (and at most 64)


class _Group(NamedTuple):
    layers: slice              # which layers this view covers
    view: torch.Tensor         # [Lg, num_slots, H, D] if flat else [Lg, num_blocks, block_size, H, D]
                               # ([Lg, B, bs/ot, ot, H, D/dt, dt] if tiled)
    flat: bool                 # one stride walks the slots
    rows: torch.Tensor | None  # flat with contiguous H*D: [R, H*D], row of (layer i, slot s) is
    layer_rows: int            #   i * layer_rows + s (one index op covers every layer)
    tiled: AxisStrides | None = None   # the tiled axis strides, when the view has tile axes


def _groups(pairs, layout: KVLayout, kv: int) -> list[_Group]:
    """Strided views of K (or V). All layers form one group when their tensors are evenly spaced
    in one storage (vLLM's shared buffer, a stacked tensor); otherwise one group per layer."""
    ax = layout.kv_axes[kv]
    b, bs, h, d = layout.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_size
    flat = not ax.tiled and (bs == 1 or ax.block == bs * ax.offset)
    step = ax.block if bs == 1 else ax.offset
    tensors = [pair[kv] for pair in pairs]
    size, base_ptr = tensors[0].element_size(), tensors[0].data_ptr()
    gap = (tensors[1].data_ptr() - base_ptr) // size if len(tensors) > 1 else 0
    # Evenly spaced, first and last in one storage: every layer lies inside that allocation
    # (as_strided re-checks the bounds against it).
    stacked = (len(tensors) == 1 or (
        gap > 0 and all(t.data_ptr() - base_ptr == i * gap * size for i, t in enumerate(tensors))
        and tensors[-1].untyped_storage().data_ptr() == tensors[0].untyped_storage().data_ptr()))
    if not stacked:
        gap = 0                                    # one layer per group: the stride is unused
    chunks = [(slice(0, len(tensors)), tensors[0])] if stacked else \
        [(slice(i, i + 1), t) for i, t in enumerate(tensors)]
    row_ok = flat and ax.dim == 1 and ax.head == d and step > 0 and gap % step == 0
    out = []
    for layers, t in chunks:
        lg, offset = layers.stop - layers.start, t.storage_offset() + ax.base
        rows, layer_rows = None, 0
        if ax.tiled:
            ot, dt = ax.offset_tile, ax.dim_tile
            view = t.as_strided((lg, b, bs // ot, ot, h, d // dt, dt),
                                (gap, ax.block, ax.offset, ax.offset_inner, ax.head, ax.dim,
                                 ax.dim_inner), offset)
            out.append(_Group(layers, view, False, None, 0, ax))
            continue
        if flat:
            view = t.as_strided((lg, b * bs, h, d), (gap, step, ax.head, ax.dim), offset)
            if row_ok:
                layer_rows = gap // step
                rows = t.as_strided(((lg - 1) * layer_rows + b * bs, h * d), (step, 1), offset)
        else:
            view = t.as_strided((lg, b, bs, h, d), (gap, ax.block, ax.offset, ax.head, ax.dim), offset)
        out.append(_Group(layers, view, flat, rows, layer_rows))
    return out


def _row_index(slots: torch.Tensor, group: _Group) -> torch.Tensor:
    """int64 [Lg * N]: row of (layer i, token n) in `group.rows`, layer-major like the chunk."""
    lg = group.layers.stop - group.layers.start
    if lg == 1:
        return slots
    first = torch.arange(lg, device=slots.device) * group.layer_rows                  # [Lg]
    return (first[:, None] + slots[None, :]).view(-1)                                 # [Lg * N]


def _runs(host: np.ndarray, block_size: int | None) -> list[tuple[int, int, int]] | None:
    """Maximal runs of consecutive valid slots (inside one block when `block_size` is given), as
    (first token, end token, first slot); None when there are too many runs for per-run copies
    to pay off. Host arithmetic: a few microseconds for a chunk."""
    n = host.size
    valid = host >= 0                                                             # [N]
    cont = np.zeros(n, dtype=bool)                                                # [N]
    cont[1:] = valid[1:] & valid[:-1] & (host[1:] == host[:-1] + 1)
    if block_size is not None:
        cont[1:] &= host[1:] % block_size != 0
    starts = np.flatnonzero(valid & ~cont)                                        # [R]
    if starts.size > min(64, max(1, n // _MAX_RUN_FRACTION)):
        return None
    nxt = np.zeros(n, dtype=bool)                                                 # [N]
    nxt[:-1] = cont[1:]
    ends = np.flatnonzero(valid & ~nxt) + 1                                       # [R]
    return list(zip(starts.tolist(), ends.tolist(), host[starts].tolist()))


class _Plan:
    """How one slot mapping is copied, computed lazily once per call and shared by all groups."""

    def __init__(self, slots: torch.Tensor, host: np.ndarray, block_size: int):
        self.slots, self.host, self.block_size = slots, host, block_size
        self.all_valid = bool(host.min() >= 0)
        self._cache: dict[str, object] = {}

    @property
    def valid(self) -> torch.Tensor:
        """bool [N] on the slots' device: True where the slot is not padding."""
        if "valid" not in self._cache:
            self._cache["valid"] = self.slots >= 0
        return self._cache["valid"]

    def runs(self, flat: bool):
        key = "flat" if flat else "block"
        if key not in self._cache:
            self._cache[key] = _runs(self.host, None if flat else self.block_size)
        return self._cache[key]

    def compact(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(token positions kept or None when all are valid, their slots)."""
        if "compact" not in self._cache:
            if self.all_valid:
                self._cache["compact"] = (None, self.slots)
            else:
                keep = self.valid.nonzero().flatten()                             # [M]
                self._cache["compact"] = (keep, self.slots[keep])
        return self._cache["compact"]

    def safe(self) -> torch.Tensor:
        """Slots with padding replaced by 0 (gather reads slot 0, then zeroes those rows)."""
        return self.slots if self.all_valid else self.slots.clamp_min(0)


def _tile_index(slots: torch.Tensor, ax: AxisStrides, bs: int):
    """(block, tile, offset in tile) of each slot: indices into a tiled group's view."""
    blk, off = slots // bs, slots % bs
    return blk, off // ax.offset_tile, off % ax.offset_tile


def _run_view(view: torch.Tensor, flat: bool, s0: int, length: int, bs: int) -> torch.Tensor:
    """[Lg, length, H, D] view of `length` consecutive slots starting at slot s0."""
    if flat:
        return view[:, s0:s0 + length]
    return view[:, s0 // bs, s0 % bs:s0 % bs + length]


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy_rows(rows: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """rows[idx] = src (`rows` [R, C], `idx` int64 [M] distinct, `src` [M, C]). On a CPU with
    one torch thread through numpy views of the same memory as integers (a bit copy), which
    index_copy_ runs 1.0-1.6x slower; with more threads index_copy_ splits the rows among them
    (18 MiB on 2 threads, rows of 64 to 65,536 fp32, strided: 1.3-2.1x faster than numpy;
    2-core Xeon, torch 2.13)."""
    if rows.device.type != "cpu" or torch.get_num_threads() > 1:
        rows.index_copy_(0, idx, src)
        return
    itype = _INT_VIEW[rows.element_size()]
    rows.view(itype).numpy()[idx.numpy()] = src.view(itype).numpy()


def _gather_torch(pairs, layout: KVLayout, slots: torch.Tensor, out: torch.Tensor,
                  host: np.ndarray) -> None:
    n, h, d, bs = slots.numel(), layout.num_kv_heads, layout.head_size, layout.block_size
    plan = _Plan(slots, host, bs)
    for kv in range(layout.num_kv):
        for g in _groups(pairs, layout, kv):
            dst = out[kv, g.layers]                                               # [Lg, N, H*D]
            if g.tiled is not None:                                               # tile axes
                blk, tile, inner = _tile_index(plan.safe(), g.tiled, bs)          # [N] each
                dst.copy_(g.view[:, blk, tile, inner].reshape(dst.shape))         # [Lg, N, H*D]
                continue
            if g.rows is not None:                                                # one op, all layers
                torch.index_select(g.rows, 0, _row_index(plan.safe(), g),
                                   out=dst.view(-1, layout.hidden))               # [Lg*N, H*D]
                continue
            dst = dst.view(-1, n, h, d)                                           # [Lg, N, H, D]
            runs = plan.runs(g.flat)
            if runs is not None:
                for t0, t1, s0 in runs:
                    dst[:, t0:t1].copy_(_run_view(g.view, g.flat, s0, t1 - t0, bs))
            elif g.flat:
                for i in range(g.view.shape[0]):
                    torch.index_select(g.view[i], 0, plan.safe(), out=dst[i])     # [N, H, D]
            else:
                safe = plan.safe()
                dst.copy_(g.view[:, safe // bs, safe % bs])                       # [Lg, N, H, D]
    if not plan.all_valid:
        out[:, :, ~plan.valid] = 0


def _scatter_torch(pairs, layout: KVLayout, slots: torch.Tensor, chunk: torch.Tensor,
                   host: np.ndarray) -> None:
    n, h, d, bs = slots.numel(), layout.num_kv_heads, layout.head_size, layout.block_size
    plan = _Plan(slots, host, bs)
    for kv in range(layout.num_kv):
        for g in _groups(pairs, layout, kv):
            src = chunk[kv, g.layers]                                             # [Lg, N, H*D]
            if g.tiled is not None:                                               # tile axes
                keep, slots_v = plan.compact()
                if keep is not None:
                    src = src.index_select(1, keep)                               # [Lg, M, H*D]
                blk, tile, inner = _tile_index(slots_v, g.tiled, bs)              # [M] each
                g.view[:, blk, tile, inner] = src.reshape(
                    src.shape[0], slots_v.numel(), *g.view.shape[4:])             # [Lg, M, H, D/dt, dt]
                continue
            runs = None if g.rows is not None else plan.runs(g.flat)
            if runs is not None:
                src = src.view(-1, n, h, d)                                       # [Lg, N, H, D]
                for t0, t1, s0 in runs:
                    _run_view(g.view, g.flat, s0, t1 - t0, bs).copy_(src[:, t0:t1])
                continue
            keep, slots_v = plan.compact()
            if keep is not None:
                src = src.index_select(1, keep)                                   # [Lg, M, H*D]
            if g.rows is not None:                                                # one op, all layers
                _copy_rows(g.rows, _row_index(slots_v, g), src.reshape(-1, layout.hidden))
            elif g.flat:
                src = src.view(-1, slots_v.numel(), h, d)                         # [Lg, M, H, D]
                for i in range(g.view.shape[0]):
                    g.view[i].index_copy_(0, slots_v, src[i])                     # [M, H, D]
            else:
                src = src.reshape(-1, slots_v.numel(), h, d)                      # [Lg, M, H, D]
                g.view[:, slots_v // bs, slots_v % bs] = src


# =================================================================================== triton
@triton.jit
def _paged_copy_kernel(
    cache_ptr,       # *T: base pointer, element 0 of layer 0's (K) tensor; every address below is
                     #     an element offset from it
    layer_base_ptr,  # *i64 [KV, L]: offset from cache_ptr of (slot 0, head 0, dim 0) of K/V of layer l
    strides_ptr,     # *i64 [KV, 8]: (block, offset, head, dim, offset_tile, offset_inner,
                     #     dim_tile, dim_inner) element strides of K and of V (KV = 2, or 1: K only)
    slot_ptr,        # *i64 [N]: slot per token, -1 = padding (validated: -1 <= slot < num_slots)
    chunk_ptr,       # *T [KV, L, N, HD] contiguous: the chunk (written by gather, read by scatter)
    N,               # number of tokens
    L,               # number of layers
    HD,              # H * D, elements of K (or V) per token per layer
    HEAD_SIZE: tl.constexpr,   # D
    BLOCK_SIZE: tl.constexpr,  # engine block size (slots per block)
    BLOCK_T: tl.constexpr,     # tokens per program (power of two)
    BLOCK_C: tl.constexpr,     # H*D columns per program (power of two)
    TO_CACHE: tl.constexpr,    # False: gather (cache -> chunk), True: scatter (chunk -> cache)
    TILED: tl.constexpr,       # some axis is tiled (vLLM CPU AMX): read the tile strides too
):
    """Grid (cdiv(N, BLOCK_T), KV * L, cdiv(HD, BLOCK_C)); program (t, kv * L + l, c) copies a
    [BLOCK_T, BLOCK_C] tile of K (kv=0) or V (kv=1) of layer l. Padding rows: gather writes zeros,
    scatter skips them. All index math is int64 before multiplying by strides."""
    pid_t = tl.program_id(0)
    pid_kl = tl.program_id(1)
    pid_c = tl.program_id(2)
    kv = pid_kl // L

    tok = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)      # [BLOCK_T]
    col = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)      # [BLOCK_C]
    tok_in = tok < N
    col_in = col < HD

    slot = tl.load(slot_ptr + tok, mask=tok_in, other=-1)                        # [BLOCK_T] i64
    valid = tok_in & (slot >= 0)
    slot = tl.where(valid, slot, 0)
    s_block = tl.load(strides_ptr + kv * 8 + 0)
    s_off = tl.load(strides_ptr + kv * 8 + 1)
    s_head = tl.load(strides_ptr + kv * 8 + 2)
    s_dim = tl.load(strides_ptr + kv * 8 + 3)
    base = tl.load(layer_base_ptr + pid_kl)

    off = slot % BLOCK_SIZE                                                      # [BLOCK_T]
    dim = col % HEAD_SIZE                                                        # [BLOCK_C]
    if TILED:
        t_off = tl.load(strides_ptr + kv * 8 + 4)
        s_off_in = tl.load(strides_ptr + kv * 8 + 5)
        t_dim = tl.load(strides_ptr + kv * 8 + 6)
        s_dim_in = tl.load(strides_ptr + kv * 8 + 7)
        off_term = (off // t_off) * s_off + (off % t_off) * s_off_in             # [BLOCK_T]
        dim_term = (dim // t_dim) * s_dim + (dim % t_dim) * s_dim_in             # [BLOCK_C]
    else:
        off_term = off * s_off
        dim_term = dim * s_dim
    row = base + (slot // BLOCK_SIZE) * s_block + off_term                       # [BLOCK_T]
    colo = (col // HEAD_SIZE) * s_head + dim_term                                # [BLOCK_C]
    cache_off = row[:, None] + colo[None, :]                                     # [BLOCK_T, BLOCK_C]
    chunk_off = (pid_kl.to(tl.int64) * N + tok)[:, None] * HD + col[None, :]     # [BLOCK_T, BLOCK_C]
    if TO_CACHE:
        x = tl.load(chunk_ptr + chunk_off, mask=tok_in[:, None] & col_in[None, :])
        tl.store(cache_ptr + cache_off, x, mask=valid[:, None] & col_in[None, :])
    else:
        x = tl.load(cache_ptr + cache_off, mask=valid[:, None] & col_in[None, :], other=0.0)
        tl.store(chunk_ptr + chunk_off, x, mask=tok_in[:, None] & col_in[None, :])


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(pairs, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_base [KV, L] i64, strides [KV, 8] i64) on the caches' device, cached per set of
    tensors (engines allocate their caches once)."""
    base = pairs[0][0]
    size = base.element_size()
    # offsets are in elements of this dtype: a freed cache of another dtype at the same addresses
    # must not hand its tables to this one
    key = (layout, base.device, base.dtype, tuple((k.data_ptr(), v.data_ptr()) for k, v in pairs))
    if key in _TABLES:
        return _TABLES[key]
    rows = []
    for kv, ax in enumerate(layout.kv_axes):
        row = []
        for pair in pairs:
            delta = pair[kv].data_ptr() - base.data_ptr()
            if delta % size:
                raise ValueError("kv_caches: layer tensors are not element-aligned with layer 0")
            row.append(delta // size + ax.base)
        rows.append(row)
    layer_base = torch.tensor(rows, dtype=torch.int64, device=base.device)                # [KV, L]
    strides = torch.tensor([[ax.block, ax.offset, ax.head, ax.dim, ax.offset_tile,
                             ax.offset_inner, ax.dim_tile, ax.dim_inner]
                            for ax in layout.kv_axes], dtype=torch.int64, device=base.device)  # [KV, 8]
    if len(_TABLES) > 64:
        _TABLES.clear()
    _TABLES[key] = (layer_base, strides)
    return layer_base, strides


def _launch(pairs, layout: KVLayout, slots: torch.Tensor, chunk: torch.Tensor, to_cache: bool) -> None:
    n, hd = slots.numel(), layout.hidden
    layer_base, strides = _tables(pairs, layout)
    block_c = min(triton.next_power_of_2(hd), 1024)
    block_t = max(1, min(triton.next_power_of_2(n), 4096 // block_c))
    grid = (triton.cdiv(n, block_t), layout.num_kv * layout.num_layers, triton.cdiv(hd, block_c))
    _paged_copy_kernel[grid](
        pairs[0][0], layer_base, strides, slots, chunk, n, layout.num_layers, hd,
        HEAD_SIZE=layout.head_size, BLOCK_SIZE=layout.block_size, BLOCK_T=block_t,
        BLOCK_C=block_c, TO_CACHE=to_cache, TILED=layout.tiled, num_warps=4)


def _gather_triton(pairs, layout, slots, out) -> None:
    _launch(pairs, layout, slots, out, to_cache=False)


def _scatter_triton(pairs, layout, slots, chunk) -> None:
    _launch(pairs, layout, slots, chunk, to_cache=True)
