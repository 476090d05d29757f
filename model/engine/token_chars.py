"""A vocabulary as characters, to find the tokens an automaton state allows with array operations.

Inside a JSON string most of the vocabulary is allowed, so walking it token by token costs a
quarter second of Python at 128 k tokens, and a string's maxLength n makes n + 1 such states. Here
every token that begins with a whole character is a row of code points (and the unfinished
character its bytes end in, if any); the automaton runs over all rows at once, one position at a
time, with code points grouped into classes that no edge of the automaton tells apart, so that
each distinct (state, class) is stepped once.
"""
from __future__ import annotations

import codecs
from typing import Callable

import numpy as np

from .automaton import Automaton


class TokenChars:
    """`keys` (distinct token bytes) as code points: those that begin with a whole character."""

    def __init__(self, keys: list[bytes], interval_of: Callable[[bytes], tuple[int, int]]) -> None:
        """interval_of(begun): the code points an unfinished character may become, as (lo, hi)."""
        rows, texts, tails = [], [], []
        for k, key in enumerate(keys):
            decoder = codecs.getincrementaldecoder("utf-8")()
            try:
                texts.append(decoder.decode(key, final=False))
            except UnicodeDecodeError:
                continue        # a character's later bytes, or bytes no character has
            rows.append(k)
            tails.append(decoder.getstate()[0])
        order = sorted(range(len(rows)), key=lambda i: -len(texts[i]))     # longest first
        self.keys = np.array([rows[i] for i in order], dtype=np.int64)
        lengths = np.array([len(texts[i]) for i in order], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.code_points = np.array([ord(c) for i in order for c in texts[i]], dtype=np.int64)
        # count[j]: the rows longer than j characters, which are the first count[j] rows
        self.count = np.array([(lengths > j).sum() for j in range(int(lengths.max(initial=0)))], dtype=np.int64)
        begun = sorted({tails[i] for i in order if tails[i]})
        self.tail_intervals = [interval_of(b) for b in begun]
        index = {b: n for n, b in enumerate(begun)}
        self.tail_rows = np.array([r for r, i in enumerate(order) if tails[i]], dtype=np.int64)
        self.tail_kinds = np.array([index[tails[i]] for i in order if tails[i]], dtype=np.int64)

    def allowed_keys(self, automaton: Automaton, state: int) -> np.ndarray:
        """The keys (indices into the vocabulary's sorted token bytes) that, read from `state`
        between characters, leave a match possible."""
        boundaries = np.array(automaton.boundaries, dtype=np.int64)
        classes = len(boundaries) + 1
        at = np.full(len(self.keys), state, dtype=np.int64)
        steps: dict[int, int] = {}

        def step(pair: int) -> int:
            if pair not in steps:
                state, cls = divmod(pair, classes)
                nxt = automaton.step(state, int(boundaries[cls - 1]) if cls else 0)
                steps[pair] = -1 if nxt is None else nxt
            return steps[pair]

        for j, active in enumerate(self.count):
            live = np.flatnonzero(at[:active] >= 0)
            if not live.size:
                break
            cls = np.searchsorted(boundaries, self.code_points[self.starts[live] + j], side="right")
            pairs, where = np.unique(at[live] * classes + cls, return_inverse=True)
            at[live] = np.array([step(int(p)) for p in pairs], dtype=np.int64)[where]
        rows = self.tail_rows[at[self.tail_rows] >= 0]
        if rows.size:
            kinds = len(self.tail_intervals)
            pairs, where = np.unique(at[rows] * kinds + self.tail_kinds[at[self.tail_rows] >= 0],
                                     return_inverse=True)
            goes_on = np.array([automaton.continues_with(int(p) // kinds, *self.tail_intervals[int(p) % kinds])
                                for p in pairs])
            at[rows[~goes_on[where]]] = -1
        return self.keys[at >= 0]
