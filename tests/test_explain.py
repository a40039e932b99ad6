"""The lab tools of experiments/explain.py on hand-made traces with answers worked out by hand,
and the stack curve's equality with LRU replays."""
import numpy as np
import pytest

from lmcache_lab.experiments.explain import (belady_gap, block_classes, lru_stack_hits, main, noise_for_auc,
                                             noisy_oracle, replay_hits, roc_auc, stack_curve)
from lmcache_lab.experiments.trace import TraceRequest, load_trace


def requests(chains):
    return [TraceRequest(float(i), 512 * len(c), 1, tuple(c)) for i, c in enumerate(chains)]


def test_stack_hits_known_answer():
    # r0 [1,2]; r1 [3]; r2 [1,2]: distances 1 (3 above) and 2 -> running max 1, 2; stack 1,2,3;
    # r3 [1,4]: 1 at distance 0, 4 new (and nothing after it can hit)
    hits = lru_stack_hits([(1, 2), (3,), (1, 2), (1, 4)])
    assert hits[:6].tolist() == [0, 1, 2, 3, 3, 3]


def test_stack_curve_equals_lru_replays():
    reqs = load_trace("sample", limit=400)
    caps, rate, longest = stack_curve(reqs)
    total = sum(len(r.hash_ids) for r in reqs)
    for c in (longest, longest + 7, 3 * longest, len(caps) // 3, len(caps) - 1):
        assert rate[c] == replay_hits(reqs, "lru", c).sum() / total


def test_stack_curve_equals_lru_replays_on_a_hand_made_trace():
    chains = [(1, 2), (3,), (1, 2), (1, 4), (5, 6), (1, 2, 7), (3,), (5, 6, 8)]
    reqs = requests(chains)
    caps, rate, longest = stack_curve(reqs)
    assert longest == 3
    for c in range(longest, len(caps)):
        assert rate[c] * 16 == replay_hits(reqs, "lru", c).sum()


def test_block_classes_known_answer():
    classes = block_classes(requests([("a",), ("b",), ("a", "x"), ("a",)]))
    assert classes["uses"] == ["0", "0", "1", "0", "2-3"]
    assert classes["depth"] == ["0", "0", "0", "1-3", "0"]
    # sessions by the first two blocks: (a,), (b,), (a, x), (a,) -> turns 1, 1, 1, 2
    assert classes["turn"] == ["1", "1", "1", "1", "2"]


def test_belady_gap_known_answer():
    """A B C A B A in 2 blocks: LRU hits the last A only; the ceiling skips C and hits A, B, A.
    Its 2 extra hits are the second uses of A and B (turn 2, uses 1)."""
    reqs = requests([("A",), ("B",), ("C",), ("A",), ("B",), ("A",)])
    rows = {(r["axis"], r["cls"]): r for r in belady_gap(reqs, 2)}
    assert rows["uses", "1"]["extra"] == 2 and rows["uses", "1"]["share"] == 1.0
    assert rows["uses", "2-3"]["extra"] == 0 and rows["uses", "2-3"]["lru_hits"] == 1
    assert rows["turn", "2"]["extra"] == 2 and rows["turn", "3-4"]["extra"] == 0
    assert rows["depth", "0"]["extra"] == 2


def test_roc_auc_known_answer():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5


def test_noise_for_auc_gives_that_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200_000)
    for auc in (0.6, 0.8, 0.95):
        scores = y + noise_for_auc(auc) * rng.standard_normal(len(y))
        assert roc_auc(scores, y) == pytest.approx(auc, abs=0.005)
    assert noise_for_auc(1.0) == 0.0
    with pytest.raises(ValueError, match="--auc"):
        noise_for_auc(0.5)


def test_noisy_oracle_known_answer():
    """A B C A B A in 2 blocks with a perfect predictor and no bypass: C must be stored, the tie
    between A and B (both come back) evicts the older A, A's return evicts C (told: no reuse),
    then B and A hit: 2 hits of 6, as greedy Belady."""
    reqs = requests([("A",), ("B",), ("C",), ("A",), ("B",), ("A",)])
    (row,) = noisy_oracle(reqs, 2, [1.0])
    assert row["chunk_hit_rate"] == 2 / 6 and row["measured_auc"] == 1.0
    assert replay_hits(reqs, "belady", 2).sum() == 2


@pytest.mark.parametrize("tool", ["stack", "belady-gap", "noisy-oracle"])
def test_each_tool_is_one_command_writing_a_figure_and_a_table(tool, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(f'{{"timestamp": {i}, "input_length": 1024, "output_length": 1, '
                             f'"hash_ids": [{i % 3}, {10 + i % 5}]}}\n' for i in range(40)))
    main([tool, "--trace", str(trace), "--out", str(tmp_path), "--capacity", "0.3", "--auc", "0.8", "1.0"])
    stem = tool.replace("-", "_")
    assert (tmp_path / f"{stem}_t.png").stat().st_size > 0
    assert len((tmp_path / f"{stem}_t.csv").read_text().splitlines()) > 1


def test_bad_capacity_is_named(tmp_path):
    with pytest.raises(SystemExit, match="--capacity"):
        main(["stack", "--capacity", "1.5", "--out", str(tmp_path)])
