"""Resume through Ray Data's own checkpointing (`ray.data.checkpoint.CheckpointConfig`).

Each written output file gets a checkpoint file of its ids, by two-phase commit: a pending
checkpoint before the data file, renamed after it. A re-run deletes the data files of pending
checkpoints (the partial files of a killed run) and filters the ids already committed right after
the read. Checkpoints live beside the output folder (`<output>.checkpoint`), never inside it: Ray's
clean-up deletes every data file under the output whose name starts with a pending checkpoint's.
"""
from __future__ import annotations

import pyarrow as pa
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_filter import NumpyArrayBasedCheckpointFilter

from .rows import ROW_HASH
from .storage import arrow_fs, fsspec_fs, is_local, sibling


class IdOrRowHashFilter(NumpyArrayBasedCheckpointFilter):
    """Ray's id filter, reading `row_hash` for input files without an `id` column (it becomes `id`)."""

    def filter_rows_for_block(self, block: pa.Table) -> pa.Table:
        names = block.column_names
        if self.id_column in names or ROW_HASH not in names:
            return super().filter_rows_for_block(block)
        renamed = block.rename_columns([self.id_column if n == ROW_HASH else n for n in names])
        return super().filter_rows_for_block(renamed).rename_columns(names)


def checkpoint_uri(output: str) -> str:
    return sibling(output, ".checkpoint")


def checkpoint_config(output: str, storage_options: dict | None = None) -> CheckpointConfig:
    uri = checkpoint_uri(output)
    filesystem, path = arrow_fs(uri, storage_options)
    return CheckpointConfig(id_column="id", checkpoint_path=path if is_local(uri) else uri,
                            override_filesystem=filesystem, delete_checkpoint_on_success=False,
                            checkpoint_filter_cls=IdOrRowHashFilter)


def clear_checkpoint(output: str, storage_options: dict | None = None) -> None:
    fs, path = fsspec_fs(checkpoint_uri(output), storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def has_checkpoint(output: str, storage_options: dict | None = None) -> bool:
    fs, path = fsspec_fs(checkpoint_uri(output), storage_options)
    return fs.exists(path)
