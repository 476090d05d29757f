import os
import sys
from pathlib import Path

import pytest

# Two cores are shared by every test process: keep torch from oversubscribing them (under pytest -n, one
# thread a worker).
os.environ.setdefault("OMP_NUM_THREADS", "1" if "PYTEST_XDIST_WORKER" in os.environ else "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# A test's Ray cluster is its own, never one it finds: ray.init() without an address (and a job without
# RAY_ADDRESS, as ray.init) joins the cluster a `ray start` or ray.cluster_utils.Cluster last made on the machine
# (test_pool_sizes_nodes' Cluster, on the other xdist worker, in CI runs 4-5). A test that joins one says so.
os.environ["RAY_ADDRESS"] = "local"


# Under `pytest -n` (make test) tests/pipeline keeps to one worker, one test after another, as it ran alone:
# its modules share one Ray cluster in that process (tests/pipeline/conftest.py) or shut it to start their
# own. The other files go whole (their module fixtures built once) to whichever worker is free, those that
# start a Ray cluster of their own among them.
SHARED_CLUSTER = "tests/pipeline/"


def work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "ray" if path.startswith(SHARED_CLUSTER) else path


@pytest.hookimpl(optionalhook=True)       # pytest-xdist's hook: absent without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class RayApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return RayApart(config, log)
