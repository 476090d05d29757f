"""The caller's own rules in generate(), taken as transformers' generate takes them:
prefix_allowed_tokens_fn(batch_id, ids) -> allowed token ids, logits_processor (callables
(ids, scores) -> scores, run after generate's own processors and before the sampling warpers) and
stopping_criteria (callables (ids, scores) -> (rows,) bool, a row ending where one is True).
transformers' LogitsProcessor and StoppingCriteria objects are such callables; so are outlines' and
lm-format-enforcer's, which is how constrained-decoding libraries plug into transformers."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class UserRules:
    def __init__(self, prefix_allowed_tokens_fn: Callable | None = None, logits_processor: Sequence = (),
                 stopping_criteria: Sequence = (), rows_per_prompt: int = 1) -> None:
        self.prefix_allowed_tokens_fn = prefix_allowed_tokens_fn
        self.logits_processor, self.stopping_criteria = list(logits_processor or ()), list(stopping_criteria or ())
        self.rows_per_prompt = rows_per_prompt      # a prompt's rows (beams or answers) are consecutive
        for name, rules in (("logits_processor", self.logits_processor), ("stopping_criteria", self.stopping_criteria)):
            if not all(callable(rule) for rule in rules):
                raise ValueError(f"{name} must be callables (ids, scores) -> ..., got {rules!r}")
        if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
            raise ValueError(f"prefix_allowed_tokens_fn must be a callable (batch_id, ids) -> token ids, "
                             f"got {prefix_allowed_tokens_fn!r}")

    @property
    def processes(self) -> bool:
        return self.prefix_allowed_tokens_fn is not None or bool(self.logits_processor)

    @property
    def stops(self) -> bool:
        return bool(self.stopping_criteria)

    @property
    def reads_ids(self) -> bool:
        return self.processes or self.stops

    def process(self, ids: Tensor, scores: Tensor) -> Tensor:
        """Each row's scores (rows, V) after the prefix constraint and the caller's processors; ids
        (rows, length): each row's prompt and answer so far."""
        if self.prefix_allowed_tokens_fn is not None:
            scores = scores + self._prefix_mask(ids, scores)
        for processor in self.logits_processor:
            scores = processor(ids, scores)
        return scores

    def _prefix_mask(self, ids: Tensor, scores: Tensor) -> Tensor:
        mask = torch.full_like(scores, float("-inf"))
        for row, sent in enumerate(ids):
            batch_id = row // self.rows_per_prompt
            allowed = self.prefix_allowed_tokens_fn(batch_id, sent)
            if len(allowed) == 0:
                raise ValueError(f"prefix_allowed_tokens_fn allowed no token for batch_id {batch_id} (row {row}, "
                                 f"{ids.shape[1]} tokens so far): the constraint cannot be met")
            mask[row, torch.as_tensor(allowed, dtype=torch.int64, device=scores.device)] = 0.0
        return mask

    def stopped(self, ids: Tensor, scores: tuple[Tensor, ...] | None) -> Tensor:
        """(rows,) bool: where any stopping criterion holds for the row's ids."""
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for criterion in self.stopping_criteria:
            done = done | torch.as_tensor(criterion(ids, scores), device=ids.device).bool()
        return done


# transformers' own processors that generate() runs where a checkpoint or caller sets them, after the
# prefix constraint and before the caller's processors, in transformers' order (callables as theirs)
class ForcedToken:
    """All tokens -inf but `ids` (set to 0) at the step whose ids are `length` long: transformers'
    forced_bos_token_id (length 1) and forced_eos_token_id (the last step's, max_length - 1)."""

    def __init__(self, ids: list[int], length: int) -> None:
        self.ids, self.length = ids, length

    def __call__(self, ids: Tensor, scores: Tensor) -> Tensor:
        if ids.shape[-1] != self.length:
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids] = 0.0
        return forced


class SuppressedTokens:
    """-inf at `ids` (transformers' suppress_tokens), or only at the step whose ids are `length` long
    (begin_suppress_tokens: the first new token's)."""

    def __init__(self, ids: list[int], length: int | None = None) -> None:
        self.ids, self.length = ids, length

    def __call__(self, ids: Tensor, scores: Tensor) -> Tensor:
        if self.length is not None and ids.shape[-1] != self.length:
            return scores
        suppressed = scores.clone()
        suppressed[:, [i for i in self.ids if 0 <= i < scores.shape[-1]]] = float("-inf")
        return suppressed


class OutOfTime:
    """transformers' max_time: every row ends once `seconds` have passed since generate() began."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.time()

    def __call__(self, ids: Tensor, scores) -> Tensor:
        return torch.full((ids.shape[0],), time.time() - self.start > self.seconds, dtype=torch.bool,
                          device=ids.device)
