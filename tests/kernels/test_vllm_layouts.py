"""`KVLayout.from_vllm` against the installed vLLM's own code, for every attention backend and
KVCacheLayout lmcache_lab serves.

Each case builds the KV cache the way vLLM 0.32 does (the backend's `customize_spec`, vLLM's
`get_kv_cache_config_from_groups`, `prepare_kernel_block_sizes` and `allocate_kv_cache`, on CPU
tensors), writes every slot through the backend's own `do_kv_cache_update` (its view of the
cache: `transpose(1, 2).split(head_size)` for the GPU backends, whose CUDA copy op is replaced by
its documented contract; the real CPU op for CPU_ATTN and its ISAs; CPU_MLA's torch write;
AMX_MLA's CPU op on CPUs with AMX tiles), with
each element's bits encoding (layer, slot, head, dim, K/V). Then:
  * gather through the derived layout == the encoded values, bit for bit (torch path on every
    case, the Triton interpreter on a subset);
  * scatter of those values into a fresh cache == vLLM writing them, byte for byte over the
    whole buffer;
  * a wrong stride order, a wrong ISA, a wrong derivation are caught.
If vLLM's layout code and ours disagree, these fail.

The first section needs no vLLM (the GPU check machine has none): derived layouts of hand-built
tensors in every stride order, tiled (AMX) and K-only (MLA), Triton kernel == torch path ==
reference, compiled there.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import time
import types
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from lmcache_lab.kernels.layout import KVLayout, UnsupportedLayout
from lmcache_lab.kernels.paged import gather, scatter

try:
    from vllm.config import VllmConfig
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends import flash_attn, triton_attn
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.flex_attention import FlexAttentionBackend
    from vllm.v1.attention.backends.mla.amx_mla import AMXMLABackend
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheGroupSpec, KVQuantMode,
                                            MLAAttentionSpec)
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import (allocate_kv_cache, customize_attention_spec,
                                      prepare_kernel_block_sizes)
    HAVE_VLLM = True
except ImportError:           # the GPU check machine: only the vLLM-free section runs
    HAVE_VLLM = False
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="needs the installed vLLM")
# kernels/gpu_check.sh maps only lmcache_lab.kernels (no connector) into its overlay
needs_connector = pytest.mark.skipif(
    not HAVE_VLLM or importlib.util.find_spec("lmcache_lab.integrations") is None,
    reason="needs the installed vLLM and lmcache_lab's connector")

CPU = torch.device("cpu")
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_OF[t.dtype])


# ================================================================================ without vLLM
# vLLM 0.32's KVCacheLayout stride orders of the logical [L, B, H, N, C] (checked against vLLM's
# enum below when it is installed), to build its caches by hand where vLLM is absent.
ORDERS = {"LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "LHBNC": (0, 2, 1, 3, 4),
          "BLHNC": (1, 0, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4), "BHLNC": (1, 2, 0, 3, 4)}


def hand_built(order: str, layers: int, blocks: int, heads: int, n: int, c: int,
               dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Per-layer [B, H, N, C] views of one random buffer laid out in `order` (the strides vLLM's
    `compute_layout_strides` gives an unpadded cache)."""
    shape, strides, acc = (layers, blocks, heads, n, c), [0] * 5, 1
    for dim in reversed(ORDERS[order]):
        strides[dim], acc = acc, acc * shape[dim]
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(acc, generator=g).to(dtype).to(torch.get_default_device())
    return [buf.as_strided(shape[1:], strides[1:], layer * strides[0]) for layer in range(layers)]


HAND_CASES = [  # (backend, order, ISA, heads, head size, block size, dtype)
    ("FLASH_ATTN", "LBHNC", None, 2, 64, 16, torch.float16),
    ("FLASH_ATTN", "LBNHC", None, 1, 32, 16, torch.float32),
    ("FLASH_ATTN", "LHBNC", None, 3, 16, 16, torch.bfloat16),
    ("FLASH_ATTN", "BLHNC", None, 2, 32, 16, torch.float32),
    ("FLASH_ATTN", "BLNHC", None, 2, 16, 32, torch.bfloat16),
    ("FLASH_ATTN", "BHLNC", None, 1, 64, 16, torch.float16),
    ("CPU_ATTN", "LBHNC", "vec", 2, 32, 32, torch.float32),
    ("CPU_ATTN", "LBHNC", "amx", 2, 64, 32, torch.bfloat16),
    ("CPU_MLA", "LBNHC", None, 1, 40, 16, torch.float16),
    ("CPU_MLA", "BLHNC", None, 1, 24, 16, torch.float32),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name,order,isa,heads,d,n,dtype", HAND_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{str(c[6])[6:]}" for c in HAND_CASES])
def test_hand_built_derived_layouts_kernel_equals_reference(name, order, isa, heads, d, n, dtype,
                                                            backend):
    """Layouts `from_vllm` derives (strided cross-layer views, AMX tiles, K-only) are copied by
    the Triton kernel and the torch path exactly as the reference formula says."""
    mla = name == "CPU_MLA"
    layers, blocks, c = 3, 3, d if mla else 2 * d
    spec = SimpleNamespace(block_size=n, num_kv_heads=heads, head_size=d,
                           head_size_v=0 if mla else d, dtype=dtype)
    layout = SimpleNamespace(name=order, stride_order=ORDERS[order])
    caches = hand_built(order, layers, blocks, heads, n, c, dtype, seed=0)
    derived = KVLayout.from_vllm(caches, name, spec, layout, cpu_isa=isa)
    assert derived.num_kv == (1 if mla else 2) and derived.tiled == (isa == "amx")
    slots = torch.tensor([n - 2, n - 1, n, -1, 2 * n + 3, 0, 3 * n - 1, n + 5], dtype=torch.int64)
    want = gather(caches, derived, slots, backend="reference")
    got = gather(caches, derived, slots, backend=backend)
    assert torch.equal(bits(got), bits(want))
    ours = hand_built(order, layers, blocks, heads, n, c, dtype, seed=1)
    ref = hand_built(order, layers, blocks, heads, n, c, dtype, seed=1)
    scatter(want, ours, derived, slots, backend=backend)
    scatter(want, ref, derived, slots, backend="reference")
    assert torch.equal(bits(_buffer(ours[0], dtype)), bits(_buffer(ref[0], dtype)))
    assert torch.equal(bits(gather(ours, derived, slots, backend="reference")), bits(want))


def _buffer(view: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=view.device).set_(view.untyped_storage())


def test_hand_built_orders_are_vllms():
    if HAVE_VLLM:
        assert ORDERS == {m.name: m.stride_order for m in KVCacheLayout}



# ====================================================================================== backends
class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`flashinfer` (a CUDA package) is not installed here; vLLM's FlashInfer backend module
    imports it at the top. Stub modules let that module load: the parts used below (the backend's
    layout/dtype/block-size declarations, `customize_spec`, `do_kv_cache_update`) call nothing
    of flashinfer's for an unquantized cache."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "flashinfer" or fullname.startswith("flashinfer."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = lambda name: mock.MagicMock(name=f"{spec.name}.{name}")
        return module

    def exec_module(self, module):
        module.__path__ = []


def _flashinfer_backend():
    finder = _StubFinder()
    saved = {k: v for k, v in sys.modules.items() if k.startswith("flashinfer")}
    sys.meta_path.insert(0, finder)
    try:
        from vllm.v1.attention.backends.flashinfer import FlashInferBackend
        return FlashInferBackend
    finally:
        sys.meta_path.remove(finder)
        for k in [k for k in sys.modules if k.startswith("flashinfer")]:
            del sys.modules[k]
        sys.modules.update(saved)


GPU_BACKENDS = {b.get_name(): b for b in (
    flash_attn.FlashAttentionBackend, _flashinfer_backend(), triton_attn.TritonAttentionBackend,
    FlexAttentionBackend)} if HAVE_VLLM else {}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, *args):
    """The contract of vLLM's CUDA `reshape_and_cache_flash` (and its Triton twin): caches are
    `[num_blocks, block_size, H, D]` views; token i goes to slot `slot_mapping[i]`, skipped when
    negative."""
    bs = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache[slots // bs, slots % bs] = key[keep]
    value_cache[slots // bs, slots % bs] = value[keep]


@pytest.fixture(autouse=True)
def _cuda_copy_ops_on_cpu(monkeypatch):
    if not HAVE_VLLM:
        return
    # flash_attn imports the op only where FlashAttention is available (not on CPU)
    monkeypatch.setattr(flash_attn, "reshape_and_cache_flash", reshape_and_cache_flash,
                        raising=False)
    monkeypatch.setattr(triton_attn, "triton_reshape_and_cache_flash", reshape_and_cache_flash)
    monkeypatch.setattr(torch.ops._C_cache_ops, "reshape_and_cache_flash",
                        reshape_and_cache_flash, raising=False)


# ====================================================================================== cases
@dataclasses.dataclass(frozen=True)
class Case:
    backend: str             # get_name()
    layout: str              # KVCacheLayout member name
    dtype: torch.dtype
    heads: int
    head_size: int
    block_size: int
    isa: str | None = None   # CPU_ATTN's ISA
    layers: int = 2
    blocks: int = 3

    @property
    def cls(self):
        return {"CPU_ATTN": CPUAttentionBackend, "CPU_MLA": CPUMLABackend,
                "AMX_MLA": AMXMLABackend}.get(self.backend) or GPU_BACKENDS[self.backend]

    @property
    def mla(self) -> bool:
        return self.backend in MLA_BLOCK_SIZES

    def __str__(self):
        dt = str(self.dtype).removeprefix("torch.")
        isa = f"-{self.isa}" if self.isa else ""
        return (f"{self.backend}{isa}-{self.layout}-{dt}-H{self.heads}-D{self.head_size}"
                f"-bs{self.block_size}")


def spec_of(case: Case):
    if case.mla:
        spec = MLAAttentionSpec(block_size=case.block_size, num_kv_heads=1,
                                head_size=case.head_size, dtype=case.dtype)
    else:
        spec = FullAttentionSpec(block_size=case.block_size, num_kv_heads=case.heads,
                                 head_size=case.head_size, dtype=case.dtype)
    return customize_attention_spec(case.cls, spec)


def allocate(case: Case):
    """{layer name: tensor} as vLLM's GPU/CPU model runner hands them to a connector, the group's
    spec and the resolved layout."""
    layout = KVCacheLayout[case.layout]
    spec = spec_of(case)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(case.layers)]
    groups = [KVCacheGroupSpec(names, spec)]
    config = VllmConfig()
    config.cache_config.kv_cache_layout = layout.name
    kv_config = get_kv_cache_config_from_groups(
        config, groups, available_memory=case.blocks * case.layers * spec.page_size_bytes)
    assert kv_config.num_blocks == case.blocks
    attn_groups = [[SimpleNamespace(backend=case.cls, kv_cache_spec=spec)]]
    kernel_block_sizes = prepare_kernel_block_sizes(kv_config, attn_groups)
    return allocate_kv_cache(kv_config, CPU, layout, kernel_block_sizes), spec, layout


def vllm_supports(case: Case) -> bool:
    """What vLLM itself accepts for this backend: dtype, head size, block size (through its
    kernel-block selection), layout."""
    cls = case.cls
    if not cls.supports_dtype(case.dtype) or not cls.supports_head_size(case.head_size):
        return False
    layouts = cls.supported_kv_cache_layouts()
    if layouts is not None and KVCacheLayout[case.layout] not in layouts:
        return False
    try:
        allocate(dataclasses.replace(case, layers=1, blocks=1))
    except (ValueError, AssertionError):
        return False
    return True


# the CPU MLA backends (latent width 576) and the block sizes they take: CPU_MLA's decode kernel
# compiles for 16 only, AMX_MLA takes multiples of 32 (vLLM's CPU default is 128)
MLA_BLOCK_SIZES = {"CPU_MLA": [16], "AMX_MLA": [32, 128]}

# (heads, head size, block size): one KV head, head sizes 64/128/256, block sizes 16/64/128
SHAPES = [(1, 64, 16), (2, 128, 64), (1, 256, 128), (3, 64, 128), (2, 256, 16), (1, 128, 64)]


def _first_supported(backend, layout, dtype, start, shapes=SHAPES, **kw):
    for i in range(len(shapes)):
        h, d, bs = shapes[(start + i) % len(shapes)]
        case = Case(backend, layout, dtype, h, d, bs, **kw)
        if vllm_supports(case):
            return case
    return None


def _matrix() -> list[Case]:
    """Every backend x every layout it supports x every dtype it supports, one shape each
    (rotating through SHAPES); CPU_ATTN per ISA; the CPU MLA backends on the layer-compact
    layouts (their write paths view a layer as [B*N, C])."""
    cases, i = [], 0
    for name in GPU_BACKENDS:
        for layout in KVCacheLayout:
            for dtype in DTYPES:
                case = _first_supported(name, layout.name, dtype, i)
                if case is not None:
                    cases.append(case)
                    i += 1
    cpu_shapes = {"vec": [(1, 64, 128), (2, 128, 32), (1, 256, 64)],
                  "vec16": [(1, 80, 32), (2, 112, 128)],      # head sizes % 32 != 0
                  "amx": [(1, 64, 32), (2, 128, 128), (1, 256, 64)]}
    for isa, shapes in cpu_shapes.items():
        for j, dtype in enumerate([torch.bfloat16] if isa == "amx" else DTYPES):
            for k in range(len(shapes) if isa == "amx" else 1):
                case = _first_supported("CPU_ATTN", "LBHNC", dtype, j + k, shapes, isa=isa)
                if case is not None:
                    cases.append(case)
    for backend, block_sizes in MLA_BLOCK_SIZES.items():
        for layout in KVCacheLayout:
            if layout.is_layer_compact:
                for dtype in DTYPES:
                    for bs in block_sizes:
                        case = Case(backend, layout.name, dtype, 1, 576, bs)
                        if vllm_supports(case):
                            cases.append(case)
    return cases


def _shape_sweep() -> list[Case]:
    """Every shape on each GPU backend's preferred layout (bf16)."""
    cases = []
    for name, cls in GPU_BACKENDS.items():
        layout = (cls.supported_kv_cache_layouts() or [KVCacheLayout.LBNHC])[0]
        for h, d, bs in SHAPES:
            case = Case(name, layout.name, torch.bfloat16, h, d, bs)
            if vllm_supports(case):
                cases.append(case)
    return cases


MATRIX = _matrix() if HAVE_VLLM else []
SWEEP = [c for c in _shape_sweep() if c not in MATRIX] if HAVE_VLLM else []
# interpreter subset: one case per backend (cross-layer layouts among them), every CPU ISA, MLA
_TRITON_PICKS = {("FLASH_ATTN", "BLNHC"), ("FLASHINFER", "BHLNC"), ("TRITON_ATTN", "LHBNC"),
                 ("FLEX_ATTENTION", "LBNHC"), ("CPU_ATTN", "LBHNC"), ("CPU_MLA", "LBNHC"),
                 ("AMX_MLA", "LBNHC")}
_picked: dict[tuple, Case] = {}
for _c in MATRIX:
    if (_c.backend, _c.layout) in _TRITON_PICKS:
        _picked.setdefault((_c.backend, _c.layout, _c.isa), _c)
TRITON_CASES = list(_picked.values())


# ====================================================================================== values
def encode(case: Case, layer: int, slots: torch.Tensor, kv: int, width: int) -> torch.Tensor:
    """[N, H, width] values whose bits encode (layer, slot, head, dim, K/V): the index itself
    for fp32, a 15-bit hash of it for 16-bit dtypes; always a finite normal number."""
    h = 1 if case.mla else case.heads
    head = torch.arange(h).view(1, h, 1)
    dim = torch.arange(width).view(1, 1, width)
    idx = (((layer * 1_000_003 + slots.view(-1, 1, 1)) * 64 + head) * 1024 + dim) * 2 + kv
    if case.dtype == torch.float32:
        bits = (idx % (1 << 29)) + 0x3F800000                        # [1, 2^30) as fp32
        return bits.to(torch.int32).view(torch.float32)
    mixed = (idx * 2654435761) >> 7
    bits = mixed % 0x3C00 + 0x0400 if case.dtype == torch.float16 else mixed % 0x7E00 + 0x0080
    return bits.to(torch.int16).view(case.dtype)


def kv_values(case: Case, layer: int, slots: torch.Tensor):
    """(K, V) [N, H, D] of `layer` at `slots` (V None for MLA)."""
    if case.mla:
        return encode(case, layer, slots, 0, case.head_size), None
    return (encode(case, layer, slots, 0, case.head_size),
            encode(case, layer, slots, 1, case.head_size))


def vllm_write(case: Case, kv_caches: dict, slots: torch.Tensor) -> None:
    """Write every layer's K/V at `slots` through the backend's own `do_kv_cache_update`; skips
    the test where vLLM's CPU op cannot write the case's ISA on this machine."""
    if case.isa is not None and not cpu_isa_writes(case.isa):
        pytest.skip(f"vLLM's CPU attention op refuses the {case.isa} packing on this CPU "
                    f"(AVX-512: {torch.cpu._is_avx512_supported()})")
    if case.backend == "AMX_MLA" and not torch.cpu._is_amx_tile_supported():
        # vLLM picks AMX_MLA only where AMX tiles are (`CpuPlatform.get_attn_backend_cls`);
        # its cache-write op is built for those CPUs
        pytest.skip("AMX_MLA's cache-write op needs AMX tiles, which this CPU lacks")
    _vllm_write(case, kv_caches, slots)


@functools.cache
def cpu_isa_writes(isa: str) -> bool:
    """Whether vLLM's CPU attention op writes `isa`'s cache packing on this machine: its amx
    packing is compiled for AVX-512 CPUs and refused elsewhere ("Unsupported CPU attention
    configuration"). Asked of the op itself, with one token."""
    dtype = torch.bfloat16 if isa == "amx" else torch.float32
    case = Case("CPU_ATTN", "LBHNC", dtype, 1, 64, 32, isa=isa)
    kv, _, _ = allocate(case)
    try:
        _vllm_write(case, kv, torch.zeros(1, dtype=torch.int64))
    except RuntimeError as e:
        if "Unsupported CPU attention configuration" in str(e):
            return False
        raise
    return True


def _vllm_write(case: Case, kv_caches: dict, slots: torch.Tensor) -> None:
    impl = object.__new__(case.cls.get_impl_cls())
    for layer, t in enumerate(kv_caches.values()):
        k, v = kv_values(case, layer, slots)
        if case.mla:
            # MLAAttention.bind_kv_cache: [B, H=1, N, C] -> [B, N, C]
            lora = case.head_size - 64
            impl.do_kv_cache_update(k[:, 0, :lora].contiguous(), k[:, :, lora:].contiguous(),
                                    t.squeeze(1), slots, "auto", torch.ones(()))
            continue
        layer_obj = SimpleNamespace(isa=case.isa, _k_scale_float=1.0, _v_scale_float=1.0,
                                    _k_scale=torch.ones(()), _v_scale=torch.ones(()))
        impl.attn_type = AttentionType.DECODER
        impl.head_size = case.head_size
        impl.num_kv_heads = case.heads
        impl.kv_cache_dtype = impl.cache_dtype = "auto"
        impl.kv_sharing_target_layer_name = None
        impl.nvfp4_fa2 = impl.is_kvcache_nvfp4 = impl._is_per_token_head_quant = False
        impl.do_kv_cache_update(layer_obj, k, v, t, slots)


def derive(case: Case, kv_caches, spec, layout, isa: str | None = None) -> KVLayout:
    return KVLayout.from_vllm(kv_caches, case.cls, spec, layout, cpu_isa=isa or case.isa)


def chunk_slots(case: Case, num_slots: int, bs: int) -> torch.Tensor:
    """A chunk's slot mapping: a run across a block boundary, a whole block, scattered slots
    and padding."""
    run = list(range(bs - 3, bs + 2))
    block = list(range(2 * bs, 3 * bs))[::-1] if num_slots >= 3 * bs else []
    scattered = [s for s in (num_slots - bs - 1, 1, bs + 5) if s not in run + block]
    return torch.tensor(run + [-1] + block + scattered + [-1], dtype=torch.int64)


def storage_bytes(kv_caches: dict) -> torch.Tensor:
    """The whole backing buffer of vLLM's allocation, as bytes."""
    first = next(iter(kv_caches.values()))
    return torch.empty(0, dtype=torch.uint8).set_(first.untyped_storage())


# ====================================================================================== checks
def check(case: Case, backend: str) -> None:
    kv, spec, layout = allocate(case)
    first = next(iter(kv.values()))
    num_slots = first.shape[0] * first.shape[2]
    everything = torch.randperm(num_slots, generator=torch.Generator().manual_seed(0))
    vllm_write(case, kv, everything)
    derived = derive(case, kv, spec, layout)
    assert derived.num_slots == num_slots and derived.num_layers == case.layers

    # gather through the derived layout == what vLLM wrote, bit for bit
    slots = chunk_slots(case, num_slots, derived.block_size)
    chunk = gather(list(kv.values()), derived, slots, backend=backend)
    valid = slots >= 0
    for layer in range(case.layers):
        for row, want in enumerate(kv_values(case, layer, slots[valid])):
            if want is None:
                continue
            got = chunk[row, layer][valid]
            assert torch.equal(bits(got), bits(want.reshape(got.shape))), (case, layer, row)
            assert torch.all(bits(chunk[row, layer][~valid]) == 0)

    # scatter into a fresh allocation == vLLM writing the same values there, byte for byte
    distinct = slots[valid]
    ours, _, _ = allocate(case)
    scatter(chunk[:, :, valid].contiguous(), list(ours.values()), derived, distinct,
            backend=backend)
    theirs, _, _ = allocate(case)
    vllm_write(case, theirs, distinct)
    assert torch.equal(storage_bytes(ours), storage_bytes(theirs)), case


@pytest.mark.parametrize("case", MATRIX + SWEEP, ids=str)
def test_torch_path_reads_and_writes_what_vllm_does(case):
    check(case, "torch")


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_kernel_reads_and_writes_what_vllm_does(case):
    check(case, "triton")


@needs_vllm
def test_matrix_covers_every_backend_and_layout():
    """The served matrix spans each backend's supported layouts, every CPU ISA lmcache_lab
    knows, and both CPU MLA backends' latent cache."""
    got = {(c.backend, c.layout) for c in MATRIX}
    for name, cls in GPU_BACKENDS.items():
        for layout in cls.supported_kv_cache_layouts() or KVCacheLayout:
            assert (name, layout.name) in got
    assert {c.isa for c in MATRIX if c.backend == "CPU_ATTN"} == {"vec", "vec16", "amx"}
    assert {c.backend for c in MATRIX if c.mla} == set(MLA_BLOCK_SIZES)
    assert {c.dtype for c in MATRIX} == set(DTYPES)


@needs_vllm
def test_cpu_vec_is_the_measured_vllm_cpu_layout():
    case = Case("CPU_ATTN", "LBHNC", torch.float32, 2, 64, 128, isa="vec")
    kv, spec, layout = allocate(case)
    derived = derive(case, kv, spec, layout)
    legacy = KVLayout.vllm_cpu(case.layers, case.blocks, 128, 2, 64)
    assert (derived.k, derived.v, derived.layer_shape) == (legacy.k, legacy.v, legacy.layer_shape)


# ====================================================================================== refusals
def _fresh(case: Case):
    kv, spec, layout = allocate(case)
    vllm_write(case, kv, torch.arange(next(iter(kv.values())).shape[0] * case.block_size))
    return kv, spec, layout


@needs_vllm
@pytest.mark.parametrize("actual", ["LBNHC", "BLHNC", "BHLNC"])
def test_a_wrong_stride_order_is_refused(actual):
    """Tensors allocated in one layout are refused when vLLM is said to use another (each of
    the six orders is told apart, the layer axis included)."""
    case = Case("FLASH_ATTN", actual, torch.bfloat16, 2, 64, 16)
    kv, spec, _ = allocate(case)
    for other in KVCacheLayout:
        if other.name != actual:
            with pytest.raises(UnsupportedLayout, match=f"do not follow {other.name}"):
                KVLayout.from_vllm(kv, case.cls, spec, other)
    assert KVLayout.from_vllm(kv, case.cls, spec, KVCacheLayout[actual]).name.endswith(actual)


@needs_vllm
def test_a_wrong_derivation_fails_the_check():
    """The check above has teeth: K and V read the wrong way round no longer match what vLLM
    wrote (nor does CPU K read with another ISA's packing: the next test); K with its head and
    offset strides swapped aliases (offsets are 2 heads apart here) and is refused by KVLayout
    itself."""
    case = Case("FLASH_ATTN", "LBNHC", torch.float32, 2, 64, 16)
    kv, spec, layout = _fresh(case)
    right = derive(case, kv, spec, layout)
    slots = torch.tensor([0, 1, 17, 30], dtype=torch.int64)
    want = kv_values(case, 1, slots)[0].reshape(4, -1)
    assert torch.equal(gather(list(kv.values()), right, slots)[0, 1], want)
    swapped = dataclasses.replace(right, k=right.v, v=right.k)
    assert not torch.equal(gather(list(kv.values()), swapped, slots)[0, 1], want)
    with pytest.raises(ValueError, match="two K elements share an address"):
        dataclasses.replace(right, k=dataclasses.replace(right.k, head=right.k.offset,
                                                         offset=right.k.head))


@needs_vllm
def test_cpu_k_read_with_another_isas_packing_fails_the_check():
    cpu = Case("CPU_ATTN", "LBHNC", torch.bfloat16, 1, 64, 32, isa="amx")
    kv, spec, layout = _fresh(cpu)
    slots = torch.arange(40, dtype=torch.int64)
    want = kv_values(cpu, 0, slots)[0].reshape(40, -1)
    got_amx = gather(list(kv.values()), derive(cpu, kv, spec, layout), slots)[0, 0]
    got_vec = gather(list(kv.values()), derive(cpu, kv, spec, layout, isa="vec"), slots)[0, 0]
    assert torch.equal(bits(got_amx), bits(want)) and not torch.equal(bits(got_vec), bits(want))


@needs_vllm
def test_unservable_caches_are_refused_with_the_reason():
    case = Case("FLASH_ATTN", "LBNHC", torch.bfloat16, 2, 64, 16)
    kv, spec, layout = allocate(case)
    fp8 = dataclasses.replace(spec, kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)
    with pytest.raises(UnsupportedLayout, match="quantized KV cache"):
        KVLayout.from_vllm(kv, case.cls, fp8, layout)
    narrow_v = {n: t[..., :96] for n, t in kv.items()}             # C = 64 (K) + 32 (V)
    with pytest.raises(UnsupportedLayout, match="head_size_v 32 != head_size 64"):
        KVLayout.from_vllm(narrow_v, case.cls, dataclasses.replace(spec, head_size_v=32), layout)
    with pytest.raises(UnsupportedLayout, match="KV format of backend ROCM_ATTN is unknown"):
        KVLayout.from_vllm(kv, "ROCM_ATTN", spec, None)
    with pytest.raises(UnsupportedLayout, match="layers differ"):
        KVLayout.from_vllm([*kv.values(), torch.zeros(3, 2, 16, 128, dtype=torch.bfloat16)],
                           case.cls, spec, None)
    hnd, _, _ = allocate(dataclasses.replace(case, layout="LBHNC"))
    with pytest.raises(UnsupportedLayout, match=r"FLEX_ATTENTION lists layouts \['LBNHC'\]"):
        KVLayout.from_vllm(hnd, FlexAttentionBackend, spec, KVCacheLayout.LBHNC)

    cpu = Case("CPU_ATTN", "LBHNC", torch.float32, 1, 64, 32, isa="vec")
    kv, spec, layout = allocate(cpu)
    with pytest.raises(UnsupportedLayout, match="CPU ISA 'neon'"):
        KVLayout.from_vllm(kv, cpu.cls, spec, layout, cpu_isa="neon")
    with pytest.raises(UnsupportedLayout, match="ISA amx packs torch.bfloat16 only"):
        KVLayout.from_vllm(kv, cpu.cls, spec, layout, cpu_isa="amx")
    with pytest.raises(UnsupportedLayout, match=r"backend CPU_ATTN, layout LBHNC, 2 layer "
                                                r"tensors of shape \[3, 1, 32, 128\]"):
        KVLayout.from_vllm(kv, cpu.cls, spec, layout, cpu_isa=None)


@needs_vllm
def test_mla_latent_layout_is_k_only():
    case = Case("CPU_MLA", "LBNHC", torch.bfloat16, 1, 576, 16)
    kv, spec, layout = _fresh(case)
    derived = derive(case, kv, spec, layout)
    assert derived.v is None and derived.num_kv == 1
    slots = torch.tensor([3, 20, -1, 47], dtype=torch.int64)
    assert gather(list(kv.values()), derived, slots).shape == (1, case.layers, 4, 576)


# ====================================================================================== connector
def _connector(tmp_path, case: Case, monkeypatch):
    """A worker-side LMCacheLabConnector as vLLM builds it, over `case`'s allocation."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    import vllm.distributed as dist
    from lmcache_lab.integrations import vllm as connector_mod

    monkeypatch.setattr(dist, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_tensor_model_parallel_world_size", lambda: 1)
    kv, spec, layout = allocate(case)
    config = VllmConfig(kv_transfer_config=KVTransferConfig(
        kv_connector="LMCacheLabConnector", kv_role="kv_both",
        kv_connector_module_path="lmcache_lab.integrations.vllm",
        engine_id=f"layouts-{time.monotonic_ns()}",
        kv_connector_extra_config={"chunk_size": 2 * case.block_size}))
    config.cache_config.kv_cache_layout = layout.name
    ctx = config.compilation_config.static_forward_context
    for name in kv:
        ctx[name] = SimpleNamespace(attn_backend=case.cls, isa=case.isa)
    kv_config = SimpleNamespace(kv_cache_groups=[KVCacheGroupSpec(list(kv), spec)])
    conn = connector_mod.LMCacheLabConnector(config, KVConnectorRole.WORKER, kv_config)
    return conn, kv


@needs_connector
def test_connector_refuses_once_and_answers_lookups_with_zero(tmp_path, monkeypatch, caplog):
    """A refused cache: one warning naming backend, layout and shapes; no exception; lookups on
    the worker's socket answer 0 at once; loads and stores do nothing."""
    from lmcache_lab.integrations.vllm_cache import LookupClient, socket_path

    case = Case("CPU_ATTN", "LBHNC", torch.float32, 1, 64, 32, isa="neon")
    conn, kv = _connector(tmp_path, case, monkeypatch)
    with caplog.at_level(logging.INFO, logger="lmcache_lab.integrations.vllm"):
        conn.register_kv_caches(kv)
    msgs = [r for r in caplog.records if r.name == "lmcache_lab.integrations.vllm"]
    assert len(msgs) == 1 and msgs[0].levelno == logging.WARNING
    text = msgs[0].getMessage()
    assert "CPU_ATTN" in text and "LBHNC" in text and "[3, 1, 32, 128]" in text and "neon" in text
    assert conn._cache is None and conn._layout is None
    client = LookupClient([socket_path(conn._endpoint, 0)], conn._authkey, connect_timeout_s=5)
    t0 = time.monotonic()
    assert client.lookup("r1", list(range(200)), 3, 0) == (0, 0)
    assert time.monotonic() - t0 < 2 and client.errors == 0
    client.close()
    conn.wait_for_save()                      # no cache: nothing stored, nothing raised
    assert conn.build_connector_worker_meta() is None
    conn._refused.close()


@needs_connector
def test_connector_serves_a_derived_gpu_layout(tmp_path, monkeypatch):
    """An accepted cache (here FlashAttention, block-outermost BLNHC): the connector's layout is
    the derived one and its namespace names backend and layout."""
    case = Case("FLASH_ATTN", "BLNHC", torch.bfloat16, 2, 64, 16)
    conn, kv = _connector(tmp_path, case, monkeypatch)
    from lmcache_lab.integrations import vllm as connector_mod
    from lmcache_lab.keys import Namespace

    def namespace(vllm_config, config, layout, *args):     # no model behind this VllmConfig
        return Namespace(model="m", kv_dtype="bfloat16", layout=layout.name)

    monkeypatch.setattr(connector_mod, "make_namespace", namespace)
    conn.register_kv_caches(kv)
    try:
        assert conn._layout.name == "vllm:FLASH_ATTN:BLNHC"
        assert conn._layout.strides == tuple(next(iter(kv.values())).stride())
        assert conn._layers == list(kv.values())
    finally:
        conn.shutdown()
