"""jobs.evaluate running a model: the real pipeline on a local Ray cluster, a tiny random checkpoint."""
import dataclasses
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation import benchmarks
from evaluation.metrics import exact_match
from jobs import evaluate as job
from tests.fixtures.checkpoints import build_checkpoint
from tests.jobs.test_evaluate_predictions import parse_report, png
from tests.pipeline.helpers import own_cluster

pytestmark = pytest.mark.timeout(300)

MAX_NEW = 4
SUFFIX = " Answer in one word."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt"), "smolvlm")


@pytest.fixture(scope="module")
def ray_cluster():
    # Logical CPUs: a preprocess actor, a model replica and the write tasks each hold one.
    with own_cluster(num_cpus=4) as ray:
        yield ray


@pytest.fixture(scope="module")
def oracle_answer(checkpoint):
    """transformers' greedy answer to the first row, alone: its ground truth, so that it scores 1."""
    import io

    import torch
    from PIL import Image
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(str(checkpoint))
    model = Idefics3ForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(png("red")))},
                                             {"type": "text", "text": "Colour?" + SUFFIX}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def write_benchmark(path: Path, oracle: str, with_ids: bool = True, truth: str = "gt", ids: str = "id",
                    id_values: list | None = None) -> Path:
    table = {"prompt": ["Colour?", "Shape?", "Colour?", "Count?"],
             "picture": [png("red"), png("blue"), b"not an image", png("green")],
             truth: [[oracle, "other"], ["zzz-never"], ["red"], ["zzz-never", "yyy"]],
             "kind": ["colour", "shape", "colour", "count"]}
    if with_ids:
        table = {ids: id_values or ["b0", "b1", "b2", "b3"], **table}
    pq.write_table(pa.table(table), path)
    return path


def run(tmp_path: Path, checkpoint, bench: Path, *extra: str) -> tuple[dict, list[dict], str]:
    out = tmp_path / "out"
    argv = ["--input", str(bench), "--model", str(checkpoint), "--output", str(out), "--metric", "exact_match",
            "--question-column", "prompt", "--answers-column", "gt", "--image-column", "picture",
            "--category-column", "kind", "--prompt-suffix", SUFFIX, "--max-new-tokens", str(MAX_NEW),
            "--batch-size", "2", *extra]
    assert job.main(argv) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert parse_report((out / "report.md").read_text()) == summary
    assert (out / "scores.png").stat().st_size > 0
    return summary, pq.read_table(out / "predictions.parquet").to_pylist(), str(out)


def test_model_run_joins_by_id_and_scores(ray_cluster, checkpoint, oracle_answer, tmp_path):
    summary, rows, out = run(tmp_path, checkpoint, write_benchmark(tmp_path / "bench.parquet", oracle_answer),
                             "--gallery", "3")
    assert [r["id"] for r in rows] == ["b0", "b1", "b2", "b3"]                      # benchmark order
    assert all(r["question"].endswith(SUFFIX) for r in rows)
    assert rows[0]["answer"] == oracle_answer and rows[0]["score"] == 1.0         # the pipeline == reference
    assert rows[2]["finish_reason"] == "error" and rows[2]["score"] == 0.0        # undecodable image
    for r in rows:
        expected = 0.0 if r["finish_reason"] == "error" else exact_match(r["answer"], r["answers"])
        assert r["score"] == expected
    assert summary["rows"] == 4 and summary["errors"] == 1
    assert summary["score"] == round(sum(r["score"] for r in rows) / 4, 6)
    assert summary["per_category"]["colour"] == {"score": 0.5, "rows": 2, "ci95": [0.0, 1.0]}
    gallery = Path(out, "gallery.html").read_text()
    assert gallery.count('class="card') == 3 and "data:image/jpeg" in gallery


def check_limited(summary: dict, rows: list[dict], out: str, oracle_answer: str) -> None:
    """--limit N: a quick check on N benchmark rows (lmms-eval's --limit); the report says so."""
    assert summary["rows"] == len(rows) == 2 and summary["errors"] == 0
    assert sorted(tuple(r["answers"]) for r in rows) == sorted([("zzz-never",), (oracle_answer, "other")])
    assert "the first 2 rows only" in Path(out, "report.md").read_text()


def test_limit_runs_and_scores_only_the_first_rows(ray_cluster, checkpoint, oracle_answer, tmp_path):
    """Without ids (with them: the next test)."""
    bench = write_benchmark(tmp_path / "bench.parquet", oracle_answer, with_ids=False)
    check_limited(*run(tmp_path, checkpoint, bench, "--limit", "2"), oracle_answer)


def test_a_run_continues_with_resume_and_starts_over_only_with_overwrite(ray_cluster, checkpoint, oracle_answer,
                                                                         tmp_path, capsys):
    """The model's answers stay in <output>/raw: a second run is refused unless it resumes (answering
    only the rows not yet answered: here those past a first --limit) or starts over. The ids are
    the benchmark's `question_id` (--id-column)."""
    bench = write_benchmark(tmp_path / "bench.parquet", oracle_answer, ids="question_id")

    def run_by_question_id(*extra: str) -> tuple[dict, list[dict], str]:
        return run(tmp_path, checkpoint, bench, "--id-column", "question_id", *extra)

    summary, rows, out = run_by_question_id("--limit", "2")
    check_limited(summary, rows, out, oracle_answer)
    assert [r["id"] for r in rows] == ["b0", "b1"]
    with pytest.raises(AssertionError):
        run_by_question_id()
    assert "pass --resume to continue it" in capsys.readouterr().err
    summary, rows, out = run_by_question_id("--resume")
    assert [r["id"] for r in rows] == ["b0", "b1", "b2", "b3"] and summary["errors"] == 1
    assert rows[0]["score"] == 1.0 and "limit" not in Path(out, "report.md").read_text()
    answered = json.loads(Path(out, "raw.summary.json").read_text())
    assert (answered["rows_this_run"], answered["rows"], answered["missing_rows"]) == (2, 4, 0)
    mistyped = ["--input", str(bench), "--model", str(tmp_path / "no-such-model"), "--output", out, "--overwrite",
                "--id-column", "question_id", "--answers-column", "gt", "--image-column", "picture"]
    assert job.main(mistyped) == 2 and pq.read_table(Path(out, "raw")).num_rows == 4     # refused, answers kept
    summary, rows, out = run_by_question_id("--overwrite", "--limit", "1")
    assert [r["id"] for r in rows] == ["b0"] and pq.read_table(Path(out, "raw")).num_rows == 1


def test_integer_ids_stay_integers(ray_cluster, checkpoint, oracle_answer, tmp_path):
    """VQAv2's question_id is an integer: predictions.parquet keeps the benchmark's ids as they are
    (strings before), with --limit and the gallery reading them."""
    bench = write_benchmark(tmp_path / "bench.parquet", oracle_answer, id_values=[10, 11, 12, 13])
    summary, rows, out = run(tmp_path, checkpoint, bench, "--limit", "3", "--gallery", "3")
    assert [r["id"] for r in rows] == [10, 11, 12] and rows[0]["score"] == 1.0 and summary["errors"] == 1
    assert pq.read_schema(Path(out, "predictions.parquet")).field("id").type == pa.int64()
    assert Path(out, "gallery.html").read_text().count("data:image/jpeg") == 2      # row 12's image is broken


def test_model_run_without_ids_scores_every_row(ray_cluster, checkpoint, oracle_answer, tmp_path):
    """The ground truth rides with the rows; here in a column named `answer`, as MMStar's, the name
    of the prediction column too."""
    bench = write_benchmark(tmp_path / "bench.parquet", oracle_answer, False, truth="answer")
    summary, rows, _ = run(tmp_path, checkpoint, bench, "--answers-column", "answer")
    assert len({r["id"] for r in rows}) == 4 and summary["rows"] == 4 and summary["errors"] == 1
    by_truth = {tuple(r["answers"]): r for r in rows}
    assert by_truth[(oracle_answer, "other")]["score"] == 1.0
    assert sorted(r["category"] for r in rows) == ["colour", "colour", "count", "shape"]


def test_a_known_benchmarks_questions_get_its_instruction(ray_cluster, checkpoint, tmp_path):
    """Without --prompt-suffix, a TextVQA input's questions end with lmms-eval's instruction for it."""
    bench = write_benchmark(tmp_path / "TextVQA_val.parquet", "red")
    out = tmp_path / "out"
    assert job.main(["--input", str(bench), "--model", str(checkpoint), "--output", str(out), "--limit", "2",
                     "--question-column", "prompt", "--answers-column", "gt", "--image-column", "picture",
                     "--max-new-tokens", "2", "--num-beams", "2"]) == 0
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    assert [r["question"] for r in rows] == ["Colour?" + benchmarks.SHORT_ANSWER, "Shape?" + benchmarks.SHORT_ANSWER]
    assert json.loads((out / "metrics.json").read_text())["metric"] == "vqa_accuracy"
    report = (out / "report.md").read_text()
    assert "- prompt suffix: `'\\nAnswer the question using a single word or phrase.'`" in report
    settings = json.loads(re.search(r"^- settings: `(.*)`$", report, re.M).group(1))
    assert settings["max_new_tokens"] == 2 and settings["image_backend"] == "pil" and settings["num_beams"] == 2
    assert re.search(r"^- checkpoint: `[0-9a-f]{8,}`$", report, re.M)
    assert settings["dtype"] is None and re.search(r"^- replicas: `\d+ x cpu float32`$", report, re.M)  # the one used


def test_demo_model_on_its_heldout_split(ray_cluster, tmp_path):
    """The issue's acceptance run: no --input/--model, the bundled demo model on its held-out split."""
    if not (job.DEMO_MODEL.exists() and job.DEMO_INPUT.exists()):
        pytest.skip("the demo model is not built (python -m jobs.train_demo)")
    out = tmp_path / "out"
    assert job.main(["--output", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["metric"] == "exact_match"
    assert summary["rows"] == pq.read_metadata(job.DEMO_INPUT).num_rows and summary["errors"] == 0
    assert summary["score"] >= 0.95   # the demo issue's bar (the bundled model scores 0.989)
    kinds = {"shape", "colour", "where", "what is at", "count", "shape count", "colour count", "caption"}
    assert set(summary["per_category"]) == kinds and all(v["score"] >= 0.9 for v in summary["per_category"].values())
    assert parse_report((out / "report.md").read_text()) == summary
    scored = pq.read_table(out / "predictions.parquet")
    assert summary["score"] == round(sum(scored.column("score").to_pylist()) / scored.num_rows, 6)
    assert (out / "scores.png").stat().st_size > 0


def test_a_mistyped_model_is_named_before_any_work(tmp_path, capsys):
    bench = write_benchmark(tmp_path / "bench.parquet", "red")
    argv = ["--input", str(bench), "--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "out"),
            "--metric", "exact_match", "--question-column", "prompt", "--answers-column", "gt",
            "--image-column", "picture"]
    assert job.main(argv) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "out" / "raw").exists()


def test_a_tensor_parallel_size_the_model_cannot_take_is_named_before_any_work(checkpoint, tmp_path, capsys):
    bench = write_benchmark(tmp_path / "bench.parquet", "red")
    argv = ["--input", str(bench), "--model", str(checkpoint), "--output", str(tmp_path / "out"),
            "--metric", "exact_match", "--question-column", "prompt", "--answers-column", "gt",
            "--image-column", "picture", "--tensor-parallel-size", "2"]     # 3 attention heads
    assert job.main(argv) == 2
    assert "cannot shard this model" in capsys.readouterr().err
    assert not (tmp_path / "out" / "raw").exists()


def test_choices_and_an_adapter_and_the_report_says_so(ray_cluster, checkpoint, tmp_path):
    """--choice for every question, --choices-column for those with their own (a multiple-choice
    benchmark's options), from a checkpoint with a LoRA adapter; the report names them."""
    from tests.model.test_lora import ADAPTERS, build_adapter

    build_adapter(checkpoint, tmp_path / "adapter", **ADAPTERS["lora"])
    bench = write_benchmark(tmp_path / "bench.parquet", "red")
    table = pq.read_table(bench)
    options = pa.array([["red", "blue"], None, None, ["one", "two", "three"]], pa.list_(pa.string()))
    pq.write_table(table.append_column("options", options), bench)
    summary, rows, out = run(tmp_path, checkpoint, bench, "--choice", "red", "--choice", "green square",
                             "--choices-column", "options", "--max-new-tokens", "16",
                             "--adapter", str(tmp_path / "adapter"))
    asked = {"b0": ["red", "blue"], "b1": ["red", "green square"], "b3": ["one", "two", "three"]}
    assert {r["id"]: r["answer"] in asked.get(r["id"], []) for r in rows} == {"b0": True, "b1": True, "b2": False,
                                                                              "b3": True}
    assert rows[2]["finish_reason"] == "error"       # the undecodable image
    settings = json.loads(re.search(r"^- settings: `(.*)`$", (Path(out) / "report.md").read_text(), re.M).group(1))
    assert settings["choices"] == ["red", "green square"] and settings["choices_column"] == "options"
    assert re.search(r"^- adapter: `[0-9a-f]{8,}`$", (Path(out) / "report.md").read_text(), re.M)


def test_a_dry_run_rehearses_the_model_run(checkpoint, tmp_path, capsys):
    """--dry-run: the ground truth checked for the metric, the benchmark's first rows through the CPU
    stage on the driver (its broken image found), nothing written."""
    bench = write_benchmark(tmp_path / "bench.parquet", "red")
    out = tmp_path / "out"
    argv = ["--input", str(bench), "--model", str(checkpoint), "--output", str(out), "--question-column", "prompt",
            "--answers-column", "gt", "--image-column", "picture", "--category-column", "kind"]
    assert job.main([*argv, "--metric", "exact_match", "--dry-run", "3"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert (found["metric"], found["input_rows"], found["rows_tried"], found["error_rows"]) == ("exact_match", 4, 3, 1)
    assert found["error_examples"][0]["id"] == "b2" and found["prompt_tokens"]["max"] > 0
    assert not out.exists()
    assert job.main([*argv, "--metric", "multiple_choice", "--dry-run"]) == 2     # "red" is no option letter
    assert "multiple_choice cannot use" in capsys.readouterr().err


def test_the_reports_settings_name_a_generation_config_url_without_its_secrets(checkpoint, tmp_path):
    bench = write_benchmark(tmp_path / "docvqa.parquet", "red", truth="answers")
    args = job.parse_args(["--input", str(bench), "--model", str(checkpoint),
                           "--generation-config", "https://alice:pw0@h/gen.json?token=t0"])
    settings = job.model_settings(args)["settings"]
    assert '"generation_config": "https://***@h/gen.json?token=***"' in settings and "pw0" not in settings


def test_a_multiple_choice_benchmarks_option_columns_are_asked(checkpoint, tmp_path):
    """MMBench keeps its options in columns A..E (and a hint): the model was asked the question alone,
    never seeing the options whose letter it was to answer. They are asked as lmms-eval asks them."""
    from pipeline.groups import ungroup
    from pipeline.preprocess import Preprocess

    rows = [{"id": "q1", "image": png("red"), "question": "Which colour?", "hint": "A flag.", "A": "red",
             "B": "blue", "C": "green", "D": None, "answers": "A"},
            {"id": "q2", "image": png("blue"), "question": "Which shape?", "hint": None, "A": "circle",
             "B": "square", "C": None, "D": "nan", "answers": "B"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmbench_dev.parquet")
    args = job.parse_args(["--input", str(tmp_path / "mmbench_dev.parquet"), "--model", str(checkpoint)])
    config, _ = job.model_run_config(args)
    assert (config.option_columns, config.hint_column) == (["A", "B", "C", "D"], "hint")
    table = pa.Table.from_pylist(rows)
    asked, _ = ungroup(Preprocess(config)(table))
    assert asked.column("question").to_pylist() == [
        "A flag. Which colour? There are several options:\nA. red\nB. blue\nC. green\n" + benchmarks.OPTION_LETTER,
        "Which shape? There are several options:\nA. circle\nB. square\n" + benchmarks.OPTION_LETTER]
    assert job.model_run_config(job.parse_args(["--input", str(tmp_path / "mmbench_dev.parquet"), "--model",
                                                str(checkpoint), "--metric", "exact_match"]))[0].option_columns == []
    assert config.keep_columns == ["answers"]       # the ground truth's options are joined by id at scoring
    pq.write_table(pa.Table.from_pylist(rows).drop_columns(["id"]), tmp_path / "mmbench_dev.parquet")
    config, _ = job.model_run_config(job.parse_args(["--input", str(tmp_path / "mmbench_dev.parquet"), "--model",
                                                     str(checkpoint)]))
    assert config.keep_columns == ["answers", "A", "B", "C", "D"]   # rows without ids carry what mmbench reads


def test_textvqas_questions_are_capitalized_as_lmms_eval_asks_them(checkpoint, tmp_path):
    from pipeline.groups import ungroup
    from pipeline.preprocess import Preprocess

    rows = [{"id": "q1", "image": png("red"), "question": "what brand is on the NASA can?", "answers": ["nasa"]}]
    for name, asked in (("textvqa_val.parquet", "What brand is on the nasa can?"),
                        ("docvqa_val.parquet", "what brand is on the NASA can?")):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / name)
        config, _ = job.model_run_config(job.parse_args(["--input", str(tmp_path / name), "--model", str(checkpoint)]))
        questions = ungroup(Preprocess(config)(pa.Table.from_pylist(rows)))[0].column("question").to_pylist()
        assert questions == [asked + benchmarks.SHORT_ANSWER], name


def mmmu_rows() -> list[dict]:
    """MMMU's layout: options as a list's text ("[]": an open question), images in image_1 ... as HF
    datasets writes them ({bytes, path}), the ground truth in `answer`."""
    image = lambda colour: {"bytes": png(colour), "path": None}     # noqa: E731
    return [{"id": "validation_Art_1", "question": "Which is <image 1> like? <image 2>", "options": "['red', 'blue']",
             "image_1": image("red"), "image_2": image("blue"), "image_3": None, "answer": "A"},
            {"id": "validation_Math_2", "question": "How many sides has <image 1>?", "options": "[]",
             "image_1": image("green"), "image_2": None, "image_3": None, "answer": "4"},
            {"id": "validation_Math_3", "question": "Which?", "options": "['1', \"it's 2\", '3']",
             "image_1": None, "image_2": None, "image_3": image("red"), "answer": "C"}]


MMMU_ASKED = ["Which is <image 1> like? <image 2>\nA. red\nB. blue\n\n" + benchmarks.OPTION_LETTER.strip(),
              "How many sides has <image 1>?\n\n" + benchmarks.SHORT_ANSWER.strip(),
              "Which?\nA. 1\nB. it's 2\nC. 3\n\n" + benchmarks.OPTION_LETTER.strip()]


def write_mmmu(path: Path) -> Path:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                        *((f"image_{k}", image) for k in (1, 2, 3)), ("answer", pa.string())])
    pq.write_table(pa.Table.from_pylist(mmmu_rows(), schema=schema), path)
    return path


def test_mmmus_options_and_image_columns_are_asked_as_lmms_eval_asks_them(checkpoint, tmp_path):
    from pipeline.groups import ungroup
    from pipeline.preprocess import Preprocess, row_encoder
    from pipeline.rows import rename_columns

    bench = write_mmmu(tmp_path / "mmmu_validation.parquet")
    config, renames = job.model_run_config(job.parse_args(["--input", str(bench), "--model", str(checkpoint),
                                                           "--answers-column", "answer"]))
    assert (config.option_list_column, config.image_columns) == ("options", ["image_1", "image_2", "image_3"])
    table = rename_columns(pq.read_table(bench), renames)       # as the job reads it
    asked, _ = ungroup(Preprocess(config)(table))
    assert asked.column("question").to_pylist() == MMMU_ASKED
    two_images = row_encoder(config, str(checkpoint)).encode_images([png("red"), png("blue")], MMMU_ASKED[0])
    assert asked.column("input_ids").to_pylist()[0] == list(two_images.input_ids)
    # lmms-eval takes the images the text names as <image N>, in the columns' order: a row holding one it
    # does not name is asked about the one it names (it was asked about both); naming none, about all
    assert config.images_named_in_text
    one_named = table.set_column(table.column_names.index("question"), "question",
                                 pa.array(["Which is like <image 2>?", "How many sides?", "Which?"]))
    asked, _ = ungroup(Preprocess(config)(one_named))
    encoder = row_encoder(config, str(checkpoint))
    assert asked.column("input_ids").to_pylist()[:2] == [
        list(encoder.encode_images([png("blue")], asked.column("question")[0].as_py()).input_ids),
        list(encoder.encode_images([png("green")], asked.column("question")[1].as_py()).input_ids)]
    asked, _ = ungroup(Preprocess(dataclasses.replace(config, images_named_in_text=False))(one_named))
    assert asked.column("input_ids").to_pylist()[0] == list(
        encoder.encode_images([png("red"), png("blue")], asked.column("question")[0].as_py()).input_ids)
    unlisted = tmp_path / "mmmu" / "validation.parquet"        # options written in the question: images all the same
    unlisted.parent.mkdir()
    pq.write_table(pq.read_table(bench).drop_columns(["options"]), unlisted)
    config = job.model_run_config(job.parse_args(["--input", str(unlisted), "--model", str(checkpoint),
                                                  "--answers-column", "answer"]))[0]
    assert (config.image_columns, config.option_list_column) == (["image_1", "image_2", "image_3"], None)
    suffixed = job.model_run_config(job.parse_args(["--input", str(bench), "--model", str(checkpoint),
                                                    "--answers-column", "answer", "--prompt-suffix", " Briefly."]))
    assert ungroup(Preprocess(suffixed[0])(table))[0].column("question").to_pylist()[:2] == [
        "Which is <image 1> like? <image 2>\nA. red\nB. blue Briefly.", "How many sides has <image 1>? Briefly."]


def test_an_mmmu_run_is_scored_by_mmmus_rules_per_subject(ray_cluster, checkpoint, tmp_path):
    from evaluation.mmmu import mmmu_score

    bench, out = write_mmmu(tmp_path / "mmmu_validation.parquet"), tmp_path / "out"
    assert job.main(["--input", str(bench), "--model", str(checkpoint), "--output", str(out),   # its own `answer`
                     "--max-new-tokens", "3"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    assert [r["question"] for r in rows] == MMMU_ASKED and summary["metric"] == "mmmu" and summary["errors"] == 0
    truth = {r["id"]: r for r in mmmu_rows()}
    assert [r["score"] for r in rows] == [mmmu_score(r["answer"], [truth[r["id"]]["answer"]],
                                                     truth[r["id"]]["options"]) for r in rows]
    assert {k: v["rows"] for k, v in summary["per_category"].items()} == {"Art": 1, "Math": 2}
    report = (out / "report.md").read_text()      # both suffixes the answers were asked with
    assert "- open question suffix: `'\\n\\nAnswer the question using a single word or phrase.'`" in report, report
    rescored = tmp_path / "rescored"        # the predictions alone carry what mmmu scores with
    assert job.main(["--predictions", str(out), "--output", str(rescored)]) == 0
    assert json.loads((rescored / "metrics.json").read_text())["score"] == summary["score"]
    # how the answers were made goes on with them: to a rescoring, one of it, and one in place (which
    # replaced the report that named them)
    made = {k: summary["sources"][k] for k in ("model", "checkpoint", "open question suffix", "settings", "replicas")}
    assert made["replicas"].endswith("x cpu float32")
    assert job.main(["--predictions", str(rescored), "--output", str(tmp_path / "again")]) == 0
    assert job.main(["--predictions", str(out), "--output", str(out)]) == 0
    for folder in (rescored, tmp_path / "again", out):
        sources = json.loads((folder / "metrics.json").read_text())["sources"]
        assert {k: sources["answers' " + k] for k in made} == made and "model" not in sources
        assert f"- answers' checkpoint: `{made['checkpoint']}`" in (folder / "report.md").read_text()


def test_a_benchmark_is_answered_with_lmms_evals_max_new_tokens_and_mmstars_questions_cleaned(checkpoint, tmp_path):
    from pipeline.groups import ungroup
    from pipeline.preprocess import Preprocess

    rows = [{"id": "q1", "image": png("red"), "question": " Is it red? Please answer yes or no.\n", "answers": "A"}]
    made = {}
    for name in ("docvqa_val", "ChartQA_test", "mmstar", "mmmu_dev", "bench"):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
        args = ["--input", str(tmp_path / f"{name}.parquet"), "--model", str(checkpoint), "--metric", "exact_match"]
        config = job.model_run_config(job.parse_args(args))[0]
        asked = ungroup(Preprocess(config)(pa.Table.from_pylist(rows)))[0].column("question").to_pylist()[0]
        made[name] = (config.max_new_tokens, asked)
        assert job.model_run_config(job.parse_args([*args, "--max-new-tokens", "7"]))[0].max_new_tokens == 7
    assert made["docvqa_val"] == (32, rows[0]["question"] + benchmarks.SHORT_ANSWER)
    assert made["ChartQA_test"] == (16, rows[0]["question"] + "\nAnswer the question with a single word.")
    assert made["mmstar"] == (1024, "Is it red?" + benchmarks.OPTION_LETTER.rstrip("."))
    assert made["mmmu_dev"][0] == 128 and made["bench"] == (64, rows[0]["question"])
