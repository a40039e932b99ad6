"""Codecs: the registry, lossless `none`, and the quantizing `int8`/`fp8` codecs through the
wire format (what a disk or Redis tier really stores)."""
from __future__ import annotations

import pytest
import torch

from lmcache_lab import wire
from lmcache_lab.codecs import CODECS, get_codec

BOUND = {"int8": 0.01, "fp8": 0.045}


def chunk(dtype=torch.bfloat16, hd=128):
    return torch.randn(2, 3, 16, hd, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_registry_names():
    assert set(CODECS) == {"none", "int8", "fp8"}
    assert get_codec("none").lossless and not get_codec("int8").lossless
    with pytest.raises(ValueError, match="'zstd' is not allowed"):
        get_codec("zstd")


def test_none_is_identity():
    x = chunk()
    assert get_codec("none").decode(get_codec("none").encode(x)) is x


@pytest.mark.parametrize("k_per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_quant_codec_round_trip_through_wire(name, dtype, k_per_channel):
    codec = get_codec(name, num_kv_heads=2, k_per_channel=k_per_channel)
    x = chunk(dtype)
    stored = codec.encode(x)
    assert stored["q"].dtype == (torch.int8 if name == "int8" else torch.float8_e4m3fn)
    raw = sum(t.numel() * t.element_size() for t in stored.values())
    assert raw < x.numel() * x.element_size() * (0.6 if dtype != torch.float32 else 0.3)
    record = wire.decode(wire.encode(b"k" * 16, stored))
    y = codec.decode(record.tensors)
    assert y.dtype == dtype and y.shape == x.shape
    err = ((y.float() - x.float()).norm() / x.float().norm()).item()
    assert 0 < err <= BOUND[name]
    # deterministic: a second decode gives the same bits
    assert torch.equal(codec.decode(record.tensors), y)


def test_default_groups_without_head_count():
    """Without num_kv_heads, scales cover groups of 64 channels (one group if 64 does not divide)."""
    assert get_codec("int8").encode(chunk(hd=128))["v_scale"].shape == (3, 16, 2)
    assert get_codec("int8").encode(chunk(hd=96))["v_scale"].shape == (3, 16, 1)


def test_decode_rejects_bad_values():
    codec = get_codec("int8")
    stored = codec.encode(chunk())
    with pytest.raises(ValueError, match="lacks meta"):
        codec.decode({k: v for k, v in stored.items() if k != "meta"})
    with pytest.raises(ValueError, match="bad meta"):
        codec.decode({**stored, "meta": torch.tensor([9, 0], dtype=torch.int32)})
    with pytest.raises(TypeError, match="does not match fmt 'fp8'"):
        get_codec("fp8").decode(stored)
    with pytest.raises(ValueError, match="v_scale"):
        codec.decode({**stored, "v_scale": stored["v_scale"][:, :3].contiguous()})
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
        get_codec("fp8", num_kv_heads=0)
