"""evaluation.baseline: the paired comparison of a run with a baseline's predictions."""
import math

import pyarrow as pa
import pytest

from evaluation.baseline import baseline_scores, compare, paired_difference, report_lines
from evaluation.scoring import score_rows


def test_paired_difference_counts_and_interval():
    now, then = [1, 1, 0, 1, 0.5], [0, 1, 1, 0, 0.5]
    got = paired_difference(now, then)
    diffs = [1, 0, -1, 1, 0]
    sd = math.sqrt(sum((d - 0.2) ** 2 for d in diffs) / 4)
    assert (got["rows"], got["score"], got["baseline_score"], got["delta"]) == (5, 0.7, 0.5, 0.2)
    assert got["ci95"] == pytest.approx([0.2 - 1.959964 * sd / math.sqrt(5), 0.2 + 1.959964 * sd / math.sqrt(5)],
                                        abs=1e-6)
    assert (got["better"], got["worse"], got["same"]) == (2, 1, 2)
    assert paired_difference([1.0], [0.0])["ci95"] is None          # one row: no interval
    assert paired_difference([], [])["rows"] == 0


def test_baseline_rows_are_scored_with_this_runs_ground_truth():
    """By id, whatever the baseline's order; its error rows score 0; ids it lacks stay null; its
    own `score` column (another metric, other ground truth) is not trusted."""
    scored = score_rows(pa.table({"id": ["a", "b", "c", "d"], "answer": ["cat", "dog", "two", "x"],
                                  "answers": [["cat"], ["cow"], ["2"], ["y"]], "category": ["p", "p", "q", "q"]}),
                        "exact_match")
    baseline = pa.table({"id": ["c", "a", "b", "z"], "answer": ["3", "cat", "cow", "w"], "score": [1.0, 0.0, 0.0, 1.0],
                         "error": [None, "ImageDecodeError: bad", None, None]})
    both = baseline_scores(scored, baseline, "exact_match")
    assert both.column("baseline_answer").to_pylist() == ["cat", "cow", "3", None]
    assert both.column("baseline_score").to_pylist() == [0.0, 1.0, 0.0, None]
    c = compare(both, "base.parquet", baseline.num_rows)
    assert (c["rows"], c["score"], c["baseline_score"], c["delta"]) == (3, 0.666667, 0.333333, 0.333333)
    assert (c["better"], c["worse"], c["same"]) == (2, 1, 0)
    assert (c["rows_without_baseline"], c["baseline_rows_unused"]) == (1, 1)
    # an unused baseline answer may be of an id past this run's --limit, not another benchmark's
    assert "1 baseline answers to ids this run did not answer" in "\n".join(report_lines(c))
    assert c["per_category"]["q"] == {"rows": 1, "score": 1.0, "baseline_score": 0.0, "delta": 1.0, "ci95": None,
                                      "better": 1, "worse": 0, "same": 0}
    with pytest.raises(ValueError, match="the baseline's predictions has duplicate ids"):
        baseline_scores(scored, pa.table({"id": ["a", "a"], "answer": ["x", "y"]}), "exact_match")


def test_a_baseline_sharing_no_id_with_the_run_is_refused():
    """It reported a delta of 0.0 between two scores of 0.0 over no rows (another benchmark's
    predictions, or ids written as other values)."""
    scored = score_rows(pa.table({"id": ["b0", "b1"], "answer": ["a", "b"], "answers": [["a"], ["b"]]}), "exact_match")
    with pytest.raises(ValueError, match=r"share no id with this run's 2 rows \(theirs like '0', ours like 'b0'\)"):
        baseline_scores(scored, pa.table({"id": [0, 1], "answer": ["a", "b"]}), "exact_match")


def test_baseline_categories_come_in_the_order_of_their_numbers():
    rows = [{"id": str(i), "score": 1.0, "baseline_score": 0.0, "category": c}
            for i, c in enumerate(["v10", "v2", None])]
    assert list(compare(pa.Table.from_pylist(rows), "base", 3)["per_category"]) == ["(none)", "v2", "v10"]


def test_a_mean_of_group_means_and_its_interval():
    from evaluation.scoring import average

    values, groups = [1.0, 0.0, 0.0, 1.0, 1.0], ["a", "a", "a", "b", "b"]
    mean, interval = average(values, groups)
    assert mean == round((1 / 3 + 1) / 2, 6)
    half = 1.959964 * ((1 / 3) / 3) ** 0.5 / 2         # group a's variance 1/3 over its 3 rows; b's none
    assert interval == pytest.approx([mean - half, min(mean + half, 1.0)], abs=2e-6)
    assert average(values) == (0.6, average(values, ["x"] * 5)[1])         # one group: the rows' mean
    assert paired_difference([1.0, 0.0, 1.0], [0.0, 0.0, 1.0], ["a", "a", "b"])["delta"] == 0.25
    assert average([1.0, 0.0], ["g", "h"]) == (0.5, None)    # groups of one row: their variance unknown
