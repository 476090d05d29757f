"""The whole graph on a real local Ray cluster: answers equal the reference's, bad rows become error rows."""
import base64
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.engine.prefix_cache import MIN_SHARED_TEXT
from pipeline import PipelineConfig, read_output, run_job
from tests.pipeline.helpers import good_rows, png, serve_folder, started_actors, write_parquet

MAX_NEW = 6


def bad_rows() -> list[dict]:
    return [
        {"id": "undecodable", "image": b"\x89PNG\r\n\x1a\n-truncated", "question": "What?"},
        {"id": "html-page", "image": b"<!doctype html><title>403 Forbidden</title>", "question": "What?"},
        {"id": "null-image", "image": None, "question": "What?"},
        {"id": "oversized", "image": png(120, 100, seed=9), "question": "What?"},
        {"id": "too-long", "image": png(20, 20), "question": "red green blue yellow " * 1200},
        {"id": "image-tag", "image": png(20, 20), "question": "Where is <image> the star?"},
    ]


def questions_about_one_image() -> list[dict]:
    """Rows of one image (the engine encodes it once: Preprocess gives them one image_key)."""
    image = png(41, 23, seed=12)
    return [{"id": f"same-image-{i}", "image": image, "question": q}
            for i, q in enumerate(["What is in the image?", "Which colour is the star?", None])]


@pytest.fixture(scope="module")
def run(ray_cluster, checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    rows = good_rows(6) + questions_about_one_image() + bad_rows()
    for i, row in enumerate(rows):
        row["extra"] = i
        row["notes"] = i if i < 8 else f"note {i}"      # a column the run does not use: not read (its
    write_parquet(tmp / "in" / "part-0.parquet", rows[:8])  # two types would fail Ray Data's read)
    write_parquet(tmp / "in" / "part-1.parquet", rows[8:])
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW, batch_size=3, keep_columns=["extra"],
                            max_image_pixels=100 * 100)
    summary = run_job(str(tmp / "in"), str(tmp / "out"), config)
    table = read_output(str(tmp / "out"))
    return rows, {r["id"]: r for r in table.to_pylist()}, table, summary, tmp


@dataclass(frozen=True)
class FinishedRun:
    folder: Path            # in.parquet, and out* as the run wrote them
    config: PipelineConfig
    summary: dict

    def copy(self, tmp_path: Path) -> tuple[str, Path]:
        """(its input, a copy of its output folder with the files the run wrote beside it)."""
        for written in self.folder.glob("out*"):
            (shutil.copytree if written.is_dir() else shutil.copy)(written, tmp_path / written.name)
        return str(self.folder / "in.parquet"), tmp_path / "out"


@pytest.fixture(scope="module")
def finished(ray_cluster, checkpoint, tmp_path_factory) -> FinishedRun:
    """A finished run of 4 rows (r0..r3) in 2 files of 2, which tests damage and resume in copies."""
    tmp = tmp_path_factory.mktemp("finished")
    write_parquet(tmp / "in.parquet", [{"id": f"r{i}", "image": png(20, 20, seed=i)} for i in range(4)])
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=2, batch_size=2, rows_per_file=2)
    return FinishedRun(tmp, config, run_job(str(tmp / "in.parquet"), str(tmp / "out"), config))


def test_every_id_exactly_once_with_output_schema(run):
    rows, by_id, table, _, _ = run
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert table.column_names == ["id", "question", "answer", "finish_reason", "error", "num_prompt_tokens",
                                  "num_generated_tokens", "extra"]
    assert all(by_id[r["id"]]["extra"] == r["extra"] for r in rows)
    assert len(list((run[4] / "out").glob("*.parquet"))) == 1      # blocks of 3 rows, one file (rows_per_file)


def test_answers_equal_greedy_generate_of_each_row_alone(run, oracle):
    rows, by_id, _, _, _ = run
    for row in good_rows(6) + questions_about_one_image():
        question = row["question"] or PipelineConfig.prompt
        text, n = oracle.answer(row["image"], question, MAX_NEW)
        got = by_id[row["id"]]
        assert (got["answer"], got["num_generated_tokens"]) == (text, n), row["id"]
        assert got["finish_reason"] == ("length" if n == MAX_NEW else "stop")
        assert got["question"] == question and got["error"] is None


@pytest.mark.parametrize("row_id, cause", [
    ("undecodable", "ImageDecodeError: corrupt PNG image header"),
    ("html-page", "NotAnImageError: not an image: an HTML page"),
    ("null-image", "image is null"), ("oversized", "ImageTooLargeError"),
    ("too-long", "context"), ("image-tag", "<image>"),
])
def test_bad_rows_become_error_rows(run, row_id, cause):
    got = run[1][row_id]
    assert got["finish_reason"] == "error" and got["answer"] is None
    assert cause in got["error"]


def test_summary_printed_and_written_beside_the_output(run):
    rows, _, _, summary, tmp = run
    on_disk = json.loads((tmp / "out.summary.json").read_text())
    assert on_disk == summary
    assert summary["rows"] == summary["rows_this_run"] == summary["input_rows"] == len(rows)
    assert summary["missing_rows"] == summary["duplicate_rows"] == 0
    assert summary["error_rows"] == len(bad_rows())
    assert summary["errors_by_kind"] == {"preprocess: PromptError": 2, "preprocess: ImageDecodeError": 1,
                                         "preprocess: NotAnImageError": 1, "read image: image is null": 1,
                                         "preprocess: ImageTooLargeError": 1}
    assert summary["generated_tokens_this_run"] > 0 and summary["rows_per_s"] > 0
    assert summary["shared_answer_rows"] == summary["shared_answer_tokens"] == 0     # no question asked twice
    assert set(summary["replicas"]) == {"cpu float32"} and sum(summary["replicas"].values()) >= 1


def test_an_input_on_an_http_server_runs_end_to_end(ray_cluster, checkpoint, oracle, tmp_path):
    """Parquet over HTTP (a server that honours ranged reads): Ray Data's reads, the footers and the
    id check all go through it; the answers are the reference's. The URL is a pre-signed one with a
    password: its `?` is a query, not a wildcard, and no file the run writes holds its secrets."""
    rows = good_rows(2)
    write_parquet(tmp_path / "www" / "rows.parquet", rows)
    with serve_folder(tmp_path / "www", ranges=True) as url:
        signed = url.replace("http://", "http://alice:hunter2@") + "/rows.parquet?X-Amz-Signature=abc123&v=2"
        summary = run_job(signed, str(tmp_path / "out"), PipelineConfig(model=str(checkpoint), max_new_tokens=3))
    assert (summary["rows"], summary["error_rows"], summary["missing_rows"]) == (2, 0, 0)
    assert summary["input"].endswith("/rows.parquet?X-Amz-Signature=***&v=***")
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "www" not in p.parts]
    assert not any(secret in data for data in written for secret in (b"hunter2", b"abc123"))
    by_id = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    for row in rows:
        assert by_id[row["id"]]["answer"] == oracle.answer(row["image"], row["question"], 3)[0]


def test_a_resume_answers_again_the_rows_of_a_lost_output_file(finished, tmp_path, capsys):
    """An output file lost after its rows were checkpointed (deleted by hand, a bucket lifecycle
    rule): a resume takes its ids out of the checkpoint and answers them again, the other file's rows
    not; a file copied twice shows in the summary as duplicates, and jobs.caption exits 1 on it."""
    from jobs.common import print_summary

    assert print_summary(finished.summary)
    source, out = finished.copy(tmp_path)
    config = finished.config
    files = sorted(out.glob("*.parquet"))
    assert len(files) == 2
    lost = set(pq.read_table(files[0]).column("id").to_pylist())
    files[0].unlink()
    summary = run_job(source, str(out), config, resume=True)
    assert (summary["input_rows"], summary["rows"], summary["missing_rows"], summary["duplicate_rows"]) == (4, 4, 0, 0)
    assert summary["rows_this_run"] == summary["lost_rows_answered_again"] == 2
    new = set(out.glob("*.parquet")) - set(files)
    assert {i for f in new for i in pq.read_table(f).column("id").to_pylist()} == lost
    shutil.copy(files[1], out / "copy.parquet")
    summary = run_job(source, str(out), config, resume=True)
    assert (summary["rows"], summary["missing_rows"], summary["duplicate_rows"], summary["rows_this_run"]) == (6, 0, 2, 0)
    assert not print_summary(summary) and "2 output rows repeat an id" in capsys.readouterr().err


def test_a_resume_of_a_finished_output_starts_no_actor(finished, tmp_path, capsys):
    """Every input id written: the resume found nothing to do only after a cluster and its actors had
    started (70-140 s). Its ids are counted on the driver, which reads them for the checks anyway."""
    import ray

    import jobs.caption as job

    source, out = finished.copy(tmp_path)
    actors = len(ray._private.state.actors())
    assert job.main(["--input", source, "--output", str(out), "--model", finished.config.model, "--max-new-tokens",
                     "2", "--batch-size", "2", "--rows-per-file", "2", "--resume"]) == 0
    assert len(ray._private.state.actors()) == actors
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert (summary["input_rows"], summary["rows"], summary["missing_rows"], summary["rows_this_run"]) == (4, 4, 0, 0)
    assert "rows 4 of 4 input rows" in capsys.readouterr().out


def test_a_limited_trial_run_then_resumes_complete_it(ray_cluster, checkpoint, tmp_path):
    """--limit N answers the first N rows (a trial before the whole dataset) and reconciles against
    those; a resume answers the rest, each row once. A resume with a limit is refused (Ray Data
    would apply it before skipping the rows already written). The ids are another column's
    (--id-column: integers here, beside an `id` column that is not them)."""
    from jobs.common import print_summary

    write_parquet(tmp_path / "in.parquet", [{"id": "same", "question_id": 100 + i, "image": png(20, 20, seed=i)}
                                            for i in range(5)])
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=2, batch_size=2, id_column="question_id")
    source, out = str(tmp_path / "in.parquet"), str(tmp_path / "out")
    counts, readers = [], started_actors("FooterReader")
    for resume, limit in [(False, 2), (True, None)]:
        summary = run_job(source, out, config, resume=resume, limit=limit)
        assert print_summary(summary) and summary["missing_rows"] == summary["duplicate_rows"] == 0
        counts.append((summary["input_rows"], summary["rows"], summary["rows_this_run"]))
    assert counts == [(2, 2, 2), (5, 5, 3)]
    # one footer reader for the one input file each run, one for the resume's checkpoint (Ray Data's 32 each)
    assert started_actors("FooterReader") - readers == 3 and "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS" not in os.environ
    assert sorted(read_output(out).column("id").to_pylist()) == [100 + i for i in range(5)]
    with pytest.raises(ValueError, match="limit is for a fresh run"):
        run_job(source, out, config, resume=True, limit=1)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        run_job(source, str(tmp_path / "other"), config, limit=0)


def test_fresh_run_refuses_a_written_output(run, checkpoint):
    tmp = run[4]
    with pytest.raises(FileExistsError, match="--resume"):
        run_job(str(tmp / "in"), str(tmp / "out"), PipelineConfig(model=str(checkpoint)))


SYSTEM_PROMPT = ("Answer in one short sentence. Name the shapes you see, their colours, how many there are and "
                 "where they lie in the picture; say nothing that the picture does not show.")


def test_the_model_stage_applies_the_repetition_penalty_and_system_prompt(checkpoint, oracle):
    """--repetition-penalty reaches every row's request and --system-prompt its prompt: answers equal
    transformers' generate with the same repetition_penalty and system turn on each row alone (the
    model stage itself, outside Ray), the system turn prefilled once and copied to the other rows;
    --logprobs adds answer_logprob."""
    import asyncio

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, repetition_penalty=4.0,
                            system_prompt=SYSTEM_PROMPT, logprobs=True)
    rows = good_rows(3)
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    plain = [oracle.answer(r["image"], r["question"] or config.prompt, 12, system=config.system_prompt) for r in rows]
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 12, system=config.system_prompt,
                          repetition_penalty=4.0) for r in rows]
    assert want != plain
    assert [(r["answer"], r["num_generated_tokens"]) for r in answered] == want
    assert all(r["answer_logprob"] < 0 for r in answered)      # --logprobs (exact values: tests/model/test_engine.py)
    assert stage.engine.stats["prefix_tokens_reused"] >= 2 * MIN_SHARED_TEXT          # rows 2 and 3 copy row 1's


def test_the_model_stage_applies_presence_and_frequency_penalties_of_the_job_and_the_row(checkpoint, oracle):
    """--presence-penalty and --frequency-penalty reach every row's request, and a row's own settings
    override them: answers equal transformers' generate with vLLM's formula as its logits processor
    (tests.fixtures.penalties) on each row alone."""
    import asyncio

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, presence_penalty=1.5, frequency_penalty=2.0,
                            sampling_column="settings")
    rows = good_rows(3)
    for row, own in zip(rows, ['{"presence_penalty": 0, "frequency_penalty": 0}', None, '{"frequency_penalty": -1}']):
        row["settings"] = own
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    penalties = [(0.0, 0.0), (1.5, 2.0), (1.5, -1.0)]
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 12, counted=p) for r, p in zip(rows, penalties)]
    plain = [oracle.answer(r["image"], r["question"] or config.prompt, 12) for r in rows]
    assert want[0] == plain[0] and want[1:] != plain[1:]
    assert [(r["answer"], r["num_generated_tokens"]) for r in answered] == want


def test_the_model_stage_repeats_no_ngram_as_the_reference(checkpoint, oracle):
    """--no-repeat-ngram-size: answers equal transformers' generate(no_repeat_ngram_size=...) on each
    row alone (the prompt's n-grams counted)."""
    import asyncio

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, no_repeat_ngram_size=2)
    rows = good_rows(3)
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 12, no_repeat_ngram_size=2) for r in rows]
    assert want != [oracle.answer(r["image"], r["question"] or config.prompt, 12) for r in rows]
    assert [(r["answer"], r["num_generated_tokens"]) for r in answered] == want


def test_the_model_stage_ends_answers_on_stop_strings(checkpoint, oracle):
    """--stop: answers end with the token completing a stop string, as transformers'
    generate(stop_strings=...) on each row alone."""
    import asyncio

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    rows = good_rows(3)
    full = [oracle.answer(r["image"], r["question"] or PipelineConfig.prompt, 12) for r in rows]
    stop = [full[0][0][1:3]]                           # from the first answer: it ends early at least
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, stop=stop)
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 12, stop_strings=stop,
                          tokenizer=oracle.processor.tokenizer) for r in rows]
    assert [(r["answer"], r["num_generated_tokens"]) for r in answered] == want
    assert want[0][1] < full[0][1] and answered[0]["finish_reason"] == "stop"


def test_the_model_stage_reads_the_named_columns_and_adds_the_prompt_suffix(checkpoint, oracle):
    """--image-column / --question-column name the input's columns, --prompt-suffix ends every
    question (and --prompt, for rows without one): answers equal transformers' generate asked that
    text on each row alone, and the output's `question` is what the model was asked."""
    import asyncio

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    rows = [{"id": r["id"], "picture": r["image"], "query": r["question"]} for r in good_rows(3, with_questions=False)]
    rows[0]["query"] = "What shape is this?"
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, image_column="picture", question_column="query",
                            prompt_suffix=" Answer in one word.", repetition_penalty=4.0)   # answers that differ
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    asked = [(r["query"] or config.prompt) + " Answer in one word." for r in rows]
    assert [r["question"] for r in answered] == asked and rows[1]["query"] is None
    want = [oracle.answer(r["picture"], text, 12, repetition_penalty=4.0) for r, text in zip(rows, asked)]
    assert [(r["answer"], r["num_generated_tokens"]) for r in answered] == want
    unsuffixed = [oracle.answer(r["picture"], r["query"] or config.prompt, 12, repetition_penalty=4.0) for r in rows]
    assert all(a != b for a, b in zip(want, unsuffixed))


def test_a_row_whose_logits_are_not_finite_is_an_error_row_and_spoils_no_later_row(tmp_path):
    """A checkpoint whose embedding of one token is NaN (a fine-tune that diverged; float16 overflow
    does the same): the row whose question holds that token becomes an error row naming the cause,
    not noise, and the rows after it in the engine slot it held answer as transformers does."""
    import asyncio

    from safetensors.torch import load_file, save_file

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess
    from pipeline.rows import error_kind
    from tests.fixtures.checkpoints import build_checkpoint
    from tests.pipeline.helpers import Oracle

    path = build_checkpoint(tmp_path / "ckpt", "idefics3")          # untied: the LM head stays finite
    rows = good_rows(3)
    rows[0].update(image=png(70, 60, seed=5),             # the longest prompt: the later rows leave its rows behind
                   question="Does the quick brown fox jump over the lazy dog? Describe this picture in one sentence.")
    config = PipelineConfig(model=str(path), max_new_tokens=8, max_batch_size=1)     # one slot: every row reuses it
    prepared = Preprocess(config)(pa.Table.from_pylist(rows))
    ids = [prompts[0] for prompts in prepared["input_ids"].to_pylist()]     # each row's one prompt
    token = next(t for t in ids[0] if all(t not in other for other in ids[1:]))
    weights = load_file(path / "model.safetensors")
    weights["model.text_model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    stage = Generate(config)
    answered = asyncio.run(stage(prepared)).to_pylist()
    stage.loop.close()
    assert (answered[0]["finish_reason"], answered[0]["answer"]) == ("error", None)
    assert error_kind(answered[0]["error"]) == "generate: NonFiniteLogitsError"
    assert "NaN or infinite at new token 1 " in answered[0]["error"]
    oracle = Oracle(path)
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 8) for r in rows[1:]]
    assert [(r["answer"], r["num_generated_tokens"], r["error"]) for r in answered[1:]] == [(*w, None) for w in want]
    assert len(ids[0]) > max(map(len, ids[1:]))


def test_an_answer_is_cut_at_the_context_and_a_prompt_that_fills_it_is_an_error_row(checkpoint, oracle, tmp_path):
    """A row whose prompt leaves less room than --max-new-tokens answers until the context is full
    (finish_reason "length", as vLLM); it was an error row. One whose prompt fills it is an error row."""
    import asyncio
    import json
    import shutil

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    rows = good_rows(2, with_questions=False)
    rows[1]["question"] = PipelineConfig(model="").prompt + " Be very brief."
    lengths = [len(ids[0]) for ids in Preprocess(PipelineConfig(model=str(checkpoint)))(
        pa.Table.from_pylist(rows))["input_ids"].to_pylist()]
    room = lengths[1] - lengths[0]
    assert room > 0
    path = shutil.copytree(checkpoint, tmp_path / "short-context")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = lengths[1]
    (path / "config.json").write_text(json.dumps(config))
    config = PipelineConfig(model=str(path), max_new_tokens=room + 4, repetition_penalty=4.0)     # no early stop
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    want = oracle.answer(rows[0]["image"], config.prompt, room, repetition_penalty=4.0)
    assert (answered[0]["answer"], answered[0]["num_generated_tokens"]) == want and want[1] == room
    assert [r["finish_reason"] for r in answered] == ["length", "error"]
    assert answered[1]["error"] == (f"preprocess: PromptError: the prompt is {lengths[1]} tokens, which fills the "
                                    f"model's context of {lengths[1]}: no room for an answer")


@pytest.mark.parametrize("image_flags", [dict(image_longest_edge=32), dict(image_splitting=False)])
def test_fewer_tiles_an_image_answer_as_the_reference_with_those_settings(checkpoint, image_flags):
    """--image-longest-edge / --no-image-splitting: fewer image tokens a row; the answers equal
    transformers' generate after AutoProcessor.from_pretrained(path, size=..., do_image_splitting=...)."""
    import asyncio

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess
    from tests.pipeline.helpers import Oracle

    rows = good_rows(3)
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW, **image_flags)
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    oracle = Oracle(checkpoint, **config.image_settings())
    want = [oracle.answer(r["image"], r["question"] or config.prompt, MAX_NEW) for r in rows]
    assert [(r["answer"], r["num_generated_tokens"]) for r in answered] == want
    default = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW)
    plain = Preprocess(default)(pa.Table.from_pylist(rows)).column("input_ids").to_pylist()
    fewer = Preprocess(config)(pa.Table.from_pylist(rows)).column("input_ids").to_pylist()
    assert all(len(f[0]) < len(p[0]) for f, p in zip(fewer, plain))


def test_rows_of_one_image_file_share_an_image_key_and_one_encoding(checkpoint):
    import asyncio

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    config = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW)
    rows = questions_about_one_image() + good_rows(2)
    preprocess = Preprocess(config)
    tiled = []
    image_frames = preprocess.encoder.image_frames
    preprocess.encoder.image_frames = lambda data: tiled.append(data) or image_frames(data)
    encoded = preprocess(pa.Table.from_pylist(rows))
    assert encoded.column("id").to_pylist() == [[r["id"] for r in rows[:3]], [rows[3]["id"]], [rows[4]["id"]]]
    assert len(set(encoded.column("image_key").to_pylist())) == 3
    assert len(tiled) == 3                         # the shared image was decoded and tiled once
    fresh = Preprocess(config)(pa.Table.from_pylist(rows[2:3]))
    assert encoded.column("input_ids")[0][2] == fresh.column("input_ids")[0][0]
    assert encoded.column("frames")[0] == fresh.column("frames")[0]     # and travels once with its 3 rows
    stage = Generate(config)                       # the model stage itself, outside Ray
    converted = []
    to_pixels = stage.encoder.pixel_values
    stage.encoder.pixel_values = lambda frames, device: converted.append(1) or to_pixels(frames, device=device)
    answered = asyncio.run(stage(encoded)).to_pylist()
    assert [r["error"] for r in answered] == [None] * 5 and [r["id"] for r in answered] == [r["id"] for r in rows]
    assert stage.engine.stats["images_encoded"] == 3 and len(converted) == 3
    assert stage.engine.stats["prefix_tokens_reused"] > 0       # the other questions copied the image's K/V
    stage.loop.close()


def test_rows_of_several_images(ray_cluster, checkpoint, oracle, tmp_path):
    """An `image` cell that is a list (MMMU, NLVR2): the images come before the question, in order,
    as the processor's images=[[a, b]]; one missing file makes that row an error row."""
    a, b, c = png(41, 23, seed=3), png(20, 50, seed=4), png(30, 30, seed=5)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "c.png").write_bytes(c)
    A, B = {"bytes": a, "path": None}, {"bytes": b, "path": None}          # HF datasets' Sequence(Image())
    rows = [{"id": "ab", "image": [A, B], "question": "Which is larger?"},
            {"id": "ba", "image": [B, A], "question": "Which is larger?"},
            {"id": "a", "image": [A], "question": "What is it?"},
            {"id": "abc", "image": [A, B, {"bytes": None, "path": "c.png"}], "question": None},
            {"id": "missing", "image": [A, {"bytes": None, "path": "nope.png"}], "question": "What?"},
            {"id": "none", "image": [], "question": "What?"}]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    write_parquet(tmp_path / "in" / "rows.parquet", rows,
                  pa.schema([("id", pa.string()), ("image", pa.list_(struct)), ("question", pa.string())]))
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW, batch_size=4)
    run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    by_id = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    for row, images in zip(rows[:4], ([a, b], [b, a], [a], [a, b, c])):
        text, n = oracle.answer(images, row["question"] or PipelineConfig.prompt, MAX_NEW)
        assert (by_id[row["id"]]["answer"], by_id[row["id"]]["num_generated_tokens"]) == (text, n), row["id"]
    assert "nope.png" in by_id["missing"]["error"] and by_id["missing"]["finish_reason"] == "error"
    assert by_id["none"]["error"] == "read image: RowError: image list is empty"


def test_model_stage_computes_in_the_dtype_asked(checkpoint):
    """float16: the dtype of GPUs without fast bfloat16 (T4, V100); on CPU it runs the same code."""
    import asyncio

    import torch

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    config = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW, dtype="float16")
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(good_rows(2))))).to_pylist()
    stage.loop.close()
    assert stage.engine.model.dtype == torch.float16
    assert [(r["error"], r["num_generated_tokens"] > 0) for r in answered] == [(None, True)] * 2


def test_replica_dtype_is_the_one_asked_else_the_devices():
    import torch

    from pipeline.replica import replica_dtype

    assert replica_dtype(PipelineConfig(model="m"), "cpu") == torch.float32
    assert replica_dtype(PipelineConfig(model="m", dtype="bfloat16"), "cpu") == torch.bfloat16
    assert replica_dtype(PipelineConfig(model="m", tensor_parallel_size=2), "cuda") == "device"   # the ranks ask
    assert replica_dtype(PipelineConfig(model="m", tensor_parallel_size=2, dtype="float16"), "cuda") == torch.float16
    if torch.cuda.is_available():
        newer = torch.cuda.get_device_capability() >= (8, 0)
        assert replica_dtype(PipelineConfig(model="m"), "cuda") == (torch.bfloat16 if newer else torch.float16)


def test_image_struct_without_ids(ray_cluster, checkpoint, tmp_path):
    """HF datasets' Image struct (bytes, or a local path, a file: URL or a data: URL); no id column:
    ids are Ray's row hash (uint64)."""
    images = [png(20, 24, seed=1), png(26, 20, seed=2)]
    (tmp_path / "img 1.png").write_bytes(images[1])
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    inline = "data:image/png;base64," + base64.b64encode(images[0]).decode()
    paths = [str(tmp_path / "img 1.png"), str(tmp_path / "missing.png"), (tmp_path / "img 1.png").as_uri(), inline]
    rows = [{"image": {"bytes": images[0], "path": None}}] + [{"image": {"bytes": None, "path": p}} for p in paths]
    write_parquet(tmp_path / "structs" / "x.parquet", rows, pa.schema([("image", struct)]))
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=2, batch_size=1, rows_per_file=1)
    run_job(str(tmp_path / "structs" / "*.parquet"), str(tmp_path / "out1"), config)
    assert len(list((tmp_path / "out1").glob("*.parquet"))) == 5    # a file per block of one row
    structs = read_output(str(tmp_path / "out1"))
    reasons = structs.column("finish_reason").to_pylist()
    assert reasons.count("error") == 1 and "missing.png" in "".join(e for e in structs["error"].to_pylist() if e)
    assert structs.schema.field("id").type == pa.uint64() and len(set(structs["id"].to_pylist())) == 5


def test_batches_in_flight_fill_the_engine_unless_set():
    from jobs.caption import DEFAULTS, parse_args, pipeline_config
    from jobs.common import merge_args
    from pipeline import PipelineConfig
    from pipeline.replica import calls_in_flight

    assert calls_in_flight(PipelineConfig(model="m", batch_size=16, max_batch_size=64)) == 5
    assert calls_in_flight(PipelineConfig(model="m", batch_size=100, max_batch_size=64)) == 2
    config = pipeline_config(merge_args(parse_args(["--max-batch-size", "8", "--batches-in-flight", "1"]), DEFAULTS))
    assert (config.max_batch_size, config.batches_in_flight, calls_in_flight(config)) == (8, 1, 1)
    with pytest.raises(ValueError, match="batches_in_flight"):
        PipelineConfig(model="m", batches_in_flight=0)


@pytest.mark.parametrize("with_ids", [True, False])
def test_unreadable_input_files_are_refused_before_any_work(checkpoint, tmp_path, with_ids):
    """A file cut short (an interrupted upload) or another format named .parquet would fail the job
    when Ray Data reached it: every such file is named up front instead, whether or not the rows
    have ids (without them, the id check reads no file)."""
    rows = [{"id": f"r{i}", "image": png(20, 20), "question": "Colour?"} for i in range(4)]
    rows = rows if with_ids else [{k: v for k, v in r.items() if k != "id"} for r in rows]
    write_parquet(tmp_path / "in" / "a.parquet", rows[:2])
    cut = write_parquet(tmp_path / "in" / "b.parquet", rows[2:])
    cut.write_bytes(cut.read_bytes()[:300])
    (tmp_path / "in" / "notes.parquet").write_text("not parquet")
    (tmp_path / "in" / "image.png").write_bytes(png(20, 20))          # not .parquet: not read
    with pytest.raises(ValueError, match=r"2 Parquet file\(s\) cannot be read, so nothing was started") as e:
        run_job(str(tmp_path / "in"), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)))
    assert "b.parquet (" in str(e.value) and "notes.parquet (" in str(e.value) and "a.parquet" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_repeated_ids_are_refused_before_any_work(checkpoint, tmp_path):
    """Resume skips the rows of ids already written: rows sharing an id would be lost, and a null id
    fails Ray's checkpoint filter on every resume, so none may."""
    image = png(20, 20)
    rows = [{"id": i, "image": image, "question": q} for i, q in (("img-1", "Colour?"), ("img-1", "Shape?"),
                                                                  ("img-2", "Colour?"), ("img-1", "Size?"))]
    write_parquet(tmp_path / "in" / "a.parquet", rows[:2])
    write_parquet(tmp_path / "in" / "b.parquet", rows[2:])
    config = PipelineConfig(model=str(checkpoint))
    with pytest.raises(ValueError, match=r"1 ids occur more than once \(e.g. 'img-1' x3\).*unique"):
        run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    write_parquet(tmp_path / "nulls" / "a.parquet", [{"id": None, "image": image}, {"id": None, "image": image}],
                  pa.schema([("id", pa.string()), ("image", pa.binary())]))
    with pytest.raises(ValueError, match="2 rows have a null `id`"):
        run_job(str(tmp_path / "nulls"), str(tmp_path / "out"), config)
    write_parquet(tmp_path / "one_null" / "a.parquet", [{"id": None, "image": image}, {"id": "x", "image": image}],
                  pa.schema([("id", pa.string()), ("image", pa.binary())]))    # a run went through; its resumes failed
    with pytest.raises(ValueError, match="1 rows have a null `id`.*--resume"):
        run_job(str(tmp_path / "one_null"), str(tmp_path / "out"), config)
    assert not (tmp_path / "out").exists()


def test_a_smolvlm2_checkpoint_answers_as_its_idefics3_twin(ray_cluster, oracle, tmp_path):
    """model_type "smolvlm" (SmolVLM2, written by transformers' SmolVLM classes): the session
    checkpoint's weights, so the same answers as its reference's."""
    from tests.fixtures.checkpoints import build_checkpoint

    twin = build_checkpoint(tmp_path / "smolvlm2", "smolvlm", family="smolvlm")
    rows = good_rows(3)
    write_parquet(tmp_path / "in.parquet", rows)
    run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"),
            PipelineConfig(model=str(twin), max_new_tokens=MAX_NEW, batch_size=3))
    by_id = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    for row in rows:
        text, n = oracle.answer(row["image"], row["question"] or PipelineConfig.prompt, MAX_NEW)
        assert (by_id[row["id"]]["answer"], by_id[row["id"]]["num_generated_tokens"]) == (text, n), row["id"]


def test_a_resume_after_a_kill_inside_a_checkpoints_commit_loses_no_row(finished, tmp_path):
    """On an object store Ray's commit of a checkpoint (X.pending.parquet -> X.parquet) is a copy then
    a delete: killed between them, both are left. The resume finishes the move; Ray's clean-up of
    pending checkpoints removed that block's output file with it, its ids committed: rows lost."""
    from pipeline.resume import checkpoint_uri

    source, out = finished.copy(tmp_path)
    committed = sorted(p for p in Path(checkpoint_uri(str(out))).glob("*.parquet"))
    shutil.copy(committed[0], str(committed[0])[:-len(".parquet")] + ".pending.parquet")
    summary = run_job(source, str(out), finished.config, resume=True)
    assert (summary["input_rows"], summary["rows"], summary["missing_rows"]) == (4, 4, 0)


def test_a_resume_after_a_kill_inside_a_write_answers_its_rows_again(finished, tmp_path):
    """Killed while a block's file was written: its checkpoint still pending, the file cut short.
    The resume read the output (its counts, lost rows) before Ray's clean-up removed that file:
    every resume failed on it ("Parquet magic bytes not found"); a whole one was counted as written."""
    from pipeline.resume import checkpoint_uri

    source, out = finished.copy(tmp_path)
    committed = sorted(Path(checkpoint_uri(str(out))).glob("*.parquet"))
    prefix = committed[0].name[:-len(".parquet")]
    committed[0].rename(committed[0].with_name(prefix + ".pending.parquet"))
    written = [p for p in out.glob("*.parquet") if p.name.startswith(prefix)]
    assert len(written) == 1
    written[0].write_bytes(written[0].read_bytes()[:100])
    summary = run_job(source, str(out), finished.config, resume=True)
    assert (summary["rows"], summary["missing_rows"], summary["duplicate_rows"], summary["rows_this_run"]) == (4, 0, 0, 2)


def test_a_task_that_fails_mid_run_ends_it_in_one_line(ray_cluster):
    """A store failing mid-run (an S3 audit: its bucket removed, its endpoint gone) failed the write task:
    Ray's error was its remote traceback, hundreds of lines, and as its type is also its cause's, a
    FileNotFoundError or PermissionError was taken for a bad argument by the jobs (exit 2)."""
    import ray

    from pipeline.errors import RunFailed
    from pipeline.job import failures_in_one_line

    @ray.remote
    def write():
        raise FileNotFoundError("The specified bucket does not exist: s3://KEY:SECRET@failing/out")

    with pytest.raises(RunFailed) as failed:
        with failures_in_one_line():
            ray.get(write.remote())
    message = str(failed.value)
    assert not isinstance(failed.value, FileNotFoundError) and "\n" not in message
    assert message.startswith("the run failed: FileNotFoundError: The specified bucket does not exist: s3://")
    assert "SECRET" not in message and message.endswith("failing/out")


def test_an_actor_or_a_node_lost_mid_run_ends_it_in_one_line(ray_cluster):
    """A multi-node audit: a node lost as Ray Data listed the input ended the job in ~150 lines of
    UnserializableException (an error its node's death kept from being sent); an actor that died past
    its restarts (not as it started) went out as Ray's own traceback too."""
    import os

    import ray

    from pipeline.errors import RunFailed, StartFailed
    from pipeline.job import failures_in_one_line

    @ray.remote(num_cpus=0, max_restarts=0)
    class Replica:
        def answer(self):
            os._exit(1)

    with pytest.raises(RunFailed) as failed:
        with failures_in_one_line():
            ray.get(Replica.remote().answer.remote())
    assert not isinstance(failed.value, StartFailed) and "\n" not in str(failed.value)
    assert str(failed.value).startswith("the run failed: ActorDiedError: ")
    with pytest.raises(RunFailed, match=r"^the run failed: NodeDiedError: The node 10\.0\.0\.5 died\.$"):
        with failures_in_one_line():
            raise ray.exceptions.NodeDiedError("Traceback...\n  File x\nThe node 10.0.0.5 died.")
