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
        return self.lookup_keys(self.keyer.keys(tokens)) * self.chunk_size

    def lookup_keys(self, keys: Sequence[bytes]) -> int:
        """Number of leading `keys` (chained chunk keys, root first) present in some tier."""
        hit = self.store_.prefix_length(keys)
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(keys) * self.chunk_size
        self.stats.hit_tokens += hit * self.chunk_size
        return hit

    def store(self, tokens, kv_chunks: Sequence[torch.Tensor], start: int = 0) -> int:
        """Store `kv_chunks[i]` as full chunk `start + i` of `tokens`. Chunks already present are
        only touched. The tensors are owned by the cache afterwards (pass fresh tensors)."""
        keys = self.keyer.keys(tokens)
        if start < 0 or start + len(kv_chunks) > len(keys):
            raise ValueError(f"store: chunks {start}..{start + len(kv_chunks)} exceed the "
                             f"{len(keys)} full chunks of {len(tokens)} tokens")
        return self.store_keyed(keys, kv_chunks, start)

    def store_keyed(self, keys: Sequence[bytes], kv_chunks: Sequence[torch.Tensor], start: int = 0,
                    tiers: Sequence[int] | None = None) -> int:
        """Store `kv_chunks[i]` under `keys[start + i]` (its parent is `keys[start + i - 1]`).

        `tiers` (indices into `self.tiers`) restricts the write to those tiers, e.g. the slow ones
        written behind the step; a chunk already present in them is only touched. Statistics count
        each chunk once: when it becomes resident in the first tier asked for."""
        t0 = time.perf_counter()
        if start < 0 or start + len(kv_chunks) > len(keys):
            raise ValueError(f"store_keyed: chunks {start}..{start + len(kv_chunks)} exceed "
                             f"{len(keys)} keys")
        targets = self.store_.tiers if tiers is None else [self.store_.tiers[i] for i in tiers]
        count = tiers is None or (len(tiers) and tiers[0] == 0)
        stored = 0
        for i, chunk in enumerate(kv_chunks, start):
            key = keys[i]
            if any(t.contains(key) for t in targets):
                continue
            value = self.codec.encode(chunk)
            ok = False
            for tier in targets:
                ok |= tier.put(key, value, keys[i - 1] if i else None, i * self.chunk_size)
            if ok:
                stored += 1
                if count:
                    self.stats.stored_bytes += payload_nbytes(value)
        for tier in targets:
            tier.touch(keys[:start + len(kv_chunks)])
        if count:
            self.stats.stored_chunks += stored
        self.stats.store_seconds += time.perf_counter() - t0
        return stored

    def retrieve(self, tokens, num_tokens: int | None = None) -> list[torch.Tensor]:
        """KV chunks of the leading cached prefix (at most `num_tokens` tokens). Stops at the first
        chunk that cannot be loaded; each such event counts in `stats.load_failures`."""
        max_chunks = None if num_tokens is None else num_tokens // self.chunk_size
        return self.retrieve_keyed(self.keyer.keys(tokens, max_chunks), expected=num_tokens is not None)

    def retrieve_keyed(self, keys: Sequence[bytes], start: int = 0, expected: bool = True
                       ) -> list[torch.Tensor]:
        """KV chunks of `keys[start:]`, in order, stopping at the first one that cannot be read.
        With `expected` (the caller was promised these chunks by a lookup), a shortfall counts
        as one `stats.load_failures` event."""
        t0 = time.perf_counter()
        values = self.store_.get_chain(keys[start:], keys[start - 1] if start else None,
                                       start * self.chunk_size, self.chunk_size)
        if expected and len(values) < len(keys) - start:
            self.stats.load_failures += 1
        out: list[torch.Tensor] = []
        for value in values:
            out.append(self.codec.decode(value))
            self.stats.retrieved_bytes += payload_nbytes(value)
        self.store_.touch(keys[:start + len(out)])
        self.stats.retrieved_chunks += len(out)
        self.stats.retrieve_seconds += time.perf_counter() - t0
        return out

    def pin(self, tokens, num_tokens: int) -> list[bytes]:
        """Pin the chunks of the first `num_tokens` tokens (between lookup and load); returns the
        keys to pass to `unpin`."""
        keys = self.keyer.keys(tokens, num_tokens // self.chunk_size)
        self.store_.pin(keys)
        return keys

    def pin_keys(self, keys: Sequence[bytes]) -> None:
        """Pin chunks so no tier evicts them until `unpin(keys)`; pins nest."""
        self.store_.pin(keys)

    def unpin(self, keys: Sequence[bytes]) -> None:
        self.store_.unpin(keys)

    def close(self) -> None:
        self.store_.close()
