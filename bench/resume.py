"""What a resume costs over a large output, driver side, no cluster: N output files of 1000 ids and
their N checkpoint files, one id lost.

    python bench/resume.py --files 500            # the checkpoint's check (pipeline.resume.forget_lost_rows)
    python bench/resume.py --files 2000 --whole   # a whole resume of a finished run (prepare_job, run_prepared)
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.resume import checkpoint_uri, forget_lost_rows  # noqa: E402

ROWS = 1000


def write_output(root: Path, files: int, lost: int | None) -> list[str]:
    """An output of `files` files of ROWS rows and their checkpoint files (file `lost` short of one row)."""
    checkpoint = Path(checkpoint_uri(str(root)))
    root.mkdir(exist_ok=True)
    checkpoint.mkdir(exist_ok=True)
    every = []
    for f in range(files):
        ids = [f"id-{f}-{i}" for i in range(ROWS)]
        written = ids[:-1] if f == lost else ids
        n = len(written)
        pq.write_table(pa.table({"id": written, "answer": ["x"] * n, "finish_reason": ["stop"] * n,
                                 "error": pa.nulls(n, pa.string()), "num_generated_tokens": [1] * n}),
                       root / f"part-{f}.parquet")
        pq.write_table(pa.table({"id": ids}), checkpoint / f"k{f}.parquet")
        every += written
    return every


def whole_resume(root: Path, files: int) -> None:
    """A finished run's output resumed: prepare_job and run_prepared, nothing left to answer."""
    from jobs.common import DEMO_MODEL
    from pipeline import PipelineConfig
    from pipeline.job import prepare_job, run_prepared
    from tests.pipeline.helpers import png, write_parquet

    ids = [f"id-{f}-{i}" for f in range(files) for i in range(ROWS)]
    image = png(24, 24)
    write_parquet(root.parent / "in.parquet", [{"id": i, "image": image, "question": "Q?"} for i in ids])
    config = PipelineConfig(model=str(DEMO_MODEL))
    prepare_job(str(root.parent / "in.parquet"), str(root), config).output_lock.release()   # the run's manifest
    write_output(root, files, None)
    start = time.perf_counter()
    summary = run_prepared(prepare_job(str(root.parent / "in.parquet"), str(root), config, resume=True))
    print(f"{files} files of {ROWS} rows, finished: resumed in {time.perf_counter() - start:.2f} s "
          f"({summary['rows']} rows, {summary['missing_rows']} missing)")


def main(files: int, whole: bool) -> None:
    root = Path(tempfile.mkdtemp()) / "out"
    if whole:
        whole_resume(root, files)
    else:
        write_output(root, files, lost=7)
        start = time.perf_counter()
        lost = forget_lost_rows(str(root))
        print(f"{files} files of {ROWS} ids: {lost} lost id found in {time.perf_counter() - start:.2f} s")
    shutil.rmtree(root.parent)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=500, help="output files (and checkpoint files) of 1000 ids")
    parser.add_argument("--whole", action="store_true", help="time a whole resume of a finished output")
    args = parser.parse_args()
    main(args.files, args.whole)
