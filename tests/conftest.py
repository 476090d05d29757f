import os
import sys
from pathlib import Path

# Two cores are shared by every test process: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# Tests that start Ray clusters or jobs: under pytest-xdist (`make test` runs two workers) they run one
# after another on one worker, so that they share its cluster and no two clusters race for the cores;
# the rest (torch in one process: one core each) spread over the workers.
RAY_FOLDERS = {"pipeline", "jobs"}
RAY_MODULES = {"test_parallel_ray.py"}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.path.parent.name in RAY_FOLDERS or item.path.name in RAY_MODULES:
            item.add_marker(pytest.mark.xdist_group("ray"))
