"""How large the engine's KV cache is, when it is (re)made (a mixin of LLMEngine), and the per-row state
made beside it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .kv_cache import CachePlan, KVCache, plan_cache
from .logprobs import HostLogprobs
from .runner import ModelRunner
from .sampler import SamplingState
from .scheduler import Scheduler, Sequence

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


class CacheSizing:
    """Needs the engine's settings (kv_cache_tokens, max_batch_size, overlap, compile, ...), model,
    text_config, dtype, device, prefixes and _pending."""

    def kv_token_budget(self, bytes_per_token: int, max_len: int) -> int:
        """Tokens the KV cache may hold (a hook: tensor-parallel ranks agree on the smallest)."""
        if self.kv_cache_tokens is not None:
            return self.kv_cache_tokens
        return default_token_budget(self.device, bytes_per_token, max_len, self.max_batch_size)

    def _positions_needed(self, seq: Sequence) -> int:
        # A step in flight may advance a finished row one position more; a request of no answer
        # leaves its free row's idle decode steps writing one position past its prompt.
        return seq.max_length + self.overlap + (seq.max_new_tokens == 0)

    def _slots_for(self, need_len: int) -> int:
        return slots_within(self.text_config, self.dtype, need_len, self.max_batch_size, self.kv_token_budget)

    def _fits_set_budget(self, need_len: int, slots: int) -> bool:
        return slots_within(self.text_config, self.dtype, need_len, slots, lambda *_: self.kv_cache_tokens) >= 1

    def _ensure_cache(self, need_len: int, resize: bool = False) -> ModelRunner:
        """A cache for need_len positions: grown when shorter; with `resize`, planned anew (maybe shorter,
        for more slots)."""
        old_len = 0 if self.runner is None else self.runner.cache.max_len
        if old_len >= need_len and not (resize and old_len != need_len):
            return self.runner
        self.runner = self._scheduler = None        # free the old cache before sizing the new one; new slots
        self.prefixes.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        plan = plan_for(self.text_config, self.dtype, need_len, 0 if resize else old_len, self.max_batch_size,
                        self.kv_token_budget, ModelRunner.min_rows(self.compile))
        self.slots = plan.slots
        self.runner = ModelRunner(self.model, empty_cache(self.text_config, plan, self.dtype, self.device),
                                  use_cuda_graphs=self.use_cuda_graphs, compile=self.compile,
                                  max_image_frames=self.max_image_frames, batched_prefill=self.batched_prefill)
        self.row_state = RowState.empty(plan.rows, self.text_config.vocab_size, self.device)
        return self.runner

    def _within_set_budget(self, scorers: list[Sequence]) -> list[Sequence]:
        """Scorers a set KV budget has room for; the others are not run, as those past the context
        (their choices score None), rather than fail the step of every request."""
        if self.kv_cache_tokens is None:
            return scorers
        for scorer in scorers:
            if not self._fits_set_budget(self._positions_needed(scorer), 1):
                scorer.finish_reason = "length"
        return [s for s in scorers if s.finish_reason is None]

    def _size_cache_for_pending(self) -> None:
        """Nothing runs: a cache for the longest pending request, unless the first one's beams would not
        fit it: then one for that request (a longer one behind waits for the cache to grow again)."""
        need, head = max(map(self._positions_needed, self._pending)), self._pending[0]
        beams = Scheduler.slots_needed(head)
        if beams > 1 and beams > self._slots_for(max(need, self.runner.cache.max_len if self.runner else 0)):
            self._ensure_cache(self._positions_needed(head), resize=True)
        else:
            self._ensure_cache(need)
