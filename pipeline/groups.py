"""Rows about one image travel between the stages as one row: its frames once, its questions as lists.

Datasets of several questions an image (VQAv2 has five or more) would otherwise carry the same tiles
once per question through the object store: 6.8 MB of uint8 frames a row for Idefics3-8B's 17
tiles. Grouping happens inside one CPU-stage batch (rows about one image usually sit together) and
the model stage undoes it, so a group never straddles two model-stage batches: Ray Data may cut a
stream of rows anywhere, but not inside a row.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

IMAGE_FIELDS = ("frames", "frames_shape", "image_key")     # once per group; every other column is per row


def group_by_image(rows: pa.Table) -> pa.Table:
    """One row per image key (rows without a key, such as error rows, stay alone), in order of first
    appearance: the IMAGE_FIELDS of its first row, every other column as the list of its rows' values."""
    members: dict = {}
    for i, key in enumerate(rows.column("image_key").to_pylist()):
        members.setdefault(i if key is None else key, []).append(i)
    groups = list(members.values())
    order = pa.array([i for group in groups for i in group], type=pa.int64())
    offsets = pa.array(np.cumsum([0] + [len(group) for group in groups]), type=pa.int32())
    firsts = pa.array([group[0] for group in groups], type=pa.int64())
    columns = {}
    for name in rows.column_names:
        column = rows.column(name)
        if name in IMAGE_FIELDS:
            columns[name] = column.take(firsts)
        else:
            columns[name] = pa.ListArray.from_arrays(offsets, column.take(order).combine_chunks())
    return pa.table(columns)


def ungroup(groups: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The rows of `groups` (every column but IMAGE_FIELDS, flattened) and each row's group index."""
    names = [n for n in groups.column_names if n not in IMAGE_FIELDS]
    sizes = groups.column(names[0]).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    rows = pa.table({n: groups.column(n).combine_chunks().flatten() for n in names})
    return rows, np.repeat(np.arange(groups.num_rows), sizes)
