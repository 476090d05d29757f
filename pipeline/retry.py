"""Error rows answered again: a resumed run with `retry_errors` first takes the output's error rows
(those whose error holds a given text, or all) out of its files, and then, as for any output row
that went missing, the resume's `forget_lost_rows` takes their ids out of the checkpoint, so the
run answers them again. Rows that failed for a passing reason (an image server's outage, a
throttled bucket, a dead node) get their answers without re-running the rest.

A file is rewritten whole, without those rows (a local one through a temporary file and a rename;
an object store's PUT replaces an object at once); a file left empty is deleted. A run killed
after this and before its end loses nothing: the next resume finds the ids missing and answers them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .io import parquet_files
from .resume import replace_table
from .storage import fsspec_fs, is_local

READ_THREADS = 16


def retried(table: pa.Table, matching: str) -> pa.Array:
    """True for the error rows to answer again: all of them, or those whose error holds `matching`."""
    failed = pc.equal(table["finish_reason"], "error")
    if matching:
        failed = pc.and_(failed, pc.fill_null(pc.match_substring(table["error"].cast(pa.string()), matching), False))
    return pc.fill_null(failed, False)


def drop_error_rows(output: str, storage_options: dict | None = None, matching: str = "") -> int:
    """Takes the error rows (whose error holds `matching`, if given) out of the output's files;
    returns how many."""
    fs, path = fsspec_fs(output, storage_options)
    files = parquet_files(output, storage_options) if fs.exists(path) else []     # killed before its first file

    def count(path: str) -> int:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["finish_reason", "error"])
        return pc.sum(retried(table, matching)).as_py() or 0

    with ThreadPoolExecutor(READ_THREADS) as pool:
        counts = list(pool.map(count, files))
    for path in [p for p, n in zip(files, counts) if n]:
        _rewrite_without(fs, path, matching, is_local(output))
    return sum(counts)


def _rewrite_without(fs, path: str, matching: str, local: bool) -> None:
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    replace_table(fs, path, table.filter(pc.invert(retried(table, matching))), local)
