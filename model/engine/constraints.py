"""Answers constrained to a pattern: SamplingParams.choices, .regex and .json_schema (vLLM's guided
choice, regex and JSON), as one mechanism.

Each request's constraint is a regular expression (choices become an alternation of their escaped
texts; a JSON schema becomes the expression of its documents), which the answer matches in full,
as written or after one space (chat templates end with "Assistant:", and models answer " Yes" or
" {"). At each step a row may take only the tokens after which a whole match can still be written,
and a stop token once its answer is one; the mask is applied to the logits before the draw (greedy
or sampled). Greedy then answers what transformers' generate(prefix_allowed_tokens_fn=...) answers
with the same sets.

Tokens are matched on their bytes (byte-level vocabularies: every Idefics3 checkpoint), so an
answer may be spelled in any of the vocabulary's ways, and a token that ends inside a multi-byte
character is allowed where some completion of that character goes on. Special and added tokens
never spell an answer. The tokens each state allows are found by walking the vocabulary as a trie
(the sorted token bytes) along the automaton, pruning at the first byte no match takes, or, where
many tokens go on (inside a JSON string), by running every token's characters through it at once
(model.engine.token_chars); they are kept per state on the engine's device, as ids where few, as a
vocabulary mask where many.
"""
from __future__ import annotations

import re
from bisect import bisect_left
from collections import OrderedDict
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .automaton import Automaton
from .json_schema import schema_text_pattern
from .stop_strings import StopStringMatcher
from .token_chars import TokenChars

State = tuple[int, bytes]      # the automaton's state, and the bytes of a character begun but not ended


def choices_pattern(choices: Sequence[str]) -> str:
    return "|".join(map(re.escape, choices))


@lru_cache(maxsize=4096)
def _pattern(choices: tuple[str, ...], regex: str | None, schema: str | None) -> str:
    if choices:
        return choices_pattern(choices)
    return regex if regex is not None else schema_text_pattern(schema)


def request_pattern(sampling) -> str | None:
    """The expression a request's answer must match in full, None for an unconstrained one."""
    if not sampling.constrained:
        return None
    return _pattern(tuple(sampling.choices), sampling.regex, sampling.json_schema_text)


class TokenVocabulary:
    """The tokens that spell text, by their bytes, of one tokenizer and model vocabulary."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.matcher = StopStringMatcher(tokenizer)
        if self.matcher.alphabet is None:
            raise ValueError("constrained answers need a byte-level tokenizer (GPT-2's or Llama 3's, as "
                             "Idefics3 checkpoints have)")
        backend = self.matcher.backend
        added = set(backend.get_added_tokens_decoder())
        by_bytes: dict[bytes, list[int]] = {}
        for i in sorted(backend.get_vocab(with_added_tokens=False).values()):
            piece = self.matcher.token_bytes(i)
            if i < vocab_size and i not in added and piece:
                by_bytes.setdefault(piece, []).append(i)
        self.keys = sorted(by_bytes)                  # the trie, flattened: a node is a run of keys
        self.ids = [by_bytes[k] for k in self.keys]
        self.known = set(self.keys)
        self.longest = max(map(len, self.keys))
        self.vocab_size = vocab_size
        self.flat_ids = np.array([i for some in self.ids for i in some], dtype=np.int64)
        self.key_of_id = np.array([k for k, some in enumerate(self.ids) for _ in some], dtype=np.int64)
        self._chars: TokenChars | None = None
        self.spells = lru_cache(maxsize=1 << 16)(self._spells)     # every request's choices are checked

    @property
    def chars(self) -> TokenChars:
        if self._chars is None:
            self._chars = TokenChars(self.keys, _code_points_after)
        return self._chars

    def ids_of_keys(self, keys: np.ndarray) -> list[int]:
        chosen = np.zeros(len(self.keys), dtype=bool)
        chosen[keys] = True
        return self.flat_ids[chosen[self.key_of_id]].tolist()

    def token_bytes(self, token_id: int) -> bytes:
        return self.matcher.token_bytes(token_id) or b""

    def _spells(self, text: bytes) -> bool:
        """Whether some sequence of tokens spells `text` exactly."""
        known = self.known
        ok = [False] * len(text) + [True]
        for start in range(len(text) - 1, -1, -1):
            ends = range(start + 1, min(len(text), start + self.longest) + 1)
            ok[start] = any(ok[end] and text[start:end] in known for end in ends)
        return ok[0]


def _utf8_length(lead: int) -> int:
    """The bytes of a character that begins with `lead`; 0 for a byte no character begins with."""
    return 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else \
        4 if 0xF0 <= lead < 0xF5 else 0


def _code_points_after(begun: bytes) -> tuple[int, int]:
    """The code points whose UTF-8 begins with `begun` (an unfinished character), as [lo, hi];
    lo > hi where none does (an overlong or out-of-range beginning)."""
    n = _utf8_length(begun[0])
    bits = begun[0] & (0xFF >> (n + 1))
    for byte in begun[1:]:
        bits = bits << 6 | (byte & 0x3F)
    missing = 6 * (n - len(begun))
    lo, hi = bits << missing, (bits << missing) | ((1 << missing) - 1)
    return max(lo, (0, 0x80, 0x800, 0x10000)[n - 1]), min(hi, 0x10FFFF)


class PatternConstraint:
    """One expression and set of stop ids: the tokens each state allows."""

    WALKED = 4096   # trie nodes a walk may visit before the vocabulary is read all at once instead

    def __init__(self, vocabulary: TokenVocabulary, pattern: str, stop_ids: frozenset[int],
                 device: torch.device | str) -> None:
        self.vocabulary, self.stop_ids, self.device = vocabulary, stop_ids, device
        self.vocab_size = vocabulary.vocab_size
        self.automaton = Automaton(pattern, space_first=True)
        if self.automaton.start is None:
            raise ValueError(f"the pattern {pattern!r} matches no text")
        self.start: State = (self.automaton.start, b"")
        self._steps: dict[tuple[int, bytes, int], State | None] = {}
        self._allowed: dict[State, Tensor] = {}
        self._startable: bool | None = None

    @property
    def startable(self) -> bool:
        """Whether some token of the vocabulary begins an answer (not only a stop token)."""
        if self._startable is None:
            self._startable = bool(set(self.allowed_ids(self.start)) - self.stop_ids)
        return self._startable

    def advance(self, state: State, token_ids: Sequence[int]) -> State:
        """The state after `token_ids` (tokens the constraint allowed, one after the other)."""
        for token in token_ids:
            for byte in self.vocabulary.token_bytes(token):
                state = self._byte(state, byte)
                if state is None:
                    raise ValueError(f"token {token} breaks the pattern")
        return state

    def allowed(self, state: State) -> Tensor:
        """The tokens allowed in `state`, on the device: their ids (int64) where they are few, a
        (V,) bool mask where they are many (inside a JSON string: most of the vocabulary), which
        is cheaper to put in a step's mask."""
        if state not in self._allowed:
            ids = torch.tensor(self.allowed_ids(state), dtype=torch.int64)
            if len(ids) > self.vocab_size // 16:
                mask = torch.zeros(self.vocab_size, dtype=torch.bool)
                ids = mask.index_fill_(0, ids, True)
            self._allowed[state] = ids.to(self.device)
        return self._allowed[state]

    def allowed_ids(self, state: State) -> list[int]:
        automaton, (at, begun) = self.automaton, state
        whole = not begun and automaton.accepts(at)
        if automaton.ends(at) and not begun:
            ids = []
        else:       # few tokens go on (a choice's next letters): one by one; many (in a JSON string): all at once
            ids = self._walk(state, None if begun else self.WALKED)
            if ids is None:
                ids = self.vocabulary.ids_of_keys(self.vocabulary.chars.allowed_keys(automaton, at))
        # A stop id is not text of the answer, whatever it spells ("." made a stop token): it ends
        # whole answers only. No way on (no token spells what must come next) allows nothing: the
        # request ends in error (NoTokenLeftError) rather than with an answer that does not match.
        ids = [i for i in ids if i not in self.stop_ids]
        return sorted(ids + list(self.stop_ids) if whole else ids)

    def _byte(self, state: State, byte: int) -> State | None:
        key = (*state, byte)
        if key not in self._steps:
            self._steps[key] = self._next(state, byte)
        return self._steps[key]

    def _next(self, state: State, byte: int) -> State | None:
        at, begun = state
        automaton, char = self.automaton, begun + bytes([byte])
        n = _utf8_length(char[0])
        if n == 0 or (len(char) > 1 and byte & 0xC0 != 0x80):
            return None
        if len(char) < n:
            lo, hi = _code_points_after(char)
            return (at, char) if lo <= hi and automaton.continues_with(at, lo, hi) else None
        try:
            cp = ord(char.decode())
        except UnicodeDecodeError:      # overlong or a surrogate
            return None
        nxt = automaton.step(at, cp)
        return None if nxt is None else (nxt, b"")

    def _walk(self, state: State, budget: int | None = None) -> list[int] | None:
        """The tokens whose bytes, read from `state`, leave a match still possible; None if that
        takes more than `budget` nodes of the trie."""
        keys, ids, found = self.vocabulary.keys, self.vocabulary.ids, []
        nodes = [(0, len(keys), 0, state)]       # keys[lo:hi] share their first `depth` bytes
        while nodes:
            if budget is not None:
                budget -= 1
                if budget < 0:
                    return None
            lo, hi, depth, at = nodes.pop()
            if depth and len(keys[lo]) == depth:
                found.extend(ids[lo])
                lo += 1
            while lo < hi:
                byte = keys[lo][depth]
                end = hi if byte == 255 else bisect_left(keys, keys[lo][:depth] + bytes([byte + 1]), lo, hi)
                nxt = self._byte(at, byte)
                if nxt is not None:
                    nodes.append((lo, end, depth + 1, nxt))
                lo = end
        return found


class EngineConstraints:
    """An engine's constrained requests: the vocabulary is read on the first one."""

    KEPT = 4096     # expressions whose allowed tokens are remembered (rows may each have their own)

    def __init__(self, tokenizer, vocab_size: int, device: torch.device | str) -> None:
        self.tokenizer, self.vocab_size, self.device = tokenizer, vocab_size, device
        self._vocabulary: TokenVocabulary | None = None
        self._constraints: OrderedDict[tuple[str, frozenset[int]], PatternConstraint] = OrderedDict()

    @property
    def vocabulary(self) -> TokenVocabulary:
        if self._vocabulary is None:
            self._vocabulary = TokenVocabulary(self.tokenizer, self.vocab_size)
        return self._vocabulary

    def constraint(self, pattern: str, stop_ids: frozenset[int]) -> PatternConstraint:
        key = (pattern, stop_ids)
        if key not in self._constraints:
            self._constraints[key] = PatternConstraint(self.vocabulary, pattern, stop_ids, self.device)
            if len(self._constraints) > self.KEPT:
                self._constraints.popitem(last=False)
        self._constraints.move_to_end(key)
        return self._constraints[key]

    def check(self, request, stop_ids: frozenset[int]) -> None:
        """ValueError naming the request if its answer's constraint cannot be kept."""
        rid, sampling = request.request_id, request.sampling
        if not stop_ids:
            raise ValueError(f"request {rid!r}: a constrained answer needs a stop token to end with")
        outside = sorted(t for t in stop_ids if not 0 <= t < self.vocab_size)
        if outside:
            raise ValueError(f"request {rid!r}: stop token id {outside[0]} is outside the vocabulary's "
                             f"{self.vocab_size} (a constrained answer must be able to end with each)")
        try:
            constraint = self.constraint(request_pattern(sampling), stop_ids)
        except ValueError as e:
            raise ValueError(f"request {rid!r}: {e}") from None
        unwritable = [c for c in sampling.choices
                      if not any(map(self.vocabulary.spells, (c.encode(), b" " + c.encode())))]
        if unwritable:
            raise ValueError(f"request {rid!r}: no tokens of the vocabulary spell the choice {unwritable[0]!r}")
        if not constraint.startable:
            raise ValueError(f"request {rid!r}: no token of the vocabulary begins an answer the pattern takes")

    def allowed(self, seqs: Sequence, rows: Sequence[int], num_rows: int) -> Tensor | None:
        """(num_rows, V) bool, the tokens each row may take (row rows[i] is the engine sequence
        seqs[i]'s: all tokens for an unconstrained one), or None where no sequence is constrained."""
        constrained = [(row, seq) for row, seq in zip(rows, seqs) if seq.request.sampling.constrained]
        if not constrained:
            return None
        allowed = torch.ones(num_rows, self.vocab_size, dtype=torch.bool, device=self.device)
        sets = [self._allowed_now(seq) for _, seq in constrained]
        on_device = lambda values: torch.tensor(values, dtype=torch.int64, device=self.device)  # noqa: E731
        masks = [(row, s) for (row, _), s in zip(constrained, sets) if s.dtype == torch.bool]
        if masks:
            allowed[on_device([row for row, _ in masks])] = torch.stack([s for _, s in masks])
        ids = [(row, s) for (row, _), s in zip(constrained, sets) if s.dtype != torch.bool]
        if ids:
            rows_of_ids = on_device([row for row, _ in ids])
            allowed[rows_of_ids] = False
            counts = on_device([len(s) for _, s in ids])
            allowed[rows_of_ids.repeat_interleave(counts), torch.cat([s for _, s in ids])] = True
        return allowed

    def is_whole(self, seq) -> bool:
        """Whether the answer so far is a whole match of its constraint (True without one): a stop
        string ends only whole answers, as a stop id that spells text does."""
        if not seq.request.sampling.constrained:
            return True
        self._allowed_now(seq)
        constraint, (at, begun), _ = seq.constraint_state
        return not begun and constraint.automaton.accepts(at)

    def _allowed_now(self, seq) -> Tensor:
        """The sequence's allowed tokens, its state moved on by the tokens it took since the last step.
        The sequence keeps its constraint: states are numbered in the order an automaton meets them,
        so a constraint the LRU dropped and made again could number them otherwise."""
        if seq.constraint_state is None:
            constraint = self.constraint(request_pattern(seq.request.sampling), seq.stop_ids)
            seq.constraint_state = (constraint, constraint.start, 0)
        constraint, state, taken = seq.constraint_state
        state = constraint.advance(state, seq.generated[taken:])
        seq.constraint_state = (constraint, state, len(seq.generated))
        return constraint.allowed(state)
