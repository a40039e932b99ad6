"""Paged gather/scatter: Triton kernel (interpreter on CPU) == torch path == reference, for every
layout, dtype and slot pattern; round trips bit-exact; bad input rejected before any launch."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lmcache_lab.kernels.layout import KVLayout
from lmcache_lab.kernels.paged import gather, scatter

L, B, BS, H, D = 2, 3, 4, 3, 5          # tiny, non-power-of-two heads and head dim
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def make_layout(name: str) -> KVLayout:
    if name == "sglang_mha":
        return KVLayout.sglang_mha(L, B * BS, H, D)
    if name == "vllm_cpu_k_rows":
        return KVLayout.vllm_cpu(L, B, BS, H, D, k_transposed=False)
    return getattr(KVLayout, name)(L, B, BS, H, D)


def make_caches(layout: KVLayout, dtype: torch.dtype, seed: int = 0, special: bool = True):
    """Random caches in the form the layout takes; special values (-0.0, inf, nan) included so
    that bit-exactness is really tested."""
    g = torch.Generator().manual_seed(seed)

    def rnd():
        t = torch.randn(layout.layer_shape, generator=g, device="cpu").to(dtype)
        t = t.to(torch.get_default_device())
        if special:
            flat = t.view(-1)
            flat[0], flat[7], flat[-1] = -0.0, float("inf"), float("nan")
        return t

    if layout.separate_kv:
        return [(rnd(), rnd()) for _ in range(layout.num_layers)]
    return [rnd() for _ in range(layout.num_layers)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_OF[t.dtype])


def cache_bits(caches):
    out = []
    for entry in caches:
        out.extend(bits(t).clone() for t in (entry if isinstance(entry, tuple) else (entry,)))
    return out


SLOTS = {
    "one_token": [5],
    "mid_block_end": [0, 1, 2, 3, 4, 5],                     # a chunk ending mid-block
    "whole_blocks_reordered": [8, 9, 10, 11, 0, 1, 2, 3],    # per-run copies in the torch path
    "scattered_padding": [11, -1, 2, 7, 0, -1, 9, 4],        # index path, padding rows
    "all_padding": [-1, -1, -1],
    "empty": [],
}

LAYOUTS = ["vllm_cpu", "vllm_cpu_k_rows", "vllm_flash", "sglang_mha"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", list(SLOTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_gather_matches_reference_and_round_trips(layout_name, dtype, pattern, backend):
    layout = make_layout(layout_name)
    caches = make_caches(layout, dtype)
    slots = torch.tensor(SLOTS[pattern], dtype=torch.int64)
    want = gather(caches, layout, slots, backend="reference")                  # [2, L, N, H*D]
    got = gather(caches, layout, slots, backend=backend)
    assert got.shape == (2, L, len(SLOTS[pattern]), H * D) and got.is_contiguous()
    assert torch.equal(bits(got), bits(want))
    pad = slots < 0
    assert torch.all(got[:, :, pad] == 0)

    # scatter back into the same cache: bit-identical cache afterwards
    before = cache_bits(caches)
    scatter(got, caches, layout, slots, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(before, cache_bits(caches)))

    # scatter into a fresh cache, gather again: bit-identical chunk; other slots untouched
    fresh = make_caches(layout, dtype, seed=1, special=False)
    fresh_before = cache_bits(fresh)
    scatter(got, fresh, layout, slots, backend=backend)
    again = gather(fresh, layout, slots, backend="reference")
    assert torch.equal(bits(again), bits(want))
    ref_fresh = make_caches(layout, dtype, seed=1, special=False)
    scatter(got, ref_fresh, layout, slots, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(cache_bits(ref_fresh), cache_bits(fresh)))
    if (slots >= 0).sum() == 0:
        assert all(torch.equal(a, b) for a, b in zip(fresh_before, cache_bits(fresh)))


def natural_cache(layout_name: str, k: torch.Tensor, v: torch.Tensor):
    """Build one layer in the engine's layout from natural K, V `[num_slots, H, D]`, written the
    way each engine documents it (independent of KVLayout's strides)."""
    if layout_name.startswith("vllm_cpu"):
        t = torch.empty(B, H, BS, 2 * D)
        for s in range(B * BS):
            blk, off = divmod(s, BS)
            for h in range(H):
                rec = t[blk, h].view(-1)                          # [bs * 2D]
                if layout_name == "vllm_cpu":
                    rec[:D * BS].view(D, BS)[:, off] = k[s, h]    # K transposed [D, bs]
                else:
                    rec[:D * BS].view(BS, D)[off] = k[s, h]       # K rows [bs, D]
                rec[D * BS:].view(BS, D)[off] = v[s, h]           # V [bs, D]
        return t
    if layout_name == "vllm_flash":
        return torch.stack([k.view(B, BS, H, D), v.view(B, BS, H, D)])
    return (k.clone(), v.clone())


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_layout_addresses_match_engine_definition(layout_name):
    layout = make_layout(layout_name)
    k = torch.randn(L, B * BS, H, D)
    v = torch.randn(L, B * BS, H, D)
    caches = [natural_cache(layout_name, k[i], v[i]) for i in range(L)]
    slots = torch.tensor([6, 0, 11, 3], dtype=torch.int64)
    for backend in ("reference", "torch"):
        chunk = gather(caches, layout, slots, backend=backend)
        assert torch.equal(chunk[0], k[:, slots].reshape(L, 4, H * D))
        assert torch.equal(chunk[1], v[:, slots].reshape(L, 4, H * D))


@pytest.mark.parametrize("form", ["stacked", "views_of_one_buffer", "separate_tensors"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_forms(form, backend):
    """vLLM passes views of one shared buffer; tests and users may pass a stacked tensor or
    separately allocated layers: all give the same chunk."""
    layout = KVLayout.vllm_cpu(3, B, BS, H, D)
    stacked = torch.randn(3, *layout.layer_shape)
    caches = {"stacked": stacked, "views_of_one_buffer": list(stacked.unbind(0)),
              "separate_tensors": [t.clone() for t in stacked]}[form]
    slots = torch.tensor([4, 5, 6, 7, 1, -1], dtype=torch.int64)
    want = gather(list(stacked), layout, slots, backend="reference")
    assert torch.equal(gather(caches, layout, slots, backend=backend), want)
    target = torch.zeros_like(stacked)
    tcaches = {"stacked": target, "views_of_one_buffer": list(target.unbind(0)),
               "separate_tensors": None}[form]
    if tcaches is None:
        tcaches = [torch.zeros_like(t) for t in stacked]
    scatter(want, tcaches, layout, slots, backend=backend)
    assert torch.equal(gather(tcaches, layout, slots, backend="reference"), want)


def test_out_argument_is_filled_and_returned():
    layout = make_layout("vllm_flash")
    caches = make_caches(layout, torch.float32, special=False)
    slots = torch.tensor([1, 2, -1], dtype=torch.int64)
    out = torch.full(layout.chunk_shape(3), 7.0)
    assert gather(caches, layout, slots, out=out) is out
    assert torch.equal(out, gather(caches, layout, slots, backend="reference"))


def test_from_tensors_infers_and_checks():
    cpu = KVLayout.from_tensors("vllm_cpu", [torch.zeros(B, H, BS, 2 * D)] * 2)
    assert cpu == KVLayout.vllm_cpu(2, B, BS, H, D)
    flash = KVLayout.from_tensors("vllm_flash", torch.zeros(2, 2, B, BS, H, D))
    assert flash == KVLayout.vllm_flash(2, B, BS, H, D)
    sgl = KVLayout.from_tensors("sglang_mha", [(torch.zeros(12, H, D), torch.zeros(12, H, D))])
    assert sgl == KVLayout.sglang_mha(1, 12, H, D)
    with pytest.raises(ValueError, match="block_size=16 given"):
        KVLayout.from_tensors("vllm_cpu", [torch.zeros(B, H, BS, 2 * D)], block_size=16)
    with pytest.raises(ValueError, match="unknown layout kind"):
        KVLayout.from_tensors("paged_mla", [torch.zeros(B, H, BS, 2 * D)])
    with pytest.raises(ValueError, match="expected per-layer"):
        KVLayout.from_tensors("vllm_flash", [torch.zeros(B, H, BS, 2 * D)])


def test_layout_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
        KVLayout.vllm_cpu(1, 2, 4, 0, 8)
    with pytest.raises(ValueError, match="head_size must be a positive int"):
        KVLayout.vllm_flash(1, 2, 4, 2, 8.0)


# ----------------------------------------------------------------------------- bad input
def _ok():
    layout = make_layout("vllm_cpu")
    return layout, make_caches(layout, torch.float32, special=False), torch.tensor([0, 1], dtype=torch.int64)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("case,exc,msg", [
    ("slot_too_large", ValueError, "slot 12 out of range"),
    ("slot_below_minus_one", ValueError, "slot -2 out of range"),
    ("slots_int32", TypeError, "slot_mapping: dtype must be torch.int64"),
    ("slots_2d", ValueError, "must be 1-D"),
    ("slots_list", TypeError, "expected an int64 tensor"),
    ("cache_int8", TypeError, "dtype torch.int8 is not supported"),
    ("cache_mixed_dtypes", TypeError, r"kv_caches\[1\]: dtype torch.float16 differs"),
    ("cache_wrong_shape", ValueError, r"kv_caches\[0\]: shape \[3, 3, 4, 12\]"),
    ("cache_not_contiguous", ValueError, r"kv_caches\[0\]: not contiguous"),
    ("too_few_layers", ValueError, "1 layers given, layout vllm_cpu has 2"),
    ("not_a_list", TypeError, "expected a list of per-layer tensors"),
    ("chunk_wrong_dtype", TypeError, "chunk: dtype torch.float16"),
    ("chunk_wrong_shape", ValueError, r"chunk: shape \[2, 2, 3, 15\]"),
    ("chunk_not_contiguous", ValueError, "chunk: not contiguous"),
    ("duplicate_scatter_slot", ValueError, "a slot appears twice"),
    ("unknown_backend", ValueError, "backend: 'cuda'"),
])
def test_bad_input_raises_before_launch(case, exc, msg, backend):
    layout, caches, slots = _ok()
    chunk = gather(caches, layout, slots, backend="reference")
    op = "gather"
    if case == "slot_too_large":
        slots = torch.tensor([0, layout.num_slots], dtype=torch.int64)
    elif case == "slot_below_minus_one":
        slots = torch.tensor([-2, 0], dtype=torch.int64)
    elif case == "slots_int32":
        slots = slots.int()
    elif case == "slots_2d":
        slots = slots.view(1, 2)
    elif case == "slots_list":
        slots = [0, 1]
    elif case == "cache_int8":
        caches = [torch.zeros(layout.layer_shape, dtype=torch.int8)] * 2
    elif case == "cache_mixed_dtypes":
        caches = [caches[0], caches[1].half()]
    elif case == "cache_wrong_shape":
        caches = [torch.zeros(3, 3, 4, 12)] * 2
    elif case == "cache_not_contiguous":
        caches = [torch.zeros(3, 4, 3, 10).transpose(1, 2), caches[1]]
    elif case == "too_few_layers":
        caches = caches[:1]
    elif case == "not_a_list":
        caches = {"layer0": caches[0]}
    elif case == "chunk_wrong_dtype":
        op, chunk = "scatter", chunk.half()
    elif case == "chunk_wrong_shape":
        op, chunk = "scatter", torch.zeros(2, 2, 3, 15)
    elif case == "chunk_not_contiguous":
        op, chunk = "scatter", torch.zeros(2, 2, H * D, 2).transpose(2, 3)
    elif case == "duplicate_scatter_slot":
        op, slots = "scatter", torch.tensor([3, 3], dtype=torch.int64)
    if case == "unknown_backend":
        backend = "cuda"
    before = cache_bits(caches) if isinstance(caches, list) and case != "cache_int8" else None
    with pytest.raises(exc, match=msg):
        if op == "gather":
            gather(caches, layout, slots, backend=backend)
        else:
            scatter(chunk, caches, layout, slots, backend=backend)
    if before is not None:
        assert all(torch.equal(a, b) for a, b in zip(before, cache_bits(caches)))


def test_sglang_needs_pairs():
    layout = make_layout("sglang_mha")
    with pytest.raises(TypeError, match=r"needs a \(k, v\) pair per layer"):
        gather([torch.zeros(layout.layer_shape)] * L, layout, torch.tensor([0]))
    with pytest.raises(TypeError, match="not one tensor"):
        gather(torch.zeros(L, *layout.layer_shape), layout, torch.tensor([0]))


# ----------------------------------------------------------------------------- property

@settings(max_examples=60, deadline=None)
@given(layout_name=st.sampled_from(LAYOUTS),
       picks=st.lists(st.integers(-1, B * BS - 1), max_size=2 * B * BS),
       runs=st.booleans())
def test_torch_path_matches_reference_on_any_slots(layout_name, picks, runs):
    """Any slot mapping (runs inside and across blocks, scattered, padding): the torch path's
    run/index planning gives the reference's chunk, and scatter writes exactly those slots."""
    layout = make_layout(layout_name)
    if runs and picks:                     # stretch the first pick into a run of slots
        start = max(picks[0], 0)
        picks = list(range(start, min(start + len(picks), B * BS)))
    seen, slots_l = set(), []
    for s in picks:                        # scatter needs distinct slots: later repeats -> -1
        slots_l.append(-1 if s in seen else s)
        if s >= 0:
            seen.add(s)
    slots = torch.tensor(slots_l, dtype=torch.int64)
    caches = make_caches(layout, torch.float32, special=False)
    want = gather(caches, layout, slots, backend="reference")
    assert torch.equal(gather(caches, layout, slots, backend="torch"), want)
    got_c = make_caches(layout, torch.float32, seed=3, special=False)
    ref_c = make_caches(layout, torch.float32, seed=3, special=False)
    scatter(want, got_c, layout, slots, backend="torch")
    scatter(want, ref_c, layout, slots, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(cache_bits(got_c), cache_bits(ref_c)))


def test_tables_are_not_reused_across_dtypes_at_the_same_addresses():
    """Layer offsets are cached per set of tensors; a cache of another dtype at the same byte
    addresses (the allocator reuses freed memory) must get its own element offsets."""
    lay = KVLayout.vllm_flash(num_layers=2, num_blocks=2, block_size=4, num_kv_heads=1, head_size=4)
    per_layer = 2 * 2 * 4 * 1 * 4                                       # elements of one layer
    buf = torch.zeros(2 * per_layer * 4, dtype=torch.uint8)             # room for 2 fp32 layers
    slots = torch.arange(8, dtype=torch.int64)
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.tensor([], dtype=dtype).element_size()
        layers = [buf[i * per_layer * 4:(i * per_layer * 4) + per_layer * es].view(dtype).view(2, 2, 4, 1, 4)
                  for i in range(2)]                                     # same byte addresses both times
        for i, t in enumerate(layers):
            t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t) + 100 * i)
        want = gather(layers, lay, slots, backend="reference")
        got = gather(layers, lay, slots, backend="triton")
        assert torch.equal(got, want)
