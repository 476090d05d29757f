"""Projections of a few rows (a decode step's) as one Triton kernel that streams the weight once.

At 2 rows cuBLAS reads the 8B's q/k/v and o weights at 56-76 % of the bandwidth, with split-K and
its reduce kernels (BENCHMARKS.md, runs 5 and 6). Here each program owns a band of output columns
and all the rows: it walks K once, so the weight is read once, in large contiguous tiles, and no
partial sums leave the program. More rows than `MAX_ROWS` (prefill, big batches) go to F.linear.

`skinny_linear` is a custom op: torch.compile keeps it opaque (no guard on the rows, so one compiled
decode step serves every batch bucket), and it decides at run time. Triton is imported only when it
runs; with TRITON_INTERPRET=1 it also runs on CPU tensors (the tests' way to check it without a GPU).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .runtime import interpreting, kernel_can_run, switched_on

MAX_ROWS = 64

# model.linear's switch: its GPU projections through skinny_linear. Off (unless IDEFICS3_KERNELS lists
# it) until a GPU measures it faster; a compiled step traced before a change is traced again after it
# (dynamo guards on the flag).
enabled = switched_on("skinny")


def runs_skinny(x: Tensor, weight: Tensor) -> bool:
    """Whether skinny_linear takes its kernel for x (..., K) and weight (N, K), not F.linear."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (0 < rows <= MAX_ROWS and kernel_can_run(x) and x.dtype == weight.dtype and weight.dim() == 2
            and weight.stride(1) == 1 and x.device == weight.device)


def as_rows(t: Tensor) -> Tensor:
    """t as 2-D (rows, features) with inner stride 1; a split's view keeps its row stride (no copy)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def row_bucket(rows: int) -> int:
    """The rows a program holds (tl.dot wants at least 16): 16, 32 or 64."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


# Optional[...], not "| None": the spelling of torch's own custom-op examples, which every torch since
# 2.4 parses (this registration runs whenever model.linear is imported).
@torch.library.custom_op("idefics3::skinny_linear", mutates_args=())
def skinny_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:  # noqa: UP045
    """x @ weight.T + bias, by the kernel where runs_skinny says so."""
    if not runs_skinny(x, weight):
        return F.linear(x, weight, bias)
    flat = as_rows(x)
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    launch(flat, weight, None if bias is None else bias.contiguous(), out)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@skinny_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:  # noqa: UP045
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@dataclass(frozen=True)
class Fusion:
    """Elementwise work a projection takes into its kernel (model.kernels.fused): the reference's
    RMSNorm of x by `norm_weight` (prologue), x as the gate of silu(gate) * `up` (prologue), and
    `residual` + the projection (epilogue). Row-strided 2-D tensors, the norm's weight contiguous."""
    norm_weight: Tensor | None = None
    eps: float = 0.0
    up: Tensor | None = None
    residual: Tensor | None = None


NO_FUSION = Fusion()


def launch(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, config: dict | None = None,
           fusion: Fusion = NO_FUSION) -> None:
    """out (M, N) = x (M, K) @ weight (N, K).T (+ bias), with `fusion`'s prologue and epilogue.
    `config` pins the launch (the benchmark's sweep); without it the autotuner picks one per shape,
    once (outside CUDA-graph capture: the engine warms every step up before capturing it)."""
    m, k = x.shape
    n = weight.shape[0]
    up, residual = fusion.up, fusion.residual
    args = (x, weight, out, bias if bias is not None else out,
            fusion.norm_weight if fusion.norm_weight is not None else out, up if up is not None else out,
            residual if residual is not None else out, m, n, k, x.stride(0), weight.stride(0),
            up.stride(0) if up is not None else 0, residual.stride(0) if residual is not None else 0, fusion.eps)
    flags = dict(ROWS=row_bucket(m), HAS_BIAS=bias is not None, UPCAST=interpreting() or x.dtype == torch.float32,
                 NORM=fusion.norm_weight is not None, ACT=up is not None, RESIDUAL=residual is not None)
    if config is None:
        kernel = autotuned_kernel()
        kernel[lambda meta: (-(-n // meta["BLOCK_N"]),)](*args, **flags)
    else:
        kernel = plain_kernel()
        kernel[(-(-n // config["BLOCK_N"]),)](*args, **flags, **config)


def launch_prologue(x: Tensor, fusion: Fusion, rows_per_program: int = 4, block_k: int = 512) -> Tensor:
    """`fusion`'s prologue (norm or activation) of x (M, K) alone, as a new (M, K) tensor: for more
    rows than the kernel holds, whose GEMM is cuBLAS's (one kernel here, where eager torch takes 2-6)."""
    from .skinny_triton import prologue_kernel

    m, k = x.shape
    out = torch.empty(m, k, dtype=x.dtype, device=x.device)
    up = fusion.up
    prologue_kernel[(-(-m // rows_per_program),)](
        x, fusion.norm_weight if fusion.norm_weight is not None else x, up if up is not None else x, out, m, k,
        x.stride(0), up.stride(0) if up is not None else 0, fusion.eps, ROWS=rows_per_program, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, NORM=fusion.norm_weight is not None, ACT=up is not None)
    return out


def configs() -> list[dict]:
    """The launch configurations the autotuner times (and bench/skinny.py sweeps)."""
    return [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
            for bn in (16, 32, 64) for bk in (128, 256) for warps, stages in ((4, 3), (4, 4))]


def plain_kernel():
    from .skinny_triton import skinny_kernel       # imports triton: only once a kernel runs

    return skinny_kernel


@functools.cache
def autotuned_kernel():
    import triton
    tuned = [triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]},
                           num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs()]
    if interpreting():      # nothing to time there
        tuned = tuned[:1]
    return triton.autotune(configs=tuned, key=["N", "K", "ROWS", "HAS_BIAS", "NORM", "ACT", "RESIDUAL"])(plain_kernel())
