"""SamplingParams.no_repeat_ngram_size (transformers' no_repeat_ngram_size): a token that would make
an n-gram the sequence already holds (its prompt included, as the reference counts) is not taken;
the loops of small captioning models ("a red car, a red car, ...") cannot start.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence as Seq

import torch
from torch import Tensor


class NGrams:
    """A growing sequence's n-grams: each (n-1)-token prefix and the tokens that followed it."""

    def __init__(self, n: int, ids: Seq[int]) -> None:
        self.n, self.ids = n, []
        self.followers: defaultdict[tuple[int, ...], set[int]] = defaultdict(set)
        self.extend(ids)

    def extend(self, tokens: Seq[int]) -> None:
        for token in tokens:
            self.ids.append(token)
            if len(self.ids) >= self.n:
                self.followers[tuple(self.ids[len(self.ids) - self.n:-1])].add(token)

    def banned(self) -> list[int]:
        """The tokens that would repeat an n-gram, taken next."""
        if len(self.ids) + 1 < self.n:
            return []
        return sorted(self.followers.get(tuple(self.ids[len(self.ids) - self.n + 1:]), ()))


def allowed_without(bans: list[tuple[int, list[int]]], num_rows: int, vocab: int, device) -> Tensor | None:
    """(num_rows, vocab) bool: every token but each row's banned ones (bans: row, its banned
    tokens), written in one index; None where no row bans one."""
    bans = [(row, banned) for row, banned in bans if banned]
    if not bans:
        return None
    allowed = torch.ones(num_rows, vocab, dtype=torch.bool, device=device)
    rows = torch.tensor([row for row, banned in bans for _ in banned], device=device)
    allowed[rows, torch.tensor([t for _, banned in bans for t in banned], device=device)] = False
    return allowed


def sequence_ngrams(seq) -> NGrams:
    """An engine sequence's n-grams (its prompt and answer so far), kept on it and moved on by the
    tokens it took since the last step."""
    if seq.ngrams is None:
        seq.ngrams = NGrams(seq.request.sampling.no_repeat_ngram_size, seq.request.prompt_ids)
    seq.ngrams.extend(seq.generated[len(seq.ngrams.ids) - seq.prompt_len:])
    return seq.ngrams
