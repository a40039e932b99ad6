"""Workload generators: prefix structure, determinism from a seed, arrival rates, trace -> tokens."""
import json

import numpy as np
import pytest

from lmcache_lab.experiments.workloads import (FIRST_ID, block_tokens_for, long_doc_qa, make_workload,
                                               multi_round_qa, trace, trace_prompt)

V = 5000


def is_prefix(a, b):
    return len(a) <= len(b) and tuple(b[:len(a)]) == tuple(a)


def test_multi_round_prefix_structure():
    reqs = multi_round_qa(users=3, rounds=4, system_tokens=100, question_tokens=10, answer_tokens=5,
                          qps=None, vocab_size=V, seed=1)
    assert len(reqs) == 12 and [r.index for r in reqs] == list(range(12))
    system = reqs[0].prompt[:100]
    by_user = {}
    for r in reqs:
        assert is_prefix(system, r.prompt)
        assert all(FIRST_ID <= t < V for t in r.prompt)
        by_user.setdefault(r.group, []).append(r)
    assert len(by_user) == 3
    for rs in by_user.values():
        assert [r.round for r in rs] == [0, 1, 2, 3]
        for prev, cur in zip(rs, rs[1:]):
            assert cur.after == prev.index                          # waits for its previous round
            assert is_prefix(prev.prompt, cur.prompt)               # history is a prefix
            assert len(cur.prompt) == len(prev.prompt) + 5 + 10     # + answer + new question
        assert rs[0].after is None and len(rs[0].prompt) == 110
    # users differ right after the system prompt
    firsts = [rs[0].prompt[100:] for rs in by_user.values()]
    assert len(set(firsts)) == 3


def test_same_seed_same_requests_other_seed_differs():
    a = multi_round_qa(users=2, rounds=2, system_tokens=50, vocab_size=V, seed=7)
    b = multi_round_qa(users=2, rounds=2, system_tokens=50, vocab_size=V, seed=7)
    c = multi_round_qa(users=2, rounds=2, system_tokens=50, vocab_size=V, seed=8)
    assert a == b and a != c
    assert long_doc_qa(documents=2, doc_tokens=64, vocab_size=V, seed=3) == \
        long_doc_qa(documents=2, doc_tokens=64, vocab_size=V, seed=3)


@pytest.mark.parametrize("arrival", ["poisson", "uniform"])
def test_arrivals_follow_qps(arrival):
    reqs = multi_round_qa(users=50, rounds=8, system_tokens=8, question_tokens=4, answer_tokens=2,
                          qps=20.0, arrival=arrival, vocab_size=V, seed=0)
    t = np.array([r.arrival_s for r in reqs])
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    rate = (len(t) - 1) / t[-1]
    assert rate == pytest.approx(20.0, rel=0.12 if arrival == "poisson" else 1e-9)
    if arrival == "poisson":   # exponential gaps: coefficient of variation near 1
        gaps = np.diff(t)
        assert 0.8 < gaps.std() / gaps.mean() < 1.2


def test_qps_null_sends_all_at_once_and_bad_values_fail():
    assert {r.arrival_s for r in long_doc_qa(documents=2, doc_tokens=16, vocab_size=V, qps=None)} == {0.0}
    with pytest.raises(ValueError, match="workload.qps"):
        multi_round_qa(qps=0, vocab_size=V)
    with pytest.raises(ValueError, match="workload.arrival"):
        multi_round_qa(qps=1, arrival="bursty", vocab_size=V)
    with pytest.raises(ValueError, match="workload.order"):
        long_doc_qa(order="sorted", vocab_size=V)


@pytest.mark.parametrize("order", ["interleaved", "grouped", "random"])
def test_long_doc_qa_orders_and_document_prefixes(order):
    reqs = long_doc_qa(documents=3, doc_tokens=40, questions_per_doc=2, question_tokens=4, order=order,
                       vocab_size=V, seed=2)
    groups = [r.group for r in reqs]
    assert sorted(groups) == sorted(["doc0", "doc1", "doc2"] * 2)
    if order == "interleaved":
        assert groups == ["doc0", "doc1", "doc2"] * 2
    if order == "grouped":
        assert groups == ["doc0", "doc0", "doc1", "doc1", "doc2", "doc2"]
    docs = {}
    for r in reqs:
        assert len(r.prompt) == 44
        docs.setdefault(r.group, set()).add(r.prompt[:40])
    assert all(len(v) == 1 for v in docs.values())           # same document, same tokens
    assert len({next(iter(v)) for v in docs.values()}) == 3   # different documents differ


def test_long_doc_qa_miss_fraction_adds_fresh_documents():
    reqs = long_doc_qa(documents=4, doc_tokens=32, questions_per_doc=3, miss_fraction=0.25,
                       vocab_size=V, seed=0)
    fresh = [r for r in reqs if r.group.startswith("fresh")]
    assert len(reqs) == 16 and len(fresh) == 4
    docs = {r.prompt[:32] for r in reqs if not r.group.startswith("fresh")}
    assert all(f.prompt[:32] not in docs for f in fresh)


def test_trace_block_ids_map_to_fixed_tokens():
    a = trace_prompt([1, 2, 3], input_length=1536, block_tokens=512, token_scale=0.125, vocab_size=V)
    b = trace_prompt([1, 2, 9], input_length=1400, block_tokens=512, token_scale=0.125, vocab_size=V)
    c = trace_prompt([5, 2, 3], input_length=1536, block_tokens=512, token_scale=0.125, vocab_size=V)
    assert len(a) == 192 and len(b) == 175                   # ceil(1400 / 8) = 175
    assert a[:128] == b[:128] and a[128:] != b[128:175]      # equal ids -> equal tokens
    assert a[:64] == block_tokens_for(1, 64, V) and a[64:128] == block_tokens_for(2, 64, V)
    assert c[:64] != a[:64] and c[64:128] == a[64:128]       # a block is a function of its id
    assert trace_prompt([1], 512, 512, 0.125, V, seed=1) != a[:64]


def test_trace_workload_scales_time_and_length(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1000 + 500 * i, "input_length": 1024, "output_length": 3, "hash_ids": [7, 8 + i % 2]}
            for i in range(4)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reqs = trace(trace=str(p), token_scale=0.25, time_scale=0.1, output_tokens=4, vocab_size=V)
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert all(len(r.prompt) == 256 and r.max_tokens == 4 for r in reqs)
    assert reqs[0].prompt == reqs[2].prompt and reqs[0].prompt[:128] == reqs[1].prompt[:128]
    assert reqs[0].prompt[128:] != reqs[1].prompt[128:]


def test_make_workload_from_hydra_configs():
    from hydra import compose, initialize_config_dir

    from lmcache_lab.run import CONF_DIR
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for name in ("multi_round_qa", "long_doc_qa", "trace"):
            cfg = compose("config", overrides=[f"workload={name}"] + (["workload.limit=5"] if name == "trace" else []))
            reqs = make_workload(cfg.workload, vocab_size=V, seed=0)
            assert reqs and all(r.prompt for r in reqs)
            assert make_workload(cfg.workload, vocab_size=V, seed=0) == reqs


def test_multi_tenant_sessions_extend_their_history_and_oneoffs_are_single():
    from lmcache_lab.experiments.workloads import multi_tenant
    reqs = multi_tenant(tenants=3, sessions=60, oneoff_fraction=0.5, vocab_size=V, seed=2)
    assert [r.index for r in reqs] == list(range(len(reqs)))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))
    by_session = {}
    for r in reqs:
        by_session.setdefault(r.group, []).append(r)
    chats = [rs for rs in by_session.values() if len(rs) > 1]
    assert chats and len(by_session) == 60
    for rs in by_session.values():
        assert [r.round for r in rs] == list(range(len(rs)))
        for prev, cur in zip(rs, rs[1:]):
            assert cur.after == prev.index and is_prefix(prev.prompt, cur.prompt)
            assert len(cur.prompt) - len(prev.prompt) >= 64 + 32          # an answer and a question
    # sessions of one tenant share its system prompt (256+ tokens), tenants differ
    systems = {}
    for r in reqs:
        systems.setdefault(r.group.split("/")[0], set()).add(r.prompt[:256])
    assert all(len(s) == 1 for s in systems.values()) and len({next(iter(s)) for s in systems.values()}) == len(systems)
    # one-off requests carry a long document: their sessions have one request and a long prompt
    long_single = [rs[0] for rs in by_session.values() if len(rs) == 1 and len(rs[0].prompt) >= 256 + 1024]
    assert long_single
    assert multi_tenant(tenants=3, sessions=60, vocab_size=V, seed=2) == reqs
    assert multi_tenant(tenants=3, sessions=60, vocab_size=V, seed=3) != reqs
    with pytest.raises(ValueError, match="chat_stop"):
        multi_tenant(chat_stop=0, vocab_size=V)


def test_to_mooncake_shares_exactly_the_common_whole_blocks(tmp_path):
    from lmcache_lab.experiments.trace import load_trace
    from lmcache_lab.experiments.workloads import Request, to_mooncake, write_mooncake
    a = tuple(range(10, 30))              # 20 tokens
    b = a[:12] + (99,) * 10               # shares 12 tokens: blocks of 4 -> 3 whole blocks
    c = (99,) * 8 + a[8:]                 # same blocks 2..4 as a, other prefix: no id in common
    reqs = [Request(index=i, arrival_s=float(i), prompt=p, max_tokens=1) for i, p in enumerate((a, b, c))]
    ra, rb, rc = to_mooncake(reqs, block_tokens=4)
    assert ra["hash_ids"] == [0, 1, 2, 3, 4] and rb["hash_ids"][:3] == [0, 1, 2]
    assert not set(rb["hash_ids"][3:]) & set(ra["hash_ids"])
    assert not set(rc["hash_ids"]) & set(ra["hash_ids"])
    assert rb["input_length"] == 22 and len(rb["hash_ids"]) == 6 and rb["timestamp"] == 1000
    write_mooncake(reqs, tmp_path / "t.jsonl", block_tokens=4)
    assert [r.hash_ids for r in load_trace(str(tmp_path / "t.jsonl"))] == [tuple(x["hash_ids"]) for x in (ra, rb, rc)]
