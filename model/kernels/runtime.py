"""Where the Triton kernels can run: a GPU, or Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported) on CPU tensors, the tests' way to check them without one; and which are on."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor


DTYPES = (torch.bfloat16, torch.float16, torch.float32)     # what the kernels compute in


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def on_kernel_device(t: Tensor) -> bool:
    """A GPU tensor, or any tensor under Triton's interpreter."""
    return t.is_cuda or interpreting()


@functools.cache
def capable_gpu(index: int) -> bool:
    """Ampere or later: the asynchronous copies and bfloat16 tensor-core dots the kernels are built
    on (Triton supports compute capability 8.0 on); a T4 or V100 keeps the torch step."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def kernel_can_run(t: Tensor) -> bool:
    """Triton is there and can compute on t: its device, its dtype."""
    device_ok = interpreting() or (t.is_cuda and capable_gpu(t.device.index))
    return device_ok and triton_available() and t.dtype in DTYPES


KERNELS_VARIABLE = "IDEFICS3_KERNELS"


def switched_on(name: str) -> bool:
    """A kernel's default switch: on where IDEFICS3_KERNELS (comma-separated names) lists it. An
    environment variable reaches every process of a job (tensor-parallel workers, Ray actors started
    from the driver's environment), where a switch flipped in one process reaches none."""
    return name in {part.strip() for part in os.environ.get(KERNELS_VARIABLE, "").split(",")}
