"""Pool sizes when the user gives none: the preprocessing pool grows with the work (a real local
cluster with CPUs to spare: one image decoder must not starve the model replicas), and the model
stage takes every GPU of the cluster (logical GPUs here: Ray counts them, nothing runs on them)."""
import pytest

from pipeline import PipelineConfig, read_output, run_job
from pipeline.builder import cpu_worker_range, replica_count
from tests.pipeline.helpers import png, write_parquet


@pytest.fixture(scope="module")
def roomy_cluster():
    import ray

    ray.init(num_cpus=8, num_gpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def preprocess_actors() -> int:
    import ray._private.state as state      # the GCS's actor table: no dashboard needed

    return sum(a["ActorClassName"] == "MapWorker(MapBatches(Preprocess))" for a in state.actors().values())


def test_worker_range_leaves_cpus_to_replicas_and_ray_data(roomy_cluster):
    on_cpu = PipelineConfig(model="m", device="cpu", cpus_per_replica=1.5)
    assert cpu_worker_range(on_cpu) == (1, 4)                          # 8 - 1 x 1.5 - 2 reserved
    assert cpu_worker_range(PipelineConfig(model="m", device="cuda")) == (1, 6)    # GPU replicas: no CPU
    assert cpu_worker_range(PipelineConfig(model="m", device="cuda", cpus_per_worker=4)) == (1, 1)
    assert cpu_worker_range(PipelineConfig(model="m", cpu_workers=3)) == (3, 3)


def test_replicas_take_every_gpu_unless_given(roomy_cluster):
    assert replica_count(PipelineConfig(model="m")) == 4                            # the cluster has GPUs
    assert replica_count(PipelineConfig(model="m", tensor_parallel_size=2)) == 2
    assert replica_count(PipelineConfig(model="m", replicas=3)) == 3
    assert replica_count(PipelineConfig(model="m", device="cpu")) == 1
    cpu_replicas = PipelineConfig(model="m", device="cpu", replicas=2, cpus_per_replica=1.5)
    assert cpu_worker_range(cpu_replicas) == (1, 3)


def test_pool_grows_while_rows_wait_for_preprocessing(roomy_cluster, checkpoint, tmp_path):
    rows = [{"id": i, "image": png(1000, 750, seed=i), "question": "What?"} for i in range(40)]
    write_parquet(tmp_path / "in" / "part-0.parquet", rows)
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=1, batch_size=4, device="cpu")
    assert cpu_worker_range(config) == (1, 5)
    summary = run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    assert summary["rows"] == 40 and summary["error_rows"] == 0
    assert sorted(read_output(str(tmp_path / "out")).column("id").to_pylist()) == list(range(40))
    assert preprocess_actors() > 1
