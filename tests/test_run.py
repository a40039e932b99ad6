"""The Hydra entry point, driven as a user does: `python -m lmcache_lab.run ...` in a subprocess."""
import json
import subprocess
import sys

import pytest

from lmcache_lab.run import groups_with_default, rewrite_plus_overrides

CONTRACT = {"policy", "capacity_bytes", "capacity_blocks", "chunk_hit_rate", "token_hit_rate", "flops_saved",
            "requests"}


def run(args, cwd):
    proc = subprocess.run([sys.executable, "-m", "lmcache_lab.run", *args, "progress=false"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_plus_rewrite_only_for_groups_with_a_default():
    groups = groups_with_default()
    assert {"policy", "workload", "experiment", "model"} <= groups
    assert rewrite_plus_overrides(["+policy=lfu", "+foo=1", "++policy.x=2", "policy=lru"], groups) == \
        ["policy=lfu", "+foo=1", "++policy.x=2", "policy=lru"]


def test_default_experiment_is_the_engine_run_and_replay_keeps_its_trace_workload():
    from hydra import compose, initialize_config_dir

    from lmcache_lab.run import CONF_DIR
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["policy=lfu"])
        assert cfg.experiment.name == "engine" and cfg.workload._target_.endswith(".multi_round_qa")
        assert cfg.engine._target_.endswith(".VllmServer") and cfg.model.path == "tiny"
        cfg = compose("config", overrides=["experiment=replay", "policy=lfu"])
        assert cfg.experiment.name == "replay" and cfg.workload.trace == "sample" and cfg.model.name == "llama3_8b"


@pytest.mark.parametrize("form", ["+policy=lfu", "policy=lfu"])
def test_main_job_writes_summary_and_plot(tmp_path, form):
    run(["experiment=replay", form, f"hydra.run.dir={tmp_path}", "workload.limit=300"], tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert CONTRACT <= summary.keys() and summary["policy"] == "lfu" and summary["requests"] == 300
    assert summary["config"]["policy"]["name"] == "lfu" and "torch" in summary["versions"]
    assert (tmp_path / "hit_rate_over_time.png").stat().st_size > 1000


def test_replay_contract_with_a_trace_path(tmp_path):
    trace = tmp_path / "t.jsonl"
    lines = [json.dumps({"timestamp": i, "input_length": 1500, "output_length": 1, "hash_ids": [1, 2, 3 + i % 2]})
             for i in range(10)]
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run(["experiment=replay", f"workload.trace={trace}", "workload.capacity_fraction=0.5", "policy=lru",
         f"hydra.run.dir={out}"], tmp_path)
    s = json.loads((out / "summary.json").read_text())
    assert s["capacity_blocks"] == 2 and s["requests"] == 10 and s["policy"] == "lru"
    assert s["capacity_bytes"] == 2 * 512 * 131072


def test_sweep_combines_runs_into_one_report(tmp_path):
    proc = run(["-m", "experiment=replay", "policy=lru,lfu,cost_aware", "workload.capacity_fraction=0.02,0.1",
                "workload.limit=300", f"hydra.sweep.dir={tmp_path}"], tmp_path)
    csv = tmp_path / "replay_sweep.csv"
    assert csv.exists(), proc.stdout[-2000:]
    assert len(csv.read_text().strip().splitlines()) == 1 + 6
    assert list(tmp_path.glob("hit_rate_vs_capacity_*.png"))


def test_bad_override_fails_with_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmcache_lab.run", "chunk_size=-1", f"hydra.run.dir={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "chunk_size: must be a positive integer" in proc.stderr
