"""A model replica whose process dies mid-job is restarted and its batch retried: every id comes out
exactly once, with the reference's answer. The death is real (os._exit in the replica, once, through
pipeline.generate's PIPELINE_CRASH_ONCE hook), not an exception."""
import pytest

from pipeline import PipelineConfig, read_output, run_job
from pipeline.generate import CRASH_ONCE_ENV
from tests.pipeline.helpers import good_rows, ray_with_fault, write_parquet

MAX_NEW = 4
CRASH_ROW = "row-3"   # in the second of three batches


@pytest.fixture(scope="module")
def crashing_cluster(tmp_path_factory):
    marker = tmp_path_factory.mktemp("crash") / "crashed"
    with ray_with_fault(CRASH_ONCE_ENV, f"{CRASH_ROW}={marker}"):
        yield marker


def test_dead_replica_is_restarted_and_its_rows_retried(crashing_cluster, checkpoint, oracle, tmp_path):
    rows = good_rows(6)
    write_parquet(tmp_path / "in.parquet", rows)
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=MAX_NEW, batch_size=2)
    run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert crashing_cluster.exists(), "the replica never reached the row that kills it"
    table = read_output(str(tmp_path / "out"))
    assert sorted(table["id"].to_pylist()) == [r["id"] for r in rows]
    by_id = {r["id"]: r for r in table.to_pylist()}
    for row in rows:
        text, n = oracle.answer(row["image"], row["question"] or config.prompt, MAX_NEW)
        assert (by_id[row["id"]]["answer"], by_id[row["id"]]["num_generated_tokens"]) == (text, n), row["id"]
