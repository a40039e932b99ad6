"""SGLang's storage config for one rank, as its cache controller builds it, for our backend."""
from __future__ import annotations

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

BACKEND = {"backend_name": "lmcache_lab", "module_path": "lmcache_lab.integrations.sglang",
           "class_name": "LMCacheLabStorage"}


def storage_config(extra: dict | None = None, *, tp_rank: int = 0, tp_size: int = 1,
                   mla: bool = False, model: str = "org/tiny-model") -> HiCacheStorageConfig:
    """What SGLang's cache controller builds (`_generate_storage_config`) for one rank."""
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1,
                                attn_cp_rank=0, attn_cp_size=1, is_mla_model=mla,
                                enable_storage_metrics=True, is_page_first_layout=False,
                                model_name=model, extra_config={**BACKEND, **(extra or {})})
