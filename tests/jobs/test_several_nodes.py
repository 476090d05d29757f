"""A job on a Ray cluster of two nodes, the second with a disk of its own: `ray start` of a worker node in a
mount namespace where a tmpfs hides one folder of this machine's, as another machine lacks the driver's
local folders. A run whose local paths lie there is refused before any work, naming the node; a run on
folders both nodes see answers every row."""
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.fixtures.checkpoints import build_checkpoint
from tests.jobs.ray_nodes import BIN, agent_port_flags, wait_for_start
from tests.pipeline.helpers import free_port, good_rows, write_parquet

REPO = Path(__file__).resolve().parents[2]


def can_hide_folders() -> bool:
    """Whether this process may make a mount namespace and mount in it (root, or CAP_SYS_ADMIN)."""
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "none", "/mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not can_hide_folders(), reason="needs mount namespaces (unshare -m) to hide a folder")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(env of a job joining the cluster, the folder the second node does not see)."""
    base = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))     # short: Ray's socket paths live under it
    hidden = tmp_path_factory.mktemp("driver-disk")
    (base / "token").write_text(secrets.token_hex(32))
    port = free_port()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1", RAY_TMPDIR=str(base),
               RAY_AUTH_TOKEN_PATH=str(base / "token"), RAY_AUTH_MODE="token", RAY_ADDRESS=f"127.0.0.1:{port}")
    ray = [str(BIN / "ray"), "start", "--block", "--num-cpus=2", "--disable-usage-stats"]
    own = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}     # the nodes': RAY_ADDRESS is the jobs'
    started = []
    try:
        with open(base / "head.log", "w") as log:
            started.append(subprocess.Popen(
                ray + agent_port_flags() + ["--head", f"--port={port}", f"--temp-dir={base / 'ray'}",
                                            "--include-dashboard=false", f"--ray-client-server-port={free_port()}"],
                env=own, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        wait_for_start(started[0], base / "head.log")
        hide = f"mount -t tmpfs none {hidden} && exec \"$@\""
        with open(base / "node.log", "w") as log:
            started.append(subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", hide, "sh",
                 *ray, *agent_port_flags(), f"--address=127.0.0.1:{port}"],
                env=own, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        wait_for_start(started[1], base / "node.log")
        yield env, hidden
    finally:
        for node in started:
            try:
                os.killpg(node.pid, signal.SIGKILL)     # its raylet and workers too, when `ray start` is gone
            except ProcessLookupError:
                pass
            node.wait()
        shutil.rmtree(base, ignore_errors=True)


def caption(env: dict, folder: Path, output: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.caption", "--input", str(folder / "in.parquet"),
                           "--output", str(output or folder / "out"), "--model", str(folder / "ckpt"),
                           "--max-new-tokens", "3",
                           "--device", "cpu", "--no-compile", "--show", "0"],
                          cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)


def dataset_in(folder: Path, rows: int) -> Path:
    build_checkpoint(folder / "ckpt", "smolvlm")
    write_parquet(folder / "in.parquet", good_rows(rows))
    return folder


@pytest.mark.slow
def test_a_run_on_this_machines_own_folders_is_refused_naming_the_node_that_lacks_them(two_nodes):
    env, hidden = two_nodes
    folder = dataset_in(hidden, 4)
    done = caption(env, folder)
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "of the cluster does not see this machine's files" in error[0], done.stderr[-3000:]
    for seen in (f"--output (its run manifest): {folder}/out.run.json does not exist there",
                 f"--input: {folder}/in.parquet does not exist there", f"--model: {folder}/ckpt/"):
        assert seen in error[0]
    assert "name folders all nodes share (NFS, a mounted volume) or an object store's URLs" in error[0]
    assert not list(folder.glob("out/*.parquet"))      # refused before any work


@pytest.mark.slow
def test_a_run_on_folders_every_node_sees_answers_every_row(two_nodes, tmp_path):
    env, _ = two_nodes
    done = caption(env, dataset_in(tmp_path, 6))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert sorted(pads.dataset(tmp_path / "out").to_table().column("id").to_pylist()) == \
        [f"row-{i}" for i in range(6)]


@pytest.mark.slow
def test_an_output_only_this_machine_sees_is_refused_once_asked_again_for_a_minute(two_nodes, tmp_path):
    """The input and the model both nodes see; the output's folder the second lacks. Its run manifest, just
    written, is asked of the node again for a minute (a shared file system may show it that late) before
    the run is refused."""
    env, hidden = two_nodes
    start = time.monotonic()
    done = caption(env, dataset_in(tmp_path, 2), output=hidden / "only-here")
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    assert time.monotonic() - start > 62
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    refusal = (r"error: node [\d.]+ \(id \w{8}\) of the cluster does not see this machine's files: --output \(its "
               rf"run manifest\): {hidden}/only-here\.run\.json does not exist there\. Every node works on the run: .*")
    assert len(error) == 1 and re.fullmatch(refusal, error[0]), done.stderr[-3000:]
