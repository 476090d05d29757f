"""The decoder's elementwise chains (RMSNorm, RoPE, the gated activation) as one compiled kernel each.

Run eagerly, each is 2-6 kernels over the whole prompt's activations: in an 8B prefill on an H200
the elementwise kernels took ~27 % of the kernel time (BENCHMARKS.md, run 6). The decode step is
compiled whole (model.engine.runner), and traces these as they are; the prefill runs eagerly around
its packed attention, so it calls them compiled one by one."""
from __future__ import annotations

from torch import nn

from .compiling import CompiledOrEager
from .llama import EAGER, LlamaAttention, LlamaMLP, LlamaRMSNorm, Pointwise, act_mul, apply_rope, rms_norm

COMPILED = Pointwise(rms_norm=CompiledOrEager(rms_norm, "RMSNorm"), rope=CompiledOrEager(apply_rope, "RoPE"),
                     act_mul=CompiledOrEager(act_mul, "the gated activation"))


def compile_pointwise(model: nn.Module, compiled: bool = True) -> nn.Module:
    """The text layers' elementwise chains compiled (compiled=True) or eager, in place."""
    for module in model.modules():
        if isinstance(module, (LlamaRMSNorm, LlamaAttention, LlamaMLP)):
            module.pointwise = COMPILED if compiled else EAGER
    return model
