"""Fused projections: linears that read the same input run as one GEMM (q/k/v, gate/up)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .linear import PackedWeight, linear


class FusedLinears:
    """Linears that read the same input, run as one GEMM (fewer, larger kernels: decode at small batch).

    Their weights become row slices (views) of one matrix: state-dict names and memory stay as they
    were. A move, cast or `assign` load replaces the weights, so `_apply` / loading drop the fusion.
    """

    packed: PackedWeight | None = None

    def __init__(self, linears: list[nn.Module]) -> None:
        self.weight = torch.cat([lin.weight.detach() for lin in linears])
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
        self.sizes = [lin.weight.shape[0] for lin in linears]
        start = 0
        for lin, n in zip(linears, self.sizes):
            lin.weight = nn.Parameter(self.weight[start:start + n], requires_grad=lin.weight.requires_grad)
            if has_bias:
                lin.bias = nn.Parameter(self.bias[start:start + n], requires_grad=lin.bias.requires_grad)
            start += n

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        return linear(x, self.weight, self.bias, self.packed).split(self.sizes, dim=-1)


class Fusable(nn.Module):
    """A module whose input projections (`fusable()`) can run fused; `project(x)` gives their outputs
    either way. The fusion never outlives a change of the weights."""
    fused: FusedLinears | None = None

    def fusable(self) -> list[nn.Module]:
        raise NotImplementedError

    def fuse(self) -> None:
        self.fused = FusedLinears(self.fusable())

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.fused(x) if self.fused is not None else tuple(lin(x) for lin in self.fusable())

    def _apply(self, fn, recurse: bool = True):
        self.fused = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.fused = None
        return super()._load_from_state_dict(*args, **kwargs)


def fuse_projections(model: nn.Module) -> nn.Module:
    """q/k/v and gate/up of every decoder and vision layer as one GEMM each. Call once the model has its final
    device and dtype (a later move or cast undoes it, safely)."""
    for module in model.modules():
        if isinstance(module, Fusable):
            module.fuse()
    return model
