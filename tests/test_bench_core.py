"""The core benchmark's reference loops keep the same cache as the real LRU replay (a reference that
simulated another cache would make its speed ratio meaningless), and the benchmark runs end to end.
Nothing here is timed."""
import pytest

from lmcache_lab.cost import LLAMA3_8B
from lmcache_lab.experiments import bench_core
from lmcache_lab.experiments.replay import replay, replay_tier
from lmcache_lab.experiments.trace import load_trace, unique_blocks
from lmcache_lab.policies import make_policy


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("loop", sorted(bench_core.REFERENCES))
def test_reference_loops_keep_the_replays_lru_cache(loop, fraction):
    requests = load_trace("sample")
    cap = int(fraction * unique_blocks(requests))
    tier = replay_tier(requests, make_policy("lru", 512), cap * 512 * LLAMA3_8B.kv_bytes_per_token)
    expected = replay(requests, tier, LLAMA3_8B).chunk_hit_rate
    assert bench_core.REFERENCES[loop](requests, cap) == expected


def test_bench_core_runs_and_reports_every_ratio(capsys):
    result = bench_core.main(["--skip-hashing", "--repeat", "1", "--policies", "lru,lfu"])["replay"]
    for name in ("bare_lru", *bench_core.REFERENCES, "lru", "lfu"):
        assert result[f"{name}_vs_bare"] > 0
    assert "replay protocol, one index" in capsys.readouterr().out


def test_bench_core_rejects_an_unknown_policy():
    with pytest.raises(SystemExit):
        bench_core.main(["--skip-hashing", "--policies", "lru,nope"])


def test_bench_core_rejects_a_capacity_below_the_longest_request(capsys):
    with pytest.raises(SystemExit):
        bench_core.main(["--skip-hashing", "--policies", "lru", "--fraction", "0.001"])
    assert "cannot hold the longest request" in capsys.readouterr().err
