"""MMMU's own scoring (evaluation.mmmu), by the rules of MMMU's evaluation as lmms-eval runs it."""
import pyarrow as pa
import pytest

from evaluation.metrics import get_metric, score_row
from evaluation.mmmu import chosen_option, mmmu_score, open_answer_matches, subject, with_subjects
from evaluation.scoring import check_ground_truth, score_rows
from processing.errors import PromptError
from processing.options import option_list, with_option_list

FOUR = ["cat", "blue whale", "3 cm", "none of these"]


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("(c)", None), ("The answer is D", "D"), ("Answer: A.", "A"),
    ("A, B", "B"),                          # several: the one written last
    ("(A) not (B)", "B"),                   # bracketed letters win over bare ones
    ("C. blue whale", "C"),                 # "C." beside no bare letter: C
    ("I am sure that it is the blue whale", "B"),     # more than five words: an option's text
    ("Surely a cat and then maybe a blue whale", "B"),   # of two texts, the one written last
])
def test_the_letter_an_answer_chose(answer, letter):
    chosen = chosen_option(answer, FOUR)
    if letter is None:          # "(c)" names no letter as written: a drawn one, the same every time
        assert chosen in "ABCD" and chosen == chosen_option(answer, FOUR)
    else:
        assert chosen == letter


def test_an_answer_naming_no_option_gets_one_drawn_the_same_each_time():
    drawn = {chosen_option(f"no idea {k}", FOUR) for k in range(40)}
    assert drawn == set("ABCD")             # drawn across the options, as MMMU's evaluation draws
    assert all(chosen_option(f"no idea {k}", FOUR) == chosen_option(f"no idea {k}", FOUR) for k in range(40))


@pytest.mark.parametrize("answer, truths, right", [
    ("3.14", ["3.14"], True), ("The answer is 3.14159", ["3.14"], True),     # numbers to two places
    ("It is 1,000 kg", ["1000"], True), ("5", ["6"], False),
    ("the capital is Paris.", ["Paris"], True),                # text: a true text held by the tail
    ("Paris is the capital", ["Paris"], False),                # "is " splits: the tail "the capital"
    ("x = 12\nso y = 4", ["4"], True), ("x = 12\nso y = 4", ["12"], False),
    ("a", ["A"], True), ("cat", ["a"], False),                 # one character: only as a word's edge
    ("1e3", ["1000"], True),
])
def test_an_open_answer_by_its_texts_and_numbers(answer, truths, right):
    assert open_answer_matches(answer, truths) is right


def test_the_metric_reads_each_rows_options_list_or_its_text():
    assert mmmu_score("B", ["B"], "['cat', 'dog']") == 1.0
    assert mmmu_score("(A)", ["B"], ["cat", "dog"]) == 0.0
    assert mmmu_score("It is 7", ["7"], "[]") == 1.0 == mmmu_score("It is 7", ["7"], None)   # open questions
    assert score_row("mmmu", "dog, I think, is in it", {"answers": "B", "options": '["cat", "dog"]'}) == 1.0
    with pytest.raises(ValueError, match="not a list"):
        get_metric("mmmu")("B", "B", "cat")


def test_scoring_needs_the_options_column_and_usable_options():
    rows = pa.table({"id": ["validation_Art_1"], "answers": ["B"], "answer": ["B"]})
    with pytest.raises(ValueError, match="mmmu scores with each row's options too"):
        check_ground_truth(rows, "mmmu")
    with pytest.raises(ValueError, match="ground truth mmmu cannot use"):
        check_ground_truth(rows.append_column("options", pa.array(["['cat'"])), "mmmu")
    scored = score_rows(with_subjects(rows.append_column("options", pa.array(["['cat', 'dog']"]))), "mmmu")
    assert scored.column("score").to_pylist() == [1.0] and scored.column("category").to_pylist() == ["Art"]


@pytest.mark.parametrize("row_id, found", [("validation_Art_Theory_12", "Art_Theory"), ("dev_Math_1", "Math"),
                                           ("test_Computer_Science_300", "Computer_Science"), ("q7", None)])
def test_the_subject_of_an_mmmu_id(row_id, found):
    assert subject(row_id) == found


@pytest.mark.parametrize("cell, options", [
    ("['5 cm', \"it's 6\"]", ["5 cm", "it's 6"]), ('["a", "b"]', ["a", "b"]), ("[]", []), (None, []),
    (["x", 2, 2.5], ["x", "2", "2.5"]), (("a",), ["a"]),
])
def test_option_lists_as_mmmu_ships_them(cell, options):
    assert option_list(cell) == options


@pytest.mark.parametrize("cell, why", [
    ("cat", "not a list"), ("[1, [2]]", "not all texts or numbers"), ("__import__('os')", "not a list"),
    ("[" * 200_000, "characters"), ("[" * 50_000, "not a list"), ("[True]", "not all texts"), (5, "not a list"),
])
def test_options_that_are_no_list_are_named(cell, why):
    with pytest.raises(PromptError, match=why):
        option_list(cell)


def test_options_are_listed_a_line_each_after_their_letter():
    assert with_option_list("Which? <image 1>", ["<image 2>", "9"]) == "Which? <image 1>\nA. <image 2>\nB. 9"


def test_an_options_text_is_read_as_a_python_literal_first_as_lmms_eval_reads_it():
    assert option_list('["a\\/b"]') == ["a\\/b"]          # JSON would read "a/b"
    assert option_list('["x", 1.5]') == ["x", "1.5"]


def test_a_baseline_scores_options_of_numbers_as_this_run_does():
    """Options [1.0, 2.0] are "1.0", "2.0" to the prompt and to this run's scoring: the baseline read them
    as "1", "2", so that the same answers compared with themselves differed (delta -0.125 over 40 rows)."""
    from evaluation.baseline import baseline_scores

    answers = [f"my guess would be {k} of these" for k in range(40)]     # "1" is in "12", "1.0" is not
    table = pa.table({"id": [str(k) for k in range(40)], "answer": answers, "answers": ["A"] * 40,
                      "options": pa.array([[1.0, 2.0, 3.0, 4.0]] * 40, pa.list_(pa.float64()))})
    scored = baseline_scores(score_rows(table, "mmmu"), table, "mmmu")
    assert scored.column("baseline_score").to_pylist() == scored.column("score").to_pylist()
