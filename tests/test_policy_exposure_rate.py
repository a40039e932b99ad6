"""`exposure_rate`: the exposure and reuse bookkeeping by hand, the rate formula, the victim by
the score formula, what it learns on a hand-made document trace, and seeded determinism.
(Tail-first and pins under random operations: the parametrized tests of test_policies*.py cover
every registered policy, this one included.)"""
import numpy as np
import pytest

from lmcache_lab.cost import LLAMA3_8B
from lmcache_lab.experiments.replay import replay, replay_tier
from lmcache_lab.policies import DEFAULT_SET, REFERENCE, make_policy
from lmcache_lab.policies.exposure_rate import NEW, segment_bucket

from test_policies_v2 import BLOCK, requests    # the hand-made trace helpers of the v2 policies


def run(chains, policy, capacity_blocks):
    return replay(requests(chains), replay_tier(requests(chains), policy, capacity_blocks * BLOCK),
                  LLAMA3_8B).hit_blocks


def test_segment_buckets():
    assert [segment_bucket(n) for n in (1, 2, 3, 4, 15, 16, 63, 64, 500)] == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_exposure_and_reuses_counted_by_hand():
    """a -> b stored at now 0, then request 1 touches them (a 2-chunk request: weight 1/2 each,
    class NEW + bucket(2); the episodes start at the store). Request 2 uses a alone: a's episode
    closes with a reuse after 2 requests of exposure at weight 1/2; a opens an episode in class 1
    at weight 1 (a 1-chunk request)."""
    p = make_policy("exposure_rate", 1)
    p.on_insert("a", 1, None, 0)
    p.on_insert("b", 1, "a", 1)
    p.on_access(["a", "b"])
    new2 = NEW + 1
    assert p.now == 1 and p.stats[NEW] == [0.0] * 4      # stored into NEW + 0, moved by the touch
    assert p.stats[new2] == pytest.approx([0.0, 0.0, 1.0, 0.0])   # two open episodes of weight 1/2 from t=0
    p.on_access(["a"])
    assert p.now == 2 and p.info["a"].uses == 1 and p.info["a"].cls == 1
    # new2: a's episode closed (reuse 1/2, exposure 1/2 * 2), b's open (1/2 from t=0)
    assert p.stats[new2] == pytest.approx([0.5, 1.0, 0.5, 0.0])
    assert p.stats[1] == pytest.approx([0.0, 0.0, 1.0, 2.0])
    assert p.exposure(new2) == pytest.approx(1.0 + 0.5 * 2)
    assert p.exposure(1, now=5) == pytest.approx(3.0)


def test_rate_formula_and_prior():
    """rate(c) = (reuses + prior * R) / (exposure + prior), R = (all reuses + 0.001) / (all exposure + 1)."""
    p = make_policy("exposure_rate", 1, prior=2.0)
    p.stats = {1: [3.0, 10.0, 0.0, 0.0], NEW: [1.0, 30.0, 0.0, 0.0]}
    p.now = 7
    R = (4.0 + 1e-3) / (40.0 + 1.0)
    assert p.rate(1) == pytest.approx((3 + 2 * R) / (10 + 2))
    assert p.rate(NEW) == pytest.approx((1 + 2 * R) / (30 + 2))
    assert p.rate(2) == pytest.approx(R)          # no evidence: the all-class rate


def test_evicted_key_stays_exposed_and_a_restore_is_a_reuse_of_its_class():
    p = make_policy("exposure_rate", 1, ghost_factor=1.0)
    p.on_insert("a", 1, None, 0)
    p.on_access(["a"])                              # stored at 0, request 1: a 1-chunk request, class NEW + 0
    assert p.info["a"].cls == NEW and p.info["a"].tail
    p.on_remove("a")                                # evicted: still exposed, on the ghost list
    assert "a" in p._ghost and p.stats[NEW][2] == pytest.approx(1.0)
    p.now = 4                                       # three requests later a is stored again
    p.on_insert("a", 1, None, 0)
    assert p.info["a"].uses == 1
    assert p.stats[NEW][:3] == pytest.approx([1.0, 4.0, 0.0])   # one reuse after 4 requests of exposure


def test_a_key_falling_off_the_ghost_list_ends_its_exposure_without_a_reuse():
    p = make_policy("exposure_rate", 1, ghost_factor=0.0)
    p.on_insert("a", 1, None, 0)
    p.on_access(["a"])
    p.now = 6
    p.on_remove("a")                                # no ghost list: exposure ends at the eviction
    assert p.stats[NEW][:3] == pytest.approx([0.0, 6.0, 0.0])
    assert not p._ghost


def test_victim_by_the_score_formula():
    """Two leaves: x a body chunk of a class with a high rate, used 9 requests ago; y just stored,
    of a class with a low rate. score = rate * (tail_weight if tail) / (age + 1) ** 0.5."""
    p = make_policy("exposure_rate", 1, age_exponent=0.5)
    p.on_insert("x", 1, None, 0)
    p.on_access(["x"])
    p.now = 9
    p.on_insert("y", 1, None, 0)
    p.on_access(["y"])
    x, y = p.info["x"], p.info["y"]
    x.cls, x.tail = 1, False
    p.stats = {1: [8.0, 10.0, 0.0, 0.0], NEW: [1.0, 100.0, 0.0, 0.0]}
    p._rates_at = -1
    assert p._score(x, p.now) == pytest.approx(p.rate(1) / (p.now - x.last + 1) ** 0.5)
    assert p._score(y, p.now) == pytest.approx(p.rate(NEW) * 0.05 / 1.0)
    assert p.victim() == "y"
    p.stats = {1: [0.0, 100.0, 0.0, 0.0], NEW: [50.0, 10.0, 0.0, 0.0]}
    p._rates_at = -1
    assert p.victim() == "x"


def documents(seed=0, n=400):
    """A document trace: 'hot' documents of 8 chunks asked every ~15 requests, and one-off
    requests of 1 chunk between them, never asked again."""
    rng = np.random.default_rng(seed)
    hot = [[1000 * d + i for i in range(8)] for d in range(6)]
    chains, nid = [], 10 ** 6
    for r in range(n):
        if rng.random() < 0.4:
            chains.append(hot[int(rng.integers(len(hot)))])
        else:
            chains.append([nid])
            nid += 1
    return chains


def test_learns_that_one_off_requests_are_not_reused_and_keeps_the_documents():
    chains = documents()
    p = make_policy("exposure_rate", 512)
    hits = run(chains, p, capacity_blocks=30).sum()
    lru = run(chains, make_policy("lru", 512), capacity_blocks=30).sum()
    assert p.rate(1) > 10 * p.rate(NEW)             # returning documents vs one-off 1-chunk requests
    assert hits > lru


def test_seeded_runs_are_identical():
    chains = documents(seed=3)
    a = run(chains, make_policy("exposure_rate", 512, samples=4, seed=7), capacity_blocks=20)
    b = run(chains, make_policy("exposure_rate", 512, samples=4, seed=7), capacity_blocks=20)
    assert a.tolist() == b.tolist()


def test_bad_parameters_are_named():
    for bad in (dict(max_uses=0), dict(tail_weight=0.0), dict(prior=0.0), dict(ghost_factor=-1.0)):
        with pytest.raises(ValueError, match="policy 'exposure_rate'"):
            make_policy("exposure_rate", **bad)


def test_not_in_the_default_set():
    assert "exposure_rate" in REFERENCE and "exposure_rate" not in DEFAULT_SET
