"""Resume through Ray Data's own checkpointing (`ray.data.checkpoint.CheckpointConfig`).

Each written output file gets a checkpoint file of its ids, by two-phase commit: a pending
checkpoint before the data file, renamed after it. A re-run deletes the data files of pending
checkpoints (the partial files of a killed run) and filters the ids already committed right after
the read. Checkpoints live beside the output folder (`<output>.checkpoint`), never inside it: Ray's
clean-up deletes every data file under the output whose name starts with a pending checkpoint's.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_filter import NumpyArrayBasedCheckpointFilter

from .io import read_output
from .rows import ROW_HASH
from .storage import arrow_fs, fsspec_fs, is_local, sibling

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


def finish_commits(fs, pending: list[str], committed: set[str]) -> None:
    """Ray commits a checkpoint by moving X.pending.parquet to X.parquet: on an object store a copy,
    then a delete. A run killed between the two left both: the commit is done (its rows' output file
    written), but Ray's clean-up of pending checkpoints on the resume would delete that output file
    with the pending one, and the committed ids would skip its rows for ever. Finish the move."""
    for path in pending:
        if path[:-len(PENDING)] + ".parquet" in committed:
            fs.rm(path)


def forget_lost_rows(output: str, storage_options: dict | None = None) -> int:
    """Before a resume: ids committed in the checkpoint whose output rows are gone (a data file deleted
    by hand, a bucket's lifecycle rule) are taken out of it, so the resumed run answers them again
    instead of skipping them for ever. Returns how many. Pending checkpoints are Ray's to clean."""
    fs, folder = fsspec_fs(checkpoint_uri(output), storage_options)
    found = fs.glob(f"{folder}/*.parquet")
    committed = [p for p in found if not p.endswith(PENDING)]
    finish_commits(fs, [p for p in found if p.endswith(PENDING)], set(committed))
    if not committed:
        return 0
    written = read_output(output, storage_options, columns=["id"])
    present = written.column("id").combine_chunks() if written is not None else pa.array([])

    def read(path: str) -> pa.Table:
        with fs.open(path, "rb") as f:
            return pq.read_table(f)

    lost = 0
    with ThreadPoolExecutor(READ_THREADS) as pool:      # one at a time: 10 minutes for 10 000 files on S3
        checkpoints = list(pool.map(read, committed))
    for path, ids in zip(committed, checkpoints):
        kept = ids.filter(pc.is_in(ids.column("id"), value_set=present.cast(ids.schema.field("id").type)))
        if kept.num_rows == ids.num_rows:
            continue
        lost += ids.num_rows - kept.num_rows
        if kept.num_rows == 0:
            fs.rm(path)
        else:
            with fs.open(path, "wb") as f:
                pq.write_table(kept, f)
    return lost
