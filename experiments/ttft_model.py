"""The replay's time-to-first-token model: prefill FLOPs (`lmcache_lab.cost`) and load bytes to
seconds, from datasheet rates."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TTFTModel:
    """Time to first token of a request whose first `hit` tokens are loaded from a cache tier:

        ttft = prefill_flops(missed tokens at their positions) / (peak_flops · mfu)
             + hit_bytes / load_bytes_per_s + overhead_s

    Prefill time per token therefore grows with position exactly as
    `lmcache_lab.cost.ModelCost.chunk_flops` does (the attention term). Defaults
    (conf/experiment/replay.yaml says the same):
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
