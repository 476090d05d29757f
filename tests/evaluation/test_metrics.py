"""Metrics against the worked examples and rules of reference/metrics.md (lmms-eval's conventions)."""
import pytest

from evaluation.metrics import (CONTRACTIONS, anls, exact_match, extract_choice, get_metric,
                                levenshtein, multiple_choice, normalize_vqa_answer, relaxed_accuracy,
                                vqa_accuracy)


# --- VQA normalisation: every case metrics.md lists -------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                        # always normalised, period stripped, lowercased
    ("10,000", "10000"),                    # digit-comma-digit anywhere: punctuation deleted
    ("a-b", "b"),                           # "-" not touching a space -> "a b", then article "a" dropped
    ("x-y", "x y"),
    ("5.", "5"),                            # period removed unless a digit follows
    ("3.5", "3.5"),
    ("U.S.", "us"),
    ("two dogs", "2 dogs"),                 # whole-token number words
    ("none", "0"), ("zero", "0"), ("ten", "10"),
    ("someone", "someone"),                 # "one" only as a whole token
    ("the dog", "dog"), ("an apple", "apple"), ("a cat", "cat"),
    ("dont", "don't"), ("hes", "he's"), ("youre", "you're"),
    ("its", "its"),                         # a word, not a contraction
    ("it's", "it's"),                       # apostrophes stay
    ("line\none\ttab", "line 1 tab"),       # newlines and tabs become spaces
    ("  padded  ", "padded"),
    ("12:30", "12:30"),                     # colons stay
    ("50% & #1 $2 *^|~", "50% & #1 $2 *^|~"),
    ("hello !", "hello"),                   # "!" touches a space: deleted
    ("hello!", "hello"),                    # "!" at the end: replaced by a space
    ("(red) or blue", "red or blue"),       # "(" touches a space... ")" too: both deleted
    ("[red]", "red"),
    ("cat, dog", "cat dog"),
    ("what?", "what"),
    ("a/b", "b"),                           # "/" -> space, article dropped
    ("BLUE", "blue"),
])
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_punctuation_decision_is_per_character_over_the_whole_text():
    # "-" touches a space somewhere, so every "-" is deleted, even the one inside "x-ray".
    assert normalize_vqa_answer("x-ray - scan") == "xray scan"
    # A digit-comma-digit anywhere deletes all punctuation, even between letters.
    assert normalize_vqa_answer("1,000 a-b") == "1000 ab"


def test_contraction_table_is_complete_in_every_apostrophe_spelling():
    assert CONTRACTIONS["wouldntve"] == CONTRACTIONS["wouldnt've"] == CONTRACTIONS["wouldn'tve"] == "wouldn't've"
    assert CONTRACTIONS["im"] == "i'm" and CONTRACTIONS["cant"] == "can't" and CONTRACTIONS["wont"] == "won't"
    for word in ["its", "well", "were", "ill", "id", "hell", "shell", "wed", "lets"]:
        assert word not in CONTRACTIONS, word
    assert all("'" in v for v in CONTRACTIONS.values())
    assert len(CONTRACTIONS) >= 100


# --- vqa_accuracy: the worked examples ---------------------------------------------------------

@pytest.mark.parametrize("prediction, answers, expected", [
    ("2", ["two"] * 3 + ["2"] * 7, 1.0),
    ("dog", ["a dog"] * 2 + ["cat"] * 8, 0.6),
    ("Yes.", ["yes"] * 10, 1.0),
    ("red", ["red"] + ["blue"] * 9, 0.3),
    ("10,000", ["10000"], 1.0),
    ("two dogs", ["2 dogs"], 1.0),
    ("its", ["it's"], 0.0),
    ("dont know", ["don't know"], 1.0),
    ("blue", ["blue"] * 2 + ["red"] * 8, pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)),
    ("green", ["red"] * 10, 0.0),
])
def test_vqa_accuracy_worked_examples(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_accuracy_leave_one_out_is_by_position():
    # Three matching answers out of ten: matching positions see 2 others (2/3), the rest see 3 (1).
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)


# --- anls ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, answers, expected", [
    ("helo", ["hello"], 0.8),
    ("Total: 45", ["total: 45", "45"], 1.0),
    ("12 34", ["1234"], 0.8),
    ("ab", ["ac"], 0.5),                    # distance exactly 0.5 keeps 0.5
    ("abc", ["xyz"], 0.0),
    ("abcd", ["abxy"], 0.5),
    ("abcde", ["abxyz"], 0.0),              # 0.4 < 0.5 -> 0
    ("  HELLO   World ", ["hello world"], 1.0),  # strip, lowercase, collapse whitespace
    ("", ["hello"], 0.0),                   # empty prediction vs non-empty answer
    ("", [""], 1.0),                        # empty vs empty
    ("héllo", ["hello"], 0.8),              # code points, not bytes
    ("日本語", ["日本"], pytest.approx(2 / 3)),
])
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == expected


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("", "") == 0
    assert levenshtein("flaw", "lawn") == 2


# --- relaxed_accuracy ----------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, answers, expected", [
    ("10.4", ["10"], 1.0),
    ("11", ["10"], 0.0),
    ("10.5", ["10"], 1.0),                  # |p - t| / |t| = 0.05: inclusive
    ("Yes", ["yes"], 1.0),
    ("5%", ["0.05"], 1.0),
    ("0.0", ["0"], 0.0),                    # zero target: string match
    ("0", ["0"], 1.0),
    ("1,000", ["1000"], 0.0),
    ("  12 ", ["12"], 1.0),                 # prediction stripped
    ("-10.2", ["-10"], 1.0),
    ("7", ["3", "7.2"], 1.0),               # any ground truth
    ("", ["5"], 0.0),
])
def test_relaxed_accuracy(prediction, answers, expected):
    assert relaxed_accuracy(prediction, answers) == expected


# --- exact_match and multiple_choice ---------------------------------------------------------------

@pytest.mark.parametrize("prediction, answers, expected", [
    ("A dog.", ["dog"], 1.0),
    ("Two", ["2"], 1.0),
    ("cat", ["dog", "cat"], 1.0),
    ("cat", ["dog"], 0.0),
    ("", ["dog"], 0.0),
    ("", [""], 1.0),
])
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("B. cat", "B"), ("The answer is B", "B"), ("b", "B"),
    ("B)", "B"), ("[C]", "C"), ("Answer: (D).", "D"), ("The correct option is C.", "C"),
    ("I think B is right", "B"), ("A dog", None), ("", None), ("cat", None), ("B or C", None),
    ("Both A and B", None), ("A or B", None), ("Answer: I think it is B", "B"), ("The answer is A dog", None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


@pytest.mark.parametrize("prediction, answers, expected", [
    ("B", "B", 1.0), ("(B)", ["B"], 1.0), ("B. cat", "(B)", 1.0), ("The answer is B", "B", 1.0),
    ("C", "B", 0.0), ("cat", "B", 0.0), ("", "B", 0.0),
])
def test_multiple_choice(prediction, answers, expected):
    assert multiple_choice(prediction, answers) == expected


def test_multiple_choice_ground_truth_must_be_a_letter():
    with pytest.raises(ValueError, match="not an option letter"):
        multiple_choice("B", ["a cat"])


# --- edge cases shared by every metric ---------------------------------------------------------------

METRIC_NAMES = ["vqa_accuracy", "anls", "relaxed_accuracy", "exact_match", "multiple_choice"]


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_no_ground_truth_is_a_clear_error(name):
    for empty in ([], None):
        with pytest.raises(ValueError, match="no ground-truth"):
            get_metric(name)("B", empty)


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_answers_as_string_or_list_agree(name):
    metric = get_metric(name)
    for prediction, truth in [("B", "B"), ("C", "B"), ("", "B")]:
        assert metric(prediction, truth) == metric(prediction, [truth]) == metric(prediction, (truth,))


def test_numbers_as_ground_truth_are_their_text():
    """A benchmark whose answer column holds numbers (counts) scores as if it held their text."""
    for truth, text in [(3, "3"), (12.5, "12.5")]:
        assert vqa_accuracy(text, truth) == exact_match(text, truth) == relaxed_accuracy(text, truth) == 1.0
        assert anls(text, truth) == 1.0 and anls(text, [truth]) == 1.0
    assert exact_match("4", 3) == 0.0
    with pytest.raises(ValueError, match="got bool"):
        exact_match("True", True)


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_none_prediction_scores_as_empty(name):
    assert get_metric(name)(None, ["B"]) == get_metric(name)("", ["B"]) == 0.0


def test_unicode_answers():
    assert vqa_accuracy("Café", ["café"]) == 1.0
    assert exact_match("Ünïcødé", ["ünïcødé"]) == 1.0
    assert exact_match("猫", ["猫"]) == 1.0 and exact_match("猫", ["犬"]) == 0.0
    assert relaxed_accuracy("ÄBC", ["äbc"]) == 1.0


def test_unknown_metric_names_the_choices():
    with pytest.raises(ValueError, match="vqa_accuracy"):
        get_metric("bleu")


def test_whole_numbers_stored_as_floats_are_the_integers_they_are():
    """A count column with nulls, written by pandas, holds 3.0: the prediction "3" is right."""
    from evaluation.metrics import as_answer_list

    assert as_answer_list(3.0) == ["3"] and as_answer_list([2.0, 2.5, None]) == ["2", "2.5"]
    for metric in ("vqa_accuracy", "exact_match", "anls", "relaxed_accuracy"):
        assert get_metric(metric)("3", 3.0) == 1.0, metric


def test_answers_as_records_score_their_answer_field():
    """VQAv2 ships answers as records {answer, answer_confidence, answer_id}: each stands for its answer."""
    from evaluation.metrics import as_answer_list

    records = [{"answer": "yes", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]
    assert as_answer_list(records) == ["yes"] * 10 and as_answer_list(records[0]) == ["yes"]
    assert vqa_accuracy("Yes", records) == 1.0 and vqa_accuracy("no", records) == 0.0
    with pytest.raises(ValueError, match="without an 'answer' field: \\['text'\\]"):
        as_answer_list([{"text": "yes"}])
    with pytest.raises(ValueError, match="itself a list"):
        as_answer_list([["yes"]])


def test_number_columns_score_as_their_shortest_text():
    """A float32 ground truth 0.1 is "0.1" (not 0.10000000149011612); a float prediction 3.0 is "3"."""
    import pyarrow as pa

    from evaluation.scoring import score_rows

    table = pa.table({"id": ["a", "b", "c"], "answer": pa.array([3.0, 0.1, None]),
                      "answers": pa.array([[3.0], [0.1], [2.5]], pa.large_list(pa.float32()))})
    assert score_rows(table, "exact_match").column("score").to_pylist() == [1.0, 1.0, 0.0]
    table = table.set_column(2, "answers", pa.array([3, 0.1, 2.5], pa.float32()))
    assert score_rows(table, "anls").column("score").to_pylist() == [1.0, 1.0, 0.0]
    assert score_rows(table, "anls").schema.field("answers").type == pa.float32()    # kept as it was


def test_numbers_from_1e10_up_score_as_written_out():
    """Arrow writes a float from 1e10 up as "1e+10": the ground truth is the number a prediction spells."""
    import pyarrow as pa

    from evaluation.scoring import score_rows

    big = [10_000_000_000.0, 123_456_789_012.0, -2e15]
    table = pa.table({"id": ["a", "b", "c"], "answer": ["10000000000", "123456789012", "-2000000000000000"],
                      "answers": pa.array([[v] for v in big], pa.list_(pa.float64()))})
    assert score_rows(table, "exact_match").column("score").to_pylist() == [1.0, 1.0, 1.0]
    table = table.set_column(2, "answers", pa.chunked_array([pa.array(big[:1]), pa.array(big[1:])]))
    assert score_rows(table, "vqa_accuracy").column("score").to_pylist() == [1.0, 1.0, 1.0]


def test_answers_stored_as_bytes_are_their_text():
    """A string list column written without its UTF-8 annotation (list<binary>) reads as bytes."""
    from evaluation.metrics import as_answer_list

    assert as_answer_list([b"yes", b"caf\xc3\xa9"]) == ["yes", "café"] and as_answer_list(b"no") == ["no"]
    assert vqa_accuracy("yes", [b"yes"] * 10) == anls("total", [b"total"]) == relaxed_accuracy("12", [b"12"]) == 1.0


def test_a_row_without_an_answer_scores_0_and_counts_as_an_error():
    """A predictions file's null answer is no answer, whatever its ground truth normalises to ("the": "")."""
    import pyarrow as pa

    from evaluation.scoring import score_rows, summarize

    table = pa.table({"id": [1, 2], "answer": pa.array([None, "dog"], pa.string()), "finish_reason": ["stop"] * 2,
                      "error": pa.array([None, None], pa.string()), "answers": [["the"] * 10, ["dog"] * 10]})
    summary = summarize(score_rows(table, "vqa_accuracy"), "vqa_accuracy")
    assert (summary["score"], summary["errors"], summary["rows"]) == (0.5, 1, 2)


def test_a_benchmark_without_rows_is_refused():
    import pyarrow as pa

    from evaluation.scoring import score_rows

    table = pa.table({"id": pa.array([], pa.int64()), "answer": pa.array([], pa.string()),
                      "answers": pa.array([], pa.list_(pa.string()))})
    with pytest.raises(ValueError, match="no rows"):
        score_rows(table, "anls")


def test_answers_kept_as_a_lists_json_text_are_that_list():
    """Benchmarks exported to CSV keep '["cat", "kitten"]': scored as one answer, "cat" matched nothing."""
    from evaluation.metrics import as_answer_list

    assert as_answer_list(' ["cat", "kitten"] ') == ["cat", "kitten"]
    assert exact_match("cat", '["cat", "kitten"]') == 1.0 and anls("kitten", '["cat", "kitten"]') == 1.0
    for text in ("[citation needed]", "[]", "[12, 15]", '["a", 1]', '["a", "b"', "['cat', 'kitten']"):   # as written
        assert as_answer_list(text) == [text]
    assert exact_match("[12, 15]", "[12, 15]") == 1.0       # a chart's answer as written, not two answers
