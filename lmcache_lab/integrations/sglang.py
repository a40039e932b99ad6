"""SGLang HiCache storage backend (SGLang's L3) over lmcache_lab's tiers, policies and metrics.

Enable it on an SGLang server (docs/sglang.md):

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "lmcache_lab",
        "module_path": "lmcache_lab.integrations.sglang", "class_name": "LMCacheLabStorage",
        "interface_v1": 1, "tiers": {"cpu": {"capacity_bytes": "8GiB"},
        "redis": {"url": "redis://127.0.0.1:6379"}}, "policy": {"name": "lru"}}'

Every key besides SGLang's own (`backend_name`, `module_path`, `class_name`, `interface_v1`,
`tp_lcm_size`) and this module's (`io_timeout_s`, `max_pending`) is a lmcache_lab config key
(lmcache_lab/config.py), validated the same way as everywhere else. `interface_v1: 1` makes SGLang
call the zero-copy `batch_get_v1`/`batch_set_v1`; without it SGLang uses `batch_get`/`batch_set`.
`chunk_size` does not apply: SGLang's page (`--page-size`) is the unit stored under one key.

Keys. SGLang names a page by a string (a chained SHA-256 hex of the tokens up to it). The tiers'
key is `H(root || utf-8 page hash)` with `root = H(namespace)`, H = the config's `hash`; the
namespace holds model, KV dtype, host page layout, page size, TP rank/size (MHA only: MLA KV is
the same on every rank, so ranks share it and only SGLang's storage-writer rank writes), PP/CP
ranks and the codec. Pages of two backends share a tier key only if all of that is equal.

Invariants:
  * A page read back is the exact page stored under that key, or a miss: a value that fails the
    wire checks (disk, Redis), has another dtype or size than this pool's page, or does not arrive
    within `io_timeout_s` is a miss, logged and counted (`stats()`), never a partial page.
  * Prefix rule: `batch_exists`, `batch_get` and `batch_get_v1` stop at the first miss; what
    follows it is reported missing, and no host page after it is written.
  * Host memory is touched only in the calling thread, inside the call: pages are copied out of
    the host pool before a write is queued, and loaded pages are copied in only after the read
    returned in time. A timed-out read therefore never writes into host pages SGLang has reused.
  * No tier fault reaches SGLang's I/O threads: lookups, reads and memory-tier writes run on one
    I/O thread (SGLang calls from several threads), and a fault there is logged with its
    traceback and answered as a miss or a failed write.
  * Slow tiers (disk, Redis) are written behind by the same `WriteBehind` as the vLLM connector
    uses, in at most `write_behind.max_bytes` of pending pages; a page that does not fit is
    skipped for them (counted). Each tier has its own lock (`TieredStore`), so a slow write never
    blocks a read served by the memory tier.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
import xxhash
from sglang.srt.mem_cache.hicache_storage import (HiCacheStorage, HiCacheStorageConfig,
                                                  HiCacheStorageExtraInfo)

from lmcache_lab.config import ConfigError, load_config
from lmcache_lab.engine import CacheEngine
from lmcache_lab.kernels.layout import SUPPORTED_DTYPES, KVLayout, validate_caches
from lmcache_lab.kernels.paged import gather, scatter
from lmcache_lab.keys import Namespace, namespace_root
from lmcache_lab.metrics import CacheMetrics, DeltaTracker
from lmcache_lab.tiers import MemoryTier
from lmcache_lab.write_behind import WriteBehind

log = logging.getLogger(__name__)

SGLANG_KEYS = ("backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size")
MAX_KEY_CHARS = 1024      # SGLang's page hashes are 64 hex characters (plus short suffixes)


@dataclass
class SGLangStorageStats:
    """What the backend did, beyond the engine's and the tiers' own statistics."""
    bad_keys: int = 0          # keys that are not non-empty strings of at most MAX_KEY_CHARS
    bad_values: int = 0        # values refused on write (not a tensor, wrong dtype or size)
    wrong_pages: int = 0       # values read back with another dtype or size than a page: misses
    timeouts: int = 0          # operations that did not finish within io_timeout_s: misses
    errors: int = 0            # tier faults (exceptions) answered as misses / failed writes
    overloaded: int = 0        # operations refused because max_pending were already queued
    skipped_writes: int = 0    # MLA writes left to the storage-writer rank


@dataclass(frozen=True)
class PageSpec:
    """One page as stored: `shape`/`dtype`; `layout` set where the kernels can copy it."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    page_size: int
    host_layout: str
    layout: Optional[KVLayout] = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _hash_fn(name: str) -> Callable[[bytes], bytes]:
    return xxhash.xxh3_128_digest if name == "xxh3_128" else (lambda b: hashlib.sha256(b).digest())


def page_spec(pool: Any, is_mla: bool) -> PageSpec:
    """The stored form of one page of `pool` (an SGLang HostKVCache).

    MHA pools in `layer_first` layout with a dtype the kernels copy are read and written with
    `kernels.paged` over the SGLang token-major layout (per layer K and V `[tokens, H, D]`); a page
    is stored as `[2, L, page, H*D]`, which is byte for byte SGLang's own flat layer_first page.
    Any other pool (MLA, page_first*, page_head, fp8, K and V of different widths) goes through the
    pool's own `get_data_page` / `set_from_flat_data_page` and is stored as its flat page.
    """
    probe = pool.get_dummy_flat_data_page()
    page, host_layout = int(pool.page_size), str(pool.layout)
    kv = getattr(pool, "kv_buffer", None)
    if (not is_mla and host_layout == "layer_first" and probe.dtype in SUPPORTED_DTYPES
            and isinstance(kv, torch.Tensor) and kv.dim() == 5 and kv.shape[0] == 2
            and getattr(pool, "head_dim", None) == getattr(pool, "v_head_dim", getattr(pool, "head_dim", None))):
        _, layers, tokens, heads, dim = kv.shape
        layout = KVLayout.sglang_mha(layers, tokens, heads, dim)
        shape = (2, layers, page, heads * dim)
        if probe.numel() == 2 * layers * page * heads * dim:
            try:
                validate_caches(_kv_caches(kv), layout)
                return PageSpec(probe.dtype, shape, page, host_layout, layout)
            except (TypeError, ValueError) as e:
                log.warning("sglang backend: host pool does not fit the kernels' layout (%s); "
                            "using the pool's own page copies", e)
    return PageSpec(probe.dtype, (probe.numel(),), page, host_layout, None)


def _kv_caches(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) views `[tokens, H, D]` of a layer_first host buffer `[2, L, tokens, H, D]`."""
    return [(kv[0, i], kv[1, i]) for i in range(kv.shape[1])]


class LMCacheLabStorage(HiCacheStorage):
    """SGLang's `HiCacheStorage` over a `CacheEngine` (tiers + policies). See the module docstring."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        extra = dict(storage_config.extra_config or {})
        for key in SGLANG_KEYS:
            extra.pop(key, None)
        self.io_timeout_s = extra.pop("io_timeout_s", 5.0)
        self.max_pending = extra.pop("max_pending", 64)
        if isinstance(self.io_timeout_s, bool) or not isinstance(self.io_timeout_s, (int, float)) \
                or self.io_timeout_s <= 0:
            raise ConfigError(f"io_timeout_s: must be a number of seconds > 0, got {self.io_timeout_s!r}")
        if isinstance(self.max_pending, bool) or not isinstance(self.max_pending, int) or self.max_pending < 1:
            raise ConfigError(f"max_pending: must be an integer >= 1, got {self.max_pending!r}")
        self.config = load_config(extra)
        self.storage_config = storage_config
        self.is_mla = bool(storage_config.is_mla_model)
        self.is_writer = bool(storage_config.is_storage_writer)
        self.spec: Optional[PageSpec] = None
        self.mem_pool_host = None
        self.stats_ = SGLangStorageStats()
        self._hash = _hash_fn(self.config.hash)
        self.engine = CacheEngine(self.config, namespace=self._namespace(None))
        self._root = self.engine.keyer.root
        self.metrics = CacheMetrics()
        self._tracker = DeltaTracker()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache_lab-sglang-io")
        tiers = self.engine.tiers
        self._fast = [i for i, t in enumerate(tiers) if isinstance(t, MemoryTier)]
        self._slow = [i for i, t in enumerate(tiers) if not isinstance(t, MemoryTier)]
        self._writer = WriteBehind(self.config.write_behind.max_bytes,
                                   name="lmcache_lab-sglang-writer") if self._slow else None
        self._pending = 0
        self._lock = threading.Lock()           # guards _pending and the StorageMetrics lists
        self._periods: dict[str, list] = {"prefetch_pgs": [], "backup_pgs": [],
                                          "prefetch_bandwidth": [], "backup_bandwidth": []}
        port = self.config.metrics.port
        if port is not None:  # one endpoint per rank: port + global rank (0 = any free port)
            rank = storage_config.tp_rank + storage_config.tp_size * storage_config.pp_rank
            self.metrics_port = self.metrics.serve(port + rank if port else 0, self.config.metrics.host)
        log.info("lmcache_lab SGLang backend: tiers %s, policy %s, namespace %s",
                 [t.name for t in self.engine.tiers], self.config.policy.name, self.engine.namespace)

    # ---- namespace and keys --------------------------------------------------------------------
    def _namespace(self, spec: Optional[PageSpec]) -> Namespace:
        c = self.storage_config
        layout = "unregistered" if spec is None else f"sglang_{spec.host_layout}{list(spec.shape)}"
        return Namespace(
            model=c.model_name or "unknown",
            kv_dtype="unknown" if spec is None else str(spec.dtype).replace("torch.", ""),
            layout=layout,
            tp_rank=0 if self.is_mla else c.tp_rank,
            tp_size=1 if self.is_mla else c.tp_size,
            codec=self.config.codec,
            extra=(f"sglang;mla={int(self.is_mla)};page={None if spec is None else spec.page_size};"
                   f"pp={c.pp_rank}/{c.pp_size};cp={c.attn_cp_rank}/{c.attn_cp_size};"
                   f"dcp={c.dcp_rank}/{c.dcp_size};split_heads={int(c.should_split_heads)}"))

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Learn the host pool's page (dtype, size, layout); keys from now on carry it."""
        super().register_mem_pool_host(mem_pool_host)
        spec = page_spec(mem_pool_host, self.is_mla)
        namespace = self._namespace(spec)

        def switch():
            self.spec = spec
            self.engine.namespace = namespace
            self.engine.chunk_size = spec.page_size   # positions (for policies) in tokens
            secret = self.config.store_secret
            self._root = namespace_root(namespace, self.config.hash,
                                        secret.reveal() if secret is not None else None)
        self._call("register", switch, None, timeout=None)
        log.info("lmcache_lab SGLang backend: host pool %s, page %s %s, %s path",
                 spec.host_layout, list(spec.shape), spec.dtype,
                 "kernel" if spec.layout is not None else "pool-copy")

    def tier_key(self, key: Any) -> Optional[bytes]:
        """The tiers' key of SGLang page `key`, or None (counted) for a key that is not a
        non-empty string of at most MAX_KEY_CHARS characters."""
        if isinstance(key, str) and 0 < len(key) <= MAX_KEY_CHARS:
            try:
                return self._hash(self._root + key.encode("utf-8"))
            except UnicodeEncodeError:
                pass
        self.stats_.bad_keys += 1
        log.warning("sglang backend: refusing page key %r (not a non-empty str of <= %d chars)",
                    key if len(repr(key)) < 100 else repr(key)[:100] + "...", MAX_KEY_CHARS)
        return None

    def _chain(self, keys: Sequence[Any], extra_info: Optional[HiCacheStorageExtraInfo]
               ) -> tuple[list[bytes], int]:
        """Tier keys of `prefix_keys + keys` (prefix from SGLang's extra_info), cut before the
        first bad key; and the number of prefix keys. The prefix gives the first page its parent
        and every page its token position (for the policies)."""
        prefix = list((extra_info.prefix_keys or []) if extra_info is not None else [])
        out: list[bytes] = []
        for key in prefix:
            k = self.tier_key(key)
            if k is None:   # a bad prefix key: keep the batch, drop the (advisory) prefix
                out = []
                prefix = []
                break
            out.append(k)
        for key in keys:
            k = self.tier_key(key)
            if k is None:
                break
            out.append(k)
        return out, len(prefix)

    # ---- the I/O thread ----------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any], default: Any, timeout: Optional[float] = -1.0) -> Any:
        """Run `fn` on the I/O thread; its result, or `default` (logged, counted) on a fault,
        after `io_timeout_s`, or when `max_pending` operations are already queued."""
        with self._lock:
            if self._pending >= self.max_pending:
                self.stats_.overloaded += 1
                log.warning("sglang backend: %d operations queued; answering %s as a miss",
                            self._pending, what)
                return default
            self._pending += 1

        def run():
            try:
                return fn()
            finally:
                self._apply_delta()
                with self._lock:
                    self._pending -= 1

        future = self._io.submit(run)
        try:
            return future.result(timeout=self.io_timeout_s if timeout == -1.0 else timeout)
        except FutureTimeout:
            self.stats_.timeouts += 1
            log.warning("sglang backend: %s took longer than io_timeout_s=%ss; answered as a miss",
                        what, self.io_timeout_s)
        except Exception:
            self.stats_.errors += 1
            log.exception("sglang backend: %s failed; answered as a miss", what)
        return default

    def _apply_delta(self) -> None:
        counters, gauges = {}, {}
        if self._writer is not None:
            ws = self._writer.stats
            counters = {"write_behind_skipped_chunks": ws.skipped, "store_failures": ws.failed}
            gauges = {"write_behind_pending_bytes": ws.pending_bytes,
                      "write_behind_peak_bytes": ws.peak_bytes}
        delta = self._tracker.take(self.engine, counters, gauges)
        if delta is not None:
            self.metrics.apply(delta)

    def _fetch(self, chain: list[bytes], start: int) -> list[torch.Tensor]:
        """(I/O thread) Pages `chain[start:]` up to the first miss or wrong-sized value. SGLang
        reads only pages `batch_exists` reported, so a shortfall counts as a load failure."""
        t0 = time.perf_counter()
        values = self.engine.retrieve_keyed(chain, start, expected=True)
        out = []
        for value in values:
            if not self._is_page(value):
                self.stats_.wrong_pages += 1
                self.engine.count(load_failures=1)
                log.warning("sglang backend: stored value %s %s is not a page %s %s; a miss",
                            list(value.shape), value.dtype, list(self.spec.shape) if self.spec else "?",
                            self.spec.dtype if self.spec else "")
                break
            out.append(value)
        page = self.spec.page_size if self.spec else 1
        self.metrics.record_load(len(out) * page, (len(chain) - start - len(out)) * page)
        self._tracker.observe_load(time.perf_counter() - t0)
        return out

    def _store(self, chain: list[bytes], start: int, pages: list[torch.Tensor]) -> int:
        """(I/O thread) Store `pages` under `chain[start:]`: memory tiers now, slow tiers behind
        (skipped when the write-behind budget is full). How many leading pages are stored or
        queued afterwards."""
        t0 = time.perf_counter()
        present = len(pages)
        if self._fast:
            self.engine.store_keyed(chain, pages, start, tiers=self._fast)
            present = self.engine.store_.prefix_length(chain[start:start + len(pages)])
        if self._writer is not None:
            nbytes = sum(p.nbytes for p in pages)
            queued = self._writer.submit(nbytes, lambda: self.engine.store_keyed(
                chain, pages, start, tiers=self._slow))
            if not queued and not self._fast:
                present = 0
        self._tracker.observe_store(time.perf_counter() - t0)
        return present

    def _is_page(self, value: Any) -> bool:
        if not isinstance(value, torch.Tensor):
            return False
        if self.spec is None:
            return True
        return value.dtype == self.spec.dtype and value.numel() == self.spec.numel

    def _as_page(self, value: Any) -> Optional[torch.Tensor]:
        """A fresh tensor in the stored page form, or None (counted) for a value that is not one."""
        if not isinstance(value, torch.Tensor) or value.numel() == 0 or value.dtype == torch.bool \
                or (self.spec is not None and not self._is_page(value)):
            self.stats_.bad_values += 1
            log.warning("sglang backend: refusing to store %s",
                        f"{list(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                        else type(value).__name__)
            return None
        page = value.detach().to("cpu", copy=True).contiguous()
        return page.view(self.spec.shape) if self.spec is not None else page

    def _record(self, kind: str, pages: int, seconds: float) -> None:
        if pages <= 0 or self.spec is None:
            return
        gb = pages * self.spec.numel * self.spec.dtype.itemsize / 1e9
        with self._lock:
            self._periods[f"{kind}_pgs"].append(pages)
            self._periods[f"{kind}_bandwidth"].append(gb / max(seconds, 1e-9))

    # ---- exists -------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """Number of leading `keys` present in some tier (one pipelined round trip per tier)."""
        chain, start = self._chain(keys, extra_info)
        if len(chain) == start:
            return 0
        hit = self._call("exists", lambda: self.engine.lookup_keys(chain[start:]), None)
        page = self.spec.page_size if self.spec else 1
        if hit is None:
            self.metrics.lookup_errors.inc()
            hit = 0
        self.metrics.record_lookup(len(keys) * page, 0)
        return hit

    # ---- generic (copying) interface --------------------------------------------------------------
    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[Optional[torch.Tensor]]:
        """Pages of `keys` up to the first miss (None from there on). With `target_locations`
        (SGLang passes flat page buffers) each page is copied into its target and the target is
        returned; a target of another dtype or size makes that page a miss."""
        t0 = time.perf_counter()
        out: list[Optional[torch.Tensor]] = [None] * len(keys)
        chain, start = self._chain(keys, None)
        values = self._call("get", lambda: self._fetch(chain, start), []) if chain else []
        for i, value in enumerate(values):
            target = target_locations[i] if target_locations is not None else None
            if target is None:
                out[i] = value.clone()
                continue
            if not isinstance(target, torch.Tensor) or target.dtype != value.dtype \
                    or target.numel() != value.numel() or not target.is_contiguous():
                self.stats_.wrong_pages += 1
                log.warning("sglang backend: target for page %d cannot hold %s %s; a miss",
                            i, list(value.shape), value.dtype)
                break
            target.view(-1).copy_(value.view(-1))
            out[i] = target
        self._record("prefetch", sum(v is not None for v in out), time.perf_counter() - t0)
        return out

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None,
                  target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None) -> bool:
        """Store `values[i]` (a page tensor) under `keys[i]`; True if all are stored afterwards.
        `keys` are one chain (SGLang backs up one request's pages in order)."""
        values = list(values) if values is not None else []
        if len(values) != len(keys):
            self.stats_.bad_values += 1
            log.warning("sglang backend: batch_set got %d keys and %d values", len(keys), len(values))
            return False
        return all(self._set_pages(keys, lambda i: self._as_page(values[i]), None))

    # ---- zero-copy interface (host indices) ---------------------------------------------------------
    def _host_ok(self, keys: Sequence[Any], host_indices: Any, what: str) -> bool:
        if self.mem_pool_host is None or self.spec is None:
            self.stats_.errors += 1
            log.error("sglang backend: %s before register_mem_pool_host", what)
            return False
        want = len(keys) * self.spec.page_size
        if not isinstance(host_indices, torch.Tensor) or host_indices.dim() != 1 \
                or host_indices.numel() != want:
            self.stats_.bad_values += 1
            log.error("sglang backend: %s: %d keys need %d host indices, got %s", what, len(keys),
                      want, list(host_indices.shape) if isinstance(host_indices, torch.Tensor) else host_indices)
            return False
        return True

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Load pages straight into the registered host pool at `host_indices` (`page_size` per
        key); True for the leading pages loaded, False from the first miss on."""
        t0 = time.perf_counter()
        done = [False] * len(keys)
        if not keys or not self._host_ok(keys, host_indices, "batch_get_v1"):
            return done
        chain, start = self._chain(keys, extra_info)
        values = self._call("get", lambda: self._fetch(chain, start), []) if len(chain) > start else []
        if not values:
            return done
        page, pool, spec = self.spec.page_size, self.mem_pool_host, self.spec
        n = len(values)
        try:
            if spec.layout is not None:
                slots = host_indices[:n * page].to(device="cpu", dtype=torch.int64).contiguous()
                chunk = torch.cat([v.view(spec.shape) for v in values], dim=2)  # [2, L, n*page, H*D]
                kv = pool.kv_buffer
                scatter(chunk.to(kv.device), _kv_caches(kv), spec.layout, slots.to(kv.device))
            else:
                for i, value in enumerate(values):
                    pool.set_from_flat_data_page(int(host_indices[i * page]), value.view(-1))
        except (TypeError, ValueError, RuntimeError, IndexError):
            self.stats_.errors += 1
            log.exception("sglang backend: batch_get_v1 could not write host pages; all misses")
            return done
        self._record("prefetch", n, time.perf_counter() - t0)
        return [True] * n + [False] * (len(keys) - n)

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Store the host pool's pages at `host_indices` (`page_size` per key) under `keys`."""
        if not keys:
            return []
        if not self._host_ok(keys, host_indices, "batch_set_v1"):
            return [False] * len(keys)
        page, pool, spec = self.spec.page_size, self.mem_pool_host, self.spec
        try:
            if spec.layout is not None:
                kv = pool.kv_buffer
                slots = host_indices.to(device=kv.device, dtype=torch.int64).contiguous()
                chunk = gather(_kv_caches(kv), spec.layout, slots).cpu()   # [2, L, n*page, H*D]
                pages = [chunk[:, :, i * page:(i + 1) * page].contiguous() for i in range(len(keys))]
            else:
                pages = [pool.get_data_page(int(host_indices[i * page]), flat=True).to("cpu", copy=True)
                         for i in range(len(keys))]
        except (TypeError, ValueError, RuntimeError, IndexError):
            self.stats_.errors += 1
            log.exception("sglang backend: batch_set_v1 could not read host pages; nothing stored")
            return [False] * len(keys)
        return self._set_pages(keys, lambda i: self._as_page(pages[i]), extra_info)

    def _set_pages(self, keys: Sequence[Any], page_of: Callable[[int], Optional[torch.Tensor]],
                   extra_info: Optional[HiCacheStorageExtraInfo]) -> List[bool]:
        """Store a chain of pages (in the caller's thread up to the queueing, so host memory is
        copied before this returns); per key whether it is stored afterwards (a prefix)."""
        t0 = time.perf_counter()
        if self.is_mla and not self.is_writer:
            self.stats_.skipped_writes += len(keys)
            return [True] * len(keys)   # the storage-writer rank stores the same replicated pages
        chain, start = self._chain(keys, extra_info)
        pages: list[torch.Tensor] = []
        for i in range(len(chain) - start):
            page = page_of(i)
            if page is None:
                break
            pages.append(page)
        chain = chain[:start + len(pages)]
        stored = self._call("set", lambda: self._store(chain, start, pages), 0) if pages else 0
        if stored < len(keys):
            self.metrics.store_failures.inc(len(keys) - stored)
        self._record("backup", stored, time.perf_counter() - t0)
        return [True] * stored + [False] * (len(keys) - stored)

    # ---- admin ----------------------------------------------------------------------------------------
    def clear(self) -> bool:
        """Delete every stored page in every tier (in Redis: all instances' pages under the key
        prefix, as SGLang's file backend clears its shared folder). Pinned pages stay."""
        def wipe():
            self.flush()
            for tier in self.engine.tiers:
                with tier.lock:
                    tier.clear()
            return True
        return bool(self._call("clear", wipe, False, timeout=None))

    def get_stats(self):
        """SGLang's `StorageMetrics` for the period since the last call (pages and GB/s per batch
        of prefetch and backup), or None where SGLang's metrics module cannot be imported."""
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except ImportError as e:
            log.debug("sglang backend: StorageMetrics unavailable (%s)", e)
            return None
        with self._lock:
            periods = {k: v for k, v in self._periods.items()}
            self._periods = {k: [] for k in periods}
        return StorageMetrics(**periods)

    def stats(self) -> dict:
        """A snapshot: this backend's counters, the engine's, and each tier's."""
        return {"backend": asdict(self.stats_), "engine": self.engine.stats.as_dict(),
                "tiers": {t.name: asdict(t.stats) for t in self.engine.tiers}}

    def flush(self) -> None:
        """Wait until every queued slow-tier write has run (or was skipped)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        if self._writer is not None:
            self._writer.close()
        self.engine.close()
        self.metrics.close()
