"""The LM head's rows padded to a multiple of 64 for the GPU. With an odd vocabulary (Idefics3-8B has
128 259 tokens) the logits' rows are not 16-byte aligned, and cuBLAS leaves its Hopper kernels for an
align-1 one: the head read the weights at 48 % of the bandwidth at batch 1 and 17 % at batch 32
(BENCHMARKS.md, run 6), the largest GEMM of a decode step."""
from __future__ import annotations

import torch
from torch import nn

from .linear import Linear, PaddedRows

ROW_MULTIPLE = 64


def padded_rows(rows: int) -> int:
    return -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE


def pad_lm_head(model: nn.Module) -> bool:
    """Store `model.lm_head`'s weight in a buffer of padded_rows(vocab) rows (zeros past the vocabulary),
    the parameter a view of its first rows: the same state dict, values and tie to the input embedding.
    The head then multiplies the whole buffer and drops the padding's logits. Returns whether it padded
    (not when the rows are aligned or padded already, nor for a tensor-parallel head, padded when sharded)."""
    head = model.lm_head
    if not isinstance(head, Linear) or head.padded is not None or head.out_features % ROW_MULTIPLE == 0:
        return False
    old = head.weight
    buffer = old.new_zeros(padded_rows(head.out_features), head.in_features)
    with torch.no_grad():
        buffer[: head.out_features].copy_(old)
    new = nn.Parameter(buffer[: head.out_features], requires_grad=old.requires_grad)
    for module in model.modules():
        if module._parameters.get("weight") is old:       # the head, and a tied embedding
            module.weight = new
    head.padded = PaddedRows(buffer)
    return True
