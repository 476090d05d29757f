"""Pool sizes on a CPU-only cluster of several nodes (real Ray nodes, started in this machine by
ray.cluster_utils): a model replica a node, each with the CPUs the nodes can spare."""
import pytest

from pipeline import PipelineConfig
from pipeline.builder import cpu_share, cpu_worker_range, fitting_cpus, replica_count, replica_cpu_count


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()      # the cluster modules share (conftest.ray_cluster)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2))    # a small head, two workers
    for _ in range(2):
        cluster.add_node(num_cpus=16)
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_replica_a_node_of_the_largest_size_each_with_what_it_can_spare(three_nodes):
    config = PipelineConfig(model="m", device="cpu")
    assert replica_count(config) == 2                     # the 2-CPU head holds none
    assert replica_cpu_count(config) == 15                # 2 x 15 of 34, 3 left: a preprocessing actor, Ray Data's
    assert cpu_worker_range(config) == (1, 2) and cpu_share(config) == 1.0
    assert replica_cpu_count(PipelineConfig(model="m", device="cpu", replicas=3)) == 8     # two on a node
    assert replica_cpu_count(PipelineConfig(model="m", device="cpu", tensor_parallel_size=2)) == 7
    assert fitting_cpus([16, 16, 2], 3, 1, reserve=3) == 8


def test_the_model_stage_starts_its_replicas_on_those_nodes(three_nodes):
    """Ray can place what the builder asks for: the replicas' CPUs as actors, one a node."""
    import ray

    @ray.remote
    class Replica:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    config = PipelineConfig(model="m", device="cpu")
    replicas = [Replica.options(num_cpus=replica_cpu_count(config)).remote() for _ in range(replica_count(config))]
    nodes = ray.get([r.node.remote() for r in replicas], timeout=60)
    assert len(set(nodes)) == 2


def test_the_runs_counter_lives_on_the_drivers_node(three_nodes):
    """On another node, that node's loss mid-run lost the run's counts (a multi-node audit: "replicas": {})."""
    import ray

    from pipeline.run_stats import RunCounter

    counters = [RunCounter() for _ in range(4)]
    where = [c.handle.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for c in counters]
    assert set(ray.get(where, timeout=60)) == {ray.get_runtime_context().get_node_id()}
    for counter in counters:
        assert counter.close() == {}
