"""Ray nodes started as a user starts them (`ray start`), on this machine, for tests of a job joining them."""
import subprocess
import sys
import time
from pathlib import Path

from tests.pipeline.helpers import free_port

BIN = Path(sys.executable).parent


def agent_port_flags() -> list[str]:
    """Free ports for a node's agents: the defaults (52365, ...) collide with any other Ray on the box,
    and then the job agent never comes up ("No available agent to submit job")."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def wait_for_start(node: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until `ray start --block` says its node runs."""
    deadline = time.time() + timeout
    while "Ray runtime started" not in (log.read_text() if log.exists() else ""):
        assert node.poll() is None, f"ray start exited: {log.read_text()[-2000:]}"
        assert time.time() < deadline, f"no Ray node after {timeout} s: {log.read_text()[-2000:]}"
        time.sleep(0.5)
