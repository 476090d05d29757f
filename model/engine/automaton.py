"""A regular expression as an automaton over Unicode code points, for constrained decoding.

The pattern is read by Python's own parser (so its syntax and escapes are `re`'s), turned into a
Thompson NFA whose edges carry sets of code points as sorted intervals, and determinised lazily:
a state is the set of NFA states an answer so far can be in. Only states from which a whole match
is still reachable are built, so every state an answer reaches can be finished. The language is
`re.fullmatch`'s; constructs that are not regular (back-references, look-arounds, possessive and
atomic groups, anchors inside the pattern) and IGNORECASE are refused.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from functools import lru_cache

try:
    from re import _constants as C, _parser as parser
except ImportError:     # Python 3.10
    import sre_constants as C
    import sre_parse as parser

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
MAX_NFA_STATES = 200_000
Ranges = tuple[tuple[int, int], ...]    # sorted, disjoint, inclusive intervals of code points


def merged(ranges) -> Ranges:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple(map(tuple, out))


def without_surrogates(ranges: Ranges) -> Ranges:
    """Surrogates have no UTF-8 encoding: no answer can hold one."""
    lo_s, hi_s = SURROGATES
    parts = [p for lo, hi in ranges for p in ((lo, min(hi, lo_s - 1)), (max(lo, hi_s + 1), hi))]
    return tuple((lo, hi) for lo, hi in parts if lo <= hi)


def complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in ranges:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return tuple(out)


def contains(ranges: Ranges, cp: int) -> bool:
    i = bisect_right(ranges, (cp, MAX_CODE_POINT + 1)) - 1
    return i >= 0 and ranges[i][0] <= cp <= ranges[i][1]


def intersects(ranges: Ranges, lo: int, hi: int) -> bool:
    i = bisect_right(ranges, (hi, MAX_CODE_POINT + 1)) - 1
    return i >= 0 and ranges[i][1] >= lo


@lru_cache(maxsize=None)
def category(name: str, ascii_only: bool) -> Ranges:
    """`re`'s \\d \\s \\w (and their negations) as code point intervals."""
    base = name.removeprefix("CATEGORY_").removeprefix("NOT_").removeprefix("UNI_")
    space = (lambda c: c in " \t\n\r\f\v") if ascii_only else str.isspace     # ASCII \s: not \x1c-\x1f
    test = {"DIGIT": str.isdecimal, "SPACE": space,
            "WORD": lambda c: c.isalnum() or c == "_", "LINEBREAK": lambda c: c == "\n"}[base]
    top = 0x7F if ascii_only or base == "LINEBREAK" else MAX_CODE_POINT
    found = merged((cp, cp) for cp in range(top + 1) if test(chr(cp)))
    return complement(found) if "NOT_" in name else found


class _NFA:
    """States 0..n-1: epsilon moves and (ranges, target) edges; one accepting state."""

    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[Ranges, int]]] = []

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise ValueError("the pattern is too large (counted repeats expand into that many states)")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1


class Automaton:
    """A pattern's lazily determinised automaton. States are ints; None is no state (dead)."""

    def __init__(self, pattern: str, space_first: bool = False) -> None:
        """space_first: a match may also begin with one space (after "Assistant:", models write one)."""
        try:
            parsed = parser.parse(pattern, 0)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        except OverflowError as e:          # a{4294967295}
            raise ValueError(f"a repeat count too large: {e}") from None
        except RecursionError:              # Python's parser recurses once a group
            raise ValueError("the pattern nests its groups too deeply") from None
        flags = parsed.state.flags
        if flags & re.IGNORECASE:
            raise ValueError("IGNORECASE patterns are not supported: spell both cases")
        self.nfa = _NFA()
        start, self.accept = self.nfa.state(), self.nfa.state()
        items = list(parsed)      # fullmatch's language: ^ or \A first and $ or \Z last say nothing
        if items and items[0][0] is C.AT and items[0][1] in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
            items = items[1:]
        if items and items[-1][0] is C.AT and items[-1][1] in (C.AT_END, C.AT_END_STRING):
            items = items[:-1]
        begin = self.nfa.state()
        self.nfa.eps[start].append(begin)
        if space_first:
            self.nfa.edges[start].append((((32, 32),), begin))
        self._sequence(items, begin, self.accept, flags)
        self._alive = self._reaching_accept()
        self._closure: dict[int, frozenset[int]] = {}
        self._sets: list[frozenset[int]] = []
        self._ids: dict[frozenset[int], int] = {}
        self._moves: list[dict[int, int | None]] = []
        self._out: list[Ranges] = []
        self.start = self._intern(self._closed([start]))
        # Code points where some edge's set begins or ends: between two of them all are alike.
        self.boundaries = tuple(sorted({b for edges in self.nfa.edges for ranges, _ in edges
                                        for lo, hi in ranges for b in (lo, hi + 1)}))

    # ---- building the NFA --------------------------------------------------------------------
    def _sequence(self, items, start: int, end: int, flags: int) -> None:
        at = start
        for item in items:
            nxt = self.nfa.state()
            self._item(item, at, nxt, flags)
            at = nxt
        self.nfa.eps[at].append(end)

    def _item(self, item, start: int, end: int, flags: int) -> None:
        op, arg = item
        nfa = self.nfa
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            ranges = without_surrogates(self._ranges(op, arg, flags))
            if ranges:
                nfa.edges[start].append((ranges, end))
        elif op is C.BRANCH:
            for alternative in arg[1]:
                self._sequence(list(alternative), start, end, flags)
        elif op is C.SUBPATTERN:
            group_flags = (flags | arg[1]) & ~arg[2]
            if group_flags & re.IGNORECASE:
                raise ValueError("IGNORECASE patterns are not supported: spell both cases")
            self._sequence(list(arg[3]), start, end, group_flags)
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):   # lazy or greedy: the same language
            self._repeat(*arg, start, end, flags)
        else:
            raise ValueError(f"the pattern uses {str(op).lower()}, which constrained decoding does not "
                             "support (back-references, look-arounds, anchors inside the pattern, "
                             "possessive or atomic groups)")

    def _repeat(self, low: int, high: int, body, start: int, end: int, flags: int) -> None:
        at = start
        for _ in range(low):
            nxt = self.nfa.state()
            self._sequence(list(body), at, nxt, flags)
            at = nxt
        if high == C.MAXREPEAT:
            loop = self.nfa.state()
            self.nfa.eps[at].append(loop)
            self._loop(body, loop, flags)
            self.nfa.eps[loop].append(end)
            return
        for _ in range(high - low):
            nxt = self.nfa.state()
            self.nfa.eps[at].append(end)
            self._sequence(list(body), at, nxt, flags)
            at = nxt
        self.nfa.eps[at].append(end)

    def _loop(self, body, loop: int, flags: int) -> None:
        # The body runs from a fresh state back to `loop`, so an empty body cannot spin in place.
        inner = self.nfa.state()
        self.nfa.eps[loop].append(inner)
        self._sequence(list(body), inner, loop, flags)

    def _ranges(self, op, arg, flags: int) -> Ranges:
        if op is C.LITERAL:
            return ((arg, arg),)
        if op is C.NOT_LITERAL:
            return complement(((arg, arg),))
        if op is C.ANY:
            return ((0, MAX_CODE_POINT),) if flags & re.DOTALL else complement(((10, 10),))
        negate, parts = False, []
        for sub_op, sub_arg in arg:
            if sub_op is C.NEGATE:
                negate = True
            elif sub_op is C.LITERAL:
                parts.append((sub_arg, sub_arg))
            elif sub_op is C.RANGE:
                parts.append(sub_arg)
            elif sub_op is C.CATEGORY:
                parts.extend(category(str(sub_arg), bool(flags & re.ASCII)))
            else:
                raise ValueError(f"unsupported character set item {sub_op}")
        ranges = merged(parts)
        return complement(ranges) if negate else ranges

    def _reaching_accept(self) -> list[bool]:
        back: list[list[int]] = [[] for _ in self.nfa.eps]
        for s, targets in enumerate(self.nfa.eps):
            for t in targets:
                back[t].append(s)
        for s, edges in enumerate(self.nfa.edges):
            for _, t in edges:
                back[t].append(s)
        alive, todo = [False] * len(back), [self.accept]
        alive[self.accept] = True
        while todo:
            for s in back[todo.pop()]:
                if not alive[s]:
                    alive[s] = True
                    todo.append(s)
        return alive

    # ---- the lazy DFA ------------------------------------------------------------------------
    def _closed(self, states) -> frozenset[int]:
        seen, todo = set(), [s for s in states if self._alive[s]]
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(t for t in self.nfa.eps[s] if self._alive[t])
        return frozenset(seen)

    def _intern(self, states: frozenset[int]) -> int | None:
        if not states:
            return None
        if states not in self._ids:
            self._ids[states] = len(self._sets)
            self._sets.append(states)
            self._moves.append({})
            self._out.append(merged(r for s in states for ranges, t in self.nfa.edges[s] if self._alive[t]
                                    for r in ranges))
        return self._ids[states]

    def step(self, state: int, cp: int) -> int | None:
        """The state after one more character, None where no match goes on with it."""
        moves = self._moves[state]
        if cp not in moves:
            targets = [t for s in self._sets[state] for ranges, t in self.nfa.edges[s]
                       if self._alive[t] and contains(ranges, cp)]
            moves[cp] = self._intern(self._closed(targets))
        return moves[cp]

    def accepts(self, state: int) -> bool:
        return self.accept in self._sets[state]

    def continues_with(self, state: int, lo: int, hi: int) -> bool:
        """Whether some character in [lo, hi] goes on from `state`."""
        return intersects(self._out[state], lo, hi)

    def ends(self, state: int) -> bool:
        """Whether nothing may follow (the answer is whole and can only stop)."""
        return not self._out[state]


@lru_cache(maxsize=64)
def automaton_of(pattern: str) -> Automaton:
    return Automaton(pattern)


def matches(pattern: str, text: str) -> bool:
    """Whether `text` is a whole match of `pattern` (re.fullmatch's sense, in one pass: no backtracking)."""
    automaton = automaton_of(pattern)
    state = automaton.start
    for ch in text:
        if state is None:
            return False
        state = automaton.step(state, ord(ch))
    return state is not None and automaton.accepts(state)
