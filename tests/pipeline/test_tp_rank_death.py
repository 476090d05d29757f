"""A rank of a tensor-parallel replica dies as its group starts, then mid-job (a real process death,
through the worker's TP_RANK_CRASH_ONCE hook), and later another stops answering (TP_RANK_HANG_ONCE: rank 0's step waits
in a collective until its watchdog ends rank 0): each time the replica rebuilds its group in its own
placement group and retries the batch, so every id comes out once with the reference's answer
(transformers' generate on that row alone)."""
import pytest
from ray.util import placement_group_table

from model.parallel.faults import RANK_CRASH_ONCE_ENV, RANK_HANG_ONCE_ENV, SETUP
from pipeline import PipelineConfig, read_output, run_job
from tests.fixtures.checkpoints import build_checkpoint
from tests.pipeline.helpers import Oracle, good_rows, ray_with_fault, write_parquet

CRASH_ROW = "row-2"   # in the second of three batches
HANG_ROW = "row-4"    # in the third


@pytest.fixture(scope="module")
def rank_crash_cluster(tmp_path_factory):
    crashed, hung = tmp_path_factory.mktemp("rank-crash") / "crashed", tmp_path_factory.mktemp("rank-hang") / "hung"
    started = tmp_path_factory.mktemp("rank-start") / "died"      # rank 1 dies as the first group starts too
    with ray_with_fault({RANK_CRASH_ONCE_ENV: f"1:{CRASH_ROW}={crashed};1:{SETUP}={started}",
                         RANK_HANG_ONCE_ENV: f"1:{HANG_ROW}={hung}"}):
        yield crashed, hung, started


def tp2_answers(checkpoint, source, out) -> list[tuple]:
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=5, batch_size=2, tensor_parallel_size=2,
                            step_timeout_s=3.0)
    run_job(str(source), str(out), config)
    table = read_output(str(out))
    return sorted(zip(*(table[c].to_pylist() for c in ("id", "answer", "finish_reason", "error"))))


def test_dead_rank_group_is_rebuilt_and_its_batch_retried(rank_crash_cluster, tmp_path):
    checkpoint = build_checkpoint(tmp_path / "ckpt", "idefics3")   # 4 heads, 2 kv heads: splits in 2
    rows = good_rows(6)
    write_parquet(tmp_path / "in.parquet", rows)
    tp2 = tp2_answers(checkpoint, tmp_path / "in.parquet", tmp_path / "out")
    assert rank_crash_cluster[0].exists(), "rank 1 never received the row that kills it"
    assert rank_crash_cluster[1].exists(), "rank 1 never received the row that hangs it"
    assert rank_crash_cluster[2].exists(), "rank 1 never died as its group started"     # the job failed so
    assert [r[0] for r in tp2] == [f"row-{i}" for i in range(6)]
    assert all(r[2] == "length" and r[3] is None for r in tp2), tp2
    groups = [(len(g["bundles"]), g["state"]) for g in placement_group_table().values()]
    assert groups == [(2, "REMOVED")], groups      # the rebuilt group reused the replica's reservation
    oracle, prompt = Oracle(checkpoint), PipelineConfig(model="m").prompt
    assert [r[1] for r in tp2] == [oracle.answer(r["image"], r["question"] or prompt, 5)[0] for r in rows]
