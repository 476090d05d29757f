"""How large the engine's KV cache is, and the per-row state made beside it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .kv_cache import CachePlan, KVCache, plan_cache
from .logprobs import HostLogprobs
from .sampler import SamplingState

GIB = 1 << 30


def default_token_budget(device: torch.device, bytes_per_token: int, max_len: int, max_batch_size: int) -> int:
    """Tokens the KV cache may hold where none is set: on CUDA 85 % of free memory less 4 GiB for
    activations and graphs; on CPU a full batch of max_len, at most 2 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(free * 0.85 - 4 * GIB, 0) // bytes_per_token)
    return min(max_batch_size * max_len, 2 * GIB // bytes_per_token)


def plan_for(text_config, dtype: torch.dtype, need_len: int, old_len: int, max_batch_size: int,
             budget: Callable[[int, int], int], min_rows: int) -> CachePlan:
    """The cache plan for sequences of need_len positions, `budget(bytes_per_token, max_len)` tokens;
    ValueError if not even one sequence fits."""
    tc = text_config
    per_token = KVCache.bytes_per_token(tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim, dtype)
    plan = plan_cache(need_len, old_len, max(tc.max_position_embeddings, need_len), max_batch_size,
                      room=lambda length: budget(per_token, length) // length, min_rows=min_rows)
    if plan.slots < 1:
        raise ValueError(f"KV cache budget too small for one sequence of {plan.max_len} tokens "
                         f"({per_token * plan.max_len / GIB:.3g} GiB needed)")
    return plan


def slots_within(text_config, dtype: torch.dtype, need_len: int, max_slots: int,
                 budget: Callable[[int, int], int]) -> int:
    """The slots a cache for need_len positions would have within `budget` (0: not even one)."""
    try:
        return plan_for(text_config, dtype, need_len, 0, max_slots, budget, 1).slots
    except ValueError:
        return 0


def empty_cache(text_config, plan: CachePlan, dtype: torch.dtype, device: torch.device) -> KVCache:
    tc = text_config
    return KVCache(tc.num_hidden_layers, plan.rows, tc.num_key_value_heads, plan.max_len, tc.head_dim, dtype, device)


@dataclass
class RowState:
    """The engine's state per cache row besides the runner's: its sampling settings, whether it
    decodes (`active`: a free row's position does not advance) and, on CUDA, two pinned buffers
    that decode steps copy their tokens (and log p) to: one may hold a step in flight."""
    sampling: SamplingState
    active: torch.Tensor
    host_tokens: list[torch.Tensor] = field(default_factory=list)
    host_logprobs: list[HostLogprobs] = field(default_factory=list)

    @classmethod
    def empty(cls, rows: int, vocab: int, device: torch.device) -> RowState:
        host = ([torch.zeros(rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
                if device.type == "cuda" else [])
        return cls(SamplingState.empty(rows, vocab, device), torch.zeros(rows, dtype=torch.int64, device=device),
                   host, [HostLogprobs(rows) for _ in host])
