"""The tier interface of a shared remote store, in terms of its three batch operations.

A remote store (Redis, S3) is asked in batches: one pipelined round trip, or concurrent requests,
per call. A subclass implements `exists_many`, `get_many` and `put_many`; the single-key and chain
operations of `BudgetedTier` are built on them here, so both stores keep the same prefix rule:
`prefix_length` and `put_chain` stop at the first missing or refused chunk (a child without its
parent would be an orphan).

Every batch operation a subclass defines is timed into `op_times` ("lookup", "get", "put"), here
and nowhere else, so every remote store reports the same latency histograms. Both check chunk
layouts the same way too (`layouts`, a `LayoutGuard` the subclass creates).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from lmcache_lab.tiers.base import BudgetedTier, Key, payload_nbytes
from lmcache_lab.tiers.chunk_check import LayoutGuard


def leading(flags) -> int:
    """How many leading `flags` are true."""
    n = 0
    for flag in flags:
        if not flag:
            break
        n += 1
    return n


TIMED = {"exists_many": "lookup", "get_many": "get", "put_many": "put"}   # method -> op_times kind


def _timed(op: str, method: Callable) -> Callable:
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        with self.op_times.timing(op):
            return method(self, *args, **kwargs)
    return timed


class RemoteTier(BudgetedTier):
    layouts: LayoutGuard        # the chunk layouts written and accepted (set by the subclass)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, op in TIMED.items():
            if name in vars(cls):
                setattr(cls, name, _timed(op, vars(cls)[name]))

    def exists_many(self, keys: Sequence[Key]) -> list[bool]:
        raise NotImplementedError

    def expect_layout(self, example: dict[str, Any]) -> None:
        """Fix the full chunk's layout (tensor names, dtypes, shapes): values that are neither it
        nor a shorter chunk of it (a tail) are misses, and the read cap becomes its exact size.
        Learned from this instance's writes otherwise (`LayoutGuard`)."""
        self.layouts.expect(example)

    def _refuse_write(self, value: dict[str, Any]) -> str | None:
        """Why a value must not be written (None: write it)."""
        if payload_nbytes(value) > self.config.max_chunk_bytes:
            return f"larger than max_chunk_bytes={self.config.max_chunk_bytes}"
        return self.layouts.refuse_write(value)

    def put_many(self, items: Sequence[tuple[Key, Any, Key | None, int]]) -> list[bool]:
        """Store (key, value, parent, position) items; per item whether it is stored after."""
        raise NotImplementedError

    def contains(self, key: Key) -> bool:
        return self.exists_many([key])[0]

    __contains__ = contains

    def prefix_length(self, keys: Sequence[Key]) -> int:
        """Leading keys present in the store, asked in one batch."""
        return leading(self.exists_many(list(keys)))

    def get(self, key: Key) -> Any | None:
        return self.get_many([key])[0]

    def put(self, key: Key, value: Any, parent: Key | None = None, position: int = 0) -> bool:
        return self.put_many([(key, value, parent, position)])[0]

    def put_chain(self, keys: Sequence[Key], values: Sequence[Any] | Any, parent: Key | None = None,
                  position: int = 0, step: int = 0) -> int:
        """One batch write of consecutive chunks of one prefix chain (`keys[i]`'s parent is
        `keys[i-1]`); returns how many leading keys are stored afterwards."""
        per_key = isinstance(values, (list, tuple))
        items = []
        for i, key in enumerate(keys):
            items.append((key, values[i] if per_key else values, parent, position + i * step))
            parent = key
        return leading(self.put_many(items))
