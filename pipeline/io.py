"""Read input rows and write output rows as Parquet, on any fsspec store."""
from __future__ import annotations

import glob as globlib
import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray.data

from .storage import arrow_fs, fsspec_fs, is_local, protocol_of, reading_store

WHOLE_FILE_BYTES = 4 << 20
FOOTER_READERS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"     # Ray Data's pool reading the footers; 32 if unset
FILES_PER_FOOTER_READER = 10                              # the files Ray Data gives one of them at a time


def is_glob(uri: str, path: str) -> bool:
    """Whether the input names files by a pattern. An HTTP URL names one file: its `?` begins a
    query (a pre-signed URL's signature), not a wildcard."""
    return protocol_of(uri) not in ("http", "https") and globlib.has_magic(path)


def input_paths(uri: str, storage_options: dict | None = None) -> list[str] | str:
    """A file, a folder, or a glob -> what read_parquet takes (paths without protocol). Only
    `.parquet` files count: a dataset's folder may hold its images too."""
    fs, path = fsspec_fs(uri, storage_options)
    with reading_input(uri):
        if is_glob(uri, path):
            found = sorted(p for p in visible_matches(fs.glob(path), path) if p.endswith(".parquet"))
            if not found:
                raise FileNotFoundError(f"no Parquet file matches {uri!r}")
            return found
        if not fs.exists(path):
            raise FileNotFoundError(f"input {uri!r} does not exist")
    return path


def glob_root(pattern: str) -> str:
    """The folder a glob's fixed part names (`data/**/*.parquet`: data)."""
    return posixpath.dirname(pattern[:min(pattern.index(c) for c in "*?[" if c in pattern)])


def visible_matches(paths: list[str], pattern: str) -> list[str]:
    """A glob's matches but those with a part below its fixed folder starting with "." or "_"
    (`.ipynb_checkpoints/`, `_temporary/`), as a folder's listing leaves them out, unless the
    pattern itself names such a part."""
    root = glob_root(pattern)
    if any(part.startswith((".", "_")) for part in pattern[len(root):].split("/")):
        return paths
    return [p for p in paths if not any(part.startswith((".", "_")) for part in p[len(root):].split("/"))]


@contextmanager
def reading_input(uri: str):
    """A store's refusal while the driver looks at the input (storage.reading_store)."""
    with reading_store("input", uri):
        yield


def input_folder(uri: str, storage_options: dict | None = None) -> str:
    """The input's folder as a URI (a folder itself, a file's parent, the fixed part of a glob): where
    image paths relative to the dataset are read from."""
    fs, path = fsspec_fs(uri, storage_options)
    if is_glob(uri, path):
        path = glob_root(path)
    else:
        with reading_input(uri):
            if not fs.isdir(path):
                path = posixpath.dirname(path)
    return path if is_local(uri) else f"{protocol_of(uri)}://{path}"


def read_rows(uri: str, storage_options: dict | None = None, **read_args) -> ray.data.Dataset:
    """Input Parquet as a Dataset, with Ray Data's `row_hash` (file path + row index) for rows without id."""
    filesystem, _ = arrow_fs(uri, storage_options)
    return ray.data.read_parquet(input_paths(uri, storage_options), filesystem=filesystem,
                                 include_row_hash=True, file_extensions=["parquet"], **read_args)


@contextmanager
def footer_readers_for(files: int, cpus: float | None = None) -> Iterator[None]:
    """Ray Data reads the Parquet footers of the input (and of a resumed run's checkpoint) on a pool
    of 32 actors, each a worker process, however few the files: here one per 10 input files, up to
    32 and to the cluster's `cpus` (each reads 128 files at once), unless the environment sets the
    pool's size. A run of one small file started 32 processes (5 of a 6-row run's 17 s on 2 cores);
    one of 200 files on a 4-CPU machine, 20 (~4 GB together, for 30 s). The pool is made as the read
    is planned and the checkpoint loaded: hold this around both."""
    if FOOTER_READERS in os.environ:
        yield
        return
    readers = min(32, max(1, -(-files // FILES_PER_FOOTER_READER)))
    os.environ[FOOTER_READERS] = str(readers if cpus is None else max(1, min(readers, int(cpus))))
    try:
        yield
    finally:
        os.environ.pop(FOOTER_READERS, None)


def parquet_files(uri: str, storage_options: dict | None = None) -> list[str]:
    """Every `.parquet` file of the input (paths without protocol) that the run reads: in a folder,
    not those whose path inside it starts with "." or "_" (`_SUCCESS`, `.ipynb_checkpoints/`, a
    `_temporary/` upload), which Ray Data's listing of a folder leaves out."""
    paths = input_paths(uri, storage_options)
    if isinstance(paths, str):
        fs, _ = fsspec_fs(uri, storage_options)
        if not fs.isdir(paths):
            return [paths]
        root = paths.rstrip("/") + "/"
        paths = sorted(p for p in fs.find(paths) if p.endswith(".parquet")
                       and not p[len(root):].startswith((".", "_")))
    return paths


def parquet_dataset(uri: str, storage_options: dict | None = None, partitioning: str | None = None) -> pads.Dataset:
    """The input's `.parquet` files as one Arrow dataset (driver side: its ids, a benchmark's columns)."""
    filesystem, _ = arrow_fs(uri, storage_options)
    return pads.dataset(parquet_files(uri, storage_options), filesystem=filesystem, format="parquet",
                        partitioning=partitioning)


def input_dataset(uri: str, storage_options: dict | None = None) -> pads.Dataset:
    """The input as one Arrow dataset with the columns read_rows gives the rows: the files' schema (the
    first file's, as Ray Data's) and the hive partition keys of their paths (`rows/lang=en/part-0.parquet`:
    `lang`), as Ray Data adds them. Driver side: one listing serves the checks of columns and ids."""
    return parquet_dataset(uri, storage_options, partitioning="hive")


def read_footers(uri: str, storage_options: dict | None = None,
                 threads: int = 32) -> dict[str, pq.FileMetaData | str]:
    """Each input file's Parquet footer (row count, schema), or why it cannot be read (an upload cut
    short, another format named .parquet). One small read a file, `threads` at once."""
    filesystem, _ = arrow_fs(uri, storage_options)

    def rows(path: str) -> pq.FileMetaData | str:
        try:
            with filesystem.open_input_file(path) as f:
                return pq.read_metadata(f)
        except Exception as e:      # ArrowInvalid, OSError: whatever it is, the file cannot be read
            return f"{type(e).__name__}: {e}"

    files = parquet_files(uri, storage_options)
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(files, pool.map(rows, files)))


def read_files(files: list[str], uri: str, storage_options: dict | None = None, columns: list[str] | None = None,
               footers: dict[str, pq.FileMetaData] | None = None, threads: int = 32) -> pa.Table:
    """`columns` (None: all) of `files` (at least one), `threads` files at once, each opened once, as
    one table (types widened across files, a column a file lacks: nulls). With a file's footer read
    already, it costs its open and its columns' chunks; a small one is read whole in one GET (its
    footer's and its columns' reads would be two). An Arrow dataset's scan read each footer again,
    8 files at a time: minutes over thousands of files on S3."""
    filesystem, _ = arrow_fs(uri, storage_options)

    def read(file: str) -> pa.Table:
        meta = (footers or {}).get(file)
        with filesystem.open_input_file(file) as f:
            small = meta is None and f.size() <= WHOLE_FILE_BYTES
            parquet = pq.ParquetFile(pa.BufferReader(f.read()) if small else f, metadata=meta)
            names = parquet.schema_arrow.names
            return decoded(parquet.read(columns=None if columns is None else [c for c in columns if c in names]))

    with ThreadPoolExecutor(threads) as pool:
        return pa.concat_tables(pool.map(read, files), promote_options="permissive")


def decoded(table: pa.Table) -> pa.Table:
    """Dictionary columns (pandas' categoricals) as their values: Arrow concatenates no dictionary
    with plain values, nor two dictionaries of different values."""
    for k, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(k, field.name, table.column(k).cast(field.type.value_type))
    return table


def read_column(footers: dict[str, pq.FileMetaData], field: pa.Field, uri: str,
                storage_options: dict | None = None) -> pa.ChunkedArray:
    """One column of every input file (at least one holds it) as `field.type`, the footers read already."""
    return read_files(list(footers), uri, storage_options, [field.name], footers).column(field.name).cast(field.type)


def write_rows(ds: ray.data.Dataset, uri: str, storage_options: dict | None = None,
               rows_per_file: int | None = None) -> None:
    """Output rows as a folder of Parquet files. Finished blocks are gathered, whole, until they hold
    at least `rows_per_file` rows (the last file holds the rest); None: a file per block, whose size is the
    model stage's batch (a million rows in 16-row batches would be 62 500 tiny files)."""
    filesystem, path = arrow_fs(uri, storage_options)
    ds.write_parquet(path, filesystem=filesystem, min_rows_per_file=rows_per_file)


def head_rows(dataset: pads.Dataset, rows: int, columns: list[str] | None = None) -> pa.Table:
    """The dataset's first rows, scanned on this thread: a threaded scan stopped early leaves reads in
    flight on Arrow's threads, which call into an fsspec filesystem's Python code (S3's) while the
    interpreter exits, and abort it (exit 134 after a finished run)."""
    return dataset.head(rows, columns=columns, use_threads=False)


def read_output(uri: str, storage_options: dict | None = None, columns: list[str] | None = None,
                limit: int | None = None) -> pa.Table | None:
    """The output folder as one Arrow table (driver side: summaries, resume, tests; read_files), or
    its first `limit` rows; None when empty."""
    if limit is not None:
        filesystem, _ = arrow_fs(uri, storage_options)
        try:        # its .parquet files only: an output folder may hold others (a README, a foreign object)
            dataset = pads.dataset(parquet_files(uri, storage_options), filesystem=filesystem, format="parquet")
        except (FileNotFoundError, OSError):
            return None
        return head_rows(dataset, limit, columns) if dataset.files else None
    try:
        files = parquet_files(uri, storage_options)
    except FileNotFoundError:
        return None
    if not files:
        return None
    table = read_files(files, uri, storage_options, columns)
    return table if columns is None else table.select(columns)
