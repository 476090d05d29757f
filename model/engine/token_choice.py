"""How the engine picks each row's next token (a mixin of LLMEngine): the row's sampling settings
written to its slot, the tokens it may not take (constraints, n-grams, bad words), the draw, and the
log p its request asks for. `sample_tokens` is the hook tensor-parallel ranks override (rank 0's draw)."""
from __future__ import annotations

import torch

from .bad_words import sequence_bans
from .biases import bias_tensor, sequence_biases, suppressed
from .logprobs import StepLogprobs
from .ngrams import allowed_without, sequence_ngrams
from .sampler import model_tokens, sample_rows
from .scheduler import Sequence


def penalized(seqs: list[Sequence]) -> bool:
    return any(s.request.sampling.penalized for s in seqs)


def wants_logprobs(seqs: list[Sequence]) -> bool:
    return any(s.request.sampling.logprobs or s.request.sampling.top_logprobs for s in seqs)


class TokenChoice:
    """Needs the engine's row_state, runner, constraints, device and _rng."""

    def _assign_sampling(self, seq: Sequence) -> None:
        p = seq.request.sampling
        seed = p.seed if p.seed is not None else self._rng.getrandbits(62)
        self.row_state.sampling.assign(seq.slot, p.temperature, p.top_k, p.top_p, seed, p.min_new_tokens,
                                       sorted(seq.stop_ids), p.repetition_penalty, seq.request.prompt_ids, p.min_p,
                                       p.typical_p, p.epsilon_cutoff, p.eta_cutoff, p.presence_penalty,
                                       p.frequency_penalty)

    def sample_tokens(self, logits: torch.Tensor, slots: torch.Tensor, seqs: list[Sequence],
                      allowed: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Next token of each row, NON_FINITE where its logits are not, only `allowed` tokens where
        given, `bias` added to the logits where given (a hook: tensor-parallel ranks take rank 0's)."""
        return sample_rows(logits, self.row_state.sampling, slots, [s.request.sampling for s in seqs],
                           compiled=self.runner.compile, allowed=allowed, bias=bias)

    def _next_tokens(self, logits: torch.Tensor, slots: torch.Tensor, seqs: list[Sequence],
                     rows: list[int]) -> tuple[torch.Tensor, StepLogprobs | None]:
        """The rows' tokens (NON_FINITE for a row whose logits are not), and their log p (and top
        tokens') when a request asks for them. The model reads `model_tokens` of them. Row rows[i]
        is seqs[i]'s."""
        allowed, bias = self._allowed(logits, seqs, rows), self._bias(logits, seqs, rows)
        tokens = self.sample_tokens(logits, slots, seqs, allowed, bias)
        logprobs = None
        if wants_logprobs(seqs):
            top = max(s.request.sampling.top_logprobs for s in seqs)
            logprobs = StepLogprobs.of(logits, model_tokens(tokens), top)
        if penalized(seqs):
            self.row_state.sampling.mark_seen(slots, model_tokens(tokens))
        return tokens, logprobs

    def _allowed(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor | None:
        """(rows, V) bool: the tokens each row may take (its constraint's, less the n-grams it may
        not repeat and its bad words' last tokens), or None where every row may take any."""
        constrained = self.constraints.allowed(seqs, rows, logits.shape[0])
        bans = [(row, sequence_ngrams(s).banned()) for row, s in zip(rows, seqs)
                if s.request.sampling.no_repeat_ngram_size]
        bans += [(row, sequence_bans(s)) for row, s in zip(rows, seqs) if s.request.sampling.bad_words_ids]
        bans += [(row, suppressed(s.request.sampling, len(s.generated))) for row, s in zip(rows, seqs)]
        unbanned = allowed_without(bans, *logits.shape, self.device) if bans else None
        if constrained is None or unbanned is None:
            return unbanned if constrained is None else constrained
        return constrained & unbanned

    def _bias(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor | None:
        """(rows, V) float32: what each row's sequence_bias adds to its logits, or None where no row has one."""
        found = [(row, sequence_biases(s)) for row, s in zip(rows, seqs) if s.request.sampling.sequence_bias]
        return bias_tensor(found, *logits.shape, self.device) if found else None
