"""jobs.evaluate --predictions: score an existing predictions Parquet end to end through the CLI."""
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evaluation import benchmarks
from jobs import evaluate as job

REPO = Path(__file__).resolve().parents[2]

PREDICTIONS = [
    # id, answer, answers, category, finish_reason, error    -> exact_match
    ("q1", "Two", ["2"], "count", "stop", None),             # 1 (number word)
    ("q2", "red", ["blue"], "colour", "stop", None),         # 0
    ("q3", "A circle.", ["circle"], "shape", "stop", None),  # 1 (article, period)
    ("q4", None, ["square"], "shape", "error", "ImageDecodeError: not an image"),  # error -> 0
    ("q5", "blue", ["blue"], "colour", "length", None),      # 1
]


def write_predictions(path: Path, rows=PREDICTIONS) -> Path:
    cols = ["id", "answer", "answers", "category", "finish_reason", "error"]
    table = pa.Table.from_pylist([dict(zip(cols, r)) for r in rows])
    pq.write_table(table, path)
    return path


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


def parse_report(text: str) -> dict:
    """The numbers report.md shows, in metrics.json's shape."""
    head = dict(re.findall(r"^- (score|rows|errors|metric): `?([^`\s]+)", text, re.M))
    interval = re.search(r"^- score: \S+ \(95 % interval \[(\S+), (\S+)\]\)", text, re.M)
    tables = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|(?: ([^|]+?) \|)?$", text, re.M)
    metrics, per_category = {}, {}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:]
        m = re.match(r"^\| (.+?) \| (.+?) \|(?: (.+?) \|)?(?: (.+?) \|)?$", line)
        if not m or m.group(2) in ("score", "rows", "---") or m.group(1).startswith("---"):
            continue
        if section == "Metrics":
            metrics[m.group(1)] = float(m.group(2))
        elif section == "Per category":
            bounds = re.match(r"\[(\S+), (\S+)\]", m.group(4))
            per_category[m.group(1)] = {"score": float(m.group(3)), "rows": int(m.group(2)),
                                        "ci95": [float(b) for b in bounds.groups()] if bounds else None}
    assert tables, "report has no tables"
    sources = {}
    for line in text.split("\n- metric:")[0].splitlines():        # the lines above the score: what was read
        m = re.match(r"^- (.+?): (`+) ?(.*?) ?\2$", line)
        if m:
            sources[m.group(1)] = m.group(3)
    return {"metric": head["metric"], "score": float(head["score"]),
            "ci95": [float(interval.group(1)), float(interval.group(2))] if interval else None,
            "rows": int(head["rows"]),
            "errors": int(head["errors"]), "metrics": metrics, "per_category": per_category, "sources": sources}


def test_predictions_mode_writes_every_artefact(tmp_path):
    preds = write_predictions(tmp_path / "preds.parquet")
    out = tmp_path / "out"
    assert job.main(["--predictions", str(preds), "--output", str(out), "--metric", "exact_match"]) == 0

    summary = json.loads((out / "metrics.json").read_text())
    assert summary == {
        "metric": "exact_match", "score": 0.6, "ci95": [0.119909, 1.0], "metrics": {"exact_match": 0.6},
        "per_category": {"colour": {"score": 0.5, "rows": 2, "ci95": [0.0, 1.0]},
                         "count": {"score": 1.0, "rows": 1, "ci95": None},       # one row: no interval
                         "shape": {"score": 0.5, "rows": 2, "ci95": [0.0, 1.0]}},
        "rows": 5, "errors": 1, "sources": {"predictions": str(preds)},      # what report.md lists
    }
    report = (out / "report.md").read_text()
    assert parse_report(report) == summary
    assert "(scores.png)" in report

    with Image.open(out / "scores.png") as chart:
        assert chart.format == "PNG" and chart.width > 100 and chart.height > 50

    scored = pq.read_table(out / "predictions.parquet").to_pylist()
    assert [r["id"] for r in scored] == ["q1", "q2", "q3", "q4", "q5"]
    assert [r["score"] for r in scored] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert scored[3]["error"].startswith("ImageDecodeError")
    assert not (out / "gallery.html").exists()


def test_cli_subprocess_vqa_accuracy_with_secondary_metric(tmp_path):
    rows = [("a", "dog", ["a dog"] * 2 + ["cat"] * 8, None, "stop", None),
            ("b", "Yes.", ["yes"] * 10, None, "stop", None),
            ("c", "cat", ["dog"] * 10, None, "stop", None)]
    preds = write_predictions(tmp_path / "vqav2_preds.parquet", rows)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--predictions", str(preds),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "metrics.json").read_text())
    # The metric comes from the dataset name (vqav2); exact_match rides along as a secondary metric.
    assert summary["metric"] == "vqa_accuracy"
    assert summary["score"] == round((0.6 + 1.0 + 0.0) / 3, 6)
    assert summary["metrics"] == {"vqa_accuracy": summary["score"], "exact_match": round(2 / 3, 6)}
    assert summary["per_category"] == {"(none)": {"score": summary["score"], "rows": 3, "ci95": summary["ci95"]}}
    assert parse_report((out / "report.md").read_text()) == summary
    assert json.loads(proc.stdout.strip().splitlines()[-1])["score"] == summary["score"]


def test_ground_truth_joined_from_input_by_id_with_gallery(tmp_path):
    truth = pa.table({"qid": ["x1", "x2", "x3"], "img": [png("red"), png("blue"), b"not an image"],
                      "prompt": ["Colour?", "Colour?", "Shape?"], "gt": [["red"], ["blue"], ["star"]],
                      "kind": ["colour", "colour", "shape"]})
    truth = truth.rename_columns(["id", "img", "prompt", "gt", "kind"])
    pq.write_table(truth, tmp_path / "bench.parquet")
    # x3 was lost by the run: it must count as an error row, not vanish. No `answers` in the predictions.
    pq.write_table(pa.table({"id": ["x2", "x1"], "answer": ["Blue", "green"]}), tmp_path / "p.parquet")
    out = tmp_path / "out"
    argv = ["--predictions", str(tmp_path / "p.parquet"), "--input", str(tmp_path / "bench.parquet"),
            "--output", str(out), "--metric", "exact_match", "--image-column", "img",
            "--question-column", "prompt", "--answers-column", "gt", "--category-column", "kind",
            "--gallery", "10"]
    assert job.main(argv) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert (summary["score"], summary["rows"], summary["errors"]) == (pytest.approx(1 / 3, abs=1e-6), 3, 1)
    assert summary["per_category"] == {"colour": {"score": 0.5, "rows": 2, "ci95": [0.0, 1.0]},
                                       "shape": {"score": 0.0, "rows": 1, "ci95": None}}
    scored = pq.read_table(out / "predictions.parquet").to_pylist()
    assert [(r["id"], r["answer"], r["question"], r["score"]) for r in scored] == [
        ("x1", "green", "Colour?", 0.0), ("x2", "Blue", "Colour?", 1.0), ("x3", None, "Shape?", 0.0)]
    assert scored[2]["error"] == "no prediction for this id"
    gallery = (out / "gallery.html").read_text()
    assert gallery.count('class="card') == 3
    assert gallery.count("data:image/jpeg;base64,") == 2    # the undecodable image shows as missing
    assert "no image" in gallery and "Colour?" in gallery
    # rescored in place without a gallery: the earlier one, showing the earlier scores, is gone
    assert job.main(["--predictions", str(out), "--output", str(out)]) == 0
    assert not (out / "gallery.html").exists() and (out / "report.md").exists()


@pytest.mark.parametrize("rows, message, joined", [
    ([("q1", "a", [], None, "stop", None)], "no ground-truth answers", False),
    ([("q1", "a", ["a"], None, "stop", None), ("q1", "b", ["b"], None, "stop", None)], "duplicate ids", True),
    # the ground truth in the predictions: a row counted twice would weigh twice
    ([("q1", "a", ["a"], None, "stop", None), ("q1", "a", ["a"], None, "stop", None),
      ("q2", "b", ["c"], None, "stop", None)], "duplicate ids: ['q1']", False),
])
def test_bad_predictions_are_clear_errors(tmp_path, capsys, rows, message, joined):
    preds = write_predictions(tmp_path / "p.parquet", rows)
    if joined:
        pq.write_table(pa.table({"id": ["q1"], "answers": [["a"]]}), tmp_path / "t.parquet")
        extra = ["--input", str(tmp_path / "t.parquet")]
    else:
        extra = []
    code = job.main(["--predictions", str(preds), "--output", str(tmp_path / "o"), "--metric", "anls", *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_prediction_ids_missing_from_ground_truth(tmp_path, capsys):
    pq.write_table(pa.table({"id": [1, 2]}).append_column("answers", pa.array([["a"], ["b"]])),
                   tmp_path / "t.parquet")
    pq.write_table(pa.table({"id": ["1", "9"], "answer": ["a", "b"]}), tmp_path / "p.parquet")
    code = job.main(["--predictions", str(tmp_path / "p.parquet"), "--input", str(tmp_path / "t.parquet"),
                     "--output", str(tmp_path / "o"), "--metric", "exact_match"])
    assert code == 2 and "ids not in the ground truth, e.g. ['9']" in capsys.readouterr().err


def test_metric_is_required_for_an_unknown_benchmark(tmp_path, capsys):
    preds = write_predictions(tmp_path / "mystery.parquet")
    assert job.main(["--predictions", str(preds), "--output", str(tmp_path / "o")]) == 2
    assert "pass --metric" in capsys.readouterr().err


@pytest.mark.parametrize("name, metric", [("DocVQA_val", "anls"), ("chart-qa", "relaxed_accuracy"),
                                          ("MMStar", "mmstar"), ("MMBench_en", "mmbench"),
                                          ("textvqa", "vqa_accuracy")])
def test_metric_from_dataset_name(name, metric):
    assert job.choose_metric(job.parse_args(["--input", f"/data/{name}/test.parquet"])) == metric


@pytest.mark.parametrize("path, metric", [("/data/docvqa_runs/textvqa_val.parquet", "vqa_accuracy"),
                                          ("/home/me/chartqa-work/vqav2_val.parquet", "vqa_accuracy"),
                                          ("/data/docvqa/part-*.parquet", "anls"),
                                          ("/data/textvqa/demo.parquet", "vqa_accuracy"),   # a benchmark first
                                          ("/data/ST-VQA/test.parquet", "anls"), ("demo/data/x.parquet", "exact_match"),
                                          ("/home/me/docvqa-work/repo/demo/data/heldout.parquet", "exact_match")])
def test_the_files_own_name_names_the_benchmark_before_its_folders(path, metric):
    assert job.choose_metric(job.parse_args(["--input", path])) == metric


@pytest.mark.parametrize("path", ["/data/mytestvqa/val.parquet", "/data/aokvqa/val.parquet",
                                  "/data/mychartqa/x.parquet"])
def test_a_benchmarks_name_inside_a_longer_word_names_none(path):
    """mytestvqa is not ST-VQA, A-OKVQA not OK-VQA: --metric is asked for rather than a wrong one taken."""
    with pytest.raises(ValueError, match="pass --metric"):
        job.choose_metric(job.parse_args(["--input", path]))


@pytest.mark.parametrize("argv, suffix", [
    (["--input", "/data/DocVQA_val/test.parquet"], benchmarks.SHORT_ANSWER),
    (["--input", "/data/vizwiz/val.parquet"], benchmarks.UNANSWERABLE),
    (["--input", "/data/MMBench_en/dev.parquet"], "\n" + benchmarks.OPTION_LETTER),
    (["--input", "/data/mystery.parquet"], ""),
    (["--input", "/data/DocVQA_val/test.parquet", "--prompt-suffix", ""], ""),
    (["--input", "/data/DocVQA_val/test.parquet", "--prompt-suffix", " Be brief."], " Be brief."),
])
def test_prompt_suffix_defaults_to_the_benchmarks_instruction(argv, suffix):
    assert job.choose_suffix(job.parse_args(argv)) == suffix


def test_missing_input_file_is_a_clear_error(tmp_path, capsys):
    assert job.main(["--predictions", str(tmp_path / "nope.parquet"), "--output", str(tmp_path / "o"),
                     "--metric", "anls"]) == 2
    assert "nope.parquet' does not exist" in capsys.readouterr().err


def test_demo_without_its_files_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(job, "DEMO_MODEL", tmp_path / "demo" / "model")
    assert job.main(["--output", str(tmp_path / "o")]) == 2
    assert "demo model is missing" in capsys.readouterr().err


def test_ground_truth_a_metric_cannot_use_fails_before_scoring(tmp_path, capsys):
    preds = write_predictions(tmp_path / "mmstar.parquet", [("q1", "B", ["B"], None, "stop", None),
                                                            ("q2", "B", ["a cat"], None, "stop", None)])
    assert job.main(["--predictions", str(preds), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "mmstar cannot use" in err and "q2: ground truth 'a cat' is not one option letter (A, B, C, D)" in err


def test_joining_needs_ids_in_the_input(tmp_path, capsys):
    pq.write_table(pa.table({"answers": [["a"]]}), tmp_path / "t.parquet")
    preds = write_predictions(tmp_path / "p.parquet")
    assert job.main(["--predictions", str(preds), "--input", str(tmp_path / "t.parquet"),
                     "--output", str(tmp_path / "o"), "--metric", "anls"]) == 2
    assert "has no 'id' column to join the predictions on" in capsys.readouterr().err


def test_running_a_model_needs_ground_truth_in_the_input(tmp_path, capsys):
    pq.write_table(pa.table({"image": [png("red")], "question": ["?"]}), tmp_path / "t.parquet")
    assert job.main(["--input", str(tmp_path / "t.parquet"), "--model", str(tmp_path / "m"),
                     "--output", str(tmp_path / "o"), "--metric", "anls"]) == 2
    assert "no ground-truth column 'answers'" in capsys.readouterr().err


def test_limit_scores_the_first_ground_truth_rows_only(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["x1", "x2", "x3"], "answers": [["red"], ["blue"], ["star"]]}),
                   tmp_path / "bench.parquet")
    pq.write_table(pa.table({"id": ["x3", "x2", "x1"], "answer": ["star", "Blue", "green"]}), tmp_path / "p.parquet")
    base = ["--predictions", str(tmp_path / "p.parquet"), "--input", str(tmp_path / "bench.parquet"),
            "--metric", "exact_match"]
    assert job.main(base + ["--output", str(tmp_path / "o"), "--limit", "2"]) == 0
    summary = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (summary["rows"], summary["score"]) == (2, 0.5)             # x1 wrong, x2 right; x3 not scored
    assert job.main(base + ["--output", str(tmp_path / "o2"), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_image_flags_reach_the_pipeline_config():
    args = job.parse_args(["--input", "x.parquet", "--model", "m", "--image-longest-edge", "1024", "--no-image-splitting",
                           "--system-prompt", "Be brief."])
    assert job.pipeline_config(args, []).image_settings() == {"size": {"longest_edge": 1024}, "do_image_splitting": False}
    assert job.pipeline_config(args, []).system_prompt == "Be brief."
    assert job.pipeline_config(job.parse_args(["--input", "x.parquet", "--model", "m"]), []).image_settings() == {}


def test_run_flags_reach_the_pipeline_config():
    """The caption job's flags of how a model runs (tensor parallelism, batching, image reads) serve
    evaluation too, e.g. Idefics3-8B over 2 GPUs; what is not given is PipelineConfig's default."""
    from pipeline import PipelineConfig

    args = job.parse_args(["--input", "x.parquet", "--model", "m", "--tensor-parallel-size", "2", "--replicas", "3",
                           "--max-batch-size", "8", "--batches-in-flight", "2", "--step-timeout", "0",
                           "--image-backend", "torch", "--fetch-threads", "4", "--fetch-attempts", "5",
                           "--fetch-timeout", "9", "--max-image-pixels", "1000000", "--max-image-bytes", "7", "--dtype", "float32",
                           "--storage-options", '{"anon": true}', "--compile"])
    config = job.pipeline_config(args, ["answers"])
    assert config.compile_decode is True
    assert (config.tensor_parallel_size, config.replicas, config.max_batch_size, config.batches_in_flight,
            config.step_timeout_s, config.image_backend, config.fetch_threads, config.fetch_attempts,
            config.fetch_timeout_s, config.max_image_pixels, config.max_image_bytes, config.dtype) == (
        2, 3, 8, 2, 0, "torch", 4, 5, 9, 10**6, 7, "float32")
    assert config.storage_options == {"anon": True} and config.keep_columns == ["answers"]
    plain = job.pipeline_config(job.parse_args(["--input", "x.parquet", "--model", "m"]), [])
    # greedy, the library's defaults, whatever the checkpoint's generation_config.json says
    assert plain.to_dict() == PipelineConfig(model="m", generation_config="none").to_dict()
    tuned = job.pipeline_config(job.parse_args(["--input", "x.parquet", "--model", "m", "--generation-config", "auto"]),
                                [])
    assert tuned.generation_config == "auto"


def test_flags_may_come_from_a_config_file(tmp_path):
    """--config eval.yaml, as jobs.caption's: the command line wins over the file, the file over the
    defaults; a key that is no flag is named."""
    (tmp_path / "eval.yaml").write_text("input: s3://b/docvqa/\nmodel: m\ntensor-parallel-size: 2\n"
                                        "answers_column: gt\nmax-new-tokens: 16\ngallery: 5\n")
    args = job.parse_args(["--config", str(tmp_path / "eval.yaml"), "--max-new-tokens", "8"])
    assert (args.input, args.model, args.answers_column, args.gallery) == ("s3://b/docvqa/", "m", "gt", 5)
    config = job.pipeline_config(args, [])
    assert (config.tensor_parallel_size, config.max_new_tokens, config.prompt_suffix) == (2, 8, benchmarks.SHORT_ANSWER)
    assert (args.question_column, args.resume, args.limit) == ("question", False, None)
    (tmp_path / "bad.yaml").write_text("metrik: anls\n")
    with pytest.raises(ValueError, match=r"unknown keys in .*bad.yaml.*: metrik \(did you mean metric\?\)"):
        job.parse_args(["--config", str(tmp_path / "bad.yaml")])


def test_a_model_run_that_left_rows_unanswered_is_said():
    assert job.unanswered(None) is None                                  # --predictions: no model run
    assert job.unanswered({"missing_rows": 0, "duplicate_rows": 0}) is None
    said = job.unanswered({"missing_rows": 3, "duplicate_rows": 1})
    assert said.startswith("3 benchmark rows have no output row (run again with --resume to answer them); "
                           "1 output rows repeat an id")
    said = job.unanswered({"missing_rows": 0, "duplicate_rows": 2})       # no advice to resume: it would not help
    assert said.startswith("2 output rows repeat an id") and "--resume does not remove them" in said


def test_a_baseline_run_is_compared_row_by_row(tmp_path, capsys):
    """--baseline names an earlier evaluation's output folder: metrics.json, report.md and the
    predictions carry the paired comparison; the gallery shows the rows whose score changed."""
    first = tmp_path / "base"
    base_rows = [("q1", "3", ["2"], "count", "stop", None), ("q2", "blue", ["blue"], "colour", "stop", None),
                 ("q3", "circle", ["circle"], "shape", "stop", None), ("q4", "square", ["square"], "shape", "stop", None),
                 ("q5", "blue", ["blue"], "colour", "stop", None)]
    assert job.main(["--predictions", str(write_predictions(tmp_path / "base.parquet", base_rows)),
                     "--output", str(first), "--metric", "exact_match"]) == 0
    out = tmp_path / "out"
    argv = ["--predictions", str(write_predictions(tmp_path / "preds.parquet")), "--output", str(out),
            "--metric", "exact_match", "--baseline", str(first), "--gallery", "5"]
    assert job.main(argv) == 0
    summary = json.loads((out / "metrics.json").read_text())
    base = summary["baseline"]
    # now: 1 0 1 0(error) 1; then: 0 1 1 1 1
    assert (base["rows"], base["score"], base["baseline_score"], base["delta"]) == (5, 0.6, 0.8, -0.2)
    assert (base["better"], base["worse"], base["same"]) == (1, 2, 2)
    assert base["ci95"][0] < -0.2 < base["ci95"][1] and base["source"] == str(first)
    assert base["per_category"]["count"]["delta"] == 1.0 and base["per_category"]["shape"]["delta"] == -0.5
    report = (out / "report.md").read_text()
    assert "## Against the baseline" in report and "- delta: -0.2 (this run 0.6, the baseline 0.8)" in report
    assert parse_report(report)["score"] == summary["score"] == 0.6
    scored = pq.read_table(out / "predictions.parquet").to_pylist()
    assert [(r["baseline_answer"], r["baseline_score"]) for r in scored] == [
        ("3", 0.0), ("blue", 1.0), ("circle", 1.0), ("square", 1.0), ("blue", 1.0)]
    gallery = (out / "gallery.html").read_text()
    assert gallery.count('class="card') == 3 and "baseline answer" in gallery     # q1, q2, q4 changed
    assert job.main(argv[:-4] + ["--baseline", str(tmp_path / "nowhere")]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_predictions_of_other_types_join_a_benchmark_of_several_files(tmp_path):
    """A caption run's output with --choice-logprobs (a map column) and int32 counts joins the
    ground truth with its types; a benchmark's shards need not agree on a column that is all null in
    one of them; a whole-number answer stored as a float (3.0) is the answer 3."""
    (tmp_path / "bench").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "answers": pa.array([3.0, 4.0]), "category": pa.nulls(2)}),
                   tmp_path / "bench" / "part-0.parquet")
    pq.write_table(pa.table({"id": ["c"], "answers": pa.array([5.5]), "category": ["count"]}),
                   tmp_path / "bench" / "part-1.parquet")
    logprobs = pa.array([[("3", -0.1)], [("5", -0.2)], None], pa.map_(pa.string(), pa.float64()))
    pq.write_table(pa.table({"id": ["a", "b", "c"], "answer": ["3", "5", "5.5"], "choice_logprobs": logprobs,
                             "num_generated_tokens": pa.array([1, 1, 2], pa.int32())}), tmp_path / "p.parquet")
    out = tmp_path / "o"
    assert job.main(["--predictions", str(tmp_path / "p.parquet"), "--input", str(tmp_path / "bench"),
                     "--output", str(out), "--metric", "exact_match"]) == 0
    scored = pq.read_table(out / "predictions.parquet")
    assert scored.column("score").to_pylist() == [1.0, 0.0, 1.0]
    assert scored.schema.field("num_generated_tokens").type == pa.int32()
    assert scored.column("choice_logprobs").to_pylist()[0] == [("3", -0.1)]


def test_an_evaluations_own_output_is_scored_again_and_compared_to_numbers(tmp_path):
    """An evaluation's predictions.parquet scored again (as the README's second command does) keeps
    one score column (it had two of each, unreadable); numeric answers and a numeric baseline answer
    column score and show in the gallery; a category with | or a newline keeps the baseline table."""
    rows = [{"id": "a", "answer": "3", "answers": 3, "category": "x|y"},
            {"id": "b", "answer": "0", "answers": 0, "category": "two\nlines"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "answer": [3, 1]}), tmp_path / "base.parquet")
    first, again = tmp_path / "first", tmp_path / "again"
    argv = ["--metric", "exact_match", "--baseline", str(tmp_path / "base.parquet"), "--gallery", "5"]
    assert job.main(["--predictions", str(tmp_path / "p.parquet"), "--output", str(first), *argv]) == 0
    assert job.main(["--predictions", str(first / "predictions.parquet"), "--output", str(again), *argv]) == 0
    scored = pq.read_table(again / "predictions.parquet")
    assert scored.column_names.count("score") == scored.column_names.count("baseline_score") == 1
    assert scored.column("score").to_pylist() == [1.0, 1.0]
    assert scored.column("baseline_score").to_pylist() == [1.0, 0.0]
    gallery = (first / "gallery.html").read_text()      # the changed row: its ground truth 0 shown (was empty)
    assert "<dd>0</dd>" in gallery
    table = [line for line in (first / "report.md").read_text().splitlines() if line.startswith("| x")]
    assert table and all(line.endswith("|") for line in table) and "two lines" in (first / "report.md").read_text()


def test_an_evaluations_own_output_is_scored_again_with_its_metric(tmp_path):
    """The README's rescoring command without --metric: the metric is the one metrics.json beside the
    predictions names (a path naming no benchmark was refused: "cannot tell the benchmark")."""
    pq.write_table(pa.table({"id": ["a", "b"], "answer": ["3", "0"], "answers": [["3"], ["1"]]}), tmp_path / "p.parquet")
    first, again = tmp_path / "mine", tmp_path / "again"
    assert job.main(["--predictions", str(tmp_path / "p.parquet"), "--output", str(first), "--metric",
                     "relaxed_accuracy"]) == 0
    assert job.main(["--predictions", str(first / "predictions.parquet"), "--output", str(again)]) == 0
    assert json.loads((again / "metrics.json").read_text())["metric"] == "relaxed_accuracy"
    # the folder itself, as --baseline takes it: its raw/ answers were read beside predictions.parquet,
    # every id twice ("predictions has duplicate ids")
    (first / "raw").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "answer": ["3", "0"]}), first / "raw" / "part-0.parquet")
    assert job.main(["--predictions", str(first), "--output", str(tmp_path / "folder")]) == 0
    assert json.loads((tmp_path / "folder" / "metrics.json").read_text())["metric"] == "relaxed_accuracy"
    with pytest.raises(ValueError, match="cannot tell the benchmark"):
        job.evaluate(job.parse_args(["--predictions", str(tmp_path / "p.parquet"), "--output", str(again)]))


def test_a_benchmarks_files_of_answers_in_other_forms_are_one_line(tmp_path, capsys):
    (tmp_path / "bench").mkdir()
    pq.write_table(pa.table({"id": ["a"], "answers": ["x"]}), tmp_path / "bench" / "0.parquet")
    pq.write_table(pa.table({"id": ["b"], "answers": [["y"]]}), tmp_path / "bench" / "1.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "answer": ["x", "y"]}), tmp_path / "p.parquet")
    assert job.main(["--predictions", str(tmp_path / "p.parquet"), "--input", str(tmp_path / "bench"),
                     "--output", str(tmp_path / "o"), "--metric", "exact_match"]) == 2
    assert "do not convert to one another" in capsys.readouterr().err


def test_a_benchmark_without_ids_has_its_ground_truth_checked_before_the_model_runs(tmp_path, capsys):
    """Without an id column the rows carry their answers through the run: checked all the same, by
    row, before any work (a run answered every row, then failed; the dry run passed)."""
    from jobs.common import DEMO_MODEL

    pq.write_table(pa.table({"image": [png("red"), png("blue")], "question": ["Colour?"] * 2,
                             "answers": [["red"], None]}), tmp_path / "bench.parquet")
    for extra in (["--dry-run", "2"], []):
        assert job.main(["--input", str(tmp_path / "bench.parquet"), "--model", str(DEMO_MODEL), "--output",
                         str(tmp_path / "o"), "--metric", "exact_match", *extra]) == 2
        assert "1 rows have no ground-truth answers, e.g. ids ['row 1']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_gallery_reads_images_named_relative_to_the_benchmark(tmp_path, monkeypatch):
    """As the run reads them: from the benchmark's folder (or --image-root), not the current one."""
    (tmp_path / "bench" / "images").mkdir(parents=True)
    for i, colour in enumerate(("red", "blue")):
        (tmp_path / "bench" / "images" / f"{i}.png").write_bytes(png(colour))
    pq.write_table(pa.table({"id": ["a", "b"], "image": ["images/0.png", "images/1.png"], "answers": ["red", "x"]}),
                   tmp_path / "bench" / "bench.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "answer": ["red", "blue"]}), tmp_path / "p.parquet")
    monkeypatch.chdir(tmp_path)
    assert job.main(["--predictions", str(tmp_path / "p.parquet"), "--input", str(tmp_path / "bench" / "bench.parquet"),
                     "--output", str(tmp_path / "o"), "--metric", "exact_match", "--gallery", "5"]) == 0
    assert (tmp_path / "o" / "gallery.html").read_text().count("data:image/jpeg;base64,") == 2


def test_a_benchmark_without_its_ground_truth_column_lists_all_its_columns(tmp_path, capsys):
    """MMStar keeps its truth in `answer`: the error listed only the columns it had read (id, question),
    hiding the one to pass as --answers-column."""
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"], "question": ["q"], "answer": ["A"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": ["a"], "answer": ["A"]}), tmp_path / "p.parquet")
    assert job.main(["--input", str(tmp_path / "b.parquet"), "--predictions", str(tmp_path / "p.parquet"),
                     "--output", str(tmp_path / "o"), "--metric", "exact_match"]) == 2
    assert "columns: ['id', 'image', 'question', 'answer']" in capsys.readouterr().err


def test_an_evaluations_own_output_joined_to_its_benchmark_is_scored_again_with_its_metric(tmp_path):
    """With --input too, the metric of the metrics.json beside the predictions wins over the benchmark's
    name (a DocVQA-named file scored ANLS predictions made with exact_match)."""
    pq.write_table(pa.table({"id": ["a", "b"], "answer": ["red", "Red car"]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "answers": [["red"], ["red"]]}), tmp_path / "docvqa_val.parquet")
    first, again = tmp_path / "mine", tmp_path / "again"
    bench = ["--input", str(tmp_path / "docvqa_val.parquet")]
    assert job.main(["--predictions", str(tmp_path / "p.parquet"), *bench, "--output", str(first), "--metric",
                     "exact_match"]) == 0
    assert job.main(["--predictions", str(first / "predictions.parquet"), *bench, "--output", str(again)]) == 0
    assert json.loads((again / "metrics.json").read_text())["metric"] == "exact_match"


def test_a_baseline_of_numbers_scores_as_this_runs_numbers(tmp_path):
    """A float32 answer 0.1 is "0.1" for this run and for the baseline alike (compared with itself, the
    baseline scored 0 and the delta was 1.0)."""
    pq.write_table(pa.table({"id": ["a", "b"], "answer": pa.array([0.1, 3.0], pa.float32())}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "answers": [["0.1"], ["3"]]}), tmp_path / "bench.parquet")
    out = tmp_path / "o"
    assert job.main(["--predictions", str(tmp_path / "p.parquet"), "--input", str(tmp_path / "bench.parquet"),
                     "--output", str(out), "--metric", "exact_match", "--baseline", str(tmp_path / "p.parquet")]) == 0
    base = json.loads((out / "metrics.json").read_text())["baseline"]
    assert (base["score"], base["baseline_score"], base["delta"]) == (1.0, 1.0, 0.0)
    assert pq.read_table(out / "predictions.parquet").column("baseline_answer").to_pylist() == ["0.1", "3"]


def test_a_missing_baseline_or_a_bad_limit_is_refused_before_the_model_runs_and_by_the_dry_run(tmp_path, capsys):
    from jobs.common import DEMO_MODEL

    pq.write_table(pa.table({"id": ["a", "b"], "image": [png("red"), png("blue")], "question": ["Colour?"] * 2,
                             "answers": [["red"], ["blue"]]}), tmp_path / "bench.parquet")
    run = ["--input", str(tmp_path / "bench.parquet"), "--model", str(DEMO_MODEL), "--output", str(tmp_path / "o"),
           "--metric", "exact_match"]
    for extra, refusal in [(["--baseline", str(tmp_path / "nowhere")], "neither a .parquet file nor"),
                           (["--baseline", str(tmp_path / "none.parquet")], "no such file"),
                           (["--limit", "0"], "--limit must be >= 1")]:
        for rehearsal in (["--dry-run", "1"], []):
            assert job.main([*run, *extra, *rehearsal]) == 2, (extra, rehearsal)
            assert refusal in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert job.main([*run, "--dry-run", "2", "--limit", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["input_rows"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--category-column", "question"], "error: --category-column 'question' is the column of --question-column too"),
    (["--category-column", "kind"], "has no 'kind' column (--category-column)"),
    (["--answers-column", "gt"], "has no 'gt' column (--answers-column)")])
def test_column_flags_naming_a_used_or_missing_column_are_one_line(tmp_path, capsys, flags, message):
    """--category-column question was a traceback ('Field "category" exists 2 times'), a missing
    --category-column scored without a word of its categories, a missing --answers-column was named as
    'answers'."""
    pq.write_table(pa.table({"id": ["a"], "question": ["q"], "answers": ["A"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": ["a"], "answer": ["A"]}), tmp_path / "p.parquet")
    assert job.main(["--input", str(tmp_path / "b.parquet"), "--predictions", str(tmp_path / "p.parquet"),
                     "--output", str(tmp_path / "o"), "--metric", "exact_match", *flags]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "8"], "--max-new-tokens is about running a model; --predictions scores answers"),
    (["--replicas", "2"], "--replicas is about running a model"),
    (["--prompt-suffix", ""], "--prompt-suffix is about running a model"),
    (["--resume"], "--resume is about running a model"),
    (["--gallery", "-5"], "--gallery must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens is about running a model"),
    (["--no-compile"], "--compile is about running a model"),
    (["--retry-errors"], "--retry-errors is about running a model"),
])
def test_flags_that_would_change_nothing_or_contradict_are_refused(tmp_path, capsys, flags, message):
    """Beside --predictions, a model-run flag changed nothing, silently; --gallery -5 wrote no gallery."""
    pq.write_table(pa.table({"id": ["a"], "answer": ["A"], "answers": ["A"]}), tmp_path / "p.parquet")
    assert job.main(["--predictions", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "o"),
                     "--metric", "exact_match", *flags]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
    assert not (tmp_path / "o").exists()


def test_resume_beside_overwrite_is_refused_by_the_dry_run_too(tmp_path, capsys):
    from jobs.common import DEMO_MODEL

    pq.write_table(pa.table({"id": ["a"], "image": [png("red")], "answers": [["red"]]}), tmp_path / "bench.parquet")
    for retry in (["--resume"], ["--retry-errors"]):
        assert job.main(["--input", str(tmp_path / "bench.parquet"), "--model", str(DEMO_MODEL), "--output",
                         str(tmp_path / "o"), "--metric", "exact_match", "--overwrite", "--dry-run", *retry]) == 2
        assert "continues the earlier run, --overwrite discards it" in capsys.readouterr().err


def test_a_gallery_of_an_image_1_column(tmp_path):
    """--image-column image_1 (MMMU's first image's name) read image_1 twice: a KeyError after the whole run."""
    pq.write_table(pa.table({"id": ["a"], "image_1": [png("red")], "answers": ["red"]}), tmp_path / "docvqa.parquet")
    pq.write_table(pa.table({"id": ["a"], "answer": ["red"]}), tmp_path / "p.parquet")
    assert job.main(["--input", str(tmp_path / "docvqa.parquet"), "--predictions", str(tmp_path / "p.parquet"),
                     "--image-column", "image_1", "--gallery", "1", "--output", str(tmp_path / "o")]) == 0
    assert "data:image/jpeg" in (tmp_path / "o" / "gallery.html").read_text()


def test_mmstars_score_is_the_mean_of_its_l2_categories_means_as_lmms_evals_average(tmp_path):
    """lmms-eval's MMStar "average" is the mean of its 18 l2_category means, not of its rows: 2/3 right in
    one l2 category and 2/2 in another is 0.833333 there, 0.8 as a row mean."""
    rows = {"id": ["a", "b", "c", "d", "e"], "answer": ["A", "A", "B", "C", "D"], "answers": ["A", "A", "A", "C", "D"],
            "category": ["math"] * 3 + ["science"] * 2, "l2_category": ["geometry"] * 3 + ["physics"] * 2}
    pq.write_table(pa.table(rows), tmp_path / "MMStar_val.parquet")
    out = tmp_path / "o"
    assert job.main(["--predictions", str(tmp_path / "MMStar_val.parquet"), "--output", str(out),
                     "--baseline", str(tmp_path / "MMStar_val.parquet")]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert (summary["score"], summary["metric"]) == (0.833333, "mmstar")
    assert summary["averaged_over"] == {"column": "l2_category", "groups": 2}
    assert summary["per_category"]["math"]["score"] == 0.666667 and summary["metrics"]["exact_match"] == 0.833333
    assert (summary["baseline"]["score"], summary["baseline"]["delta"]) == (0.833333, 0.0)
    assert "- score: 0.833333 (95 % interval" in (out / "report.md").read_text()
    assert "the mean of the 2 `l2_category` groups' means" in (out / "report.md").read_text()
    assert job.main(["--predictions", str(out), "--output", str(tmp_path / "again")]) == 0    # its folder: the same
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["score"] == 0.833333
    by_l2 = tmp_path / "by_l2"      # categories by l2_category: each group's own score, the same average
    assert job.main(["--input", str(tmp_path / "MMStar_val.parquet"), "--predictions", str(out / "predictions.parquet"),
                     "--category-column", "l2_category", "--output", str(by_l2)]) == 0
    summary = json.loads((by_l2 / "metrics.json").read_text())
    assert summary["score"] == 0.833333 and summary["per_category"]["geometry"]["score"] == 0.666667
    pq.write_table(pa.table(rows).drop_columns(["l2_category"]), tmp_path / "mmstar.parquet")
    assert job.main(["--predictions", str(tmp_path / "mmstar.parquet"), "--output", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["score"] == 0.8      # no groups: rows


def test_a_rescoring_reads_as_it_must_and_takes_a_shared_job_yaml(tmp_path):
    """--storage-options and --image-root are how a rescoring reads its files; a job.yaml shared with
    the model run holds run settings that a rescoring has no use for: none of them is refused."""
    pq.write_table(pa.table({"id": ["a"], "answer": ["A"], "answers": ["A"]}), tmp_path / "p.parquet")
    (tmp_path / "eval.yaml").write_text("max_new_tokens: 32\nreplicas: 2\n")
    assert job.main(["--predictions", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "o"),
                     "--metric", "exact_match", "--storage-options", "{}", "--image-root", str(tmp_path),
                     "--config", str(tmp_path / "eval.yaml")]) == 0


def test_a_known_benchmarks_own_column_names_are_read_as_the_hub_ships_them(tmp_path):
    """MMStar's ground truth is `answer` and its ids `index`, DocVQA's ids `questionId`, ChartQA's
    categories `type`: each needed its flag (the run stopped at once, or wrote hashes for ids)."""
    mmstar = tmp_path / "MMStar" / "mmstar.parquet"
    mmstar.parent.mkdir()
    pq.write_table(pa.table({"index": [0, 1], "question": ["q", "r"], "answer": ["A", "B"],
                             "category": ["math", "math"], "l2_category": ["g", "g"]}), mmstar)
    pq.write_table(pa.table({"id": [0, 1], "answer": ["A", "C"]}), tmp_path / "p.parquet")
    assert job.main(["--input", str(mmstar), "--predictions", str(tmp_path / "p.parquet"),
                     "--output", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["score"] == 0.5
    args = job.parse_args(["--input", str(mmstar), "--answers-column", "answer", "--id-column", "index"])
    assert (args.id_column, args.answers_column, args.category_column) == ("index", "answer", "category")
    docvqa = tmp_path / "docvqa_val.parquet"
    pq.write_table(pa.table({"questionId": ["q7"], "answers": [["x"]], "id": ["own"]}), docvqa)
    assert job.parse_args(["--input", str(docvqa)]).id_column == "id"           # a column of the default name wins
    pq.write_table(pa.table({"questionId": ["q7"], "answers": [["x"]]}), docvqa)
    assert job.parse_args(["--input", str(docvqa)]).id_column == "questionId"
    chartqa = tmp_path / "ChartQA_test.parquet"
    pq.write_table(pa.table({"type": ["human"], "question": ["q"], "answer": ["3"]}), chartqa)
    args = job.parse_args(["--input", str(chartqa)])
    assert (args.id_column, args.answers_column, args.category_column) == ("id", "answer", "type")
    assert job.parse_args(["--input", str(tmp_path / "nowhere" / "mmstar.parquet")]).answers_column == "answers"


def test_a_resume_or_baseline_of_a_run_named_otherwise_is_told_before_the_model_runs(tmp_path, capsys):
    """A DocVQA run begun with row hashes for ids (before questionId was read by default) resumes with
    them, its manifest says so; a baseline of such ids is refused before the model run (it was after
    it, blaming the benchmark); an id column that repeats names --id-column."""
    docvqa = tmp_path / "DocVQA" / "validation.parquet"
    docvqa.parent.mkdir()
    pq.write_table(pa.table({"questionId": ["q1", "q2"], "image": [png("red")] * 2, "question": ["a", "b"],
                             "answers": [["x"], ["y"]]}), docvqa)
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "run" / "raw.run.json").write_text(json.dumps({"id_column": "id", "keep_columns": ["answers"]}))
    resumed = job.parse_args(["--input", str(docvqa), "--model", "m", "--output", str(out), "--resume"])
    assert (resumed.id_column, resumed.category_column) == ("id", "category")
    assert job.parse_args(["--input", str(docvqa), "--model", "m", "--output", str(out)]).id_column == "questionId"
    pq.write_table(pa.table({"id": ["6678051274010405462"], "answer": ["x"]}), tmp_path / "old.parquet")
    assert job.main(["--input", str(docvqa), "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o"),
                     "--baseline", str(tmp_path / "old.parquet")]) == 2
    assert "--id-column names the ids the baseline's run used" in capsys.readouterr().err
    pq.write_table(pa.table({"questionId": ["q1", "q1"], "answers": [["x"], ["y"]]}), docvqa)
    assert job.main(["--input", str(docvqa), "--predictions", str(tmp_path / "old.parquet"),
                     "--output", str(tmp_path / "o")]) == 2
    assert "its id column 'questionId' repeats ids, e.g. ['q1']: --id-column names another" in capsys.readouterr().err


def test_mmbench_is_scored_by_its_circular_evaluation(tmp_path):
    """MMBench's rows are its questions and their circular copies (options rotated, index + k * 1e6):
    lmms-eval counts a question right only when every copy's answer is, reading a letter from an
    answer as MMBench does ("The dog" names option B). A row each made 3 of 4 right, not 1 of 2."""
    bench = tmp_path / "MMBench" / "dev.parquet"
    bench.parent.mkdir()
    pq.write_table(pa.table({"index": [7, 1000007, 8, 1000008], "question": ["Which pet?"] * 2 + ["Which?"] * 2,
                             "hint": [None] * 4, "A": ["cat", "dog", "up", "down"], "B": ["dog", "cat", "down", "up"],
                             "C": [None] * 4, "D": [None] * 4, "answer": ["B", "A", "A", "B"],
                             "category": ["pets", "pets", "ways", "ways"]}), bench)
    pq.write_table(pa.table({"id": [7, 1000007, 8, 1000008], "answer": ["The dog", "B", "A", "B"]}),
                   tmp_path / "p.parquet")
    out = tmp_path / "o"
    assert job.main(["--input", str(bench), "--predictions", str(tmp_path / "p.parquet"), "--output", str(out),
                     "--baseline", str(tmp_path / "p.parquet")]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert (summary["metric"], summary["score"], summary["rows"], summary["questions"]) == ("mmbench", 0.5, 4, 2)
    assert summary["per_category"]["ways"] == {"score": 1.0, "rows": 2, "questions": 1, "ci95": None}
    assert (summary["baseline"]["questions"], summary["baseline"]["delta"]) == (2, 0.0)
    assert pq.read_table(out / "predictions.parquet").column("score").to_pylist() == [1, 0, 1, 1]
    assert job.main(["--predictions", str(out), "--output", str(tmp_path / "again")]) == 0     # options kept
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["questions"] == 2


def test_a_limited_resume_of_a_benchmark_without_ids_says_what_it_would_answer(tmp_path, capsys):
    """The first rows of an input without ids cannot be found again on a resume: the pipeline's refusal
    ("resume without it to answer the rest") led to a run that answered and scored the whole benchmark."""
    pq.write_table(pa.table({"image": [png("red")] * 2, "question": ["q", "r"], "answers": [["x"], ["y"]]}),
                   tmp_path / "bench.parquet")
    assert job.main(["--input", str(tmp_path / "bench.parquet"), "--model", str(tmp_path / "m"), "--metric",
                     "exact_match", "--output", str(tmp_path / "o"), "--resume", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "has no id column ('id', --id-column) to find its first rows by again" in err
    assert "a resume without --limit answers every benchmark row" in err
