"""Workloads: deterministic generators of timed requests with real prefix structure.

Every generator returns a list of `Request`s sorted by `arrival_s`, built only from its arguments
and `seed` (numpy's PCG64), so the arms of one run and the runs of a sweep see identical prompts.
Prompts are token ids in `[FIRST_ID, vocab_size)` (ids below `FIRST_ID` are the tokenizer's
special tokens); the engine receives them as ids, so no tokenizer round trip can change them.

  multi_round_qa  N users x R rounds; prompt(u, r) = system + sum_{k<r}(question_uk + answer_uk)
                  + question_ur, so prompt(u, r-1) is a prefix of prompt(u, r) and the system
                  prompt is a prefix of every prompt. Round r of a user waits for round r-1 to
                  finish (`after`), like a person reading the answer. The history holds a seeded
                  synthetic answer of `answer_tokens` (not the model's text) so all arms see the
                  same prompts.
  long_doc_qa     D documents of L tokens, Q questions each; prompt = document + question. Order
                  `interleaved` (pass q asks every document once), `grouped` (a document's
                  questions back to back) or `random`. `miss_fraction` of the requests ask about a
                  fresh one-off document (a guaranteed miss).
  multi_tenant    T tenants, each with its own system prompt and a Zipf share of the sessions; a
                  session is a chat (turns until a stop with probability `chat_stop` per turn,
                  each turn = history + question, history grows by question + answer, next turn
                  after an exponential think time) or, with probability `oneoff_fraction`, a
                  single request carrying a long one-off document after the system prompt.
                  Sessions start as a Poisson process; turns of all sessions interleave by time.
                  `to_mooncake` turns it into a Mooncake trace for the replay.
  trace           a Mooncake trace (see `trace.py`) turned into prompts: block id -> a fixed block
                  of `block_tokens * token_scale` tokens drawn from (seed, id), so equal ids give
                  equal tokens and a shared id prefix gives a shared token prefix; arrival times
                  are multiplied by `time_scale`.

Arrivals: `qps` requests per second, `arrival: poisson` (exponential gaps) or `uniform` (equal
gaps); `qps: null` sends every request at time 0 (the driver's concurrency limit then paces them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

FIRST_ID = 3   # <s>, </s>, <unk> of the built-in tokenizer


@dataclass(frozen=True)
class Request:
    """One request of a workload.

    index: position in the workload (0..n-1, equal to the list position)
    arrival_s: when it may be sent, seconds after the run starts (non-decreasing in index)
    prompt: token ids
    max_tokens: tokens to generate (EOS is ignored, so exactly this many)
    after: index of a request that must finish before this one is sent, or None
    group: the user / document / trace session it belongs to
    round: the round of its user (multi_round_qa), question number (long_doc_qa), else 0
    """
    index: int
    arrival_s: float
    prompt: tuple[int, ...]
    max_tokens: int
    after: int | None = None
    group: str = ""
    round: int = 0

    def __post_init__(self):
        assert self.arrival_s >= 0 and self.max_tokens >= 1 and len(self.prompt) >= 1
        assert self.after is None or self.after < self.index


def arrival_times(n: int, qps: float | None, arrival: str, rng: np.random.Generator) -> np.ndarray:
    """`n` non-decreasing send times (seconds) at `qps` requests per second."""
    if qps is None:
        return np.zeros(n)
    if qps <= 0:
        raise ValueError(f"workload.qps: must be > 0 or null, got {qps!r}")
    if arrival == "uniform":
        return np.arange(n) / qps
    if arrival == "poisson":
        gaps = rng.exponential(1.0 / qps, size=n)
        gaps[0] = 0.0
        return np.cumsum(gaps)
    raise ValueError(f"workload.arrival: {arrival!r} is not allowed; choose one of poisson, uniform")


def _tokens(rng: np.random.Generator, n: int, vocab_size: int) -> tuple[int, ...]:
    if vocab_size <= FIRST_ID + 1:
        raise ValueError(f"vocab_size must exceed {FIRST_ID + 1}, got {vocab_size}")
    return tuple(int(t) for t in rng.integers(FIRST_ID, vocab_size, size=n))


def _finish(rows: list[dict], qps, arrival, rng) -> list[Request]:
    times = arrival_times(len(rows), qps, arrival, rng)
    return [Request(index=i, arrival_s=float(t), **row) for i, (t, row) in enumerate(zip(times, rows))]


def multi_round_qa(users: int = 4, rounds: int = 4, system_tokens: int = 1024,
                   question_tokens: int = 64, answer_tokens: int = 32, qps: float | None = 2.0,
                   arrival: str = "poisson", *, vocab_size: int, seed: int = 0) -> list[Request]:
    """Chat sessions sharing a system prompt; requests ordered round by round across users."""
    if users < 1 or rounds < 1:
        raise ValueError(f"workload.users and workload.rounds must be >= 1, got {users}, {rounds}")
    rng = np.random.default_rng([seed, 1])
    system = _tokens(rng, system_tokens, vocab_size)
    history = {u: system for u in range(users)}
    index_of: dict[tuple[int, int], int] = {}
    rows: list[dict] = []
    for r in range(rounds):
        for u in range(users):
            question = _tokens(rng, question_tokens, vocab_size)
            answer = _tokens(rng, answer_tokens, vocab_size)
            index_of[(u, r)] = len(rows)
            rows.append(dict(prompt=history[u] + question, max_tokens=max(1, answer_tokens),
                             after=index_of.get((u, r - 1)), group=f"user{u}", round=r))
            history[u] = history[u] + question + answer
    return _finish(rows, qps, arrival, rng)


def long_doc_qa(documents: int = 6, doc_tokens: int = 2048, questions_per_doc: int = 3,
                question_tokens: int = 32, answer_tokens: int = 8, order: str = "interleaved",
                miss_fraction: float = 0.0, qps: float | None = None, arrival: str = "poisson", *,
                vocab_size: int, seed: int = 0) -> list[Request]:
    """Questions about long documents; `miss_fraction` of requests hit a fresh document."""
    if order not in ("interleaved", "grouped", "random"):
        raise ValueError(f"workload.order: {order!r} is not allowed; choose one of interleaved, grouped, random")
    if not 0 <= miss_fraction < 1:
        raise ValueError(f"workload.miss_fraction: must be in [0, 1), got {miss_fraction!r}")
    rng = np.random.default_rng([seed, 2])
    docs = [_tokens(rng, doc_tokens, vocab_size) for _ in range(documents)]
    pairs = [(d, q) for q in range(questions_per_doc) for d in range(documents)]
    if order == "grouped":
        pairs.sort()
    elif order == "random":
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    rows = [dict(prompt=docs[d] + _tokens(rng, question_tokens, vocab_size),
                 max_tokens=max(1, answer_tokens), group=f"doc{d}", round=q) for d, q in pairs]
    misses = int(round(miss_fraction * len(rows) / (1 - miss_fraction)))
    for m in range(misses):
        pos = int(rng.integers(0, len(rows) + 1))
        rows.insert(pos, dict(prompt=_tokens(rng, doc_tokens + question_tokens, vocab_size),
                              max_tokens=max(1, answer_tokens), group=f"fresh{m}", round=0))
    return _finish(rows, qps, arrival, rng)


def multi_tenant(tenants: int = 8, sessions: int = 1500, zipf: float = 1.1, system_tokens: tuple = (256, 1024),
                 question_tokens: tuple = (32, 160), answer_tokens: tuple = (64, 256), chat_stop: float = 0.3,
                 oneoff_fraction: float = 0.5, oneoff_tokens: tuple = (1024, 4096), session_rate: float = 1.0,
                 think_s: float = 60.0, max_tokens: int = 8, *, vocab_size: int, seed: int = 0) -> list[Request]:
    """Multi-tenant, multi-session chat mixed with one-off long-context requests (see the module
    docstring). Token ranges are inclusive-exclusive uniform draws (low, high). `group` is
    `t<tenant>/s<session>`, `round` the turn; a turn waits for the previous one (`after`)."""
    if tenants < 1 or sessions < 1:
        raise ValueError(f"workload.tenants and workload.sessions must be >= 1, got {tenants}, {sessions}")
    if not 0 < chat_stop <= 1 or not 0 <= oneoff_fraction <= 1:
        raise ValueError(f"workload.chat_stop must be in (0, 1] and oneoff_fraction in [0, 1], "
                         f"got {chat_stop}, {oneoff_fraction}")
    if session_rate <= 0 or think_s < 0:
        raise ValueError(f"workload.session_rate must be > 0 and think_s >= 0, got {session_rate}, {think_s}")
    import heapq

    rng = np.random.default_rng([seed, 4])

    def draw(bounds):
        return int(rng.integers(bounds[0], bounds[1]))

    systems = [_tokens(rng, draw(system_tokens), vocab_size) for _ in range(tenants)]
    share = 1.0 / np.arange(1, tenants + 1) ** zipf
    owners = rng.choice(tenants, size=sessions, p=share / share.sum())
    starts = np.cumsum(rng.exponential(1.0 / session_rate, size=sessions))
    # (time, session, turn, history) of each session's next request
    events = [(float(starts[i]), i, 0, systems[owners[i]]) for i in range(sessions)]
    heapq.heapify(events)
    oneoff = rng.random(sessions) < oneoff_fraction
    rows, times, previous = [], [], {}     # previous: session -> index of its last request
    while events:
        t, i, turn, history = heapq.heappop(events)
        document = _tokens(rng, draw(oneoff_tokens), vocab_size) if oneoff[i] else ()
        prompt = history + document + _tokens(rng, draw(question_tokens), vocab_size)
        rows.append(dict(prompt=prompt, max_tokens=max(1, max_tokens), after=previous.get(i),
                         group=f"t{owners[i]}/s{i}", round=turn))
        times.append(t)
        previous[i] = len(rows) - 1
        if not oneoff[i] and rng.random() >= chat_stop:
            heapq.heappush(events, (t + float(rng.exponential(think_s)), i, turn + 1,
                                    prompt + _tokens(rng, draw(answer_tokens), vocab_size)))
    return [Request(index=k, arrival_s=float(times[k] - times[0]), **row) for k, row in enumerate(rows)]


def to_mooncake(requests: Sequence[Request], block_tokens: int = 64) -> list[dict]:
    """Mooncake trace records of `requests`: one id per `block_tokens` tokens, prefix-chained
    (ids are numbered in order of first appearance of (parent id, block tokens)), so two prompts
    share exactly the ids of their common whole blocks. Timestamps in ms from `arrival_s`."""
    ids: dict = {}
    out = []
    for r in requests:
        chain, parent = [], -1
        for start in range(0, len(r.prompt), block_tokens):
            parent = ids.setdefault((parent, r.prompt[start:start + block_tokens]), len(ids))
            chain.append(parent)
        out.append({"timestamp": int(round(r.arrival_s * 1000)), "input_length": len(r.prompt),
                    "output_length": r.max_tokens, "hash_ids": chain})
    return out


def write_mooncake(requests: Sequence[Request], path, block_tokens: int = 64) -> None:
    """`to_mooncake(requests)` as a JSON-lines trace file the replay and explain tools read."""
    import json

    with open(path, "w") as fh:
        for record in to_mooncake(requests, block_tokens):
            fh.write(json.dumps(record) + "\n")


def block_tokens_for(block_id: int, n: int, vocab_size: int, seed: int = 0) -> tuple[int, ...]:
    """The fixed tokens of trace block `block_id`: a function of (seed, id) only."""
    rng = np.random.default_rng([seed, 3, int(block_id) & (2**63 - 1)])
    return _tokens(rng, n, vocab_size)


def trace_prompt(hash_ids: Sequence[int], input_length: int, block_tokens: int, token_scale: float,
                 vocab_size: int, seed: int = 0) -> tuple[int, ...]:
    """Prompt of one trace record: its blocks' tokens, the last block cut to the scaled length.

    A block of `block_tokens` trace tokens becomes `b = max(1, round(block_tokens * token_scale))`
    tokens; the prompt has `ceil(input_length * token_scale)` tokens, at most `len(hash_ids) * b`."""
    b = max(1, int(round(block_tokens * token_scale)))
    n = max(1, min(len(hash_ids) * b, int(np.ceil(input_length * token_scale))))
    out: list[int] = []
    for i, bid in enumerate(hash_ids):
        if len(out) >= n:
            break
        out.extend(block_tokens_for(bid, b, vocab_size, seed)[: n - i * b])
    return tuple(out)


def trace(trace: str = "sample", block_tokens: int = 512, token_scale: float = 0.125,
          time_scale: float = 0.1, output_tokens: int = 8, max_prompt_tokens: int | None = 3968,
          limit: int | None = None, capacity_fraction=None, capacity_bytes=None, *,
          vocab_size: int, seed: int = 0) -> list[Request]:
    """A Mooncake trace as engine requests (`capacity_fraction`/`capacity_bytes` belong to the
    replay experiment and are not used here). Arrival = (timestamp - first) * time_scale / 1000.
    Prompts longer than `max_prompt_tokens` are cut (the engine's max_model_len bounds them)."""
    from lmcache_lab.experiments.trace import load_trace

    if token_scale <= 0 or time_scale < 0:
        raise ValueError(f"workload.token_scale must be > 0 and time_scale >= 0, got {token_scale}, {time_scale}")
    records = load_trace(trace, limit=limit)
    t0 = records[0].timestamp_ms if records else 0.0
    out = []
    for i, r in enumerate(records):
        prompt = trace_prompt(r.hash_ids, r.input_length, block_tokens, token_scale, vocab_size, seed)
        if max_prompt_tokens is not None:
            prompt = prompt[:max_prompt_tokens]
        out.append(Request(index=i, arrival_s=max(0.0, (r.timestamp_ms - t0) * time_scale / 1000.0),
                           prompt=prompt, max_tokens=max(1, output_tokens), group=f"b{r.hash_ids[0]}"))
    return out


def make_workload(wl_cfg, vocab_size: int, seed: int) -> list[Request]:
    """Build the workload named by `wl_cfg._target_` with the rest of `wl_cfg` as arguments."""
    import hydra.utils
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(wl_cfg, resolve=True) if OmegaConf.is_config(wl_cfg) else dict(wl_cfg)
    target = params.pop("_target_", None)
    if target is None:
        raise ValueError("workload: no _target_ (a generator in lmcache_lab.experiments.workloads)")
    params.pop("name", None)
    return hydra.utils.get_method(target)(**params, vocab_size=vocab_size, seed=seed)


if __name__ == "__main__":
    # python -m lmcache_lab.experiments.workloads OUT.jsonl [SEED]: a multi_tenant trace for the replay
    import sys

    write_mooncake(multi_tenant(vocab_size=32000, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0), sys.argv[1])
