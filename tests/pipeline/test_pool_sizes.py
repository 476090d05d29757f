"""Pool sizes when the user gives none: the preprocessing pool grows with the work (a real local
cluster with CPUs to spare: one image decoder must not starve the model replicas), and the model
stage takes every GPU of the cluster (logical GPUs here: Ray counts them, nothing runs on them)."""
import pytest

from pipeline import PipelineConfig, read_output, run_job
from pipeline.builder import cpu_worker_range, replica_count
from tests.pipeline.helpers import own_cluster, png, started_actors, write_parquet


@pytest.fixture(scope="module")
def roomy_cluster():
    with own_cluster(num_cpus=8, num_gpus=4) as ray:
        yield ray


def test_worker_range_leaves_cpus_to_replicas_and_ray_data(roomy_cluster):
    on_cpu = PipelineConfig(model="m", device="cpu", cpus_per_replica=1.5)
    assert cpu_worker_range(on_cpu) == (1, 4)                          # 8 - 1 x 1.5 - 2 reserved
    assert cpu_worker_range(PipelineConfig(model="m", device="cuda")) == (1, 6)    # GPU replicas: no CPU
    assert cpu_worker_range(PipelineConfig(model="m", device="cuda", cpus_per_worker=4)) == (1, 1)
    assert cpu_worker_range(PipelineConfig(model="m", cpu_workers=3)) == (3, 3)


def test_a_cpu_replica_takes_a_nodes_cpus_but_a_preprocessing_actors_and_ray_datas(roomy_cluster):
    """On CPUs the model is the work: its replica's torch gets a node's CPUs as threads, less what one
    preprocessing actor and Ray Data's read and write tasks hold; beside a GPU it takes one."""
    from pipeline.builder import cpu_share, replica_cpu_count, replica_resources

    on_cpu = PipelineConfig(model="m", device="cpu")
    assert replica_cpu_count(on_cpu) == 5 and cpu_worker_range(on_cpu) == (1, 1)     # 8 - 2 reserved - 1 worker
    assert cpu_share(on_cpu) == 1.0 and replica_resources(on_cpu) == {"num_gpus": 0, "num_cpus": 5}
    assert replica_cpu_count(PipelineConfig(model="m", device="cpu", tensor_parallel_size=2)) == 2    # a rank's
    assert replica_cpu_count(PipelineConfig(model="m", device="cpu", cpus_per_replica=1.5)) == 1.5
    assert replica_cpu_count(PipelineConfig(model="m")) == 1                                  # the cluster has GPUs
    with pytest.raises(ValueError, match="cpus_per_replica"):
        PipelineConfig(model="m", cpus_per_replica=0)


@pytest.mark.parametrize("nodes, replicas, tp, expected", [
    ([8], 1, 1, 5), ([4], 1, 1, 1), ([8], 1, 2, 2),          # a node: all but 3 CPUs (a 4-CPU laptop's: 1)
    ([16, 16], 1, 1, 16), ([16, 16], 2, 1, 14),              # a node each; the 3 left over anywhere
    ([16, 16], 3, 1, 8), ([32, 8], 2, 1, 16), ([16, 16], 2, 4, 3)])   # two on a node; ranks packed
def test_cpu_replicas_get_the_most_cpus_that_fit_the_nodes(nodes, replicas, tp, expected):
    from pipeline.builder import fitting_cpus

    assert fitting_cpus(nodes, replicas, tp, reserve=3) == expected


def test_a_cpu_replica_runs_torch_with_a_thread_a_cpu():
    from pipeline.replica import cpu_threads

    assert cpu_threads({"CPU": 5.0}) == 5 and cpu_threads({"CPU": 0.5}) == 1     # a small cluster's share


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
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=1, batch_size=4, device="cpu", cpus_per_replica=1)
    assert cpu_worker_range(config) == (1, 5)
    summary = run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    assert summary["rows"] == 40 and summary["error_rows"] == 0
    assert sorted(read_output(str(tmp_path / "out")).column("id").to_pylist()) == list(range(40))
    assert started_actors("MapWorker(MapBatches(Preprocess))") > 1
