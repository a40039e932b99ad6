"""Chunk codecs: how a KV chunk tensor is turned into the tensors a tier stores, and back.

A codec's name is part of the chunk key's namespace (`keys.Namespace.codec`), so a compressed
chunk is never read as a raw one. `none` stores the tensor as it is; `int8` and `fp8` quantize a
chunk `[2, L, N, H*D]` with `lmcache_lab.kernels.quant` (fp32 scales per token and group of
channels, optionally per channel for K, KIVI-style) and decode it back to the original dtype.

Stored tensors of the quantizing codecs:
    q        int8 | float8_e4m3fn [2, L, N, H*D]
    k_scale  float32 [L, N, G]  (or [L, 1, H*D] with k_per_channel)
    v_scale  float32 [L, N, G]
    meta     int32 [2]: (dtype code of the original chunk, k_per_channel flag)
G is `num_kv_heads` when the codec is told it, else H*D // 64 groups of 64 channels (one group
when 64 does not divide H*D). Error bounds: see `kernels/quant.py` and docs/kernels.md.
"""
from __future__ import annotations

import torch

DEFAULT_GROUP = 64
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


class Codec:
    name = "none"
    lossless = True

    def encode(self, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kv": chunk}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        return stored["kv"]


class _QuantCodec(Codec):
    """Base of the lossy codecs; `fmt` is the `kernels.quant` format."""
    lossless = False
    fmt = ""

    def __init__(self, num_kv_heads: int | None = None, k_per_channel: bool = False,
                 backend: str = "auto"):
        if num_kv_heads is not None and (not isinstance(num_kv_heads, int) or num_kv_heads <= 0):
            raise ValueError(f"codec {self.name}: num_kv_heads must be a positive int, got {num_kv_heads!r}")
        self.num_kv_heads = num_kv_heads
        self.k_per_channel = bool(k_per_channel)
        self.backend = backend

    def _groups(self, chunk: torch.Tensor) -> int:
        if chunk.dim() != 4:
            raise ValueError(f"codec {self.name}: expected a chunk [2, L, N, H*D], got shape "
                             f"{list(chunk.shape)}")
        if chunk.shape[0] != 2:      # a K-only (MLA latent) chunk [1, L, N, D]
            raise ValueError(f"codec {self.name}: quantizes K and V chunks [2, L, N, H*D]; a "
                             f"K-only (MLA) chunk {list(chunk.shape)} needs codec 'none'")
        hd = chunk.shape[3]
        if self.num_kv_heads is not None:
            return self.num_kv_heads
        return hd // DEFAULT_GROUP if hd % DEFAULT_GROUP == 0 and hd else 1

    def encode(self, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        from lmcache_lab.kernels.quant import quantize      # Triton imports only when used
        qkv = quantize(chunk, self._groups(chunk), self.fmt, k_per_channel=self.k_per_channel,
                       backend=self.backend)
        meta = torch.tensor([_DTYPE_CODES[chunk.dtype], int(self.k_per_channel)], dtype=torch.int32)
        return {"q": qkv.q, "k_scale": qkv.k_scale, "v_scale": qkv.v_scale, "meta": meta}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        from lmcache_lab.kernels.quant import QuantizedKV, dequantize
        missing = {"q", "k_scale", "v_scale", "meta"} - set(stored)
        if missing:
            raise ValueError(f"codec {self.name}: stored value lacks {', '.join(sorted(missing))}")
        meta = stored["meta"]
        if meta.dtype != torch.int32 or tuple(meta.shape) != (2,):
            raise ValueError(f"codec {self.name}: meta must be int32 [2], got {meta.dtype} "
                             f"{list(meta.shape)}")
        code, per_channel = (int(v) for v in meta.tolist())
        if code not in _CODE_DTYPES or per_channel not in (0, 1):
            raise ValueError(f"codec {self.name}: bad meta {meta.tolist()}")
        v_scale = stored["v_scale"]
        if v_scale.dim() != 3:
            raise ValueError(f"codec {self.name}: v_scale must be [L, N, G], got {list(v_scale.shape)}")
        qkv = QuantizedKV(stored["q"], stored["k_scale"], v_scale, self.fmt, _CODE_DTYPES[code],
                          int(v_scale.shape[2]), bool(per_channel))
        return dequantize(qkv, backend=self.backend)


class Int8Codec(_QuantCodec):
    name = "int8"
    fmt = "int8"


class Fp8Codec(_QuantCodec):
    name = "fp8"
    fmt = "fp8"


CODECS: dict[str, type[Codec]] = {"none": Codec, "int8": Int8Codec, "fp8": Fp8Codec}


def get_codec(name: str, **options) -> Codec:
    """A codec by name; `options` go to its constructor (int8/fp8: num_kv_heads, k_per_channel,
    backend)."""
    if name not in CODECS:
        raise ValueError(f"codec: {name!r} is not allowed; choose one of {', '.join(CODECS)}")
    return CODECS[name](**options)
