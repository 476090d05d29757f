"""--tensor-parallel-size 2 on CPU: each replica reserves one STRICT_PACK placement group of 2 bundles,
and answers exactly as tensor_parallel_size 1."""
import shutil

from ray.util import placement_group_table

from pipeline import PipelineConfig, read_output, run_job
from tests.fixtures.checkpoints import build_checkpoint
from tests.pipeline.helpers import good_rows, write_parquet


def answers(checkpoint, tmp_path, tp: int, adapter=None) -> list[tuple]:
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=5, batch_size=2, tensor_parallel_size=tp,
                            adapter=adapter and str(adapter))
    out = tmp_path / f"out{tp}"
    if out.exists():
        shutil.rmtree(out)
        shutil.rmtree(f"{out}.checkpoint", ignore_errors=True)
    summary = run_job(str(tmp_path / "in.parquet"), str(out), config)
    assert set(summary["replicas"]) == {"cpu float32" if tp == 1 else f"cpu float32, {tp} ranks"}
    table = read_output(str(out))
    return sorted(zip(*(table[c].to_pylist() for c in ("id", "answer", "finish_reason", "num_generated_tokens"))))


def test_tp2_answers_equal_tp1_and_merges_an_adapter_as_tp1(ray_cluster, tmp_path):
    """Without and with a LoRA adapter, which each rank merges into its slices (DoRA's row norms over
    whole rows)."""
    from tests.model.test_lora import ADAPTERS, build_adapter

    checkpoint = build_checkpoint(tmp_path / "ckpt", "idefics3")   # 4 heads, 2 kv heads: splits in 2
    build_adapter(checkpoint, tmp_path / "adapter", **ADAPTERS["dora"])
    write_parquet(tmp_path / "in.parquet", good_rows(4))
    tp1 = answers(checkpoint, tmp_path, 1)
    assert [r[0] for r in tp1] == [f"row-{i}" for i in range(4)]
    assert all(r[2] == "length" and r[3] == 5 for r in tp1)
    assert answers(checkpoint, tmp_path, 2) == tp1
    # One group for the one replica (reserving a group per call of a Ray Data hook leaked groups until
    # the read tasks starved and the job hung), removed once the run is over: Ray would keep it as
    # long as the driver lives, and its CPUs would starve the next run (the next one here).
    groups = list(placement_group_table().values())
    assert [(len(g["bundles"]), g["strategy"], g["state"]) for g in groups] == [(2, "STRICT_PACK", "REMOVED")]
    merged = answers(checkpoint, tmp_path, 1, tmp_path / "adapter")
    assert merged != tp1
    assert answers(checkpoint, tmp_path, 2, tmp_path / "adapter") == merged
