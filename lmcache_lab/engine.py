"""CacheEngine: the engine-agnostic core an integration talks to.

    lookup(tokens)            -> hit length in tokens (longest cached prefix, across tiers)
    store(tokens, kv_chunks)  -> chunks newly stored
    retrieve(tokens)          -> the KV chunks of the leading cached prefix

Partial-chunk rule: only full chunks of `chunk_size` tokens are keyed and stored here, so a hit is
always a multiple of `chunk_size`; the trailing partial chunk is recomputed. (The vLLM connector
adds tail chunks of whole engine blocks under `ChunkKeyer.tail_key`, stored with `store_keyed`.)

A chunk's KV is one tensor per chunk (for the kernels' layout `[2, layers, chunk_size, heads*dim]`;
the engine does not look inside). The codec turns it into stored tensors and back.

Store secret (config `store_secret`): the keyer roots every chunk key in it and every tier that
stores encoded values (disk, Redis, S3: the ones other processes can write) gets its MAC key, so
values are authenticated on write and verified on read; a tier that cannot authenticate its values
is refused at start-up rather than left open. docs/security.md.

Threads: every method may be called from several threads at once (a lookup server, the engine
step, a write-behind thread). Each tier is guarded by its own lock (`TieredStore`), the statistics
by another; no lock is held across two tiers, so slow disk or Redis I/O never blocks the memory
tier.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from lmcache_lab import wire
from lmcache_lab.codecs import get_codec
from lmcache_lab.config import CacheConfig, ConfigError, load_config
from lmcache_lab.keys import ChunkKeyer, Identity, Namespace
from lmcache_lab.tiers import BudgetedTier, TieredStore, build_tiers, payload_nbytes
from lmcache_lab.tiers.tiered import Destination, InPlace


@dataclass
class EngineStats:
    lookups: int = 0
    lookup_tokens: int = 0      # tokens asked about (full chunks only)
    hit_tokens: int = 0         # tokens found cached by lookup (promised; loads may fall short)
    stored_chunks: int = 0
    stored_bytes: int = 0
    retrieved_chunks: int = 0
    retrieved_bytes: int = 0
    load_failures: int = 0      # a chunk reported by lookup could not be loaded (evicted, corrupt)
    store_seconds: float = 0.0
    retrieve_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def authenticate(tiers: Sequence[BudgetedTier], mac_key: bytes) -> None:
    """Give every tier that stores encoded values the MAC key (its `mac_key` attribute); a
    ConfigError names the first such tier that has none."""
    for tier in tiers:
        if tier.encodes:
            if not hasattr(tier, "mac_key"):
                raise ConfigError(f"store_secret: the {tier.name} tier cannot authenticate its values; "
                                  f"turn it off or run without store_secret")
            tier.mac_key = mac_key


class CacheEngine:
    def __init__(self, config: CacheConfig | dict | str | None = None, namespace: Namespace | None = None,
                 tiers: Sequence[BudgetedTier] | None = None):
        self.config = load_config(config)
        self.namespace = namespace or Namespace(model="unknown", codec=self.config.codec)
        if self.namespace.codec != self.config.codec:
            raise ValueError(f"namespace.codec {self.namespace.codec!r} != codec {self.config.codec!r}")
        self.chunk_size = self.config.chunk_size
        secret = self.config.store_secret.reveal() if self.config.store_secret else None
        self.keyer = ChunkKeyer(self.namespace, self.chunk_size, self.config.hash, secret)
        self.codec = get_codec(self.config.codec)
        self.store_ = TieredStore(build_tiers(self.config) if tiers is None else tiers)
        if secret is not None:
            try:
                authenticate(self.store_.tiers, wire.mac_key(secret))
            except ConfigError:
                self.store_.close()
                raise
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()

    @property
    def tiers(self) -> list[BudgetedTier]:
        return self.store_.tiers

    def count(self, **increments: float) -> None:
        """Add to `stats` (thread-safe)."""
        with self._stats_lock:
            for name, n in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def chunk_keys(self, tokens, max_chunks: int | None = None, identity: Identity = ()) -> list[bytes]:
        return self.keyer.keys(tokens, max_chunks, identity)

    def lookup(self, tokens) -> int:
        return self.lookup_keys(self.keyer.keys(tokens)) * self.chunk_size

    def lookup_keys(self, keys: Sequence[bytes]) -> int:
        """Number of leading `keys` (chained chunk keys, root first) present in some tier."""
        hit = self.store_.prefix_length(keys)
        self.count(lookups=1, lookup_tokens=len(keys) * self.chunk_size, hit_tokens=hit * self.chunk_size)
        return hit

    def lookup_and_pin(self, keys: Sequence[bytes], skip: int = 0) -> int:
        """`lookup_keys`, and pin the hit's chunks from `skip` on (`unpin(keys[skip:hit])` later).
        The candidates are pinned before they are counted, so none that is counted can be evicted
        by another thread in between; those past the hit are unpinned again."""
        candidates = keys[skip:]
        self.store_.pin(candidates)
        hit = self.lookup_keys(keys)
        self.store_.unpin(keys[max(skip, hit):])
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
                    tiers: Sequence[int] | None = None, touch: bool = True) -> int:
        """Store `kv_chunks[i]` under `keys[start + i]` (its parent is `keys[start + i - 1]`).

        `tiers` (indices into `self.tiers`) restricts the write to those tiers, e.g. the slow ones
        written behind the step; a chunk already present in one of them is skipped. With `touch`
        the request's chain `keys[:start + len(kv_chunks)]` is then touched once per tier (a
        caller that stores one request in several calls passes False and calls `touch` once at
        its end, as the trace replay does). Statistics count each chunk once: when it becomes
        resident in the first tier asked for."""
        t0 = time.perf_counter()
        if start < 0 or start + len(kv_chunks) > len(keys):
            raise ValueError(f"store_keyed: chunks {start}..{start + len(kv_chunks)} exceed "
                             f"{len(keys)} keys")
        targets = self.store_.select(tiers)
        count = tiers is None or (len(tiers) and tiers[0] == 0)
        new = [(i, self.codec.encode(chunk)) for i, chunk in enumerate(kv_chunks, start)
               if not self.store_.contains(keys[i], targets)]
        resident = [False] * len(new)
        for tier in targets:
            with tier.lock:
                for j, (i, value) in enumerate(new):
                    resident[j] |= tier.put(keys[i], value, keys[i - 1] if i else None,
                                            i * self.chunk_size)
        if touch:
            self.store_.touch(keys[:start + len(kv_chunks)], targets)
        if count:
            self.count(stored_chunks=sum(resident),
                       stored_bytes=sum(payload_nbytes(v) for ok, (_, v) in zip(resident, new) if ok))
        self.count(store_seconds=time.perf_counter() - t0)
        return sum(resident)

    def touch(self, keys: Sequence[bytes], tiers: Sequence[int] | None = None) -> None:
        """Tell each tier's policy that a request used the chain `keys` (absent keys skipped)."""
        self.store_.touch(keys, self.store_.select(tiers))

    def retrieve(self, tokens, num_tokens: int | None = None) -> list[torch.Tensor]:
        """KV chunks of the leading cached prefix (at most `num_tokens` tokens). Stops at the first
        chunk that cannot be loaded; each such event counts in `stats.load_failures`."""
        max_chunks = None if num_tokens is None else num_tokens // self.chunk_size
        return self.retrieve_keyed(self.keyer.keys(tokens, max_chunks), expected=num_tokens is not None)

    def retrieve_keyed(self, keys: Sequence[bytes], start: int = 0, expected: bool = True,
                       touch_tiers: Sequence[int] | None = None,
                       into: Destination | None = None) -> list[torch.Tensor | None]:
        """KV chunks of `keys[start:]`, in order, stopping at the first one that cannot be read.
        With `expected` (the caller was promised these chunks by a lookup), a shortfall counts
        as one `stats.load_failures` event. The chain up to the last chunk read is touched in
        `touch_tiers` (indices; all tiers when None).

        `into(i)` (i: the index into `keys`) lets a tier that can read a value straight into the
        caller's memory do so (`TieredStore.get_chain`): that chunk's entry is None, its bytes
        are in `into(i)`'s buffers. They take the stored tensors, not the decoded chunk: only
        with the lossless codec `none` are the two the same."""
        t0 = time.perf_counter()
        if into is not None and self.codec.name != "none":
            raise ValueError(f"retrieve_keyed: into= needs codec 'none', not {self.codec.name!r}")
        values = self.store_.get_chain(keys[start:], keys[start - 1] if start else None,
                                       start * self.chunk_size, self.chunk_size,
                                       into=None if into is None else lambda i: into(start + i))
        out = [None if isinstance(v, InPlace) else self.codec.decode(v) for v in values]
        self.touch(keys[:start + len(out)], touch_tiers)
        nbytes = sum(v.nbytes if isinstance(v, InPlace) else payload_nbytes(v) for v in values)
        self.count(load_failures=int(expected and len(values) < len(keys) - start),
                   retrieved_chunks=len(out), retrieved_bytes=nbytes,
                   retrieve_seconds=time.perf_counter() - t0)
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
