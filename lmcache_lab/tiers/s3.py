"""S3Tier: chunks in an S3 bucket (or an S3-compatible store), shared by every engine that points
at the same `s3://bucket/prefix`. See docs/s3.md.

One object per chunk, in the wire format (`lmcache_lab.wire`: magic, version, header, xxh3
checksum; never pickle), under `<prefix>v<wire version>/<chunk key hex>`. The chunk key is seeded by
the namespace (model, layout), so two models never collide; the URL's prefix separates deployments.

Capacity: an object store has no budget of its own and never evicts by itself; neither does this
tier. `capacity_bytes` (config) is only reported; bound the bucket with a lifecycle rule (expire
objects N days after creation). Lookups stop at the first missing chunk, so a chain whose middle
expired is never loaded past the gap.

Invariants:
  * Every answer comes from the store, not from a local index: `contains` and `prefix_length`
    (concurrent HEADs) and `get`/`get_many` (concurrent GETs) see chunks written by any process.
  * A chain of chunks moves concurrently: `get_many`, `put_many`/`put_chain` and `exists_many`
    run one request per chunk on a thread pool over one shared connection pool (`max_connections`).
  * `get` returns only values that pass `chunk_check.check_value` (wire format, requested key,
    chunk layout or a tail of it (`LayoutGuard`), size cap, and the MAC when the tier has a
    `mac_key`: a store secret). An object larger than the cap is not downloaded. Anything invalid
    is a counted miss (`stats.corrupt`) and is deleted, so the next store rewrites it.
  * No fault reaches the caller after start-up: a network error or timeout counts in
    `stats.errors` (`stats.timeouts`), answers as a miss and opens the breaker; requests then skip
    the store at once (`stats.skipped`) while a background probe (HEAD bucket) reconnects with
    backoff. Start-up raises `S3TierError` for a missing bucket, missing or refused credentials,
    or access denied; a store that is unreachable at start-up only makes the tier unavailable.
  * Writes are whole-object PUTs of content-addressed keys: concurrent writers of one key store
    equal bytes and S3 makes one of them visible whole (no reader ever sees a mix).
  * Thread-safe by itself (one thread-safe client, counters under a lock of their own, no local
    index, no eviction), so `lock` is a no-op: a write-behind thread storing a long chain never
    holds up an engine's lookup or load of the same tier; their requests interleave at the store.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lmcache_lab import wire
from lmcache_lab.config import S3TierConfig
from lmcache_lab.tiers.base import Key, TierStats
from lmcache_lab.tiers.breaker import Breaker
from lmcache_lab.tiers.remote import RemoteTier
from lmcache_lab.tiers.chunk_check import LayoutGuard

log = logging.getLogger(__name__)

__all__ = ["S3Tier", "S3TierError", "S3TierStats"]

SERVER = "store"
FAILED = object()   # an operation that got no answer (store down, timeout): a miss
ABSENT = object()   # the object does not exist
COUNT_REFRESH_S = 60.0   # len(tier) LISTs the prefix (in the background) at most this often


class S3TierError(RuntimeError):
    """The S3 tier is misconfigured (missing bucket, credentials): raised at start-up, never later."""


@dataclass
class S3TierStats(TierStats):
    timeouts: int = 0   # requests that hit timeout_s (also counted in errors)
    skipped: int = 0    # chunk operations answered as misses because the store was down


def _make_client(config: S3TierConfig):
    import boto3
    from botocore.config import Config

    conf = Config(
        max_pool_connections=config.max_connections,
        connect_timeout=config.timeout_s, read_timeout=config.timeout_s,
        retries={"mode": "standard", "total_max_attempts": 1},   # a miss is cheaper than a retry
        # the wire format carries its own xxh3 checksum; skip botocore's CRC32 of every body
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
        tcp_keepalive=True,
    )
    session = boto3.session.Session()
    region = config.region or session.region_name or "us-east-1"
    return session.client("s3", endpoint_url=config.endpoint_url, region_name=region, config=conf)


class S3Tier(RemoteTier):
    name = "s3"
    encodes = True

    def __init__(self, config: S3TierConfig, expected: dict[str, torch.Tensor] | None = None,
                 mac_key: bytes | None = None):
        if not config.url:
            raise ValueError("S3Tier needs tiers.s3.url")
        super().__init__(config.capacity_bytes or 0, policy=None)   # the store's budget, not ours
        self.config = config
        self.mac_key = mac_key   # `wire.mac_key(store secret)`: values written and read are authenticated
        self.stats = S3TierStats()
        self.lock = contextlib.nullcontext()   # thread-safe by itself (see the invariants)
        self.bucket = config.bucket
        self._prefix = f"{config.prefix}v{wire.VERSION}/"
        self.layouts = LayoutGuard(expected)
        self._stats_lock = threading.Lock()
        self._nobjects, self._count_at, self._counting = 0, -math.inf, False
        import botocore.exceptions as bex
        self._bex = bex
        self._network = (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ConnectTimeoutError,
                         bex.ReadTimeoutError, bex.HTTPClientError, OSError)
        self.client = _make_client(config)
        self.pool = ThreadPoolExecutor(config.max_connections, thread_name_prefix="s3-tier")
        self.breaker = Breaker(f"s3 tier {config.url}", max_s=config.backoff_max_s)
        self._start()

    # ---- start-up ---------------------------------------------------------------------------------
    def _start(self) -> None:
        bex = self._bex
        url = self.config.url
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except bex.NoCredentialsError as e:
            message = (f"tiers.s3.url {url}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                       f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role): {e}")
        except bex.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                message = f"tiers.s3.url {url}: bucket {self.bucket!r} does not exist (create it first)"
            elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                          "ExpiredToken", "InvalidToken"):
                message = (f"tiers.s3.url {url}: the store refused the credentials or access to bucket "
                           f"{self.bucket!r} ({code})")
            elif code in ("301", "PermanentRedirect", "400"):
                message = f"tiers.s3.url {url}: bucket {self.bucket!r} is unusable here ({code}: wrong region?)"
            else:
                message = f"tiers.s3.url {url}: start-up check failed ({code}: {e})"
        except self._network as e:
            self.breaker.trip(SERVER, self._probe, f"at start-up: {e!r}")
            return
        except bex.BotoCoreError as e:
            message = f"tiers.s3.url {url}: start-up check failed: {e}"
        self.close()
        raise S3TierError(message)

    def _probe(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    @property
    def available(self) -> bool:
        return self.breaker.all_closed

    # ---- keys and layout ----------------------------------------------------------------------------
    def object_key(self, key: bytes) -> str:
        return self._prefix + key.hex()

    def _cap(self) -> int:
        return self.layouts.cap(self.config.max_chunk_bytes)

    # ---- the concurrent core ----------------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, n in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def _call(self, op: Callable[[], Any]) -> Any:
        """Run one request: its result, ABSENT (404), the ClientError (a refusal), or FAILED."""
        if self.breaker.is_open(SERVER):
            self._count(skipped=1)
            return FAILED
        bex = self._bex
        try:
            return op()
        except bex.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return ABSENT
            self._count(errors=1)
            log.warning("s3 tier: request refused: %s", code or e)
            return e
        except self._network as e:
            timeout = isinstance(e, (bex.ConnectTimeoutError, bex.ReadTimeoutError, TimeoutError))
            self._count(errors=1, timeouts=int(timeout))
            self.breaker.trip(SERVER, self._probe, repr(e))
            return FAILED
        except Exception as e:  # noqa: BLE001 - nothing after start-up reaches the engine
            self._count(errors=1)
            log.warning("s3 tier: request failed: %r", e)
            return FAILED

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1:
            return [fn(x) for x in items]
        return list(self.pool.map(fn, items))

    # ---- batch operations ---------------------------------------------------------------------------
    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Concurrent HEADs: True where the object exists."""
        def head(key):
            r = self._call(lambda: self.client.head_object(Bucket=self.bucket, Key=self.object_key(key)))
            return isinstance(r, dict)
        return self._map(head, list(keys))

    def get_many(self, keys: Sequence[bytes]) -> list[dict[str, torch.Tensor] | None]:
        """Verified values (or None) for `keys`, fetched by concurrent GETs."""
        cap = self._cap()
        return self._map(lambda k: self._get_one(k, cap), list(keys))

    def _get_one(self, key: bytes, cap: int) -> dict[str, torch.Tensor] | None:
        okey = self.object_key(key)

        def fetch():
            resp = self.client.get_object(Bucket=self.bucket, Key=okey)
            body = resp["Body"]
            try:
                if resp.get("ContentLength", 0) > cap:
                    return ("oversized", resp["ContentLength"])
                return body.read()
            finally:
                body.close()

        data = self._call(fetch)
        if isinstance(data, bytes) and data:
            tensors, why = self.layouts.check(data, key, cap, self.mac_key)
            if tensors is not None:
                self._count(hits=1, bytes_read=len(data))
                return tensors
        elif isinstance(data, tuple):
            why = f"{data[1]} bytes, larger than the {cap}-byte cap (not downloaded)"
        elif isinstance(data, bytes):
            why = "empty object"
        else:   # absent, refused or no answer
            self._count(misses=1)
            return None
        self._count(misses=1, corrupt=1)
        log.warning("s3 tier: object %s is not a valid chunk (%s); deleting it", okey, why)
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=okey))
        return None

    def put_many(self, items: Sequence[tuple[bytes, dict[str, torch.Tensor], bytes | None, int]]) -> list[bool]:
        """Store (key, tensors, parent, position) items by concurrent PUTs; True where written."""
        def put(item):
            key, value, parent, position = item
            refused = self._refuse_write(value)
            if refused:
                self._count(rejected=1)
                log.warning("s3 tier: not storing a chunk %s", refused)
                return False
            body = wire.encode(key, value, parent=parent, position=position,   # the one copy
                               mac_key=self.mac_key)
            r = self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=body))
            if not isinstance(r, dict):
                if r is not FAILED:
                    self._count(rejected=1)
                return False
            self._count(inserts=1, bytes_written=len(body))
            return True
        return self._map(put, list(items))


    # ---- the tier interface -----------------------------------------------------------------------------
    def touch(self, chain: Sequence[Key]) -> None:
        """Object stores keep no access order: nothing to tell them."""

    def delete(self, key: Key) -> bool:
        if key in self._pins:
            raise RuntimeError(f"{self.name}: cannot delete a pinned chunk")
        present = self.contains(key)
        r = self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key)))
        return present and isinstance(r, dict)

    def _list(self):
        """Pages of object keys under our prefix (a LIST: admin use, O(objects))."""
        if self.breaker.is_open(SERVER):
            return
        pages = self._call(lambda: list(self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._prefix)))
        if not isinstance(pages, list):
            return
        for page in pages:
            contents = page.get("Contents", [])
            if contents:
                yield contents

    def keys(self) -> list[Key]:
        n = len(self._prefix)
        out = []
        for page in self._list():
            for obj in page:
                try:
                    out.append(bytes.fromhex(obj["Key"][n:]))
                except ValueError:
                    continue
        return out

    def count_objects(self) -> int:
        """Chunk objects under our prefix, by a LIST now (O(objects)); also refreshes `len()`."""
        self._nobjects = sum(len(page) for page in self._list())
        self._count_at = time.monotonic()
        return self._nobjects

    def __len__(self) -> int:
        """The last `count_objects()` result: never a LIST on the caller's thread (metrics ask for
        it every step); a stale count (older than COUNT_REFRESH_S) is refreshed in the background."""
        now = time.monotonic()
        if now - self._count_at >= COUNT_REFRESH_S and not self._counting:
            self._count_at, self._counting = now, True
            try:
                self.pool.submit(self._recount)
            except RuntimeError:   # closed
                self._counting = False
        return self._nobjects

    def _recount(self) -> None:
        try:
            self.count_objects()
        finally:
            self._counting = False

    def clear(self) -> None:
        """Delete every object under our prefix, for all instances sharing it."""
        for page in self._list():
            objs = [{"Key": o["Key"]} for o in page]
            for i in range(0, len(objs), 1000):
                batch = objs[i:i + 1000]
                self._call(lambda: self.client.delete_objects(Bucket=self.bucket,
                                                              Delete={"Objects": batch, "Quiet": True}))

    def close(self) -> None:
        self.breaker.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass

    # BudgetedTier's hooks are not used: the store holds the data and keeps its own budget.
    def _write(self, key, value, nbytes):
        raise NotImplementedError("S3Tier writes through put_many")

    def _read(self, key):
        raise NotImplementedError("S3Tier reads through get_many")

    def _drop(self, key):
        raise NotImplementedError("S3Tier deletes through delete")
