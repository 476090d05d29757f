"""A multiple-choice question's options held as one list (MMMU's `options` column): read from the cell
and listed after the question as lmms-eval asks MMMU's questions."""
from __future__ import annotations

import ast
import json

from .errors import PromptError

MAX_OPTIONS_TEXT = 100_000      # characters: a literal past it is no benchmark's options (and parsing it is slow)


def option_list(cell: object) -> list[str]:
    """The options of a cell: a list of texts (or numbers), or its text as MMMU ships it (a Python
    list literal, "['5 cm', '10 cm']") or as JSON; null or an empty list: none (an open question)."""
    if cell is None:
        return []
    if isinstance(cell, str):
        cell = _literal(cell)
    if not isinstance(cell, (list, tuple)):
        raise PromptError(f"the options are not a list: {type(cell).__name__}")
    if not all(isinstance(o, (str, int, float)) and not isinstance(o, bool) for o in cell):
        raise PromptError("the options are not all texts or numbers")
    return [str(o) for o in cell]


def _literal(text: str) -> object:
    if len(text) > MAX_OPTIONS_TEXT:
        raise PromptError(f"the options' text is {len(text)} characters, past {MAX_OPTIONS_TEXT}")
    try:        # as lmms-eval reads MMMU's: a Python literal (no name is looked up, no call made)
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        failed = e
    try:
        return json.loads(text)         # JSON's own words (true, null) too
    except (ValueError, RecursionError):
        raise PromptError(f"the options' text is not a list: {type(failed).__name__}") from None


def option_letter(index: int) -> str:
    return chr(ord("A") + index)


def with_option_list(question: str, options: list[str]) -> str:
    """The question, then each option on a line of its own after its letter ("A. 5 cm")."""
    listed = "\n".join(f"{option_letter(k)}. {option}" for k, option in enumerate(options))
    return f"{question}\n{listed}"
