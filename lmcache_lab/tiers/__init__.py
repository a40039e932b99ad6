"""Storage tiers: memory (CPU or GPU), local disk, Redis; and the tiered store over them."""
from __future__ import annotations

from lmcache_lab.config import CacheConfig
from lmcache_lab.policies import make_policy
from lmcache_lab.tiers.base import BudgetedTier, TierStats, payload_nbytes
from lmcache_lab.tiers.disk import DiskTier
from lmcache_lab.tiers.memory import MemoryTier
from lmcache_lab.tiers.redis import RedisTier, RedisTierError
from lmcache_lab.tiers.tiered import TieredStore

__all__ = ["BudgetedTier", "DiskTier", "MemoryTier", "RedisTier", "RedisTierError", "TierStats", "TieredStore",
           "build_tiers", "payload_nbytes"]


def build_tiers(config: CacheConfig) -> list[BudgetedTier]:
    """The tiers a config turns on, fastest first, each with its own policy instance."""
    def policy():
        return make_policy(config.policy.name, chunk_tokens=config.chunk_size, **config.policy.params)

    tiers: list[BudgetedTier] = []
    if config.tiers.cpu.capacity_bytes > 0:
        tiers.append(MemoryTier(config.tiers.cpu.capacity_bytes, policy(), device=config.tiers.cpu.device))
    if config.tiers.disk.path:
        tiers.append(DiskTier(config.tiers.disk.path, config.tiers.disk.capacity_bytes, policy()))
    if config.tiers.redis.url:
        # Redis evicts by its own maxmemory policy (shared by all instances): no local policy.
        tiers.append(RedisTier(config.tiers.redis))
    if config.tiers.s3.url:
        # the bucket keeps its own budget (lifecycle rules) and is shared: no local policy
        from lmcache_lab.tiers.s3 import S3Tier  # boto3 is imported only when S3 is configured
        tiers.append(S3Tier(config.tiers.s3))
    return tiers
