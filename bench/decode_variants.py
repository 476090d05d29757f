"""Candidate changes to the compiled decode step, for bench/engine.py --variants to time side by side
with the current step in one run (each compiles the step afresh: --layers keeps that short). A variant that wins on a GPU
moves into model/; until then it lives here, out of the engine's code.

    base      the step as the engine runs it
    cdt       inductor's coordinate-descent tuning of its own kernels' launch configs (gpt-fast's)
    autotune  inductor benchmarks Triton GEMM templates against cuBLAS for each projection
              (small-M GEMMs without split-K and its reduce kernels; a much longer compile)
    combo     inductor's combo kernels: independent kernels of other shapes in one launch (q's and
              k's RoPE, the K and V cache writes; vLLM and SGLang turn it on)
    unpadded  the LM head as run 6 ran it: its weight's rows not padded (model.lm_head), so an odd
              vocabulary's logits are unaligned rows for cuBLAS
    eager_pointwise  the prefill's norms, RoPE and activation eager, as run 6 ran them
              (model.pointwise; the decode step traces them either way): compare ours_prefill_s
    skinny    every projection of a few rows (the decode step's) through model.kernels.skinny's Triton
              kernel instead of cuBLAS (bench/skinny.py times them shape by shape)
    attention the decode step's attention, with RoPE and the K/V cache writes, as
              model.kernels.attention's kernel (bench/attention.py)
    fused     skinny, with each layer's norms, gated activation and residual adds inside the
              projections' kernel (model.kernels.fused: three kernels a layer fewer)
    eager     the engine built with compile=False: its decode step eager inside the CUDA graphs (as
              run 1), its prefill's pointwise chains and sampler eager too. With the kernels on, a
              layer is five custom ops, so the compile (~100 s a model on a fresh machine, per
              replica) may buy little: `fused+attention+eager` against `fused+attention` says
Run 6 (H200, 8B shapes, 8 layers): cdt slower, combo within noise, autotune faster only through the
LM head (its Triton templates slower than cuBLAS for every other projection; ~3.5 s of autotuning per
attention GEMM and layer); decode attention as one SDPA call (cuDNN's kernel) slower, and removed
(BENCHMARKS.md).
Variants combine with "+" (`unpadded+combo`). A variant whose inductor option this torch lacks says so
and runs as base.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
import torch._inductor.config

import model.engine.engine as engine_module
import model.engine.runner as runner_module
import model.kernels.attention as attention_module
import model.kernels.fused as fused_module
import model.kernels.skinny as skinny_module
from model.pointwise import compile_pointwise


def _unpad_lm_head(model) -> bool:
    model.lm_head.padded = None        # the weight stays a view of the buffer: its logits unaligned
    return False


def _eager_pointwise(model, compiled: bool = True):
    return compile_pointwise(model, False)


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _fused_layers() -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    stack.enter_context(_patched(skinny_module, "enabled", True))
    stack.enter_context(_patched(fused_module, "enabled", True))
    return stack


def _inductor(**options) -> contextlib.AbstractContextManager:
    config = torch._inductor.config
    missing = [k for k in options if not hasattr(config, k)]
    if missing:
        print(f"# this torch's inductor has no {missing}: the variant runs as base", file=sys.stderr)
        return contextlib.nullcontext()
    return config.patch(**options)


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "base": contextlib.nullcontext,
    "cdt": lambda: _inductor(coordinate_descent_tuning=True),
    "autotune": lambda: _inductor(max_autotune_gemm=True, max_autotune_gemm_backends="ATEN,TRITON"),
    "combo": lambda: _inductor(combo_kernels=True),
    "unpadded": lambda: _patched(engine_module, "pad_lm_head", _unpad_lm_head),
    "eager_pointwise": lambda: _patched(engine_module, "compile_pointwise", _eager_pointwise),
    "skinny": lambda: _patched(skinny_module, "enabled", True),
    "attention": lambda: _patched(attention_module, "enabled", True),
    "fused": _fused_layers,
    "eager": contextlib.nullcontext,        # read by uncompiled(): the engine is built with compile=False
}


def uncompiled(name: str) -> bool:
    return "eager" in name.split("+")


_compiled_under: str | None = None


@contextlib.contextmanager
def decode_variant(name: str) -> Iterator[None]:
    """Runs under the variant; the step is compiled afresh when it was compiled under another."""
    global _compiled_under
    if _compiled_under not in (None, name):
        runner_module._COMPILED = None
        torch._dynamo.reset()
    _compiled_under = name
    with contextlib.ExitStack() as stack:
        for part in name.split("+"):
            stack.enter_context(VARIANTS[part]())
        yield


def current_variant() -> str | None:
    return _compiled_under


def variant_name(name: str) -> str:
    """argparse type: a variant or a "+" combination of them."""
    unknown = [part for part in name.split("+") if part not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown decode variant(s) {unknown}: known are {sorted(VARIANTS)}")
    return name
