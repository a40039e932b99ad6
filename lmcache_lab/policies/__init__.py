"""Eviction policies, selected by name from config (`policy: {name: lfu, ...params}`)."""
from lmcache_lab.policies.base import EvictionPolicy
from lmcache_lab.policies.cost_aware import CostAwarePolicy
from lmcache_lab.policies.lfu import LFUPolicy
from lmcache_lab.policies.lru import LRUPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, CostAwarePolicy)
}


def make_policy(name: str, chunk_tokens: int = 256, **params) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"policy.name: {name!r} is not allowed; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](chunk_tokens=chunk_tokens, **params)
