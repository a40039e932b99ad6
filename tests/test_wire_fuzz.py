"""Property-based fuzzing of everything that reads a stored value: `wire.decode`,
`chunk_check.check_value`, and the Redis and disk tiers' read paths.

Hostile inputs: arbitrary bytes, and values built to pass the cheap checks (a correct checksum,
optionally a correct MAC) so the header parser and the tensor layout code are reached with
arbitrary JSON, huge or negative declared sizes, unknown dtypes, many dimensions, truncations and
wrong header lengths. Properties:
  * `wire.decode` raises only `WireError`, and allocates no more than the input's size (traced)
    whatever the header declares; `check_value` never raises;
  * with a MAC key, nothing is accepted that was not tagged with it;
  * at tier level every value not written with the secret is a miss, counted in `stats.corrupt`,
    and removed.

The suite runs a bounded number of examples; `LMCACHE_LAB_FUZZ=long` runs many more (see
docs/security.md), e.g. `LMCACHE_LAB_FUZZ=long pytest -q tests/test_wire_fuzz.py`.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmcache_lab import wire
from lmcache_lab.config import RedisTierConfig
from lmcache_lab.policies import make_policy
from lmcache_lab.tiers.chunk_check import check_value, layout_of, value_cap
from lmcache_lab.tiers.disk import DiskTier

LONG = os.environ.get("LMCACHE_LAB_FUZZ") == "long"
FUZZ = settings(max_examples=20_000 if LONG else 150, deadline=None, derandomize=not LONG,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEY = hashlib.sha256(b"fuzzed chunk").digest()
MAC = wire.mac_key(b"fuzz store secret, 32 bytes long")
KV = {"kv": torch.arange(2 * 4 * 8, dtype=torch.float32).reshape(2, 4, 8).bfloat16()}
LAYOUT = layout_of(KV)
CAP = value_cap(LAYOUT, 0)
TRACE_SLACK = 256 * 1024   # JSON parsing and small objects; nothing sized by a declared field

# ---- hostile values ---------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=24)
dims = st.lists(st.one_of(st.integers(-3, 64), st.integers(-2**63, 2**63), st.sampled_from([2**31, 2**40, 2**62])),
                max_size=70)
tensors = st.lists(st.fixed_dictionaries({
    "name": st.one_of(st.sampled_from(["kv", "k"]), st.text(max_size=4)),
    "dtype": st.one_of(st.sampled_from(sorted(wire.DTYPES)),
                       st.sampled_from(["bool", "float64", "complex64", "", "torch.float32"]), json_values),
    "shape": st.one_of(st.just([2, 4, 8]), dims, json_values)}), max_size=4)
headers = st.one_of(
    st.fixed_dictionaries({"key": st.one_of(st.just(KEY.hex()), st.text(max_size=70), json_values),
                           "parent": st.one_of(st.none(), st.just("ab" * 32), json_values),
                           "position": st.one_of(st.integers(), st.floats(), st.text(max_size=5)),
                           "tensors": st.one_of(tensors, json_values)}).map(json.dumps),
    json_values.map(json.dumps),
    st.integers(1, 60_000).map(lambda n: "[" * n + "]" * n),          # nesting past the recursion limit
    st.text(max_size=200),
).map(lambda text: text.encode("utf-8", "surrogatepass"))


@st.composite
def crafted(draw) -> bytes:
    """A value that passes the checksum (and, for `tag=right`, the MAC) unless told otherwise."""
    header = draw(headers)
    payload = draw(st.one_of(st.binary(max_size=300), st.just(bytes(128))))
    tag_mode = draw(st.sampled_from(["none", "right", "wrong"]))
    signed = struct.pack("<4sHI", wire.MAGIC, draw(st.sampled_from([wire.VERSION, wire.VERSION, 1, 65535])),
                         len(header))
    tag = {"none": wire.NO_TAG, "wrong": draw(st.binary(min_size=32, max_size=32)),
           "right": hmac.new(MAC, signed + header + payload, "sha256").digest()}[tag_mode]
    body = header + tag + payload
    value = signed + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") + body
    hlen = draw(st.one_of(st.none(), st.integers(0, 2**32 - 1)))
    if hlen is not None:                                              # a lying header length
        value = value[:6] + struct.pack("<I", hlen) + value[10:]
    cut = draw(st.one_of(st.none(), st.integers(0, len(value))))
    return value if cut is None else value[:cut]                      # truncated anywhere


def valid_tampered(data: st.DataObject) -> bytes:
    """A genuine value of this deployment with one byte changed (checksum fixed up, as anyone can)."""
    good = bytearray(wire.encode(KEY, KV, mac_key=MAC))
    pos = data.draw(st.integers(wire._PREFIX.size, len(good) - 1))
    good[pos] ^= data.draw(st.integers(1, 255))
    good[10:18] = xxhash.xxh3_64_intdigest(bytes(good[wire._PREFIX.size:])).to_bytes(8, "little")
    return bytes(good)


hostile = st.one_of(st.binary(max_size=2048), crafted())


def authentic(value: bytes) -> bool:
    """A well-formed value of KEY tagged with MAC: what a holder of the secret writes. `crafted`
    makes some (tag=right); the tiers may return them, so the tier properties skip them."""
    try:
        wire.decode(value, expected_key=KEY, mac_key=MAC)
        return True
    except wire.WireError:
        return False


# ---- decode and check_value -------------------------------------------------------------------------
def decode_traced(value: bytes, **kw) -> tuple[wire.ChunkRecord | None, int]:
    """(record or None for a WireError, peak bytes traced during the call)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        return wire.decode(value, **kw), tracemalloc.get_traced_memory()[1]
    except wire.WireError:
        return None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@FUZZ
@given(value=hostile, mac=st.sampled_from([None, MAC]), key=st.sampled_from([None, KEY]))
def test_decode_raises_only_wire_errors_and_allocates_at_most_the_input(value, mac, key):
    record, peak = decode_traced(value, expected_key=key, max_payload=CAP, mac_key=mac)
    assert peak <= len(value) + TRACE_SLACK
    if record is not None:
        declared = sum(t.nbytes for t in record.tensors.values())
        assert declared <= len(value)                                  # every byte it covers exists


@FUZZ
@given(value=hostile, mac=st.sampled_from([None, MAC]))
def test_check_value_never_raises_and_accepts_only_the_expected_layout(value, mac):
    tensors, why = check_value(value, KEY, CAP, LAYOUT, mac)
    assert (tensors is None) != (why is None)
    if tensors is not None:
        assert layout_of(tensors) == LAYOUT


@FUZZ
@given(data=st.data())
def test_with_a_mac_key_no_altered_byte_is_accepted(data):
    tensors, why = check_value(valid_tampered(data), KEY, CAP, LAYOUT, MAC)
    assert tensors is None and why


def test_huge_declared_sizes_are_refused_before_any_allocation():
    """(A shape with a zero dimension declares no bytes: it decodes, to an empty tensor.)"""
    for shape in ([2**62], [2**31, 2**31], [2**40, 2**40, 2**40], [-1, -1], [2**63, -2], [1] * 70):
        header = json.dumps({"key": KEY.hex(), "parent": None, "position": 0,
                             "tensors": [{"name": "kv", "dtype": "float32", "shape": shape}]}).encode()
        signed = struct.pack("<4sHI", wire.MAGIC, wire.VERSION, len(header))
        tag = hmac.new(MAC, signed + header, "sha256").digest()
        body = header + tag
        value = signed + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") + body
        record, peak = decode_traced(value, expected_key=KEY, mac_key=MAC)
        assert record is None and peak <= len(value) + TRACE_SLACK, shape


# ---- the tiers' read paths ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def disk_tier(tmp_path_factory):
    tier = DiskTier(tmp_path_factory.mktemp("disk"), 64 * 2**20, make_policy("lru"), mac_key=MAC)
    yield tier
    tier.close()


@FUZZ
@given(value=hostile)
def test_disk_reads_of_hostile_files_are_counted_misses_and_removed(disk_tier, value):
    assume(not authentic(value))
    path = Path(disk_tier._path(KEY))
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(value)
    before = (disk_tier.stats.misses, disk_tier.stats.corrupt)
    assert disk_tier.get(KEY) is None
    assert (disk_tier.stats.misses, disk_tier.stats.corrupt) == (before[0] + 1, before[1] + 1)
    assert not path.exists()


def test_a_disk_file_beyond_the_read_cap_is_never_read(tmp_path):
    tier = DiskTier(tmp_path, 2**20, make_policy("lru"), mac_key=MAC)
    try:
        path = Path(tier._path(KEY))
        path.parent.mkdir()
        with open(path, "wb") as fh:                 # sparse: 1 TiB declared, nothing stored
            fh.write(wire.encode(KEY, KV, mac_key=MAC)[:wire._PREFIX.size])
            fh.truncate(2**40)
        tracemalloc.start()
        try:
            assert tier.get(KEY) is None
            assert tracemalloc.get_traced_memory()[1] < TRACE_SLACK
        finally:
            tracemalloc.stop()
        assert tier.stats.corrupt == 1 and not path.exists()
    finally:
        tier.close()


@pytest.fixture(scope="module")
def redis_tiers(tmp_path_factory):
    """Two tiers with the MAC key on one real redis-server: one that knows the chunk layout (the
    read cap is then one chunk), one that does not (the cap is max_chunk_bytes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
    from redis_servers import REDIS_CLI, REDIS_SERVER, RedisProcess
    from lmcache_lab.tiers.redis import RedisTier

    if not (REDIS_SERVER and REDIS_CLI):
        pytest.skip("redis-server/redis-cli not installed (run scripts/setup.sh)")
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    config = RedisTierConfig(url=server.url, timeout_s=5.0)
    tiers = [RedisTier(config, expected=KV, mac_key=MAC), RedisTier(config, mac_key=MAC)]
    yield tiers
    for tier in tiers:
        tier.close()
    server.kill()


@pytest.mark.redis
@FUZZ
@given(value=hostile, which=st.sampled_from([0, 1]))
def test_redis_reads_of_hostile_values_are_counted_misses_and_removed(redis_tiers, value, which):
    assume(not authentic(value))
    tier = redis_tiers[which]
    rkey = tier.redis_key(KEY)
    raw = tier.backend.masters()[0][1]
    raw.set(rkey, value)
    before = (tier.stats.misses, tier.stats.corrupt)
    assert tier.get(KEY) is None
    corrupt = 1 if value else 0                      # an empty string reads as absent
    assert (tier.stats.misses, tier.stats.corrupt) == (before[0] + 1, before[1] + corrupt)
    assert raw.exists(rkey) == (0 if value else 1)   # GETRANGE cannot tell empty from absent
