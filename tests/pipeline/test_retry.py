"""--retry-errors: a resumed run answers again the earlier run's error rows (all, or those whose
error holds a text), without re-running the rest, and the output holds every row once."""
import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import PipelineConfig, read_output, run_job
from pipeline.retry import drop_error_rows
from tests.pipeline.helpers import good_rows, png, write_parquet

MAX_NEW = 5


def test_error_rows_are_taken_out_of_the_files_that_hold_them(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    def rows(ids: list[str], reasons: list[str | None]) -> pa.Table:
        return pa.table({"id": ids, "finish_reason": ["stop" if r is None else "error" for r in reasons],
                         "error": reasons, "answer": ["a" if r is None else None for r in reasons]})

    pq.write_table(rows(["a", "b", "c"], [None, "fetch: TimeoutError", "preprocess: ImageDecodeError"]),
                   out / "1.parquet")
    pq.write_table(rows(["d"], ["fetch: TimeoutError"]), out / "2.parquet")
    pq.write_table(rows(["e"], [None]), out / "3.parquet")
    assert drop_error_rows(str(out), matching="Timeout") == 2
    assert sorted(p.name for p in out.iterdir()) == ["1.parquet", "3.parquet"]      # a file of no rows left: gone
    assert pq.read_table(out / "1.parquet").column("id").to_pylist() == ["a", "c"]
    assert drop_error_rows(str(out), matching="Timeout") == 0
    assert drop_error_rows(str(out)) == 1                                           # every error row
    assert read_output(str(out)).column("id").to_pylist() == ["a", "e"]


def test_errors_are_matched_by_their_kind_in_any_case_and_only_among_the_rows_answered(tmp_path):
    """A failed image read's error is "read image: RowError: cannot read image ...: FileNotFoundError: ...":
    the summary's kind of it ("read image: FileNotFoundError") and the help's own example matched none
    of them. An evaluation's --limit answers its first rows only: the others' error rows were taken out
    of the output (gone until a later resume) and counted as answered again."""
    from pipeline.fetch import ImageFetcher
    from pipeline.rows import error_kind, error_message

    error = error_message("read image", ImageFetcher(root=str(tmp_path)).read(str(tmp_path / "gone.png")))
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "finish_reason": ["error", "error", "stop"],
                             "error": [error, error, None], "answer": [None, None, "x"],
                             "num_generated_tokens": [0, 0, 1]}), out / "1.parquet")
    assert error_kind(error) == "read image: FileNotFoundError"
    for text in ("read image: FileNotFoundError", "READ IMAGE", "filenotfounderror"):
        assert drop_error_rows(str(out), matching=text, only_ids=["a"]) == 1, text
        pq.write_table(pa.table({"id": ["a"], "finish_reason": ["error"], "error": [error], "answer": [None],
                                 "num_generated_tokens": [0]}), out / "2.parquet")
    assert drop_error_rows(str(out), matching="fetch") == 0
    assert sorted(read_output(str(out)).column("id").to_pylist()) == ["a", "b", "c"]    # b kept, outside the ids
    # the summary's missing rows are those of the ids the run answers (3 output ids, 2 wanted: "none missing")
    from pipeline.job import output_counts, summarize

    after = output_counts(str(out), wanted=("a", "d"))
    assert after["missing"] == 1
    assert summarize("in", str(out), after, after, 1.0, 2)["missing_rows"] == 1


def test_a_resume_answers_again_the_rows_that_failed_for_a_passing_reason(ray_cluster, checkpoint, oracle, tmp_path,
                                                                          caplog):
    """Two rows name image files not there yet (a mount not ready): error rows. Once they are, a
    resume with retry_errors answers those two only; a text no error holds retries none."""
    from pipeline.job import prepare_job

    images = tmp_path / "images"
    images.mkdir()
    made = {f"img-{i}.png": png(20 + 5 * i, 24, seed=i) for i in range(5)}
    for name in list(made)[:3]:
        (images / name).write_bytes(made[name])
    write_parquet(tmp_path / "in" / "part-0.parquet",
                  [{"id": f"row-{i}", "image": name, "question": "What is it?"} for i, name in enumerate(made)])
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW, image_root=str(images))
    first = run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    assert first["error_rows"] == 2
    before = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    for name in list(made)[3:]:
        (images / name).write_bytes(made[name])
    assert (tmp_path / "out.summary.json").exists()
    with pytest.raises(ValueError, match="other settings than its earlier run"):      # refused: changes nothing
        prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), replace(config, max_new_tokens=MAX_NEW + 1),
                    resume=True)
    assert (tmp_path / "out.summary.json").exists()
    assert prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), config, resume=True,
                       retry_errors="no error says this").retried_rows == 0
    assert "retry_errors 'no error says this' matches no error row the run answers (the output holds 2: " \
           "read image: FileNotFoundError)" in caplog.text
    assert not (tmp_path / "out.summary.json").exists()     # a run killed from here leaves none, not a stale one
    with pytest.raises(ValueError, match="resume it"):
        prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), config, retry_errors="")
    summary = run_job(str(tmp_path / "in"), str(tmp_path / "out"), config, resume=True, retry_errors="FileNotFound")
    assert summary["error_rows_answered_again"] == 2 and summary["rows_this_run"] == 2
    assert (summary["rows"], summary["error_rows"], summary["missing_rows"], summary["duplicate_rows"]) == (5, 0, 0, 0)
    assert summary["lost_rows_answered_again"] == 0
    assert json.loads((tmp_path / "out.summary.json").read_text()) == summary
    after = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    for i, name in enumerate(made):
        assert (after[f"row-{i}"]["answer"], after[f"row-{i}"]["num_generated_tokens"]) == oracle.answer(
            made[name], "What is it?", MAX_NEW)
    assert all(after[i] == before[i] for i in ("row-0", "row-1", "row-2"))     # not answered again


def test_the_flag_resumes_and_names_what_to_retry():
    from jobs.caption import DEFAULTS, parse_args
    from jobs.common import merge_args

    values = merge_args(parse_args(["--retry-errors"]), DEFAULTS)
    assert values["retry_errors"] == "" and values["resume"] is True          # retrying resumes the run
    assert merge_args(parse_args(["--retry-errors", "fetch"]), DEFAULTS)["retry_errors"] == "fetch"
    assert merge_args(parse_args([]), DEFAULTS)["retry_errors"] is None
    from jobs import evaluate
    assert evaluate.parse_args(["--retry-errors", "generate"]).retry_errors == "generate"


def test_retrying_an_output_that_holds_no_run_is_refused_before_writing_anything(checkpoint, tmp_path):
    from pipeline.job import prepare_job

    write_parquet(tmp_path / "in" / "part-0.parquet", good_rows(2))
    with pytest.raises(ValueError, match="holds no earlier run whose error rows to answer again"):
        prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)), resume=True,
                    retry_errors="")
    assert not list(tmp_path.glob("out*"))
