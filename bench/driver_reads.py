"""What the driver reads on S3 before and after a run, today against the way before (stop 27).

    .venv/bin/python bench/driver_reads.py [--files 300] [--rows 100] [--latency-ms 30] [--rounds 3]

moto's S3 server on loopback in its own process, each request delayed by `--latency-ms` in the
client (an aiobotocore call waits that long first; moto itself answers at once).

The id check, over two inputs:

- many files: `--files` Parquet files of `--rows` rows of image paths (ids, paths, questions);
- inline images: one file of 40 rows of 500 KB images and 500 KB of another column, in row
  groups of 10 (a dataset that keeps its images in its rows).

Two id checks over each, after the footers are read (both need them):
- before (until stop 27): an Arrow dataset scan of the id column through pyarrow's FSSpecHandler
  (fsspec's read-ahead files, s3fs's 50 MB blocks);
- now: `pipeline.io.read_column` (each file's id column, its footer known, 32 files at once)
  through `pipeline.storage.ExactReads` (each read the byte range Arrow asks for).

The output's reads, over `--files` output files and their Ray checkpoint files:
- the summary's counts (`job.output_counts`, before and after every run): before, an Arrow dataset
  scan (8 files at a time); now `io.read_output`, 32 files at once, each opened once;
- a resume's `resume.forget_lost_rows`: before, the checkpoint files read one at a time; now 32 at once.
Seconds are the best of `--rounds`; bytes are those the GETs returned.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.linear import cpu_name  # noqa: E402
from pipeline.io import parquet_files, read_column, read_footers  # noqa: E402
from pipeline.job import COUNTED, output_counts  # noqa: E402
from pipeline.resume import forget_lost_rows  # noqa: E402
from pipeline.storage import arrow_fs, fsspec_fs  # noqa: E402

FETCHED = {"bytes": 0, "requests": 0}


def delay_every_request(latency_s: float) -> None:
    import s3fs

    call = s3fs.S3FileSystem._call_s3

    async def delayed(self, method, *args, **kwargs):
        await asyncio.sleep(latency_s)
        out = await call(self, method, *args, **kwargs)
        FETCHED["requests"] += 1
        FETCHED["bytes"] += out.get("ContentLength", 0) if method == "get_object" else 0
        return out

    s3fs.S3FileSystem._call_s3 = delayed


def ids_before(uri: str, footers: dict) -> pa.ChunkedArray:
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs(uri)[0]))
    return pads.dataset(parquet_files(uri), filesystem=filesystem, format="parquet").to_table(columns=["id"])["id"]


def ids_now(uri: str, footers: dict) -> pa.ChunkedArray:
    return read_column(footers, pa.field("id", pa.string()), uri)


def counts_before(uri: str) -> int:
    filesystem, path = arrow_fs(uri)
    return pads.dataset(path, filesystem=filesystem, format="parquet").to_table(columns=COUNTED).num_rows


def forget_before(uri: str) -> int:
    """The output's ids by a dataset scan and the checkpoint files one at a time, as forget_lost_rows
    read them (nothing is lost here)."""
    filesystem, path = arrow_fs(uri)
    pads.dataset(path, filesystem=filesystem, format="parquet").to_table(columns=["id"])
    fs, folder = fsspec_fs(uri + ".checkpoint")
    rows = 0
    for path in fs.glob(f"{folder}/*.parquet"):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).num_rows
    return rows


def moto_server(files: dict[str, bytes]) -> subprocess.Popen:
    """moto in its own process (its request handling would hold this one's GIL), holding `files`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    fs, _ = fsspec_fs("s3://bench")
    for _ in range(100):
        try:
            fs.mkdir("bench")
            break
        except Exception:       # not listening yet
            time.sleep(0.1)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: fs.pipe(f"bench{item[0]}", item[1]), files.items()))
    return server


def output_files(n: int, rows: int) -> dict[str, bytes]:
    files = {}
    for i in range(n):
        ids = [f"{i}-{j}" for j in range(rows)]
        files[f"/out/part-{i:05d}.parquet"] = parquet_bytes(pa.table(
            {"id": ids, "answer": ["a red circle at top left"] * rows, "finish_reason": ["stop"] * rows,
             "error": pa.nulls(rows, pa.string()), "num_generated_tokens": [7] * rows}), rows)
        files[f"/out.checkpoint/part-{i:05d}.parquet"] = parquet_bytes(pa.table({"id": ids}), rows)
    return files


def timed(read, uri: str, rounds: int) -> tuple[float, int]:
    best = float("inf")
    for _ in range(rounds):
        FETCHED.update(bytes=0, requests=0)
        start = time.perf_counter()
        read(uri)
        best = min(best, time.perf_counter() - start)
    return best, FETCHED["requests"]


def parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def measure(check, uri: str, rounds: int) -> tuple[float, int, int, int]:
    """(best seconds, rows, requests, bytes) of the id check after the footers, as prepare_job runs it."""
    best = float("inf")
    for _ in range(rounds):
        footers = read_footers(uri)
        FETCHED.update(bytes=0, requests=0)
        start = time.perf_counter()
        ids = check(uri, footers)
        best = min(best, time.perf_counter() - start)
    return best, len(ids), FETCHED["requests"], FETCHED["bytes"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=300)
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--latency-ms", type=float, default=30.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    files: dict[str, bytes] = {}
    for i in range(args.files):
        ids = [f"{i}-{j}" for j in range(args.rows)]
        files[f"/many/part-{i:05d}.parquet"] = parquet_bytes(pa.table(
            {"id": ids, "image": [f"images/{k}.jpg" for k in ids], "question": ["Describe this image."] * args.rows}),
            args.rows)
    inline = pa.table({"id": [f"r{j}" for j in range(40)], "image": [os.urandom(500_000) for _ in range(40)],
                       "embedding": [os.urandom(500_000) for _ in range(40)]})
    files["/inline/part-0.parquet"] = parquet_bytes(inline, 10)
    files.update(output_files(args.files, args.rows))
    moto = moto_server(files)
    delay_every_request(args.latency_ms / 1000)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; moto on loopback (its own process), {args.latency_ms:g} ms a "
          f"request; best of {args.rounds}\n")
    print("| input | id check | seconds | requests | bytes fetched |\n|---|---|---|---|---|")
    for name, uri in ((f"{args.files} files x {args.rows} rows", "s3://bench/many/"),
                      ("40 inline images, 40 MB", "s3://bench/inline/")):
        before = measure(ids_before, uri, args.rounds)
        now = measure(ids_now, uri, args.rounds)
        assert before[1] == now[1], "the two checks read other rows"
        for label, (seconds, _, requests, fetched) in (("before", before), ("now", now)):
            print(f"| {name} | {label} | {seconds:.2f} | {requests} | {fetched / 1e6:.2f} MB |")
    print(f"\n| {args.files} output files | before (s) | now (s) | requests before | requests now |\n|---|---|---|---|---|")
    for name, before, now in (("summary counts", counts_before, lambda uri: output_counts(uri)),
                              ("resume: forget lost rows", forget_before, lambda uri: forget_lost_rows(uri))):
        (old_s, old_n), (new_s, new_n) = timed(before, "s3://bench/out", args.rounds), timed(now, "s3://bench/out", args.rounds)
        print(f"| {name} | {old_s:.2f} | {new_s:.2f} ({old_s / new_s:.1f}x) | {old_n} | {new_n} |")
    moto.terminate()


if __name__ == "__main__":
    main()
