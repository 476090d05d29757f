"""One run an output at a time: two resumes started at once wrote rows twice, for good (a chaos audit)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import PipelineConfig
from pipeline.job import prepare_job
from pipeline.output_lock import OutputBusyError
from tests.pipeline.helpers import good_rows, write_parquet

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def job_args(checkpoint, tmp_path):
    write_parquet(tmp_path / "in.parquet", good_rows(2))
    return str(tmp_path / "in.parquet"), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint), max_new_tokens=2)


def test_a_second_run_of_an_output_is_refused_while_the_first_holds_it(job_args, capsys, monkeypatch):
    import jobs.caption

    first = prepare_job(*job_args)
    with pytest.raises(OutputBusyError, match=rf"is being written by another run \(process {os.getpid()} on "):
        prepare_job(*job_args)
    source, output, config = job_args
    args = ["--input", source, "--output", output, "--model", config.model, "--resume"]
    monkeypatch.setattr(jobs.caption, "init_ray", lambda *a: pytest.fail("a refused run starts no cluster"))
    assert jobs.caption.main(args) == 2
    assert "is being written by another run" in capsys.readouterr().err
    first.output_lock.release()
    prepare_job(*job_args, resume=True).output_lock.release()     # the output is free again


def test_a_killed_runs_lock_is_freed_with_its_process(job_args):
    """The kernel frees the lock whatever ends the holder: a SIGKILLed run leaves none to clear by hand."""
    source, output, config = job_args
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pipeline.output_lock import OutputLock\n"
                               f"lock = OutputLock({output!r})\nprint('held', flush=True)\ntime.sleep(120)"],
                              cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=f"process {holder.pid} on "):
            prepare_job(*job_args)
    finally:
        holder.kill()
        holder.wait()
    prepare_job(*job_args).output_lock.release()
