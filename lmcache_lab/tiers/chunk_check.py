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
  * its tensors have the expected layout (names, dtypes, shapes), when one is known.
"""
from __future__ import annotations

import math

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
