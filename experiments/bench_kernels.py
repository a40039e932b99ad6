"""Kernel benchmarks: GB/s of paged gather/scatter and quantize/dequantize, each against two
references measured in the same run:

  * the torch baseline: for gather/scatter a naive per-layer torch copy (index_select /
    index_copy_, advanced indexing where the layout is transposed) that stacks the layers into
    the chunk; for quantize/dequantize whole-tensor torch ops with a temporary per step;
  * a plain copy of the same number of bytes: `dst.copy_(src)` (preallocated: the bandwidth
    limit) and, on CPU, `src.clone()` (a fresh output, like `gather` returns).

GB/s counts bytes read + bytes written (a copy of n bytes moves 2n). On a GPU the Triton kernels
are timed (CUDA events); on a CPU the torch path is (the interpreter is for tests only), with
best-of-R timings interleaved so a busy machine hurts all columns alike. On a GPU it also times
a chunk's GPU<->pinned-CPU transfer against a large pinned copy (the PCIe limit).

    python -m lmcache_lab.experiments.bench_kernels [--tokens 256 --layers 32 --heads 8
        --head-size 128 --dtype bf16] [--repeat 30] [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass

import torch

from lmcache_lab.kernels.blocks import block_records, gather_blocks, scatter_blocks
from lmcache_lab.kernels.layout import KVLayout
from lmcache_lab.kernels.paged import gather, scatter
from lmcache_lab.kernels.quant import quantize, dequantize

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Row:
    op: str
    case: str
    mib: float              # bytes read + written, MiB
    ms: float               # the op (Triton on GPU, torch path on CPU)
    gbps: float
    baseline_ms: float      # naive torch baseline
    copy_ms: float          # copy_ of the same bytes into a preallocated buffer
    clone_ms: float | None  # clone of the same bytes (fresh output), CPU only

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.ms

    @property
    def of_copy(self) -> float:
        return self.copy_ms / self.ms


# ================================================================================ timing
def time_all(fns: dict, device: torch.device, repeat: int) -> dict[str, float]:
    """Best (CPU) or median (CUDA) milliseconds of each callable, measured round-robin."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    pick = (lambda s: sorted(s)[len(s) // 2]) if device.type == "cuda" else min
    return {k: pick(v) for k, v in samples.items()}


# ================================================================================ baselines
def naive_gather(caches, layout: KVLayout, slots: torch.Tensor) -> torch.Tensor:
    """What a connector written without these kernels does: per layer and K/V, a torch index
    op on a token view, then one stack into the chunk `[2, L, N, H*D]` (no padding support)."""
    blk, off = slots // layout.block_size, slots % layout.block_size
    parts = []
    for kv, ax in enumerate((layout.k, layout.v)):
        for entry in caches:
            t = entry[kv] if layout.separate_kv else entry
            view = t.as_strided((layout.num_blocks, layout.block_size, layout.num_kv_heads,
                                 layout.head_size), (ax.block, ax.offset, ax.head, ax.dim),
                                t.storage_offset() + ax.base)                    # [B, bs, H, D]
            if ax.block == layout.block_size * ax.offset or layout.block_size == 1:
                flat = view.reshape(layout.num_slots, layout.hidden)              # a view here
                parts.append(flat.index_select(0, slots))                         # [N, H*D]
            else:
                parts.append(view[blk, off].reshape(len(slots), layout.hidden))   # [N, H*D]
    return torch.stack(parts).view(layout.chunk_shape(len(slots)))


def naive_scatter(chunk, caches, layout: KVLayout, slots: torch.Tensor) -> None:
    blk, off = slots // layout.block_size, slots % layout.block_size
    for kv, ax in enumerate((layout.k, layout.v)):
        for layer, entry in enumerate(caches):
            t = entry[kv] if layout.separate_kv else entry
            view = t.as_strided((layout.num_blocks, layout.block_size, layout.num_kv_heads,
                                 layout.head_size), (ax.block, ax.offset, ax.head, ax.dim),
                                t.storage_offset() + ax.base)
            src = chunk[kv, layer].view(-1, layout.num_kv_heads, layout.head_size)
            if ax.block == layout.block_size * ax.offset or layout.block_size == 1:
                view.view(layout.num_slots, layout.num_kv_heads, layout.head_size).index_copy_(0, slots, src)
            else:
                view[blk, off] = src


def naive_quantize(x: torch.Tensor, heads: int, fmt: str, k_per_channel: bool):
    """Whole-tensor torch ops, one temporary per step (how one writes it first)."""
    qdtype, qmax = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}[fmt]
    xf = x.float()                                                              # [2, L, N, H*D]
    xg = xf.view(*x.shape[:3], heads, -1)                                       # [2, L, N, H, D]
    scale = xg.abs().amax(dim=4, keepdim=True) / qmax                           # [2, L, N, H, 1]
    y = (xg / scale.clamp_min(1e-30)).view(x.shape).clamp(-qmax, qmax)
    scale = scale[..., 0]                                                       # [2, L, N, H]
    k_scale = scale[0]
    if k_per_channel:
        k_scale = xf[0].abs().amax(dim=1, keepdim=True) / qmax                  # [L, 1, H*D]
        y[0] = (xf[0] / k_scale.clamp_min(1e-30)).clamp(-qmax, qmax)
    q = torch.round(y).to(qdtype) if fmt == "int8" else y.to(qdtype)
    return q, k_scale, scale[1]


def naive_dequantize(q, k_scale, v_scale, heads: int, dtype: torch.dtype, k_per_channel: bool):
    qf = q.float()                                                              # [2, L, N, H*D]
    shape = (*q.shape[1:3], heads, -1)
    v = (qf[1].view(shape) * v_scale[..., None]).view(q.shape[1:])
    k = qf[0] * k_scale if k_per_channel else \
        (qf[0].view(shape) * k_scale[..., None]).view(q.shape[1:])
    return torch.stack([k, v]).to(dtype)


# ================================================================================ cases
def make_case(kind: str, args, device: torch.device):
    """(layout, caches, slots): whole blocks of the chunk at random places in a cache several
    times larger than the chunk (larger than the GPU's L2)."""
    dtype = DTYPES[args.dtype]
    bs = {"vllm_cpu": 128, "vllm_flash": 16, "sglang_mha": 1}[kind]
    if args.block_size and kind != "sglang_mha":
        bs = args.block_size
    chunk_blocks = -(-args.tokens // bs)
    blocks = max(args.cache_factor * chunk_blocks, chunk_blocks + 1)
    g = torch.Generator().manual_seed(0)
    if kind == "sglang_mha":
        layout = KVLayout.sglang_mha(args.layers, blocks, args.heads, args.head_size)
        caches = [(torch.randn(layout.layer_shape, dtype=dtype, device=device),
                   torch.randn(layout.layer_shape, dtype=dtype, device=device))
                  for _ in range(args.layers)]
    else:
        layout = getattr(KVLayout, kind)(args.layers, blocks, bs, args.heads, args.head_size)
        buf = torch.randn((args.layers, *layout.layer_shape), dtype=dtype, device=device)
        caches = list(buf.unbind(0))      # views of one buffer, as vLLM allocates them
    order = torch.randperm(blocks, generator=g)[:chunk_blocks]
    slots = (order[:, None] * bs + torch.arange(bs)[None, :]).flatten()[:args.tokens]
    return layout, caches, slots.to(device)


def bench_paged(kind: str, args, device: torch.device, backend: str) -> list[Row]:
    layout, caches, slots = make_case(kind, args, device)
    out = gather(caches, layout, slots, backend=backend)                        # [2, L, N, H*D]
    nbytes = out.numel() * out.element_size()
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    assert torch.equal(naive_gather(caches, layout, slots), out)
    fns = {
        "gather": lambda: gather(caches, layout, slots, backend=backend),
        "gather_out": lambda: gather(caches, layout, slots, out=out, backend=backend),
        "scatter": lambda: scatter(out, caches, layout, slots, backend=backend),
        "base_gather": lambda: naive_gather(caches, layout, slots),
        "base_scatter": lambda: naive_scatter(out, caches, layout, slots),
        "copy": lambda: dst.copy_(src),
    }
    if device.type == "cpu":
        fns["clone"] = lambda: src.clone()
    # block-native chunks (kernels/blocks.py): the same blocks as whole records
    bs = layout.block_size
    whole_blocks = bs > 1 and args.tokens % bs == 0 and block_records(layout) is not None
    if whole_blocks:
        ids = slots[::bs] // bs
        records = gather_blocks(caches, layout, ids)
        assert records.numel() == out.numel()
        fns["gather_blocks"] = lambda: gather_blocks(caches, layout, ids)
        fns["scatter_blocks"] = lambda: scatter_blocks(records, caches, layout, ids)
    t = time_all(fns, device, args.repeat)
    mib = 2 * nbytes / 2**20
    clone = t.get("clone")
    case = f"{kind} {args.dtype}"
    blocks = [Row(f"{op} blocks", case, mib, t[f"{op}_blocks"], 2 * nbytes / t[f"{op}_blocks"] / 1e6,
                  t[f"base_{op}"], t["copy"], clone) for op in ("gather", "scatter")] \
        if whole_blocks else []
    return [
        Row("gather", case, mib, t["gather"], 2 * nbytes / t["gather"] / 1e6,
            t["base_gather"], t["copy"], clone),
        Row("gather(out=)", case, mib, t["gather_out"], 2 * nbytes / t["gather_out"] / 1e6,
            t["base_gather"], t["copy"], clone),
        Row("scatter", case, mib, t["scatter"], 2 * nbytes / t["scatter"] / 1e6,
            t["base_scatter"], t["copy"], clone),
    ] + blocks


def bench_quant(fmt: str, k_per_channel: bool, args, device: torch.device, backend: str) -> list[Row]:
    dtype = DTYPES[args.dtype]
    x = torch.randn((2, args.layers, args.tokens, args.heads * args.head_size), dtype=dtype,
                    device=device)                                               # [2, L, N, H*D]
    qkv = quantize(x, args.heads, fmt, k_per_channel=k_per_channel, backend=backend)
    packed = sum(t.numel() * t.element_size() for t in (qkv.q, qkv.k_scale, qkv.v_scale))
    moved = x.numel() * x.element_size() + packed                  # read + written, each way
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    fns = {
        "quant": lambda: quantize(x, args.heads, fmt, k_per_channel=k_per_channel, backend=backend),
        "dequant": lambda: dequantize(qkv, backend=backend),
        "base_quant": lambda: naive_quantize(x, args.heads, fmt, k_per_channel),
        "base_dequant": lambda: naive_dequantize(qkv.q, qkv.k_scale, qkv.v_scale,
                                                 args.heads, dtype, k_per_channel),
        "copy": lambda: dst.copy_(src),
    }
    if device.type == "cpu":
        fns["clone"] = lambda: src.clone()
    t = time_all(fns, device, args.repeat)
    case = f"{fmt}{' K/ch' if k_per_channel else ''} {args.dtype}"
    return [Row(name, case, moved / 2**20, t[key], moved / t[key] / 1e6, t["base_" + key],
                t["copy"], t.get("clone")) for name, key in (("quantize", "quant"),
                                                            ("dequantize", "dequant"))]


def bench_transfer(args, device: torch.device) -> list[dict]:
    """GPU <-> pinned CPU: one chunk vs a large pinned copy (the PCIe limit)."""
    dtype = DTYPES[args.dtype]
    chunk = torch.randn((2, args.layers, args.tokens, args.heads * args.head_size), dtype=dtype,
                        device=device)
    host = torch.empty(chunk.shape, dtype=dtype, pin_memory=True)
    big_dev = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    big_host = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    fns = {"d2h": lambda: host.copy_(chunk, non_blocking=True),
           "h2d": lambda: chunk.copy_(host, non_blocking=True),
           "big_d2h": lambda: big_host.copy_(big_dev, non_blocking=True),
           "big_h2d": lambda: big_dev.copy_(big_host, non_blocking=True)}
    t = time_all(fns, device, max(5, args.repeat // 3))
    nb = chunk.numel() * chunk.element_size()
    rows = []
    for way in ("d2h", "h2d"):
        gbps, limit = nb / t[way] / 1e6, big_dev.numel() / t["big_" + way] / 1e6
        rows.append({"way": way, "mib": nb / 2**20, "ms": t[way], "gbps": gbps,
                     "pcie_gbps": limit, "of_pcie": gbps / limit})
    return rows


# ================================================================================ report
def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({torch.get_num_threads()} torch threads), no GPU"


def table_header(cpu: bool) -> str:
    head = (f"{'op':<13} {'case':<22} {'MiB r+w':>8} {'ms':>8} {'GB/s':>7} {'base ms':>8} "
            f"{'x base':>7} {'copy ms':>8} {'%copy':>6}")
    if cpu:
        head += f" {'clone ms':>9} {'/clone':>7}"
    return head + "\n" + "-" * len(head)


def table_line(r: Row, cpu: bool) -> str:
    line = (f"{r.op:<13} {r.case:<22} {r.mib:8.1f} {r.ms:8.3f} {r.gbps:7.2f} {r.baseline_ms:8.3f} "
            f"{r.speedup:7.2f} {r.copy_ms:8.3f} {100 * r.of_copy:5.0f}%")
    if cpu:
        line += f" {r.clone_ms:9.3f} {r.ms / r.clone_ms:7.2f}"
    return line


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--block-size", type=int, default=0, help="override the layout's block size")
    p.add_argument("--cache-factor", type=int, default=0,
                   help="cache blocks per chunk block (default: 4 on CPU, 64 on GPU)")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layouts", default="vllm_cpu,vllm_flash,sglang_mha",
                   help="paged layouts to time (empty: none)")
    p.add_argument("--quant", default="int8,fp8", help="quant formats to time (empty: none)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch threads for every column (default 1: on a shared 2-core "
                        "machine two OpenMP threads stall whenever another process holds a core)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--json", help="also save rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.layers, args.heads, args.head_size, args.repeat = 32, 2, 2, 16, 3
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if not args.cache_factor:
        args.cache_factor = 64 if device.type == "cuda" else 4
    backend = "triton" if device.type == "cuda" else "torch"
    cpu = device.type == "cpu"
    print(f"# kernels on {machine_name(device)}; backend={backend}; chunk: {args.tokens} tokens, "
          f"{args.layers} layers, {args.heads} KV heads x {args.head_size}, {args.dtype}")
    print("# x base = speedup over the naive torch baseline; %copy = copy_ time / op time "
          "(100% = copy bandwidth)" + ("; /clone = op time / clone time" if cpu else ""))
    print(table_header(cpu), flush=True)
    rows: list[Row] = []
    jobs = [lambda k=kind: bench_paged(k, args, device, backend)
            for kind in filter(None, args.layouts.split(","))]
    jobs += [lambda f=fmt, c=per_channel: bench_quant(f, c, args, device, backend)
             for fmt in filter(None, args.quant.split(",")) for per_channel in (False, True)]
    for job in jobs:
        for row in job():
            rows.append(row)
            print(table_line(row, cpu), flush=True)
    result = {"machine": machine_name(device), "backend": backend, "args": vars(args),
              "rows": [{**asdict(r), "speedup": r.speedup, "of_copy": r.of_copy} for r in rows]}
    if device.type == "cuda":
        result["transfer"] = bench_transfer(args, device)
        for r in result["transfer"]:
            print(f"{r['way']}: chunk {r['mib']:.1f} MiB {r['gbps']:.2f} GB/s = "
                  f"{100 * r['of_pcie']:.0f}% of a 256 MiB pinned copy ({r['pcie_gbps']:.2f} GB/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
