"""RedisTier: chunks shared by every engine instance that points at the same Redis (or Cluster).

Capacity: Redis's own `maxmemory` + eviction policy is the budget, not our policy over a key
budget. The store is shared: a local policy sees only this instance's writes and reads, so N
instances with budget B each would allow N*B, evict chunks that other instances are using, and
never know about the keys others wrote. The server is the one place that sees every access, so it
alone evicts (`maxmemory-policy allkeys-lru` or `allkeys-lfu` recommended; `volatile-*` with
`ttl_s`). We help it: a request's chunks are TOUCHed (or their TTL renewed) so a prefix that is hot
in some instance's local tiers stays warm in Redis too. The tier reports the server's memory
(`usage()`: used_memory, maxmemory, policy; summed over cluster primaries) as `used_bytes` and
`capacity_bytes`. The price: Redis evicts by approximate LRU, not tail first, so an orphaned tail
can linger until it ages out; lookups stop at the first missing chunk, so it is never loaded.

Invariants:
  * Every answer comes from Redis, not from a local index: `contains`, `prefix_length` (one
    pipelined EXISTS round trip per endpoint), `get` (GETRANGE capped at the largest valid value,
    so a hostile value cannot size an allocation) see chunks written by any instance.
  * `get` returns only values that pass `chunk_check.check_value`: the wire format (magic,
    version, checksum), the requested key, the MAC when the tier has a `mac_key` (store secret),
    and the chunk layout when known (set by `expect_layout`, or learned from this instance's own
    writes), a tail chunk being the same layout shorter along one axis (`LayoutGuard`).
    Anything else is a counted miss (`stats.corrupt`) and is deleted, so the
    next store rewrites it. Nothing read from Redis is ever unpickled.
  * With a `mac_key`, every value written carries the MAC (`wire.prepare`).
  * No Redis fault reaches the caller after start-up: a timeout or connection error on an endpoint
    counts in `stats.errors` (`stats.timeouts`), answers its chunks as misses, and opens that
    endpoint's breaker; requests then skip it at once (`stats.skipped`) while a background probe
    reconnects with backoff. Start-up raises `RedisTierError` only for misconfiguration (wrong
    credentials, missing ACL rights, TLS mismatch or untrusted certificate); a server that is down
    at start-up only makes the tier unavailable.
  * Writes are `SET NX` of content-addressed keys: two writers of one key store equal bytes, and
    the second write is a no-op. Batch forms (`get_many`, `put_many`, `exists_many`) are one
    pipeline per endpoint (the server, or each cluster node owning some of the keys).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import redis
import torch
from redis.cluster import RedisClusterException
from redis.exceptions import OutOfMemoryError

from lmcache_lab import wire
from lmcache_lab.config import RedisTierConfig
from lmcache_lab.tiers.base import Key, TierStats
from lmcache_lab.tiers.breaker import Breaker
from lmcache_lab.tiers.remote import RemoteTier
from lmcache_lab.tiers.chunk_check import LayoutGuard
from lmcache_lab.tiers.redis_client import (SERVER, UNROUTED, Backend, Buffers, RedisTierError, is_moved,
                                            redact, startup_error)

log = logging.getLogger(__name__)

__all__ = ["RedisTier", "RedisTierError", "RedisTierStats", "RedisUsage"]

# A pipeline carries about this much chunk data: small chunks share round trips, large ones are
# streamed one by one (measured: one 96 MiB pipeline of 3 MiB chunks moves ~2x slower than 3 MiB
# round trips on loopback, and holds all of it in memory twice). docs/redis.md has the numbers.
PIPELINE_BYTES = 4 * 2**20
GUESS_CHUNK_BYTES = 2**20   # per-chunk size assumed for batching reads before the layout is known
USAGE_REFRESH_S = 5.0   # used_bytes / len() query the server at most this often
FAILED = object()  # an operation that got no answer (endpoint down, timeout): a miss
_NETWORK = (redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass
class RedisTierStats(TierStats):
    timeouts: int = 0   # operations that hit timeout_s (also counted in errors)
    skipped: int = 0    # chunk operations answered as misses because their endpoint was down


@dataclass
class RedisUsage:
    available: bool
    endpoints_down: list[str]
    used_bytes: int | None       # server used_memory (all data, not only ours), summed over primaries
    maxmemory: int | None        # 0: unlimited
    maxmemory_policy: str | None
    keys: int                    # DBSIZE summed over reachable primaries (all keys of the db)


class RedisTier(RemoteTier):
    name = "redis"
    encodes = True

    def __init__(self, config: RedisTierConfig, expected: dict[str, torch.Tensor] | None = None,
                 mac_key: bytes | None = None):
        if not config.url:
            raise ValueError("RedisTier needs tiers.redis.url")
        self._usage_at = -math.inf
        self._used_bytes = self._keys_count = 0
        super().__init__(config.capacity_bytes or 0, policy=None)  # Redis evicts; no local policy
        self.config = config
        self.stats = RedisTierStats()
        self.mac_key = mac_key   # `wire.mac_key(store secret)`: values written and read are authenticated
        self._prefix = f"{config.key_prefix}:v{wire.VERSION}:"
        self.layouts = LayoutGuard(expected)
        self._oom_logged = False
        self.backend = Backend(config)
        self.breaker = Breaker(f"redis tier {redact(config.url)}", max_s=config.backoff_max_s)
        self._start()

    # ---- start-up ---------------------------------------------------------------------------------
    def _start(self) -> None:
        first = UNROUTED if self.config.cluster else SERVER
        if not self._startup_check(first, self.backend.connect):
            return
        for endpoint, client in self.backend.masters():
            self._startup_check(endpoint, client.ping)
        probe = (self._prefix + "startup-check").encode()  # does the ACL let us use our prefix?
        for endpoint, client, _ in self.backend.groups([probe]):
            if client is not None and not self.breaker.is_open(endpoint):
                self._startup_check(endpoint, lambda c=client: c.exists(probe))
        usage = self.usage()
        if usage.available and usage.maxmemory == 0:
            log.warning("redis tier: the server has no maxmemory; chunks accumulate until Redis runs "
                        "out of memory. Set maxmemory and maxmemory-policy allkeys-lru (docs/redis.md)")
        elif usage.maxmemory_policy == "noeviction":
            log.warning("redis tier: maxmemory-policy is noeviction; writes fail once Redis is full")

    def _startup_check(self, endpoint: str, check: Callable[[], Any]) -> bool:
        try:
            check()
            return True
        except (redis.RedisError, RedisClusterException, OSError) as e:
            message = startup_error(e, self.config.url)
            if message:
                self.close()
                raise RedisTierError(message) from e
            self.breaker.trip(endpoint, self._recovery(endpoint), f"at start-up: {e!r}")
            return False

    # ---- keys and layout ----------------------------------------------------------------------------
    def redis_key(self, key: bytes) -> bytes:
        return (self._prefix + key.hex()).encode()

    def _max_value_bytes(self) -> int:
        return self.layouts.cap(self.config.max_chunk_bytes)

    @property
    def available(self) -> bool:
        """True when every endpoint is reachable (a cluster with a dead node is not)."""
        return self.breaker.all_closed

    # ---- the pipelined core ---------------------------------------------------------------------------
    def _run(self, keys: Sequence[bytes], command: Callable[[Any, int, bytes], None]) -> list[Any]:
        """Run `command(pipe, i, redis_key)` for each `keys[i]`, one pipeline per endpoint. Returns per key
        the reply, the per-command error object, or FAILED (no answer: counted, breaker tripped)."""
        out: list[Any] = [FAILED] * len(keys)
        rkeys = [self.redis_key(k) for k in keys]
        for endpoint, client, idx in self.backend.groups(rkeys):
            if client is None or self.breaker.is_open(endpoint):
                self.stats.skipped += len(idx)
                continue
            pipe = client.pipeline(transaction=False)
            for i in idx:
                command(pipe, i, rkeys[i])
            try:
                replies = pipe.execute(raise_on_error=False)
            except _NETWORK as e:
                self.stats.errors += 1
                if isinstance(e, (redis.TimeoutError, TimeoutError)):
                    self.stats.timeouts += 1
                self.breaker.trip(endpoint, self._recovery(endpoint), repr(e))
                continue
            except redis.RedisError as e:
                self.stats.errors += 1
                log.warning("redis tier: pipeline on %s failed: %r", endpoint, e)
                continue
            for i, reply in zip(idx, replies):
                if isinstance(reply, Exception) and is_moved(reply):
                    self.backend.refresh_topology()
                    reply = FAILED
                    self.stats.errors += 1
                out[i] = reply
        return out

    def _recovery(self, endpoint: str) -> Callable[[], None]:
        probe = self.backend.probe(endpoint)

        def recover():
            probe()
            for name, client in self.backend.masters():  # drop sockets left broken by the fault
                if name == endpoint or endpoint in (SERVER, UNROUTED):
                    client.connection_pool.disconnect(inuse_connections=False)
        return recover

    # ---- batch operations -----------------------------------------------------------------------------
    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        replies = self._run(keys, lambda p, i, k: p.exists(k))
        return [r is not FAILED and not isinstance(r, Exception) and int(r) > 0 for r in replies]

    def get_many(self, keys: Sequence[bytes]) -> list[dict[str, torch.Tensor] | None]:
        """Verified values (or None) for `keys`: pipelined GETRANGEs, one pipeline per endpoint
        per PIPELINE_BYTES of expected chunk data, and at least two chunks per pipeline."""
        cap = self._max_value_bytes()
        expected = self.layouts.chunk_nbytes() or GUESS_CHUNK_BYTES
        step = max(2, PIPELINE_BYTES // max(expected, 1))   # 2+: the server sends one while we check one
        out: list[dict[str, torch.Tensor] | None] = []
        for start in range(0, len(keys), step):
            batch = keys[start:start + step]
            replies = self._run(batch, lambda p, i, k: p.getrange(k, 0, cap))
            bad: list[bytes] = []
            for j, key in enumerate(batch):
                data, replies[j] = replies[j], None   # let each reply go once decoded
                value = self._verify(key, data, cap)
                if value is None:
                    self.stats.misses += 1
                    hostile = (isinstance(data, bytes) and len(data) > 0
                               or isinstance(data, Exception) and "WRONGTYPE" in str(data))
                    if hostile:  # present but failed verification: remove it
                        bad.append(key)
                else:
                    self.stats.hits += 1
                    self.stats.bytes_read += len(data)
                out.append(value)
            if bad:
                self._run(bad, lambda p, i, k: p.delete(k))
        return out

    def _verify(self, key: bytes, data: Any, cap: int) -> dict[str, torch.Tensor] | None:
        if data is FAILED or (isinstance(data, (bytes, bytearray)) and not data):
            return None  # no answer, or absent
        why = None
        if isinstance(data, Exception):
            if "WRONGTYPE" not in str(data):  # a refusal (ACL, server state): not the value's fault
                self.stats.errors += 1
                log.warning("redis tier: read of %s refused: %r", self.redis_key(key).decode(), data)
                return None
            why = "not a string value"
        else:
            tensors, why = self.layouts.check(data, key, cap, self.mac_key)
            if tensors is not None:
                return tensors
        self.stats.corrupt += 1
        log.warning("redis tier: value under %s is not a valid chunk (%s); deleting it",
                    self.redis_key(key).decode(), why)
        return None

    def put_many(self, items: Sequence[tuple[bytes, dict[str, torch.Tensor], bytes | None, int]]) -> list[bool]:
        """Store (key, tensors, parent, position) items; True where the key is in Redis afterwards.
        Sent in pipelines of about PIPELINE_BYTES, each value as its header and the tensors' own
        memory (`wire.Encoding.parts`, `ZeroCopyPacker`): no client-side copy of the payload."""
        ok = [False] * len(items)
        batch: list[tuple[int, wire.Encoding]] = []
        size = 0
        for i, (key, value, parent, position) in enumerate(items):
            refused = self._refuse_write(value)
            if refused:
                self.stats.rejected += 1
                log.warning("redis tier: not storing a chunk %s", refused)
                continue
            enc = wire.prepare(key, value, parent=parent, position=position, mac_key=self.mac_key)
            batch.append((i, enc))
            size += enc.nbytes
            if size >= PIPELINE_BYTES:
                self._set_batch(items, batch, ok)
                batch, size = [], 0
        if batch:
            self._set_batch(items, batch, ok)
        return ok

    def _set_batch(self, items, batch: list[tuple[int, wire.Encoding]], ok: list[bool]) -> None:
        values = [Buffers(enc.parts()) for _, enc in batch]
        ttl = self.config.ttl_s
        replies = self._run([items[i][0] for i, _ in batch],
                            lambda p, j, k: p.set(k, values[j], nx=True, ex=ttl))
        for (i, enc), reply in zip(batch, replies):
            if reply is FAILED:
                continue
            if isinstance(reply, Exception):
                self._write_refused(reply)
                continue
            ok[i] = True
            if reply:  # written now (None: another writer had stored it already)
                self.stats.inserts += 1
                self.stats.bytes_written += enc.nbytes

    def _write_refused(self, error: Exception) -> None:
        self.stats.rejected += 1
        if isinstance(error, OutOfMemoryError) or "maxmemory" in str(error):
            if not self._oom_logged:
                self._oom_logged = True
                log.warning("redis tier: Redis is full and does not evict (%s); set maxmemory-policy "
                            "allkeys-lru", error)
        else:
            self.stats.errors += 1
            log.warning("redis tier: write refused: %s", error)

    # ---- the tier interface ---------------------------------------------------------------------------
    def touch(self, chain: Sequence[Key]) -> None:
        """Tell Redis's LRU/LFU (or the TTL) that a request used these chunks."""
        if not chain:
            return
        ttl = self.config.ttl_s
        self._run(list(chain), (lambda p, i, k: p.expire(k, ttl)) if ttl else (lambda p, i, k: p.touch(k)))

    def delete(self, key: Key) -> bool:
        if key in self._pins:
            raise RuntimeError(f"{self.name}: cannot delete a pinned chunk")
        reply = self._run([key], lambda p, i, k: p.delete(k))[0]
        return reply is not FAILED and not isinstance(reply, Exception) and int(reply) > 0

    def _scan(self):
        """(client, redis keys) batches of every key under our prefix, on every primary."""
        for endpoint, client in self.backend.masters():
            if self.breaker.is_open(endpoint):
                continue
            batch = []
            for rkey in client.scan_iter(match=self._prefix + "*", count=1000):
                batch.append(rkey)
                if len(batch) == 1000:
                    yield client, batch
                    batch = []
            if batch:
                yield client, batch

    def keys(self) -> list[Key]:
        """Chunk keys under our prefix on every reachable endpoint (a SCAN: admin use, O(keys))."""
        n = len(self._prefix)
        return [bytes.fromhex(k[n:].decode()) for _, batch in self._scan() for k in batch]

    def __len__(self) -> int:
        """Keys in the Redis database(s) (DBSIZE, summed over primaries; refreshed at most every
        USAGE_REFRESH_S): the chunk count when the database is dedicated to this cache."""
        self._refresh_usage()
        return self._keys_count

    def clear(self) -> None:
        """Delete every chunk under our key prefix, for all instances sharing it."""
        for client, batch in self._scan():
            client.unlink(*batch)

    @property
    def used_bytes(self) -> int:
        """Server `used_memory` (summed over primaries), refreshed at most every USAGE_REFRESH_S."""
        self._refresh_usage()
        return self._used_bytes

    @used_bytes.setter
    def used_bytes(self, value: int) -> None:
        self._used_bytes = value

    def _refresh_usage(self) -> None:
        if time.monotonic() - self._usage_at >= USAGE_REFRESH_S:
            self.usage()

    def usage(self) -> RedisUsage:
        """Server memory (used_memory summed over reachable primaries, maxmemory, policy) and key
        count; also sets `used_bytes`, `capacity_bytes` (config `capacity_bytes` if the server
        does not say) and `len(tier)`. INFO may be denied by ACL: then the memory is unknown."""
        self._usage_at = time.monotonic()
        used = maxmem = policy = None
        nkeys = 0
        for endpoint, client in self.backend.masters():
            if self.breaker.is_open(endpoint):
                continue
            pipe = client.pipeline(transaction=False)
            pipe.info("memory")
            pipe.dbsize()
            try:
                info, dbsize = pipe.execute(raise_on_error=False)
            except _NETWORK as e:
                self.stats.errors += 1
                self.breaker.trip(endpoint, self._recovery(endpoint), repr(e))
                continue
            except redis.RedisError as e:
                self.stats.errors += 1
                log.warning("redis tier: usage query on %s failed: %r", endpoint, e)
                continue
            if isinstance(dbsize, int):
                nkeys += dbsize
            if isinstance(info, Exception):
                log.info("redis tier: cannot read server memory on %s: %s", endpoint, info)
                continue
            used = (used or 0) + int(info.get("used_memory", 0))
            maxmem = (maxmem or 0) + int(info.get("maxmemory", 0))
            policy = info.get("maxmemory_policy", policy)
        self._keys_count = nkeys
        if used is not None:
            self._used_bytes = used
        if maxmem:
            self.capacity_bytes = maxmem
        return RedisUsage(self.available, self.breaker.open_endpoints(), used, maxmem, policy, nkeys)

    def close(self) -> None:
        self.breaker.close()
        self.backend.close()

    # BudgetedTier's hooks are not used: Redis holds the data and evicts by itself.
    def _write(self, key, value, nbytes):
        raise NotImplementedError("RedisTier writes through put_many")

    def _read(self, key):
        raise NotImplementedError("RedisTier reads through get_many")

    def _drop(self, key):
        raise NotImplementedError("RedisTier deletes through delete")
