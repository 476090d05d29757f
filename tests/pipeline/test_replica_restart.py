"""A model replica whose process dies mid-job is restarted and its batch retried: every id comes out
exactly once, with the reference's answer. The death is real (os._exit in the replica, once, through
pipeline.generate's PIPELINE_CRASH_ONCE hook), not an exception. So is a hang: an engine step that
never returns (PIPELINE_HANG_ONCE) until the replica's watchdog ends the process. And a row that
kills its stage's process every time (PIPELINE_CRASH_ALWAYS) becomes an error row, the others answered."""
import pytest

from pipeline import PipelineConfig, read_output, run_job
from pipeline.faults import CRASH_ALWAYS_ENV, CRASH_ONCE_ENV, HANG_ONCE_ENV
from pipeline.ledger import ROOT_ENV
from tests.pipeline.helpers import good_rows, ray_with_fault, write_parquet

MAX_NEW = 4
CRASH_ROW = "row-3"   # in the second of three batches
HANG_ROW = "row-4"    # in the third
POISON = {"preprocess": "poison-pre", "generate": "poison-gen"}


@pytest.fixture(scope="module")
def faulty_cluster(tmp_path_factory):
    crashed, hung = tmp_path_factory.mktemp("crash") / "crashed", tmp_path_factory.mktemp("hang") / "hung"
    ledgers = tmp_path_factory.mktemp("ledgers")
    with ray_with_fault({CRASH_ONCE_ENV: f"{CRASH_ROW}={crashed}", HANG_ONCE_ENV: f"{HANG_ROW}={hung}",
                         CRASH_ALWAYS_ENV: ",".join(f"{stage}:{row}" for stage, row in POISON.items()),
                         ROOT_ENV: str(ledgers)}):
        yield crashed, hung, ledgers


def test_dead_replica_is_restarted_and_its_rows_retried(faulty_cluster, checkpoint, oracle, tmp_path):
    rows = [r for r in good_rows(6) if r["id"] != HANG_ROW]
    write_parquet(tmp_path / "in.parquet", rows)
    # one batch at a time: the first is answered (and its replica counted) before the second kills the process
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW, batch_size=2, batches_in_flight=1)
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert faulty_cluster[0].exists(), "the replica never reached the row that kills it"
    assert_reference_answers(tmp_path / "out", rows, config, oracle)
    assert summary["replicas"] == {"cpu float32": 1}      # restarted, one replica still (it was counted twice)


def test_hung_replica_is_ended_by_its_watchdog_and_its_rows_retried(faulty_cluster, checkpoint, oracle, tmp_path):
    rows = [r for r in good_rows(6) if r["id"] != CRASH_ROW]
    write_parquet(tmp_path / "in.parquet", rows)
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW, batch_size=2, step_timeout_s=2.0)
    run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert faulty_cluster[1].exists(), "the replica never reached the row that hangs it"
    assert_reference_answers(tmp_path / "out", rows, config, oracle)


def test_rows_that_kill_their_process_every_time_become_error_rows(faulty_cluster, checkpoint, oracle, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(faulty_cluster[2]))      # the driver removes the job's ledgers there
    rows = [r for r in good_rows(6) if r["id"] not in (CRASH_ROW, HANG_ROW)]
    poisoned = [dict(rows[i], id=POISON[stage]) for i, stage in enumerate(POISON)]
    write_parquet(tmp_path / "in.parquet", rows[:2] + poisoned[:1] + rows[2:] + poisoned[1:])
    # one batch at a time: the first is answered (and its replica counted) before the second kills the process
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW, batch_size=2, batches_in_flight=1)
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    out = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert sorted(out) == sorted([r["id"] for r in rows] + list(POISON.values()))
    for stage, row in POISON.items():
        assert out[row]["finish_reason"] == "error", out[row]
        assert out[row]["error"].startswith(f"{stage}: RowError: the process died whenever it worked on this row alone")
    assert summary["error_rows"] == 2
    assert not list(faulty_cluster[2].glob("*.json"))           # the workers wrote them; the driver removed them
    assert_reference_answers(tmp_path / "out", rows, config, oracle, every_id=False)


def assert_reference_answers(output, rows: list[dict], config: PipelineConfig, oracle, every_id: bool = True) -> None:
    table = read_output(str(output))
    if every_id:
        assert sorted(table["id"].to_pylist()) == [r["id"] for r in rows]
    by_id = {r["id"]: r for r in table.to_pylist()}
    for row in rows:
        text, n = oracle.answer(row["image"], row["question"] or config.prompt, MAX_NEW)
        assert (by_id[row["id"]]["answer"], by_id[row["id"]]["num_generated_tokens"]) == (text, n), row["id"]
