"""The kernel benchmark runs end to end (tiny shapes) and reports every op with its references."""
import json

from lmcache_lab.experiments.bench_kernels import main


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    result = main(["--quick", "--json", str(out)])
    rows = result["rows"]
    assert [r["op"] for r in rows[:3]] == ["gather", "gather(out=)", "scatter"]
    assert len(rows) == 3 * 3 + 2 * 4          # 3 layouts x 3 ops, 4 quant variants x 2 ops
    for r in rows:
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["copy_ms"] > 0 and r["gbps"] > 0
    text = capsys.readouterr().out
    assert "GB/s" in text and "vllm_cpu bf16" in text and "fp8 K/ch bf16" in text
    assert json.loads(out.read_text())["machine"] == result["machine"]
