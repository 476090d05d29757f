"""Scoring summaries and report artefacts on small real tables."""
import io
import json
import math

import pyarrow as pa
import pytest
from PIL import Image

from evaluation.report import (report_markdown, sample_rows, thumbnail_data_uri, write_chart,
                               write_gallery, write_metrics_json)
from evaluation.scoring import join_ground_truth, score_rows, summarize


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), "green").save(buf, format="PNG")
    return buf.getvalue()


def test_score_rows_counts_errors_as_zero_and_keeps_columns():
    table = pa.table({"id": ["a", "b", "c"], "answer": ["5%", "4", "0.05"], "answers": [["0.05"], ["4"], ["0.05"]],
                      "finish_reason": ["stop", "error", "stop"], "error": [None, None, None]})
    scored = score_rows(table, "relaxed_accuracy")
    assert scored.column("score").to_pylist() == [1.0, 0.0, 1.0]   # b: finish_reason error
    assert scored.column("exact_match").to_pylist() == [0.0, 0.0, 1.0]
    summary = summarize(scored, "relaxed_accuracy")
    half = 1.959964 * math.sqrt(1 / 3) / math.sqrt(3)           # 1.96 standard errors of [1, 0, 1]'s mean
    assert summary == {"metric": "relaxed_accuracy", "score": 0.666667, "ci95": [round(2 / 3 - half, 6), 1.0],
                       "metrics": {"relaxed_accuracy": 0.666667, "exact_match": 0.333333},
                       "per_category": {}, "rows": 3, "errors": 1}


def test_answers_may_be_plain_strings():
    table = pa.table({"id": [1, 2], "answer": ["B", "(C)"], "answers": ["B", "B"]})
    assert score_rows(table, "multiple_choice").column("score").to_pylist() == [1.0, 0.0]


def test_join_keeps_ground_truth_order_and_matches_int_and_string_ids():
    """Ids match by their text (a predictions file may write them as strings); the joined rows
    keep the benchmark's own ids and their type."""
    truth = pa.table({"id": [3, 1, 2], "answers": [["c"], ["a"], ["b"]]})
    preds = pa.table({"id": ["1", "2", "3"], "answer": ["a", "x", "c"], "finish_reason": ["stop"] * 3})
    joined = join_ground_truth(preds, truth)
    assert joined.column("id").to_pylist() == [3, 1, 2]
    assert joined.column("answer").to_pylist() == ["c", "a", "x"]
    scored = score_rows(joined, "exact_match")
    assert scored.column("score").to_pylist() == [1.0, 1.0, 0.0]
    assert joined.schema.field("error").type == scored.schema.field("error").type == pa.string()


def test_report_markdown_prints_metrics_json_numbers_and_escapes_cells(tmp_path):
    summary = {"metric": "anls", "score": 0.123457, "metrics": {"anls": 0.123457, "exact_match": 0.1},
               "per_category": {"a|b": {"score": 0.5, "rows": 2, "ci95": [0.1, 0.9]}}, "rows": 4, "errors": 1}
    text = report_markdown(summary, {"model": "m", "input": "in.parquet"})
    assert "- score: 0.123457" in text and "| anls | 0.123457 |" in text
    assert "| a\\|b | 2 | 0.5 | [0.1, 0.9] |" in text
    assert json.loads(write_metrics_json(summary, tmp_path).read_text()) == summary


@pytest.mark.parametrize("per_category", [{}, {f"category {i}": {"score": i / 10, "rows": 1} for i in range(11)}])
def test_chart_is_a_png(tmp_path, per_category):
    summary = {"metric": "vqa_accuracy", "score": 0.5, "per_category": per_category, "rows": 11}
    with Image.open(write_chart(summary, tmp_path)) as img:
        assert img.format == "PNG"


def test_thumbnails_from_bytes_struct_and_path(tmp_path):
    data = _png()
    (tmp_path / "x.png").write_bytes(data)
    for cell in (data, {"bytes": data, "path": None}, {"bytes": None, "path": str(tmp_path / "x.png")},
                 str(tmp_path / "x.png"), [{"bytes": data, "path": None}, b"garbage"]):
        uri = thumbnail_data_uri(cell, size=64)
        assert uri.startswith("data:image/jpeg;base64,")
    assert thumbnail_data_uri(b"garbage") is None and thumbnail_data_uri(str(tmp_path / "missing.png")) is None
    assert thumbnail_data_uri([]) is None


def test_gallery_escapes_text_and_samples_reproducibly(tmp_path):
    rows = [{"id": str(i), "question": "<b>q</b>", "answer": "ünï", "answers": ["a"], "score": 0.0} for i in range(20)]
    picked = sample_rows(rows, 5, seed=1)
    assert picked == sample_rows(rows, 5, seed=1) and len(picked) == 5
    assert [int(r["id"]) for r in picked] == sorted(int(r["id"]) for r in picked)
    page = write_gallery(picked, {picked[0]["id"]: _png()}, {"metric": "anls", "score": 0, "rows": 20}, tmp_path)
    text = page.read_text(encoding="utf-8")
    assert "&lt;b&gt;q&lt;/b&gt;" in text and "<b>q</b>" not in text and "ünï" in text
    assert text.count("data:image/jpeg") == 1 and text.count('class="card') == 5


def test_join_when_the_first_row_has_no_prediction():
    truth = pa.table({"id": ["a", "b"], "answers": [["x"], ["y"]], "question": ["qa", "qb"]})
    preds = pa.table({"id": ["b"], "answer": ["y"], "question": ["qb, briefly"]})
    assert join_ground_truth(preds, truth).to_pylist() == [
        {"id": "a", "answers": ["x"], "question": "qa", "answer": None, "finish_reason": "error",
         "error": "no prediction for this id"},
        {"id": "b", "answers": ["y"], "question": "qb, briefly", "answer": "y", "finish_reason": None, "error": None}]


def test_the_predictions_category_is_kept_when_the_benchmark_has_none():
    truth = pa.table({"id": ["a", "b"], "answers": [["x"], ["y"]]})
    predictions = pa.table({"id": ["a", "b"], "answer": ["x", "z"], "category": ["c1", "c2"]})
    per_category = summarize(score_rows(join_ground_truth(predictions, truth), "exact_match"), "exact_match")
    assert {name: c["score"] for name, c in per_category["per_category"].items()} == {"c1": 1.0, "c2": 0.0}
    with_category = truth.append_column("category", pa.array(["t1", "t1"]))
    joined = join_ground_truth(predictions, with_category)
    assert joined.column("category").to_pylist() == ["t1", "t1"]        # the benchmark's wins


def test_categories_come_in_the_order_of_their_numbers():
    names = ["level 10", "level 2", "(none)", "level 1b", "level 1a", "b", "a10", "a9"]
    table = pa.table({"id": [str(i) for i in range(len(names))], "answer": ["x"] * len(names),
                      "answers": [["x"]] * len(names), "category": names})
    summary = summarize(score_rows(table, "exact_match"), "exact_match")
    assert list(summary["per_category"]) == ["(none)", "a9", "a10", "b", "level 1a", "level 1b", "level 2", "level 10"]
