"""A store's outage mid-run, longer than its client's default retries: the run's reads and writes
wait it out, and it ends as if there had been none. moto's standalone server behind a relay that
goes down on cue."""
import json
import uuid

import pyarrow.parquet as pq
import pytest

from pipeline import PipelineConfig, read_output, run_job
from tests.pipeline.helpers import good_rows, write_parquet
from tests.pipeline.relay import OutageRelay


@pytest.fixture(scope="module")
def moto_port():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()[1]
    server.stop()


def test_a_runs_stores_are_patient_and_the_drivers_checks_are_not(monkeypatch):
    from pipeline.storage import PATIENT_RETRIES, _options, patient_stores

    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)

    assert "config_kwargs" not in _options("s3", {})        # the checks: a wrong endpoint is named in seconds
    with patient_stores():
        assert _options("s3", {})["config_kwargs"] == {"retries": PATIENT_RETRIES}
        mine = {"config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 1}}
        assert _options("s3", mine) == mine                 # the user's own retries win
        both = _options("s3", {"config_kwargs": {"connect_timeout": 1}})
        assert both["config_kwargs"] == {"connect_timeout": 1, "retries": PATIENT_RETRIES}
        assert _options("gs", {}) == {}
        monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
        assert "config_kwargs" not in _options("s3", {})    # nor do the AWS environment's
    monkeypatch.delenv("AWS_RETRY_MODE")
    assert "config_kwargs" not in _options("s3", {})


def test_a_store_refusing_connections_for_longer_than_its_clients_default_retries_does_not_end_the_run(
        moto_port, ray_cluster, checkpoint, tmp_path):
    """Refused connections for 16 s (botocore's default retries give up within 6-11 s) where a
    worker writes the data file (after its checkpoint's pending file) and where the driver writes
    the summary: each row answered and written once, the commit finished, the summary written."""
    import s3fs

    bucket = f"outage-{uuid.uuid4().hex[:8]}"     # moto's buckets are one process's: other modules' are there too
    steps = [f"PUT /{bucket}/out/".encode(), f"PUT /{bucket}/out.summary.json".encode()]
    relay = OutageRelay(moto_port, steps, down_s=16.0)
    try:
        options = {"key": "testing", "secret": "testing", "endpoint_url": relay.url}
        store = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        store.mkdir(bucket)
        rows = good_rows(4)
        write_parquet(tmp_path / "in" / "part-0.parquet", rows)
        config = PipelineConfig(model=str(checkpoint), max_new_tokens=2, batch_size=4, storage_options=options)
        summary = run_job(str(tmp_path / "in"), f"s3://{bucket}/out", config)
        assert relay.happened == steps and not relay.failures
        written = read_output(f"s3://{bucket}/out", options)
        assert sorted(written.column("id").to_pylist()) == [r["id"] for r in rows]
        counts = summary["rows"], summary["missing_rows"], summary["duplicate_rows"], summary["error_rows"]
        assert counts == (4, 0, 0, 0)
        marks = store.find(f"{bucket}/out.checkpoint")
        assert marks and not [m for m in marks if ".pending" in m]
        assert sum(pq.read_table(m, filesystem=store).num_rows for m in marks) == 4
        assert json.loads(store.cat(f"{bucket}/out.summary.json")) == summary
    finally:
        relay.close()


def test_an_actors_copy_of_a_model_on_s3_is_patient(moto_port, checkpoint, tmp_path, monkeypatch):
    """The copy an actor makes of its node's model as it starts: a blip there failed the actor's
    start, which ends the run. Each store it reads through waits out passing trouble."""
    import s3fs

    import pipeline.checkpoint as checkpoints
    from pipeline.storage import PATIENT_RETRIES

    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "cache"))
    options = {"key": "testing", "secret": "testing", "endpoint_url": f"http://127.0.0.1:{moto_port}"}
    store = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    store.mkdir(bucket)
    store.put(str(checkpoint) + "/", f"{bucket}/tiny/", recursive=True)
    retries, read = [], checkpoints.reader_fs

    def reader(uri, storage_options=None):
        fs, path = read(uri, storage_options)
        retries.append(fs.config_kwargs.get("retries"))
        return fs, path

    monkeypatch.setattr(checkpoints, "reader_fs", reader)
    folder = checkpoints.local_checkpoint(f"s3://{bucket}/tiny", options)
    assert (tmp_path / "cache").exists() and folder.startswith(str(tmp_path / "cache"))
    # the listing and the copy (botocore rewrites the retries it is given: max_attempts 10 as 11 in all)
    assert len(retries) >= 2 and all(r == {"mode": "standard", "total_max_attempts": 11} for r in retries)
    assert PATIENT_RETRIES == {"max_attempts": 10, "mode": "standard"}


@pytest.mark.timeout(120)
def test_an_upload_to_a_store_that_never_answers_fails_after_its_read_timeouts(tmp_path):
    """A store that takes the connection and never answers: botocore asked each upload for a
    "100 Continue", which aiohttp waited for with no timeout, so a run's write hung for ever. The
    filesystems a run hands to Ray's workers (pickled) upload at once and time out like a read."""
    import pickle
    import socket
    import threading
    import time

    from pipeline.storage import fsspec_fs

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []
    threading.Thread(target=lambda: [held.append(listener.accept()) for _ in iter(int, 1)], daemon=True).start()
    options = {"key": "testing", "secret": "testing", "endpoint_url": f"http://127.0.0.1:{listener.getsockname()[1]}",
               "config_kwargs": {"read_timeout": 1, "connect_timeout": 1, "retries": {"max_attempts": 1}}}
    fs, path = fsspec_fs("s3://bucket/out/part-0.parquet", options)
    fs = pickle.loads(pickle.dumps(fs))
    start = time.monotonic()
    try:
        with pytest.raises(Exception, match="Read timeout"):
            with fs.open(path, "wb") as f:
                f.write(b"answers")
        assert time.monotonic() - start < 60 and held       # s3fs's own 5 tries of 1 s each, and their waits
    finally:
        listener.close()


def test_a_request_failing_during_an_outage_is_logged_at_most_a_line_every_ten_seconds(moto_port, caplog,
                                                                                        monkeypatch):
    """botocore retries without a word: a run waiting out an outage only stalled its progress line."""
    from pipeline import s3_store
    from pipeline.storage import fsspec_fs, patient_stores

    monkeypatch.setattr(s3_store.FAILURES, "_last", -s3_store.QUIET_S)     # another test's line is not this one's
    bucket = f"logged-{uuid.uuid4().hex[:8]}"
    relay = OutageRelay(moto_port, [f"PUT /{bucket}/a".encode()], down_s=4.0)
    try:
        options = {"key": "testing", "secret": "testing", "endpoint_url": relay.url}
        with patient_stores():
            fs, _ = fsspec_fs(f"s3://{bucket}", options)
        fs.mkdir(bucket)
        with caplog.at_level("WARNING", logger="pipeline.s3_store"):
            fs.pipe(f"{bucket}/a", b"answers")      # refused for 4 s: botocore's standard retries wait it out
        assert fs.cat(f"{bucket}/a") == b"answers" and relay.happened and not relay.failures
        lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.s3_store"]
        assert len(lines) == 1, lines
        assert lines[0].startswith("S3 PutObject failed, attempt 1: ") and lines[0].endswith(
            "; botocore tries again while its retries last"), lines
    finally:
        relay.close()
