import sys
import time

import pytest

from tests.fixtures.checkpoints import build_checkpoint

# Actors Ray Data starts once per cluster (and keeps): a cluster with only these alive is as new.
RAY_DATA_ACTORS = {"_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker"}
SHARED: list[str] = []      # the node of the cluster ray_cluster started last (a new id each start)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("smolvlm"), "smolvlm")


@pytest.fixture(scope="session")
def oracle(checkpoint):
    from tests.pipeline.helpers import Oracle
    return Oracle(checkpoint)


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster. Modules share one while each leaves it as it found it (a start costs
    ~7 s of CI's 2 cores): else it is shut down and the next module starts another. A module that
    starts a cluster of its own shuts this one first (helpers.own_cluster)."""
    import ray

    if not (ray.is_initialized() and ray.get_runtime_context().get_node_id() in SHARED):
        ray.shutdown()          # a cluster of other settings (Ray Data's own, started by a read without one)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
        SHARED[:] = [ray.get_runtime_context().get_node_id()]
    yield ray
    if not settled(ray):
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def no_cluster_left():
    yield
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


def settled(ray, wait_s: float = 10.0) -> bool:
    """Whether the cluster is back to as new within `wait_s`: every CPU free, no placement group, no
    actor alive but Ray Data's own."""
    from ray._private import state
    from ray.util import placement_group_table

    deadline = time.monotonic() + wait_s
    while True:
        actors = {a["ActorClassName"] for a in state.actors().values() if a["State"] != "DEAD"}
        groups = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
        cpus_free = ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU", 0)
        if actors <= RAY_DATA_ACTORS and not groups and cpus_free:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
