"""Resume through Ray Data's own checkpointing (`ray.data.checkpoint.CheckpointConfig`).

Each written output file gets a checkpoint file of its ids, by two-phase commit: a pending
checkpoint before the data file, renamed after it. A re-run deletes the data files of pending
checkpoints (the partial files of a killed run) and filters the ids already committed right after
the read. Checkpoints live beside the output folder (`<output>.checkpoint`), never inside it: Ray's
clean-up deletes every data file under the output whose name starts with a pending checkpoint's.
"""
from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_filter import NumpyArrayBasedCheckpointFilter

from .io import read_output
from .rows import ROW_HASH
from .storage import arrow_fs, fsspec_fs, is_local, replace_whole, sibling

ROW_INDEX = "__row_index"
READ_THREADS = 32


class IdOrRowHashFilter(NumpyArrayBasedCheckpointFilter):
    """Ray's id filter, reading the input's id column (`input_id_column` of the checkpoint config,
    as PipelineConfig.id_column), else `row_hash` for input files without it: both become the
    output's `id`."""

    def filter_rows_for_block(self, block: pa.Table) -> pa.Table:
        source = getattr(self.ckpt_config, "input_id_column", self.id_column)
        source = source if source in block.column_names else ROW_HASH
        if source == self.id_column or source not in block.column_names:
            return super().filter_rows_for_block(block)
        keyed = pa.table({self.id_column: block.column(source), ROW_INDEX: pa.array(range(block.num_rows))})
        return block.take(super().filter_rows_for_block(keyed).column(ROW_INDEX))


def checkpoint_uri(output: str) -> str:
    return sibling(output, ".checkpoint")


def checkpoint_config(output: str, storage_options: dict | None = None,
                      input_id_column: str = "id") -> CheckpointConfig:
    """Ray's checkpoint of the output's `id` column, filtering the input by `input_id_column`."""
    uri = checkpoint_uri(output)
    filesystem, path = arrow_fs(uri, storage_options)
    config = CheckpointConfig(id_column="id", checkpoint_path=path if is_local(uri) else uri,
                              override_filesystem=filesystem, delete_checkpoint_on_success=False,
                              checkpoint_filter_cls=IdOrRowHashFilter)
    config.input_id_column = input_id_column    # travels with the config to the filter's actors
    return config


def clear_checkpoint(output: str, storage_options: dict | None = None) -> None:
    fs, path = fsspec_fs(checkpoint_uri(output), storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def has_checkpoint(output: str, storage_options: dict | None = None) -> bool:
    fs, path = fsspec_fs(checkpoint_uri(output), storage_options)
    return fs.exists(path)


PENDING = ".pending.parquet"


def clean_pending_commits(output: str, storage_options: dict | None = None) -> int:
    """Before a resume reads the output: what Ray's clean-up of pending checkpoints does when the run
    starts, done first. A pending checkpoint whose committed twin exists is a finished commit
    (finish_commits); any other's data files, those whose name starts with its own, are the partial
    writes of a killed run: read by the resume's counts before Ray removed them, a file cut short
    failed every resume (and a whole one was counted as written before). Returns how many."""
    fs, folder = fsspec_fs(checkpoint_uri(output), storage_options)
    found = fs.glob(f"{folder}/*.parquet")
    committed = {p for p in found if not p.endswith(PENDING)}
    pending = finish_commits(fs, [p for p in found if p.endswith(PENDING)], committed)
    if not pending:
        return 0
    prefixes = tuple(posixpath.basename(p)[:-len(PENDING)] for p in pending)
    out_fs, out_path = fsspec_fs(output, storage_options)
    written = out_fs.find(out_path) if out_fs.exists(out_path) else []
    for path in [p for p in written if posixpath.basename(p).startswith(prefixes)]:
        out_fs.rm(path)
    for path in pending:
        fs.rm(path)
    return len(pending)


def finish_commits(fs, pending: list[str], committed: set[str]) -> list[str]:
    """Ray commits a checkpoint by moving X.pending.parquet to X.parquet: on an object store a copy,
    then a delete. A run killed between the two left both: the commit is done (its rows' output file
    written), but Ray's clean-up of pending checkpoints on the resume would delete that output file
    with the pending one, and the committed ids would skip its rows for ever. Finish the move.
    Returns the pending checkpoints left (of writes that did not finish)."""
    left = []
    for path in pending:
        if path[:-len(PENDING)] + ".parquet" in committed:
            fs.rm(path)
        else:
            left.append(path)
    return left


def forget_lost_rows(output: str, storage_options: dict | None = None, written: pa.Array | None = None) -> int:
    """Before a resume: ids committed in the checkpoint whose output rows are gone (a data file deleted
    by hand, a bucket's lifecycle rule) are taken out of it, so the resumed run answers them again
    instead of skipping them for ever. Returns how many. Run after clean_pending_commits. `written`:
    the output's ids (output_ids), where the caller has them."""
    fs, folder = fsspec_fs(checkpoint_uri(output), storage_options)
    committed = [p for p in fs.glob(f"{folder}/*.parquet") if not p.endswith(PENDING)]
    if not committed:
        return 0
    present = output_ids(read_output(output, storage_options, columns=["id"])) if written is None else written

    def read(path: str) -> pa.Table:
        with fs.open(path, "rb") as f:
            return pq.read_table(f)

    with ThreadPoolExecutor(READ_THREADS) as pool:      # one at a time: 10 minutes for 10 000 files on S3
        checkpoints = list(pool.map(read, committed))
    # one membership test over every file's ids: a set of the output's ids built per file made a
    # resume of 2 M rows in 2000 files take 7 minutes
    ids = pa.chunked_array([t.column("id").cast(present.type) for t in checkpoints], present.type)
    known = pc.is_in(ids, value_set=present).combine_chunks()
    lost, start = 0, 0
    for path, table in zip(committed, checkpoints):
        keep = known.slice(start, table.num_rows)
        start += table.num_rows
        if pc.all(keep).as_py():
            continue
        kept = table.filter(keep)
        lost += table.num_rows - kept.num_rows
        replace_table(fs, path, kept, is_local(output))
    return lost


def output_ids(table: pa.Table | None) -> pa.Array:
    """The id column of an output's rows as read (None: no output, no ids)."""
    return pa.array([], pa.string()) if table is None else table.column("id").combine_chunks()


def unanswered_rows(wanted: pa.ChunkedArray | pa.Array, written: pa.Array) -> int:
    """How many of the `wanted` ids (distinct) the output's `written` ids (output_ids) have no row of: a
    resume with none left needs no cluster (its start alone is a minute or two)."""
    return missing_ids(wanted, pc.cast(written, pa.string()))


def missing_ids(wanted: pa.ChunkedArray | pa.Array, written: pa.Array) -> int:
    """How many of the `wanted` ids (distinct) are not among the `written` ones (text), compared as text."""
    return len(wanted) - (pc.sum(pc.is_in(pc.cast(wanted, pa.string()), value_set=written)).as_py() or 0)


def replace_table(fs, path: str, kept: pa.Table, local: bool) -> None:
    """The Parquet file at `path` (a checkpoint file, an output file) holding only `kept` (none: the
    file removed), replaced whole: a run killed while one was written in place left it empty, and
    every resume after failed to read it."""
    if kept.num_rows == 0:
        fs.rm(path)
    else:
        replace_whole(fs, path, lambda f: pq.write_table(kept, f), local)
