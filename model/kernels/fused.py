"""A decoder layer's elementwise work inside its few-rows projections (model.kernels.skinny).

A compiled 8B decode step at batch 1 runs ~15 kernels a layer; inductor fuses each residual add with
the next RMSNorm and the gated activation into one kernel each, but those three still cost ~2 us of
kernel and ~0.5 us of launch gap apiece, ~0.25 ms a step at 32 layers (BENCHMARKS.md, run 5). Here the
norm runs in the prologue of the projection that reads it (q/k/v, gate/up: every program recomputes
its few rows' statistics from L2), silu(gate) * up in the down projection's prologue, and the residual
add in the o and down projections' epilogues: three kernels a layer fewer, the same roundings.

Only the decode step takes it (an attention backend with `few_rows`); more rows than the kernel
holds (a big batch) take the prologue as a kernel of its own before cuBLAS's GEMM, and the residual
add after it: two small kernels a layer more than inductor's chain (the adds), where eager torch
would run ~10.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import skinny
from .runtime import kernel_can_run, on_kernel_device, switched_on

# The decode step's layers through fused_linear where the projections allow it; needs skinny.enabled.
# Off (unless IDEFICS3_KERNELS lists it) until a GPU measures it faster (bench/decode_variants.py).
enabled = switched_on("fused")


def fuses(attention: object, x: Tensor) -> bool:
    """Whether a layer runs its elementwise work inside its projections for this call."""
    return (enabled and skinny.enabled and getattr(attention, "few_rows", False)
            and on_kernel_device(x))


def _alike(x: Tensor, *others: Tensor | None) -> bool:
    return all(t is None or (t.dtype == x.dtype and t.device == x.device) for t in others)


def runs_fused(x: Tensor, weight: Tensor, norm_weight: Tensor | None, up: Tensor | None,
               residual: Tensor | None) -> bool:
    return skinny.runs_skinny(x, weight) and _alike(x, norm_weight, up, residual)


def runs_prologue(x: Tensor, norm_weight: Tensor | None, up: Tensor | None) -> bool:
    """Whether more rows than the kernel holds take the prologue kernel before cuBLAS."""
    return (norm_weight is not None or up is not None) and kernel_can_run(x) and _alike(x, norm_weight, up)


def fused_linear_torch(x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None, eps: float,
                       up: Tensor | None, residual: Tensor | None) -> Tensor:
    from ..llama import act_mul, rms_norm       # llama imports this module

    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    if up is not None:
        x = act_mul(F.silu, x, up)
    out = F.linear(x, weight, bias)
    return out if residual is None else residual + out


@torch.library.custom_op("idefics3::fused_linear", mutates_args=())
def fused_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],  # noqa: UP045
                 eps: float, up: Optional[Tensor], residual: Optional[Tensor]) -> Tensor:  # noqa: UP045
    """residual + linear(silu(x) * up or rms_norm(x) or x, weight, bias), each part optional."""
    if runs_fused(x, weight, norm_weight, up, residual):
        flat = skinny.as_rows(x)
        out = torch.empty(flat.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        fusion = _fusion(norm_weight, eps, up, residual)
        skinny.launch(flat, weight, None if bias is None else bias.contiguous(), out, fusion=fusion)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if not runs_prologue(x, norm_weight, up):
        return fused_linear_torch(x, weight, bias, norm_weight, eps, up, residual)
    # a big batch: the prologue in one kernel (eager torch's norm is six), the GEMM cuBLAS's
    prologue = skinny.launch_prologue(skinny.as_rows(x), _fusion(norm_weight, eps, up, residual))
    projected = F.linear(prologue.view(x.shape), weight, bias)
    return projected if residual is None else residual + projected


def _fusion(norm_weight: Tensor | None, eps: float, up: Tensor | None, residual: Tensor | None) -> skinny.Fusion:
    return skinny.Fusion(norm_weight=None if norm_weight is None else norm_weight.contiguous(), eps=eps,
                         up=None if up is None else skinny.as_rows(up),
                         residual=None if residual is None else skinny.as_rows(residual))


@fused_linear.register_fake
def _(x, weight, bias, norm_weight, eps, up, residual) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def normed_projections(module: nn.Module, norm: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
    """module.project(norm(x)) (a Fusable's fused q/k/v or gate/up), the norm in the GEMM's prologue."""
    fused = module.fused
    if fused is None:
        return module.project(norm(x))
    out = fused_linear(x, fused.weight, fused.bias, norm.weight, norm.eps, None, None)
    return out.split(fused.sizes, dim=-1)


def _plain(linear: nn.Module) -> bool:
    """A whole projection of this process (not a tensor-parallel shard, whose sum comes later).
    A oneDNN pack (CPU float32) is unused here as it is by model.linear's own kernel path."""
    from ..linear import Linear

    return type(linear) is Linear and linear.padded is None


def residual_projection(linear: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """residual + linear(x), the add in the GEMM's epilogue."""
    if not _plain(linear):
        return residual + linear(x)
    return fused_linear(x, linear.weight, linear.bias, None, 0.0, None, residual)


def gated_projection(linear: nn.Module, act, gate: Tensor, up: Tensor, residual: Tensor) -> Tensor:
    """residual + linear(act(gate) * up): the activation in the prologue (silu only), the add in the
    epilogue."""
    from ..llama import act_mul

    if act is not F.silu or not _plain(linear):
        return residual + linear(act_mul(act, gate, up))
    return fused_linear(gate, linear.weight, linear.bias, None, 0.0, up, residual)
