"""Answers constrained to one of a few texts (SamplingParams.choices, vLLM's guided choice).

At each step a row may take only the tokens that keep its answer a prefix of one of its choices,
written as it is or after one space (chat templates end with "Assistant:", and models answer
" Yes"), and a stop token once the answer is a whole choice; the mask is applied to the logits
before the penalty-free draw (greedy or sampled). Greedy then answers what transformers'
generate(prefix_allowed_tokens_fn=...) answers with the same sets.

Matched on the tokens' bytes (byte-level vocabularies: every Idefics3 checkpoint), so a choice may
be written in any of the vocabulary's spellings of it, not only in the tokenizer's own split, and
each step allows only tokens after which the choice can still be finished. Special and added
tokens never spell a choice. What each answer so far allows is kept as token ids (a few per choice),
not as vocabulary-wide masks, so that rows with choices of their own cost little memory.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

from .stop_strings import StopStringMatcher


def choice_texts(choices: Sequence[str]) -> frozenset[bytes]:
    """The byte strings an answer may be: each choice, and each after one space."""
    return frozenset(t for c in choices for t in (c.encode(), b" " + c.encode()))


class EngineChoices:
    """An engine's choices: the vocabulary is read on the first request that has some."""

    def __init__(self, tokenizer, vocab_size: int, device: torch.device | str) -> None:
        self.tokenizer, self.vocab_size, self.device = tokenizer, vocab_size, device
        self._vocabulary: ChoiceVocabulary | None = None

    def constraint(self, choices: Sequence[str], stop_ids: frozenset[int]) -> "ChoiceConstraint":
        if self._vocabulary is None:
            self._vocabulary = ChoiceVocabulary(self.tokenizer, self.vocab_size)
        return self._vocabulary.constraint(choices, stop_ids)

    def check(self, request, stop_ids: frozenset[int]) -> None:
        """ValueError naming the request if its choices cannot be answered."""
        rid, choices = request.request_id, request.sampling.choices
        if not stop_ids:
            raise ValueError(f"request {rid!r}: choices need a stop token to end the answer with")
        try:
            unwritable = self.constraint(choices, stop_ids).unwritable(choices)
        except ValueError as e:
            raise ValueError(f"request {rid!r}: {e}") from None
        if unwritable:
            raise ValueError(f"request {rid!r}: no tokens of the vocabulary spell the choice {unwritable[0]!r}")

    def allowed(self, seqs: Sequence, rows: Sequence[int], num_rows: int) -> Tensor | None:
        """(num_rows, V) bool, the tokens each row may take (row rows[i] is the engine sequence
        seqs[i]'s: all tokens for one without choices), or None where no sequence has choices."""
        chosen = [(row, seq) for row, seq in zip(rows, seqs) if seq.request.sampling.choices]
        if not chosen:
            return None
        ids = [self.constraint(seq.request.sampling.choices, seq.stop_ids).allowed_after(seq.generated)
               for _, seq in chosen]
        on_device = lambda values: torch.tensor(values, dtype=torch.int64, device=self.device)  # noqa: E731
        allowed = torch.ones(num_rows, self.vocab_size, dtype=torch.bool, device=self.device)
        allowed[on_device([row for row, _ in chosen])] = False
        rows_of_ids = [row for (row, _), some in zip(chosen, ids) for _ in some]
        allowed[on_device(rows_of_ids), on_device([i for some in ids for i in some])] = True
        return allowed


class ChoiceVocabulary:
    """The tokens that spell text, by their bytes, of one tokenizer and model vocabulary."""

    KEPT = 4096     # sets of choices whose allowed tokens are remembered (rows may each have their own)

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.matcher = StopStringMatcher(tokenizer)
        if self.matcher.alphabet is None:
            raise ValueError("choices need a byte-level tokenizer (GPT-2's or Llama 3's, as Idefics3 "
                             "checkpoints have)")
        backend = self.matcher.backend
        added = set(backend.get_added_tokens_decoder())
        self.by_bytes: dict[bytes, list[int]] = {}
        for i in sorted(backend.get_vocab(with_added_tokens=False).values()):
            piece = self.matcher.token_bytes(i)
            if i < vocab_size and i not in added and piece:
                self.by_bytes.setdefault(piece, []).append(i)
        self.longest = max(map(len, self.by_bytes))
        self._constraints: OrderedDict[tuple, ChoiceConstraint] = OrderedDict()

    def constraint(self, choices: Sequence[str], stop_ids: frozenset[int]) -> "ChoiceConstraint":
        key = (choice_texts(choices), stop_ids)
        if key not in self._constraints:
            self._constraints[key] = ChoiceConstraint(self, *key)
            if len(self._constraints) > self.KEPT:
                self._constraints.popitem(last=False)
        self._constraints.move_to_end(key)
        return self._constraints[key]

    def pieces(self, text: bytes) -> list[tuple[bytes, list[int]]]:
        """The tokens that spell a beginning of `text`, grouped by the bytes they stand for."""
        found = (text[:n] for n in range(1, min(len(text), self.longest) + 1))
        return [(piece, self.by_bytes[piece]) for piece in found if piece in self.by_bytes]

    def answer_bytes(self, token_ids: Sequence[int]) -> bytes:
        return b"".join(self.matcher.token_bytes(t) or b"" for t in token_ids)


class ChoiceConstraint:
    """One set of choices and stop ids: the tokens allowed after each answer so far."""

    def __init__(self, vocabulary: ChoiceVocabulary, texts: frozenset[bytes], stop_ids: frozenset[int]) -> None:
        self.vocabulary, self.texts, self.stop_ids = vocabulary, texts, stop_ids
        self.finishable = lru_cache(maxsize=None)(self._finishable)
        self.allowed_ids = lru_cache(maxsize=None)(self._allowed_ids)

    def allowed_after(self, answer_ids: Sequence[int]) -> list[int]:
        """The tokens allowed after the answer `answer_ids`."""
        return self.allowed_ids(self.vocabulary.answer_bytes(answer_ids))

    def _finishable(self, text: bytes) -> tuple[bool, ...]:
        """For each position of `text` (and its end): whether tokens spell the rest of it from there."""
        ok = [False] * len(text) + [True]
        for start in range(len(text) - 1, -1, -1):
            ok[start] = any(ok[start + len(piece)] for piece, _ in self.vocabulary.pieces(text[start:]))
        return tuple(ok)

    def _allowed_ids(self, answer: bytes) -> list[int]:
        """Tokens after which some choice can still be finished, and the stop ids on a whole choice."""
        ids = set(self.stop_ids) if answer in self.texts else set()
        at = len(answer)
        for text in [t for t in self.texts if t.startswith(answer)]:
            finishable = self.finishable(text)
            for piece, tokens in self.vocabulary.pieces(text[at:]):
                if finishable[at + len(piece)]:
                    ids.update(tokens)
        return sorted(ids)

    def unwritable(self, choices: Sequence[str]) -> list[str]:
        """The choices no sequence of this vocabulary's tokens spells (with or without the space)."""
        return [c for c in choices if not any(self.finishable(t)[0] for t in choice_texts([c]))]
