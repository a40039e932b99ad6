"""S3-FIFO, SIEVE, ARC, cost-aware and the offline Belady policies: hand-made sequences with known
answers, Belady against LRU on random traces, replay determinism, offline policies kept out of
live tiers, and the sweep report."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_lab.cost import LLAMA3_8B
from lmcache_lab.experiments.replay import infinite_cache, replay, replay_tier
from lmcache_lab.experiments.trace import TraceRequest, load_trace, unique_blocks
from lmcache_lab.policies import OFFLINE, POLICIES, make_policy
from lmcache_lab.tiers import MemoryTier

BLOCK = 512 * LLAMA3_8B.kv_bytes_per_token


def drain(policy, can_evict=None):
    out = []
    while (key := policy.pop_victim(can_evict)) is not None:
        out.append(key)
    return out


def store(policy, keys, nbytes=1):
    """Each key stored by its own request: insert, then that request's touch (not a reuse)."""
    for k in keys:
        policy.on_insert(k, nbytes)
        policy.on_access([k])


def requests(chains):
    return [TraceRequest(float(i), 512 * len(c), 1, tuple(c)) for i, c in enumerate(chains)]


def hits(reqs, policy, capacity_blocks):
    tier = replay_tier(reqs, make_policy(policy, 512), capacity_blocks * BLOCK)
    return int(replay(reqs, tier, LLAMA3_8B).hit_blocks.sum())


# ---- online policies, known answers ------------------------------------------------------------
def test_sieve_hand_skips_visited_and_stays():
    p = make_policy("sieve")
    store(p, "abcd")
    p.on_access(["a"]); p.on_access(["c"])  # noqa: E702
    # the hand starts at the oldest: a (visited: cleared) -> b evicted; c (cleared) -> d evicted;
    # wraps to a (now unvisited) -> a; then c
    assert drain(p) == ["b", "d", "a", "c"]


def test_s3fifo_one_hit_chunks_leave_from_small_and_ghost_hits_enter_main():
    p = make_policy("s3fifo", small_fraction=0.25)
    store(p, "abcd")
    p.on_access(["a"])                       # a used once while in S: promoted to M on eviction
    assert p.pop_victim() == "b"             # b never reused: leaves from S, into the ghost
    p.on_insert("b", 1); p.on_access(["b"])  # noqa: E702  back from the ghost: straight into M
    store(p, "e")
    assert drain(p) == ["c", "d", "e", "a", "b"]


def test_arc_adapts_towards_recency_after_a_ghost_hit():
    p = make_policy("arc")
    store(p, "abc")
    p.on_access(["a"])                       # a: T2 (seen twice); b, c: T1
    assert p.pop_victim() == "b"             # |T1| > p = 0: T1's LRU, remembered in B1
    p.on_insert("b", 1); p.on_access(["b"])  # noqa: E702  B1 hit: p grows to 1, b enters T2
    assert p.p == 1
    assert drain(p) == ["a", "b", "c"]       # |T1| = 1 is not above p: T2 is evicted first


def test_cost_aware_learns_that_request_tails_are_not_reused():
    p = make_policy("cost_aware", chunk_tokens=512)
    chunk = 512 * LLAMA3_8B.kv_bytes_per_token
    for r in range(40):                      # requests: [root, x_r, tail_r]; x_r reused, tail_r never
        chain = ["root", f"x{r}", f"t{r}"]
        for i, k in enumerate(chain):
            if k not in p:
                p.on_insert(k, chunk, chain[i - 1] if i else None, i * 512)
        p.on_access(chain)
        if r:
            p.on_access(["root", f"x{r - 1}"])   # the next request reuses the previous x
    # learned from the chains: a request's last chunk is not reused, the one before it is
    assert p.reuse_estimate("t39") < 0.1 < 0.8 < p.reuse_estimate("x39")
    # and the priority follows: used by the same request, the tail is worth less than its parent
    assert p._h["t39"] < p._h["x39"]


def test_hyperbolic_evicts_lowest_use_rate():
    p = make_policy("hyperbolic", samples=8)
    store(p, "ab")                    # stored at requests 1, 2
    for _ in range(3):
        p.on_access(["a"])            # a: 4 uses over its age; b: 1 use
    assert p.pop_victim() == "b"
    store(p, "c")                     # a one-off chunk, stored after a
    for _ in range(10):
        p.on_access(["a"])            # a keeps being used; c's rate decays as 1/age
    assert p.pop_victim() == "c"
    assert p.pop_victim() == "a"


# ---- offline policies ---------------------------------------------------------------------------
def test_belady_known_answers_and_bypass():
    # single-block requests A B C A B A, room for 2 blocks
    reqs = requests([[1], [2], [3], [1], [2], [1]])
    assert hits(reqs, "lru", 2) == 1               # C evicts A, A evicts B, B evicts C: only the last A
    assert hits(reqs, "belady", 2) == 2            # C evicts B (used later than A)
    assert hits(reqs, "belady_prefix", 2) == 3     # C (never reused) is not stored at all


def test_belady_evicts_tail_first_and_never_reused_first():
    reqs = requests([[1, 2, 3], [1, 2], [4], [1]])
    p = make_policy("belady", 512)
    p.prepare([r.hash_ids for r in reqs])
    p.advance(0)
    for i, k in enumerate([1, 2, 3]):
        p.on_insert(k, 1, k - 1 if i else None, i * 512)
    p.on_access([1, 2, 3])
    assert p.next_use(3) == float("inf") and p.next_use(2) == 1 and p.next_use(1) == 1
    assert drain(p) == [3, 2, 1]   # 3 never again; 2 and 1 tie at request 1: the deeper first


def test_offline_policy_refused_by_a_live_tier():
    for name in sorted(OFFLINE):
        with pytest.raises(ValueError, match="offline.*trace replay"):
            MemoryTier(10 * BLOCK, make_policy(name))


chains_st = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=14)


def build_chains(spec):
    """Random prefix-sharing requests: each extends a prefix of an earlier one by new blocks."""
    chains, fresh = [], iter(range(1, 10**6))
    for src, keep, new in spec:
        base = chains[src % len(chains)][:keep] if chains else []
        chains.append(base + [next(fresh) for _ in range(new)] if src != 6 or not chains
                      else list(chains[src % len(chains)]))   # 6: repeat an earlier prompt
    return chains


@settings(max_examples=120, deadline=None)
@given(spec=chains_st, cap=st.integers(1, 6))
def test_belady_never_below_lru_and_bypass_never_below_greedy(spec, cap):
    reqs = requests(build_chains(spec))
    lru, greedy, ceiling = hits(reqs, "lru", cap), hits(reqs, "belady", cap), hits(reqs, "belady_prefix", cap)
    assert greedy >= lru
    assert ceiling >= greedy
    inf, _ = infinite_cache(reqs, LLAMA3_8B)
    assert ceiling <= round(inf * sum(len(r.hash_ids) for r in reqs))


# ---- replay -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_replay_is_deterministic_for_every_policy(name):
    reqs = load_trace("sample", limit=300)
    cap = int(0.05 * unique_blocks(reqs))
    a = replay(reqs, replay_tier(reqs, make_policy(name, 512), cap * BLOCK), LLAMA3_8B)
    b = replay(reqs, replay_tier(reqs, make_policy(name, 512), cap * BLOCK), LLAMA3_8B)
    assert (a.hit_blocks == b.hit_blocks).all() and a.bytes_written == b.bytes_written
    assert a.chunk_hit_rate <= infinite_cache(reqs, LLAMA3_8B)[0]


def test_sweep_report_has_every_policy_the_ceiling_and_the_gap(tmp_path):
    from lmcache_lab.experiments.report import replay_sweep_report
    rates = {"lru": 0.2, "arc": 0.25, "belady": 0.35, "belady_prefix": 0.4}
    for i, (policy, rate) in enumerate(rates.items()):
        for j, frac in enumerate((0.05, 0.1)):
            d = tmp_path / f"{i}{j}"
            d.mkdir()
            d.joinpath("summary.json").write_text(json.dumps({
                "experiment": "replay", "trace": "t.jsonl", "policy": policy, "offline": policy.startswith("belady"),
                "capacity_fraction": frac, "capacity_blocks": int(frac * 1000), "chunk_hit_rate": rate + frac,
                "flops_saved_fraction": rate, "infinite_chunk_hit_rate": 0.6, "infinite_flops_saved_fraction": 0.6}))
    csv = replay_sweep_report(tmp_path)
    assert csv.exists() and (tmp_path / "hit_rate_vs_capacity_t.png").exists()
    gap = (tmp_path / "replay_gap.csv").read_text().splitlines()
    assert len(gap) == 3 and ",arc," in gap[1] and ",belady_prefix," in gap[1]
    assert abs(float(gap[1].split(",")[9]) - 0.25) < 1e-9      # (0.30 - 0.25) / (0.45 - 0.25)
