from __future__ import annotations

from collections import deque
from itertools import repeat
from typing import Any

import torch

from lmcache_lab.tiers.base import BudgetedTier, Key

_consume = deque(maxlen=0).extend   # runs an iterator to its end in C


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

    def _owned(self, value):
        if isinstance(value, dict):
            return {k: t.to(self.device) for k, t in value.items()}
        return value

    def _write(self, key, value, nbytes):
        self._data[key] = self._owned(value)
        return True

    def _write_new(self, keys, values, sizes, shared):
        if shared:
            values = repeat(self._owned(values))
        elif any(map(isinstance, values, repeat(dict))):
            values = map(self._owned, values)
        self._data.update(zip(keys, values))

    def _drop_many(self, keys):
        _consume(map(self._data.pop, keys))

    def _read(self, key):
        return self._data[key]

    def _drop(self, key):
        del self._data[key]
