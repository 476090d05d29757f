"""jobs.caption as a user runs it: a subprocess with its own local Ray, killed with SIGKILL, then --resume."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.fixtures.checkpoints import build_checkpoint
from tests.pipeline.helpers import png, write_parquet

REPO = Path(__file__).resolve().parents[2]
N_ROWS = 14


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("smolvlm"), "smolvlm")


def caption(*args: str, log: Path, own_group: bool = False) -> subprocess.Popen:
    """The job in a subprocess, its output to a file (a full pipe would stall Ray's progress logging);
    own_group: in a process group of its own, as under a terminal or `timeout`, to be signalled as one."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "jobs.caption", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=own_group)


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    process.wait(timeout=timeout)
    return log.read_text()


def parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) if folder.exists() else []


def test_sigkill_mid_run_then_resume_gives_every_row_once(checkpoint, tmp_path):
    # No id column: ids are derived (file path + row index), so this also shows they are stable across runs.
    write_parquet(tmp_path / "in.parquet", [{"image": png(20 + i, 24, seed=i), "question": f"Row {i}?"}
                                            for i in range(N_ROWS)])
    # Files of 4 rows from blocks of 2: rows waiting for their file's other block when the run is
    # killed are answered again by the resumed run, and written once.
    (tmp_path / "job.yaml").write_text(f"model: {checkpoint}\nmax-new-tokens: 96\nbatch_size: 2\n"
                                       f"rows-per-file: 4\n")
    args = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
            "--config", str(tmp_path / "job.yaml")]
    first = caption(*args, log=tmp_path / "first.log")
    deadline = time.time() + 240
    # The files come out while rows are generated, after the actors' start: at 24 new tokens a row that
    # was the last ~0.2 s of the run (once all four files and the summary came between two polls 0.2 s
    # apart); at 96, ~1 s. Poll often too.
    while not parquet_files(tmp_path / "out") and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)  # the driver only, as `kill -9` would
    first.wait()
    assert not (tmp_path / "out.summary.json").exists(), "the first run finished before it could be killed"
    killed_with = len(parquet_files(tmp_path / "out"))
    assert 1 <= killed_with

    second = caption(*args, "--resume", log=tmp_path / "second.log")
    log = finish(second, tmp_path / "second.log")
    assert second.returncode == 0, log[-3000:]
    table = pads.dataset(tmp_path / "out").to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == N_ROWS
    assert "error" not in table.column("finish_reason").to_pylist()
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["rows"] == N_ROWS and summary["rows_this_run"] < N_ROWS
    assert printed_summary(log) == summary


def test_sigterm_then_ctrl_c_stop_the_job_in_one_line_and_a_resume_completes_it(checkpoint, tmp_path):
    """A scheduler's SIGTERM (Ray's own handler exited without a word, status 15) and Ctrl-C (a wall of
    tracebacks, status 1, as for an incomplete output): one line each, 128 + the signal; then --resume.
    Each is sent to the job's process group, as `timeout` and a terminal send them: the local cluster's
    processes took the SIGTERM too, and the job waited a minute for its GCS and ended in status 1."""
    write_parquet(tmp_path / "in.parquet", [{"image": png(20 + i, 24, seed=i), "question": f"Row {i}?"}
                                            for i in range(N_ROWS)])
    args = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--model", str(checkpoint),
            "--max-new-tokens", "96", "--batch-size", "2", "--rows-per-file", "2"]
    for signum, extra in ((signal.SIGTERM, []), (signal.SIGINT, ["--resume"])):
        before = len(parquet_files(tmp_path / "out"))
        run = caption(*args, *extra, log=tmp_path / f"{signum.name}.log", own_group=True)
        deadline = time.time() + 240
        # more files than before, not other ones: a resume's start removes a file the stopped run wrote and
        # did not commit (a signal then came during ray.init, where Python ignored Ctrl-C, and the job hung)
        while len(parquet_files(tmp_path / "out")) <= before and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(run.pid, signum)
        log = finish(run, tmp_path / f"{signum.name}.log", timeout=50)
        assert run.returncode == 128 + signum, log[-3000:]
        assert f"error: stopped by {signum.name}: the answers written are kept; the same command with --resume" in log
        assert not own_tracebacks(log) and not (tmp_path / "out.summary.json").exists()
    last = caption(*args, "--resume", log=tmp_path / "last.log")
    log = finish(last, tmp_path / "last.log")
    assert last.returncode == 0, log[-3000:]
    ids = pads.dataset(tmp_path / "out").to_table().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == N_ROWS


# Ray forwards its workers' output to the driver's, each line prefixed "(Name pid=N)" (colour codes first)
WORKER_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)?\(\S.*? pid=\d+")


def own_tracebacks(log: str) -> list[str]:
    """The job's own traceback lines, not a Ray worker's: Ray Data's file-listing task printed one of its
    threads' (an InterruptedError after its listing was done) while the run went on (CI, stop 48)."""
    return [line for line in log.splitlines() if "Traceback" in line and not WORKER_LINE.match(line)]


def printed_summary(log: str) -> dict:
    """The summary line the job prints last (Ray's log monitor may print warnings after it)."""
    for line in reversed(log.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no summary line in the job's output:\n{log[-3000:]}")


def test_clear_errors_for_bad_arguments(checkpoint, tmp_path):
    fresh = caption("--input", str(tmp_path / "nope.parquet"), "--output", str(tmp_path / "out"),
                    "--model", str(checkpoint), log=tmp_path / "a.log")
    log = finish(fresh, tmp_path / "a.log")
    assert fresh.returncode == 2 and "does not exist" in log and "Traceback" not in log
    # A mistyped --model: one line, before any cluster starts (no actor fails on it, minutes in).
    write_parquet(tmp_path / "in.parquet", [{"image": png(20, 24), "question": "Row?"}])
    typo = caption("--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                   "--model", str(tmp_path / "no-such-model"), log=tmp_path / "m.log")
    log = finish(typo, tmp_path / "m.log")
    assert typo.returncode == 2, log[-3000:]
    assert log.strip().splitlines() == [f"error: model '{tmp_path / 'no-such-model'}': no such checkpoint "
                                        "folder (nor a hub id owner/name)"]
    assert not (tmp_path / "out").exists()
    bad = caption("--storage-options", "[1]", "--model", str(tmp_path), log=tmp_path / "b.log")
    log = finish(bad, tmp_path / "b.log")
    assert bad.returncode == 2 and "--storage-options must be a JSON object" in log


def test_a_missing_path_of_a_submitted_job_is_named_with_where_the_job_runs(checkpoint, tmp_path, monkeypatch, capsys):
    """`ray job submit --working-dir . -- python -m jobs.caption --input data/rows.parquet` reads it in Ray's copy
    of the folder on the head (tests/jobs/test_caption_submit.py submits jobs), not on the user's machine."""
    from jobs.caption import main

    (tmp_path / "_ray_pkg_1234").mkdir()
    monkeypatch.chdir(tmp_path / "_ray_pkg_1234")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert main(["--input", "data/rows.parquet", "--output", str(tmp_path / "out"), "--model", str(checkpoint)]) == 2
    assert capsys.readouterr().err == (
        "error: input 'data/rows.parquet' does not exist (a submitted job runs on the cluster's head, in Ray's copy of "
        f"its --working-dir, {tmp_path}/_ray_pkg_1234: a relative path is read there, an absolute one on the head's "
        "disk)\n")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert main(["--input", "data/rows.parquet", "--output", str(tmp_path / "out"), "--model", str(checkpoint)]) == 2
    assert capsys.readouterr().err == "error: input 'data/rows.parquet' does not exist\n"


def test_an_error_quotes_urls_without_their_secrets(checkpoint, tmp_path):
    from tests.pipeline.helpers import serve_folder

    (tmp_path / "www").mkdir()
    with serve_folder(tmp_path / "www", ranges=True) as url:
        signed = url.replace("http://", "http://alice:hunter2@") + "/gone.parquet?X-Amz-Signature=abc123&v=2"
        job = caption("--input", signed, "--output", str(tmp_path / "out"), "--model", str(checkpoint),
                      log=tmp_path / "job.log")
        log = finish(job, tmp_path / "job.log")
    assert job.returncode == 2, log[-3000:]
    assert "does not exist" in log and "gone.parquet?X-Amz-Signature=***&v=***" in log
    assert "hunter2" not in log and "abc123" not in log


def refuses_writes(folder: str) -> bool:
    try:
        Path(folder, "idefics3-write-probe").write_text("")
    except PermissionError:
        return True
    except OSError:
        return False
    Path(folder, "idefics3-write-probe").unlink()
    return False


@pytest.mark.skipif(not refuses_writes("/sys"), reason="needs a folder that refuses writes, even to root (/sys)")
def test_an_output_that_cannot_be_written_is_one_line(checkpoint, tmp_path):
    write_parquet(tmp_path / "in.parquet", [{"image": png(20, 24), "question": "Row?"}])
    job = caption("--input", str(tmp_path / "in.parquet"), "--output", "/sys/answers", "--model", str(checkpoint),
                  log=tmp_path / "job.log")
    log = finish(job, tmp_path / "job.log")
    assert job.returncode == 2, log[-3000:]
    assert log.strip().splitlines() == ["error: output '/sys/answers' cannot be written: [Errno 13] Permission "
                                        "denied: '/sys/answers.lock'"]


def test_flags_reach_the_pipeline_config(tmp_path):
    from jobs.caption import DEFAULTS, parse_args, pipeline_config
    from jobs.common import merge_args

    (tmp_path / "job.yaml").write_text("fetch-threads: 4\nrows-per-file: 50\n")
    args = parse_args(["--model", "m", "--top-k", "5", "--image-root", "s3://b/imgs", "--fetch-attempts", "2",
                       "--fetch-timeout", "7.5", "--rows-per-file", "20", "--step-timeout", "0", "--dtype", "float16",
                       "--repetition-penalty", "1.2", "--image-longest-edge", "728", "--no-image-splitting",
                       "--system-prompt", "Be brief.", "--logprobs", "--stop", ".", "--stop", "\n", "--no-compile",
                       "--choice", "yes", "--choice", "no", "--choices-column", "labels", "--adapter", "s3://b/lora",
                       "--config", str(tmp_path / "job.yaml")])
    config = pipeline_config(merge_args(args, DEFAULTS))
    assert (config.top_k, config.image_root, config.fetch_attempts, config.fetch_timeout_s) == (5, "s3://b/imgs", 2, 7.5)
    assert (config.fetch_threads, config.rows_per_file) == (4, 20)             # flag > job.yaml > default
    assert (config.replicas, config.cpu_workers) == (None, None)                # sized from the cluster
    assert config.step_timeout_s == 0                                           # no watchdog
    assert config.compile_decode is False
    assert (config.dtype, config.repetition_penalty) == ("float16", 1.2)
    assert config.image_settings() == {"size": {"longest_edge": 728}, "do_image_splitting": False}
    assert config.system_prompt == "Be brief." and config.logprobs and config.stop == [".", "\n"]
    assert config.choices == ["yes", "no"] and config.choices_column == "labels"
    assert config.adapter == "s3://b/lora"
    assert not pipeline_config(merge_args(parse_args([]), DEFAULTS)).logprobs
    assert pipeline_config(merge_args(parse_args([]), DEFAULTS)).compile_decode is None     # the engine's default
    columns = pipeline_config(merge_args(parse_args(["--image-column", "jpg", "--question-column", "query",
                                                     "--prompt-suffix", " One word.", "--id-column", "key"]), DEFAULTS))
    assert (columns.image_column, columns.question_column, columns.prompt_suffix) == ("jpg", "query", " One word.")
    assert columns.id_column == "key"
    listed = pipeline_config(merge_args(parse_args(["--image-columns", "left, right", "--option-list-column", "opts",
                                                    "--open-question-suffix", " Briefly."]), DEFAULTS))
    assert (listed.image_sources(), listed.option_list_column, listed.open_question_suffix) == (
        ["left", "right"], "opts", " Briefly.")
    (tmp_path / "lists.yaml").write_text("image_columns: [left, right]\n")
    assert pipeline_config(merge_args(parse_args(["--config", str(tmp_path / "lists.yaml")]),
                                      DEFAULTS)).image_columns == ["left", "right"]
    assert merge_args(parse_args(["--limit", "100"]), DEFAULTS)["limit"] == 100      # run_job's, not the config's
    assert pipeline_config(merge_args(parse_args([]), DEFAULTS)).image_settings() == {}    # the checkpoint's
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        pipeline_config(merge_args(parse_args(["--repetition-penalty", "0"]), DEFAULTS))
    penalized = pipeline_config(merge_args(parse_args(["--presence-penalty", "1.5", "--frequency-penalty", "-0.5"]),
                                           DEFAULTS))
    assert (penalized.presence_penalty, penalized.frequency_penalty) == (1.5, -0.5)
    with pytest.raises(ValueError, match=r"frequency_penalty must be in \[-2, 2\]"):     # vLLM's range
        pipeline_config(merge_args(parse_args(["--frequency-penalty", "2.5"]), DEFAULTS))
    with pytest.raises(ValueError, match="beam search cannot be combined with presence_penalty"):
        pipeline_config(merge_args(parse_args(["--presence-penalty", "1", "--num-beams", "2"]), DEFAULTS))
    with pytest.raises(ValueError, match="dtype must be one of bfloat16, float16, float32, got 'fp8'"):
        pipeline_config(merge_args(parse_args(["--dtype", "fp8"]), DEFAULTS))
    with pytest.raises(ValueError, match="device must be cpu or cuda, got 'tpu'"):    # (an actor's traceback)
        pipeline_config(merge_args(parse_args(["--device", "tpu"]), DEFAULTS))
    with pytest.raises(ValueError, match="top_k must be >= 0"):         # else every row an error row
        pipeline_config(merge_args(parse_args(["--top-k", "-1"]), DEFAULTS))
    with pytest.raises(ValueError, match="max_image_pixels must be >= 1"):
        pipeline_config(merge_args(parse_args(["--max-image-pixels", "0"]), DEFAULTS))
    with pytest.raises(ValueError, match="max_image_bytes must be >= 1"):
        pipeline_config(merge_args(parse_args(["--max-image-bytes", "0"]), DEFAULTS))
    assert pipeline_config(merge_args(parse_args(["--max-image-bytes", "1000"]), DEFAULTS)).max_image_bytes == 1000


def test_regex_and_json_schema_flags(tmp_path):
    from jobs.caption import DEFAULTS, parse_args, pipeline_config
    from jobs.common import merge_args

    config = lambda *flags: pipeline_config(merge_args(parse_args(["--model", "m", *flags]), DEFAULTS))  # noqa: E731
    assert config("--regex", "[0-9]+").regex == "[0-9]+"
    assert config("--prompt-template", "Alt text: {alt}.").template_columns() == ["alt"]
    assert config("--choice", "yes", "--choice", "no", "--choice-logprobs").choice_logprobs
    assert config("--samples", "4", "--temperature", "0.7").samples == 4
    assert config("--sampling-column", "params").sampling_column == "params"
    assert config("--score-column", "caption").score_column == "caption"
    assert config("--top-logprobs", "5").top_logprobs == 5
    assert config("--no-repeat-ngram-size", "3").no_repeat_ngram_size == 3
    assert config("--min-p", "0.05", "--temperature", "1").min_p == 0.05
    assert config("--min-new-tokens", "5").min_new_tokens == 5
    cut = config("--typical-p", "0.9", "--epsilon-cutoff", "3e-4", "--eta-cutoff", "2e-3", "--temperature", "1")
    assert (cut.typical_p, cut.epsilon_cutoff, cut.eta_cutoff) == (0.9, 3e-4, 2e-3)
    assert config("--bad-words", "The image shows", "--bad-words", "photo").bad_words == ["The image shows", "photo"]
    searched = config("--num-beams", "4", "--length-penalty", "0.5", "--samples", "2", "--early-stopping", "never")
    assert (searched.num_beams, searched.length_penalty, searched.samples, searched.early_stopping) == (4, 0.5, 2,
                                                                                                        "never")
    assert config("--num-beams", "2", "--early-stopping", "True").early_stopping is True
    assert config("--messages-column", "messages").messages_column == "messages"
    with pytest.raises(ValueError, match="samples=4 greedy answers"):
        config("--samples", "4")
    (tmp_path / "schema.json").write_text('{\n  "type": "object",\n  "properties": {"n": {"type": "integer"}}\n}')
    from_file = config("--json-schema", str(tmp_path / "schema.json")).json_schema
    assert from_file == config("--json-schema", '{"type": "object", "properties": {"n": {"type": "integer"}}}').json_schema
    assert json.loads(from_file) == {"type": "object", "properties": {"n": {"type": "integer"}}}
    with pytest.raises(ValueError, match="neither a schema's JSON text nor a readable file"):
        config("--json-schema", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="choices and regex are two ways"):
        config("--regex", "a", "--choice", "a")


def test_the_printed_summary_names_what_the_run_took_shared_and_retried(capsys):
    from jobs.common import print_summary

    summary = {"rows": 10, "input_rows": 10, "error_rows": 1, "rows_this_run": 4, "wall_s": 2.0, "rows_per_s": 2.0,
               "generated_tokens_per_s": 30.0, "missing_rows": 0, "duplicate_rows": 0, "shared_answer_rows": 3,
               "shared_answer_tokens": 12, "error_rows_answered_again": 2,
               "settings_from_generation_config": {"temperature": 0.6, "top_k": 50}}
    assert print_summary(summary)
    out = capsys.readouterr().out
    assert "decoding took from the generation config: temperature=0.6, top_k=50" in out
    assert "3 rows asked a question already asked" in out
    assert "2 error rows of the earlier run were answered again (1 error rows now)" in out


@pytest.mark.parametrize("text, message", [
    ("temperature: hot", "temperature: 'hot' is not a number, as --temperature takes"),
    ("max_new_tokens: 2.5", "max_new_tokens: 2.5 is not an integer"), ("resume: 'false'", "is not true or false"),
    ("stop: 5", "stop: 5 is not a text or a list of texts"), ("choices: [yes, no]", "quote them"),
    ("storage_options: [1]", "--storage-options must be a JSON object"), ("max_new_tokens: [4", "is not YAML"),
    # YAML reads an unquoted template as a mapping, and a list where a text is due: tracebacks, they were
    ("prompt_template: {question}", "prompt_template: {'question': None} is not a text (YAML reads {question} as a "
                                    "mapping: quote it)"), ("prompt_suffix: [a]", "prompt_suffix: ['a'] is not a text"),
])
def test_a_job_yamls_values_are_typed_as_its_flags(tmp_path, capsys, text, message):
    """job.yaml's values go through the flags' types (a word for a number was a traceback; 2.5 for
    top_k or seed made every row an error row): a bad one is the job's one-line error, exit 2."""
    from jobs.caption import main

    (tmp_path / "job.yaml").write_text(text + "\n")
    assert main(["--model", "m", "--config", str(tmp_path / "job.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_a_job_yamls_values_take_their_flags_forms(tmp_path):
    from jobs.caption import DEFAULTS, build_parser, pipeline_config
    from jobs.common import merge_args

    (tmp_path / "job.yaml").write_text("limit: '3'\ntemperature: 1\nearly_stopping: true\nkeep_columns: [a, b]\n"
                                       "storage_options: {anon: true}\nmax_new_tokens: null\nbatch_size: null\n"
                                       "json_schema: {type: object, properties: {a: {type: integer}}}\n")
    parser = build_parser()
    values = merge_args(parser.parse_args(["--config", str(tmp_path / "job.yaml")]), DEFAULTS, parser)
    assert (values["limit"], values["temperature"], values["early_stopping"]) == (3, 1.0, True)
    assert values["keep_columns"] == ["a", "b"] and values["storage_options"] == {"anon": True}
    config = pipeline_config({**values, "model": "m"})      # null: the default (a TypeError traceback, it was);
    assert (config.max_new_tokens, config.batch_size) == (DEFAULTS["max_new_tokens"], DEFAULTS["batch_size"])
    assert json.loads(config.json_schema)["properties"] == {"a": {"type": "integer"}}     # a mapping: a schema


@pytest.mark.parametrize("text, expected", [
    ("step-timeout: 30\nfetch-timeout: 5", {"step_timeout_s": 30.0, "fetch_timeout_s": 5.0}),
    ("choice: [A, B]", {"choices": ["A", "B"]}),
    ("no-image-splitting: true\nno-compile: true", {"image_splitting": False, "compile_decode": False}),
    ("compile: true\nimage_splitting: true", {"compile_decode": True, "image_splitting": True}),
    ("no-image-splitting: false", {"image_splitting": True}),
])
def test_a_job_yamls_keys_may_be_spelled_as_the_flags(tmp_path, text, expected):
    """`--config`'s help says "any of the flags above": flags whose setting has another name were refused
    as unknown keys (step-timeout sets step_timeout_s, --choice appends to choices, --no-compile)."""
    from jobs.caption import DEFAULTS, build_parser
    from jobs.common import merge_args

    (tmp_path / "job.yaml").write_text(text + "\n")
    parser = build_parser()
    values = merge_args(parser.parse_args(["--config", str(tmp_path / "job.yaml")]), DEFAULTS, parser)
    assert {key: values[key] for key in expected} == expected


def test_an_unknown_job_yaml_key_names_the_flags_it_may_mean(tmp_path, capsys):
    from jobs.caption import main

    (tmp_path / "job.yaml").write_text("step_timout: 30\n")
    assert main(["--model", "m", "--config", str(tmp_path / "job.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "unknown keys in" in (err := capsys.readouterr().err) and "did you mean step_timeout" in err


def test_the_demo_run_again_starts_its_own_output_over(tmp_path, monkeypatch, capsys):
    """`python -m jobs.caption` a second time (after `make demo`) was refused: its output held the
    first run's files. Like jobs.evaluate's demo, it starts over unless told to resume."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import jobs.caption as job

    demo_output = tmp_path / "captions"
    demo_output.mkdir()
    pq.write_table(pa.table({"id": ["x"], "answer": ["an earlier answer"]}), demo_output / "part-0.parquet")
    monkeypatch.setattr(job, "DEMO_OUTPUT", demo_output)
    assert job.main(["--dry-run", "1"]) == 0
    assert job.main(["--dry-run", "1", "--output", str(demo_output)]) == 2      # an output of the user's: kept
    assert "already holds" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a machine with a GPU has one for --device cuda")
def test_device_cuda_on_a_local_cluster_without_gpus_is_refused_at_once(checkpoint, tmp_path):
    """Its replicas asked Ray for a GPU and waited for ever (the autoscaler's 'No available node types').
    Refused before the output is prepared and before a cluster starts (it was refused ~40 s in)."""
    write_parquet(tmp_path / "in.parquet", [{"image": png(24, 24), "question": "Row?"}])
    log = tmp_path / "log.txt"
    process = caption("--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--model",
                      str(checkpoint), "--device", "cuda", log=log)
    text = finish(process, log, timeout=120)
    assert process.returncode == 2 and "--device cuda: this machine has no GPU that Ray sees" in text, text[-3000:]
    assert not (tmp_path / "out").exists() and "Ray" not in text.replace("that Ray sees", ""), text[-3000:]


def test_a_settings_error_names_its_flag(capsys):
    """The library's messages name a setting as its config field (max_new_tokens); on the command line
    the job names its flag."""
    from jobs import caption, evaluate

    for main, argv, line in [
            (caption.main, ["--limit", "0"], "error: --limit must be >= 1, got 0"),
            (caption.main, ["--max-new-tokens", "-1"], "error: --max-new-tokens must be >= 1, got -1"),
            (caption.main, ["--frequency-penalty", "3"],
             "error: --frequency-penalty must be in [-2, 2] (0: none), got 3.0"),
            (evaluate.main, ["--num-beams", "0"], "error: --num-beams must be >= 1, got 0")]:
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == line


def test_a_stop_while_the_job_imports_its_pipeline_is_one_line(monkeypatch, capsys):
    """The job's first 1-2.5 s import pyarrow, Ray Data and the pipeline: a SIGTERM then was a silent death
    (status -15), a Ctrl-C a traceback. Here the import meets the stop itself."""
    import importlib.abc

    import jobs.caption
    from jobs.common import STOP_SIGNALS, Interrupted

    class StopOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "pipeline.job":
                raise Interrupted(signal.SIGTERM)

    monkeypatch.delitem(sys.modules, "pipeline.job", raising=False)
    monkeypatch.setattr(sys, "meta_path", [StopOnImport(), *sys.meta_path])
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        assert jobs.caption.main(["--input", "x.parquet"]) == 128 + signal.SIGTERM
    finally:        # the job ignores later signals, and sets its own: this process's are pytest's
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert capsys.readouterr().err.startswith("error: stopped by SIGTERM")


def test_an_empty_input_is_answered_at_once_into_an_empty_output(checkpoint, tmp_path, capsys):
    """A shard of no rows started a cluster and its actors (~1 min) and left no output folder, which its
    readers (pd.read_parquet of every shard's output) then failed on."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    import jobs.caption as job

    ray.shutdown()      # a cluster another module of this process left
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "question": pa.array([], pa.string())}),
                   tmp_path / "in.parquet")
    out = tmp_path / "out"
    assert job.main(["--input", str(tmp_path / "in.parquet"), "--output", str(out), "--model", str(checkpoint)]) == 0
    assert not ray.is_initialized()
    assert out.is_dir() and pq.read_table(out).num_rows == 0
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert (summary["input_rows"], summary["rows"], summary["missing_rows"]) == (0, 0, 0)
    assert "rows 0 of 0 input rows (0 errors)" in capsys.readouterr().out


def test_a_replica_killed_whenever_it_loads_the_model_ends_the_job_in_one_line(checkpoint, tmp_path):
    """A model too big for the node's memory: Ray restarted its OOM-killed replica for ever (33 times a
    minute), the job saying nothing. The start after LOAD_DEATHS deaths refuses, and the job ends naming why."""
    from pipeline.faults import CRASH_ON_LOAD_ENV
    from pipeline.ledger import LOAD_DEATHS_ENV, ROOT_ENV

    write_parquet(tmp_path / "in.parquet", [{"image": png(24, 24), "question": "Row?"}])
    faults = {CRASH_ON_LOAD_ENV: "1", LOAD_DEATHS_ENV: "2", ROOT_ENV: str(tmp_path / "ledgers")}    # 3: more time
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **faults)
    done = subprocess.run([sys.executable, "-m", "jobs.caption", "--input", str(tmp_path / "in.parquet"), "--output",
                           str(tmp_path / "out"), "--model", str(checkpoint)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: the run's Generate actors could not start: RuntimeError: this actor's process died each time it "
        "loaded the model (2 times; killed:"), done.stderr[-3000:]


def test_the_rows_shown_are_escaped_and_cut(tmp_path, capsys):
    """An id's control sequences reached the terminal raw (a forged line); a 100 MB question was printed whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.caption import print_rows

    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"id": ["\x1b]0;owned\x07\r[ok]"], "question": ["q" * 10_000], "answer": ["a"],
                             "finish_reason": ["stop"], "error": pa.array([None], pa.string())}),
                   tmp_path / "out" / "part.parquet")
    print_rows(str(tmp_path / "out"), {}, 5)
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\r" not in printed and "\\x1b]0;owned" in printed
    assert len(printed) < 1000 and "(10002 characters)" in printed


def test_a_local_output_is_made_absolute(tmp_path, monkeypatch):
    """`--output .` put what is kept beside an output inside it (`..summary.json`, `..checkpoint`, `..lock`),
    and `--output=~/out` (a `~` the shell leaves) made a folder named `~`; a job.yaml's output too."""
    from jobs import caption, evaluate
    from jobs.common import DEMO_MODEL, merge_args
    from pipeline.config import PipelineConfig
    from pipeline.job import prepare_job

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "job.yaml").write_text("output: ~/from-yaml/\n")
    for parser in (caption.build_parser(), evaluate.build_parser()):
        for given, expected in ((".", tmp_path / "work"), ("~/out/", tmp_path / "home" / "out"),
                                ("answers/", tmp_path / "work" / "answers"), ("s3://b/out/", "s3://b/out/")):
            assert parser.parse_args(["--output", given]).output == str(expected)
    parser = caption.build_parser()
    values = merge_args(parser.parse_args(["--config", str(tmp_path / "job.yaml")]), caption.DEFAULTS, parser)
    assert values["output"] == str(tmp_path / "home" / "from-yaml")
    write_parquet(tmp_path / "in.parquet", [{"image": png(24, 24), "question": "Row?"}])
    job = prepare_job(str(tmp_path / "in.parquet"), "./out/", PipelineConfig(model=str(DEMO_MODEL)))  # as a library
    try:
        assert job.output_uri == str(tmp_path / "work" / "out") and (tmp_path / "work" / "out.lock").exists()
    finally:
        job.output_lock.release()
