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
from .rows import error_kind
from .storage import fsspec_fs, is_local

READ_THREADS = 16


def retried(table: pa.Table, matching: str, only_ids: pa.Array | None = None) -> pa.Array:
    """True for the error rows to answer again: all of them, or those whose error or its kind (as the
    summary's errors_by_kind counts it: "read image: FileNotFoundError") holds `matching`, in any
    case; with `only_ids` (text), those of the rows the run answers only."""
    failed = pc.fill_null(pc.equal(table["finish_reason"], "error"), False)
    if matching:
        failed = pc.and_(failed, pa.array([bool(f) and _holds(e, matching)
                                           for f, e in zip(failed.to_pylist(), table["error"].to_pylist())],
                                          pa.bool_()))
    if only_ids is not None:
        failed = pc.and_(failed, pc.is_in(pc.cast(table["id"], pa.string()), value_set=only_ids))
    return pc.fill_null(failed, False)


def _holds(error: object, matching: str) -> bool:
    text = "" if error is None else str(error)
    return matching.lower() in text.lower() or matching.lower() in error_kind(text).lower()


def drop_error_rows(output: str, storage_options: dict | None = None, matching: str = "",
                    only_ids: list[str] | None = None) -> int:
    """Takes the error rows (whose error holds `matching`, if given; of the ids `only_ids`, if given:
    a run answers no others again) out of the output's files; returns how many."""
    fs, path = fsspec_fs(output, storage_options)
    files = parquet_files(output, storage_options) if fs.exists(path) else []     # killed before its first file
    ids = None if only_ids is None else pa.array(list(only_ids), pa.string())

    def count(path: str) -> int:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["id", "finish_reason", "error"])
        return pc.sum(retried(table, matching, ids)).as_py() or 0

    with ThreadPoolExecutor(READ_THREADS) as pool:
        counts = list(pool.map(count, files))
    for path in [p for p, n in zip(files, counts) if n]:
        _rewrite_without(fs, path, matching, ids, is_local(output))
    return sum(counts)


def _rewrite_without(fs, path: str, matching: str, ids: pa.Array | None, local: bool) -> None:
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    replace_table(fs, path, table.filter(pc.invert(retried(table, matching, ids))), local)
