"""The SGLang engine driver: its Hydra config builds it, its server command carries a backend
config that SGLang's own factory loads, and where the engine cannot run it says so clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sglang_config import storage_config
from omegaconf import OmegaConf
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from lmcache_lab.experiments import sglang_driver
from lmcache_lab.experiments.sglang_driver import SGLangServer, SGLangUnavailable
from lmcache_lab.integrations.sglang import LMCacheLabStorage

CONF = Path(__file__).resolve().parents[2] / "conf" / "engine" / "sglang.yaml"


def driver_from_hydra_config(**cache) -> SGLangServer:
    """What the experiment runner does with conf/engine/sglang.yaml."""
    cfg = OmegaConf.create({"model": {"path": "/models/m"}, "engine": OmegaConf.load(CONF)})
    engine = OmegaConf.to_container(cfg.engine, resolve=True)
    target = engine.pop("_target_")
    assert target == "lmcache_lab.experiments.sglang_driver.SGLangServer"
    for key in ("name", "model_cache_dir"):
        engine.pop(key)
    return SGLangServer(cache=cache, **engine)


def test_hydra_config_builds_the_driver():
    driver = driver_from_hydra_config()
    assert driver.model == "/models/m" and driver.page_size == 64 and driver.mem_layout == "layer_first"


def test_server_command_loads_our_backend_through_sglangs_factory(tmp_path):
    driver = driver_from_hydra_config(tiers={"cpu": {"capacity_bytes": "1MiB"},
                                             "disk": {"path": str(tmp_path)}})
    cmd = driver.command(port=30000)
    flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert "--enable-hierarchical-cache" in cmd and "--enable-cache-report" in cmd
    assert flag("--hicache-storage-backend") == "dynamic" and flag("--page-size") == "64"
    extra = json.loads(flag("--hicache-storage-backend-extra-config"))
    assert extra["interface_v1"] == 1
    config = storage_config()
    config.extra_config = extra
    backend = StorageBackendFactory.create_backend("dynamic", config, None)
    try:
        assert isinstance(backend, LMCacheLabStorage)
        assert [t.name for t in backend.engine.tiers] == ["cpu", "disk"]
    finally:
        backend.close()


def test_unavailable_engine_is_reported_clearly(tmp_path, capsys):
    if sglang_driver.engine_unavailable_reason() is None:
        pytest.skip("SGLang's engine can run here; the GPU demo covers this machine")
    driver = driver_from_hydra_config()
    with pytest.raises(SGLangUnavailable, match="SGLang's engine is not available here: .*docs/sglang.md"):
        driver.start(tmp_path)
    assert driver.proc is None and not (tmp_path / "sglang_server.log").exists()
    assert sglang_driver.main(["--model", "/models/m", "--workdir", str(tmp_path)]) == 2
    assert "SGLang's engine is not available here" in capsys.readouterr().err


def test_each_missing_piece_has_its_own_reason(monkeypatch):
    real = sglang_driver.importlib.util.find_spec
    monkeypatch.setattr(sglang_driver.importlib.util, "find_spec",
                        lambda name: None if name == "sglang" else real(name))
    assert sglang_driver.engine_unavailable_reason() == "the sglang package is not installed"
    monkeypatch.setattr(sglang_driver.importlib.util, "find_spec", real)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in sglang_driver.engine_unavailable_reason()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sglang_driver.importlib.util, "find_spec",
                        lambda name: None if name == "sgl_kernel" else real(name))
    assert "sgl_kernel" in sglang_driver.engine_unavailable_reason()


def test_shared_prefix_workload_shares_exactly_the_prefix():
    prompts = sglang_driver.shared_prefix_workload(4, prefix_tokens=100, suffix_tokens=10)
    assert all(len(p) == 110 and p[:100] == prompts[0][:100] for p in prompts)
    assert len({tuple(p[100:]) for p in prompts}) == 4


def test_client_reads_sglang_streams_and_retries_flush():
    """The driver's client against a loopback HTTP server that answers the way SGLang's
    /v1/completions (stream + include_usage + --enable-cache-report) and /flush_cache do
    (sglang/srt/entrypoints/openai/serving_completions.py): token chunks, then a chunk with
    `choices: []` and the usage, then [DONE]; /flush_cache refuses while write-backs are pending."""
    import http.server
    import threading

    seen: set = set()
    flushes = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            flushes.append(self.path)
            self.send_response(400 if len(flushes) == 1 else 200)   # first flush refused
            self.end_headers()

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = req["prompt"]
            cached = 100 if tuple(prompt[:100]) in seen else 0
            seen.add(tuple(prompt[:100]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunks = [{"choices": [{"index": 0, "text": "x"}]} for _ in range(req["max_tokens"])]
            chunks.append({"choices": [], "usage": {
                "prompt_tokens": len(prompt), "completion_tokens": req["max_tokens"],
                "prompt_tokens_details": {"cached_tokens": cached}}})
            for c in chunks:
                self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        driver = driver_from_hydra_config()
        driver.port = server.server_address[1]
        prompts = sglang_driver.shared_prefix_workload(3, prefix_tokens=100, suffix_tokens=5)
        first, second = sglang_driver.run_twice(driver, prompts, max_tokens=2, settle_s=0)
    finally:
        server.shutdown()
        server.server_close()
    assert flushes == ["/flush_cache"] * 3
    assert (first["prompt_tokens"], first["cached_tokens"]) == (315, 200)   # 2nd, 3rd share the prefix
    assert (second["prompt_tokens"], second["cached_tokens"]) == (315, 300)
    assert all(r["output_tokens"] == 2 and 0 < r["ttft_ms"] <= r["latency_ms"]
               for r in second["requests_detail"])
