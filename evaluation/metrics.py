"""VQA benchmark metrics, following lmms-eval's conventions (see reference/metrics.md).

Every metric is a pure function `metric(prediction, answers) -> float in [0, 1]` for one row, where
`answers` is the row's ground truth: a list of strings, or a single string.
"""
from __future__ import annotations

import json
import re
from itertools import combinations
from typing import Callable, Sequence, Union

from evaluation.mmbench import OPTION_COLUMNS, mmbench_score, mmstar_score

Answers = Union[str, Sequence[str]]

# ---------------------------------------------------------------------------------------------
# VQA answer normalisation
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}

# Contractions in their apostrophe form. The keys we match are every spelling with one or more
# apostrophes dropped ("wouldn't've" <- "wouldntve", "wouldnt've", "wouldn'tve"). Spellings that are
# ordinary words without the apostrophe (its, well, were, ill, id, hell, shell, shed, wed, lets,
# whore) are left out: mapping them would corrupt real answers.
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he'll he's how'd how'll how's how're i'd've i'm i've isn't it'd it'd've it'll
ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've
she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll something's
that's that'll that'd there'd there'd've there're there's there'll they'd they'd've they'll
they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
_NOT_CONTRACTIONS = {"its", "well", "were", "ill", "id", "hell", "shell", "shed", "wed", "lets",
                     "whore"}


def _apostrophe_dropped_spellings(word: str) -> list[str]:
    positions = [i for i, ch in enumerate(word) if ch == "'"]
    spellings = []
    for k in range(1, len(positions) + 1):
        for dropped in combinations(positions, k):
            spellings.append("".join(ch for i, ch in enumerate(word) if i not in dropped))
    return spellings


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTIONS:
        for spelling in _apostrophe_dropped_spellings(word):
            if spelling not in _NOT_CONTRACTIONS:
                table[spelling] = word
    return table


CONTRACTIONS: dict[str, str] = _contraction_table()


def normalize_punctuation(text: str) -> str:
    """Delete or space out punctuation, the official VQA way (the whole text decides per character)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for ch in _PUNCTUATION:
        # Checked on the input text, not the running output, as the official script does.
        if delete_all or (ch + " ") in text or (" " + ch) in text:
            out = out.replace(ch, "")
        else:
            out = out.replace(ch, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_words(text: str) -> str:
    """Lowercase, number words to digits, drop articles, restore contractions' apostrophes."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation (applied to predictions and ground truths alike)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(normalize_punctuation(text))


# ---------------------------------------------------------------------------------------------
# Ground truth handling
# ---------------------------------------------------------------------------------------------

def as_answer_list(answers: object) -> list[str]:
    """Ground truth as a list of strings: a single string (or number: a counting benchmark's int
    column) becomes a one-element list; list items are taken as text (str) alike."""
    if answers is None:
        return []
    if isinstance(answers, str):
        answers = _json_list(answers)
    if isinstance(answers, (str, bytes, int, float)) and not isinstance(answers, bool):
        return [_answer_text(answers)]
    if isinstance(answers, dict):
        answers = [answers]
    try:
        items = list(answers)  # list, tuple, numpy array, pyarrow list
    except TypeError:
        raise ValueError(f"ground truth must be a string or a list of strings, got {type(answers).__name__}")
    return [_answer_text(a) for a in map(_record_answer, items) if a is not None]


def _json_list(text: str) -> str | list:
    """A JSON list of texts (benchmarks exported to CSV keep `["cat", "kitten"]`) as that list, else
    the text: scored as one answer, it matched neither. A list of numbers stays one answer (a
    chart's `[12, 15]` may be the answer as written)."""
    stripped = text.strip()
    if not (stripped.startswith('["') and stripped.endswith('"]')):
        return text
    try:
        items = json.loads(stripped)
    except ValueError:
        return text
    return items if isinstance(items, list) and all(isinstance(i, str) for i in items) else text


def _record_answer(item: object) -> object:
    """A record of the ground truth (VQAv2's {answer, answer_confidence, answer_id}) stands for its answer."""
    if isinstance(item, dict):
        if "answer" not in item:
            raise ValueError(f"a ground-truth answer is a record without an 'answer' field: {sorted(item)}")
        return item["answer"]
    if isinstance(item, (list, tuple)):
        raise ValueError("a ground-truth answer is itself a list: answers must be a list of strings")
    return item


def _answer_text(answer: object) -> str:
    """A ground-truth value as text; a whole number stored as a float (a count column with nulls,
    written by pandas) as the integer it is: 3.0 -> "3", which a prediction "3" matches; bytes (a
    string column written without its UTF-8 annotation) as their text."""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    if isinstance(answer, bytes):
        return answer.decode("utf-8")
    return str(answer)


def _require_answers(answers: object) -> list[str]:
    items = as_answer_list(answers)
    if not items:
        raise ValueError("row has no ground-truth answers")
    return items


def _prediction_text(prediction: object) -> str:
    return "" if prediction is None else _answer_text(prediction) if isinstance(prediction, float) else str(prediction)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def vqa_accuracy(prediction: str | None, answers: Answers) -> float:
    """VQA accuracy: min(1, matches among the other answers / 3), averaged leave-one-out."""
    truths = [normalize_vqa_answer(a) for a in _require_answers(answers)]
    guess = normalize_vqa_answer(_prediction_text(prediction))
    if len(truths) == 1:
        return float(truths[0] == guess)
    matches = [t == guess for t in truths]
    total = sum(matches)
    # The other answers of position i match `total - matches[i]` times.
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(truths)


def levenshtein(a: str, b: str) -> int:
    """Edit distance over code points (insert, delete, substitute, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalized_levenshtein(a: str, b: str) -> float:
    longest = max(len(a), len(b))
    return 0.0 if longest == 0 else levenshtein(a, b) / longest


def anls(prediction: str | None, answers: Answers, threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity for one row (DocVQA): 0 below the threshold."""
    guess = _anls_normalize(_prediction_text(prediction))
    distance = min(normalized_levenshtein(guess, _anls_normalize(a)) for a in _require_answers(answers))
    score = 1.0 - distance
    return 0.0 if score < threshold else score


def _to_number(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def _relaxed_match(prediction: str, target: str, tolerance: float) -> bool:
    p, t = _to_number(prediction), _to_number(target)
    if p is not None and t is not None and t != 0:
        return abs(p - t) / abs(t) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str | None, answers: Answers, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: numbers within 5% of a non-zero target, else exact (any case)."""
    guess = _prediction_text(prediction).strip()
    return float(any(_relaxed_match(guess, t, tolerance) for t in _require_answers(answers)))


def exact_match(prediction: str | None, answers: Answers) -> float:
    """1 when the VQA-normalised prediction equals any VQA-normalised ground truth."""
    guess = normalize_vqa_answer(_prediction_text(prediction))
    return float(any(guess == normalize_vqa_answer(a) for a in _require_answers(answers)))


# Option letters: the whole answer ("B", "(b)"), a leading "B." / "(B)" / "B)" / "B:", or a phrase.
_WHOLE_LETTER = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:]?$")
_LEADING_LETTER = re.compile(r"^[(\[]?([A-Z])(?:[)\]]|[.:,])")
_PHRASE_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*[(\[]?([A-Z])[)\]]?(?![\w'])")
_STANDALONE_LETTER = re.compile(r"(?<![\w'])[(\[]?([A-Z])[)\]]?(?![\w'])")
# "A dog", "I think": an article or pronoun, not an option ("A and B" names two options)
_PROSE_CAPITAL = re.compile(r"\s+(?!(?:and|or|nor)\b)[a-z]")


def extract_choice(text: str | None) -> str | None:
    """The option letter an answer chose ("B", "(B)", "B. cat", "The answer is B"), or None."""
    text = _prediction_text(text).strip()
    for pattern in (_WHOLE_LETTER, _LEADING_LETTER):
        found = pattern.search(text)
        if found:
            return found.group(1).upper()
    phrase = next((m for m in _PHRASE_LETTER.finditer(text) if not _is_prose(text, m)), None)
    if phrase:      # not "Answer: I think it is B"'s I
        return phrase.group(1).upper()
    # Last resort: a single distinct capital letter standing alone ("I think B is right" -> B).
    letters = {m.group(1) for m in _STANDALONE_LETTER.finditer(text) if not _is_prose(text, m)}
    return letters.pop() if len(letters) == 1 else None


def _is_prose(text: str, match: re.Match) -> bool:
    return match.group(1) in "AI" and _PROSE_CAPITAL.match(text, match.end()) is not None


def multiple_choice(prediction: str | None, answers: Answers) -> float:
    """1 when the option letter extracted from the prediction is the ground-truth letter."""
    truths = []
    for answer in _require_answers(answers):
        letter = extract_choice(answer)
        if letter is None:
            raise ValueError(f"ground truth {answer!r} is not an option letter")
        truths.append(letter)
    chosen = extract_choice(prediction)
    return float(chosen is not None and chosen in truths)


def mmmu(prediction: str | None, answers: Answers, options: object = None) -> float:
    """MMMU's own rules (evaluation.mmmu): a question with options (a list, or its text as MMMU's
    `options` column holds it) by the letter the answer chose, one without by its texts and numbers."""
    from evaluation.mmmu import mmmu_score

    return mmmu_score(_prediction_text(prediction), _require_answers(answers), options)


def mmbench(prediction: str | None, answers: Answers, *options: object) -> float:
    """MMBench's own rules (evaluation.mmbench), from the row's options A, B, C, D: the answer read as
    one option's letter. Its summary counts a question right only when all its circular copies are."""
    return mmbench_score(_prediction_text(prediction), _require_answers(answers), list(options))


def mmstar(prediction: str | None, answers: Answers) -> float:
    """MMStar's rule as lmms-eval scores it (evaluation.mmbench): the letter its multiple-choice
    extraction reads among A-D ("A cat" is A) is the ground truth's."""
    return mmstar_score(_prediction_text(prediction), _require_answers(answers))


METRICS: dict[str, Callable[..., float]] = {
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "mmmu": mmmu,
    "mmbench": mmbench,
    "mmstar": mmstar,
}
# What else of a row a metric reads: the columns its rows need
ROW_COLUMNS = {"mmmu": ("options",), "mmbench": OPTION_COLUMNS}
NEEDED_ROW_COLUMNS = {**ROW_COLUMNS, "mmbench": OPTION_COLUMNS[:2]}    # the rest may be missing: null options
CIRCULAR = {"mmbench"}      # metrics whose summary scores questions (a row with its circular copies), not rows


def score_row(name: str, prediction: str | None, row: dict) -> float:
    """The metric `name` of a prediction against its row's ground truth (answers, and the columns
    ROW_COLUMNS names)."""
    return get_metric(name)(prediction, row["answers"], *(row.get(c) for c in ROW_COLUMNS.get(name, ())))


def get_metric(name: str) -> Callable[..., float]:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name]
