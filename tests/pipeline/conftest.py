import pytest

from tests.fixtures.checkpoints import build_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("smolvlm"), "smolvlm")


@pytest.fixture(scope="session")
def oracle(checkpoint):
    from tests.pipeline.helpers import Oracle
    return Oracle(checkpoint)


@pytest.fixture(scope="module")
def ray_cluster():
    """One real local Ray cluster per test module."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
