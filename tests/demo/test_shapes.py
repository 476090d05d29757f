"""The synthetic shapes task: deterministic, disjoint splits, answers that match the pixels."""
import io
import random
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq
from PIL import Image

from demo import shapes

DATA = Path(__file__).resolve().parents[2] / "demo" / "data"


def test_generator_is_deterministic_per_seed():
    a = shapes.make_rows("train", 20, 3)
    b = shapes.make_rows("train", 20, 3)
    assert a == b
    assert shapes.make_rows("train", 20, 3, seed=7) != a


def test_committed_splits_are_the_seeded_ones():
    for split in ("heldout", "sample"):
        table = pq.read_table(DATA / f"{split}.parquet")
        assert table.column_names == ["id", "image", "question", "answers", "category"]
        assert table.to_pylist() == shapes.build_split(split)



@pytest.mark.parametrize("rule", ["scene", "triple"])
def test_train_and_heldout_are_disjoint_by_combination(rule, monkeypatch):
    monkeypatch.setattr(shapes, "HOLDOUT", rule)
    rng = random.Random(0)
    train = [shapes.scene_for_split(rng, "train") for _ in range(500)]
    held = [shapes.scene_for_split(rng, "heldout") for _ in range(200)]
    assert not {repr(x) for x in train} & {repr(x) for x in held}
    if rule == "triple":
        assert not any(shapes.is_heldout_triple(s) for scene in train for s in scene)
        assert all(any(map(shapes.is_heldout_triple, scene)) for scene in held)


def test_committed_rows_are_disjoint():
    train_rows, held_rows = shapes.make_rows("train", 300, 8), shapes.build_split("heldout")
    assert not {r["image"] for r in train_rows} & {r["image"] for r in held_rows}
    assert not {r["id"] for r in train_rows} & {r["id"] for r in held_rows}


@pytest.mark.parametrize("rule", ["scene", "triple"])
def test_heldout_is_answerable_from_training_parts(rule, monkeypatch):
    """Every colour, shape and quadrant, and every pair of them, occurs in training scenes (with the
    scene rule every (colour, shape, quadrant) triple does too)."""
    monkeypatch.setattr(shapes, "HOLDOUT", rule)
    rng = random.Random(1)
    seen = {s for _ in range(2000) for s in shapes.scene_for_split(rng, "train")}
    pairs = lambda f: {f(s) for s in seen}  # noqa: E731
    assert len(pairs(lambda s: (s.colour, s.shape))) == len(shapes.COLOURS) * len(shapes.SHAPES)
    assert len(pairs(lambda s: (s.colour, s.quadrant))) == len(shapes.COLOURS) * 4
    assert len(pairs(lambda s: (s.shape, s.quadrant))) == len(shapes.SHAPES) * 4
    if rule == "scene":
        assert len(seen) == len(shapes.COLOURS) * len(shapes.SHAPES) * 4


def test_answers_are_canonical_and_cover_every_question_kind():
    rows = shapes.build_split("heldout")
    questions = {r["question"].split(" ")[0] + " " + r["question"].split(" ")[1] for r in rows}
    assert {"What shape", "What colour", "Where is", "What is", "How many", "Describe the"} <= questions
    for r in rows:
        assert len(r["answers"]) == 1 and r["answers"][0] == r["answers"][0].strip().lower()


def test_pixels_show_the_captioned_shapes():
    """The colour named for a quadrant is the dominant non-background colour there."""
    rng = random.Random(5)
    for _ in range(20):
        scene = shapes.sample_scene(rng)
        img = np.asarray(shapes.draw_scene(scene, rng), dtype=np.int32)
        h, w = img.shape[:2]
        for q in range(4):
            y, x = (q // 2) * (h // 2), (q % 2) * (w // 2)
            quad = img[y:y + h // 2, x:x + w // 2].reshape(-1, 3)
            present = [s for s in scene if s.quadrant == q]
            hits = {c: int((np.abs(quad - np.array(rgb)).sum(1) < 10).sum()) for c, rgb in shapes.COLOURS.items()}
            if present:
                assert max(hits, key=hits.get) == present[0].colour and hits[present[0].colour] > 40
            else:
                assert max(hits.values()) == 0


def test_images_are_png_and_sized_for_two_by_two_tiles():
    for r in shapes.build_split("sample"):
        img = Image.open(io.BytesIO(r["image"]))
        assert img.format == "PNG" and 64 <= min(img.size) and max(img.size) <= 96


def test_focus_kinds_select_questions_of_the_same_training_images():
    """A focus stage asking fewer kinds sees the same images and the same rows of those kinds; the
    balanced colour counts ask one colour present (answer >= 1) and one absent (answer 0)."""
    every = shapes.focus_rows(40)
    where = shapes.focus_rows(40, ("where",))
    assert where == [r for r in every if r["question"].startswith("Where")] and where
    mixed = shapes.focus_rows(40, ("where", "colour-count-balanced"))
    assert [r for r in mixed if r["question"].startswith("Where")] == where
    balanced = [r for r in mixed if r["question"].startswith("How")]
    assert [r["answers"][0] != "0" for r in balanced] == [True, False] * 40
    assert not {r["image"] for r in every} & {r["image"] for r in shapes.build_split("heldout")}
    with pytest.raises(ValueError, match="unknown focus kinds"):
        shapes.focus_rows(1, ("colour",))


def test_where_by_colour_asks_only_colours_held_by_one_shape():
    scene = [shapes.Shape("red", "circle", 0), shapes.Shape("red", "square", 1), shapes.Shape("blue", "circle", 3)]
    assert shapes.where_by_colour(scene) == [("where-colour", "Where is the blue shape?", "bottom right")]
    rows = shapes.focus_rows(20, ("where-colour",))
    assert rows and all(r["question"].endswith(" shape?") for r in rows)


def test_name_by_colour_repeats_the_colour_then_names_the_shape():
    scene = [shapes.Shape("red", "circle", 0), shapes.Shape("red", "square", 1), shapes.Shape("blue", "triangle", 3)]
    assert shapes.name_by_colour(scene) == [("name-colour", "Name the blue shape.", "blue triangle")]
    rows = shapes.focus_rows(20, ("name-colour",))
    assert rows and all(r["question"].startswith("Name the ") for r in rows)
    # a kind added to the focus mix leaves the rows of the other kinds as they were (stages reproduce)
    before = shapes.focus_rows(20, ("where", "where-colour"))
    after = [r for r in shapes.focus_rows(20, ("where", "where-colour", "name-colour"))
             if not r["question"].startswith("Name the ")]
    assert before == after
