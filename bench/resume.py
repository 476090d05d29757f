"""What a resume's check of the checkpoint costs over a large output (pipeline.resume.forget_lost_rows):
N output files of 1000 ids, their N checkpoint files, one id lost. Driver side, no cluster.

    python bench/resume.py --files 500
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


def main(files: int) -> None:
    root = Path(tempfile.mkdtemp()) / "out"
    checkpoint = Path(checkpoint_uri(str(root)))
    root.mkdir()
    checkpoint.mkdir()
    for f in range(files):
        ids = [f"id-{f}-{i}" for i in range(ROWS)]
        pq.write_table(pa.table({"id": ids[:-1] if f == 7 else ids}), root / f"part-{f}.parquet")
        pq.write_table(pa.table({"id": ids}), checkpoint / f"k{f}.parquet")
    start = time.perf_counter()
    lost = forget_lost_rows(str(root))
    print(f"{files} files of {ROWS} ids: {lost} lost id found in {time.perf_counter() - start:.2f} s")
    shutil.rmtree(root.parent)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=500, help="output files (and checkpoint files) of 1000 ids")
    main(parser.parse_args().files)
