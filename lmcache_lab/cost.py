"""Prefill cost model: what recomputing a chunk costs, so policies can weigh chunks by it.

Core: the live policies (cost_aware, hyperbolic) weigh chunks by `ModelCost.chunk_flops` of the
model named in their config (`MODELS`). The replay's time model built on it is lab
(`lmcache_lab.experiments.ttft_model`).

Forward FLOPs of a chunk of `c` tokens whose first token sits at position `p` (nanoGPT /
Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1, forward pass):

    flops(c, p) = 2·N·c  +  4·L·d·c·(p + c/2)
                  ^^^^^     ^^^^^^^^^^^^^^^^^
                  weights   attention over the p cached tokens plus the causal half of the chunk

N = non-embedding parameters, L = layers, d = attention width (heads × head_dim). The second
term grows with position: a chunk deep in a long prefix costs more to recompute than the first.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelCost:
    n_params: float   # N, non-embedding parameters
    n_layers: int     # L
    d_attn: int       # d = num_heads * head_dim
    kv_bytes_per_token: int  # 2 (K,V) * layers * kv_heads * head_dim * dtype bytes

    def __post_init__(self):
        assert self.n_params > 0 and self.n_layers > 0 and self.d_attn > 0 and self.kv_bytes_per_token > 0

    def chunk_flops(self, num_tokens: int, position: int) -> float:
        c, p = num_tokens, position
        return 2.0 * self.n_params * c + 4.0 * self.n_layers * self.d_attn * c * (p + c / 2)

    def prefix_flops(self, num_tokens: int) -> float:
        """Prefill FLOPs of a whole prompt of `num_tokens` (a chunk at position 0)."""
        return self.chunk_flops(num_tokens, 0)


# Llama-3-8B: 32 layers, 32 heads x 128, 8 KV heads, bf16 -> 2*32*8*128*2 = 131072 bytes/token.
LLAMA3_8B = ModelCost(n_params=7.0e9, n_layers=32, d_attn=4096, kv_bytes_per_token=131072)
MODELS = {"llama3_8b": LLAMA3_8B}
