"""The kernel benchmark runs end to end (tiny shapes) and reports every op with its references."""
import json

from lmcache_lab.experiments.bench_kernels import main


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    result = main(["--quick", "--json", str(out)])
    rows = result["rows"]
    assert [r["op"] for r in rows[:3]] == ["gather", "gather(out=)", "scatter"]
    # 3 layouts x 3 ops, block-native gather/scatter where a chunk is whole blocks (vllm_flash's
    # 16-token blocks; not vllm_cpu's 128 at --quick's 32 tokens, not SGLang's 1-token pages),
    # 4 quant variants x 2 ops
    assert len(rows) == 3 * 3 + 2 + 2 * 4
    assert [r["op"] for r in rows if r["case"] == "vllm_flash bf16"][3:] == ["gather blocks",
                                                                            "scatter blocks"]
    for r in rows:
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["copy_ms"] > 0 and r["gbps"] > 0
    text = capsys.readouterr().out
    assert "GB/s" in text and "vllm_cpu bf16" in text and "fp8 K/ch bf16" in text
    assert json.loads(out.read_text())["machine"] == result["machine"]
