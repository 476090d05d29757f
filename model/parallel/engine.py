"""The engine every rank runs. All ranks execute the same scheduling steps on the same requests; two
facts that could differ between ranks are made common: the KV-cache size (the smallest rank's budget)
and the sampled tokens (rank 0's, broadcast each step), so the ranks never diverge."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..engine import LLMEngine
from .layers import TPContext


@dataclass(frozen=True)
class Comm:
    """Collectives of the control plane. `cpu_group` (gloo) carries Python objects even under NCCL."""
    tp: TPContext
    cpu_group: dist.ProcessGroup | None = None

    @property
    def active(self) -> bool:
        return self.tp.world_size > 1

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.tp.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast_tensor(self, x: Tensor) -> Tensor:
        if self.active:
            dist.broadcast(x, src=0, group=self.tp.group)
        return x

    def min_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


class ShardEngine(LLMEngine):
    """LLMEngine on one rank's shard, kept in lockstep with the other ranks."""

    def __init__(self, model, comm: Comm, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.comm = comm

    def kv_token_budget(self, bytes_per_token: int, max_len: int) -> int:
        # Free memory differs per device; the slot count (hence every schedule) must not.
        return self.comm.min_int(super().kv_token_budget(bytes_per_token, max_len))

    def sample_tokens(self, logits: Tensor, slots: Tensor, seqs, allowed: Tensor | None = None,
                      bias: Tensor | None = None) -> Tensor:
        return self.comm.broadcast_tensor(super().sample_tokens(logits, slots, seqs, allowed, bias).contiguous())

    def beam_candidates(self, logits: Tensor, rules) -> tuple[Tensor, Tensor]:
        values, ids = super().beam_candidates(logits, rules)
        return self.comm.broadcast_tensor(values.contiguous()), self.comm.broadcast_tensor(ids.contiguous())
