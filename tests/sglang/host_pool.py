"""A host KV pool running SGLang 0.5.23's own page code (`MHATokenToKVPoolHost.get_data_page`,
`get_dummy_flat_data_page`, `set_from_flat_data_page`, taken from the installed
sglang/srt/mem_cache/pool_host/mha.py), over a buffer allocated as its `init_kv_buffer` does for the
`layer_first` and `page_first` layouts, on CPU.

Why not the real class: importing `sglang.srt.mem_cache.pool_host` pulls in SGLang's model configs,
which import `torchvision`; PyPI's torchvision wheels are CUDA builds that fail to load against the
CPU torch here ("operator torchvision::nms does not exist"), and a CPU torchvision is not on PyPI.
So the three page methods are compiled from SGLang's source file (they use only `self` and
`torch`) and bound to this class; only the buffer allocation is restated here. docs/sglang.md
says so.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import torch

PAGE_METHODS = ("get_data_page", "get_dummy_flat_data_page", "set_from_flat_data_page")


def sglang_page_methods(class_name: str = "MHATokenToKVPoolHost") -> dict:
    """The page methods of SGLang's host pool class, compiled from the installed source."""
    root = Path(importlib.util.find_spec("sglang").submodule_search_locations[0])
    path = root / "srt" / "mem_cache" / "pool_host" / "mha.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    funcs = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in PAGE_METHODS]
    assert sorted(f.name for f in funcs) == sorted(PAGE_METHODS), f"{path}: page methods changed"
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(path), "exec"), namespace)
    return {name: namespace[name] for name in PAGE_METHODS}


class HostPool:
    """`kv_buffer`: layer_first `[2, L, size, H, D]`, page_first `[2, size, L, H, D]` (as SGLang's
    `init_kv_buffer`); the page methods are SGLang's."""

    def __init__(self, layer_num: int, size: int, head_num: int, head_dim: int, page_size: int,
                 layout: str = "layer_first", dtype: torch.dtype = torch.float32):
        assert layout in ("layer_first", "page_first") and size % page_size == 0
        self.layer_num, self.size, self.head_num, self.head_dim = layer_num, size, head_num, head_dim
        self.v_head_dim = head_dim
        self.page_size, self.layout, self.dtype, self.device = page_size, layout, dtype, "cpu"
        self.pin_memory = False
        dims = ((2, layer_num, size, head_num, head_dim) if layout == "layer_first"
                else (2, size, layer_num, head_num, head_dim))
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def fill_random(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer.copy_(torch.randn(self.kv_buffer.shape, generator=g).to(self.dtype))

    def pages(self, host_indices: torch.Tensor) -> list[torch.Tensor]:
        """Copies of the flat pages that start at every `page_size`-th index (for comparisons)."""
        return [self.get_data_page(int(host_indices[i]), flat=True).clone()
                for i in range(0, host_indices.numel(), self.page_size)]


def page_indices(first_page: int, num_pages: int, page_size: int) -> torch.Tensor:
    """Host indices of `num_pages` consecutive pages starting at page `first_page`."""
    start = first_page * page_size
    return torch.arange(start, start + num_pages * page_size, dtype=torch.int64)


for _name, _fn in sglang_page_methods().items():
    setattr(HostPool, _name, _fn)
