"""Chunk keys: tokens -> full chunks -> chained content hashes (32-byte sha256, or 16-byte xxh3_128).

    root   = H(namespace)                 namespace = everything engine-side that makes KV differ
    root   = H(K || namespace)            with a store secret: K = HMAC-SHA256(secret, label)
    h_{-1} = root, then for each (tag, value) of the request's identity, in order:
             h_{-1} = H(h_{-1} || "id" || len(tag) || tag || len(value) || value)
    h_i    = H(h_{i-1} || tokens_i)       tokens_i = the i-th chunk as little-endian uint32

A key therefore stands for the chunk *and every token before it*: equal keys mean equal prefixes,
and a changed early token changes every later key. The request identity holds what a single
request adds that changes its KV (a LoRA adapter, a cache salt): each field is tagged and
length-prefixed, so no value of one field can stand for another, nor for a different split of
the same bytes; an empty identity leaves the root as it is. H is sha256 by default: a tenant who
crafts prompts must not be able to find one whose key equals another tenant's chunk (vLLM moved its
prefix-cache hash to sha256 for this reason, GHSA-rm76-4mrf-v9r8). xxh3_128 is faster but not
collision resistant: only for a single-tenant deployment. Never Python's `hash()`, which is salted
per process.

A prompt's tail past its last full chunk may be stored as a shorter chunk of whole engine blocks
(the vLLM connector's `tail_blocks`): `tail_key(h_{i-1}, tail tokens)` = H(h_{i-1} || tail_tokens),
the same rule over fewer tokens, so it too stands for every token before its end. Its input is
shorter than a chunk's, so it equals no chunk key of any chain (short of a hash collision).
"""
from __future__ import annotations

import array
import hashlib
import hmac
import json
import struct
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import xxhash


@dataclass(frozen=True)
class Namespace:
    """Everything that changes the KV bytes of a token sequence. Two stores that differ in any
    field never share a key."""
    model: str
    kv_dtype: str = "unknown"
    layout: str = "unknown"
    tp_rank: int = 0
    tp_size: int = 1
    codec: str = "none"
    extra: str = ""  # anything else an integration needs to separate (e.g. "mla", page size)

    def seed(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


Identity = Sequence[tuple[str, str]]
"""Per-request fields that change KV beyond the token ids, as (tag, value) pairs in a fixed order."""


def _hasher(name: str):
    if name == "xxh3_128":
        return lambda data: xxhash.xxh3_128_digest(data)
    if name == "sha256":
        return lambda data: hashlib.sha256(data).digest()
    raise ValueError(f"hash: {name!r} is not allowed; choose one of xxh3_128, sha256")


def namespace_root(namespace: Namespace, hash: str = "sha256", secret: bytes | None = None) -> bytes:
    """The chain root of a namespace: H(seed), or H(K || seed) with K derived from the store
    secret by HMAC-SHA256 with a fixed label (independent of the values' MAC key)."""
    seed = namespace.seed()
    if secret is not None:
        seed = hmac.digest(secret, b"lmcache_lab key namespace", "sha256") + seed
    return _hasher(hash)(seed)


assert array.array("I").itemsize == 4, "token hashing expects 4-byte unsigned ints"


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32 bytes (what gets hashed), validated to fit.

    Lists (what engines pass) go through `array.array`, about 4x faster than numpy for Python ints;
    arrays and tensors are converted without a Python loop.
    """
    if isinstance(tokens, (list, tuple)):
        try:
            arr = array.array("I", tokens)
        except (OverflowError, TypeError) as e:
            raise ValueError(f"tokens: token ids must be integers in 0..2**32-1 ({e})") from None
        if sys.byteorder != "little":
            arr.byteswap()
        return arr.tobytes()
    if hasattr(tokens, "numpy") and not isinstance(tokens, np.ndarray):  # torch.Tensor
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("tokens: token ids must be integers in 0..2**32-1")
    return np.ascontiguousarray(arr, dtype="<u4").tobytes()


class ChunkKeyer:
    """Computes the chained keys of a token sequence for one namespace (and store secret)."""

    def __init__(self, namespace: Namespace, chunk_size: int = 256, hash: str = "sha256",
                 secret: bytes | None = None):
        assert chunk_size > 0
        self.namespace = namespace
        self.chunk_size = chunk_size
        self.hash_name = hash
        self._h = _hasher(hash)
        self.root = namespace_root(namespace, hash, secret)

    def num_full_chunks(self, num_tokens: int) -> int:
        return num_tokens // self.chunk_size

    def request_root(self, identity: Identity = ()) -> bytes:
        """The chain root of a request whose KV also depends on `identity`, a sequence of
        (tag, value) string pairs (see the module docstring); `root` when it is empty."""
        h = self.root
        for tag, value in identity:
            if not isinstance(tag, str) or not isinstance(value, str):
                raise ValueError(f"identity: expected (str, str) pairs, got {(tag, value)!r}")
            t, v = tag.encode(), value.encode()
            h = self._h(h + b"id" + struct.pack("<I", len(t)) + t + struct.pack("<I", len(v)) + v)
        return h

    def tail_key(self, parent: bytes, tokens: Sequence[int] | np.ndarray) -> bytes:
        """Key of a tail chunk: `tokens` (fewer than a chunk's) after the chain ending in `parent`
        (the previous chunk's key, or `request_root(identity)` for a tail that starts the prompt)."""
        if not 0 < len(tokens) < self.chunk_size:
            raise ValueError(f"tail_key: {len(tokens)} tokens; a tail has 1..{self.chunk_size - 1}")
        return self._h(parent + token_bytes(tokens))

    def keys(self, tokens: Sequence[int] | np.ndarray, max_chunks: int | None = None,
             identity: Identity = ()) -> list[bytes]:
        """Keys of the full chunks of `tokens` (at most `max_chunks`), in prefix order, for a
        request with this `identity`."""
        buf = memoryview(token_bytes(tokens))
        n = len(buf) // (4 * self.chunk_size)
        if max_chunks is not None:
            n = min(n, max_chunks)
        step = self.chunk_size * 4
        h, prev, out = self._h, self.request_root(identity), []
        for i in range(n):
            prev = h(prev + buf[i * step:(i + 1) * step])
            out.append(prev)
        return out
