"""Prefill cost model: what recomputing a chunk costs, so policies can weigh chunks by it.

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


@dataclass(frozen=True)
class TTFTModel:
    """Time to first token of a request whose first `hit` tokens are loaded from a cache tier:

        ttft = prefill_flops(missed tokens at their positions) / (peak_flops · mfu)
             + hit_bytes / load_bytes_per_s + overhead_s

    Prefill time per token therefore grows with position exactly as `ModelCost.chunk_flops` does
    (the attention term). Defaults (conf/experiment/replay.yaml says the same):
      * peak_flops 989.4e12: H100 SXM dense BF16 tensor-core peak (NVIDIA H100 datasheet).
      * mfu 0.5: prefill of long prompts runs compute-bound at roughly half of peak on H100/A100
        (e.g. an 8k-token Llama-3-8B prefill, 1.3e14 FLOPs, takes ≈ 0.27 s at 0.5 of H100 peak,
        ≈ 0.85 s at 0.5 of A100's 312e12, in line with published A100 prefill latencies).
      * load_bytes_per_s 25e9: a CPU-DRAM tier loaded into the GPU's paged KV over PCIe Gen5 x16
        (64 GB/s raw; scattered block copies reach well under half of it).
    These are datasheet values and an assumed efficiency, not a measurement on this machine.
    """
    peak_flops: float = 989.4e12
    mfu: float = 0.5
    load_bytes_per_s: float = 25e9
    overhead_s: float = 0.0

    def __post_init__(self):
        assert self.peak_flops > 0 and 0 < self.mfu <= 1 and self.load_bytes_per_s > 0 and self.overhead_s >= 0

    def seconds(self, prefill_flops, load_bytes):
        return prefill_flops / (self.peak_flops * self.mfu) + load_bytes / self.load_bytes_per_s + self.overhead_s

    def describe(self) -> dict:
        return {"peak_flops": self.peak_flops, "mfu": self.mfu, "load_bytes_per_s": self.load_bytes_per_s,
                "overhead_s": self.overhead_s}
