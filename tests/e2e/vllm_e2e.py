"""Helpers of the end-to-end tests: tiny models, engine processes, prompts."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MODELS_DIR = Path(os.environ.get("LMCACHE_LAB_TEST_MODELS",
                                 Path(tempfile.gettempdir()) / "lmcache_lab_test_models"))
ENGINE_TIMEOUT_S = int(os.environ.get("LMCACHE_LAB_E2E_TIMEOUT", "420"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine(spec: dict, multiprocess: bool, workdir: Path) -> dict:
    """Run one engine in a fresh process; returns the driver's result (raises with its log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file, out_file, log_file = workdir / "spec.json", workdir / "out.json", workdir / "engine.log"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "lmcache_lab.experiments.vllm_driver",
                               str(spec_file), str(out_file)], stdout=log, stderr=subprocess.STDOUT,
                              timeout=ENGINE_TIMEOUT_S, env=env)
    if proc.returncode != 0 or not out_file.exists():
        tail = "\n".join(log_file.read_text().splitlines()[-40:])
        raise AssertionError(f"engine process failed (rc={proc.returncode}); log tail:\n{tail}")
    return json.loads(out_file.read_text())


def make_prompts(seed: int = 0) -> dict[str, list[int]]:
    """Token-id prompts (ids 10..3999 of the tiny vocabulary), named by what they exercise."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(10, 4000, n).tolist()  # noqa: E731
    long = ids(700)
    return {
        "long": long,                       # 2 full 256-chunks + a 1-block tail hit, 60 computed
        "diverge": long[:300] + ids(250),   # shares 300 tokens (ends mid-block) -> 1 chunk hit
        "exact": ids(512),                  # 2 full chunks, the last token must be computed
        "short": ids(100),                  # shorter than one chunk: never a hit
    }


def scrape_metrics(port: int) -> dict[str, float]:
    from lmcache_lab.experiments.vllm_driver import scrape

    return scrape(port)


CPU_BLOCK = 128     # vLLM's CPU_ATTN block size (the MLA tests pass CPU_MLA's 16)


def loadable(prompt_len: int, chunk: int, block: int = CPU_BLOCK, tails: bool = True) -> int:
    """Tokens of a prompt whose chunks are all stored that the connector serves, leaving at
    least one prompt token to compute (the engine needs logits to sample from). With a chunk of
    whole blocks the prompt's blocks past its last full chunk are stored too (a tail chunk,
    config `tail_blocks`, on by default): every whole block before that token, as the engine's
    own prefix cache serves. Otherwise its full chunks, a chunk ending the prompt served up to
    its last whole block before that token."""
    if tails and chunk % block == 0:
        return max(0, prompt_len - 1) // block * block
    full = prompt_len // chunk * chunk
    if full < prompt_len:
        return full
    return max(0, full - chunk, (prompt_len - 1) // block * block)


def chunks_read(hit: int, chunk: int) -> int:
    """Chunks a load of `hit` tokens reads (a partly served chunk is read whole)."""
    return -(-hit // chunk)


def run_engines_at_once(specs: list[tuple[dict, bool, Path]]) -> list[dict]:
    """Run several engines concurrently, each in its own process; results in the given order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(run_engine, *s) for s in specs]
        return [f.result() for f in futures]
