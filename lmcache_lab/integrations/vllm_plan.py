"""Scheduler-side planning of the vLLM connector, free of vLLM imports (unit-tested on its own).

Per request the planner keeps a `RequestTracker`; per engine step it emits a `StepPlan`: which
chunks to load into which slots before the forward pass, and which newly computed full chunks to
copy out after it. Token positions, chunk indices and slots relate as

    chunk i   = prompt tokens [i * chunk_size, (i + 1) * chunk_size)
    slot(t)   = block_ids[t // block_size] * block_size + t % block_size

Invariants:
  * a reported hit ends at most at `len(prompt) - 1` (at least one prompt token is always
    computed, so the engine has logits to sample from) and covers only chunks that the cache
    found present *and pinned in the same critical section*: nothing can evict them before the
    worker has loaded them. It is a whole number of chunks, except that the prompt's last full
    chunk, when it ends the prompt, is served up to the last whole block before the prompt's
    last token (`servable_tokens`): a repeated prompt hits as far as the engine's own prefix
    cache would. With `tails`, the chunk after the full ones may be a tail chunk of whole
    blocks (a stored prompt's blocks past its last full chunk): a hit then ends at any block
    boundary, as the engine's own prefix cache does;
  * pins belong to the request inside the cache (worker side); they are dropped after its load,
    when it is looked up again, when the scheduler declines the hit, or when it finishes;
  * vLLM asks again for a waiting request it could not schedule (every step until it can): a
    request whose chunks the cache holds pinned for it, asked with the same `num_computed`, is
    answered from the first lookup without asking the worker (the pins guarantee the answer
    still holds); an answer that pinned nothing is asked again (chunks may have arrived since);
  * a load covers exactly the tokens vLLM counts as external: [num_computed, num_computed +
    num_external), where num_computed is what vLLM passed to `get_num_new_matched_tokens` and
    num_external what it accepted in `update_state_after_alloc` (vLLM may trim the hit from the
    end, e.g. to a block boundary; it never moves the start);
  * no hook raises on a cache condition (they run in vLLM's scheduler process): a load that
    cannot be planned is sent as `LoadSpec.failed`, whose blocks the worker reports invalid so
    vLLM recomputes them, and a store that cannot be planned is skipped (both logged, counted);
  * each full prompt chunk is planned for storing once, in the step that completes it (chunked
    prefill completes a long prompt's chunks over several steps); with `tails`, the prompt's
    whole blocks past its last full chunk are planned once, as a tail chunk, in the step that
    completes the prompt;
  * a load vLLM runs between steps (`background`: its async KV load, used for hits only a slow
    tier holds) is planned when vLLM allocates its blocks, since the request is not scheduled
    until the worker reports the load done; it is sent in the next step's plan like any load;
  * slot mappings are built with numpy, never with a Python loop over tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


def slot_mapping(block_ids: np.ndarray, block_size: int, start: int, end: int) -> np.ndarray:
    """int64 slots of tokens [start, end) of a request whose blocks are `block_ids`."""
    tok = np.arange(start, end, dtype=np.int64)                                  # [end - start]
    if tok.size and tok[-1] // block_size >= len(block_ids):
        raise ValueError(f"slot_mapping: token {end - 1} needs block {tok[-1] // block_size}, "
                         f"the request has {len(block_ids)} blocks")
    return block_ids[tok // block_size] * block_size + tok % block_size          # [end - start]


def servable_tokens(prompt_len: int, chunk_size: int, block_size: int, tails: bool = False) -> int:
    """Most prompt tokens a hit may cover: the full chunks, the last of them cut to whole blocks
    when it would leave no prompt token to compute; with tail chunks, every whole block before
    the prompt's last token."""
    if tails:
        return max(0, prompt_len - 1) // block_size * block_size
    n = prompt_len // chunk_size
    if n * chunk_size <= prompt_len - 1:
        return n * chunk_size
    return max(0, (n - 1) * chunk_size, (prompt_len - 1) // block_size * block_size)


def load_between_steps(load_s: float, others: int, step_s: float) -> bool:
    """Whether a hit's load should run between engine steps (vLLM's async KV load) rather than
    in the step that schedules its request (`prefetch: auto`).

    In the step, its `others` requests wait for the load (the forward pass starts after it):
    they lose `others * load_s` together. Between steps, the step runs at once and the request
    itself waits about one step longer than its load (its blocks are reported at the end of a
    step, it is scheduled in the next): it loses about `step_s`. So load between steps when
    `others * load_s > step_s`; alone in the engine (others == 0) there is nothing to overlap.
    `load_s` 0 (no slow load measured yet) keeps the load in the step, which measures it.
    It assumes the load does not slow the step: true where the forward pass runs on an
    accelerator; on a CPU engine the load competes for the same cores (the connector then
    keeps loads in the step)."""
    return others > 0 and others * load_s > step_s


@dataclass
class LoadSpec:
    """Load the request's cached chunks covering tokens [start, end) into `slots`; then release
    the request's pins. `failed`: the load could not be planned; the worker loads nothing and
    reports `blocks` (those of [start, end) the request has) invalid, so vLLM recomputes them."""
    req_id: str
    start: int
    end: int
    slots: np.ndarray       # int64 [end - start]
    failed: bool = False
    blocks: np.ndarray | None = None
    background: bool = False    # vLLM's async load: run off the step, report it done later


@dataclass
class StoreSpec:
    """Store full chunks [first_chunk, last_chunk) of the request; `slots` cover their tokens.
    With `tail_blocks` > 0 it is the prompt's tail instead: that many whole blocks of chunk
    `first_chunk` (== last_chunk), `slots` covering their tokens."""
    req_id: str
    first_chunk: int
    last_chunk: int
    slots: np.ndarray       # int64 [(last_chunk - first_chunk) * chunk_size | tail_blocks * bs]
    tail_blocks: int = 0


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    release: list[str] = field(default_factory=list)    # drop these requests' pins (no load)
    finished: list[str] = field(default_factory=list)   # forget these requests entirely


@dataclass
class RequestTracker:
    req_id: str
    prompt_len: int
    num_chunks: int                   # full prompt chunks
    tail_len: int = 0                 # whole blocks past them to store as a tail chunk (tails)
    hit_chunks: int = 0               # leading chunks the lookup found (and the worker pinned)
    hit_tail: int = 0                 # blocks of the tail chunk found after them (pinned too)
    hit_tokens: int = 0               # what they serve (`servable_tokens` caps the last one)
    matched_from: int = 0             # num_computed vLLM passed with the lookup: loads start here
    load: tuple[int, int] | None = None                 # token range to load, once allocated
    block_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    stored_chunks: int = 0            # chunks [0, stored_chunks) are present or planned
    tail_planned: bool = False        # the tail chunk's store is planned (or there is none)
    counted: bool = False             # lookup metrics recorded once per request
    pinned: bool = False              # the worker holds this request's hit pinned (not yet allocated)
    accepted: int = 0                 # external tokens vLLM last accepted to load
    miss: tuple[str, str] = ("never_stored", "")    # why the first chunk past the hit missed
    background: bool = False          # the hit is loaded between steps (a slow tier holds it)

    @property
    def done(self) -> bool:
        return self.stored_chunks >= self.num_chunks and self.tail_planned and self.load is None


Lookup = Callable[[str, Sequence[int], int, int, Sequence[tuple[str, str]]], tuple[int, int]]
"""lookup(req_id, prompt, max_chunks, skip_chunks, identity) -> (chunks present among the first
max_chunks, blocks of a tail chunk present right after them), keyed under the request's
identity; the cache pins those beyond skip_chunks (and the tail) for this request before
counting them."""


class Planner:
    """Scheduler-side state of the connector. The cache (in the worker) owns keys and pins per
    request; the planner owns token ranges, block ids and what to tell the worker each step."""

    def __init__(self, chunk_size: int, block_size: int, lookup: Lookup,
                 load_enabled: bool = True, store_enabled: bool = True, tails: bool = False):
        assert chunk_size > 0 and block_size > 0
        assert not tails or chunk_size % block_size == 0, "tail chunks are whole blocks of a chunk"
        self.chunk_size, self.block_size = chunk_size, block_size
        self.tails = tails
        self._lookup = lookup
        self.load_enabled, self.store_enabled = load_enabled, store_enabled
        self.requests: dict[str, RequestTracker] = {}
        self._release: list[str] = []
        self._finished: list[str] = []
        self._background: list[LoadSpec] = []     # loads planned at allocation, sent next step
        self.errors = 0                   # plans that failed (logged; recomputed or not stored)
        self.reused_lookups = 0           # repeated lookups answered from the pinned first answer

    # ---- lookup (get_num_new_matched_tokens) ----------------------------------------------------
    def match(self, req_id: str, prompt: Sequence[int], num_computed: int,
              identity: Sequence[tuple[str, str]] = ()) -> tuple[int, int]:
        """Returns (tokens to load beyond `num_computed`, hit tokens)."""
        cs = self.chunk_size
        t = self.requests.get(req_id)
        if t is not None and t.pinned and t.matched_from == num_computed:
            self.reused_lookups += 1
        else:
            if t is None:
                t = self.requests[req_id] = self._track(req_id, len(prompt))
            t.load = None
            t.background = False
            t.matched_from = num_computed
            servable = self.servable(t.prompt_len)
            wanted = -(-servable // cs) if self.load_enabled else 0
            # Always ask (also with nothing to load): the cache keys the prompt for later stores.
            t.hit_chunks, t.hit_tail = self._lookup(req_id, prompt, wanted, num_computed // cs,
                                                    identity)
            if not self.tails:
                t.hit_tail = 0
            t.hit_tokens = min(t.hit_chunks * cs + t.hit_tail * self.block_size, servable)
            t.pinned = t.hit_chunks > num_computed // cs or t.hit_tail > 0
        return max(0, t.hit_tokens - num_computed), t.hit_tokens

    def servable(self, prompt_len: int) -> int:
        return servable_tokens(prompt_len, self.chunk_size, self.block_size, self.tails)

    def _track(self, req_id: str, prompt_len: int) -> RequestTracker:
        cs = self.chunk_size
        n = prompt_len // cs
        tail = (prompt_len - n * cs) // self.block_size if self.tails and self.store_enabled else 0
        return RequestTracker(req_id, prompt_len, n, tail_len=tail, tail_planned=tail == 0)

    # ---- allocation (update_state_after_alloc) --------------------------------------------------
    def allocated(self, req_id: str, num_external: int,
                  block_ids: Sequence[int] | None = None) -> None:
        """The scheduler accepted `num_external` tokens to load, starting where the lookup's
        `num_computed` ended (vLLM's definition; it may have trimmed the hit's end). For a
        `background` load, `block_ids` are the request's blocks: it is planned now."""
        t = self.requests.get(req_id)
        if t is None:
            return
        t.pinned = False        # from here the pins are the load's (or released below)
        t.accepted = max(0, num_external)
        if num_external <= 0:
            # also without a hit: a lookup answered after its timeout may still have pinned
            self._release.append(req_id)
            return
        start = t.matched_from
        end = start + num_external
        if end > t.hit_tokens:
            # never asked for by this planner; loaded as far as the cache has it, the rest fails
            # to load and is recomputed (the worker reports its blocks invalid)
            self.errors += 1
            log.error("lmcache_lab: request %s: vLLM accepted %d external tokens from %d, beyond "
                      "the hit of %d", req_id, num_external, start, t.hit_tokens)
        t.load = (start, end)
        if t.background:
            t.block_ids = np.asarray(block_ids, dtype=np.int64)
            n = len(self._background)
            self._plan_safely(t, start, 0, StepPlan(loads=self._background))
            for spec in self._background[n:]:
                spec.background = True

    # ---- per step (build_connector_meta) --------------------------------------------------------
    def step(self, new_reqs: Sequence[tuple[str, Sequence[int], int]],
             cached_reqs: Sequence[tuple[str, Sequence[int] | None, bool, int]],
             num_scheduled: dict[str, int]) -> StepPlan:
        """`new_reqs`: (req_id, block_ids, num_computed_tokens); `cached_reqs`: (req_id,
        new_block_ids or None, resumed (block ids replace), num_computed_tokens)."""
        plan = StepPlan(loads=self._background, release=self._release, finished=self._finished)
        self._release, self._finished, self._background = [], [], []
        for req_id, block_ids, num_computed in new_reqs:
            t = self.requests.get(req_id)
            if t is None:
                continue
            t.block_ids = np.asarray(block_ids, dtype=np.int64)
            self._plan_safely(t, num_computed, num_scheduled.get(req_id, 0), plan)
        for req_id, new_blocks, resumed, num_computed in cached_reqs:
            t = self.requests.get(req_id)
            if t is None:
                continue
            if resumed:
                t.block_ids = np.asarray(new_blocks or [], dtype=np.int64)
            elif new_blocks:
                t.block_ids = np.concatenate([t.block_ids, np.asarray(new_blocks, dtype=np.int64)])
            if t.done and num_computed >= t.stored_chunks * self.chunk_size:
                continue                      # decoding: nothing left to plan (the common case)
            self._plan_safely(t, num_computed, num_scheduled.get(req_id, 0), plan)
        return plan

    def _plan_safely(self, t: RequestTracker, num_computed: int, scheduled: int, plan: StepPlan) -> None:
        """`_plan`, but a request whose plan fails (a bug, or an engine change) costs a recompute
        of its pending load and no stores this step; never an exception in the scheduler."""
        load = t.load
        n_loads, n_stores = len(plan.loads), len(plan.stores)
        try:
            self._plan(t, num_computed, scheduled, plan)
        except Exception:
            self.errors += 1
            log.exception("lmcache_lab: planning request %s failed; its load is recomputed and "
                          "this step stores nothing of it", t.req_id)
            del plan.loads[n_loads:], plan.stores[n_stores:]
            t.load = None
            if load is not None:
                start, end = load
                bs = self.block_size
                blocks = t.block_ids[start // bs:-(-end // bs)]
                plan.loads.append(LoadSpec(t.req_id, start, end, np.zeros(0, dtype=np.int64),
                                           failed=True, blocks=blocks))

    def _plan(self, t: RequestTracker, num_computed: int, scheduled: int, plan: StepPlan) -> None:
        cs = self.chunk_size
        if num_computed < t.stored_chunks * cs and num_computed < t.prompt_len:
            # vLLM rolled the request back (a failed load, or preemption): the chunks from here
            # on are computed again, so plan them again (present ones are skipped by the worker)
            t.stored_chunks = num_computed // cs
        if num_computed < t.prompt_len and t.tail_len:
            t.tail_planned = False                # (again) once the prompt is computed
        # chunks below the hit are in the cache already; so is anything this step loads
        t.stored_chunks = max(t.stored_chunks, min(t.hit_chunks, num_computed // cs))
        if t.load is not None:
            start, end = t.load
            plan.loads.append(LoadSpec(t.req_id, start, end,
                                       slot_mapping(t.block_ids, self.block_size, start, end)))
            t.load = None
            t.stored_chunks = max(t.stored_chunks, end // cs)
        if not self.store_enabled:
            t.stored_chunks = t.num_chunks
            return
        done = min(num_computed + scheduled, t.prompt_len) // cs
        if done > t.stored_chunks:
            c0 = t.stored_chunks
            plan.stores.append(StoreSpec(t.req_id, c0, done,
                                         slot_mapping(t.block_ids, self.block_size, c0 * cs, done * cs)))
            t.stored_chunks = done
        if not t.tail_planned and num_computed + scheduled >= t.prompt_len:
            n, a = t.num_chunks, t.num_chunks * cs
            b = a + t.tail_len * self.block_size
            if not (t.hit_chunks == n and t.hit_tail >= t.tail_len):   # else it was a hit
                plan.stores.append(StoreSpec(t.req_id, n, n, slot_mapping(t.block_ids, self.block_size, a, b),
                                             tail_blocks=t.tail_len))
            t.tail_planned = True

    # ---- end of a request (request_finished) ----------------------------------------------------
    def finished(self, req_id: str) -> None:
        if self.requests.pop(req_id, None) is not None:
            self._finished.append(req_id)
