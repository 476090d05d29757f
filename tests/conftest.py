import os
import sys
from pathlib import Path

import pytest

# Two cores are shared by every test process: keep torch from oversubscribing them (under `make test`'s two
# workers, one thread each).
os.environ.setdefault("OMP_NUM_THREADS", "1" if "PYTEST_XDIST_WORKER" in os.environ else "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# `make test` runs two pytest-xdist workers. The tests that start Ray clusters in the test's own process keep
# to one of them, one after another, as they ran alone (they share its cluster: tests/pipeline/conftest.py);
# the other files go whole (their module fixtures built once) to whichever worker is free, the jobs' command
# lines among them (their clusters are their subprocesses', on ports of their own).
IN_PROCESS_RAY = ("tests/pipeline/", "tests/jobs/test_evaluate_model.py", "tests/model/test_parallel_ray.py")


def work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "ray" if path.startswith(IN_PROCESS_RAY) else path


@pytest.hookimpl(optionalhook=True)       # pytest-xdist's hook: absent without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class RayApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return RayApart(config, log)
