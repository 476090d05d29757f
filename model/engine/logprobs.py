"""Log-probabilities of the answer's tokens under the model's own distribution (log_softmax of the
raw logits: before the penalty, temperature, filters and constraints), as vLLM's logprobs: each
step, every row's token's, and where a request asks (SamplingParams.top_logprobs, at most MAX_TOP)
its k likeliest tokens' (soft labels for distillation, confidences per token). On CUDA a step's
values reach the host through pinned buffers, with its tokens, in its one host sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAX_TOP = 20
TokenLogprobs = tuple[float, "list[tuple[int, float]] | None"]     # a row's token's log p, its top k


@dataclass
class StepLogprobs:
    chosen: Tensor                     # (rows,) float32: each row's token's log p
    top_values: Tensor | None = None   # (rows, k) float32, largest first
    top_ids: Tensor | None = None      # (rows, k) int64

    @classmethod
    def of(cls, logits: Tensor, tokens: Tensor, k: int) -> "StepLogprobs":
        log_p = logits.float().log_softmax(dim=-1)
        chosen = log_p.gather(-1, tokens[:, None])[:, 0]
        if not k:
            return cls(chosen)
        values, ids = log_p.topk(k, dim=-1)
        return cls(chosen, values, ids)

    def copied_to(self, host: "HostLogprobs") -> "StepLogprobs":
        """This step's values copied (without waiting) into `host`'s pinned buffers."""
        rows = self.chosen.shape[0]
        chosen = host.chosen[:rows].copy_(self.chosen, non_blocking=True)
        if self.top_ids is None:
            return StepLogprobs(chosen)
        n = self.top_ids.numel()
        values = host.values[:n].view_as(self.top_values).copy_(self.top_values, non_blocking=True)
        return StepLogprobs(chosen, values, host.ids[:n].view_as(self.top_ids).copy_(self.top_ids, non_blocking=True))

    def rows(self, index) -> list[TokenLogprobs]:
        """Rows `index` as (token's log p, [(id, log p) of the top k] or None), on the host."""
        chosen = self.chosen.tolist()
        if self.top_ids is None:
            return [(chosen[i], None) for i in index]
        ids, values = self.top_ids.tolist(), self.top_values.tolist()
        return [(chosen[i], list(zip(ids[i], values[i]))) for i in index]


class HostLogprobs:
    """Pinned host buffers for one step's StepLogprobs of up to `rows` rows."""

    def __init__(self, rows: int) -> None:
        self.chosen = torch.zeros(rows, pin_memory=True)
        self.values = torch.zeros(rows * MAX_TOP, pin_memory=True)
        self.ids = torch.zeros(rows * MAX_TOP, dtype=torch.int64, pin_memory=True)
