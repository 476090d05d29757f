"""Candidate changes to the compiled decode step, for bench/engine.py --variants to time side by side
with the current step in one run (each compiles the step afresh: --layers keeps that short). A variant that wins on a GPU
moves into model/; until then it lives here, out of the engine's code.

    base      the step as the engine runs it
    sdpa      decode attention as one scaled_dot_product_attention call (one fused kernel with the
              row mask on CUDA: the memory-efficient one) instead of two GEMMs and a softmax
    cdt       inductor's coordinate-descent tuning of its own kernels' launch configs (gpt-fast's)
    autotune  inductor benchmarks Triton GEMM templates against cuBLAS for each projection
              (small-M GEMMs without split-K and its reduce kernels; a much longer compile)
    combo     inductor's combo kernels: independent kernels of other shapes in one launch (q's and
              k's RoPE, the K and V cache writes; vLLM and SGLang turn it on)
Variants combine with "+" (`sdpa+combo`). A variant whose inductor option this torch lacks says so
and runs as base.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import Tensor

import model.engine.runner as runner_module
from model.engine.kv_cache import DecodeAttention


def sdpa_decode_attention(self: DecodeAttention, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """DecodeAttention.__call__ with the attention product as one SDPA call: a row's query heads of
    one kv head are that head's query 'positions', so no key is expanded per query head."""
    b, hq, _, hd = q.shape
    hkv = k.shape[1]
    layer = torch.full_like(self.rows, layer_idx)
    self.k_cache[layer, self.rows, :, self.positions] = k[:, :, 0]
    self.v_cache[layer, self.rows, :, self.positions] = v[:, :, 0]
    keys = self.k_cache[layer_idx, :b, :, :self.kv_len]
    values = self.v_cache[layer_idx, :b, :, :self.kv_len]
    qg = q.reshape(b, hkv, hq // hkv, hd)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=self.visible[:, None, None, :])
    return out.reshape(b, hq, 1, hd)


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _inductor(**options) -> contextlib.AbstractContextManager:
    config = torch._inductor.config
    missing = [k for k in options if not hasattr(config, k)]
    if missing:
        print(f"# this torch's inductor has no {missing}: the variant runs as base", file=sys.stderr)
        return contextlib.nullcontext()
    return config.patch(**options)


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "base": contextlib.nullcontext,
    "sdpa": lambda: _patched(DecodeAttention, "__call__", sdpa_decode_attention),
    "cdt": lambda: _inductor(coordinate_descent_tuning=True),
    "autotune": lambda: _inductor(max_autotune_gemm=True, max_autotune_gemm_backends="ATEN,TRITON"),
    "combo": lambda: _inductor(combo_kernels=True),
}


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
