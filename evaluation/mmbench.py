"""MMBench's own scoring, as lmms-eval scores it without a GPT judge (its mmbench_en_dev_static):
each row's answer is read as one option's letter, and a question counts right only when every one of
its circular copies (the same question with its options rotated; ids equal modulo 1e6) is; and
MMStar's, lmms-eval's multiple-choice extraction alone. Written from the rules of lmms-eval's
evaluators, so that our scores stand beside tables made with it."""
from __future__ import annotations

OPTION_COLUMNS = ("A", "B", "C", "D")       # the options MMBench's rows hold, which its scoring reads
LETTERS = "ABCDE"                           # the letters an answer may name (E: none of the options)
COPIES_APART = 1_000_000                    # a circular copy's index: its question's plus a multiple of this
# The marks around a letter MMBench reads it by, tried in this order: "B.", "B,", ..., "(B)", ":B" ...
MARKS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
         (":", "."), (":", ")"), (":", ")."))
# The last resort (lmms-eval's multiple-choice extraction): the letter of the highest-ranked way of
# writing one; of one way, the letter written last
RANKS = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
         "space": 2, "anywhere": 0}
WRITTEN = {"parentheses": "({})", "period": "{}.", "colon": "{}:", "right_paren": "{})", "space": "{} "}
PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
           "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
           "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
           "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
EDGE_MARKS = (",", ".", "!", "?", ";", ":", "'", '"')        # stripped from the answer's ends, in this order
ANY_LETTER = "ABCDEFGH"
MMSTAR_LETTERS = "ABCD"


def marked_letter(answer: str) -> str | None:
    """The one letter an answer writes as a word of its own ("B", "I pick B"; not "A" among more than
    three words: an article), else the one written with a mark, the marks tried in MMBench's order."""
    words = answer.split()
    alone = [x for x in LETTERS if x in words]
    if len(alone) == 1 and not ("A" in words and len(words) > 3):
        return alone[0]
    for before, after in MARKS:
        marked = [x for x in LETTERS if before + x + after in words]
        if len(marked) == 1:
            return marked[0]
    return None


def named_option(answer: str, options: dict[str, str]) -> str | None:
    """The letter of the one option whose text (lowercased) the answer holds."""
    lowered = answer.lower()
    named = [x for x, text in options.items() if text.lower() in lowered]
    return named[0] if len(named) == 1 else None


def extracted_letter(answer: str, letters: str) -> str | None:
    """The letter an answer most likely chose, by how it is written: alone at its start, at its end,
    after "the answer is" ..., as "(B)", "B.", "B:", "B)", "B " (the last such); any letter at all
    only where none is written so."""
    text = answer.strip()
    if not text:
        return None
    for mark in EDGE_MARKS:
        text = text.strip(mark)
    text, letters = f" {text} ", letters or ANY_LETTER
    found = [(x, text.rfind(WRITTEN[way].format(x)), way) for way in WRITTEN for x in letters
             if WRITTEN[way].format(x) in text]
    lowered = text.lower()
    for phrase in PHRASES:
        after = lowered.find(phrase)
        if after >= 0:
            found += [(x, text.find(x, after + len(phrase)), "phrase") for x in letters
                      if text.find(x, after + len(phrase)) >= 0]
    bare = text.strip()
    found += [(x, 0, "start") for x in letters if bare.startswith(x) and (len(bare) == 1 or not bare[1].isalpha())]
    found += [(x, len(text) - 1, "end") for x in letters
              if bare.endswith(x) and (len(bare) == 1 or not bare[-2].isalpha())]
    found = found or [(x, text.rfind(x), "anywhere") for x in letters if x in text]
    return max(found, key=lambda f: (RANKS[f[2]], f[1]))[0] if found else None


def chosen_letter(answer: str, options: dict[str, str]) -> str | None:
    """The letter an answer chose among the options (letter -> text), as MMBench reads it: a letter
    written alone or marked, else the one option the answer names, else the likeliest letter."""
    return marked_letter(answer) or named_option(answer, options) or extracted_letter(answer, "".join(sorted(options)))


def truth_letter(answers: list[str], letters: str = LETTERS) -> str:
    letter = answers[0].strip().upper() if len(answers) == 1 else ""
    if len(letter) != 1 or letter not in letters:
        raise ValueError(f"ground truth {answers if len(answers) > 1 else answers[0]!r} is not one option letter "
                         f"({', '.join(letters)})")
    return letter


def mmbench_score(answer: str, answers: list[str], options: list[object]) -> float:
    """1 when the letter an answer chose (options: the row's A, B, C, D; null ones absent) is the
    ground truth's."""
    truth = truth_letter(answers)
    given = {x: str(text) for x, text in zip(OPTION_COLUMNS, options) if text is not None}
    return float(chosen_letter(answer.strip(), given) == truth)


def mmstar_score(answer: str, answers: list[str]) -> float:
    """MMStar's rule as lmms-eval scores it: 1 when the letter its multiple-choice extraction reads
    among A-D (extracted_letter) is the ground truth's."""
    return float(extracted_letter(answer, MMSTAR_LETTERS) == truth_letter(answers, MMSTAR_LETTERS))


def question_of(row_id: object) -> str:
    """The question a row asks: its id modulo 1e6 (MMBench's circular copies' ids are their
    question's plus multiples of 1e6), a non-numeric id its own."""
    try:
        return str(int(str(row_id)) % COPIES_APART)
    except ValueError:
        return str(row_id)
