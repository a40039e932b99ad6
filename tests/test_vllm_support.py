"""Which KV cache specs the vLLM connector serves (`integrations/vllm_support.py`), built from
vLLM's own spec classes and its own spec-unifying function (no engine)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1 import kv_cache_interface as k  # noqa: E402
from vllm.v1.core.kv_cache_utils import unify_hybrid_kv_cache_specs  # noqa: E402

from lmcache_lab.integrations.vllm_support import unsupported_spec_reason  # noqa: E402

ATTN = dict(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.float32)


def full(**kw):
    return k.FullAttentionSpec(**ATTN, **kw)


def swa(window=128):
    return k.SlidingWindowSpec(**ATTN, sliding_window=window)


@pytest.mark.parametrize("spec", [
    full(),
    full(sliding_window=128),            # a sliding layer vLLM allocates in full (HMA off)
    full(attention_chunk_size=256),      # a chunked-local layer allocated in full (Llama 4)
    k.MLAAttentionSpec(block_size=128, num_kv_heads=1, head_size=576, dtype=torch.bfloat16),
], ids=["full", "full+window", "full+chunked-local", "mla"])
def test_served(spec):
    assert unsupported_spec_reason(spec) is None


@pytest.mark.parametrize("spec, words", [
    (swa(), ["SlidingWindowSpec", "sliding_window=128", "null block"]),
    (k.SlidingWindowMLASpec(**ATTN, sliding_window=64), ["SlidingWindowMLASpec", "window"]),
    (k.ChunkedLocalAttentionSpec(**ATTN, attention_chunk_size=256),
     ["ChunkedLocalAttentionSpec", "attention_chunk_size=256"]),
    (k.RSWASpec(**ATTN, rswa_window=64), ["RSWASpec", "gap blocks"]),
    (k.SinkFullAttentionSpec(**ATTN, sink_len=128), ["SinkFullAttentionSpec", "sink"]),
    (k.CircularBufferSpec(**ATTN), ["CircularBufferSpec", "ring"]),
    (k.CrossAttentionSpec(**ATTN), ["CrossAttentionSpec", "encoder"]),
    (k.EncoderOnlyAttentionSpec(**ATTN), ["EncoderOnlyAttentionSpec", "no KV"]),
    (k.HiddenStateCacheSpec(**ATTN), ["HiddenStateCacheSpec", "hidden-state"]),
    (k.MambaSpec(block_size=128, shapes=((4, 8), (8, 16)), dtypes=(torch.float32,) * 2),
     ["MambaSpec", "recurrent state"]),
    (full(non_causal=True), ["non_causal", "prefix-LM"]),
    (full(tokens_per_state=4), ["tokens_per_state=4"]),
    (k.HiSparseHotSpec(block_size=128, page_size=1024, blocks_per_request=4),
     ["HiSparseHotSpec", "does not know"]),
], ids=lambda v: type(v).__name__ if isinstance(v, k.KVCacheSpec) else None)
def test_refused_names_the_spec(spec, words):
    why = unsupported_spec_reason(spec)
    assert why is not None
    for w in words:
        assert w in why, (w, why)


def test_unknown_subclass_of_a_served_kind_is_refused():
    """A future vLLM spec deriving from FullAttentionSpec may free blocks: served kinds are the
    exact types, never their subclasses."""
    from dataclasses import dataclass

    @dataclass(frozen=True, kw_only=True)
    class FutureSpec(k.FullAttentionSpec):
        pass

    assert "FutureSpec" in unsupported_spec_reason(FutureSpec(**ATTN))


def test_the_message_names_the_model():
    cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(
        model_type="mistral", architectures=["MistralForCausalLM"])))
    why = unsupported_spec_reason(swa(4096), cfg)
    assert why.startswith("mistral (MistralForCausalLM): SlidingWindowSpec")


def test_uniform_type_specs_are_judged_per_layer():
    ok = k.UniformTypeKVCacheSpecs(block_size=128, kv_cache_specs={"a": full(), "b": full()})
    assert unsupported_spec_reason(ok) is None
    bad = k.UniformTypeKVCacheSpecs(block_size=128,
                                    kv_cache_specs={"a": full(), "b": full(non_causal=True)})
    assert unsupported_spec_reason(bad).startswith("layer b: ")


def test_what_vllm_makes_of_sliding_models_with_hma_off():
    """vLLM's own unification (run when the hybrid KV cache manager is off, as it is with this
    connector): a hybrid model's sliding layers become full-allocation specs (served); a model
    whose every layer slides keeps SlidingWindowSpec (refused)."""
    hybrid = {"l0": swa(), "l1": full(), "l2": swa(), "l3": full()}
    unify_hybrid_kv_cache_specs(hybrid)
    assert {type(s) for s in hybrid.values()} == {k.FullAttentionSpec}
    merged = k.FullAttentionSpec.merge(list(hybrid.values()))
    assert merged.sliding_window == 128
    assert unsupported_spec_reason(merged) is None

    all_sliding = {"l0": swa(), "l1": swa()}
    unify_hybrid_kv_cache_specs(all_sliding)
    assert {type(s) for s in all_sliding.values()} == {k.SlidingWindowSpec}
    assert unsupported_spec_reason(all_sliding["l0"]) is not None
