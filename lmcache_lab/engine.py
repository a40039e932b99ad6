"""CacheEngine: the engine-agnostic core an integration talks to.

    lookup(tokens)            -> hit length in tokens (longest cached prefix, across tiers)
    store(tokens, kv_chunks)  -> chunks newly stored
    retrieve(tokens)          -> the KV chunks of the leading cached prefix

Partial-chunk rule: only full chunks of `chunk_size` tokens are keyed and stored, so a hit is
always a multiple of `chunk_size`; the trailing partial chunk is always recomputed.

A chunk's KV is one tensor per chunk (for the kernels' layout `[2, layers, chunk_size, heads*dim]`;
the engine does not look inside). The codec turns it into stored tensors and back.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from lmcache_lab.codecs import get_codec
from lmcache_lab.config import CacheConfig, load_config
from lmcache_lab.keys import ChunkKeyer, Namespace
from lmcache_lab.tiers import BudgetedTier, TieredStore, build_tiers, payload_nbytes


@dataclass
class EngineStats:
    lookups: int = 0
    lookup_tokens: int = 0      # tokens asked about (full chunks only)
    hit_tokens: int = 0         # tokens found cached by lookup
    stored_chunks: int = 0
    stored_bytes: int = 0
    retrieved_chunks: int = 0
    retrieved_bytes: int = 0
    load_failures: int = 0      # a chunk reported by lookup could not be loaded (evicted, corrupt)
    store_seconds: float = 0.0
    retrieve_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class CacheEngine:
    def __init__(self, config: CacheConfig | dict | str | None = None, namespace: Namespace | None = None,
                 tiers: Sequence[BudgetedTier] | None = None):
        self.config = load_config(config)
        self.namespace = namespace or Namespace(model="unknown", codec=self.config.codec)
        if self.namespace.codec != self.config.codec:
            raise ValueError(f"namespace.codec {self.namespace.codec!r} != codec {self.config.codec!r}")
        self.chunk_size = self.config.chunk_size
        self.keyer = ChunkKeyer(self.namespace, self.chunk_size, self.config.hash)
        self.codec = get_codec(self.config.codec)
        self.store_ = TieredStore(build_tiers(self.config) if tiers is None else tiers)
        self.stats = EngineStats()

    @property
    def tiers(self) -> list[BudgetedTier]:
        return self.store_.tiers

    def chunk_keys(self, tokens, max_chunks: int | None = None) -> list[bytes]:
        return self.keyer.keys(tokens, max_chunks)

    def lookup(self, tokens) -> int:
        keys = self.keyer.keys(tokens)
        hit = self.store_.prefix_length(keys) * self.chunk_size
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(keys) * self.chunk_size
        self.stats.hit_tokens += hit
        return hit

    def store(self, tokens, kv_chunks: Sequence[torch.Tensor], start: int = 0) -> int:
        """Store `kv_chunks[i]` as full chunk `start + i` of `tokens`. Chunks already present are
        only touched. The tensors are owned by the cache afterwards (pass fresh tensors)."""
        t0 = time.perf_counter()
        keys = self.keyer.keys(tokens)
        if start < 0 or start + len(kv_chunks) > len(keys):
            raise ValueError(f"store: chunks {start}..{start + len(kv_chunks)} exceed the "
                             f"{len(keys)} full chunks of {len(tokens)} tokens")
        stored = 0
        for i, chunk in enumerate(kv_chunks, start):
            key = keys[i]
            if self.store_.contains(key):
                continue
            value = self.codec.encode(chunk)
            if self.store_.put(key, value, keys[i - 1] if i else None, i * self.chunk_size):
                stored += 1
                self.stats.stored_bytes += payload_nbytes(value)
        self.store_.touch(keys[:start + len(kv_chunks)])
        self.stats.stored_chunks += stored
        self.stats.store_seconds += time.perf_counter() - t0
        return stored

    def retrieve(self, tokens, num_tokens: int | None = None) -> list[torch.Tensor]:
        """KV chunks of the leading cached prefix (at most `num_tokens` tokens). Stops at the first
        chunk that cannot be loaded; each such event counts in `stats.load_failures`."""
        t0 = time.perf_counter()
        max_chunks = None if num_tokens is None else num_tokens // self.chunk_size
        keys = self.keyer.keys(tokens, max_chunks)
        out: list[torch.Tensor] = []
        for i, key in enumerate(keys):
            value = self.store_.get(key, keys[i - 1] if i else None, i * self.chunk_size)
            if value is None:
                if num_tokens is not None:
                    self.stats.load_failures += 1
                break
            out.append(self.codec.decode(value))
            self.stats.retrieved_bytes += payload_nbytes(value)
        self.store_.touch(keys[:len(out)])
        self.stats.retrieved_chunks += len(out)
        self.stats.retrieve_seconds += time.perf_counter() - t0
        return out

    def pin(self, tokens, num_tokens: int) -> list[bytes]:
        """Pin the chunks of the first `num_tokens` tokens (between lookup and load); returns the
        keys to pass to `unpin`."""
        keys = self.keyer.keys(tokens, num_tokens // self.chunk_size)
        self.store_.pin(keys)
        return keys

    def unpin(self, keys: Sequence[bytes]) -> None:
        self.store_.unpin(keys)

    def close(self) -> None:
        self.store_.close()
