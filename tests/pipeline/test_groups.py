"""Rows about one image travel as one row between the stages, and come back as the rows they were."""
import numpy as np
import pyarrow as pa

from pipeline.groups import group_by_image, ungroup


def encoded_rows(keys: list, start: int = 0) -> pa.Table:
    """Rows shaped as the CPU stage's: a row's frames are its image's (None for an error row)."""
    frames = [None if k is None else k.encode() * 1000 for k in keys]
    return pa.table({
        "id": pa.array([f"r{start + i}" for i in range(len(keys))], type=pa.string()),
        "question": [f"q{start + i}" for i in range(len(keys))],
        "input_ids": pa.array([[start + i] * (i + 1) for i in range(len(keys))], type=pa.list_(pa.int32())),
        "frames": pa.array(frames, type=pa.large_binary()),
        "frames_shape": pa.array([None if k is None else [1, 3, 2] for k in keys], type=pa.list_(pa.int32())),
        "image_key": pa.array(keys, type=pa.string()),
        "error": pa.array([None if k else "read image: RowError: image is null" for k in keys], type=pa.string()),
        "kept": pa.array([{"w": start + i} for i in range(len(keys))]),
    })


def test_rows_of_one_image_carry_its_frames_once():
    rows = encoded_rows(["a", "b", "a", None, "a", None, "b"])
    groups = group_by_image(rows)
    assert groups.column("image_key").to_pylist() == ["a", "b", None, None]
    assert groups.column("id").to_pylist() == [["r0", "r2", "r4"], ["r1", "r6"], ["r3"], ["r5"]]
    assert groups.column("frames").to_pylist()[:2] == [b"a" * 1000, b"b" * 1000]
    assert groups.column("kept").to_pylist()[1] == [{"w": 1}, {"w": 6}]
    frame_bytes = lambda t: sum(len(f or b"") for f in t.column("frames").to_pylist())
    assert frame_bytes(groups) == 2000 and frame_bytes(rows) == 5000


def test_ungroup_gives_back_every_row_with_its_group():
    rows = encoded_rows(["a", "b", "a", None, "a", None, "b"])
    back, group_of = ungroup(group_by_image(rows))
    order = [0, 2, 4, 1, 6, 3, 5]
    assert back.equals(rows.drop_columns(["frames", "frames_shape", "image_key"]).take(order))
    assert group_of.tolist() == [0, 0, 0, 1, 1, 2, 3]


def test_ungroup_of_a_batch_of_several_blocks_and_slices():
    """Ray Data hands the model stage a concatenation of the CPU stage's blocks, possibly sliced."""
    first = group_by_image(encoded_rows(["a", "a", "b"]))
    second = group_by_image(encoded_rows(["c", None, "c", "c"], start=10))
    batch = pa.concat_tables([first.slice(1), second.slice(0, 2)])
    back, group_of = ungroup(batch)
    assert back.column("id").to_pylist() == ["r2", "r10", "r12", "r13", "r11"]
    assert back.column("input_ids").to_pylist()[1:3] == [[10], [12, 12, 12]]
    assert group_of.tolist() == [0, 1, 1, 1, 2]
    assert np.array_equal(group_of, np.repeat([0, 1, 2], [1, 3, 1]))


def test_an_empty_batch_stays_empty():
    rows = encoded_rows([])
    groups = group_by_image(rows)
    back, group_of = ungroup(groups)
    assert groups.num_rows == back.num_rows == len(group_of) == 0
    assert back.schema.field("id").type == pa.string()
