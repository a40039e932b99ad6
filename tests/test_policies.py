"""Every policy: hand-made orderings, the tail-first and pin invariants under random operations."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_lab.policies import POLICIES, make_policy


def drain(policy, can_evict=None):
    out = []
    while (key := policy.pop_victim(can_evict)) is not None:
        out.append(key)
    return out


def test_lru_evicts_least_recent_first():
    p = make_policy("lru")
    for k in "abc":
        p.on_insert(k, 1)
    p.on_access(["a"])
    assert drain(p) == ["b", "c", "a"]


def test_lru_use_of_a_chain_suffix_keeps_its_ancestors_newer():
    """A chain touched from its middle still evicts tail first: the ancestors move with it."""
    p = make_policy("lru")
    p.on_insert("a", 1)
    p.on_insert("b", 1, "a")
    p.on_insert("c", 1, "b")
    p.on_insert("x", 1)
    p.on_access(["x"])
    p.on_access(["b"])          # b's prefix (a) was used too
    assert drain(p) == ["c", "x", "b", "a"]


def test_lru_batch_eviction_skips_pinned_and_their_ancestors():
    p = make_policy("lru")
    for k, parent in (("a", None), ("b", "a"), ("c", "b"), ("y", None), ("z", None)):
        p.on_insert(k, 1, parent)
    p.on_access(["a", "b", "c"])
    p.on_access(["y"])
    p.on_access(["z"])
    # order oldest first: c, b, a, y, z; c pinned keeps b and a (not leaves); z protected
    assert p.pop_victims(3, pinned={"c": 1}, protect="z") == ["y"]
    assert p.pop_victims(2) == ["c", "b"]


def test_lfu_evicts_least_frequent_then_least_recent():
    p = make_policy("lfu")
    for k in "abcd":
        p.on_insert(k, 1)
    p.on_access(["a"]); p.on_access(["a"]); p.on_access(["c"])  # noqa: E702
    assert drain(p) == ["b", "d", "c", "a"]


def test_cost_aware_keeps_expensive_per_byte_and_ages():
    p = make_policy("cost_aware", chunk_tokens=256)
    chunk = 256 * 131072                          # bytes of a 256-token Llama-3-8B chunk
    p.on_insert("deep", chunk, position=100_000)  # deep chunk: attention term makes it costly
    p.on_insert("shallow", chunk, position=0)
    p.on_insert("big", 100 * chunk, position=0)  # same cost, 100x the bytes: least value per byte
    assert p.pop_victim() == "big"
    assert p.pop_victim() == "shallow"
    # ageing: a chunk used many requests later outranks the stale expensive one
    p.on_insert("new", chunk, position=0)
    for _ in range(50):
        p.on_access(["new"])
    assert p.pop_victim() == "deep"


def test_cost_aware_frequency_counts():
    p = make_policy("cost_aware")
    p.on_insert("a", 256 * 131072)
    p.on_insert("b", 256 * 131072)
    p.on_access(["b"]); p.on_access(["a"])  # noqa: E702  the requests that stored them
    p.on_access(["a"])                      # a later request uses a
    assert p.pop_victim() == "b"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_chain_evicts_tail_first(name):
    p = make_policy(name)
    chain = ["r", "c1", "c2", "c3"]
    parent = None
    for i, k in enumerate(chain):
        p.on_insert(k, 1, parent, position=i * 256)
        parent = k
    p.on_access(chain)
    assert drain(p) == ["c3", "c2", "c1", "r"]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_pinned_entries_are_skipped(name):
    p = make_policy(name)
    for k in "abc":
        p.on_insert(k, 1)
    pinned = {"a", "b"}
    assert p.pop_victim(lambda k: k not in pinned) == "c"
    assert p.pop_victim(lambda k: k not in pinned) is None
    assert len(p) == 2


def test_unknown_policy_and_param_errors():
    with pytest.raises(ValueError, match="policy.name: 'nope' is not allowed"):
        make_policy("nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        make_policy("lru", size=3)


ops = st.lists(st.tuples(st.sampled_from(["insert", "access", "evict", "remove"]),
                         st.integers(0, 30), st.integers(0, 30)), max_size=200)


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=60, deadline=None)
@given(ops=ops)
def test_tail_first_and_pins_under_random_operations(name, ops):
    """A victim is never a pinned key nor a key with a resident child, whatever happened before."""
    p = make_policy(name)
    resident: dict[int, int | None] = {}
    pinned = set()
    for op, a, b in ops:
        if op == "insert" and a not in resident:
            parent = b if b in resident and b != a else None
            p.on_insert(a, 1 + a % 3, parent, position=256 * (a % 5))
            resident[a] = parent
            if a % 7 == 0:
                pinned.add(a)
        elif op == "access" and a in resident:
            chain, k = [], a
            while k is not None:
                chain.append(k)
                k = resident[k]
            p.on_access(chain[::-1])
        elif op == "remove" and a in resident and a not in resident.values():
            p.on_remove(a)
            del resident[a]
            pinned.discard(a)
        elif op == "evict":
            v = p.pop_victim(lambda k: k not in pinned)
            if v is None:
                assert all(k in pinned or k in resident.values() for k in resident)
            else:
                assert v in resident and v not in pinned
                assert v not in resident.values(), "evicted a chunk whose child is resident"
                del resident[v]
        assert len(p) == len(resident)
