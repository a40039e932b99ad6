"""KV chunk quantization to int8 or fp8 (e4m3), and back.

    qkv = quantize(chunk, num_kv_heads, fmt="int8" | "fp8", k_per_channel=False)
    chunk2 = dequantize(qkv)                     # same shape and dtype as `chunk`

`chunk` is a gathered chunk `[2, L, N, H*D]` (K then V; fp32, fp16 or bf16). Scales are fp32:
  * per token and head (default, K and V): `scale[l, n, h] = amax_d |x[l, n, h, d]| / QMAX`,
    tensors `[L, N, H]`;
  * per channel for K (`k_per_channel=True`, KIVI-style: K outliers live in fixed channels):
    `k_scale[l, 0, c] = amax_n |k[l, n, c]| / QMAX`, tensor `[L, 1, H*D]`; V stays per token-head.
QMAX is 127 for int8 (symmetric, -127..127) and 448 for fp8 e4m3fn. A group whose amax is 0 gets
scale 0 and decodes to zeros.

Rounding (identical in all backends, bit for bit): y = x / scale in fp32 (IEEE division);
int8 = round-half-even(y) clamped to +-127; fp8 = y rounded to the nearest e4m3 value, ties to
even (what torch's cast does); dequantized values are q * scale in fp32, then rounded to the
output dtype to nearest even. The Triton interpreter truncates fp32->bf16 and mis-rounds
fp32->fp8, so the kernels round explicitly in fp32 and cast only exactly representable values.

Error bounds (relative L2 error of a chunk, ||x - deq(q(x))|| / ||x||, for Gaussian-like data;
tested in tests/kernels/test_quant.py): int8 <= 1%, fp8 <= 4.5% (e4m3 keeps 3 mantissa bits:
relative rounding error <= 2^-4 per element, ~2.7% rms).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch", "reference")
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAGIC = 12582912.0         # 1.5 * 2**23


@dataclass
class QuantizedKV:
    """A quantized chunk. Invariant: `q.shape == [2, L, N, H*D]`; `v_scale` is `[L, N, H]`;
    `k_scale` is `[L, N, H]`, or `[L, 1, H*D]` when `k_per_channel`."""
    q: torch.Tensor             # [2, L, N, H*D] int8 or float8_e4m3fn
    k_scale: torch.Tensor       # fp32 [L, N, H] or [L, 1, H*D]
    v_scale: torch.Tensor       # fp32 [L, N, H]
    fmt: str                    # "int8" | "fp8"
    dtype: torch.dtype          # dtype of the original chunk
    num_kv_heads: int
    k_per_channel: bool = False


# =================================================================================== checks
def _check_chunk(chunk, num_kv_heads: int) -> None:
    if not isinstance(chunk, torch.Tensor):
        raise TypeError(f"chunk: expected a tensor, got {type(chunk).__name__}")
    if chunk.dtype not in FLOAT_DTYPES:
        raise TypeError(f"chunk: dtype {chunk.dtype} not supported; use fp32, fp16 or bf16")
    if chunk.dim() != 4 or chunk.shape[0] != 2:
        raise ValueError(f"chunk: expected [2, L, N, H*D], got shape {list(chunk.shape)}")
    if not chunk.is_contiguous():
        raise ValueError("chunk: not contiguous")
    if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or chunk.shape[3] % num_kv_heads:
        raise ValueError(f"num_kv_heads: {num_kv_heads!r} must be a positive int dividing "
                         f"H*D = {chunk.shape[3]}")


def _check_quantized(qkv: QuantizedKV) -> None:
    if not isinstance(qkv, QuantizedKV):
        raise TypeError(f"dequantize: expected QuantizedKV, got {type(qkv).__name__}")
    if qkv.fmt not in FORMATS:
        raise ValueError(f"fmt: {qkv.fmt!r}; choose one of {', '.join(FORMATS)}")
    if qkv.q.dtype != FORMATS[qkv.fmt][0]:
        raise TypeError(f"q: dtype {qkv.q.dtype} does not match fmt {qkv.fmt!r}")
    if qkv.dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: {qkv.dtype} not supported; use fp32, fp16 or bf16")
    if qkv.q.dim() != 4 or qkv.q.shape[0] != 2 or not qkv.q.is_contiguous():
        raise ValueError(f"q: expected contiguous [2, L, N, H*D], got shape {list(qkv.q.shape)}")
    _, n_layers, n, hd = qkv.q.shape
    h = qkv.num_kv_heads
    if not isinstance(h, int) or h <= 0 or hd % h:
        raise ValueError(f"num_kv_heads: {h!r} must be a positive int dividing H*D = {hd}")
    want_k = (n_layers, 1, hd) if qkv.k_per_channel else (n_layers, n, h)
    for name, t, want in (("k_scale", qkv.k_scale, want_k), ("v_scale", qkv.v_scale, (n_layers, n, h))):
        if t.dtype != torch.float32 or tuple(t.shape) != want or not t.is_contiguous():
            raise ValueError(f"{name}: expected contiguous float32 {list(want)}, got "
                             f"{t.dtype} {list(t.shape)}")
        if t.device != qkv.q.device:
            raise ValueError(f"{name}: on {t.device}, q on {qkv.q.device}")


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not _INTERPRET:
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "lmcache_lab.kernels.quant is imported")
    return backend


# =================================================================================== public API
def quantize(chunk: torch.Tensor, num_kv_heads: int, fmt: str = "int8", *,
             k_per_channel: bool = False, backend: str = "auto") -> QuantizedKV:
    """Quantize a chunk `[2, L, N, H*D]` (see the module docstring for scales and rounding)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt: {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_chunk(chunk, num_kv_heads)
    if chunk.numel() == 0:
        return _empty_quantized(chunk, num_kv_heads, fmt, k_per_channel)
    impl = {"triton": _quantize_triton, "torch": _quantize_torch,
            "reference": quantize_reference}[_pick_backend(backend, chunk.device)]
    return impl(chunk, num_kv_heads, fmt, k_per_channel)


def dequantize(qkv: QuantizedKV, *, backend: str = "auto") -> torch.Tensor:
    """Decode a `QuantizedKV` to a fresh `[2, L, N, H*D]` tensor of `qkv.dtype`."""
    _check_quantized(qkv)
    if qkv.q.numel() == 0:
        return torch.empty(qkv.q.shape, dtype=qkv.dtype, device=qkv.q.device)
    impl = {"triton": _dequantize_triton, "torch": _dequantize_torch,
            "reference": dequantize_reference}[_pick_backend(backend, qkv.q.device)]
    return impl(qkv)


def _empty_quantized(chunk, num_kv_heads, fmt, k_per_channel) -> QuantizedKV:
    _, n_layers, n, hd = chunk.shape
    k_shape = (n_layers, 1, hd) if k_per_channel else (n_layers, n, num_kv_heads)
    return QuantizedKV(torch.empty(chunk.shape, dtype=FORMATS[fmt][0], device=chunk.device),
                       torch.zeros(k_shape, dtype=torch.float32, device=chunk.device),
                       torch.zeros((n_layers, n, num_kv_heads), dtype=torch.float32,
                                   device=chunk.device),
                       fmt, chunk.dtype, num_kv_heads, k_per_channel)


# =================================================================================== reference
def _encode_values(y: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 values already divided by their scale -> int8 / fp8, round half to even."""
    dtype, qmax = FORMATS[fmt]
    y = y.clamp(-qmax, qmax)
    if fmt == "fp8":
        return y.to(dtype)
    # Round half to even by adding and removing 1.5 * 2**23 in fp32 (exact for |y| < 2**22):
    # the same operation as the kernel, and ~100x faster than torch.round on this CPU build.
    return ((y + _MAGIC) - _MAGIC).to(dtype)


def quantize_reference(chunk, num_kv_heads, fmt, k_per_channel) -> QuantizedKV:
    """Straight from the definitions: one group at a time in fp32 (loops over layers)."""
    _, n_layers, n, hd = chunk.shape
    h, d = num_kv_heads, hd // num_kv_heads
    qmax = FORMATS[fmt][1]
    x = chunk.float()                                                             # [2, L, N, HD]
    q = torch.empty(chunk.shape, dtype=FORMATS[fmt][0], device=chunk.device)
    scales = []
    for kv in (0, 1):
        per_channel = kv == 0 and k_per_channel
        scale = torch.empty((n_layers, 1, hd) if per_channel else (n_layers, n, h),
                            dtype=torch.float32, device=chunk.device)
        for layer in range(n_layers):
            if per_channel:
                xl = x[kv, layer]                                                 # [N, HD]
                s = xl.abs().amax(dim=0, keepdim=True) / qmax                     # [1, HD]
                y = xl / torch.where(s > 0, s, torch.ones_like(s))
            else:
                xl = x[kv, layer].view(n, h, d)                                   # [N, H, D]
                s = xl.abs().amax(dim=2) / qmax                                   # [N, H]
                y = (xl / torch.where(s > 0, s, torch.ones_like(s))[:, :, None]).view(n, hd)
            scale[layer] = s
            q[kv, layer] = _encode_values(y, fmt)
        scales.append(scale)
    return QuantizedKV(q, scales[0], scales[1], fmt, chunk.dtype, num_kv_heads, k_per_channel)


def dequantize_reference(qkv: QuantizedKV) -> torch.Tensor:
    _, n_layers, n, hd = qkv.q.shape
    h, d = qkv.num_kv_heads, hd // qkv.num_kv_heads
    out = torch.empty(qkv.q.shape, dtype=qkv.dtype, device=qkv.q.device)
    for kv, scale in ((0, qkv.k_scale), (1, qkv.v_scale)):
        for layer in range(n_layers):
            qf = qkv.q[kv, layer].float()                                         # [N, HD]
            if kv == 0 and qkv.k_per_channel:
                val = qf * scale[layer]                                           # [N, HD]
            else:
                val = (qf.view(n, h, d) * scale[layer][:, :, None]).view(n, hd)
            out[kv, layer] = val.to(qkv.dtype)
    return out


# =================================================================================== torch path
def _quantize_torch(chunk, num_kv_heads, fmt, k_per_channel) -> QuantizedKV:
    """One (K|V, layer) slice at a time through one reused fp32 buffer, in place: the slice
    stays in cache and no chunk-sized temporaries are allocated. Same fp32 operations as the
    reference (amax |x| = max(max x, -min x) exactly), so identical bits. (amin + amax: two
    fast reductions; torch.aminmax is ~5x slower on CPU.)"""
    _, n_layers, n, hd = chunk.shape
    h, d = num_kv_heads, hd // num_kv_heads
    qdtype, qmax = FORMATS[fmt]
    dev = chunk.device
    q = torch.empty(chunk.shape, dtype=qdtype, device=dev)                       # [2, L, N, HD]
    s_tok = torch.empty((2, n_layers, n, h), dtype=torch.float32, device=dev)    # [2, L, N, H]
    k_scale = torch.empty((n_layers, 1, hd), dtype=torch.float32, device=dev) if k_per_channel \
        else s_tok[0]
    buf = torch.empty((n, hd), dtype=torch.float32, device=dev)                   # [N, HD]
    for kv in (0, 1):
        per_channel = kv == 0 and k_per_channel
        for layer in range(n_layers):
            buf.copy_(chunk[kv, layer])
            if per_channel:
                lo, hi = buf.amin(dim=0), buf.amax(dim=0)                         # [HD], [HD]
                scale = k_scale[layer, 0]                                         # [HD]
                torch.maximum(hi, lo.neg_(), out=scale).abs_().div_(qmax)      # abs_: -0 -> +0
                buf.div_(torch.where(scale > 0, scale, 1.0))
            else:
                lo, hi = buf.view(n, h, d).amin(dim=2), buf.view(n, h, d).amax(dim=2)  # [N, H]
                scale = s_tok[kv, layer]                                          # [N, H]
                torch.maximum(hi, lo.neg_(), out=scale).abs_().div_(qmax)      # abs_: -0 -> +0
                buf.view(n, h, d).div_(torch.where(scale > 0, scale, 1.0)[:, :, None])
            buf.clamp_(-qmax, qmax)
            if fmt == "int8":
                buf.add_(_MAGIC).sub_(_MAGIC)                                     # RNE, exact
            q[kv, layer].copy_(buf)                                               # exact / RNE cast
    return QuantizedKV(q, k_scale.contiguous(), s_tok[1].contiguous(), fmt, chunk.dtype,
                       num_kv_heads, k_per_channel)


def _fp8_table(device: torch.device) -> torch.Tensor:
    """fp32 [256]: the value of every float8_e4m3fn bit pattern (NaN patterns included)."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).float()


def _dequantize_torch(qkv: QuantizedKV) -> torch.Tensor:
    """Per (K|V, layer) slice through one fp32 buffer: decode, scale in place, round-cast out."""
    _, n_layers, n, hd = qkv.q.shape
    h, d = qkv.num_kv_heads, hd // qkv.num_kv_heads
    out = torch.empty(qkv.q.shape, dtype=qkv.dtype, device=qkv.q.device)         # [2, L, N, HD]
    buf = torch.empty((n, hd), dtype=torch.float32, device=qkv.q.device)          # [N, HD]
    # fp8 -> fp32 through a 256-entry table: the same values as the cast, ~3x faster on CPU
    table = _fp8_table(qkv.q.device) if qkv.fmt == "fp8" and qkv.q.device.type == "cpu" else None
    for kv, scale in ((0, qkv.k_scale), (1, qkv.v_scale)):
        for layer in range(n_layers):
            if table is not None:
                codes = qkv.q[kv, layer].view(torch.uint8).view(-1).int()         # [N*HD]
                torch.index_select(table, 0, codes, out=buf.view(-1))
            else:
                buf.copy_(qkv.q[kv, layer])
            if kv == 0 and qkv.k_per_channel:
                buf.mul_(scale[layer])                                            # [N, HD] * [1, HD]
            else:
                buf.view(n, h, d).mul_(scale[layer][:, :, None])                  # * [N, H, 1]
            out[kv, layer].copy_(buf)
    return out


# =================================================================================== triton
@triton.jit
def _round_half_even(y):
    """fp32 -> nearest integer value (ties to even), for |y| < 2**22; stays fp32."""
    magic = 12582912.0                     # 1.5 * 2**23: adding it leaves no fraction bits
    return (y + magic) - magic


@triton.jit
def _round_to_e4m3(y):
    """fp32 -> the nearest float8 e4m3fn value (ties to even), still as fp32; |y| <= 448."""
    bits = y.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127                                # unbiased exponent
    exp = tl.maximum(exp, -6)                                        # subnormals: quantum 2**-9
    quantum = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)   # 2**(exp - 3), exact
    inv = ((127 + 3 - exp) << 23).to(tl.float32, bitcast=True)  # 2**(3 - exp)
    return _round_half_even(y * inv) * quantum                       # power-of-two scaling: exact


@triton.jit
def _round_fp32_to_bf16(x):
    """fp32 -> the nearest bfloat16 value (ties to even) as fp32 with 16 zero low bits."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _quant_token_head_kernel(
    x_ptr,       # *T [R, HD]: chunk rows (R = rows of K and/or V, flattened (kv, layer, token))
    q_ptr,       # *int8 | *fp8 [R, HD]: output codes, same row order
    scale_ptr,   # *fp32 [R, H]: output scale per (row, head)
    R,           # number of rows
    HD,          # H * D
    H,           # number of KV heads
    HEAD_SIZE: tl.constexpr,  # D
    QMAX: tl.constexpr,       # 127.0 (int8) or 448.0 (fp8)
    IS_FP8: tl.constexpr,
    BLOCK_R: tl.constexpr,    # rows per program
    BLOCK_D: tl.constexpr,    # next power of two >= D
):
    """Grid (cdiv(R, BLOCK_R), H): one [BLOCK_R, D] tile of one head per program."""
    pid_r = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    row = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)     # [BLOCK_R]
    dim = tl.arange(0, BLOCK_D).to(tl.int64)                                     # [BLOCK_D]
    row_in = row < R
    mask = row_in[:, None] & (dim < HEAD_SIZE)[None, :]
    offs = row[:, None] * HD + head * HEAD_SIZE + dim[None, :]                   # [BLOCK_R, BLOCK_D]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)                                             # [BLOCK_R]
    scale = tl.math.div_rn(amax, tl.full([BLOCK_R], QMAX, tl.float32))          # IEEE, as torch
    tl.store(scale_ptr + row * H + head, scale, mask=row_in)
    y = tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0)[:, None])
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_FP8:
        tl.store(q_ptr + offs, _round_to_e4m3(y).to(q_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(q_ptr + offs, _round_half_even(y).to(tl.int8), mask=mask)


@triton.jit
def _quant_channel_kernel(
    x_ptr,       # *T [L, N, HD]: K part of the chunk
    q_ptr,       # *int8 | *fp8 [L, N, HD]: output codes
    scale_ptr,   # *fp32 [L, HD]: output scale per (layer, channel)
    N,           # tokens
    HD,          # H * D
    QMAX: tl.constexpr,
    IS_FP8: tl.constexpr,
    BLOCK_N: tl.constexpr,    # tokens per step
    BLOCK_C: tl.constexpr,    # channels per program
):
    """Grid (L, cdiv(HD, BLOCK_C)): two passes over the N tokens of one layer's channel block,
    the first for amax, the second to quantize."""
    layer = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)  # [BLOCK_C]
    col_in = col < HD
    base = layer * N * HD
    amax = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, N, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N).to(tl.int64)                            # [BLOCK_N]
        mask = (tok < N)[:, None] & col_in[None, :]
        x = tl.load(x_ptr + base + tok[:, None] * HD + col[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=0))
    scale = tl.math.div_rn(amax, tl.full([BLOCK_C], QMAX, tl.float32))          # [BLOCK_C]
    tl.store(scale_ptr + layer * HD + col, scale, mask=col_in)
    div = tl.where(scale > 0, scale, 1.0)[None, :]
    for t0 in range(0, N, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = (tok < N)[:, None] & col_in[None, :]
        offs = base + tok[:, None] * HD + col[None, :]                           # [BLOCK_N, BLOCK_C]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, div), -QMAX), QMAX)
        if IS_FP8:
            tl.store(q_ptr + offs, _round_to_e4m3(y).to(q_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(q_ptr + offs, _round_half_even(y).to(tl.int8), mask=mask)


@triton.jit
def _dequant_kernel(
    q_ptr,       # *int8 | *fp8 [R, HD]: codes
    scale_ptr,   # *fp32: scale of (row, col) at (row // ROW_DIV) * S_ROW + col // COL_DIV
    out_ptr,     # *T [R, HD]: output
    R,           # rows
    HD,          # H * D
    ROW_DIV,     # 1 (per token-head) or N (per channel: one scale row per layer)
    S_ROW,       # H (per token-head) or HD (per channel)
    COL_DIV: tl.constexpr,    # D (per token-head) or 1 (per channel)
    OUT_BF16: tl.constexpr,   # round explicitly to bf16 (the interpreter's cast truncates)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(R, BLOCK_R), cdiv(HD, BLOCK_C)): out = q * scale, rounded to nearest even."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    col = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (row < R)[:, None] & (col < HD)[None, :]
    offs = row[:, None] * HD + col[None, :]                                      # [BLOCK_R, BLOCK_C]
    q = tl.load(q_ptr + offs, mask=mask).to(tl.float32)
    s_offs = (row // ROW_DIV)[:, None] * S_ROW + (col // COL_DIV)[None, :]
    scale = tl.load(scale_ptr + s_offs, mask=mask, other=0.0)
    val = q * scale
    if OUT_BF16:
        val = _round_fp32_to_bf16(val)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


def _quantize_triton(chunk, num_kv_heads, fmt, k_per_channel) -> QuantizedKV:
    _, n_layers, n, hd = chunk.shape
    h, d = num_kv_heads, hd // num_kv_heads
    qdtype, qmax = FORMATS[fmt]
    q = torch.empty(chunk.shape, dtype=qdtype, device=chunk.device)              # [2, L, N, HD]
    s_tok = torch.empty((2, n_layers, n, h), dtype=torch.float32, device=chunk.device)
    rows_per_kv = n_layers * n
    first = rows_per_kv if k_per_channel else 0          # rows quantized per token-head
    rows = 2 * rows_per_kv - first
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), 2048 // block_d))
    if rows > 0:
        _quant_token_head_kernel[(triton.cdiv(rows, block_r), h)](
            chunk.view(-1, hd)[first:], q.view(-1, hd)[first:], s_tok.view(-1, h)[first:],
            rows, hd, h, HEAD_SIZE=d, QMAX=qmax, IS_FP8=fmt == "fp8", BLOCK_R=block_r,
            BLOCK_D=block_d)
    k_scale = s_tok[0]
    if k_per_channel:
        k_scale = torch.empty((n_layers, 1, hd), dtype=torch.float32, device=chunk.device)
        block_c = min(triton.next_power_of_2(hd), 256)
        block_n = max(1, min(triton.next_power_of_2(max(n, 1)), 4096 // block_c))
        if n > 0:
            _quant_channel_kernel[(n_layers, triton.cdiv(hd, block_c))](
                chunk[0], q[0], k_scale, n, hd, QMAX=qmax, IS_FP8=fmt == "fp8",
                BLOCK_N=block_n, BLOCK_C=block_c)
        else:
            k_scale.zero_()
    return QuantizedKV(q, k_scale.contiguous(), s_tok[1].contiguous(), fmt, chunk.dtype,
                       num_kv_heads, k_per_channel)


def _dequantize_triton(qkv: QuantizedKV) -> torch.Tensor:
    _, n_layers, n, hd = qkv.q.shape
    h, d = qkv.num_kv_heads, hd // qkv.num_kv_heads
    out = torch.empty(qkv.q.shape, dtype=qkv.dtype, device=qkv.q.device)
    rows = n_layers * n
    if rows == 0:
        return out
    block_c = min(triton.next_power_of_2(hd), 512)
    block_r = max(1, min(triton.next_power_of_2(rows), 4096 // block_c))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(hd, block_c))
    for kv, scale in ((0, qkv.k_scale), (1, qkv.v_scale)):
        per_channel = kv == 0 and qkv.k_per_channel
        _dequant_kernel[grid](
            qkv.q[kv], scale, out[kv], rows, hd,
            n if per_channel else 1, hd if per_channel else h,
            COL_DIV=1 if per_channel else d, OUT_BF16=qkv.dtype == torch.bfloat16,
            BLOCK_R=block_r, BLOCK_C=block_c)
    return out
