"""A host KV pool with the buffer and page methods of SGLang 0.5.23's `MHATokenToKVPoolHost`
(sglang/srt/mem_cache/pool_host/mha.py: `init_kv_buffer`, `get_data_page`,
`get_dummy_flat_data_page`, `set_from_flat_data_page`), for the `layer_first` and `page_first`
layouts, on CPU.

Why not the real class: importing `sglang.srt.mem_cache.pool_host` pulls in SGLang's model configs,
which import `torchvision`; PyPI's torchvision wheels are CUDA builds that fail to load against
the CPU torch here ("operator torchvision::nms does not exist"), and a CPU torchvision is not on
PyPI. So the pool object is rebuilt here from the same formulas; docs/sglang.md says so.
"""
from __future__ import annotations

import torch


class HostPool:
    """`kv_buffer`: layer_first `[2, L, size, H, D]`, page_first `[2, size, L, H, D]`."""

    def __init__(self, layer_num: int, size: int, head_num: int, head_dim: int, page_size: int,
                 layout: str = "layer_first", dtype: torch.dtype = torch.float32):
        assert layout in ("layer_first", "page_first") and size % page_size == 0
        self.layer_num, self.size, self.head_num, self.head_dim = layer_num, size, head_num, head_dim
        self.v_head_dim = head_dim
        self.page_size, self.layout, self.dtype, self.device = page_size, layout, dtype, "cpu"
        dims = ((2, layer_num, size, head_num, head_dim) if layout == "layer_first"
                else (2, size, layer_num, head_num, head_dim))
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def fill_random(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer.copy_(torch.randn(self.kv_buffer.shape, generator=g).to(self.dtype))

    def get_size_per_token(self) -> int:
        return 2 * self.head_dim * self.head_num * self.layer_num * self.dtype.itemsize

    def get_data_page(self, index, flat: bool = True) -> torch.Tensor:
        if self.layout == "layer_first":
            page = self.kv_buffer[:, :, index:index + self.page_size, :, :]
        else:
            page = self.kv_buffer[:, index:index + self.page_size, :, :, :]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros((2, self.layer_num, self.page_size, self.head_num, self.head_dim),
                           dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        if self.layout == "layer_first":
            self.kv_buffer[:, :, index:index + self.page_size, :, :] = data_page.reshape(
                2, self.layer_num, self.page_size, self.head_num, self.head_dim)
        else:
            self.kv_buffer[:, index:index + self.page_size, :, :, :] = data_page.reshape(
                2, self.page_size, self.layer_num, self.head_num, self.head_dim)

    def pages(self, host_indices: torch.Tensor) -> list[torch.Tensor]:
        """Copies of the flat pages that start at every `page_size`-th index (for comparisons)."""
        return [self.get_data_page(int(host_indices[i]), flat=True).clone()
                for i in range(0, host_indices.numel(), self.page_size)]


def page_indices(first_page: int, num_pages: int, page_size: int) -> torch.Tensor:
    """Host indices of `num_pages` consecutive pages starting at page `first_page`."""
    start = first_page * page_size
    return torch.arange(start, start + num_pages * page_size, dtype=torch.int64)
