"""The model stage on a dataset that repeats itself: questions asked again answered once (pipeline.dedup)
against every row answered, the same rows and model, in one run.

    python bench/dedup.py [--model CKPT] [--rows 96] [--repeated 0.3] [--batch 16] [--max-new-tokens 24]

A scraped dataset holds the same image many times, scattered (mirrors, reposts): --repeated of the
rows repeat an earlier row's image bytes, placed at random, every row asked the same prompt, greedy.
The rows are encoded first (the CPU stage is not timed); then the model stage (pipeline.generate.Generate,
one replica, its engine loop) answers them in batches of --batch rows, all in flight at once (a
replica streaming its blocks), with the sharing on and off (the image and prefix caches serve both). Prints one JSON row: rows, distinct
questions, rows answered by another's answer, seconds of each (best of --repeats), the speed-up and
whether every answer is the same. Default model: the bundled demo model (demo/model).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def repeating_rows(n: int, repeated: float) -> pa.Table:
    """n rows of the demo images, `repeated` of them another row's image, scattered."""
    from jobs.common import DEMO_INPUT

    images = pq.read_table(DEMO_INPUT.parent / "heldout.parquet", columns=["image"]).column("image").to_pylist()
    images = list(dict.fromkeys(images))            # 150 distinct images
    distinct = max(1, round(n * (1 - repeated)))
    if distinct > len(images):
        raise SystemExit(f"--rows {n} with --repeated {repeated} needs {distinct} distinct images; "
                         f"the demo's held-out split has {len(images)}")
    rng = random.Random(0)
    picked = [images[i % len(images)] for i in range(distinct)]
    picked += [rng.choice(picked) for _ in range(n - distinct)]
    rng.shuffle(picked)
    return pa.table({"id": [f"r{i}" for i in range(n)], "image": picked, "question": [None] * n})


def answer_all(stage, batches: list[pa.Table]) -> tuple[float, list[str]]:
    async def run() -> list[pa.Table]:         # every batch in flight, as a replica streams them
        return await asyncio.gather(*(stage(batch) for batch in batches))

    start = time.perf_counter()
    tables = asyncio.run(run())
    return time.perf_counter() - start, [a for t in tables for a in t.column("answer").to_pylist()]


def main() -> None:
    from jobs.common import DEMO_MODEL
    from pipeline import PipelineConfig
    from pipeline.dedup import SharedAnswers
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--repeated", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    config = PipelineConfig(model=args.model, max_new_tokens=args.max_new_tokens, device="cpu")
    table = repeating_rows(args.rows, args.repeated)
    encode = Preprocess(config)
    batches = [encode(table.slice(i, args.batch)) for i in range(0, args.rows, args.batch)]
    stage = Generate(config)
    asyncio.run(stage(batches[0]))          # warm-up: cache allocation, first kernels

    async def every_row(requests, run):
        return await run(requests)

    best, answers, shared = {}, {}, 0
    for _ in range(args.repeats):
        for mode in ("shared", "every row"):
            stage.shared = SharedAnswers()   # no answers kept from the run before
            if mode == "every row":
                stage.shared.answer = every_row
            seconds, answers[mode] = answer_all(stage, batches)
            best[mode] = min(best.get(mode, seconds), seconds)
            shared = stage.shared.shared if mode == "shared" else shared
    stage.loop.close()
    distinct = len(set(table.column("image").to_pylist()))
    print(json.dumps({"rows": args.rows, "distinct_questions": distinct, "rows_shared": shared,
                      "shared_s": round(best["shared"], 3), "every_row_s": round(best["every row"], 3),
                      "speedup": round(best["every row"] / best["shared"], 2),
                      "same_answers": answers["shared"] == answers["every row"]}))


if __name__ == "__main__":
    main()
