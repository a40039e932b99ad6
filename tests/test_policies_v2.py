"""Hit density (`lhd`), the learned reuse predictor (`learned`) and the learned reuse rate
(`reuse_rate`): known answers of their parts,
what they learn from hand-made traces, and a loop where LRU gets nothing. (Determinism, tail-first
and pins under random operations: the parametrized tests of test_policies*.py cover them.)"""
import math

import numpy as np
import pytest

from lmcache_lab.cost import LLAMA3_8B
from lmcache_lab.experiments.replay import replay, replay_tier
from lmcache_lab.experiments.trace import TraceRequest
from lmcache_lab.policies import make_policy
from lmcache_lab.policies.learned import STATIC, fit_logistic
from lmcache_lab.policies.lhd import chunk_class, hit_density
from lmcache_lab.policies.reuse_rate import TAIL
from lmcache_lab.policies.sampled import ChunkInfo

BLOCK = 512 * LLAMA3_8B.kv_bytes_per_token


def requests(chains):
    return [TraceRequest(float(i), 512 * len(c), 1, tuple(c)) for i, c in enumerate(chains)]


def run(chains, policy, capacity_blocks):
    reqs = requests(chains)
    tier = replay_tier(reqs, policy, capacity_blocks * BLOCK)
    return int(replay(reqs, tier, LLAMA3_8B).hit_blocks.sum())


def test_hit_density_known_answer():
    # one class, ages 0..2: two hits at age 1, two evictions at age 2
    hits, evictions = np.array([[0.0, 2.0, 0.0]]), np.array([[0.0, 0.0, 2.0]])
    hd = hit_density(hits, evictions)[0]
    # HD(a) = hits at ages >= a / sum_{x >= a} (x - a + 1) * events(x)
    assert hd.tolist() == pytest.approx([2 / (2 * 2 + 3 * 2), 2 / (1 * 2 + 2 * 2), 0.0])


def test_hit_density_prior_pulls_a_sparse_class_to_the_average():
    hits = np.array([[0.0, 4.0], [0.0, 0.0]])
    evictions = np.array([[0.0, 4.0], [0.0, 0.0]])
    hd = hit_density(hits, evictions, prior=1.0)
    overall = hit_density(hits.sum(0, keepdims=True), evictions.sum(0, keepdims=True))[0]
    assert hd[1].tolist() == pytest.approx(overall.tolist())   # no evidence: the average


def test_fit_logistic_recovers_the_log_odds():
    x = np.ones((400, 1))
    y = np.r_[np.ones(100), np.zeros(300)]
    (w,) = fit_logistic(x, y, ridge=0.0)
    assert w == pytest.approx(math.log(100 / 300), abs=1e-9)


def sessions(n, body=3, seed=0):
    """Requests of chains root/body.../tail: each body is asked twice (the second time with a
    different tail block, as a prompt whose last partial block grew), tails never again."""
    rng = np.random.default_rng(seed)
    chains, nid = [], 1000
    for s in range(n):
        stem = [s * 100 + i for i in range(body)]
        for _ in range(2):
            chains.append(stem + [nid])
            nid += 1
    order = rng.permutation(len(chains))
    return [chains[i] for i in order]


def test_lhd_learns_that_request_tails_have_no_hit_density():
    p = make_policy("lhd", 512, reconfigure_every=5, prior=0.0)
    run(sessions(300), p, capacity_blocks=60)
    assert p.density is not None
    tail, body = ChunkInfo(0, depth=3, nbytes=1), ChunkInfo(0, depth=2, nbytes=1)
    tail.tail = True
    tail.segment = body.segment = 4     # a session's first request stores its 3 body blocks and its tail
    tail_cls, body_cls = chunk_class(tail), chunk_class(body)
    assert max(p.density[tail_cls]) < min(p.density[body_cls][:8])


def test_learned_model_gives_request_tails_a_negative_weight():
    p = make_policy("learned", 512, retrain_every=200, window=2000)
    run(sessions(300), p, capacity_blocks=60)
    assert p.fits > 0 and p.training_seconds > 0
    static, _ = p.weights
    assert static[STATIC.index("tail")] < 0


@pytest.mark.parametrize("name", ["lhd", "learned"])
def test_a_loop_longer_than_the_cache_gets_hits_where_lru_gets_none(name):
    """20 one-block chains asked in a cycle, a cache of 10 blocks: LRU always evicts the chain
    asked next (0 hits after the first pass). Any policy that keeps some chunks past one cycle
    hits; both learn that old chunks are the ones about to be used."""
    loop = [[k] for k in range(20)] * 30
    assert run(loop, make_policy("lru", 512), 10) == 0
    params = {"lhd": dict(reconfigure_every=5), "learned": dict(retrain_every=50, window=500)}.get(name, {})
    assert run(loop, make_policy(name, 512, **params), 10) > 0


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="policy 'lhd'"):
        make_policy("lhd", decay=0)
    with pytest.raises(ValueError, match="policy 'learned'"):
        make_policy("learned", window=1, retrain_every=10)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        make_policy("lhd", samples=0)


def test_learned_model_is_trusted_only_when_it_beats_recency():
    """Before each refit the model and recency alone (-age) are scored on the labels that came in
    since the last fit. Here the key reused next is the one not yet used, which recency ranks
    last: the model wins and is trusted. With a margin no AUC can reach, the model is never
    trusted and eviction is by recency: with no more leaves than samples, exactly LRU."""
    seq = [[0]]
    for i in range(1, 400):
        seq += [[i], [i - 1]]
    p = make_policy("learned", 512, retrain_every=100, window=1000)
    assert run(seq, p, 3) == 399
    assert p.trusted and all(a >= r + p.margin for a, r in zip(p.aucs, p.recency_aucs))
    rng = np.random.default_rng(5)
    chains = [[int(k) for k in range(r, r + int(rng.integers(1, 4)))] for r in rng.integers(0, 12, 300) * 10]
    never = make_policy("learned", 512, retrain_every=50, window=500, margin=1.0)
    assert run(chains, never, 20) == run(chains, make_policy("lru", 512), 20)
    assert never.fits > 0 and not never.trusted


def test_reuse_rate_counts_classes_by_hand():
    """Request 1 stores a -> b: a enters class 0 (no use yet), b the request tail. Request 2 uses
    a alone (age 1): a use of class 0, then a enters TAIL (it ends request 2). Each class starts
    at (1 use, 2 entries)."""
    p = make_policy("reuse_rate", 1)
    p.on_insert("a", 1, None, 0)
    p.on_insert("b", 1, "a", 1)
    p.on_access(["a", "b"])
    assert p.stats == {0: [1.0, 3.0], TAIL: [1.0, 3.0]}
    p.on_access(["a"])
    assert p.info["a"].uses == 1 and p.info["a"].cls == TAIL
    assert p.stats == {0: [2.0, 3.0], TAIL: [1.0, 4.0]}
    assert p.reuse(0) == pytest.approx(2 / 3) and p.reuse(TAIL) == pytest.approx(1 / 4)
    assert p.reuse(3) == 0.5                       # no evidence yet


def test_reuse_rate_store_then_touch_is_one_entry_and_a_restore_is_a_use():
    """The touch of the hit prefix and the touch of the whole chain after the store are one
    request: a chunk that was the tail of the first touch moves to its class, not counted twice.
    A key stored again after its eviction credits the class it was evicted from and keeps its
    uses."""
    p = make_policy("reuse_rate", 1)
    p.on_insert("a", 1, None, 0)
    p.on_access(["a"])                             # request 1 stores a (tail)
    p.on_access(["a"])                             # request 2: hit prefix [a] (a: use, tail)
    p.on_insert("b", 1, "a", 1)
    p.on_access(["a", "b"])                        # same request: a no longer the tail
    assert p.now == 2
    # TAIL: one use (a, request 2) and three entries (a in requests 1 and 2, b); a's entry in
    # request 2 moved to class 1 when the second touch showed it was no longer the tail
    assert p.stats == {TAIL: [2.0, 4.0], 1: [1.0, 3.0]}
    assert p.pop_victim() == "b"
    p.on_remove("a")
    assert set(p._ghost) == {"a", "b"}
    p.on_insert("a", 1, None, 0)                   # request 3 stores a again
    assert p.info["a"].uses == 2 and p.stats[1][0] == 2.0


def test_reuse_rate_evicts_the_lowest_rate_over_age():
    """Two leaves scored reuse(class) / (age + 1): a request tail of age 0 whose class is rarely
    reused goes before an older body chunk of class 0 (rate 1/2, age 1); once tails are
    reused the older body chunk goes."""
    p = make_policy("reuse_rate", 1)
    p.stats = {0: [1.0, 2.0], TAIL: [1.0, 100.0]}
    p.on_insert("x", 1, None, 0)                   # stored at now 0
    p.on_access(["x"])
    p.on_insert("y", 1, None, 0)
    p.on_access(["y"])
    x, y = p.info["x"], p.info["y"]
    assert x.cls == TAIL and y.cls == TAIL
    x.cls = 0                                      # x: a body chunk of class 0, older than y
    assert p._score(x, p.now) == pytest.approx(p.reuse(0) / (p.now - x.last + 1))
    assert p.victim() == "y"
    p.stats[TAIL] = [50.0, 51.0]                   # once tails are reused, the old body chunk goes
    assert p.victim() == "x"


def test_reuse_rate_learns_that_request_tails_are_not_reused():
    p = make_policy("reuse_rate", 512)
    run(sessions(300), p, capacity_blocks=60)
    # 600 tails, none used again (the two left are the prior); a body chunk is used by the other
    # request of its session when that comes before the chunk left the cache and the ghost list
    assert p.stats[TAIL] == [3.0, 602.0]
    assert p.reuse(TAIL) < 0.01 and p.reuse(0) > 0.05


def test_default_set_is_online_and_the_rest_are_reference_baselines():
    from lmcache_lab.policies import DEFAULT_SET, OFFLINE, POLICIES, REFERENCE

    assert "lru" in DEFAULT_SET and "reuse_rate" in DEFAULT_SET
    assert set(DEFAULT_SET) <= set(POLICIES) - OFFLINE
    assert set(DEFAULT_SET) | set(REFERENCE) == set(POLICIES) - OFFLINE
    assert not set(DEFAULT_SET) & set(REFERENCE)
    assert {"lfu", "sieve", "s3fifo", "lhd", "learned"} <= set(REFERENCE)
