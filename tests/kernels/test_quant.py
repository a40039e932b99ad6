"""Quantize/dequantize: Triton kernel (interpreter on CPU) == torch path == reference bit for bit;
round-to-nearest-even matches torch for int8, fp8 and the bf16 output; stated error bounds hold."""
from __future__ import annotations

import pytest
import torch

from lmcache_lab.kernels.quant import QuantizedKV, dequantize, quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = ["int8", "fp8"]
BACKENDS = ["triton", "torch"]
# relative L2 error bounds of quantize -> dequantize on Gaussian data (docstring of kernels/quant.py)
REL_L2_BOUND = {"int8": 0.01, "fp8": 0.045}


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}.get(t.dtype, t.dtype))


def assert_same(a: QuantizedKV, b: QuantizedKV) -> None:
    for field in ("q", "k_scale", "v_scale"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape, field
        assert torch.equal(bits(x), bits(y)), field
    assert (a.fmt, a.dtype, a.num_kv_heads, a.k_per_channel) == \
        (b.fmt, b.dtype, b.num_kv_heads, b.k_per_channel)


def chunk_of(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cpu")
    x = x * torch.rand(shape[:-1] + (1,), generator=g, device="cpu") * 4         # varied scales
    x = x.to(torch.get_default_device())
    x[:, 0, 0] = 0                      # all-zero groups: scale 0, decode to zeros
    return x.to(dtype)


SHAPES = {"odd": (2, 2, 5, 3 * 7), "one_token": (2, 1, 1, 2 * 4), "pow2": (2, 2, 8, 2 * 16)}
HEADS = {"odd": 3, "one_token": 2, "pow2": 2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k_per_channel", [False, True], ids=["tok_head", "k_channel"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference(shape, dtype, fmt, k_per_channel, backend):
    x = chunk_of(SHAPES[shape], dtype)
    h = HEADS[shape]
    want = quantize(x, h, fmt, k_per_channel=k_per_channel, backend="reference")
    got = quantize(x, h, fmt, k_per_channel=k_per_channel, backend=backend)
    assert_same(got, want)
    assert torch.all(want.v_scale[0, 0] == 0)
    out_ref = dequantize(want, backend="reference")
    out = dequantize(want, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(bits(out), bits(out_ref))
    assert torch.all(out[:, 0, 0] == 0)


@pytest.mark.parametrize("k_per_channel", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_error_bound(dtype, fmt, k_per_channel):
    """Stated bound on relative L2 error; torch path on a realistic-width chunk."""
    x = torch.randn(2, 2, 64, 4 * 32, generator=torch.Generator().manual_seed(1), device="cpu")
    x = x.to(dtype).to(torch.get_default_device())
    out = dequantize(quantize(x, 4, fmt, k_per_channel=k_per_channel, backend="torch"))
    err = ((out.float() - x.float()).norm() / x.float().norm()).item()
    assert err <= REL_L2_BOUND[fmt], err
    assert err > 0          # lossy: an exact result would mean quantization did not happen


def test_k_per_channel_helps_channel_outliers():
    """KIVI's observation: K has outlier channels; per-channel scales keep the rest precise."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 64, 4 * 16, generator=g, device="cpu").to(torch.get_default_device())
    x[0, :, :, 5] *= 50                                   # one outlier channel in K
    err = {}
    for per_channel in (False, True):
        out = dequantize(quantize(x, 4, "int8", k_per_channel=per_channel))
        rest = [c for c in range(16) if c != 5]          # the outlier's head, other channels
        err[per_channel] = ((out[0, ..., rest] - x[0, ..., rest]).norm()
                            / x[0, ..., rest].norm()).item()
    assert err[True] < err[False] / 10, err


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_round_half_even_ties(backend):
    """Scale 1 (amax = QMAX) so codes are the values themselves: ties go to even like torch."""
    int8_vals = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.4999998]
    x = torch.tensor(int8_vals + [0.0] * 3).view(1, 1, 1, 12).expand(2, 1, 1, 12).contiguous()
    q = quantize(x, 1, "int8", backend=backend).q[0, 0, 0, :9]
    assert q.tolist() == [127, 0, 2, 2, 0, -2, -2, 126, 3]

    # fp8 e4m3: 1.0625 ties between 1.0 and 1.125 -> 1.0; 1.1875 -> 1.25; 2**-10 (subnormal
    # half quantum) -> 0; 3 * 2**-10 -> 2 * 2**-9; 17 -> 16; 19 -> 20; 440 -> 448 (max)
    fp8_vals = [448.0, 1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -10, 17.0, 19.0, 440.0, -1.0625]
    x = torch.tensor(fp8_vals + [0.0] * 3).view(1, 1, 1, 12).expand(2, 1, 1, 12).contiguous()
    q = quantize(x, 1, "fp8", backend=backend).q[0, 0, 0, :9]
    want = torch.tensor(fp8_vals).to(torch.float8_e4m3fn)          # torch's RNE cast
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert q.float().tolist() == [448.0, 1.0, 1.25, 0.0, 2.0 ** -8, 16.0, 20.0, 448.0, -1.0]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_output_rounds_to_nearest_even(backend):
    """q * scale lands between bf16 values: the result must be torch's RNE cast, not truncation."""
    scale = torch.tensor(1 + 2.0 ** -8)                   # 1.00390625, exact in fp32
    codes = torch.tensor([1, 3, 5, -3, 7, 127, 100, 9], dtype=torch.int8)
    q = codes.view(1, 1, 1, 8).expand(2, 1, 1, 8).contiguous()
    s = torch.full((1, 1, 1), float(scale))
    qkv = QuantizedKV(q, s.clone(), s.clone(), "int8", torch.bfloat16, 1)
    out = dequantize(qkv, backend=backend)[0, 0, 0]
    want = (codes.float() * scale).to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    truncated = ((codes.float() * scale).view(torch.int32) & -65536).view(torch.float32)
    assert not torch.equal(out.float(), truncated)        # the test would catch truncation


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_chunk(backend):
    x = torch.zeros(2, 3, 0, 8)
    qkv = quantize(x, 2, "fp8", k_per_channel=True, backend=backend)
    assert qkv.q.shape == (2, 3, 0, 8) and qkv.k_scale.shape == (3, 1, 8)
    assert qkv.v_scale.shape == (3, 0, 2)
    assert dequantize(qkv, backend=backend).shape == (2, 3, 0, 8)


@pytest.mark.parametrize("args,exc,msg", [
    ((torch.zeros(2, 1, 2, 6, dtype=torch.int32), 2, "int8"), TypeError, "dtype torch.int32 not supported"),
    ((torch.zeros(3, 1, 2, 6), 2, "int8"), ValueError, r"expected \[2, L, N, H\*D\]"),
    ((torch.zeros(2, 1, 6, 2).transpose(2, 3), 2, "int8"), ValueError, "not contiguous"),
    ((torch.zeros(2, 1, 2, 6), 4, "int8"), ValueError, "num_kv_heads: 4 must be a positive int dividing"),
    ((torch.zeros(2, 1, 2, 6), 2, "int4"), ValueError, "fmt: 'int4'"),
])
def test_quantize_bad_input(args, exc, msg):
    with pytest.raises(exc, match=msg):
        quantize(*args)


def test_dequantize_bad_input():
    good = quantize(torch.randn(2, 2, 3, 8), 2, "int8")
    bad_scale = QuantizedKV(good.q, good.k_scale[:, :2].contiguous(), good.v_scale, "int8",
                            torch.float32, 2)
    with pytest.raises(ValueError, match=r"k_scale: expected contiguous float32 \[2, 3, 2\]"):
        dequantize(bad_scale, backend="triton")
    wrong_fmt = QuantizedKV(good.q, good.k_scale, good.v_scale, "fp8", torch.float32, 2)
    with pytest.raises(TypeError, match="does not match fmt 'fp8'"):
        dequantize(wrong_fmt)
    with pytest.raises(ValueError, match="backend: 'gpu'"):
        dequantize(good, backend="gpu")
