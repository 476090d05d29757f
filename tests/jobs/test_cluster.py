"""jobs.cluster: which Ray cluster a job runs on, as the job's user meets it (a job joining a `ray start`
head: tests/jobs/test_caption_submit.py, beside its `ray job submit`)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.common import DEMO_MODEL
from tests.pipeline.helpers import free_port, png, write_parquet

REPO = Path(__file__).resolve().parents[2]


def test_a_ray_start_cluster_that_is_gone_is_named_not_waited_for(tmp_path):
    """Its address file outlived it (a head killed without `ray stop`): ray.init retried it for minutes."""
    port = free_port()      # no cluster answers there
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    write_parquet(tmp_path / "in.parquet", [{"image": png(24, 24), "question": "Row?"}])
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path), PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS")      # tests/conftest's "local"
    done = subprocess.run([sys.executable, "-m", "jobs.caption", "--input", str(tmp_path / "in.parquet"), "--output",
                           str(tmp_path / "out"), "--model", str(DEMO_MODEL)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: the Ray cluster `ray start` made at 127.0.0.1:{port} does not answer within 5 s: stopped without "
        f"`ray stop`? Remove its address file {tmp_path}/ray/ray_current_cluster, or set RAY_ADDRESS=local for a new "
        "cluster")


def test_a_ray_client_address_is_refused_with_the_way_to_submit_the_job(monkeypatch):
    """Ray Client connects, then the run's writes failed deep in Ray Data (no core worker in the driver)."""
    from jobs.cluster import cluster_to_join

    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.5:10001")
    with pytest.raises(ValueError, match=r"^RAY_ADDRESS=ray://10.0.0.5:10001: a Ray Client address, .* ray job submit"):
        cluster_to_join()


def test_a_local_cluster_counts_the_cpus_a_container_gives_not_the_hosts(monkeypatch):
    import ray._private.utils as ray_utils

    from jobs.cluster import LOCAL_MIN_CPUS, local_cpus

    monkeypatch.delenv("RAY_USE_MULTIPROCESSING_CPU_COUNT", raising=False)
    monkeypatch.setattr(ray_utils.multiprocessing, "cpu_count", lambda: 64)
    for limit, cpus in ((None, 64), (6.0, 6), (1.5, LOCAL_MIN_CPUS)):   # cgroup's cpu.max: none, 6, 1.5 CPUs
        monkeypatch.setattr(ray_utils, "_get_docker_cpus", lambda: limit)
        assert local_cpus() == cpus


@pytest.mark.parametrize("signame, raised", [("SIGINT", "KeyboardInterrupt"), ("SIGTERM", "Interrupted")])
def test_a_stop_inside_ray_init_stops_the_job_once_the_cluster_is_up(signame, raised):
    """Ctrl-C while ray.init starts the cluster landed once (CI) in logging's at-fork lock release: Python
    ignored it and the job hung on the lock. It is held until ray.init returns, then stops the job; so is
    a SIGTERM, which ray.init's own handler (set first thing) ended with status 15 and no word."""
    code = ("import os, signal, threading, ray\n"
            "from jobs.cluster import init_ray\n"
            "from jobs.common import Interrupted, stop_on_signals\n"
            "stop_on_signals()\n"
            f"threading.Timer(1.0, os.kill, (os.getpid(), signal.{signame})).start()\n"
            "try:\n    init_ray()\n"
            "except (KeyboardInterrupt, Interrupted) as e:\n"
            "    print('stopped after ray.init:', ray.is_initialized(), type(e).__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=180)
    assert f"stopped after ray.init: True {raised}" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.parametrize("ignored", [False, True])
def test_a_hang_up_stops_the_job_unless_it_was_started_ignoring_it(ignored):
    """`nohup python -m jobs.caption ... &`: the job set its own SIGHUP handler over nohup's SIG_IGN, and a
    closed terminal stopped a run that was to outlive it."""
    code = ("import os, signal\n"
            "from jobs.common import Interrupted, stop_on_signals, stops_held\n"
            "stop_on_signals()\n"
            "try:\n"
            "    with stops_held():\n"
            "        os.kill(os.getpid(), signal.SIGHUP)\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    stop_on_signals()\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    print('went on')\n"
            "except Interrupted as e:\n"
            "    print('stopped by', e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignored else None)
    assert done.stdout.strip() == ("went on" if ignored else "stopped by SIGHUP"), done.stdout + done.stderr


def test_more_cpu_workers_than_a_started_cluster_has_cpus_is_one_line_before_it_starts(tmp_path, monkeypatch, capsys):
    """--cpu-workers 50 on a 4-CPU machine: 50 processes stalled it (Ray's workers lost their GCS) for minutes."""
    import ray

    import jobs.caption
    import jobs.cluster
    import jobs.evaluate

    ray.shutdown()      # a cluster another module of this process left (tests/pipeline's): the job would join it
    monkeypatch.setattr(jobs.cluster, "local_cpus", lambda: 4)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(jobs.cluster, "cluster_to_join", lambda: None)
    write_parquet(tmp_path / "in.parquet", [{"image": png(20, 24), "question": "Row?"}])
    args = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--model", str(DEMO_MODEL)]
    refusal = ["error: --cpu-workers 5: the cluster this job starts has 4 CPUs (this machine's, at least 4), "
               "5 workers of 1 CPU would need 5: use at most 4, or submit the job to a larger cluster (RAY_ADDRESS)"]
    assert jobs.caption.main([*args, "--cpu-workers", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == refusal
    # before the output is prepared: a run that starts over had removed the earlier run's answers first
    earlier = tmp_path / "scored" / "raw" / "part-0.parquet"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's answers")
    write_parquet(tmp_path / "bench.parquet", [{"image": png(20, 24), "question": "Row?", "answers": ["a row"]}])
    evaluate = ["--input", str(tmp_path / "bench.parquet"), "--output", str(tmp_path / "scored"), "--model",
                str(DEMO_MODEL), "--metric", "exact_match", "--overwrite", "--cpu-workers", "5"]
    assert jobs.evaluate.main(evaluate) == 2
    assert capsys.readouterr().err.strip().splitlines() == refusal
    assert earlier.read_bytes() == b"an earlier run's answers"
    assert not ray.is_initialized()



def test_a_local_cluster_that_does_not_start_is_one_line(monkeypatch):
    """On a busy machine ray.init raised "The current node timed out during startup": the job ended in
    a traceback. It is the run's own failure, in one line (exit 1), saying what to do."""
    import ray

    import jobs.cluster
    from pipeline.errors import StartFailed

    ray.shutdown()
    monkeypatch.setattr(jobs.cluster, "cluster_to_join", lambda: None)

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", timed_out)
    with pytest.raises(StartFailed, match=r"the local Ray cluster did not start \(Exception: The current node timed "
                                          r"out during startup\.\): a busy machine\? Run the job again"):
        jobs.cluster.init_ray()
