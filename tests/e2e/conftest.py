"""End-to-end fixtures: tiny models, and real vLLM engines, each in its own process.

An engine run is a spec for `lmcache_lab.experiments.vllm_driver` (model, dtype, connector config,
a list of operations) executed by a fresh Python process; runs are cached per session so several
tests can assert on one run. Engines without the multi-process layout under test run with
`VLLM_ENABLE_V1_MULTIPROCESSING=0` (one process instead of three: faster start).
"""
from __future__ import annotations

import pytest

from vllm_e2e import MODELS_DIR


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """A 2-layer random Llama (built once, reused across sessions)."""
    from lmcache_lab.experiments.tiny_model import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(layers=2, hidden=256, heads=4, kv_heads=2, intermediate=512, vocab=4096)
    return str(build_tiny_model(MODELS_DIR / "llama-2l-256", spec))


@pytest.fixture(scope="session")
def tiny_lora(tiny_model) -> str:
    """A rank-8 random LoRA adapter (PEFT files) for every projection of the 2-layer model."""
    from lmcache_lab.experiments.tiny_model import LORA_TARGETS, build_tiny_lora

    return str(build_tiny_lora(MODELS_DIR / "llama-2l-256-lora-r8", tiny_model, rank=8,
                               targets=LORA_TARGETS))
