"""The driver's id check on S3: what it costs in time and bytes, today against the way before.

    .venv/bin/python bench/input_checks.py [--files 300] [--rows 100] [--latency-ms 30] [--rounds 3]

moto's S3 server on loopback, each request delayed by `--latency-ms` in the client (an
aiobotocore call waits that long first; moto itself answers at once). Two inputs:

- many files: `--files` Parquet files of `--rows` rows of image paths (ids, paths, questions);
- inline images: one file of 40 rows of 500 KB images and 500 KB of another column, in row
  groups of 10 (a dataset that keeps its images in its rows).

Two id checks over each, after the footers are read (both need them):
- before (until stop 27): an Arrow dataset scan of the id column through pyarrow's FSSpecHandler
  (fsspec's read-ahead files, s3fs's 50 MB blocks);
- now: `pipeline.io.read_column` (each file's id column, its footer known, 32 files at once)
  through `pipeline.storage.ExactReads` (each read the byte range Arrow asks for).
Seconds are the best of `--rounds`; bytes are those the GETs returned.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fetch import moto_s3  # noqa: E402
from bench.linear import cpu_name  # noqa: E402
from pipeline.io import parquet_files, read_column, read_footers  # noqa: E402
from pipeline.storage import fsspec_fs  # noqa: E402

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
    files = {}
    for i in range(args.files):
        ids = [f"{i}-{j}" for j in range(args.rows)]
        files[f"/many/part-{i:05d}.parquet"] = parquet_bytes(pa.table(
            {"id": ids, "image": [f"images/{k}.jpg" for k in ids], "question": ["Describe this image."] * args.rows}),
            args.rows)
    inline = pa.table({"id": [f"r{j}" for j in range(40)], "image": [os.urandom(500_000) for _ in range(40)],
                       "embedding": [os.urandom(500_000) for _ in range(40)]})
    files["/inline/part-0.parquet"] = parquet_bytes(inline, 10)
    _, moto = moto_s3(files)
    delay_every_request(args.latency_ms / 1000)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; moto on loopback, {args.latency_ms:g} ms a request; "
          f"best of {args.rounds}\n")
    print("| input | id check | seconds | requests | bytes fetched |\n|---|---|---|---|---|")
    for name, uri in ((f"{args.files} files x {args.rows} rows", "s3://bench/many/"),
                      ("40 inline images, 40 MB", "s3://bench/inline/")):
        before = measure(ids_before, uri, args.rounds)
        now = measure(ids_now, uri, args.rounds)
        assert before[1] == now[1], "the two checks read other rows"
        for label, (seconds, _, requests, fetched) in (("before", before), ("now", now)):
            print(f"| {name} | {label} | {seconds:.2f} | {requests} | {fetched / 1e6:.2f} MB |")
    moto.stop()


if __name__ == "__main__":
    main()
