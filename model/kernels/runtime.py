"""Where the Triton kernels can run: a GPU, or Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported) on CPU tensors, the tests' way to check them without one."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


DTYPES = (torch.bfloat16, torch.float16, torch.float32)     # what the kernels compute in


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
