"""Drop-in vLLM connector: `LMCacheLabConnector`.

    LLM(model, kv_transfer_config={
        "kv_connector": "LMCacheLabConnector",
        "kv_connector_module_path": "lmcache_lab.integrations.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"chunk_size": 256, "tiers": {"disk": {"path": "/tmp/kv"}}}})

The extra config takes the keys of `lmcache_lab.config` (or `{"config_file": "<yaml>"}`).

Flow of one request (invariants in `vllm_plan.py` and `vllm_cache.py`):
  scheduler  get_num_new_matched_tokens  ask the worker's cache over a local socket: it keys the
                                         prompt, counts the cached prefix and pins those chunks
             update_state_after_alloc    remember the token range to load (or release the pins)
             build_connector_meta        LoadSpec / StoreSpec (token ranges + slots), releases
  worker     start_load_kv               read the chunks, scatter them into the paged cache; a
                                         shortfall marks the blocks invalid -> vLLM recomputes
             wait_for_save               gather the step's newly full chunks (fresh tensors) into
                                         the memory tier; slower tiers are written behind the step
             build_connector_worker_meta metric deltas travel back to the scheduler process,
                                         which serves the Prometheus endpoint
  scheduler  request_finished            the request's missed tokens by reason (observe.py);
                                         with `trace.path`, its line of the captured trace
             get_kv_connector_stats      the step's counts for vLLM's own stats and /metrics
             take_events                 chunks stored / evicted as vLLM KV events (vllm_stats.py)

The worker and the scheduler may share a process (vLLM's `uni` executor) or not (`mp`, always on
CPU): the socket works for both. With tensor parallelism each rank keeps its own shard of every
chunk (the rank is in the namespace) and a hit is the minimum over ranks.

An MLA latent cache (DeepSeek-V2/V3: one latent vector of kv_lora_rank + rope dims per token,
no V) is served as K-only chunks `[1, L, N, D]`. Every tensor-parallel rank holds the same
latent KV, so its namespace is rank 0 of 1 (plus "mla"): rank 0 stores, every rank loads
(ranks > 0 hit only through a tier they share with rank 0: disk on one path, Redis).

A cache fault is a counted miss: an exception while loading marks the request's blocks invalid
(recomputed by vLLM; `kv_load_failure_policy` is set to "recompute"), one while storing drops
that chunk; neither reaches the engine.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from lmcache_lab.config import CacheConfig, ConfigError, load_config
from lmcache_lab.engine import CacheEngine
from lmcache_lab.integrations.vllm_cache import (LookupClient, LookupServer, WorkerCache,
                                                  refuse_lookup, socket_path)
from lmcache_lab.integrations.vllm_identity import model_fingerprint, pipeline_rank, request_identity
from lmcache_lab.integrations.vllm_loads import BackgroundLoads
from lmcache_lab.integrations.vllm_plan import (LoadSpec, Planner, StepPlan, StoreSpec,
                                                 load_between_steps)
from lmcache_lab.integrations.vllm_stats import LMCacheLabPromMetrics, LMCacheLabStats, kv_events
from lmcache_lab.integrations.vllm_support import unsupported_spec_reason
from lmcache_lab.keys import ChunkKeyer, Namespace
from lmcache_lab.kernels.blocks import BlockCache, block_records
from lmcache_lab.kernels.layout import KVLayout, UnsupportedLayout
from lmcache_lab.kernels.paged import gather, scatter
from lmcache_lab.tiers.remote import RemoteTier
from lmcache_lab.metrics import CacheMetrics, MetricsDelta
from lmcache_lab.observe import TraceWriter, request_misses

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.02    # longest wait of a step with nothing to compute for a background load

# No table of layouts: `register_kv_caches` derives each engine's from its tensors, attention
# backend, KV cache spec and resolved KVCacheLayout (`KVLayout.from_vllm`, kernels/layout.py).


# ================================================================================= metadata
@dataclass
class LMCacheLabConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    idle: bool = False      # the step computes nothing (vLLM steps only to poll transfers)


@dataclass
class LMCacheLabWorkerMetadata(KVConnectorWorkerMetadata):
    delta: MetricsDelta
    events: list[tuple] = field(default_factory=list)   # raw chunk events (vllm_stats.kv_events)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, LMCacheLabWorkerMetadata)
        return LMCacheLabWorkerMetadata(self.delta.aggregate(other.delta),
                                        self.events + other.events)


# ================================================================================= namespace
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_namespace(vllm_config: "VllmConfig", config: CacheConfig, layout: KVLayout,
                   kv_dtype: torch.dtype, tp_rank: int, tp_size: int, pp_rank: int = 0,
                   pp_size: int = 1, block_native: bool = False) -> Namespace:
    """Everything engine-side that makes this engine's KV bytes differ from another's: the model
    (path, revision, and a fingerprint of its KV-relevant settings and weight files), the KV
    dtype and layout, the tensor- and pipeline-parallel rank (a pipeline stage holds other
    layers), the codec, the chunk format (token-major or block-native records). Per-request
    inputs (LoRA, cache salt) go into each request's chain root instead
    (`vllm_identity.request_identity`)."""
    mc = vllm_config.model_config
    model = f"{mc.model}@{mc.revision or ''}#{model_fingerprint(vllm_config)}"
    mla = layout.v is None
    if mla:           # the latent KV is the same on every tensor rank: one copy serves them all
        tp_rank, tp_size = 0, 1
    shape = (f"{layout.name}:L{layout.num_layers}:bs{layout.block_size}:"
             f"H{layout.num_kv_heads}:D{layout.head_size}")
    pc = vllm_config.parallel_config
    # context parallelism shards a request's KV by token across ranks: its sizes separate stores
    cp = f"dcp={pc.decode_context_parallel_size};pcp={pc.prefill_context_parallel_size}"
    if block_native:     # the records are in the engine's own element order: its strides count
        shape += f":blocks:{layout.layer_shape}:{layout.layer_strides()}"
    return Namespace(model=model, kv_dtype=_dtype_name(kv_dtype), layout=shape, tp_rank=tp_rank,
                     tp_size=tp_size, codec=config.codec,
                     extra=("mla;" if mla else "") + f"pp={pp_rank}/{pp_size};{cp}")


def tail_chunks(config: CacheConfig, block_size: int) -> bool:
    """Whether a prompt's whole blocks past its last full chunk are kept as a tail chunk: asked
    for (`tail_blocks`), stored as they are (codec none) and whole blocks of a chunk. Shared
    tiers (Redis, S3) keep tails too: they accept a chunk's layout shorter along its block axis
    (`chunk_check.LayoutGuard`)."""
    return config.tail_blocks and config.codec == "none" and config.chunk_size % block_size == 0


def refuse_literal_secret(extra: dict) -> None:
    """vLLM logs `kv_connector_extra_config` at start-up: a store secret written there in the
    clear would land in every log. Only references to it are accepted there."""
    secret = extra.get("store_secret")
    if isinstance(secret, str) and not secret.startswith(("file:", "env:")):
        raise ConfigError("store_secret: vLLM logs kv_connector_extra_config, so give the secret "
                          "as file:/path or env:NAME there, never the secret itself")


# ================================================================================= connector
class LMCacheLabConnector(KVConnectorBase_V1):
    """KV-cache reuse for vLLM through lmcache_lab's chunk store (see the module docstring)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        refuse_literal_secret(extra)
        self.config = load_config(extra)
        self.block_size = vllm_config.cache_config.block_size
        self.engine_id = str(self._kv_transfer_config.engine_id)
        self._authkey = ("lmcache_lab:" + self.engine_id).encode()
        # data-parallel engines share the engine id: each gets its own lookup endpoint; so does
        # each pipeline stage (its workers hold other layers)
        pc = vllm_config.parallel_config
        self._endpoint = f"{self.engine_id}-dp{pc.data_parallel_rank}"
        kv_role = self._kv_transfer_config.kv_role
        self.load_enabled = kv_role in ("kv_both", "kv_consumer")
        self.store_enabled = kv_role in ("kv_both", "kv_producer")
        # worker side
        self._cache: WorkerCache | None = None
        self._refused: LookupServer | None = None     # the lookup server of a refused cache
        self._layout: KVLayout | None = None
        self._layers: list[torch.Tensor] = []
        self._invalid_blocks: set[int] = set()
        self._stores_here = True      # False on tensor ranks > 0 of an MLA cache (rank 0 stores)
        self._blocks: BlockCache | None = None    # set: chunks are whole block records
        self._reads_into = False      # a disk tier reads chunk files straight into the blocks
        self._scratch = threading.local()         # .chunk: blocks read but not loaded (per thread)
        self._background: BackgroundLoads | None = None   # loads between steps (`prefetch`)
        # scheduler side
        self._planner: Planner | None = None
        self._client: LookupClient | None = None
        self._plan_errors = 0
        self._refused_ids: set[str] = set()      # refused requests counted (once each)
        self._step_s = 0.0                # wall time of the last engine step that ran requests
        self._step_reqs = 0               # requests the last step scheduled
        self._step_at: float | None = None
        # A load between steps overlaps the forward pass only where that runs on an accelerator;
        # a CPU engine's forward pass uses the host's cores, which the load's reads, checks and
        # copies would share (measured: docs/redis.md#what-prefetch-buys)
        self._host_free = vllm_config.device_config.device_type != "cpu"
        self.trace: TraceWriter | None = None
        self._kv_events: list = []                # vLLM events waiting for take_events
        ev = vllm_config.kv_events_config
        self._events_enabled = bool(ev is not None and ev.enable_kv_cache_events)
        self.metrics: CacheMetrics | None = None
        self.metrics_port: int | None = None
        if role == KVConnectorRole.SCHEDULER:
            # A cache fault must cost a recompute, never a failed request.
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
            # one worker per (pipeline stage, tensor rank), ranked as vLLM ranks them
            ranks = pc.tensor_parallel_size * pc.pipeline_parallel_size
            self._client = LookupClient([socket_path(self._endpoint, r) for r in range(ranks)],
                                        self._authkey, timeout_s=self.config.lookup_timeout_s)
            self._planner = Planner(self.config.chunk_size, self.block_size, self._lookup,
                                    load_enabled=self.load_enabled,
                                    store_enabled=self.store_enabled,
                                    tails=tail_chunks(self.config, self.block_size))
            self.metrics = CacheMetrics()
            if self.config.metrics.port is not None:
                # data-parallel engines: one endpoint each, on consecutive ports (0: any free one)
                port = int(self.config.metrics.port)
                dp = vllm_config.parallel_config.data_parallel_rank
                self.metrics_port = self.metrics.serve(port + dp if port else 0,
                                                       self.config.metrics.host)
            if self.config.trace.path is not None:
                self.trace = self._trace_writer(vllm_config)
            if self.config.chunk_size % self.block_size:
                log.warning("lmcache_lab: chunk_size %d is not a multiple of the block size %d: "
                            "hits may end mid-block (supported)", self.config.chunk_size,
                            self.block_size)

    # ------------------------------------------------------------------ scheduler side
    def _trace_writer(self, vllm_config: "VllmConfig") -> TraceWriter:
        """The captured trace's writer. Its ids chain the prompt's chunks as the cache's keys do
        (same hash, identity and store secret; a namespace of its own), so equal prefixes get
        equal ids and nothing else does."""
        c = self.config
        secret = c.store_secret.reveal() if c.store_secret else None
        keyer = ChunkKeyer(Namespace(model="trace", codec=c.codec), c.chunk_size, c.hash, secret)
        meta = {"chunk_tokens": c.chunk_size, "block_size": self.block_size,
                "policy": c.policy.name, "capacity_bytes": c.tiers.cpu.capacity_bytes,
                "hash": c.hash, "engine_prefix_cache":
                    bool(vllm_config.cache_config.enable_prefix_caching)}
        writer = TraceWriter(c.trace.path, keyer, meta, c.trace.sample)
        atexit.register(writer.close)      # the queued lines land even without a shutdown() call
        return writer

    def _lookup(self, req_id: str, prompt, max_chunks: int, skip: int, identity) -> tuple[int, int]:
        self.metrics.lookups.labels("worker").inc()
        errors = self._client.errors
        hit = self._client.lookup(req_id, prompt, max_chunks, skip, identity)
        if self._client.errors != errors:
            self.metrics.lookup_errors.inc(self._client.errors - errors)
        return hit

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        """External tokens beyond `num_computed_tokens` (vLLM's own prefix-cache hit) that the
        cache holds for this request. A request whose KV depends on more than its token ids
        (prompt embeddings, multimodal inputs) is neither looked up nor stored; any fault here is
        a counted miss, never an exception in vLLM's scheduler."""
        try:
            identity = request_identity(request)
            if identity is None:
                if request.request_id not in self._refused_ids:
                    self._refused_ids.add(request.request_id)
                    self.metrics.refused_requests.inc()
                    lookup = self._planner.servable(request.num_prompt_tokens)
                    self.metrics.record_lookup(lookup, 0)
                    self.metrics.record_misses({("refused", ""): lookup})
                return 0, False
            planner = self._planner
            reused = planner.reused_lookups
            ext, _hit = planner.match(request.request_id, request.prompt_token_ids,
                                      num_computed_tokens, identity)
            t = planner.requests[request.request_id]
            if planner.reused_lookups != reused:
                self.metrics.lookups.labels("reused").inc()
            else:
                t.miss = self._client.last_miss
                t.background = self._between_steps()
            if not t.counted:
                t.counted = True
                lookup = planner.servable(t.prompt_len)
                self.metrics.record_lookup(lookup, min(num_computed_tokens, lookup))
            return ext, t.background and ext > 0
        except Exception:
            log.exception("lmcache_lab: lookup of request %s failed; counted as a miss",
                          request.request_id)
            self.metrics.lookup_errors.inc()
            return 0, False

    def _between_steps(self) -> bool:
        """Whether the last lookup's hit loads between engine steps (config `prefetch`)."""
        c, prefetch = self._client, self.config.prefetch
        if not c.last_slow or prefetch is False:
            return False
        return prefetch is True or (self._host_free and load_between_steps(
            c.last_slow_s, self._step_reqs, self._step_s))

    def _time_step(self, scheduled_requests: int) -> None:
        """Called once per engine step: the time since the previous call is that step's wall
        time (scheduling, forward pass, outputs), unless it scheduled nothing (then idle). The
        last step predicts the next: a batch changes little from one step to the next, while
        an average would remember the long prefill steps of requests that are decoding now."""
        now = time.perf_counter()
        if self._step_at is not None and self._step_reqs:
            self._step_s = now - self._step_at
        self._step_at, self._step_reqs = now, scheduled_requests

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int):
        t = self._planner.requests.get(request.request_id)
        block_ids = blocks.get_block_ids()[0] if t is not None and t.background else None
        self._planner.allocated(request.request_id, num_external_tokens, block_ids)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        self._time_step(len(scheduler_output.num_scheduled_tokens))
        new = [(r.req_id, r.block_ids[0], r.num_computed_tokens)
               for r in scheduler_output.scheduled_new_reqs]
        c = scheduler_output.scheduled_cached_reqs
        cached = [(rid, (c.new_block_ids[i] or (None,))[0], rid in c.resumed_req_ids,
                   c.num_computed_tokens[i]) for i, rid in enumerate(c.req_ids)]
        plan: StepPlan = self._planner.step(new, cached, scheduler_output.num_scheduled_tokens)
        self.metrics.plan_errors.inc(self._planner.errors - self._plan_errors)
        self._plan_errors = self._planner.errors
        return LMCacheLabConnectorMetadata(plan.loads, plan.stores, plan.release, plan.finished,
                                           idle=not scheduler_output.total_num_scheduled_tokens)

    def update_connector_output(self, connector_output: "KVConnectorOutput"):
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, LMCacheLabWorkerMetadata) and self.metrics is not None:
            self.metrics.apply(meta.delta)
            if self.trace is not None and meta.delta.stored_chunks:
                self.trace.chunk_bytes(meta.delta.stored_bytes // meta.delta.stored_chunks)
            if self._events_enabled and meta.events:
                self._kv_events.extend(kv_events(meta.events))

    def take_events(self):
        """Chunks stored in / evicted from the worker's tiers since the last call, as vLLM's
        BlockStored / BlockRemoved (only with vLLM's KV events on)."""
        out, self._kv_events = self._kv_events, []
        return out

    def get_kv_connector_stats(self) -> LMCacheLabStats | None:
        """Scheduler side: what the metrics counted since the last call, for vLLM's stats (its
        log line and its Prometheus registry, `LMCacheLabPromMetrics`)."""
        if self.metrics is None:
            return None
        data = self.metrics.take_interval()
        return LMCacheLabStats(data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> LMCacheLabStats:
        return LMCacheLabStats(dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return LMCacheLabPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def request_finished(self, request: "Request", block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        try:
            self._observe_finished(request)
        except Exception:      # observability never fails a request: logged with its traceback
            log.exception("lmcache_lab: recording finished request %s failed", request.request_id)
        self._planner.finished(request.request_id)
        return False, None   # stores finish within each step: the blocks may be freed now

    def _observe_finished(self, request: "Request") -> None:
        """The request's missed tokens by reason, and its line of the captured trace."""
        self._refused_ids.discard(request.request_id)
        t = self._planner.requests.get(request.request_id)
        if t is not None and t.counted:
            lookup = self._planner.servable(t.prompt_len)
            self.metrics.record_misses(request_misses(lookup, t.matched_from, t.hit_tokens,
                                                      t.accepted, t.miss))
        if self.trace is not None and request.prompt_token_ids is not None:
            identity = request_identity(request)
            if identity is not None:
                self.trace.submit(request.arrival_time, request.prompt_token_ids, identity,
                                  request.num_output_tokens)

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        """Derive the KV layout from the engine and start the worker's cache and lookup server.

        The layout comes from what vLLM says (`KVLayout.from_vllm`): the registered tensors
        (shape, strides, views of one buffer), the layers' attention backend, their KV cache
        group's spec and the resolved `KVCacheLayout`; never from a table of names. Layers that
        reuse another layer's cache (cross-layer KV sharing) are kept once.

        A cache lmcache_lab cannot serve (a backend, layout, dtype or packing `from_vllm`
        refuses, several KV cache groups, an MLA latent cache with the int8/fp8 codec or with
        context parallelism) is refused here with one warning
        that names the backend, the layout and the shapes; no exception reaches vLLM and the
        engine runs on without the connector's hits. The worker still serves its lookup socket
        (`refuse_lookup`): the scheduler's lookups are answered 0 at once, never left to time
        out, and `self._cache` stays None, so loads and stores are no-ops (nothing is stored)."""
        from vllm.distributed import (get_tensor_model_parallel_rank,
                                      get_tensor_model_parallel_world_size)

        tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        pp_rank, pp_size = pipeline_rank(self._vllm_config)
        path = socket_path(self._endpoint, pp_rank * tp_size + tp_rank)
        try:
            self._layers, self._layout = self._derive_layout(kv_caches)
        except Exception as e:
            known = isinstance(e, UnsupportedLayout)   # else a surprise: its traceback too
            reason = str(e) if known else f"{self._describe_caches(kv_caches)}: {e!r}"
            log.warning("lmcache_lab: the engine runs without lmcache_lab on this worker "
                        "(lookups answer 0, nothing is stored): %s", reason, exc_info=not known)
            self._layers, self._layout = [], None
            self._refused = LookupServer(path, self._authkey, refuse_lookup)
            atexit.register(self._refused.close)
            return
        # Whole block records where the layout has them, the chunk is whole blocks and no codec
        # needs the token-major [2, L, N, H*D] form: one row copy per block and layer.
        if (self.config.codec == "none" and self.config.chunk_size % self._layout.block_size == 0
                and block_records(self._layout) is not None):
            self._blocks = BlockCache(self._layers, self._layout)
        # Block-native chunks in CPU memory: a disk tier reads a chunk file straight into the
        # engine's blocks, one copy from the page cache (`DiskTier.get_into`)
        self._reads_into = self._blocks is not None and self._layers[0].device.type == "cpu"
        ns = make_namespace(self._vllm_config, self.config, self._layout, self._layers[0].dtype,
                            tp_rank, tp_size, pp_rank, pp_size, self._blocks is not None)
        # MLA: one copy for all tensor ranks (make_namespace drops the rank), written by rank 0
        self._stores_here = self._layout.v is not None or tp_rank == 0
        # events once per chunk: tensor rank 0 speaks for the ranks' shards
        tail = self._layout.block_size if tail_chunks(self.config, self._layout.block_size) else 0
        # background loads only where the scheduler may ask for them (`_between_steps`)
        prefetch = self.config.prefetch
        background = self.load_enabled and (prefetch is True or prefetch == "auto"
                                            and self._layers[0].device.type != "cpu")
        engine = CacheEngine(self.config, namespace=ns)
        self._expect_chunks(engine)
        self._cache = WorkerCache(engine, events=self._events_enabled and tp_rank == 0, tail_block=tail,
                                  slow_hits=background)
        self._cache.serve(path, self._authkey)
        atexit.register(self._cache.close)
        if background:
            self._background = BackgroundLoads(self._load_between_steps, self._layout.block_size)
        log.info("lmcache_lab: %s layout (%s chunks), %d layers, chunk_size %d, tiers %s, "
                 "namespace %s", self._layout.name,
                 "block-native" if self._blocks is not None else "token-major",
                 self._layout.num_layers, self.config.chunk_size,
                 [t.name for t in self._cache.engine.tiers], ns)

    def _expect_chunks(self, engine: CacheEngine) -> None:
        """Tell the shared tiers (Redis, S3) this worker's full chunk as stored (a chunk of the
        engine's blocks 0.., through the codec): they then accept exactly that layout or a tail of
        it, read with an exact size cap, whichever chunk this or another engine wrote first."""
        shared = [t for t in engine.tiers if isinstance(t, RemoteTier)]
        cs = self.config.chunk_size
        if not shared or self._layout.num_blocks * self._layout.block_size < cs:
            return      # (a cache smaller than one chunk never stores one)
        example = engine.codec.encode(self._gather(torch.arange(cs, device=self._layers[0].device)))
        for tier in shared:
            tier.expect_layout(example)

    def _describe_caches(self, kv_caches: dict[str, torch.Tensor]) -> str:
        ctx = self._vllm_config.compilation_config.static_forward_context
        backends = sorted({b.get_name() if (b := getattr(ctx.get(n), "attn_backend", None))
                           else "none" for n in kv_caches})
        shapes = sorted({(tuple(t.shape), tuple(t.stride()), str(t.dtype))
                         for t in kv_caches.values()})
        return (f"backends {backends}, layout {self._vllm_config.cache_config.kv_cache_layout}, "
                f"{len(kv_caches)} layers of (shape, strides, dtype) {shapes}")

    def _derive_layout(self, kv_caches: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                           KVLayout]:
        """(one tensor per layer that owns its KV, in vLLM's order; their layout), or
        UnsupportedLayout naming what cannot be served."""
        ctx = self._vllm_config.compilation_config.static_forward_context
        groups = list(getattr(self._kv_cache_config, "kv_cache_groups", None) or [])
        group_of = {n: i for i, g in enumerate(groups) for n in g.layer_names}
        unique: dict[tuple, str] = {}      # one name per distinct cache tensor, a grouped one first
        for n, t in kv_caches.items():
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key not in unique or (unique[key] not in group_of and n in group_of):
                unique[key] = n
        names = list(unique.values())
        layers = [kv_caches[n] for n in names]
        backends = {getattr(ctx.get(n), "attn_backend", None) for n in names}
        layout_name = self._vllm_config.cache_config.kv_cache_layout
        kv_layout = (self._vllm_config.cache_config.get_resolved_kv_cache_layout()
                     if layout_name is not None else None)
        where = self._describe_caches(kv_caches)
        if len(backends) != 1 or None in backends:
            raise UnsupportedLayout(f"{where}: the layers must share one attention backend")
        backend = next(iter(backends))
        used = {group_of.get(n) for n in names}
        if None in used or len(used) != 1:
            raise UnsupportedLayout(f"{where}: {len(groups)} KV cache groups (layers in groups "
                                    f"{sorted(used, key=str)}); one group of alike layers is "
                                    "served, its block table gives the slots")
        spec = groups[used.pop()].kv_cache_spec
        if hasattr(spec, "kv_cache_specs"):            # UniformTypeKVCacheSpecs: per layer
            specs = {spec.kv_cache_specs[n] for n in names}
            if len(specs) != 1:
                raise UnsupportedLayout(f"{where}: the layers' KV cache specs differ")
            spec = specs.pop()
        if (why := unsupported_spec_reason(spec, self._vllm_config)) is not None:
            raise UnsupportedLayout(f"{where}: {why}")
        isa = None
        if backend.get_name() == "CPU_ATTN":
            isa = getattr(ctx[names[0]], "isa", None)
            if isa is None:      # set by the metadata builder; else vLLM's own choice
                from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
                isa = _get_attn_isa(spec.dtype, layers[0].shape[2], spec.head_size,
                                    self._vllm_config.cache_config.cache_dtype)
        layout = KVLayout.from_vllm(layers, backend, spec, kv_layout, cpu_isa=isa)
        if layout.v is None:                           # MLA latent cache: K-only chunks
            if self.config.codec != "none":
                raise UnsupportedLayout(f"{where}: codec {self.config.codec!r} quantizes K and V "
                                        f"chunks [2, ...]; an MLA latent cache ({layout.name}) "
                                        "has K-only chunks [1, ...]: use codec 'none'")
            pc = self._vllm_config.parallel_config
            if pc.decode_context_parallel_size > 1 or pc.prefill_context_parallel_size > 1:
                raise UnsupportedLayout(f"{where}: an MLA latent cache ({layout.name}) with "
                                        "context parallelism (each rank holds other tokens)")
        return layers, layout

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self._cache is None:
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCacheLabConnectorMetadata)
        for req_id in meta.release:
            self._cache.release(req_id)
        for req_id in meta.finished:
            if self._background is not None:
                self._background.cancel(req_id)
            self._cache.forget(req_id)
        for spec in meta.loads:
            if spec.background and self._background is not None:
                self._background.submit(spec)
            else:
                self._invalid_blocks |= self._load(spec)

    def _load_between_steps(self, spec: LoadSpec) -> set[int]:
        """`_load` on the background thread; on a GPU its copies are complete when it returns
        (the request is reported loaded right after)."""
        invalid = self._load(spec)
        if self._layers[0].device.type == "cuda":
            torch.cuda.current_stream(self._layers[0].device).synchronize()
        return invalid

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(None, requests whose background loads are done): vLLM schedules them next. The
        blocks those loads could not fill go out in the same pass
        (`get_block_ids_with_load_errors`, which vLLM calls after this)."""
        if self._background is None:
            return None, None
        if self.has_connector_metadata() and self._get_connector_metadata().idle:
            # Nothing to compute: vLLM steps again at once only to ask again. Wait a little for
            # a load to finish instead of spinning (a spinning step also holds the GIL the
            # load's thread needs); a request arriving meanwhile waits at most IDLE_WAIT_S.
            self._background.wait(IDLE_WAIT_S)
        done, invalid = self._background.take()
        self._invalid_blocks |= invalid
        return None, done or None

    def _load(self, spec: LoadSpec) -> set[int]:
        """Read the spec's chunks into the engine's blocks; returns the blocks vLLM must
        recompute (those from the first token not loaded on)."""
        cs = self.config.chunk_size
        t0 = time.perf_counter()
        if spec.failed:   # the scheduler could not plan it: vLLM must recompute these blocks
            self._cache.release(spec.req_id)
            self._cache.count(failed_load_tokens=spec.end - spec.start)
            return set(spec.blocks.tolist())
        first, last = spec.start // cs, -(-spec.end // cs)
        loaded_to = spec.start          # tokens [spec.start, loaded_to) are in the engine
        try:
            into = self._destination(spec) if self._reads_into else None
            chunks = self._cache.read(spec.req_id, first, last, into)
            device = self._layers[0].device
            slots = torch.from_numpy(spec.slots).to(device)
            for i, chunk in enumerate(chunks, first):
                a, b = max(spec.start, i * cs), min(spec.end, (i + 1) * cs)
                if chunk is not None:       # else a tier read it into the blocks (`into`)
                    self._scatter(chunk.to(device, non_blocking=True), a - i * cs, b - i * cs,
                                  slots[a - spec.start:b - spec.start])
                loaded_to = b
        except Exception:
            log.exception("lmcache_lab: loading request %s failed; its blocks are recomputed",
                          spec.req_id)
            self._cache.engine.count(load_failures=1)
        # vLLM recomputes from the first invalid block on (a partly loaded block included).
        failed = spec.slots[loaded_to - spec.start:] // self.block_size
        self._cache.count(loaded_tokens=loaded_to - spec.start,
                          failed_load_tokens=spec.end - loaded_to,
                          background_loaded_tokens=(loaded_to - spec.start) * spec.background)
        self._cache.deltas.observe_load(time.perf_counter() - t0)
        return set(np.unique(failed).tolist())

    def _scatter(self, chunk: torch.Tensor, a: int, b: int, slots: torch.Tensor) -> None:
        """Write tokens [a, b) of `chunk` into the engine's cache at `slots`."""
        if self._blocks is None:
            part = chunk if b - a == chunk.shape[2] else chunk[:, :, a:b].contiguous()
            scatter(part, self._layers, self._layout, slots)
            return
        n = self._layout.block_size
        if a % n or b % n:      # vLLM's computed tokens are whole blocks: never expected
            raise ValueError(f"tokens [{a}, {b}) of a block-native chunk are not whole "
                             f"{n}-token blocks")
        self._blocks.scatter(chunk[:, a // n:b // n], slots[::n] // n)

    def _destination(self, spec: LoadSpec):
        """`into(i)` for `WorkerCache.read`: block-native chunk i read straight into the engine's
        blocks (`BlockCache.views`, layer by layer). Blocks of the chunk outside the load's tokens
        (before its start: the engine's own prefix-cache hit; past its end) are read into a
        scratch chunk and dropped: the whole value is read, or its checksum could not be checked.
        A failed read leaves garbage in the blocks, which `_load` then reports invalid."""
        cs, n, layers = self.config.chunk_size, self._layout.block_size, self._layout.num_layers
        record = block_records(self._layout).record
        dtype = _dtype_name(self._layers[0].dtype)
        row = record * self._layers[0].element_size()                       # bytes per (layer, block)
        tail = self._cache.tail_at(spec.req_id)                             # (chunk, blocks) or None

        def into(i: int) -> tuple[list[memoryview], tuple]:
            nb = tail[1] if tail is not None and tail[0] == i else cs // n   # blocks stored
            value = (("kv", dtype, (layers, nb, record)),)                 # codec none: {"kv": chunk}
            a, b = max(spec.start, i * cs), min(spec.end, i * cs + nb * n)  # tokens loaded
            if a % n or b % n:      # vLLM's computed tokens are whole blocks: never expected
                raise ValueError(f"tokens [{a}, {b}) are not whole {n}-token blocks")
            wanted = range((a - i * cs) // n, (b - i * cs) // n)            # blocks of the chunk
            ids = torch.from_numpy(spec.slots[a - spec.start:b - spec.start:n] // n)
            mine = self._blocks.views(ids) if len(ids) else []
            spans = len(mine) // (layers * len(ids)) if len(ids) else 0
            scratch = getattr(self._scratch, "chunk", None)
            if len(wanted) < nb and scratch is None:
                scratch = self._scratch.chunk = memoryview(       # a whole chunk, this thread's
                    torch.zeros(layers * (cs // n) * row, dtype=torch.uint8).numpy())
            out, k = [], 0
            for layer in range(layers):
                for j in range(nb):
                    if j in wanted:
                        out += mine[k:k + spans]
                        k += spans
                    else:
                        r = (layer * nb + j) * row
                        out.append(scratch[r:r + row])
            return out, value

        return into

    def _gather(self, slots: torch.Tensor) -> torch.Tensor:
        """A fresh chunk of the tokens at `slots` (one chunk, starting at a block boundary)."""
        if self._blocks is None:
            return gather(self._layers, self._layout, slots)    # [2|1, L, cs, H*D]
        n = self._layout.block_size
        return self._blocks.gather(slots[::n] // n)                         # [L, cs/n, R]

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous: done before the forward pass starts

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        return  # all layers are copied at once after the forward pass (wait_for_save)

    def wait_for_save(self):
        if self._cache is None or not self._stores_here or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCacheLabConnectorMetadata)
        for spec in meta.stores:
            self._store(spec)

    def _store(self, spec: StoreSpec) -> None:
        if spec.tail_blocks:
            self._store_tail(spec)
            return
        cs = self.config.chunk_size
        keys, missing = self._cache.missing(spec.req_id, spec.first_chunk, spec.last_chunk)
        if not missing:
            return
        t0 = time.perf_counter()
        slots = torch.from_numpy(spec.slots).to(self._layers[0].device)
        for i in missing:
            try:
                off = (i - spec.first_chunk) * cs
                chunk = self._gather(slots[off:off + cs])
                self._cache.write(keys, i, chunk if chunk.device.type == "cpu" else chunk.cpu())
            except Exception:
                log.exception("lmcache_lab: storing chunk %d of request %s failed; it will be "
                              "a miss", i, spec.req_id)
                self._cache.count(store_failures=1)
        self._cache.deltas.observe_store(time.perf_counter() - t0)

    def _store_tail(self, spec: StoreSpec) -> None:
        """The prompt's whole blocks past its last full chunk, as a tail chunk (a fresh tensor of
        `tail_blocks` blocks, keyed by `ChunkKeyer.tail_key`)."""
        t0 = time.perf_counter()
        try:
            chain = self._cache.tail_chain(spec.req_id, spec.first_chunk, spec.tail_blocks)
            if chain is None:
                return
            chunk = self._gather(torch.from_numpy(spec.slots).to(self._layers[0].device))
            self._cache.write(chain, spec.first_chunk, chunk if chunk.device.type == "cpu" else chunk.cpu(),
                              tokens=len(spec.slots))
        except Exception:
            log.exception("lmcache_lab: storing the tail of request %s failed; it will be a miss",
                          spec.req_id)
            self._cache.count(store_failures=1)
        self._cache.deltas.observe_store(time.perf_counter() - t0)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._invalid_blocks = self._invalid_blocks, set()
        return out

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self._cache is None:
            return None
        delta, events = self._cache.take_delta(), self._cache.take_events()
        if delta is None and not events:
            return None
        return LMCacheLabWorkerMetadata(delta or MetricsDelta(), events)

    def shutdown(self):
        if self._background is not None:
            self._background.close()
        if self._cache is not None:
            self._cache.close()
        if self._refused is not None:
            self._refused.close()
        if self._client is not None:
            self._client.close()
        if self.trace is not None:
            self.trace.close()
        if self.metrics is not None:
            self.metrics.close()
