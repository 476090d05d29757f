"""Benchmark: the peak memory (RSS) of each kind of Ray worker process while a caption job runs,
and the job's wall time. Compare two checkouts by running it in each.

    python bench/worker_memory.py                       # the demo model and data, 16 rows
    python bench/worker_memory.py --repo /path/to/other/checkout --rows 64

Runs `python -m jobs.caption` (its own local Ray instance) in `--repo`, samples /proc every 0.2 s
(Linux only) and prints one line per process title (`ray::MapWorker(MapBatches(Preprocess))`, ...).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ray_workers_rss_mb() -> dict[str, int]:
    """RSS in MB of each process whose title starts with `ray::`, by title."""
    found: dict[str, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0]
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss = re.search(r"VmRSS:\s+(\d+) kB", status)
        if rss and title.startswith("ray::"):
            kind = title.split()[0]
            found[kind] = max(found.get(kind, 0), int(rss.group(1)) // 1024)
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent), help="checkout to run the job in")
    p.add_argument("--rows", type=int, default=16)
    args = p.parse_args(argv)
    output = Path(tempfile.mkdtemp()) / "answers"
    start = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "jobs.caption", "--output", str(output), "--limit", str(args.rows)],
                           cwd=args.repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak: dict[str, int] = {}
    while job.poll() is None:
        for kind, mb in ray_workers_rss_mb().items():
            peak[kind] = max(peak.get(kind, 0), mb)
        time.sleep(0.2)
    print(f"# {args.repo}: job exit {job.returncode}, {time.perf_counter() - start:.1f} s for {args.rows} rows")
    for kind, mb in sorted(peak.items(), key=lambda item: -item[1]):
        print(f"{mb:6d} MB  {kind}")
    shutil.rmtree(output.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
