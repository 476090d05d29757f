"""jobs.caption --dry-run: the run's checks and its CPU stage on the first rows, on the driver,
writing nothing, starting no cluster, loading no weights."""
import io
import json

from PIL import Image

from jobs import caption
from tests.pipeline.helpers import png, write_parquet


def rows_of_every_kind(tmp_path) -> list[dict]:
    """Images named by path (relative to the input's folder): three good, a null, a missing file, a
    crawler's error page saved as .png, and the first question asked again."""
    (tmp_path / "not-an-image.png").write_bytes(b"<html>404</html>")
    for i, size in enumerate([(40, 30), (64, 20), (30, 30)]):
        (tmp_path / f"good-{i}.png").write_bytes(png(*size, seed=i))
    return [{"id": "good-0", "image": "good-0.png", "question": "What is it?"},
            {"id": "null", "image": None, "question": "What is it?"},
            {"id": "good-1", "image": "good-1.png", "question": "How many shapes are there in the picture?"},
            {"id": "missing", "image": "nowhere.png", "question": None},
            {"id": "html", "image": "not-an-image.png", "question": None},
            {"id": "good-2", "image": "good-2.png", "question": None},
            {"id": "good-again", "image": "good-0.png", "question": "What is it?"}]       # good-0 asked again


def test_a_rehearsal_finds_the_failing_rows_and_counts_the_prompts(checkpoint, oracle, tmp_path, capsys):
    import ray

    ray.shutdown()          # the cluster earlier modules share (conftest.ray_cluster): the rehearsal starts none
    rows = rows_of_every_kind(tmp_path)
    write_parquet(tmp_path / "in.parquet", rows)
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "in.parquet"), "--output", str(out), "--model", str(checkpoint),
            "--image-column", "image"]
    assert caption.main([*argv, "--dry-run", "10"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert (found["input_rows"], found["rows_tried"], found["error_rows"]) == (7, 7, 3)
    assert [e["id"] for e in found["error_examples"]] == ["null", "missing", "html"]
    assert set(found["errors_by_kind"]) == {"read image: image is null", "read image: FileNotFoundError",
                                            "preprocess: NotAnImageError"}
    assert found["estimated_error_rows"] == 3 and found["images_tried"] == 3 and found["repeated_questions"] == 1
    # each good row's prompt as transformers' processor makes it
    lengths = []
    for r in [r for r in rows if r["id"].startswith("good")]:
        image = Image.open(io.BytesIO((tmp_path / r["image"]).read_bytes()))
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": r["question"] or "Describe this image."}]}]
        inputs = oracle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True, return_tensors="pt")
        lengths.append(inputs["input_ids"].shape[1])
    assert found["prompt_tokens"]["max"] == max(lengths)
    assert found["prompt_tokens"]["mean"] == round(sum(lengths) / 4, 1)
    assert found["estimated_prompt_tokens"] == round(sum(lengths) / 4 * 7)
    assert not out.exists() and not ray.is_initialized()        # nothing written, no cluster
    assert caption.main([*argv, "--dry-run", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_tried"] == 2


def test_a_rehearsal_finds_the_rows_without_a_text_to_score(checkpoint, tmp_path, capsys):
    """The check ran in the model stage, which a rehearsal does not run: it found no error row."""
    rows = [{"id": "a", "image": png(20, 20), "caption": "a red square"}, {"id": "b", "image": png(20, 20),
                                                                          "caption": None},
            {"id": "c", "image": png(20, 20), "caption": ""}]
    write_parquet(tmp_path / "in.parquet", rows)
    assert caption.main(["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--model",
                         str(checkpoint), "--score-column", "caption", "--dry-run", "3"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in found["error_examples"]] == ["b", "c"]
    assert found["errors_by_kind"] == {"score column: the row has no text to score": 2}


def test_a_rehearsal_fails_as_the_run_would(checkpoint, tmp_path, capsys):
    rows = rows_of_every_kind(tmp_path)
    write_parquet(tmp_path / "bad.parquet", [r for r in rows if not r["id"].startswith("good")])
    argv = ["--input", str(tmp_path / "bad.parquet"), "--output", str(tmp_path / "out"), "--model", str(checkpoint)]
    assert caption.main([*argv, "--dry-run"]) == 1                 # every row tried would fail
    assert json.loads(capsys.readouterr().out)["error_rows"] == 3
    assert caption.main([*argv, "--dry-run", "--question-column", "nope"]) == 2     # the run's own checks
    assert "nope" in capsys.readouterr().err
    assert caption.main([*argv, "--dry-run", "0"]) == 2
    assert "at least 1 row" in capsys.readouterr().err


def test_a_rehearsal_refuses_what_the_run_would_refuse_and_writes_nothing(checkpoint, tmp_path, capsys):
    """--dry-run made check_job's checks only: a resume with other settings, --limit with --resume or 0,
    --retry-errors into an output of no earlier run passed the rehearsal and were refused by the run."""
    from pipeline import PipelineConfig
    from pipeline.job import prepare_job

    rows = rows_of_every_kind(tmp_path)
    write_parquet(tmp_path / "in.parquet", rows)
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "in.parquet"), "--output", str(out), "--model", str(checkpoint), "--dry-run"]
    prepare_job(str(tmp_path / "in.parquet"), str(out), PipelineConfig(model=str(checkpoint), max_new_tokens=4))
    run_json = (tmp_path / "out.run.json").read_text()
    for extra, refusal in [(["--resume", "--max-new-tokens", "5"], "other settings than its earlier run"),
                           (["--resume", "--max-new-tokens", "4", "--limit", "3"], "limit is for a fresh run"),
                           (["--limit", "0"], "limit must be >= 1"),
                           (["--output", str(tmp_path / "fresh"), "--retry-errors"], "holds no earlier run")]:
        assert caption.main([*argv, *extra]) == 2, extra
        assert refusal in capsys.readouterr().err, extra
    assert caption.main([*argv, "--resume", "--max-new-tokens", "4"]) == 0     # the same settings: goes on
    assert (tmp_path / "out.run.json").read_text() == run_json
    capsys.readouterr()
    assert caption.main([*argv, "--output", str(tmp_path / "o2"), "--limit", "3"]) == 0
    found = json.loads(capsys.readouterr().out)      # what the run would answer, and only those rows tried
    assert (found["input_rows"], found["rows_tried"], [e["id"] for e in found["error_examples"]]) == (3, 3, ["null"])


def test_a_rehearsal_counts_each_image_of_a_row_of_several(checkpoint, oracle, tmp_path, capsys):
    """The group table joins a row's frames: two images were one image of their tiles together."""
    images = [png(40, 30, seed=1), png(300, 90, seed=2)]
    write_parquet(tmp_path / "in.parquet", [{"id": "pair", "image": images, "question": "Which is wider?"}])
    assert caption.main(["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--model",
                         str(checkpoint), "--dry-run", "1"]) == 0
    found = json.loads(capsys.readouterr().out)
    tiles = [oracle.processor.image_processor(images=[Image.open(io.BytesIO(b))])["pixel_values"].shape[1]
             for b in images]
    assert tiles[0] != tiles[1] and found["images_tried"] == 2
    assert (found["tiles_per_image"]["max"], found["tiles_per_image"]["mean"]) == (max(tiles), sum(tiles) / 2)


def test_a_rehearsal_of_a_resume_tries_the_rows_it_would_answer(checkpoint, tmp_path, capsys):
    """It tried the input's first rows, answered already, and estimated for the whole input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import PipelineConfig
    from pipeline.job import prepare_job

    write_parquet(tmp_path / "in.parquet", rows_of_every_kind(tmp_path))
    out = tmp_path / "out"
    prepare_job(str(tmp_path / "in.parquet"), str(out), PipelineConfig(model=str(checkpoint))).output_lock.release()
    out.mkdir()
    (tmp_path / "out.checkpoint").mkdir(exist_ok=True)      # as a run leaves them: its files, its checkpoint
    pq.write_table(pa.table({"id": ["good-0", "null"], "finish_reason": ["stop", "error"],
                             "error": [None, "read image: RowError: image is null"]}), out / "part-0.parquet")
    argv = ["--input", str(tmp_path / "in.parquet"), "--output", str(out), "--model", str(checkpoint), "--resume",
            "--dry-run", "3"]
    for extra, to_answer, tried in [([], 5, ["good-1", "missing", "html"]),
                                    (["--retry-errors"], 6, ["null", "good-1", "missing"])]:
        assert caption.main([*argv, *extra]) in (0, 1)
        found = json.loads(capsys.readouterr().out)
        assert found["rows_to_answer"] == to_answer and found["rows_tried"] == 3, extra
        assert [e["id"] for e in found["error_examples"]] == [i for i in tried if i != "good-1"], extra


def test_a_rehearsal_finds_the_rows_whose_own_settings_no_request_takes(checkpoint, tmp_path, capsys):
    """Those fail in the model stage, which a rehearsal did not run: it counted none of them; and it
    counted a repeated question the run answers twice (drawn answers are not shared)."""
    image = png(20, 20)
    rows = [{"id": "hot", "image": image, "question": "Q?", "params": '{"temperature": "hot"}'},
            {"id": "regex", "image": image, "question": "Q?", "params": '{"regex": "[unclosed"}'},
            {"id": "none", "image": image, "question": "Q?", "params": '{"max_new_tokens": 0}'},
            {"id": "good", "image": image, "question": "Q?", "params": None},
            {"id": "again", "image": image, "question": "Q?", "params": None}]
    write_parquet(tmp_path / "in.parquet", rows)
    argv = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--model", str(checkpoint),
            "--sampling-column", "params", "--dry-run", "5"]
    assert caption.main(argv) == 0
    found = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in found["error_examples"]] == ["hot", "regex", "none"]
    assert all(e["error"].startswith("prepare: ") for e in found["error_examples"])
    assert found["repeated_questions"] == 1                 # good, asked again: answered once
    assert caption.main([*argv, "--temperature", "0.7"]) == 0
    assert json.loads(capsys.readouterr().out)["repeated_questions"] == 0     # drawn: each row its own answer
