"""How the engine's requests end (a mixin of LLMEngine): on a stop string, after a prefill that only
scored, in error when their logits are not finite (their slot wiped), and the Result each gives."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .samples import with_samples
from .scheduler import Scheduler, Sequence
from .scoring import choice_logprobs
from .stop_strings import StopStringMatcher
from .types import NonFiniteLogitsError, NoTokenLeftError, Request, Result, request_name


class RequestEndings:
    """Needs the engine's tokenizer, dtype, runner, prefixes, _finished and _stop_matcher."""

    def _end_scored_only(self, scheduler: Scheduler, seqs: list[Sequence], logits: torch.Tensor,
                         slots: list[int]) -> tuple[list[Sequence], torch.Tensor, list[int]]:
        """Requests of no answer (max_new_tokens 0: they only score their continuation, as scorers
        do) end after their prefill, in error where their logits were not finite; the others, their
        logits' rows and slots go on."""
        keep = [i for i, s in enumerate(seqs) if s.max_new_tokens > 0]
        if len(keep) == len(seqs):
            return seqs, logits, slots
        ended = [i for i, s in enumerate(seqs) if s.max_new_tokens == 0]
        finite = torch.isfinite(logits[ended]).all(-1).tolist()      # one host sync for them all
        for i, logits_finite in zip(ended, finite):
            seq = seqs[i]
            if logits_finite and math.isfinite(sum(seq.continuation_logprobs)):
                seq.finish_reason = "length"
            else:
                self._fail_non_finite(seq)
            scheduler.release(seq)
            self._finished.append(seq)
        return [seqs[i] for i in keep], logits[keep], [slots[i] for i in keep]

    def _fail_non_finite(self, seq: Sequence) -> None:
        """End a sequence whose logits were not finite, and wipe its slot: attention weighs the
        stale rows past a later request's length by exactly 0, and 0 x NaN is NaN, so one such
        row would spoil every request that takes its slot after it."""
        hint = ("; float16 overflows where bfloat16 and float32 do not: run in one of those"
                if self.dtype == torch.float16 else "")
        where = f"new token {len(seq.generated) + 1}" if seq.max_new_tokens else "its scored tokens"
        error = NonFiniteLogitsError(f"the model's logits were NaN or infinite at {where} (of request "
                                     f"{request_name(seq.request.request_id)}){hint}")
        seq.finish_reason, seq.error = "error", f"{type(error).__name__}: {error}"
        self.runner.cache.clear_slot(seq.slot)
        self.runner.positions[seq.slot] = 0     # the free row's ignored steps then read only zeros
        self.prefixes.forget(seq.slot)

    def _fail_no_token(self, seq: Sequence) -> None:
        """End a sequence whose constraint's tokens its other settings all keep out."""
        name = request_name(seq.request.request_id)
        error = NoTokenLeftError(f"request {name}: at new token {len(seq.generated) + 1} no "
                                 "token was left that it may take: what its constraint needs next is spelled by no "
                                 "token but stop ids, or its other settings keep those out (bad words, suppressed "
                                 "tokens, n-grams, biases of -inf)")
        seq.finish_reason, seq.error = "error", f"{type(error).__name__}: {error}"

    def _completes_stop_string(self, seq: Sequence) -> bool:
        check = self._stop_check(seq.request)
        return check is not None and check(seq.generated)

    def _stop_check(self, request: Request) -> Callable[[list[int]], bool] | None:
        """Whether an answer's newest token completes one of the request's stop strings
        (model.engine.stop_strings); None for a request without any."""
        stops = request.sampling.stop
        if not stops:
            return None
        if self._stop_matcher is None:
            self._stop_matcher = StopStringMatcher(self.tokenizer)
        return self._stop_matcher.after(request.prompt_ids, stops)

    def _result(self, seq: Sequence) -> Result:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        p = seq.request.sampling
        result = Result(seq.request.request_id, list(seq.generated), text, seq.finish_reason,
                        seq.prompt_len, len(seq.generated), seq.logprob if p.logprobs else None,
                        seq.error, choice_logprobs(seq) if seq.children else None,
                        continuation_logprobs=seq.continuation_logprobs,
                        token_logprobs=seq.token_logprobs if p.top_logprobs else None,
                        top_logprobs=seq.top_logprobs if p.top_logprobs else None)
        return with_samples(result, [self._result(s) for s in seq.samples]) if seq.samples else result
