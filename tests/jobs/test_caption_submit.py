"""A `ray start --head` cluster on localhost: `ray job submit --working-dir . -- python -m jobs.caption ...` to it,
and a job typed on its machine without RAY_ADDRESS, which joins it as ray.init() does."""
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.fixtures.checkpoints import build_checkpoint
from tests.jobs.ray_nodes import agent_port_flags
from tests.pipeline.helpers import free_port, good_rows, write_parquet

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:      # 401 without the token: up all the same
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {url}")


@pytest.fixture(scope="module")
def cluster():
    """A head node in its own session and temp dir; stopped by killing that process group only
    (`ray stop` would stop every Ray cluster on the machine). RAY_TMPDIR (in place of /tmp): the address
    file of its `ray start`, which a ray.init() without an address reads, is not the machine's
    /tmp/ray/ray_current_cluster, where tests beside this one would find it. With a token at hand and
    RAY_AUTH_MODE unset, as on a machine where any Ray has run, the head asks for the token."""
    base = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    temp = Path(base) / "ray"       # Ray's temp dir under RAY_TMPDIR
    (Path(base) / "token").write_text(secrets.token_hex(32))
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1", RAY_TMPDIR=base,
               RAY_AUTH_TOKEN_PATH=f"{base}/token")
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):   # tests/conftest's RAY_ADDRESS=local: a user's shell has none
        env.pop(name, None)
    dashboard = free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4", f"--temp-dir={temp}",
         "--disable-usage-stats", *agent_port_flags(), f"--ray-client-server-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(url, head)
        yield url, env, temp
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(base, ignore_errors=True)     # its logs and sockets: the processes that wrote them are gone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("smolvlm"), "smolvlm")


def submit(url: str, env: dict, job: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python -m jobs.caption <job>`, from the repository."""
    runtime_env = '{"excludes": [".venv", ".git", "*.egg-info", ".pytest_cache"]}'
    command = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--runtime-env-json",
               runtime_env, "--", "python", "-m", "jobs.caption", *job]
    deadline = time.time() + 240  # the dashboard answers before the head's job agent is up, on a busy machine
    while True:
        done = subprocess.run(command, cwd=REPO, env=dict(env, RAY_AUTH_MODE="token"), capture_output=True,
                              text=True, timeout=420)     # the CLI sends the token only when told to
        if "No available agent" not in done.stderr or time.time() > deadline:
            return done
        time.sleep(3)


@pytest.mark.slow
def test_ray_job_submit_runs_the_job_to_completion(cluster, checkpoint, tmp_path):
    url, env, _ = cluster
    write_parquet(tmp_path / "in.parquet", good_rows(4))
    done = submit(url, env, ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                             "--model", str(checkpoint), "--max-new-tokens", "3"])
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "succeeded" in done.stdout
    table = pads.dataset(tmp_path / "out").to_table()
    assert sorted(table.column("id").to_pylist()) == [f"row-{i}" for i in range(4)]
    assert (tmp_path / "out.summary.json").exists()


@pytest.mark.slow
def test_a_relative_output_of_a_submitted_job_is_refused_as_it_lies_in_rays_copy_of_the_working_dir(
        cluster, checkpoint, tmp_path):
    """It was answered into /tmp/ray/session_*/runtime_resources/working_dir_files/_ray_pkg_*/out, which Ray
    deletes once unused, and which a job of other code does not run in."""
    url, env, _ = cluster
    write_parquet(tmp_path / "in.parquet", good_rows(2))
    done = submit(url, env, ["--input", str(tmp_path / "in.parquet"), "--output", "out/captions",
                             "--model", str(checkpoint), "--max-new-tokens", "3"])
    assert done.returncode != 0 and "failed" in done.stdout, (done.stdout + done.stderr)[-3000:]
    copy = re.search(r"lies in this job's copy of its --working-dir \((/\S+/_ray_pkg_\w+)\), which Ray made "
                     r"for the job", done.stdout)
    assert copy, done.stdout[-3000:]
    assert f"error: output '{copy.group(1)}/out/captions' lies" in done.stdout
    assert not Path(copy.group(1), "out").exists()      # refused before anything was written


@pytest.mark.slow
def test_a_job_without_ray_address_joins_the_cluster_ray_start_made(cluster, checkpoint, tmp_path):
    """As ray.init() does (a job passing num_cpus to it was refused: "When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided"; one passing its address missed the head's token auth)."""
    _, env, temp = cluster
    write_parquet(tmp_path / "in.parquet", good_rows(2))
    done = subprocess.run([sys.executable, "-m", "jobs.caption", "--input", str(tmp_path / "in.parquet"),
                           "--output", str(tmp_path / "out"), "--model", str(checkpoint), "--max-new-tokens", "3"],
                          cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    address = (temp / "ray_current_cluster").read_text().strip()
    joined = f"joining the Ray cluster at {address} (`ray start`'s; RAY_ADDRESS=local for a new one)"
    assert joined in done.stderr, done.stderr[:3000]
    assert sorted(pads.dataset(tmp_path / "out").to_table().column("id").to_pylist()) == ["row-0", "row-1"]
