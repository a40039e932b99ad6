import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_lab import wire
from lmcache_lab.policies import POLICIES, make_policy
from lmcache_lab.tiers import DiskTier, MemoryTier, TieredStore


def kv(i: int, n: int = 16, dtype=torch.float32):
    return {"kv": torch.full((n,), float(i), dtype=dtype)}


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def make(kind, capacity, tmp_path, policy="lru"):
    if kind == "memory":
        return MemoryTier(capacity, make_policy(policy))
    return DiskTier(tmp_path / "disk", capacity, make_policy(policy))


@pytest.mark.parametrize("kind", ["memory", "disk"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "cost_aware"])
@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "get", "delete", "pin", "unpin"]),
                              st.integers(0, 12), st.integers(1, 40)), max_size=60))
def test_budget_is_never_exceeded_and_pins_hold(kind, policy, ops, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t")
    tier = make(kind, 600, tmp, policy)
    pins: dict[bytes, int] = {}
    for op, i, n in ops:
        k = key(i)
        if op == "put":
            tier.put(k, kv(i, n))
        elif op == "get":
            v = tier.get(k)
            assert v is None or torch.equal(v["kv"], kv(i, len(v["kv"]))["kv"])
        elif op == "delete" and k not in pins:
            tier.delete(k)
        elif op == "pin" and k in tier:
            tier.pin(k)
            pins[k] = pins.get(k, 0) + 1
        elif op == "unpin" and k in pins:
            tier.unpin(k)
            pins[k] -= 1
            if not pins[k]:
                del pins[k]
        assert tier.used_bytes <= tier.capacity_bytes
        assert all(p in tier for p in pins), "a pinned chunk was evicted"
        if kind == "disk":
            on_disk = sum(f.stat().st_size for f in (tmp / "disk").glob("*/*.kvc"))
            assert on_disk == tier.used_bytes


def test_put_refuses_oversized_and_all_pinned(tmp_path):
    tier = MemoryTier(100, make_policy("lru"))
    assert not tier.put(key(1), kv(1, 30))          # 120 bytes > budget
    assert tier.put(key(2), kv(2, 20))              # 80 bytes
    tier.pin(key(2))
    assert not tier.put(key(3), kv(3, 10))          # only a pinned victim left
    assert key(2) in tier and tier.stats.rejected == 2
    tier.unpin(key(2))
    assert tier.put(key(3), kv(3, 10)) and key(2) not in tier
    with pytest.raises(RuntimeError):
        tier.unpin(key(2))


def test_disk_tier_survives_restart(tmp_path):
    t1 = DiskTier(tmp_path, 10_000, make_policy("lru"))
    for i in range(3):
        t1.put(key(i), kv(i, 8, torch.bfloat16), parent=key(i - 1) if i else None)
    t2 = DiskTier(tmp_path, 10_000, make_policy("lru"))
    assert len(t2) == 3 and t2.used_bytes == t1.used_bytes
    got = t2.get(key(1))["kv"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, kv(1, 8, torch.bfloat16)["kv"])
    # parent links come back from the headers: the chain still evicts tail first
    assert t2.policy.victim() == key(2)


def test_disk_restart_with_smaller_budget_evicts_to_fit(tmp_path):
    t1 = DiskTier(tmp_path, 10_000, make_policy("lru"))
    for i in range(5):
        t1.put(key(i), kv(i, 64))
    size = t1.used_bytes // 5
    t2 = DiskTier(tmp_path, 2 * size, make_policy("lru"))
    assert len(t2) == 2 and t2.used_bytes <= 2 * size
    assert len(list(tmp_path.glob("*/*.kvc"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "foreign_key", "garbage"])
def test_damaged_disk_file_is_a_counted_miss_and_removed(tmp_path, damage):
    tier = DiskTier(tmp_path, 10_000, make_policy("lru"))
    tier.put(key(1), kv(1, 32))
    tier.put(key(2), kv(2, 32))
    f = tier._file(key(1))
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[:-7])
    elif damage == "flip":
        f.write_bytes(data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:])
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "foreign_key":
        f.write_bytes(tier._file(key(2)).read_bytes())   # a valid chunk under the wrong name
    else:
        f.write_bytes(os.urandom(len(data)))
    assert tier.get(key(1)) is None
    assert tier.stats.corrupt == 1 and key(1) not in tier and not f.exists()
    assert torch.equal(tier.get(key(2))["kv"], kv(2, 32)["kv"])


def test_crash_leftovers_are_invisible_and_cleaned(tmp_path):
    tier = DiskTier(tmp_path, 10_000, make_policy("lru"))
    tier.put(key(1), kv(1))
    half = tmp_path / tier._file(key(1)).parent.name / ".tmp-deadbeef"
    half.write_bytes(b"LMCK partial")  # a writer died before its rename
    t2 = DiskTier(tmp_path, 10_000, make_policy("lru"))
    assert len(t2) == 1 and not half.exists()


def test_tiered_store_promotes_hits_upward(tmp_path):
    mem = MemoryTier(200, make_policy("lru"))
    disk = DiskTier(tmp_path, 10_000, make_policy("lru"))
    store = TieredStore([mem, disk])
    for i in range(4):
        store.put(key(i), kv(i, 16))                   # four unrelated roots
    assert len(mem) == 3 and len(disk) == 4           # memory holds 3 x 64 bytes: LRU dropped key 0
    assert store.prefix_length([key(i) for i in range(5)]) == 4
    assert key(0) not in mem
    assert torch.equal(store.get(key(0))["kv"], kv(0, 16)["kv"])
    assert key(0) in mem                                # promoted


def test_prefix_length_spans_tiers(tmp_path):
    a = MemoryTier(1000, make_policy("lru"))
    b = MemoryTier(1000, make_policy("lru"))
    a.put(key(0), kv(0)); b.put(key(1), kv(1)); a.put(key(2), kv(2))  # noqa: E702
    assert TieredStore([a, b]).prefix_length([key(i) for i in range(4)]) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn])
def test_wire_round_trip(dtype):
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).to(dtype)
    data = wire.encode(key(5), {"kv": t, "scale": torch.ones(3)}, parent=key(4), position=256)
    rec = wire.decode(data, expected_key=key(5))
    assert rec.parent == key(4) and rec.position == 256
    assert rec.tensors["kv"].dtype == dtype and torch.equal(rec.tensors["kv"].view(torch.uint8), t.view(torch.uint8))


def test_wire_rejects_hostile_values():
    good = wire.encode(key(1), kv(1, 1000))
    with pytest.raises(wire.WireError, match="exceeds the cap"):
        wire.decode(good, max_payload=100)
    with pytest.raises(wire.WireError, match="different key"):
        wire.decode(good, expected_key=key(2))
    with pytest.raises(wire.WireError, match="version"):
        wire.decode(good[:4] + (99).to_bytes(2, "little") + good[6:])
    with pytest.raises(wire.WireError, match="magic"):
        wire.decode(b"XXXX" + good[4:])
    with pytest.raises(wire.WireError):
        wire.decode(good[:10])


@pytest.mark.parametrize("policy", [name for name, cls in POLICIES.items() if cls.batch_evicts])
@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["chain", "chain", "touch", "pin", "unpin", "delete"]),
                              st.integers(0, 9), st.integers(1, 5), st.integers(1, 3)), max_size=40))
def test_batched_put_chain_equals_one_key_at_a_time(policy, ops):
    """The batch path of put_chain (victims first, then every key at once) leaves the same tier as
    storing the chain one key at a time: same residents, bytes and counters, in any state."""
    from lmcache_lab.experiments.replay import Placeholder

    batched, single = (MemoryTier(10 * 64, make_policy(policy)) for _ in range(2))
    single.put_chain = lambda keys, values, parent=None, position=0, step=0: single._put_chain_each(
        keys, values, isinstance(values, (list, tuple)), parent, position, step)
    pins: list[bytes] = []

    def chain(start, length):   # a path of a small prefix tree: key (depth, branch) of a root
        return [key(100 * d + (start if d < 2 else start + 7 * length)) for d in range(length + start % 3)]

    for op, a, n, size in ops:
        keys = chain(a, n)
        for tier in (batched, single):
            if op == "chain":
                hit = tier.prefix_length(keys)
                tier.touch(keys[:hit])
                values = [Placeholder(64 * size)] * (len(keys) - hit) if a % 2 else Placeholder(64 * size)
                tier.put_chain(keys[hit:], values, keys[hit - 1] if hit else None, hit, 1)
                tier.touch(keys)
            elif op == "touch":
                tier.touch(keys[:tier.prefix_length(keys)])
            elif op == "pin" and keys[0] in tier:
                tier.pin(keys[0])
            elif op == "unpin" and keys[0] in pins:
                tier.unpin(keys[0])
            elif op == "delete" and keys[-1] in tier and keys[-1] not in pins:
                tier.delete(keys[-1])
        if op == "pin" and keys[0] in batched:
            pins.append(keys[0])
        elif op == "unpin" and keys[0] in pins:
            pins.remove(keys[0])
        assert sorted(batched.keys()) == sorted(single.keys())
        assert batched.used_bytes == single.used_bytes <= batched.capacity_bytes
        assert batched.stats == single.stats


def test_put_chain_with_a_repeated_key_counts_its_bytes_once():
    from lmcache_lab.experiments.replay import Placeholder

    tier = MemoryTier(10 * 64, make_policy("lru"))
    assert tier.put_chain([key(1), key(2), key(1)], Placeholder(64)) == 3
    assert sorted(tier.keys()) == [key(1), key(2)] and tier.used_bytes == 128


def test_get_chain_asks_each_tier_once_and_promotes_only_the_prefix(tmp_path):
    memory = MemoryTier(10_000, make_policy("lru"))
    disk = DiskTier(tmp_path / "disk", 100_000, make_policy("lru"))
    store = TieredStore([memory, disk])
    keys = [key(i) for i in range(5)]
    disk.put_chain(keys, [kv(i) for i in range(5)])
    memory.put(keys[0], kv(0))
    disk.delete(keys[3])                      # the chain breaks at chunk 3
    asked = []
    disk_get_many = disk.get_many
    disk.get_many = lambda ks: asked.append(list(ks)) or disk_get_many(ks)
    values = store.get_chain(keys)
    assert [int(v["kv"][0]) for v in values] == [0, 1, 2]
    assert asked == [keys[1:]]                # one batch: every key the memory tier lacked
    assert sorted(memory.keys()) == sorted(keys[:3])   # chunk 4 came back but is not promoted
