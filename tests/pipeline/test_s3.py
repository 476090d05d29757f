"""Input and output on S3: moto's standalone server on loopback, s3fs speaking HTTP to it via AWS_ENDPOINT_URL."""
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import PipelineConfig, read_output, run_job
from tests.pipeline.helpers import Oracle, free_port, good_rows, own_cluster

MAX_NEW = 4


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    from pipeline.checkpoint import CACHE_ENV

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)    # a port no one else can take
    server.start()
    port = server.get_host_and_port()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           CACHE_ENV: str(tmp_path_factory.mktemp("checkpoint-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init: the workers inherit it
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bucket")
    yield fs
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def s3_cluster(s3):
    with own_cluster(num_cpus=4):
        yield


def test_input_output_and_model_on_s3(s3, s3_cluster, checkpoint, oracle):
    """--model s3://... too: the replica reads its node's copy (a tensor-parallel one's ranks: below)."""
    upload_checkpoint(s3, checkpoint, "bucket/models/smolvlm")
    rows = good_rows(3)
    for row in rows:  # images as s3:// URLs read through fsspec, one of them missing
        s3.pipe(f"bucket/images/{row['id']}.png", row["image"])
    relative = good_rows(4)[3]          # named relative to the input's folder
    s3.pipe("bucket/in/pictures/rel.png", relative["image"])
    table = pa.table({"id": [r["id"] for r in rows] + ["gone", "relative"],
                      "image": [f"s3://bucket/images/{r['id']}.png" for r in rows] + ["s3://bucket/images/gone.png",
                                                                                        "pictures/rel.png"],
                      "question": [r["question"] for r in rows] + ["What?", relative["question"]]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3.pipe("bucket/in/part-0.parquet", buf.getvalue())

    config = PipelineConfig(model="s3://bucket/models/smolvlm", max_new_tokens=MAX_NEW, batch_size=2)
    summary = run_job("s3://bucket/in/", "s3://bucket/out", config)
    out = {r["id"]: r for r in read_output("s3://bucket/out").to_pylist()}
    assert sorted(out) == sorted(table.column("id").to_pylist())
    for row in rows + [dict(relative, id="relative")]:
        text, n = oracle.answer(row["image"], row["question"] or config.prompt, MAX_NEW)
        assert (out[row["id"]]["answer"], out[row["id"]]["num_generated_tokens"]) == (text, n)
    assert out["gone"]["finish_reason"] == "error" and "gone.png" in out["gone"]["error"]
    assert any(p.endswith(".parquet") for p in s3.find("bucket/out"))
    assert json.loads(s3.cat("bucket/out.summary.json")) == summary and summary["error_rows"] == 1

    written = sorted(p for p in s3.find("bucket/out") if p.endswith(".parquet"))
    lost = pq.read_table(io.BytesIO(s3.cat(written[0]))).num_rows
    s3.rm(written[0])               # a lost output file: its rows are answered again on resume
    summary = run_job("s3://bucket/in/", "s3://bucket/out", config, resume=True)
    assert summary["lost_rows_answered_again"] == summary["rows_this_run"] == lost
    assert (summary["rows"], summary["missing_rows"], summary["duplicate_rows"]) == (len(out), 0, 0)


def test_an_unreadable_file_on_s3_is_named_before_any_work(s3, checkpoint):
    from pipeline.io import read_footers

    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["x"], "image": [good_rows(1)[0]["image"]]}), buf)
    s3.pipe("bucket/cut/a.parquet", buf.getvalue())
    s3.pipe("bucket/cut/b.parquet", buf.getvalue()[:100])
    footers = read_footers("s3://bucket/cut/")
    assert footers["bucket/cut/a.parquet"].num_rows == 1 and footers["bucket/cut/b.parquet"].startswith("ArrowInvalid")
    with pytest.raises(ValueError, match=r"1 Parquet file\(s\) cannot be read.*bucket/cut/b\.parquet"):
        run_job("s3://bucket/cut/", "s3://bucket/cut-out", PipelineConfig(model=str(checkpoint)))
    assert not s3.exists("bucket/cut-out")


def test_the_checks_and_the_read_fetch_only_the_columns_they_use(s3, checkpoint, monkeypatch, tmp_path):
    """Arrow asks for column chunks; fsspec's files read ahead by 50 MB blocks, so the driver's id
    check fetched most of a dataset of inline images, and the read fetched unused columns too."""
    import s3fs

    from pipeline.io import parquet_dataset
    from pipeline.job import prepare_job

    rows = [{"id": f"r{i}", "image": os.urandom(500_000), "question": "What?", "embedding": os.urandom(500_000)}
            for i in range(40)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=10)
    s3.pipe("bucket/inline/part-0.parquet", buf.getvalue())
    fetched = []
    call = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        out = await call(self, method, *args, **kwargs)
        fetched.append(out["ContentLength"] if method == "get_object" else 0)
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    job = prepare_job("s3://bucket/inline/", str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)))
    assert job.input_rows == 40 and sum(fetched) < 200_000          # footers and ids, of a 40 MB file
    fetched.clear()
    used = parquet_dataset("s3://bucket/inline/").to_table(columns=["id", "image", "question"])
    assert used.num_rows == 40 and sum(fetched) < 20_500_000        # not the 20 MB of embeddings


def upload_checkpoint(s3, folder, prefix: str) -> None:
    for file in folder.iterdir():
        s3.pipe(f"{prefix}/{file.name}", file.read_bytes())


def test_a_checkpoint_on_s3_is_copied_once_per_node_and_again_when_it_changes(s3, checkpoint):
    from pipeline.checkpoint import local_checkpoint

    upload_checkpoint(s3, checkpoint, "bucket/models/copied")
    s3.pipe("bucket/models/copied/pytorch_model.bin", b"pickle: never fetched")
    local = local_checkpoint("s3://bucket/models/copied/")
    names = sorted(p.name for p in Path(local).iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in checkpoint.iterdir())                # all but the pickle
    stamp = (Path(local) / "model.safetensors").stat().st_mtime_ns
    assert local_checkpoint("s3://bucket/models/copied") == local                 # the same copy, not fetched again
    assert (Path(local) / "model.safetensors").stat().st_mtime_ns == stamp
    s3.pipe("bucket/models/copied/generation_config.json", b'{"eos_token_id": 2, "changed": true}')
    assert local_checkpoint("s3://bucket/models/copied/") == local
    assert b"changed" in (Path(local) / "generation_config.json").read_bytes()   # rewritten remotely: copied again
    s3.pipe("bucket/models/copied/generation_config.json", b'{"eos_token_id": 2, "chAnged": true}')   # same size
    assert b"chAnged" in (Path(local_checkpoint("s3://bucket/models/copied/")) / "generation_config.json").read_bytes()
    (Path(local) / ".complete.json").write_text('{"config.json": [1')     # a marker cut short: copied again
    assert b"chAnged" in (Path(local_checkpoint("s3://bucket/models/copied/")) / "generation_config.json").read_bytes()
    with pytest.raises(FileNotFoundError, match="no checkpoint files"):
        local_checkpoint("s3://bucket/models/none/")


def test_a_checkpoint_key_that_would_leave_its_folder_is_refused(s3, checkpoint, tmp_path):
    """A key with `..` parts (S3 keeps them as they are) would be copied outside the node's cache
    (and outside the driver's temporary copy of the processor files)."""
    from model.files import CheckpointError
    from pipeline.checkpoint import local_checkpoint
    from pipeline.checks import check_row_encoding

    upload_checkpoint(s3, checkpoint, "bucket/models/escaping")
    escaped = tmp_path.relative_to("/")
    s3.pipe(f"bucket/models/escaping/{'../' * 12}{escaped}/pwned.json", b"{}")
    s3.pipe("bucket/models/escaping/../notes.md", b"not a checkpoint file: no matter")
    for check in (lambda: local_checkpoint("s3://bucket/models/escaping"),
                  lambda: check_row_encoding(PipelineConfig(model="s3://bucket/models/escaping/"))):
        with pytest.raises(CheckpointError, match=r"pwned.json' is not a plain path under"):
            check()
    assert not (tmp_path / "pwned.json").exists()


def test_a_model_url_the_actors_could_not_load_is_refused_before_any_work(s3, checkpoint):
    from model.files import CheckpointError
    from pipeline.checkpoint import check_model, generation_config_of
    from pipeline.checks import check_row_encoding

    upload_checkpoint(s3, checkpoint, "bucket/models/whole")
    check_model("s3://bucket/models/whole/")
    check_row_encoding(PipelineConfig(model="s3://bucket/models/whole/"))     # its processor files, copied
    s3.pipe("bucket/models/whole/generation_config.json", b'{"do_sample": true, "top_p": 0.8}')
    assert generation_config_of("s3://bucket/models/whole/") == {"do_sample": True, "top_p": 0.8}
    assert generation_config_of("s3://bucket/models/none/") == {}
    s3.pipe("bucket/models/whole/chat_template.jinja", b"{% for m in messages %}")
    with pytest.raises(ValueError, match="s3://bucket/models/whole/'?: its processor files cannot make a row's prompt"):
        check_row_encoding(PipelineConfig(model="s3://bucket/models/whole/"))
    upload_checkpoint(s3, checkpoint, "bucket/models/whole")
    with pytest.raises(CheckpointError, match="is not divisible by tensor_parallel_size 2"):
        check_model("s3://bucket/models/whole/", tensor_parallel_size=2)        # its config.json, read remotely
    for file in checkpoint.iterdir():           # the tokenizer forgotten in the upload
        if file.name != "tokenizer.json":
            s3.pipe(f"bucket/models/no-tokenizer/{file.name}", file.read_bytes())
    with pytest.raises(FileNotFoundError, match="'s3://bucket/models/no-tokenizer' has no tokenizer.json"):
        check_model("s3://bucket/models/no-tokenizer")
    s3.pipe("bucket/models/pickled/config.json", (checkpoint / "config.json").read_bytes())
    s3.pipe("bucket/models/pickled/pytorch_model.bin", b"pickle")
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        check_model("s3://bucket/models/pickled")
    upload_checkpoint(s3, checkpoint, "bucket/models/cut")
    s3.pipe("bucket/models/cut/model.safetensors", (checkpoint / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="s3://bucket/models/cut/model.safetensors is not a complete"):
        check_model("s3://bucket/models/cut/")                  # an upload cut short: read by ranges
    with pytest.raises(FileNotFoundError, match="no checkpoint files"):
        run_job("s3://bucket/in/", "s3://bucket/never-out", PipelineConfig(model="s3://bucket/models/typo"))
    assert not s3.exists("bucket/never-out")



def test_an_image_on_s3_is_one_ranged_get(s3):
    """s3fs asked for a whole object sends a HEAD for its size first: two round trips an image."""
    from pipeline.fetch import ImageFetcher
    from pipeline.storage import reader_fs

    s3.pipe("bucket/fetch/a.png", b"a" * 300)
    s3.pipe("bucket/fetch/b.png", b"b" * 301)
    s3.pipe("bucket/fetch/empty.png", b"")
    calls, fetcher = [], ImageFetcher(max_bytes=300, threads=24)
    fs = reader_fs("s3://bucket/fetch/a.png", fetcher.options_for("s3://bucket/fetch/a.png"))[0]
    fs.s3.meta.events.register("before-call.s3", lambda **kw: calls.append(
        kw["params"].get("headers", {}).get("Range", kw["model"].name)))
    out = fetcher.fetch([f"s3://bucket/fetch/{name}.png" for name in ("a", "b", "empty")])
    assert out[0] == b"a" * 300 and out[2] == b""       # the decoder says "image data is empty"
    assert str(out[1]) == "image file 's3://bucket/fetch/b.png' is larger than the limit of 300 bytes (max_image_bytes)"
    assert calls == ["bytes=0-300"] * 3
    assert fs.s3.meta.config.max_pool_connections == 24       # a connection a thread (botocore keeps 10)


def test_an_image_root_on_s3_must_hold_files(s3):
    from pipeline.checks import check_image_root

    s3.pipe("bucket/coco/val/0.png", b"png")
    check_image_root("s3://bucket/coco/val", None)
    with pytest.raises(FileNotFoundError, match="image root 's3://bucket/coco/value': no such folder"):
        check_image_root("s3://bucket/coco/value", None)
    with pytest.raises(ValueError, match="image root 's3://\\*\\*\\*@bucket/coco' cannot be read") as refused:
        check_image_root("s3://AKIAKEY:SECRET%2FKEY@bucket/coco", None)     # the old s3a://KEY:SECRET@ form
    assert "SECRET" not in str(refused.value) and "AKIAKEY" not in str(refused.value)


def test_a_tensor_parallel_model_on_s3(s3, s3_cluster, tmp_path):
    """--model s3://... with tensor_parallel_size 2: each rank reads its node's copy."""
    from tests.fixtures.checkpoints import build_checkpoint

    folder = build_checkpoint(tmp_path / "ckpt", "idefics3")    # heads split in 2
    upload_checkpoint(s3, folder, "bucket/models/tp2")
    rows = good_rows(3)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    s3.pipe("bucket/in-tp2/part-0.parquet", buf.getvalue())
    config = PipelineConfig(model="s3://bucket/models/tp2", max_new_tokens=MAX_NEW, batch_size=2,
                            tensor_parallel_size=2)
    run_job("s3://bucket/in-tp2/", "s3://bucket/out-tp2", config)
    out = {r["id"]: r for r in read_output("s3://bucket/out-tp2").to_pylist()}
    want = Oracle(folder)
    for row in rows:
        text, n = want.answer(row["image"], row["question"] or config.prompt, MAX_NEW)
        assert (out[row["id"]]["answer"], out[row["id"]]["num_generated_tokens"]) == (text, n), row["id"]


def test_an_evaluation_reads_and_writes_s3(s3, s3_cluster, checkpoint, oracle):
    """jobs.evaluate with its benchmark and --output on S3: the workers write the answers there
    (a local folder would be each node's own), the artefacts follow."""
    from jobs import evaluate

    rows = good_rows(3)
    truth = [[oracle.answer(rows[0]["image"], rows[0]["question"], MAX_NEW)[0]], ["zzz"], ["zzz"]]
    table = pa.table({"id": [r["id"] for r in rows], "image": [r["image"] for r in rows],
                      "question": [r["question"] or "What?" for r in rows], "answers": truth})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3.pipe("bucket/bench/part-0.parquet", buf.getvalue())
    argv = ["--input", "s3://bucket/bench/", "--model", str(checkpoint), "--output", "s3://bucket/evals/run",
            "--metric", "exact_match", "--prompt-suffix", "", "--max-new-tokens", str(MAX_NEW), "--batch-size", "2"]
    assert evaluate.main(argv) == 0
    assert sorted(p.rsplit("/", 1)[1] for p in s3.ls("bucket/evals/run")) == [
        "metrics.json", "predictions.parquet", "raw", "raw.checkpoint", "raw.run.json", "raw.summary.json",
        "report.md", "scores.png"]
    metrics = json.loads(s3.cat("bucket/evals/run/metrics.json"))
    assert (metrics["rows"], metrics["errors"], metrics["score"]) == (3, 0, round(1 / 3, 6))
    scored = pq.read_table(io.BytesIO(s3.cat("bucket/evals/run/predictions.parquet"))).to_pylist()
    assert [r["score"] for r in scored] == [1.0, 0.0, 0.0] and scored[0]["answer"] == truth[0][0]


def test_an_adapter_on_s3_is_checked_copied_and_merged(s3, s3_cluster, checkpoint, tmp_path):
    """A LoRA adapter on S3 (--adapter): checked in the driver, copied to each node and merged by the
    replicas: the model stage's answers with it, its fingerprint in the run's manifest."""
    from model.files import CheckpointError
    from pipeline.checkpoint import check_adapter
    from tests.pipeline.helpers import write_parquet
    from tests.pipeline.test_adapter import build_dora_adapter, engine_answers

    adapter = build_dora_adapter(checkpoint, tmp_path / "adapter")
    rows = good_rows(4)
    want = engine_answers(checkpoint, adapter, rows, 6)
    assert want != engine_answers(checkpoint, None, rows, 6)        # the adapter changes the answers
    upload_checkpoint(s3, adapter, "bucket/adapters/dora")
    check_adapter("s3://bucket/adapters/dora/")
    write_parquet(tmp_path / "in.parquet", rows)
    config = PipelineConfig(model=str(checkpoint), adapter="s3://bucket/adapters/dora/", max_new_tokens=6)
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert summary["error_rows"] == 0
    got = {r["id"]: (r["answer"], r["num_generated_tokens"]) for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert got == want
    manifest = json.loads((tmp_path / "out.run.json").read_text())
    assert manifest["adapter"] and manifest["adapter"] != manifest["checkpoint"]
    with pytest.raises(ValueError, match=r"the adapter \(one then, none now\)"):
        run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint),
                max_new_tokens=6), resume=True)
    s3.pipe("bucket/adapters/cut/adapter_config.json", (adapter / "adapter_config.json").read_bytes())
    s3.pipe("bucket/adapters/cut/adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes()[:-9])
    with pytest.raises(CheckpointError, match="not a complete safetensors file"):
        check_adapter("s3://bucket/adapters/cut")


def test_error_rows_are_taken_out_of_an_output_on_s3(s3):
    """pipeline.retry on an object store: a file rewritten in place (one PUT), one of only error rows deleted."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import read_output
    from pipeline.retry import drop_error_rows

    for name, ids, errors in (("1", ["a", "b"], [None, "fetch: TimeoutError"]), ("2", ["c"], ["fetch: HTTP 503"])):
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": ids, "finish_reason": ["stop" if e is None else "error" for e in errors],
                                 "error": errors}), buf)
        s3.pipe(f"bucket/retry-out/{name}.parquet", buf.getvalue())
    assert drop_error_rows("s3://bucket/retry-out") == 2
    assert s3.ls("bucket/retry-out", refresh=True) == ["bucket/retry-out/1.parquet"]
    assert read_output("s3://bucket/retry-out").column("id").to_pylist() == ["a"]


def test_a_checkpoint_rewritten_at_the_same_size_is_another_and_an_older_manifest_still_resumes(s3, checkpoint,
                                                                                             tmp_path):
    """The fingerprint of a URL checkpoint holds its files' ETags: another fine-tune of the same shapes
    uploaded in its place is another checkpoint (a resume would mix two models' answers). A run.json
    written before (names and sizes only) still resumes with the checkpoint it named."""
    import json

    from pipeline import PipelineConfig
    from pipeline.manifest import checkpoint_fingerprint, keep_run_settings, names_and_sizes_fingerprint

    upload_checkpoint(s3, checkpoint, "bucket/models/fp")
    url = "s3://bucket/models/fp/"
    before = checkpoint_fingerprint(url)
    config = PipelineConfig(model=url)
    keep_run_settings(str(tmp_path / "out"), config, resume=False, storage_options=None)
    manifest = tmp_path / "out.run.json"
    older = json.loads(manifest.read_text()) | {"checkpoint": names_and_sizes_fingerprint(url)}
    manifest.write_text(json.dumps(older))
    keep_run_settings(str(tmp_path / "out"), config, resume=True, storage_options=None)      # accepted
    weights = (checkpoint / "model.safetensors").read_bytes()     # other weights of the same size
    s3.pipe("bucket/models/fp/model.safetensors", weights[:8] + weights[8:][::-1])
    assert checkpoint_fingerprint(url) != before
    with pytest.raises(ValueError, match="the checkpoint's files"):
        keep_run_settings(str(tmp_path / "out"), config, resume=True, storage_options=None)


def test_a_process_that_read_the_first_rows_of_files_on_s3_exits_cleanly(s3, tmp_path):
    """The first rows of an output (the job's printed rows) or an input (--dry-run) of several files
    on S3: a threaded scan stopped early left reads in flight on Arrow's threads, calling into s3fs as
    the interpreter exited, which aborted it (exit 134 after a finished job)."""
    import subprocess
    import sys

    for i in range(12):
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(10)], "image": [b"x"] * 10}), buf)
        s3.pipe(f"bucket/many/part-{i:02d}.parquet", buf.getvalue())
    script = ("from pipeline.io import input_dataset, head_rows, read_output\n"
              "print(read_output('s3://bucket/many', limit=5).num_rows,"
              " head_rows(input_dataset('s3://bucket/many'), 3, ['id']).num_rows)\n")
    repo = Path(__file__).resolve().parents[2]
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stdout.split()) == (0, ["5", "3"]), done.stderr[-2000:]


def test_a_bucket_root_output_an_unreachable_model_store_and_foreign_objects_are_one_line_or_skipped(
        s3, checkpoint, tmp_path):
    """An output at a bucket's root passed the checks (and --dry-run) and failed at its first write
    (its run files would be other buckets: s3://root.run.json); an output in a bucket that does not exist was
    the store's words alone ("The specified bucket does not exist"); a model store the driver cannot reach
    was a 150-line traceback; a non-Parquet object in an output folder failed the rows printed after
    a finished run."""
    from pipeline.checkpoint import remote_listing
    from pipeline.dry_run import dry_run
    from pipeline.job import prepare_job

    rows = good_rows(2)
    s3.mkdir("rootout")
    s3.pipe("bucket/root-in/rows.parquet", table_bytes(rows))
    with pytest.raises(ValueError, match=r"output 's3://rootout/' is a bucket's root: --output names a folder"):
        prepare_job("s3://bucket/root-in/rows.parquet", "s3://rootout/", PipelineConfig(model=str(checkpoint)))
    with pytest.raises(FileNotFoundError, match=r"^output 's3://no-bucket/out' cannot be written: .*bucket .*does not"):
        prepare_job("s3://bucket/root-in/rows.parquet", "s3://no-bucket/out", PipelineConfig(model=str(checkpoint)))
    # a dry run made the same checks, and none saw a bucket missing (its listing is an empty folder's)
    with pytest.raises(FileNotFoundError, match=r"^output 's3://no-bucket/out' cannot be written: its bucket "):
        dry_run("s3://bucket/root-in/rows.parquet", "s3://no-bucket/out", PipelineConfig(model=str(checkpoint)), rows=1)
    # a bucket name botocore refuses was its traceback, a URL's credentials in it
    with pytest.raises(PermissionError, match=r"^output 's3://\*\*\*@my bucket/out' cannot be written: "
                                              r"ParamValidationError: .*Invalid bucket name"):
        prepare_job("s3://bucket/root-in/rows.parquet", "s3://KEY:SECRET@my bucket/out",
                    PipelineConfig(model=str(checkpoint)))
    # a model or adapter in a missing bucket: the store's words alone, naming neither
    with pytest.raises(FileNotFoundError, match=r"^model 's3://no-bucket/m' cannot be read: .*bucket does not exist"):
        remote_listing("s3://no-bucket/m", None)
    unreachable = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(PermissionError, match=r"^model 's3://bucket/any' cannot be read: EndpointConnectionError"):
        remote_listing("s3://bucket/any", unreachable)
    for k, part in enumerate((rows[:1], rows[1:])):
        s3.pipe(f"bucket/foreign-out/part-{k}.parquet", table_bytes(part))
    s3.pipe("bucket/foreign-out/notes.txt", b"mine")
    assert read_output("s3://bucket/foreign-out", limit=5).num_rows == 2


def test_a_job_config_on_s3_is_read_from_there(s3):
    """--config s3://bucket/job.yaml was read as the local file 's3:/bucket/job.yaml'."""
    from jobs.common import load_job_config

    s3.pipe("bucket/conf/job.yaml", b"max-new-tokens: 7\nprompt: Say it.\n")
    assert load_job_config("s3://bucket/conf/job.yaml") == {"max_new_tokens": 7, "prompt": "Say it."}
    with pytest.raises(FileNotFoundError, match=r"^job config 's3://bucket/conf/nope.yaml' cannot be read"):
        load_job_config("s3://bucket/conf/nope.yaml")


def table_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()
