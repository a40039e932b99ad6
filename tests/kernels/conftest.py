"""Kernel tests run on CUDA when a GPU is present (compiled Triton) and on the CPU otherwise (the
root conftest has set TRITON_INTERPRET=1 before any kernel module was imported). Every test body
runs with that device as torch's default device; `torch.get_default_device()` names it."""
import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _kernel_device():
    with DEVICE:
        yield
