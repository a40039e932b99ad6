"""Checks on chunk values read back from a shared store (no server needed)."""
from __future__ import annotations

import pytest
import torch
import xxhash

from lmcache_lab import wire
from lmcache_lab.tiers.chunk_check import LayoutGuard, check_value, layout_nbytes, layout_of, value_cap, within

KEY = b"\x07" * 16
KV = {"kv": torch.arange(2 * 4 * 8, dtype=torch.float32).reshape(2, 4, 8).bfloat16()}
LAYOUT = layout_of(KV)


def test_layout_and_caps():
    assert LAYOUT == (("kv", "bfloat16", (2, 4, 8)),)
    assert layout_nbytes(LAYOUT) == 128
    assert value_cap(LAYOUT, 10**9) == wire.OVERHEAD + wire.MAX_HEADER + 128
    assert value_cap(None, 1000) == wire.OVERHEAD + wire.MAX_HEADER + 1000


def test_a_valid_chunk_passes_with_or_without_a_known_layout():
    data = wire.encode(KEY, KV)
    for layout in (LAYOUT, None):
        tensors, why = check_value(data, KEY, value_cap(layout, 4096), layout)
        assert why is None and torch.equal(tensors["kv"], KV["kv"])


def test_each_kind_of_bad_value_is_refused_with_a_reason():
    good = wire.encode(KEY, KV)
    cap = value_cap(LAYOUT, 4096)
    cases = {
        "cap": good + b"\0" * (cap + 1 - len(good)),
        "checksum": good[:-1] + bytes([good[-1] ^ 1]),
        "truncated": good[:-5],
        "different key": wire.encode(b"\x08" * 16, KV),
        "layout": wire.encode(KEY, {"kv": KV["kv"].half()}),
        "payload": wire.encode(KEY, {"kv": torch.zeros(2, 4, 16, dtype=torch.bfloat16)}),
    }
    for name, data in cases.items():
        tensors, why = check_value(data, KEY, cap, LAYOUT)
        assert tensors is None and why, name



MAC = wire.mac_key(b"s" * 32)


def _forge(value: bytes, pos: int) -> bytes:
    """Flip byte `pos` and fix the unkeyed checksum up, as anyone who can write the store can."""
    out = bytearray(value)
    out[pos] ^= 1
    out[10:18] = xxhash.xxh3_64_intdigest(bytes(out[wire._PREFIX.size:])).to_bytes(8, "little")
    return bytes(out)


def test_with_a_mac_key_only_values_written_with_it_pass():
    cap = value_cap(LAYOUT, 4096)
    good = bytes(wire.encode(KEY, KV, mac_key=MAC))
    tensors, why = check_value(good, KEY, cap, LAYOUT, MAC)
    assert why is None and torch.equal(tensors["kv"], KV["kv"])
    cases = [
        ("written without a secret", wire.encode(KEY, KV), "no MAC"),
        ("written with another secret", wire.encode(KEY, KV, mac_key=wire.mac_key(b"t" * 32)), "wrong MAC"),
        ("tag byte changed", _forge(good, len(good) - 128 - 1), "wrong MAC"),   # the payload is 128 bytes
        ("header byte changed", _forge(good, wire._PREFIX.size + 10), "wrong MAC"),
        ("payload byte changed", _forge(good, len(good) - 1), "wrong MAC"),
    ]
    for name, data, expected in cases:
        tensors, why = check_value(bytes(data), KEY, cap, LAYOUT, MAC)
        assert tensors is None and why.startswith(expected), (name, why)


def test_a_reader_without_a_mac_key_refuses_tagged_values():
    tensors, why = check_value(bytes(wire.encode(KEY, KV, mac_key=MAC)), KEY, value_cap(LAYOUT, 0), LAYOUT)
    assert tensors is None and why.startswith("has a MAC")


FULL = (("kv", "float32", (6, 2, 65536)),)


@pytest.mark.parametrize("layout, ok", [
    (FULL, True),
    ((("kv", "float32", (6, 1, 65536)),), True),          # a tail: fewer blocks
    ((("kv", "float32", (6, 3, 65536)),), False),         # wider than a chunk
    ((("kv", "float32", (6, 0, 65536)),), False),         # empty
    ((("kv", "float32", (5, 1, 65536)),), False),         # shorter along two axes
    ((("kv", "bfloat16", (6, 1, 65536)),), False),        # another dtype
    ((("k", "float32", (6, 1, 65536)),), False),          # another tensor
    ((("kv", "float32", (6, 1, 65536, 1)),), False),      # another rank
    (FULL + FULL, False),                                 # more tensors
])
def test_a_tail_is_the_full_layout_shorter_along_one_axis(layout, ok):
    assert within(layout, FULL) is ok


def test_the_guard_learns_the_widest_of_its_own_writes_unless_fixed():
    tail, full = {"kv": torch.zeros(6, 1, 8)}, {"kv": torch.zeros(6, 2, 8)}
    g = LayoutGuard()
    assert g.refuse_write(tail) is None and g.layout == layout_of(tail)
    assert g.refuse_write(full) is None and g.layout == layout_of(full)    # widened
    assert g.refuse_write(tail) is None and g.layout == layout_of(full)
    assert "not a chunk of" in g.refuse_write({"kv": torch.zeros(5, 1, 8)})
    assert g.cap(1000) == value_cap(layout_of(full), 1000)
    fixed = LayoutGuard(full)
    assert fixed.cap(1000) == value_cap(layout_of(full), 1000)
    assert fixed.refuse_write(tail) is None and fixed.layout == layout_of(full)
    assert "not a chunk of" in fixed.refuse_write({"kv": torch.zeros(6, 3, 8)})
    key = b"k" * 16
    tensors, why = fixed.check(bytes(wire.encode(key, tail)), key, fixed.cap(1000))
    assert why is None and torch.equal(tensors["kv"], tail["kv"])
    tensors, why = fixed.check(bytes(wire.encode(key, {"kv": torch.zeros(6, 3, 8)})), key, 10**6)
    assert tensors is None and "not a chunk of" in why
