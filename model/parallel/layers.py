"""Tensor-parallel building blocks: column/row-parallel linears, vocab-parallel embedding and LM head.

A column-parallel layer holds a slice of the output features and needs no communication; a row-parallel
layer holds the matching slice of the input features and sums the partial products with one all-reduce.
Each layer knows which rows/columns of the full checkpoint tensor it holds (`shard_spec`), so the
loader can read exactly that slice from the safetensors file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..linear import Packable, linear
from ..lm_head import padded_rows


@dataclass(frozen=True)
class TPContext:
    """This process's place in the tensor-parallel group. world_size 1 never calls torch.distributed."""
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: Tensor) -> Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class ShardSpec:
    """Rows [start, stop) of dim `dim` of a checkpoint tensor whose full size there is `full`.
    The local parameter may be longer than stop - start (vocab padding); the rest is zero."""
    dim: int
    start: int
    stop: int
    full: int


class ColumnParallelLinear(Packable):
    """y_local = x @ W[rows].T (+ b[rows]): output features [start, stop) of the full layer."""

    def __init__(self, in_features: int, out_features: int, start: int, stop: int, bias: bool) -> None:
        super().__init__()
        self.full_out, self.start, self.stop = out_features, start, stop
        self.weight = nn.Parameter(torch.empty(stop - start, in_features))
        self.bias = nn.Parameter(torch.empty(stop - start)) if bias else None

    def shard_spec(self, name: str) -> ShardSpec:
        return ShardSpec(0, self.start, self.stop, self.full_out)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class RowParallelLinear(Packable):
    """y = all_reduce(x_local @ W[:, cols].T) + b: the input features [start, stop) live on this rank."""

    def __init__(self, in_features: int, out_features: int, start: int, stop: int, bias: bool,
                 tp: TPContext) -> None:
        super().__init__()
        self.full_in, self.start, self.stop, self.tp = in_features, start, stop, tp
        self.weight = nn.Parameter(torch.empty(out_features, stop - start))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def shard_spec(self, name: str) -> ShardSpec | None:
        return ShardSpec(1, self.start, self.stop, self.full_in) if name == "weight" else None  # bias: whole

    def forward(self, x: Tensor) -> Tensor:
        out = self.tp.all_reduce(linear(x, self.weight, packed=self.packed))
        return out if self.bias is None else out + self.bias   # the bias once, after the sum


def vocab_range(vocab_size: int, tp: TPContext) -> tuple[int, int, int]:
    """(start, stop, rows per rank): equal padded partitions, so the LM head's all-gather is uniform
    even when the vocabulary does not divide (Idefics3-8B has 128259 tokens), each of an aligned
    number of rows, for the GEMM's sake (model.lm_head)."""
    per_rank = padded_rows(-(-vocab_size // tp.world_size))
    start = min(tp.rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size), per_rank


class _VocabShard(nn.Module):
    """Rows [start, stop) of a (vocab, dim) table; the last partition is padded to equal size."""

    def __init__(self, vocab_size: int, dim: int, tp: TPContext) -> None:
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.start, self.stop, per_rank = vocab_range(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(per_rank, dim))

    def shard_spec(self, name: str) -> ShardSpec:
        return ShardSpec(0, self.start, self.stop, self.vocab_size)


class VocabParallelEmbedding(_VocabShard):
    """Ids outside this rank's rows contribute 0 to the all-reduce."""

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.stop - self.start)
        out = F.embedding(local.masked_fill(~mine, 0), self.weight).masked_fill(~mine[..., None], 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(Packable, _VocabShard):
    """Logits of this rank's vocabulary rows, then all-gathered: every rank gets all logits."""

    def forward(self, x: Tensor) -> Tensor:
        logits = self.tp.all_gather_last_dim(linear(x, self.weight, packed=self.packed))
        return logits[..., : self.vocab_size]     # drop the padding rows of the last partition
