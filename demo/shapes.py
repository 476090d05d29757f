"""Synthetic shapes task: images of 1-3 coloured shapes, one per quadrant, with short canonical answers.

Every image is split into a 2x2 grid of quadrants (top left, top right, bottom left, bottom right) and
holds 1-3 shapes, each in its own quadrant, every (colour, shape) pair at most once per image. With the
demo processor (longest edge 64, tiles of 32) each quadrant becomes one tile, so the row/column tags of
the tile expansion carry the position.

Held-out split (HOLDOUT = "scene", the default): a fixed 1/8 of all scenes (sets of placed shapes,
by a hash) never appear in training; held-out rows are drawn from those, with another seed. Every
(colour, shape, quadrant) triple is seen in training, so held-out questions are answerable by
composition. The stricter rule HOLDOUT = "triple" holds out 12 of the 72 triples themselves.
"""
from __future__ import annotations

import io
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (240, 200, 20), "purple": (140, 50, 170), "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
CAPTION_PROMPTS = ("Describe the image.", "Describe this image.", "Caption the image.",
                   "What is in the image?")
CAPTION_PROMPT = CAPTION_PROMPTS[1]  # jobs.caption's default --prompt
SPLIT_SEEDS = {"train": 1, "heldout": 2, "sample": 3, "focus": 4}


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    quadrant: int   # index into QUADRANTS

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def is_heldout_triple(s: Shape) -> bool:
    """The fixed 12 of 72 (colour, shape, quadrant) triples reserved for the held-out split."""
    c, k = list(COLOURS).index(s.colour), SHAPES.index(s.shape)
    return (c + 2 * k + s.quadrant) % 6 == 0


def sample_scene(rng: random.Random) -> list[Shape]:
    """1-3 shapes in distinct quadrants, distinct (colour, shape) pairs, sorted by quadrant."""
    n = rng.randint(1, 3)
    quadrants = sorted(rng.sample(range(4), n))
    pairs = rng.sample([(c, k) for c in COLOURS for k in SHAPES], n)
    return [Shape(c, k, q) for (c, k), q in zip(pairs, quadrants)]


# "triple": held-out images hold a (colour, shape, quadrant) never trained on; "scene": held-out images
# are whole scenes (sets of placed shapes) never trained on, every triple being seen.
HOLDOUT = "scene"


def is_heldout_scene(scene: list[Shape]) -> bool:
    if HOLDOUT == "triple":
        return any(map(is_heldout_triple, scene))
    return zlib.crc32(repr(scene).encode()) % 8 == 0


def scene_for_split(rng: random.Random, split: str) -> list[Shape]:
    """Rejection-sample a scene: train scenes are never held-out ones, heldout/sample scenes always are."""
    while True:
        scene = sample_scene(rng)
        if is_heldout_scene(scene) == (split != "train"):
            return scene


def draw_scene(scene: list[Shape], rng: random.Random) -> Image.Image:
    """Render a scene on a light background; image size, shape size and placement vary per image."""
    w, h = rng.randint(64, 96), rng.randint(64, 96)
    grey = rng.randint(225, 255)
    img = Image.new("RGB", (w, h), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for s in scene:
        draw_shape(draw, s, w, h, rng)
    return img


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape, w: int, h: int, rng: random.Random) -> None:
    qw, qh = w // 2, h // 2
    x0, y0 = (s.quadrant % 2) * qw, (s.quadrant // 2) * qh
    side = int(min(qw, qh) * rng.uniform(0.7, 0.9))
    # Roughly centred in its quadrant: the quadrant is the position; the jitter is only nuisance.
    left = x0 + (qw - side) // 2 + rng.randint(-1, 1)
    top = y0 + (qh - side) // 2 + rng.randint(-1, 1)
    box = (left, top, left + side, top + side)
    fill = COLOURS[s.colour]
    if s.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif s.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + side / 2, top), (left, top + side), (left + side, top + side)], fill=fill)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: list[Shape]) -> str:
    """'a red circle at top left, a blue square at top right and a green triangle at bottom left'."""
    parts = [f"{article(s.colour)} {s.name} at {QUADRANTS[s.quadrant]}" for s in scene]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# The kind of each of questions()'s questions, in its order: a row's `category` (jobs.evaluate scores each)
QUESTION_KINDS = ("shape", "colour", "where", "what is at", "count", "shape count", "colour count", "caption")


def questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str]]:
    """Every question kind asked of one scene (QUESTION_KINDS), as (question, canonical answer)."""
    by_quadrant = {s.quadrant: s for s in scene}
    s = rng.choice(scene)
    q = QUADRANTS[s.quadrant]
    any_q = rng.randrange(4)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    at = by_quadrant.get(any_q)
    return [
        (f"What shape is at the {q}?", s.shape),
        (f"What colour is the shape at the {q}?", s.colour),
        (f"Where is the {s.name}?", q),
        (f"What is at the {QUADRANTS[any_q]}?", at.name if at else "nothing"),
        ("How many shapes are there?", str(len(scene))),
        (f"How many {shape}s are there?", str(sum(x.shape == shape for x in scene))),
        (f"How many {colour} shapes are there?", str(sum(x.colour == colour for x in scene))),
        (rng.choice(CAPTION_PROMPTS), caption(scene)),
    ]


FOCUS_KINDS = ("where", "count", "shape-count", "colour-count", "colour-count-balanced", "where-colour",
               "name-colour")


def focus_questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """The kinds that need the question's object bound to the image: where is each shape, and counts;
    as (kind, question, answer)."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return [("where", f"Where is the {s.name}?", QUADRANTS[s.quadrant]) for s in scene] + [
        ("count", "How many shapes are there?", str(len(scene))),
        ("shape-count", f"How many {shape}s are there?", str(sum(x.shape == shape for x in scene))),
        ("colour-count", f"How many {colour} shapes are there?", str(sum(x.colour == colour for x in scene))),
    ]


def balanced_colour_counts(scene: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """One colour in the scene and one not: half the answers are not "0" (a random colour is absent
    ~2/3 of the time, a prior the model otherwise settles on)."""
    present = sorted({x.colour for x in scene})
    absent = [c for c in COLOURS if c not in present]
    return [("colour-count-balanced", f"How many {c} shapes are there?",
             str(sum(x.colour == c for x in scene))) for c in (rng.choice(present), rng.choice(absent))]


def alone_in_colour(scene: list[Shape]) -> list[Shape]:
    """The shapes whose colour no other shape of the scene has: those a colour alone names."""
    colours = [x.colour for x in scene]
    return [s for s in scene if colours.count(s.colour) == 1]


def where_by_colour(scene: list[Shape]) -> list[tuple[str, str, str]]:
    """"Where is the <colour> shape?" for each colour held by one shape only: the position of a shape
    found by its colour alone (the binding the model otherwise never learns)."""
    return [("where-colour", f"Where is the {s.colour} shape?", QUADRANTS[s.quadrant])
            for s in alone_in_colour(scene)]


def name_by_colour(scene: list[Shape]) -> list[tuple[str, str, str]]:
    """"Name the <colour> shape." -> "<colour> <shape>" for each colour held by one shape only.

    The answer repeats the colour, so the shape is predicted right after the colour token: the
    colour-keyed lookup is trained one hop from its query. Without it the model never learns to find
    a shape by colour ("How many <colour> shapes?" stays at "0" however long it trains on it); with it
    that count is learned in ~1000 steps."""
    return [("name-colour", f"Name the {s.colour} shape.", s.name) for s in alone_in_colour(scene)]


def focus_rows(n_images: int, kinds: tuple[str, ...] = FOCUS_KINDS[:4]) -> list[dict]:
    """Extra training rows (train scenes, own seed) on the where/count kinds: rebalances the mix.
    `kinds` (of FOCUS_KINDS) keeps only those questions of the same images (for curriculum stages)."""
    unknown = set(kinds) - set(FOCUS_KINDS)
    if unknown:
        raise ValueError(f"unknown focus kinds {sorted(unknown)}; known: {FOCUS_KINDS}")
    rng = random.Random(SPLIT_SEEDS["focus"])
    extra = random.Random(SPLIT_SEEDS["focus"] + 100)  # own stream: the other kinds' rows stay the same
    rows = []
    for i in range(n_images):
        scene = scene_for_split(rng, "train")
        image = png_bytes(draw_scene(scene, rng))
        qa = focus_questions(scene, rng)
        if "colour-count-balanced" in kinds:
            qa += balanced_colour_counts(scene, extra)
        if "where-colour" in kinds:
            qa += where_by_colour(scene)
        if "name-colour" in kinds:
            qa += name_by_colour(scene)
        for j, (kind, question, answer) in enumerate(qa):
            if kind not in kinds:
                continue
            rows.append({"id": f"focus-{i:05d}-{j}", "image": image, "question": question,
                         "answers": [answer]})
    return rows


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make_rows(split: str, n_images: int, questions_per_image: int, seed: int | None = None) -> list[dict]:
    """Rows in the dataset contract (id, image PNG bytes, question, answers, and the question's kind as
    `category`); deterministic per seed.

    `questions_per_image` of the 8 question kinds are drawn per image (all 8 when >= 8); the sample
    split asks only for the caption, with CAPTION_PROMPT.
    """
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    rows = []
    for i in range(n_images):
        scene = scene_for_split(rng, split)
        image = png_bytes(draw_scene(scene, rng))
        qa = list(zip(QUESTION_KINDS, questions(scene, rng)))
        if split == "sample":
            qa = [("caption", (CAPTION_PROMPT, caption(scene)))]
        elif questions_per_image < len(qa):
            qa = rng.sample(qa, questions_per_image)
        for j, (kind, (question, answer)) in enumerate(qa):
            rows.append({"id": f"{split}-{i:05d}-{j}", "image": image, "question": question,
                         "answers": [answer], "category": kind})
    return rows


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("question", pa.string()),
                        ("answers", pa.list_(pa.string())), ("category", pa.string())])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


# Sizes of the committed/regenerated splits: (images, questions per image).
SPLITS = {"train": (4000, 4), "heldout": (150, 3), "sample": (16, 1)}


def build_split(split: str) -> list[dict]:
    n_images, per_image = SPLITS[split]
    return make_rows(split, n_images, per_image)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write the demo shapes splits as Parquet.")
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--splits", nargs="+", default=["heldout", "sample"], choices=list(SPLITS))
    args = ap.parse_args()
    for split in args.splits:
        rows = build_split(split)
        print(f"{split}: {len(rows)} rows -> {write_parquet(rows, Path(args.out) / f'{split}.parquet')}")


if __name__ == "__main__":
    main()
