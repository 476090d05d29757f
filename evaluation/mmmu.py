"""MMMU's own scoring (its official evaluation, which lmms-eval runs): an answer to a question with
options is read as one option's letter (from the letter, else from an option's text in a longer
answer, else a letter drawn at random), an open question's answer as the texts and numbers it ends
on. Written from the rules of MMMU's eval_utils, so that our scores stand beside papers' tables."""
from __future__ import annotations

import hashlib
import random
import re

from processing.options import option_letter, option_list

EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "'")      # stripped from the answer's ends, in this order
KEY_PHRASES = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
NUMBER_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def chosen_option(answer: str, options: list[str]) -> str:
    """The letter an answer chose among the options: "(B)" anywhere, else "B " (a letter before a
    space), else "B.", else (in an answer of more than five words) an option's text; of several, the
    one written last; of none, one drawn at random, as MMMU's evaluation draws (seeded by the answer
    and its options here, so that a rescore scores it alike)."""
    for mark in EDGE_PUNCTUATION:
        answer = answer.strip(mark)
    spaced = f" {answer} "
    letters = [option_letter(k) for k in range(len(options))]
    bracketed = [x for x in letters if f"({x})" in spaced]
    found = bracketed or [x for x in letters if f"{x} " in spaced] or [x for x in letters if f"{x}." in spaced]
    if found:
        if len(found) == 1:
            return found[0]
        written = [spaced.rfind(f"({x})" if bracketed else f" {x} ") for x in found]
        return found[written.index(max(written))]
    if len(spaced.split()) > 5:
        lowered = spaced.lower()
        named = [x for x, text in zip(letters, options) if text.lower() in lowered]
        if named:
            written = [lowered.rfind(options[letters.index(x)].lower()) for x in named]
            return named[written.index(max(written))]
    seed = hashlib.sha256("\x1f".join([answer, *options]).encode()).digest()
    return random.Random(seed).choice(letters)


def normalized(text: str) -> list:
    """A text as MMMU compares it: a number (commas dropped) rounded to 2 places, else lowercase (a
    single character as " x" and "x ", so that it matches only as a word's edge)."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def key_parts(answer: str) -> list[str]:
    """The parts of an answer that may hold its result: in each line, what follows the last key phrase
    ("is ", "so ", "answer ", ...; "=" too in the last line), the shortest such tail; the whole answer
    where no line has one."""
    answer = answer.strip().strip(".").lower()
    lines = answer.split("\n")
    parts = []
    for k, line in enumerate(lines):
        phrases = KEY_PHRASES + (("=",) if k == len(lines) - 1 else ())
        shortest = None
        for phrase in phrases:
            if phrase in line:
                tail = line.split(phrase)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in TRIVIAL:
            parts.append(shortest)
    return parts or [answer]


def numbers_in(text: str) -> list[str]:
    return NUMBER_WITH_COMMAS.findall(text) + NUMBER_SCIENTIFIC.findall(text) + NUMBER_PLAIN.findall(text)


def open_answer_matches(answer: str, truths: list[str]) -> bool:
    """An open question's answer is right when a number it gives equals a true one (to 2 places), or a
    text it ends on holds a true text."""
    parts = key_parts(answer)
    said = {value for text in parts + [n for part in parts for n in numbers_in(part)] for value in normalized(text)}
    wanted = [value for truth in truths for value in normalized(truth)]
    return any(value in wanted if isinstance(value, float)
               else any(isinstance(truth, str) and truth in value for truth in wanted)
               for value in said)


def mmmu_score(answer: str, truths: list[str], options_cell: object) -> float:
    """1 when the answer is right by MMMU's rules: the option letter it chose is a true one (a question
    with options), or it matches a true answer (an open question, one without)."""
    options = option_list(options_cell)
    if options:
        return float(chosen_option(answer, options) in truths)
    return float(open_answer_matches(answer, truths))


def subject(row_id: str) -> str | None:
    """The subject of an MMMU question id ("validation_Art_Theory_12": Art_Theory), as MMMU's evaluation
    groups its scores."""
    found = re.fullmatch(r"[^_]+_(.+?)_\d+", row_id)
    return found.group(1) if found else None


def with_subjects(table):
    """MMMU's predictions with `category` the subject of each id (when the benchmark gave none)."""
    import pyarrow as pa

    found = [subject(str(i)) for i in table.column("id").to_pylist()]
    return table.append_column("category", pa.array(found, pa.string())) if any(found) else table
