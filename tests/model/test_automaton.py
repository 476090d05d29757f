"""model.engine.automaton: the pattern's states against Python's own matchers: a state after each
character exactly where `regex`'s partial fullmatch says a match can still follow, accepting
exactly where `re.fullmatch` matches."""
from __future__ import annotations

import random
import re

import pytest
import regex

from model.engine.automaton import Automaton

PATTERNS = [r"a[^b\d]x*?(?:c|d){2,3}.\w", r"(ab|a)*b?", r"\d{1,3}(\.\d+)?", r"(x|y)*z{0,2}", r"[a-c]+|c(a|)+",
            r"^(?:a|bc)*$", r"()*a", r"(a*)*b", r"[\s\S]{2}", r"\w+ \W", r"(?s:.)a.", r"é+日?[^a-z]",
            r"(?a:\w)+", r"\Ax{2,}\Z", r"[^\n]{0,3}", r"(?:yes|no|maybe)", r"\S+\s?\d*"]
ALPHABET = "abcdxyz.0195\n é日_٣"       # ٣: a digit \d takes that (?a:...) and [0-9] do not


@pytest.mark.parametrize("pattern", PATTERNS)
def test_states_follow_python_matchers(pattern):
    automaton, rng = Automaton(pattern), random.Random(pattern)
    for _ in range(1500):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 8)))
        state = automaton.start
        for i, char in enumerate(text):
            state = automaton.step(state, ord(char))
            assert (state is not None) == bool(regex.fullmatch(pattern, text[:i + 1], partial=True)), text[:i + 1]
            if state is None:
                break
        else:
            assert automaton.accepts(state) == bool(re.fullmatch(pattern, text)), text


def test_what_may_follow_a_state():
    automaton = Automaton(r"ab?|c[α-ω]")
    after_a = automaton.step(automaton.start, ord("a"))
    assert automaton.accepts(after_a) and not automaton.ends(after_a)
    assert automaton.ends(automaton.step(after_a, ord("b")))
    after_c = automaton.step(automaton.start, ord("c"))
    assert automaton.continues_with(after_c, 0x3B0, 0x3B2) and not automaton.continues_with(after_c, 0x3CA, 0x3FF)


@pytest.mark.parametrize("pattern,message", [
    (r"(a)\1", "groupref"), (r"a(?=b)", "assert"), (r"a(?!b)", "assert_not"), (r"a$b", "at"),
    (r"(?i)yes", "IGNORECASE"), (r"a(?i:b)", "IGNORECASE"), (r"a++", "possessive"), (r"(?>a)", "atomic"),
    (r"a[", "not a regular expression"), (r"(?:a{1000}){1000}", "too large"),
    ("a{4294967295}", "repeat count too large"), ("(" * 1000 + "a" + ")" * 1000, "nests its groups too deeply")])
def test_patterns_that_are_not_regular_are_refused(pattern, message):
    with pytest.raises(ValueError, match=message):
        Automaton(pattern)


def test_a_pattern_of_nothing_has_no_start():
    assert Automaton(r"[^\s\S]").start is None
    assert Automaton(r"a[^\s\S]|b").step(Automaton(r"a[^\s\S]|b").start, ord("a")) is None


def test_a_match_may_begin_after_one_space():
    automaton = Automaton(r"[a-z]+", space_first=True)

    def state_after(text: str):
        state = automaton.start
        for char in text:
            state = state if state is None else automaton.step(state, ord(char))
        return state

    assert automaton.accepts(state_after("ab")) and automaton.accepts(state_after(" ab"))
    assert state_after("  ") is None and state_after(" ") is not None and not automaton.accepts(state_after(" "))
    assert state_after(" ") is not None and Automaton(r"[a-z]+").step(Automaton(r"[a-z]+").start, 32) is None


@pytest.mark.parametrize("pattern", [r"(?a)\s", r"\s", r"(?a:\S)", r"(?a)\w", r"\d", r"(?a)[^\s]"])
def test_each_classes_code_points_are_res(pattern):
    """ASCII \\s is [ \\t\\n\\r\\f\\v] (str.isspace also takes \\x1c-\\x1f)."""
    automaton = Automaton(pattern)
    for cp in [*range(0x100), 0x2028, 0x3000, 0x0663, 0x00E9]:
        state = automaton.step(automaton.start, cp)
        assert (state is not None and automaton.accepts(state)) == bool(re.fullmatch(pattern, chr(cp))), hex(cp)
