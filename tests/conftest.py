"""Root test configuration.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, so the choice between the
interpreter (CPU) and compiled kernels (GPU) must be made here, before any kernel module is imported.
The same tests then run on CPU CI and on a GPU machine.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
