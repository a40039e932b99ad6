"""Engine-experiment results: per-arm summaries from records, reports rebuilt from saved files only,
and sweeps combined into one report (no engine needed)."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lmcache_lab.experiments.engine_report import build_report, save_run
from lmcache_lab.config import load_config
from lmcache_lab.experiments.engine_run import (ArmResult, ArmSpec, Record, arm_summary, check_repeats,
                                             percentiles, run_passes, speedups)


def records(arm, ttfts, prompt=1000, cached=0):
    return [Record(arm, i, f"user{i % 2}", i // 2, 0.1 * i, 0.1 * i, t, t + 50, prompt, cached, 4)
            for i, t in enumerate(ttfts)]


def fake_run(out_dir, policy="lru", capacity=64 * 2**20, scale=1.0):
    """A run dir as run_engine_experiment leaves it (summary from records, as the runner does)."""
    results = {"cold": ArmResult(records("cold", [900 * scale + 10 * i for i in range(8)]), 15.0),
               "engine_cache": ArmResult(records("engine_cache", [400 * scale] * 8, cached=500), 15.0),
               "lmcache_lab": ArmResult(records("lmcache_lab", [100 * scale + i for i in range(8)], cached=750),
                                        16.0, {"lmcache_lab_hit_tokens_total": 4000.0,
                                               "lmcache_lab_engine_prefix_hit_tokens_total": 2000.0,
                                               "lmcache_lab_lookup_tokens_total": 7000.0})}
    summary = {"experiment": "engine", "engine": "vllm", "model": "tiny_llama", "workload": "multi_round_qa",
               "policy": policy, "capacity_bytes": capacity, "chunk_size": 256,
               "arms": {k: arm_summary(v) for k, v in results.items()}}
    save_run(out_dir, summary, [r for v in results.values() for r in v.records])
    return summary


def test_arm_summary_from_records():
    res = ArmResult(records("x", [10.0, 20.0, 30.0, 40.0], prompt=100, cached=25), 1.0,
                    {"lmcache_lab_hit_tokens_total": 60.0, "lmcache_lab_engine_prefix_hit_tokens_total": 40.0})
    s = arm_summary(res)
    assert s["requests"] == 4 and s["token_hit_rate"] == 0.25
    assert s["ttft_ms"] == {"mean": 25.0, "p50": 25.0, "p90": pytest.approx(37.0)}
    assert s["metrics_token_hit_rate"] == 0.25 and s["connector_token_hit_rate"] == 0.15
    assert np.isnan(percentiles([])["p50"])


def test_run_report_rebuilt_from_saved_files(tmp_path):
    summary = fake_run(tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    for arm in ("cold", "engine_cache", "lmcache_lab"):   # the contract
        a = saved["arms"][arm]
        assert {"requests", "ttft_ms", "token_hit_rate"} <= a.keys() and {"mean", "p50", "p90"} <= a["ttft_ms"].keys()
    assert {"experiment", "engine", "model", "workload"} <= saved.keys()
    df = pd.read_csv(tmp_path / "requests.csv")
    assert len(df) == 24 and set(df.columns) >= {"arm", "arrival_s", "prompt_tokens", "cached_tokens",
                                                 "ttft_ms", "latency_ms"}
    pngs = ["ttft_cdf.png", "ttft_by_request.png", "hit_rate_over_time.png"]
    for f in pngs + ["report.md"]:
        (tmp_path / f).unlink()
    proc = subprocess.run([sys.executable, "-m", "lmcache_lab.report", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all((tmp_path / f).stat().st_size > 5000 for f in pngs)
    md = (tmp_path / "report.md").read_text()
    cold_p50 = summary["arms"]["cold"]["ttft_ms"]["p50"]
    lm_p50 = summary["arms"]["lmcache_lab"]["ttft_ms"]["p50"]
    assert f"| lmcache_lab | 8 | {lm_p50:.1f} |" in md and f"{cold_p50 / lm_p50:.3f}" in md
    assert all(f"]({f})" in md for f in pngs)


def test_sweep_runs_combine_into_one_report(tmp_path):
    policies, caps = ["lru", "lfu", "cost_aware"], [32, 128]
    for i, (p, c) in enumerate((p, c) for p in policies for c in caps):
        fake_run(tmp_path / str(i), policy=p, capacity=c * 2**20, scale=1 + 0.1 * i)
    (tmp_path / "0" / "report.md").unlink()
    out = build_report(tmp_path)
    assert out == tmp_path / "report.md"
    df = pd.read_csv(tmp_path / "engine_sweep.csv")
    assert len(df) == 6 * 3 and set(df["policy"]) == set(policies) and set(df["capacity_mib"]) == {32.0, 128.0}
    lm = df[(df["arm"] == "lmcache_lab") & (df["policy"] == "lfu") & (df["capacity_mib"] == 128.0)]
    assert lm["ttft_p50_ms"].item() == pytest.approx(np.median([100 * 1.3 + i for i in range(8)]))
    md = out.read_text()
    assert all(p in md for p in policies) and "ttft_vs_capacity.png" in md and "hit_rate_vs_capacity.png" in md
    assert (tmp_path / "ttft_vs_capacity.png").stat().st_size > 5000
    assert (tmp_path / "0" / "report.md").exists()       # each run's report is rebuilt too


def test_report_of_an_empty_dir_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        build_report(tmp_path)


class PassDriver:
    """A driver that answers every arm at once and remembers the order engines were started in."""

    def __init__(self):
        self.calls = []

    def run_arm(self, arm, requests, workdir, progress):
        self.calls.append((arm.name, workdir.name))
        k = sum(1 for name, _ in self.calls if name == arm.name)          # this arm's pass, from 1
        ttft = {"cold": 900.0, "engine_cache": 100.0, "lmcache_lab": 100.0 + 10 * k}[arm.name]
        metrics = {"lmcache_lab_hit_tokens_total": 500.0} if arm.name == "lmcache_lab" else {}
        return ArmResult(records(arm.name, [ttft] * 4), float(k), metrics)


def test_passes_rotate_arms_and_pool_them(tmp_path):
    arms = [ArmSpec("cold", False), ArmSpec("engine_cache", True), ArmSpec("lmcache_lab", False)]
    driver = PassDriver()
    results = run_passes(driver, arms, [], tmp_path, 3, progress=False)
    assert [name for name, _ in driver.calls] == ["cold", "engine_cache", "lmcache_lab",
                                                  "engine_cache", "lmcache_lab", "cold",
                                                  "lmcache_lab", "cold", "engine_cache"]
    assert [w for _, w in driver.calls] == ["repeat0"] * 3 + ["repeat1"] * 3 + ["repeat2"] * 3
    lab = results["lmcache_lab"]
    assert [r.repeat for r in lab.records] == [0] * 4 + [1] * 4 + [2] * 4
    assert lab.startup_s == 2.0 and lab.connector_metrics == {"lmcache_lab_hit_tokens_total": 1500.0}
    summary = {name: arm_summary(res) for name, res in results.items()}
    assert summary["lmcache_lab"]["ttft_p50_ms_per_repeat"] == [110.0, 120.0, 130.0]
    assert summary["lmcache_lab"]["ttft_ms"]["p50"] == 120.0                 # pooled
    ratios = speedups(summary)
    assert ratios["speedup_p50_vs_engine_cache"] == pytest.approx(100 / 120)
    assert ratios["speedup_p50_vs_engine_cache_per_repeat"] == pytest.approx([100 / 110, 100 / 120, 100 / 130])
    assert ratios["speedup_p50_vs_cold_per_repeat"] == pytest.approx([900 / 110, 900 / 120, 900 / 130])
    one = run_passes(PassDriver(), arms, [], tmp_path, 1, progress=False)
    assert "ttft_p50_ms_per_repeat" not in arm_summary(one["lmcache_lab"])
    assert "speedup_p50_vs_cold_per_repeat" not in speedups({k: arm_summary(v) for k, v in one.items()})


@pytest.mark.parametrize("repeats", [0, -1, 1.5, "2", True])
def test_repeats_must_be_a_positive_integer(repeats):
    with pytest.raises(ValueError, match="repeats"):
        check_repeats(repeats, load_config({}))


def test_repeats_refuse_tiers_that_outlive_an_engine(tmp_path):
    disk = load_config({"tiers": {"disk": {"path": str(tmp_path)}}})
    assert check_repeats(1, disk) == 1
    with pytest.raises(ValueError, match=r"\['disk'\]"):
        check_repeats(2, disk)
    assert check_repeats(3, load_config({})) == 3


def test_report_of_several_passes(tmp_path):
    arms = [ArmSpec("cold", False), ArmSpec("engine_cache", True), ArmSpec("lmcache_lab", False)]
    results = run_passes(PassDriver(), arms, [], tmp_path, 2, progress=False)
    arm_sums = {k: arm_summary(v) for k, v in results.items()}
    summary = {"experiment": "engine", "engine": "vllm", "model": "tiny_llama", "workload": "multi_round_qa",
               "policy": "lru", "capacity_bytes": 2**30, "chunk_size": 256, "arms": arm_sums,
               **speedups(arm_sums), "repeats": 2}
    save_run(tmp_path, summary, [r for v in results.values() for r in v.records])
    md = (tmp_path / "report.md").read_text()
    assert "2 passes per arm" in md and "| 1 | 900.0 | 100.0 | 120.0 |" in md
    df = pd.read_csv(tmp_path / "requests.csv")
    assert sorted(df["repeat"].unique()) == [0, 1] and len(df) == 24
