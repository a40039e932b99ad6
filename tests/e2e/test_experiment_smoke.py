"""The main job's engine experiment, end to end, made tiny: `python -m lmcache_lab.run` drives a real
vLLM server (started and stopped by the runner) through two arms of a small multi_round_qa.

Three engine starts on the 2-layer test model (two through the server, one in-process); about
1-2 minutes on 2 idle cores.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.e2e

SYSTEM, QUESTION, ANSWER = 256, 300, 4    # chunk 0 = system prompt, chunk 1 = the user's own


def run_experiment(tiny_model, out, *extra):
    args = ["policy=lfu", f"engine.model={tiny_model}", "workload.users=2",
            "workload.rounds=2", f"workload.system_tokens={SYSTEM}", f"workload.question_tokens={QUESTION}",
            f"workload.answer_tokens={ANSWER}", "workload.qps=null", "engine.max_model_len=1024",
            "tiers.cpu.capacity_bytes=64MiB", f"hydra.run.dir={out}", "progress=false", "repeats=1", *extra]
    proc = subprocess.run([sys.executable, "-m", "lmcache_lab.run", *args], cwd=out.parent, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def check_lmcache_arm(lm, df, passes=1):
    """Round 1 of each user (860 tokens) starts with its round-0 prompt (556 tokens): chunk 0 (the
    shared system prompt) and chunk 1 (that user's first question) are loaded. Chunks stored: the
    system prompt once, chunk 1 of each user, chunk 2 of each user's round 1 = 5 per pass (each
    pass starts on a fresh engine with an empty cache).
    The engine's prefix cache is off in this arm, so every cached token was loaded by the connector,
    and the connector's endpoint counted exactly those."""
    round1 = df[(df["arm"] == "lmcache_lab") & (df["round"] == 1)]
    assert (round1["cached_tokens"] >= 512).all(), round1
    assert lm["connector"]["engine_prefix_hit_tokens"] == 0
    assert lm["connector"]["hit_tokens"] == lm["cached_tokens"] == df[df["arm"] == "lmcache_lab"]["cached_tokens"].sum()
    assert lm["metrics_token_hit_rate"] == pytest.approx(lm["token_hit_rate"]) and lm["token_hit_rate"] > 0.3
    assert lm["connector"]["stored_chunks"] == 5 * passes and lm["connector"]["load_failures"] == 0


def test_engine_experiment_through_a_real_vllm_server(tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = run_experiment(tiny_model, out, "arms=[cold,lmcache_lab]")
    assert "speedup_p50_vs_cold" in proc.stdout and "connector endpoint" in proc.stdout

    s = json.loads((out / "summary.json").read_text())
    assert s["experiment"] == "engine" and s["engine"] == "vllm" and s["workload"] == "multi_round_qa"
    assert s["model"] == tiny_model and s["policy"] == "lfu" and set(s["arms"]) == {"cold", "lmcache_lab"}
    cold, lm = s["arms"]["cold"], s["arms"]["lmcache_lab"]
    for a in (cold, lm):
        assert a["requests"] == 4 and 0 < a["ttft_ms"]["p50"] <= a["ttft_ms"]["p90"]
    assert cold["token_hit_rate"] == 0                        # no connector, no prefix cache
    df = pd.read_csv(out / "requests.csv")
    assert len(df) == 8 and (df["output_tokens"] == ANSWER).all()
    check_lmcache_arm(lm, df)
    for f in ("ttft_cdf.png", "ttft_by_request.png", "hit_rate_over_time.png", "report.md"):
        assert (out / f).stat().st_size > 500, f


def test_in_process_engine_driver_two_passes(tiny_model, tmp_path):
    """`repeats=2`: the arm runs twice, each pass on a fresh engine that starts cold; the summary
    pools both and keeps each pass's p50."""
    out = tmp_path / "offline"
    run_experiment(tiny_model, out, "engine=vllm_offline", "arms=[lmcache_lab]", "repeats=2")
    s = json.loads((out / "summary.json").read_text())
    assert s["driver"] == "VllmOffline" and list(s["arms"]) == ["lmcache_lab"] and s["repeats"] == 2
    df = pd.read_csv(out / "requests.csv")
    assert len(df) == 8 and (df["output_tokens"] == ANSWER).all() and (df["ttft_ms"] > 0).all()
    assert (df["latency_ms"] >= df["ttft_ms"]).all()
    assert df.groupby("repeat").size().to_dict() == {0: 4, 1: 4}
    assert (df[df["round"] == 0]["cached_tokens"] < 512).all()       # nothing carried over between passes
    lm = s["arms"]["lmcache_lab"]
    assert len(lm["ttft_p50_ms_per_repeat"]) == 2 and (out / "repeat1" / "engine_lmcache_lab.log").exists()
    check_lmcache_arm(lm, df, passes=2)
