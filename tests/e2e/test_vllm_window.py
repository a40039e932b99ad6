"""Sliding-window models on a real vLLM engine (CPU): served correctly or refused, never a
silent wrong hit. Each engine runs in its own process (in-process engine core: faster start).

Models (tiny random Llamas, window 128 tokens, prompts up to 700 tokens, so most of a prompt
lies outside the window; `build_tiny_window_model`):
  hybrid    2 layers, sliding + full (the Gemma 2/3 pattern). With this connector vLLM turns
            the hybrid KV cache manager off and allocates the sliding layer in full
            (FullAttentionSpec with sliding_window): served. The connector engine prefills in
            256-token steps, so a prompt's chunks are stored over several steps.
  sliding   2 layers, both sliding (the Mistral-7B-v0.1 pattern). vLLM keeps SlidingWindowSpec
            and frees blocks outside the window: refused at start-up, with one warning.

Engines (about 2 minutes in all on 2 cores): hybrid_ref / sliding_ref without a connector (the
reference tokens), hybrid_conn / sliding_conn with it (a cold pass that stores, then every prompt
again after reset_prefix_cache(), so a cached token can only come from the connector).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from vllm_e2e import MODELS_DIR, loadable, make_prompts, run_engine

pytestmark = pytest.mark.e2e

WINDOW, CHUNK = 128, 128
PROMPTS = make_prompts(seed=1)             # long 700, diverge, exact 512, short 100, and
PROMPTS["far"] = [11] * 64 + PROMPTS["long"][64:]   # long with only its first 64 tokens changed
NAMES = list(PROMPTS)
ALL = [PROMPTS[n] for n in NAMES]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def models() -> dict[str, str]:
    from lmcache_lab.experiments.tiny_model import TinyWindowSpec, build_tiny_window_model

    return {
        "hybrid": str(build_tiny_window_model(MODELS_DIR / "llama-window-hybrid-2l", TinyWindowSpec(
            sliding_window=WINDOW, layer_types=("sliding_attention", "full_attention")))),
        "sliding": str(build_tiny_window_model(MODELS_DIR / "llama-window-sliding-2l",
                                               TinyWindowSpec(sliding_window=WINDOW))),
    }


class Engines:
    def __init__(self, models: dict[str, str], root: Path):
        self.models, self.root, self._runs = models, root, {}

    def get(self, name: str) -> dict:
        if name not in self._runs:
            family, kind = name.split("_")
            spec = {"model": self.models[family], "dtype": "float32", "max_model_len": 2048,
                    "ops": [{"op": "generate", "prompts": ALL, "max_tokens": MAX_TOKENS,
                             "reset_each": True}]}
            if kind == "conn":
                spec["connector"] = {"chunk_size": CHUNK}
                spec["max_num_batched_tokens"] = 256        # chunked prefill: stores over steps
                spec["ops"] = [{"op": "generate", "prompts": ALL, "max_tokens": MAX_TOKENS,
                                "reset_each": True}] * 2
            out = run_engine(spec, multiprocess=False, workdir=self.root / name)
            out["log"] = (self.root / name / "engine.log").read_text()
            self._runs[name] = out
        return self._runs[name]


@pytest.fixture(scope="module")
def engines(models, tmp_path_factory) -> Engines:
    return Engines(models, tmp_path_factory.mktemp("vllm-window"))


def test_hybrid_is_served_with_identical_tokens(engines):
    ref = engines.get("hybrid_ref")
    # the comparison has teeth: tokens 600 positions before the end, far outside the window,
    # change the output through the full-attention layer, so wrong KV there would show
    tokens = dict(zip(NAMES, ref["results"][0]["tokens"]))
    assert tokens["far"] != tokens["long"]
    run = engines.get("hybrid_conn")
    assert "lmcache_lab: the engine runs without lmcache_lab" not in run["log"]
    # one KV cache group, the sliding layer allocated in full (what makes chunks safe)
    assert "Hybrid KV cache manager is disabled for this hybrid model" in run["log"]
    cold, warm = run["results"]
    assert cold["tokens"] == ref["results"][0]["tokens"]
    assert warm["tokens"] == ref["results"][0]["tokens"]
    # cold: only "diverge" hits, on the chunks it shares with "long" (300 tokens), stored first
    shared = min(300 // CHUNK * CHUNK, loadable(len(PROMPTS["diverge"]), CHUNK))
    assert cold["num_cached_tokens"] == [0, shared, 0, 0, 0] and shared > WINDOW
    # every prompt was stored on the cold pass; each hit is its whole loadable prefix, far
    # beyond the window (long: 640 of 700 tokens)
    assert warm["num_cached_tokens"] == [loadable(len(p), CHUNK) for p in ALL]
    assert max(warm["num_cached_tokens"]) > 4 * WINDOW


def test_all_sliding_is_refused_clearly(engines):
    ref = engines.get("sliding_ref")
    run = engines.get("sliding_conn")
    refusals = [line for line in run["log"].splitlines()
                if "lmcache_lab: the engine runs without lmcache_lab" in line]
    assert len(refusals) == 1 and "SlidingWindowSpec" in refusals[0], refusals
    assert "sliding_window=128" in refusals[0] and "llama" in refusals[0]
    for result in run["results"]:
        assert result["tokens"] == ref["results"][0]["tokens"]
        assert result["num_cached_tokens"] == [0] * len(ALL)
