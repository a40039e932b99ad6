"""The decode-sharing benchmark measures what it says: in the APC engine a shared round's requests
are served from one cached copy of the prefix and a private round's from none; in the connector
engine (prefix cache off) a shared round's requests are connector hits of the whole prefix. No
times are asserted (docs/experiments.md has them). Two engine starts on the 2-layer test model."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e

PREFIX = 256                                   # two CPU blocks, one connector chunk


def test_shared_rounds_read_one_cached_prefix_and_connector_rounds_load_it(tiny_model, tmp_path):
    from lmcache_lab.experiments.bench_decode_sharing import main

    out = main(["--model", tiny_model, "--work-dir", str(tmp_path / "work"), "--json",
                str(tmp_path / "out.json"), "--rounds", "3", "--requests", "2",
                "--prefix-tokens", str(PREFIX), "--suffix-tokens", "40", "--max-tokens", "3"])
    assert json.loads((tmp_path / "out.json").read_text()) == out
    for name in ("apc", "lab"):
        e = out["engines"][name]
        assert e["cached_tokens_median"] == {"shared": PREFIX, "private": 0}, (name, e)
        # rounds 0 and 2 are shared, round 1 private; 2 decode steps per round after the first tokens
        assert e["decode_steps"] == {"shared": 4, "private": 2}, (name, e)
        assert e["shared_step_ms"] > 0 and e["private_step_ms"] > 0
