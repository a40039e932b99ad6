"""Which vLLM KV cache specs the connector can serve: pure functions, no engine needed.

The connector stores a prompt's KV in chunks keyed by the tokens up to the chunk's end, and loads
them into the request's blocks. That is correct only when (a) the KV of position i depends on
tokens 0..i alone (causal attention), and (b) vLLM keeps a real block for every position of the
prompt while the request runs, so the connector's store reads, and its load writes, that request's
own blocks. A KV cache spec (vllm/v1/kv_cache_interface.py) tells both, through the manager vLLM
runs for it (vllm/v1/core/single_type_kv_cache_manager.py, `register_all_kvcache_specs`):

* `FullAttentionSpec`, `MLAAttentionSpec` (exact types): `FullAttentionManager` never frees a
  block before the request ends. A `sliding_window` or `attention_chunk_size` on such a spec is
  what vLLM leaves on layers it *promoted* to full allocation (`unify_hybrid_kv_cache_specs` /
  `_promote_local_kv_cache_specs` in vllm/v1/core/kv_cache_utils.py: a hybrid model, e.g. Gemma 2/3
  or Llama 4, with the hybrid KV cache manager (HMA) off, which this connector, lacking
  `SupportsHMA`, always asks for): blocks exist for every token, the window only narrows what a
  query attends to, and a position's KV is still a function of the tokens up to it. Served. (Not
  when `non_causal`: a prefix-LM prefix's KV depends on the tokens after it.)
* `SlidingWindowSpec` (and `SlidingWindowMLASpec`): `SlidingWindowManager` frees every block
  that falls out of the window (`remove_skipped_blocks`) and, for a connector hit, hands the
  skipped positions the shared null block (`add_local_computed_blocks` /
  `allocate_external_computed_blocks`). A load would write chunks into the null block, and a
  chunk completed over several steps (chunked prefill) would be read from blocks already freed
  and maybe reused: a silent wrong hit. vLLM keeps this spec, HMA off or not, whenever *every*
  layer slides (Mistral-7B-v0.1, a Qwen2/Llama config whose layers are all `sliding_attention`).
  Refused.
* `ChunkedLocalAttentionSpec`: same, blocks left of the current attention chunk are freed.
  Refused. `RSWASpec` (gap blocks freed during decode), `SinkFullAttentionSpec` (sink blocks ahead
  of the prompt shift its block table), `CircularBufferSpec` (one ring block per request),
  `CrossAttentionSpec` (encoder KV: depends on the encoder input, not the prompt),
  `EncoderOnlyAttentionSpec` (no cache), `MambaSpec` (a recurrent state, not per-token KV),
  `HiddenStateCacheSpec`, HiSparse specs, packed states (`tokens_per_state` != 1) and any spec
  kind this module does not know: refused, with a message that names it.

The KV *layout* (backend, tensor shape, dtype, MLA latent) is decided elsewhere
(`KVLayout.from_vllm` in kernels/layout.py); this module only answers whether the spec's
semantics allow chunk reuse.
"""
from __future__ import annotations

from typing import Any


def _model_name(vllm_config: Any) -> str:
    """'<model_type> (<architectures>)' of the engine's model, or '' when unknown."""
    hf = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    if hf is None:
        return ""
    arch = ", ".join(getattr(hf, "architectures", None) or [])
    kind = getattr(hf, "model_type", None) or "model"
    return f"{kind} ({arch})" if arch else kind


def spec_reason(spec: Any) -> str | None:
    """None when the connector can serve a KV cache group of this spec; else why not (one
    sentence naming the spec kind and the vLLM behaviour that rules it out)."""
    from vllm.v1 import kv_cache_interface as k

    name = type(spec).__name__
    if hasattr(spec, "kv_cache_specs"):                     # UniformTypeKVCacheSpecs: per layer
        for layer, s in sorted(spec.kv_cache_specs.items()):
            if (why := spec_reason(s)) is not None:
                return f"layer {layer}: {why}"
        return None
    if isinstance(spec, k.MambaSpec):
        return (f"{name}: a Mamba/SSM layer keeps one recurrent state per request, not per-token "
                "KV, so prefix chunks of it do not exist")
    if isinstance(spec, k.CrossAttentionSpec):
        return (f"{name}: cross-attention KV is computed from the encoder input, not from the "
                "prompt tokens that key the chunks")
    if isinstance(spec, k.EncoderOnlyAttentionSpec):
        return f"{name}: encoder-only attention keeps no KV cache"
    if isinstance(spec, k.SlidingWindowSpec):               # incl. SlidingWindowMLASpec
        return (f"{name} (sliding_window={spec.sliding_window}): vLLM's SlidingWindowManager "
                "frees blocks outside the window and gives a connector's skipped positions the "
                "shared null block, so chunks cannot be stored or loaded there; vLLM keeps this "
                "spec when every attention layer slides (e.g. Mistral-7B-v0.1)")
    if isinstance(spec, k.ChunkedLocalAttentionSpec):
        return (f"{name} (attention_chunk_size={spec.attention_chunk_size}): vLLM's "
                "ChunkedLocalAttentionManager frees blocks left of the current attention chunk")
    if isinstance(spec, k.CircularBufferSpec):
        return f"{name}: one ring-buffer block per request, not a block per prompt position"
    if isinstance(spec, k.RSWASpec):
        return (f"{name} (rswa_window={spec.rswa_window}): vLLM frees the gap blocks between the "
                "prefill and the decode window")
    if isinstance(spec, k.SinkFullAttentionSpec):
        return (f"{name} (sink_len={spec.sink_len}): sink blocks ahead of the prompt shift its "
                "block table")
    if isinstance(spec, k.HiddenStateCacheSpec):
        return f"{name}: a hidden-state cache, not attention KV"
    if type(spec) not in (k.FullAttentionSpec, k.MLAAttentionSpec):
        return f"{name}: a KV cache spec kind lmcache_lab does not know; not served"
    if spec.non_causal:
        return (f"{name} with non_causal=True (prefix-LM attention): a prefix position's KV "
                "depends on the tokens after it, not only on the prefix that keys its chunk")
    if getattr(spec, "tokens_per_state", 1) != 1:
        return (f"{name} with tokens_per_state={spec.tokens_per_state}: states pack several "
                "tokens (or several states per token), not one KV entry per position")
    return None


def unsupported_spec_reason(spec: Any, vllm_config: Any = None) -> str | None:
    """None when the connector can serve a KV cache group of `spec` (see the module docstring);
    else a message naming the model (from `vllm_config`, when given) and the spec kind."""
    why = spec_reason(spec)
    if why is None:
        return None
    model = _model_name(vllm_config)
    return f"{model}: {why}" if model else why
