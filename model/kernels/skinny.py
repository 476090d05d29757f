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
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .runtime import DTYPES, interpreting, triton_available

MAX_ROWS = 64

# model.linear's switch: its GPU projections through skinny_linear. Off until a GPU measures it faster;
# a compiled step traced before a change is traced again after it (dynamo guards on the flag).
enabled = False


def runs_skinny(x: Tensor, weight: Tensor) -> bool:
    """Whether skinny_linear takes its kernel for x (..., K) and weight (N, K), not F.linear."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (0 < rows <= MAX_ROWS and (x.is_cuda or interpreting()) and triton_available()
            and x.dtype == weight.dtype and x.dtype in DTYPES and weight.dim() == 2
            and weight.stride(1) == 1 and x.device == weight.device)


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
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    launch(flat, weight, None if bias is None else bias.contiguous(), out)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@skinny_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:  # noqa: UP045
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def launch(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, config: dict | None = None) -> None:
    """out (M, N) = x (M, K) @ weight (N, K).T (+ bias). `config` pins the launch (the benchmark's
    sweep); without it the autotuner picks one per shape, once (outside CUDA-graph capture: the
    engine warms every step up before capturing it)."""
    m, k = x.shape
    n = weight.shape[0]
    args = (x, weight, out, bias if bias is not None else out, m, n, k, x.stride(0), weight.stride(0))
    flags = dict(ROWS=row_bucket(m), HAS_BIAS=bias is not None, UPCAST=interpreting() or x.dtype == torch.float32)
    if config is None:
        kernel = autotuned_kernel()
        kernel[lambda meta: (-(-n // meta["BLOCK_N"]),)](*args, **flags)
    else:
        kernel = plain_kernel()
        kernel[(-(-n // config["BLOCK_N"]),)](*args, **flags, **config)


def configs() -> list[dict]:
    """The launch configurations the autotuner times (and bench/skinny.py sweeps)."""
    return [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
            for bn in (16, 32, 64) for bk in (128, 256) for warps, stages in ((4, 3), (4, 4))]


@functools.cache
def plain_kernel():
    import triton
    import triton.language as tl

    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def skinny_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, M, N, K, stride_x, stride_w,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr):
        rows = tl.arange(0, ROWS)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            in_k = (ks < K) | EVEN_K         # no K mask where BLOCK_K divides K: unmasked, vector loads
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                        mask=(rows[:, None] < M) & in_k[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                        mask=(cols[:, None] < N) & in_k[None, :], other=0.0)
            if UPCAST:      # float32 in full precision (not tf32); the interpreter's bf16 dot is wrong
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    return skinny_kernel


@functools.cache
def autotuned_kernel():
    import triton
    tuned = [triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]},
                           num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs()]
    if interpreting():      # nothing to time there
        tuned = tuned[:1]
    return triton.autotune(configs=tuned, key=["N", "K", "ROWS", "HAS_BIAS"])(plain_kernel())
