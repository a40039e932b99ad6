"""Paged KV-cache layouts, described once and read by every kernel and reference.

A layout says where the K or V element of (slot, head, dim) of one layer lives, as an element
offset from the start of that layer's tensor:

    slot  = block * block_size + offset                 (engine slot mapping; -1 = padding)
    addr  = base + block * stride_block + offset' + head * stride_head + dim'
    offset' = (offset // offset_tile) * stride_offset + (offset % offset_tile) * offset_inner
    dim'    = (dim // dim_tile) * stride_dim + (dim % dim_tile) * dim_inner

with one `AxisStrides` for K and one for V (none for V when the cache holds one latent vector per
token, MLA). Tiles are 1 (plain strides) except for caches whose kernels pack token or dim tiles
(vLLM CPU with AMX). Adding a layout means adding a constructor here, never a new kernel.

Invariants (checked in `__post_init__`):
  * every size is positive (`num_blocks * block_size` slots per layer), tiles divide their axis;
  * every address of every slot/head/dim stays inside the layer tensor's extent (`layer_shape`
    with `layer_strides()`), so a validated slot can never make a kernel read or write outside it;
  * no two (K/V, slot, head, dim) share an address (K and V never overlap, nor alias themselves).

Tensors per layer (what `gather`/`scatter` accept as `kv_caches`):
  * `separate_kv=False`: one tensor per layer of shape `layer_shape` (vLLM);
  * `separate_kv=True`: one `(k, v)` pair per layer, each of shape `layer_shape` (SGLang MHA).
A single stacked tensor `[num_layers, *layer_shape]` is also accepted for `separate_kv=False`.
Each layer tensor has `layer_shape` and the strides `layer_strides()`: contiguous unless the
layout records other strides (`strides`, e.g. vLLM's block-outermost layouts, where every layer
is a strided view of one buffer that interleaves the layers block by block). All on one device,
with one dtype among `SUPPORTED_DTYPES`.

vLLM (`KVLayout.from_vllm`): the layout is derived from the registered tensors, their attention
backend, the KV cache spec and the resolved `KVCacheLayout`, never looked up by name; what it
cannot serve raises `UnsupportedLayout` naming the backend, the layout and the shapes. See
docs/kernels.md for the support matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class UnsupportedLayout(ValueError):
    """The engine's KV cache is in a form these kernels cannot serve (the message says which
    backend, layout, shapes and why)."""


@dataclass(frozen=True)
class AxisStrides:
    """Element offset and strides of K (or V) inside one layer tensor.

    A token offset inside a block contributes `(offset // offset_tile) * self.offset +
    (offset % offset_tile) * offset_inner`, a head-dim index likewise with `dim_tile` and
    `dim_inner`; tiles of 1 (the default) make both plain strides."""
    base: int           # element offset of (block 0, offset 0, head 0, dim 0)
    block: int          # stride between blocks
    offset: int         # stride between token offsets inside a block (between tiles if tiled)
    head: int           # stride between KV heads
    dim: int            # stride between head-dim elements (between tiles if tiled)
    offset_tile: int = 1    # tokens per tile (1: untiled)
    offset_inner: int = 0   # stride between tokens inside a tile
    dim_tile: int = 1       # head-dim elements per tile (1: untiled)
    dim_inner: int = 0      # stride between head-dim elements inside a tile

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.base, self.block, self.offset, self.head, self.dim)

    @property
    def tiled(self) -> bool:
        return self.offset_tile > 1 or self.dim_tile > 1


@dataclass(frozen=True)
class KVLayout:
    """Shape and strides of one engine's paged KV cache (all layers alike)."""
    name: str
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    layer_shape: tuple[int, ...]    # shape of one layer tensor (of K and of V when separate_kv)
    k: AxisStrides
    v: AxisStrides | None           # None: one latent vector per token (MLA), chunks [1, ...]
    separate_kv: bool = False
    strides: tuple[int, ...] | None = None   # strides of one layer tensor; None: contiguous

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{field} must be a positive int, got {value!r}")
        if self.strides is not None and len(self.strides) != len(self.layer_shape):
            raise ValueError(f"KVLayout {self.name}: strides {self.strides} do not match "
                             f"layer_shape {self.layer_shape}")
        if self.v is None and self.separate_kv:
            raise ValueError(f"KVLayout {self.name}: a K-only layout has no separate V tensor")
        extent = 1 + sum((n - 1) * s for n, s in zip(self.layer_shape, self.layer_strides()))
        for which, ax in zip("KV", self.kv_axes):
            if min(ax.offset_tile, ax.dim_tile) < 1 or self.block_size % ax.offset_tile \
                    or self.head_size % ax.dim_tile:
                raise ValueError(f"KVLayout {self.name}: {which} tiles ({ax.offset_tile} tokens, "
                                 f"{ax.dim_tile} dims) must divide block_size {self.block_size} "
                                 f"and head_size {self.head_size}")
            last = ax.base + sum((size - 1) * stride for _, size, stride in self._axes(ax))
            if ax.base < 0 or last >= extent or min(ax.block, ax.offset, ax.head, ax.dim,
                                                    ax.offset_inner, ax.dim_inner) < 0:
                raise ValueError(f"KVLayout {self.name}: {which} addresses [{ax.base}, {last}] "
                                 f"fall outside a layer tensor of {extent} elements")
            if not _one_to_one(self._axes(ax)):
                raise ValueError(f"KVLayout {self.name}: two {which} elements share an address")
        if self.v is not None and not self.separate_kv and not self._kv_disjoint():
            raise ValueError(f"KVLayout {self.name}: K and V overlap inside a layer tensor")

    def _axes(self, ax: AxisStrides) -> list[tuple[str, int, int]]:
        """(name, size, stride) of every index axis of K or V; axes of size 1 dropped."""
        axes = [("block", self.num_blocks, ax.block),
                ("offset", self.block_size // ax.offset_tile, ax.offset),
                ("offset_inner", ax.offset_tile, ax.offset_inner),
                ("head", self.num_kv_heads, ax.head),
                ("dim", self.head_size // ax.dim_tile, ax.dim),
                ("dim_inner", ax.dim_tile, ax.dim_inner)]
        return [a for a in axes if a[1] > 1]

    def _kv_disjoint(self) -> bool:
        """K and V of one tensor never share an address. Axes with the same stride in K and V
        form a lattice; what differs (a K/V shift, or K packed unlike V inside a record) is
        enumerated once as the innermost record, then the lattice must not overlap it."""
        ka, va = self._axes(self.k), self._axes(self.v)
        if ka == va:
            shift = abs(self.v.base - self.k.base)
            return _one_to_one(ka + [("kv", 2, shift)])
        common = [a for a in ka if a in va]
        addrs = [base + _grid([a for a in axes if a not in common])
                 for base, axes in ((self.k.base, ka), (self.v.base, va))]
        if sum(a.size for a in addrs) > 1 << 24:
            return False        # too large to check: refuse rather than risk K and V aliasing
        record = np.concatenate(addrs)
        if np.unique(record).size != record.size:
            return False
        return _one_to_one(common, int(record.max() - record.min()) + 1)

    # ----------------------------------------------------------------------------- derived
    @property
    def kv_axes(self) -> tuple[AxisStrides, ...]:
        """(K, V), or (K,) for a K-only (MLA) layout: chunk row i is kv_axes[i]."""
        return (self.k,) if self.v is None else (self.k, self.v)

    @property
    def num_kv(self) -> int:
        """Rows of the chunk's first axis: 2 (K, V), or 1 for a K-only (MLA) layout."""
        return len(self.kv_axes)

    @property
    def tiled(self) -> bool:
        return any(ax.tiled for ax in self.kv_axes)

    @property
    def num_slots(self) -> int:
        """Valid slots per layer: 0 <= slot < num_slots."""
        return self.num_blocks * self.block_size

    @property
    def hidden(self) -> int:
        """Elements of K (or V) per token per layer: num_kv_heads * head_size."""
        return self.num_kv_heads * self.head_size

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        """Shape of a gathered chunk: [2 (K, V), num_layers, num_tokens, H*D] ([1, ...] for a
        K-only layout)."""
        return (self.num_kv, self.num_layers, num_tokens, self.hidden)

    def layer_strides(self) -> tuple[int, ...]:
        """Strides of one layer tensor: `strides`, or those of a contiguous `layer_shape`."""
        if self.strides is not None:
            return self.strides
        strides, acc = [], 1
        for n in reversed(self.layer_shape):
            strides.append(acc)
            acc *= n
        return tuple(reversed(strides))

    # ----------------------------------------------------------------------------- layouts
    @classmethod
    def vllm_cpu(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_size: int, k_transposed: bool = True) -> "KVLayout":
        """vLLM CPU (`CPU_ATTN`, ISA vec / vec16): per layer `[B, H, bs, 2*D]`; inside one
        (block, head) record K is stored transposed as `[D, bs]` (`k_transposed=False` for
        `[bs, D]`), then V as `[bs, D]`. `from_vllm` derives this from the engine."""
        rec = 2 * block_size * head_size                       # one (block, head) record
        k_off, k_dim = (1, block_size) if k_transposed else (head_size, 1)
        return cls("vllm_cpu" if k_transposed else "vllm_cpu_k_rows", num_layers, num_blocks,
                   block_size, num_kv_heads, head_size,
                   layer_shape=(num_blocks, num_kv_heads, block_size, 2 * head_size),
                   k=AxisStrides(0, num_kv_heads * rec, k_off, rec, k_dim),
                   v=AxisStrides(block_size * head_size, num_kv_heads * rec, head_size, rec, 1))

    @classmethod
    def vllm_flash(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_size: int) -> "KVLayout":
        """Older vLLM GPU flash-attention (before 0.32): per layer `[2, B, bs, H, D]` (K plane,
        then V plane). vLLM 0.32 engines: `from_vllm`."""
        tok = num_kv_heads * head_size
        plane = num_blocks * block_size * tok
        return cls("vllm_flash", num_layers, num_blocks, block_size, num_kv_heads, head_size,
                   layer_shape=(2, num_blocks, block_size, num_kv_heads, head_size),
                   k=AxisStrides(0, block_size * tok, tok, head_size, 1),
                   v=AxisStrides(plane, block_size * tok, tok, head_size, 1))

    @classmethod
    def sglang_mha(cls, num_layers: int, num_tokens: int, num_kv_heads: int,
                   head_size: int) -> "KVLayout":
        """SGLang MHA token pool: per layer separate K and V buffers `[num_tokens, H, D]`; the slot
        is the token index (block_size 1)."""
        tok = num_kv_heads * head_size
        ax = AxisStrides(0, tok, 0, head_size, 1)
        return cls("sglang_mha", num_layers, num_tokens, 1, num_kv_heads, head_size,
                   layer_shape=(num_tokens, num_kv_heads, head_size), k=ax, v=ax, separate_kv=True)

    @classmethod
    def from_tensors(cls, kind: str, kv_caches, *, block_size: int | None = None,
                     num_kv_heads: int | None = None, head_size: int | None = None) -> "KVLayout":
        """Infer a layout of `kind` ("vllm_cpu", "vllm_flash", "sglang_mha") from the engine's
        tensors, then validate them against it. For vllm_cpu the tensor shape fixes everything;
        arguments given are checked against what the tensors say."""
        layers = split_layers(kv_caches, separate_kv=(kind == "sglang_mha"))
        if not layers:
            raise ValueError("from_tensors: kv_caches is empty")
        first = layers[0][0] if kind == "sglang_mha" else layers[0]
        shape = tuple(first.shape)
        if kind == "vllm_cpu":
            if len(shape) != 4 or shape[3] % 2:
                raise ValueError(f"vllm_cpu: expected per-layer [B, H, bs, 2*D], got {list(shape)}")
            got = dict(num_blocks=shape[0], num_kv_heads=shape[1], block_size=shape[2],
                       head_size=shape[3] // 2)
        elif kind == "vllm_flash":
            if len(shape) != 5 or shape[0] != 2:
                raise ValueError(f"vllm_flash: expected per-layer [2, B, bs, H, D], got {list(shape)}")
            got = dict(num_blocks=shape[1], block_size=shape[2], num_kv_heads=shape[3],
                       head_size=shape[4])
        elif kind == "sglang_mha":
            if len(shape) != 3:
                raise ValueError(f"sglang_mha: expected per-layer K, V [T, H, D], got {list(shape)}")
            got = dict(num_blocks=shape[0], block_size=1, num_kv_heads=shape[1], head_size=shape[2])
        else:
            raise ValueError(f"from_tensors: unknown layout kind {kind!r}; "
                             "choose vllm_cpu, vllm_flash or sglang_mha")
        for name, want in (("block_size", block_size), ("num_kv_heads", num_kv_heads),
                           ("head_size", head_size)):
            if want is not None and want != got[name]:
                raise ValueError(f"from_tensors: {name}={want} given but the tensors say {got[name]}")
        if kind == "sglang_mha":
            layout = cls.sglang_mha(len(layers), got["num_blocks"], got["num_kv_heads"],
                                    got["head_size"])
        else:
            layout = getattr(cls, kind)(len(layers), got["num_blocks"], got["block_size"],
                                        got["num_kv_heads"], got["head_size"])
        validate_caches(kv_caches, layout)
        return layout

    @classmethod
    def from_vllm(cls, kv_caches, backend, spec, kv_cache_layout=None, *,
                  cpu_isa: str | None = None) -> "KVLayout":
        """Derive the layout of one vLLM (0.32) KV cache group from what the engine says.

        kv_caches        the tensors vLLM registers with a connector ({layer name: tensor}, or
                         a list in layer order): each is the allocator's logical per-layer view
                         `[num_blocks, num_kv_heads, block_size, C]` (vLLM's `[B, H, N, C]`; the
                         physical order lives in its strides; layers may be views of one buffer
                         with a cross-layer stride; N is the kernel block size when vLLM splits
                         its blocks for the backend)
        backend          the group's attention backend class (or its `get_name()`)
        spec             the group's KV cache spec (an `AttentionSpec`: block_size,
                         num_kv_heads, head_size, head_size_v, dtype, kv_quant_mode, packing)
        kv_cache_layout  the resolved `KVCacheLayout` member (cache_config); its stride order
                         must be the tensors'; None: taken from the tensors as they are
        cpu_isa          CPU_ATTN only: the ISA its kernels pack the cache for (`layer.isa`)

        K and V are read off the logical view the way each backend's kernels read it: C holds K
        (`head_size`) then V (`head_size_v`) for FLASH_ATTN, FLASHINFER, TRITON_ATTN and
        FLEX_ATTENTION (`kv_cache.transpose(1, 2).split(head_size, -1)`); MLA latent caches hold
        one K-only vector per token; CPU_ATTN views each (block, head) record as `[2*N, D]`,
        K in the first half and V in the second, packed inside by its ISA (`CPU_ISA_PACKING`).
        The strides of every axis are the tensor's own. Raises `UnsupportedLayout` naming the
        backend, layout, shapes and reason for anything else."""
        tensors = list(kv_caches.values()) if isinstance(kv_caches, dict) else list(kv_caches)
        name = backend if isinstance(backend, str) else backend.get_name()
        layout_name = getattr(kv_cache_layout, "name", None) or "unresolved"
        where = (f"backend {name}, layout {layout_name}, "
                 f"{len(tensors)} layer tensors of shape "
                 f"{list(tensors[0].shape) if tensors else []}, strides "
                 f"{list(tensors[0].stride()) if tensors else []}, "
                 f"dtype {tensors[0].dtype if tensors else None}")

        def refuse(reason: str):
            return UnsupportedLayout(f"lmcache_lab cannot serve this KV cache ({where}): {reason}")

        if not tensors:
            raise refuse("no layer tensors")
        t0 = tensors[0]
        for t in tensors[1:]:
            if (t.shape, t.stride(), t.dtype, t.device) != (t0.shape, t0.stride(), t0.dtype,
                                                            t0.device):
                raise refuse(f"layers differ (one is {list(t.shape)} strides {list(t.stride())} "
                             f"{t.dtype} on {t.device}); one KV cache group of alike layers only")
        if t0.dim() != 4:
            raise refuse("expected the allocator's per-layer [B, H, N, C] view")
        if t0.dtype not in SUPPORTED_DTYPES:
            raise refuse(f"dtype {t0.dtype}: quantized KV caches are not served; "
                         f"supported: {', '.join(str(d) for d in SUPPORTED_DTYPES)}")
        quant = getattr(spec, "kv_quant_mode", None)
        if quant is not None and getattr(quant, "name", str(quant)) != "NONE":
            raise refuse(f"quantized KV cache ({getattr(quant, 'name', quant)})")
        for packing in ("state_content_bytes", "num_head_slots"):
            if getattr(spec, packing, None) is not None:
                raise refuse(f"packed KV cache ({packing}={getattr(spec, packing)})")
        if getattr(spec, "tokens_per_state", 1) != 1:
            raise refuse(f"{spec.tokens_per_state} tokens per stored state")
        if getattr(spec, "dtype", t0.dtype) != t0.dtype:
            raise refuse(f"the spec says dtype {spec.dtype}")

        nb, heads, n, c = t0.shape
        s_b, s_h, s_n, s_c = t0.stride()
        d = spec.head_size
        d_v = getattr(spec, "head_size_v", d)
        if heads != spec.num_kv_heads:
            raise refuse(f"{heads} heads in the tensor, the spec says {spec.num_kv_heads}")
        if c != d + d_v:
            raise refuse(f"content axis {c} != head_size {d} + head_size_v {d_v}")
        if spec.block_size % n:
            raise refuse(f"{n} tokens per tensor block do not divide the block size "
                         f"{spec.block_size}")
        if kv_cache_layout is not None:
            # vLLM's logical [L, B, H, N, C]: the layer stride is the distance between layers
            # when they are evenly spaced views of one buffer (as vLLM allocates them)
            sizes, strides = (len(tensors), *t0.shape), (_layer_gap(tensors), *t0.stride())
            order = tuple(kv_cache_layout.stride_order)           # logical axes, outermost first
            seen = [strides[i] for i in order if sizes[i] > 1 and strides[i] is not None]
            if any(a <= b for a, b in zip(seen, seen[1:])):
                raise refuse(f"the strides (layers {strides[0]} apart) do not follow "
                             f"{layout_name}'s physical order "
                             f"{''.join('LBHNC'[i] for i in order)}")
            supported = None if isinstance(backend, str) else backend.supported_kv_cache_layouts()
            if supported is not None and kv_cache_layout not in supported:
                raise refuse(f"{name} lists layouts {[m.name for m in supported]} only")

        if name in VLLM_SPLIT_KV:
            if d_v != d:
                raise refuse(f"head_size_v {d_v} != head_size {d}")
            k = AxisStrides(0, s_b, s_n, s_h, s_c)
            v = AxisStrides(d * s_c, s_b, s_n, s_h, s_c)
            label = f"vllm:{name}:{layout_name}"
        elif name in VLLM_MLA_LATENT:
            if d_v != 0 or heads != 1:
                raise refuse(f"an MLA latent cache has one head and no V "
                             f"(heads {heads}, head_size_v {d_v})")
            k, v = AxisStrides(0, s_b, s_n, s_h, s_c), None
            label = f"vllm:{name}:{layout_name}"
        elif name == "CPU_ATTN":
            if d_v != d:
                raise refuse(f"head_size_v {d_v} != head_size {d}")
            if s_c != 1 or s_n != c:
                raise refuse("CPU_ATTN views each (block, head) record as [2*N, D]: N and C "
                             "must be contiguous")
            if cpu_isa not in CPU_ISA_PACKING:
                raise refuse(f"CPU ISA {cpu_isa!r}: its packing of K and V is unknown here; "
                             f"known: {', '.join(CPU_ISA_PACKING)}")
            pack, only = CPU_ISA_PACKING[cpu_isa]
            if only is not None and only != t0.dtype:
                raise refuse(f"ISA {cpu_isa} packs {only} only")
            k, v = pack(n, d, s_b, s_h)
            label = f"vllm:{name}:{layout_name}:{cpu_isa}"
        else:
            raise refuse(f"the KV format of backend {name} is unknown to lmcache_lab; served: "
                         f"{', '.join(sorted(VLLM_SPLIT_KV | VLLM_MLA_LATENT | {'CPU_ATTN'}))}")
        strides = None if t0.is_contiguous() else tuple(t0.stride())
        try:
            layout = cls(label, len(tensors), nb, n, heads, d, layer_shape=tuple(t0.shape),
                         k=k, v=v, strides=strides)
            validate_caches(tensors, layout)
        except (TypeError, ValueError) as e:
            raise refuse(str(e)) from e
        return layout


# ================================================================================ vLLM facts
# vLLM 0.32, read from its code (tests/kernels/test_vllm_layouts.py checks each against vLLM's own
# allocation and write paths). Backends whose per-layer cache is the allocator's [B, H, N, C]
# view with C = K then V: their kernels read `kv_cache.transpose(1, 2).split(head_size, dim=-1)`.
VLLM_SPLIT_KV = frozenset({"FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION"})
# MLA backends whose cache is the plain latent [B, 1, N, kv_lora_rank + rope_dim], one row per
# token slot (written by `concat_and_cache_mla` on CUDA, CPU_MLA by plain indexing, AMX_MLA by
# `concat_and_cache_mla_cpu`; AMX_MLA's kernels read it as `view(-1, 1, 576)`).
VLLM_MLA_LATENT = frozenset({"CPU_MLA", "AMX_MLA", "TRITON_MLA", "FLASHMLA", "CUTLASS_MLA",
                             "FLASHINFER_MLA", "FLASH_ATTN_MLA"})


def _cpu_vec(n: int, d: int, s_b: int, s_h: int) -> tuple[AxisStrides, AxisStrides]:
    """vec / vec16: inside each (block, head) record of 2*N*D elements, K is stored transposed
    `[D, N]`, then V as rows `[N, D]`."""
    return AxisStrides(0, s_b, 1, s_h, n), AxisStrides(n * d, s_b, d, s_h, 1)


def _cpu_amx(n: int, d: int, s_b: int, s_h: int) -> tuple[AxisStrides, AxisStrides]:
    """amx (bf16): K in tiles of 16 tokens, each `[D/2, 16, 2]` (pairs of dims, VNNI); V in tiles
    of 16 dims, each `[N/2, 16, 2]` (pairs of tokens)."""
    k = AxisStrides(0, s_b, 16 * d, s_h, 32, offset_tile=16, offset_inner=2, dim_tile=2,
                    dim_inner=1)
    v = AxisStrides(n * d, s_b, 32, s_h, 16 * n, offset_tile=2, offset_inner=1, dim_tile=16,
                    dim_inner=2)
    return k, v


# CPU_ATTN ISA (`layer.isa`, chosen by vLLM's `_get_attn_isa`) -> how its C++ kernels
# (`cpu_attn_reshape_and_cache`) pack K and V inside a record, and the one dtype it packs (or None)
CPU_ISA_PACKING = {"vec": (_cpu_vec, None), "vec16": (_cpu_vec, None),
                   "amx": (_cpu_amx, torch.bfloat16)}


def _layer_gap(tensors) -> int | None:
    """Elements between consecutive layer tensors when they are evenly spaced views of one
    storage (vLLM's KV cache buffer), else None."""
    if len(tensors) < 2:
        return None
    size, ptr = tensors[0].element_size(), tensors[0].data_ptr()
    gap, rem = divmod(tensors[1].data_ptr() - ptr, size)
    storage = tensors[0].untyped_storage().data_ptr()
    if rem or any(t.data_ptr() - ptr != i * gap * size or t.untyped_storage().data_ptr() != storage
                  for i, t in enumerate(tensors)):
        return None
    return gap


def _grid(axes) -> np.ndarray:
    """int64 [prod sizes]: every sum of index * stride over `axes` ((name, size, stride))."""
    out = np.zeros(1, dtype=np.int64)
    for _, size, stride in axes:
        out = (out[:, None] + np.arange(size, dtype=np.int64)[None, :] * stride).reshape(-1)
    return out


def _one_to_one(axes, extent: int = 1) -> bool:
    """Sufficient condition for a strided map to hit distinct addresses: sorted by stride, every
    axis steps past all that the smaller axes (and an innermost record of `extent`) cover."""
    for _, size, stride in sorted(axes, key=lambda a: a[2]):
        if stride < extent:
            return False
        extent = stride * (size - 1) + extent
    return True


def split_layers(kv_caches, separate_kv: bool) -> list:
    """Normalise `kv_caches` to a list with one entry per layer: a tensor, or a (k, v) pair."""
    if isinstance(kv_caches, torch.Tensor):
        if separate_kv:
            raise TypeError("kv_caches: a separate-K/V layout needs a list of (k, v) pairs per "
                            "layer, not one tensor")
        return list(kv_caches.unbind(0))
    if not isinstance(kv_caches, Sequence):
        raise TypeError(f"kv_caches: expected a list of per-layer tensors, got {type(kv_caches).__name__}")
    return list(kv_caches)


def validate_caches(kv_caches, layout: KVLayout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check every layer tensor against `layout`; return per-layer (K tensor, V tensor) (the same
    tensor twice when K and V share one). Raises TypeError/ValueError naming what is wrong."""
    if isinstance(kv_caches, torch.Tensor) and not layout.separate_kv:
        want = (layout.num_layers, *layout.layer_shape)
        if tuple(kv_caches.shape) != want:
            raise ValueError(f"kv_caches: stacked tensor has shape {list(kv_caches.shape)}, "
                             f"layout {layout.name} expects {list(want)}")
    layers = split_layers(kv_caches, layout.separate_kv)
    if len(layers) != layout.num_layers:
        raise ValueError(f"kv_caches: {len(layers)} layers given, layout {layout.name} has "
                         f"{layout.num_layers}")
    pairs = []
    for i, entry in enumerate(layers):
        if layout.separate_kv:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise TypeError(f"kv_caches[{i}]: layout {layout.name} needs a (k, v) pair per layer")
            pairs.append((entry[0], entry[1]))
        else:
            pairs.append((entry, entry))
    ref = pairs[0][0]
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"kv_caches[0]: expected a torch.Tensor, got {type(ref).__name__}")
    if ref.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"kv_caches: dtype {ref.dtype} is not supported; use one of "
                        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    strides = layout.layer_strides()
    for i, pair in enumerate(pairs):
        for which, t in zip(("k", "v") if layout.separate_kv else ("",), pair):
            where = f"kv_caches[{i}]{'.' + which if which else ''}"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != ref.dtype:
                raise TypeError(f"{where}: dtype {t.dtype} differs from layer 0's {ref.dtype}")
            if t.device != ref.device:
                raise ValueError(f"{where}: on {t.device}, layer 0 is on {ref.device}")
            if tuple(t.shape) != layout.layer_shape:
                raise ValueError(f"{where}: shape {list(t.shape)} does not match layout "
                                 f"{layout.name} per-layer shape {list(layout.layer_shape)}")
            if layout.strides is None:
                if not t.is_contiguous():
                    raise ValueError(f"{where}: not contiguous (strides {t.stride()}, expected "
                                     f"{strides})")
            elif any(n > 1 and s != w for n, s, w in zip(t.shape, t.stride(), strides)):
                raise ValueError(f"{where}: strides {t.stride()} differ from layout "
                                 f"{layout.name}'s {strides}")
    return pairs
