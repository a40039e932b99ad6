"""Request traces in the Mooncake format (FAST'25 release): one JSON object per line,

    {"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [block ids]}

one id per `block_tokens` (512) tokens of the prompt, prefix-chained: an id stands for its block
together with every block before it, so a prompt's cache hit is its leading run of cached ids.

A trace captured by the connector (`trace.path`, `lmcache_lab.observe.TraceWriter`) also holds
metadata lines `{"lmcache_lab_trace": {...}}` (`trace_meta` merges them): chunk_tokens (its
block size: the chunk size), block_size (the engine's KV block), chunk_bytes (stored size of one
chunk), policy and capacity_bytes of the capturing cache. Its `hash_ids` are the full prompt
chunks only (the partial tail is never cached).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lmcache_lab.observe import META_KEY

BLOCK_TOKENS = 512
SAMPLE = "sample"


@dataclass(frozen=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def last_block_tokens(self, block_tokens: int = BLOCK_TOKENS) -> int:
        """Tokens in the final (possibly partial) block of the prompt."""
        full = (len(self.hash_ids) - 1) * block_tokens
        return max(1, min(block_tokens, self.input_length - full))


def resolve_trace_path(path: str | None) -> Path:
    """`sample` (or None) is the small trace shipped with the package; anything else is a path."""
    if path in (None, "", SAMPLE):
        return Path(str(resources.files("lmcache_lab.experiments") / "data" / "sample_trace.jsonl"))
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"workload.trace: no such trace file: {p}")
    return p


def load_trace(path: str | None, limit: int | None = None) -> list[TraceRequest]:
    p = resolve_trace_path(path)
    out: list[TraceRequest] = []
    with open(p) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if META_KEY in r:
                    continue
                req = TraceRequest(float(r["timestamp"]), int(r["input_length"]),
                                   int(r["output_length"]), tuple(int(i) for i in r["hash_ids"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{p}:{lineno}: not a Mooncake trace record ({e})") from None
            out.append(req)
            if limit is not None and len(out) >= limit:
                break
    return out


def unique_blocks(requests: list[TraceRequest]) -> int:
    return len({i for r in requests for i in r.hash_ids})


def trace_meta(path: str | None) -> dict:
    """The metadata of a captured trace, later lines overriding earlier ones ({} for others)."""
    meta: dict = {}
    with open(resolve_trace_path(path)) as fh:
        for line in fh:
            if META_KEY in line:
                meta.update(json.loads(line)[META_KEY])
    return meta
