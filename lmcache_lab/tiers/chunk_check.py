"""Checks on a chunk value read back from a shared store, before anything trusts it.

A value from a store that other processes write (Redis) is hostile until proven otherwise. It is
accepted only if:
  * it is no larger than `cap` bytes (the caller also reads at most `cap + 1` bytes, so a hostile
    size never drives an allocation);
  * it decodes in the wire format (magic, version, header, checksum; never pickle) with a payload
    of at most `cap - fixed prefix - MAX_HEADER` bytes;
  * with the store's MAC key, its tag proves it was written by a holder of the same store secret
    (checked before the header is parsed);
  * its header names the key it was read under;
  * its tensors have the expected layout (names, dtypes, shapes), when one is known, or are a
    shorter chunk of it (a tail chunk: fewer blocks or tokens along one axis, `within`).
"""
from __future__ import annotations

import math
import threading

import torch

from lmcache_lab import wire

Layout = tuple[tuple[str, str, tuple[int, ...]], ...]


def layout_of(tensors: dict[str, torch.Tensor]) -> Layout:
    """(name, dtype name, shape) of each tensor, in order."""
    return tuple((name, wire._NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for name, t in tensors.items())


def layout_nbytes(layout: Layout) -> int:
    return sum(math.prod(shape) * wire.DTYPES[dtype].itemsize for _, dtype, shape in layout)


def value_cap(layout: Layout | None, max_payload: int) -> int:
    """Largest valid stored value: the exact payload when the layout is known, else `max_payload`,
    plus the fixed prefix and tag and the largest header."""
    payload = layout_nbytes(layout) if layout else max_payload
    return wire.OVERHEAD + wire.MAX_HEADER + payload


def check_value(data: bytes, key: bytes, cap: int, layout: Layout | None, mac_key: bytes | None = None
                ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(tensors, None) for a valid chunk stored under `key` (and authenticated by `mac_key` when
    given); (None, why) otherwise, never an exception. The tensors share `data`'s memory (no
    copy): pass a reply nothing else holds (`wire.decode`)."""
    if len(data) > cap:
        return None, f"larger than the {cap}-byte cap"
    try:
        payload_cap = cap - wire.OVERHEAD - wire.MAX_HEADER
        tensors = wire.decode(data, expected_key=key, max_payload=payload_cap, alias_readonly=True,
                              mac_key=mac_key).tensors
    except wire.WireError as e:
        return None, str(e)
    if layout is not None and layout_of(tensors) != layout:
        return None, f"layout {layout_of(tensors)} differs from the expected {layout}"
    return tensors, None


def within(layout: Layout, full: Layout) -> bool:
    """True when `layout` is `full`, or a shorter chunk of the same kind: the same tensors (names,
    dtypes, ranks), each of the same shape or shorter along one axis. A tail chunk (a prompt's
    whole blocks past its last full chunk) is such a chunk: fewer blocks or tokens, nothing else."""
    if len(layout) != len(full):
        return False
    for (name, dtype, shape), (full_name, full_dtype, full_shape) in zip(layout, full):
        if name != full_name or dtype != full_dtype or len(shape) != len(full_shape):
            return False
        shorter = [(n, f) for n, f in zip(shape, full_shape) if n != f]
        if len(shorter) > 1 or any(not 0 < n < f for n, f in shorter):
            return False
    return True


class LayoutGuard:
    """The chunk layout a shared tier writes and accepts: fixed by `expect` (the connector tells
    its full chunk), else learned from this instance's own writes and widened by them (a tail
    chunk written first is a shorter chunk of the same kind, `within`). A value is accepted when
    it is `within` the known layout; once a layout is known, reads are capped at its exact size.
    An instance that was never told the full layout and has written only tails refuses full
    chunks as foreign: tiers under the connector are always told. Thread-safe."""

    def __init__(self, expected: dict[str, torch.Tensor] | None = None):
        self._lock = threading.Lock()
        self.layout: Layout | None = layout_of(expected) if expected else None
        self.fixed = expected is not None

    def expect(self, example: dict[str, torch.Tensor]) -> None:
        with self._lock:
            self.layout, self.fixed = layout_of(example), True

    def accepts(self, layout: Layout) -> bool:
        known = self.layout
        return known is None or within(layout, known)

    def refuse_write(self, value: dict[str, torch.Tensor]) -> str | None:
        """Why `value` must not be written (None: write it; an unfixed layout learns from it)."""
        layout = layout_of(value)
        with self._lock:
            if self.layout is None or (not self.fixed and within(self.layout, layout)):
                self.layout = layout    # learned from our own data: trusted
            elif not within(layout, self.layout):
                return f"layout {layout} is not a chunk of {self.layout}; reads would refuse it"
        return None

    def cap(self, max_payload: int) -> int:
        return value_cap(self.layout, max_payload)

    def chunk_nbytes(self) -> int | None:
        """Payload bytes of the known layout (a full chunk's once fixed), or None."""
        return layout_nbytes(self.layout) if self.layout else None

    def check(self, data: bytes, key: bytes, cap: int, mac_key: bytes | None = None
              ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """`check_value` with this guard's layouts (`cap`: from `cap()`, as the read used)."""
        tensors, why = check_value(data, key, cap, None, mac_key)
        if tensors is not None and not self.accepts(layout_of(tensors)):
            return None, f"layout {layout_of(tensors)} is not a chunk of {self.layout}"
        return tensors, why
