"""The driver and the CPU-stage actors never import torch: each CPU actor would carry ~180 MB of it
and seconds more to start, for code that decodes and tiles images with Pillow and numpy; nor aiohttp
on a local dataset (0.25 CPU-s of each CPU actor's start, for images read over HTTP or S3). A model
replica that does not compile (on CPU, by default) never imports torch's compiler nor sympy: ~3 CPU-s
of its start."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WITHOUT_TORCH = """
import sys

import pyarrow.parquet as pq

import jobs.caption, jobs.evaluate
from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline.config import PipelineConfig
from pipeline.job import prepare_job
from pipeline.preprocess import Preprocess

config = PipelineConfig(model=str(DEMO_MODEL))
job = prepare_job(str(DEMO_INPUT), sys.argv[1], config)
rows = Preprocess(job.config)(pq.read_table(DEMO_INPUT).slice(0, 4))
errors = [e for group in rows.column("error").to_pylist() for e in group]     # rows about one image: a list
assert errors == [None] * 4, errors
assert all(ids for group in rows.column("input_ids").to_pylist() for ids in group)
print("torch" in sys.modules, "aiohttp" in sys.modules)
"""


def test_the_driver_and_the_cpu_stage_run_without_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False False", f"imported by the driver's checks or the CPU stage (torch, aiohttp): " \
                                                 f"{done.stdout.strip()}"


def test_the_cpu_stage_with_the_torch_recipe_still_works(tmp_path):
    """The torch recipe imports torch when it is chosen, not before."""
    script = WITHOUT_TORCH.replace("PipelineConfig(model=str(DEMO_MODEL))",
                                   "PipelineConfig(model=str(DEMO_MODEL), image_backend='torch')")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split()[0] == "True"


MODEL_STAGE = """
import asyncio
import sys

import pyarrow.parquet as pq

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline.config import PipelineConfig
from pipeline.generate import Generate
from pipeline.preprocess import Preprocess

config = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=4, device="cpu")
stage = Generate(config)
answered = asyncio.run(stage(Preprocess(config)(pq.read_table(DEMO_INPUT).slice(0, 2))))
stage.loop.close()
assert answered.column("error").to_pylist() == [None, None], answered.column("error")
print("torch._dynamo" in sys.modules, "sympy" in sys.modules, sys.modules["ray"].is_initialized())
"""


def test_a_replica_that_does_not_compile_never_imports_the_compiler():
    """from_pretrained builds on meta (whose normal_ and arithmetic import torch._dynamo, and whose
    empty_like sympy) and the engine loop's watchdog counts compile time (dynamo's callbacks): none of
    them imports either until a compile. Nor does a stage made outside Ray start a Ray cluster."""
    done = subprocess.run([sys.executable, "-c", MODEL_STAGE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *imported, ray_started = done.stdout.strip().splitlines()[-1].split()
    assert imported == ["False", "False"], \
        f"imported by a replica that does not compile (torch._dynamo, sympy): {imported}"
    assert ray_started == "False"
