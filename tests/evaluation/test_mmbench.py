"""MMBench's own scoring (evaluation.mmbench): the letter an answer chose, as lmms-eval's evaluator
reads it without a GPT judge, and a question right only when every circular copy of it is."""
import pyarrow as pa
import pytest

from evaluation.baseline import baseline_scores, compare, report_lines
from evaluation.mmbench import chosen_letter, extracted_letter, marked_letter, named_option, question_of
from evaluation.report import report_markdown
from evaluation.scoring import score_rows, summarize

OPTIONS = {"A": "cat", "B": "dog", "C": "red bird"}


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("I pick B", "B"), ("(C).", "C"), ("The answer is (C).", "C"), ("B. because C) is wrong", "B"),
    (":D,", "D"), ("E", "E"),                           # E: none of the options (a wrong letter)
    ("A and B", None), ("B or C.", "B"),                # two letters alone: none; one alone beside a marked one
    ("A dog sits on the mat", None),                    # "A" among more than three words: an article
    ("A dog", "A"),                                     # not among more than three
])
def test_a_letter_written_alone_or_marked(answer, letter):
    assert marked_letter(answer) == letter


def test_an_option_named_by_its_text_counts_only_alone():
    assert named_option("It is a Dog.", OPTIONS) == "B"
    assert named_option("a cat and a dog", OPTIONS) is None         # two options named
    assert named_option("a red bird", OPTIONS) == "C"
    assert named_option("a bird", OPTIONS) is None


@pytest.mark.parametrize("answer, letter", [
    ("Answer:B", "B"),                  # ends on a letter after a non-letter
    ("答案是C", "C"),                    # a phrase in another language
    ("(C) is wrong, my answer is D really", "D"),       # after "answer is": outranks "(C)"
    ("my answer is B, not A", "A"),     # every letter after the phrase counts: the last (lmms-eval's reading)
    ("Option (A) looks right, not (B)", "B"),   # of one way of writing, the last
    ("JOB DONE", "B"),                  # "B " inside a word: lmms-eval's reading, not a choice we would make
    ("nothing here", None), ("", None), ("  ", None),
])
def test_the_last_resort_reads_the_likeliest_letter(answer, letter):
    assert extracted_letter(answer, "ABCD") == letter


def test_the_steps_are_taken_in_order():
    assert chosen_letter("The dog, B", OPTIONS) == "B"                  # marked first
    assert chosen_letter("It looks like a dog to me", OPTIONS) == "B"  # then an option's text
    assert chosen_letter("cat or dog? Maybe C", OPTIONS) == "C"         # two texts: the last resort
    assert chosen_letter("A dog sits on the mat", OPTIONS) == "B"       # the article is no letter, "dog" names B


def test_question_of_reads_circular_copies_ids():
    assert [question_of(i) for i in (241, 1000241, "3000241", "q1", 0)] == ["241", "241", "241", "q1", "0"]


def circular_table(answers: list[str]) -> pa.Table:
    """Question 1 in three rotations, question 2 in two, question 3 alone (ids as MMBench's index)."""
    ids = [1, 1000001, 2000001, 2, 1000002, 3]
    truth = ["A", "C", "B", "B", "A", "A"]
    return pa.table({"id": ids, "answer": answers, "answers": truth, "A": ["cat", "dog", "red bird", "x", "y", "up"],
                     "B": ["red bird", "cat", "dog", "y", "x", "down"],
                     "C": ["dog", "red bird", "cat", None, None, None],
                     "D": [None] * 6, "category": ["animals"] * 3 + ["shapes"] * 3})


def test_a_question_counts_right_only_when_every_rotation_is():
    right = ["A", "The red bird", "dog", "B", "A", "A"]
    summary = summarize(score_rows(circular_table(right), "mmbench"), "mmbench")
    assert (summary["score"], summary["rows"], summary["questions"]) == (1.0, 6, 3)
    one_wrong = ["A", "The red bird", "cat", "B", "A", "A"]      # question 1's third rotation names A
    scored = score_rows(circular_table(one_wrong), "mmbench")
    assert scored.column("score").to_pylist() == [1, 1, 0, 1, 1, 1]
    summary = summarize(scored, "mmbench")
    assert (summary["score"], summary["questions"], summary["ci95"][1]) == (0.666667, 3, 1.0)   # 2 of 3, not 5 of 6
    assert summary["per_category"] == {"animals": {"score": 0.0, "rows": 3, "questions": 1, "ci95": None},
                                       "shapes": {"score": 1.0, "rows": 3, "questions": 2, "ci95": [1.0, 1.0]}}
    assert "- questions: 3 (scores are means over questions" in report_markdown(summary, {})
    assert "questions" not in summarize(scored, "multiple_choice")       # other metrics: rows
    assert summarize(scored, "multiple_choice")["score"] == 0.833333     # 5 of 6 rows


def test_a_baseline_is_compared_question_by_question():
    ours = score_rows(circular_table(["A", "The red bird", "cat", "B", "A", "A"]), "mmbench")
    theirs = pa.table({"id": [1, 1000001, 2000001, 2, 1000002], "answer": ["A", "C", "B", "A", "A"]})
    c = compare(baseline_scores(ours, theirs, "mmbench"), "base", 5, metric="mmbench")
    # question 1: ours wrong, theirs right; question 2: ours right, theirs wrong; question 3: no baseline
    assert (c["questions"], c["rows"], c["better"], c["worse"], c["delta"]) == (2, 5, 1, 1, 0.0)
    assert (c["rows_without_baseline"], c["baseline_rows_unused"]) == (1, 0)
    assert "- questions (2, of 5 rows) better / worse / same: 1 / 1 / 0" in report_lines(c)


def test_ground_truth_must_be_one_letter():
    with pytest.raises(ValueError, match="not one option letter"):
        score_rows(circular_table(["A"] * 6).set_column(2, "answers", pa.array(["cat"] * 6)), "mmbench")


def test_options_past_b_may_be_missing_but_not_a_and_b():
    two = circular_table(["A", "A", "A", "B", "A", "A"]).drop_columns(["C", "D"])
    assert score_rows(two, "mmbench").column("score").to_pylist() == [1, 0, 0, 1, 1, 1]
    ours = score_rows(two, "mmbench")
    theirs = pa.table({"id": [3], "answer": ["up"]})
    assert baseline_scores(ours, theirs, "mmbench").column("baseline_score")[5].as_py() == 1
    with pytest.raises(ValueError, match=r"mmbench scores with each row's B too: .* \(--input names the benchmark"):
        score_rows(two.drop_columns(["B"]), "mmbench")


def test_mmstar_reads_letters_as_lmms_evals_extraction_does():
    from evaluation.metrics import mmstar, multiple_choice

    assert (mmstar("A cat", "A"), multiple_choice("A cat", "A")) == (1.0, 0.0)     # ours reads an article there
    assert mmstar("The answer is (B).", " b ") == 1.0                               # the truth's case and spaces
    assert mmstar("E", "A") == 0.0 and mmstar("the answer is c", "C") == 0.0       # only A-D, capitals
    with pytest.raises(ValueError, match="not one option letter"):
        mmstar("A", "E")
