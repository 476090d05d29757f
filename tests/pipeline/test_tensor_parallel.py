"""--tensor-parallel-size 2 on CPU: each replica reserves one STRICT_PACK placement group of 2 bundles,
and answers exactly as tensor_parallel_size 1."""
from ray.util import placement_group_table

from pipeline import PipelineConfig, read_output, run_job
from tests.fixtures.checkpoints import build_checkpoint
from tests.pipeline.helpers import good_rows, write_parquet


def answers(checkpoint, tmp_path, tp: int) -> list[tuple]:
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=5, batch_size=2, tensor_parallel_size=tp)
    run_job(str(tmp_path / "in.parquet"), str(tmp_path / f"out{tp}"), config)
    table = read_output(str(tmp_path / f"out{tp}"))
    return sorted(zip(*(table[c].to_pylist() for c in ("id", "answer", "finish_reason", "num_generated_tokens"))))


def test_tp2_answers_equal_tp1(ray_cluster, tmp_path):
    checkpoint = build_checkpoint(tmp_path / "ckpt", "idefics3")   # 4 heads, 2 kv heads: splits in 2
    write_parquet(tmp_path / "in.parquet", good_rows(4))
    tp1 = answers(checkpoint, tmp_path, 1)
    assert [r[0] for r in tp1] == [f"row-{i}" for i in range(4)]
    assert all(r[2] == "length" and r[3] == 5 for r in tp1)
    assert answers(checkpoint, tmp_path, 2) == tp1
    # One group for the one replica: reserving a group per call of a Ray Data hook leaked groups until
    # the read tasks starved and the job hung.
    groups = list(placement_group_table().values())
    assert [(len(g["bundles"]), g["strategy"]) for g in groups] == [(2, "STRICT_PACK")]
