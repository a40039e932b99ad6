from __future__ import annotations

from typing import Any

import torch

from lmcache_lab.tiers.base import BudgetedTier, Key


class MemoryTier(BudgetedTier):
    """Chunks held as tensors in memory on one torch device: `cpu` (DRAM) or `cuda` (GPU tier).

    The tier owns what it is given: a payload must not be a view into engine memory (the caller
    gathers into a fresh tensor). Tensors on another device are copied onto this one.
    """
    name = "cpu"

    def __init__(self, capacity_bytes: int, policy, device: str | torch.device = "cpu"):
        super().__init__(capacity_bytes, policy)
        self.device = torch.device(device)
        self.name = "cpu" if self.device.type == "cpu" else self.device.type
        self._data: dict[Key, Any] = {}

    def _write(self, key, value, nbytes):
        if isinstance(value, dict):
            value = {k: t.to(self.device) for k, t in value.items()}
        self._data[key] = value
        return True

    def _read(self, key):
        return self._data[key]

    def _drop(self, key):
        del self._data[key]
