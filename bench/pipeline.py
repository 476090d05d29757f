"""The Ray Data pipeline against the bare engine, on the same rows and model.

    python bench/pipeline.py [--model CKPT] [--rows 64] [--image 512x384] [--max-new-tokens 16]
                             [--questions-per-image 4]

Reports: bare-engine rows/s (rows pre-encoded, the engine alone, every batch of the pipeline's size
in flight at once), pipeline rows/s (read -> preprocess actors -> model replica -> Parquet write) over the
whole run (actor start-up and model load included) and in steady state (the marginal rate between a
run of N rows and one of 3N rows, so start-up cancels), the engine busy fraction (engine time the
rows need / pipeline time, steady state), and the bytes per image that cross the object store
between the CPU and model stages (uint8 frames + ids) against float32 pixel values and the PNG.
Without --model a tiny random SmolVLM-shaped checkpoint is built.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_rows(n: int, width: int, height: int, questions_per_image: int = 1) -> pa.Table:
    """n rows, in runs of `questions_per_image` rows about one image (as VQA datasets come)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(-(-n // questions_per_image)):  # smooth gradients + noise: PNG sizes like photos
        base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.random((1, 1, 3))
        noise = rng.normal(0, 12, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    images = [image for image in images for _ in range(questions_per_image)][:n]
    return pa.table({"id": [f"r{i}" for i in range(n)], "image": images, "question": ["Describe it."] * n})


def bare_engine(config, table: pa.Table) -> dict:
    """Encode every row first, then time only the engine over batches of the pipeline's size, all
    submitted at once to one EngineLoop (a replica with every batch in flight: the engine's best)."""
    from model.engine import EngineLoop
    from pipeline.generate import Generate
    from pipeline.groups import IMAGE_FIELDS, ungroup
    from pipeline.preprocess import Preprocess

    t0 = time.perf_counter()
    encoded = Preprocess(config)(table)
    encode_s = time.perf_counter() - t0
    generate = Generate(config)
    batch, group_of = ungroup(encoded)
    requests = list(generate.prepare(batch, encoded.select(list(IMAGE_FIELDS)).to_pylist(), group_of)[2].values())
    generate.engine.generate(requests[:2])  # warm-up (cache allocation, first kernels)
    loop = EngineLoop(generate.engine)
    t0 = time.perf_counter()
    futures = [loop.submit(dict(enumerate(requests[i:i + config.batch_size])))
               for i in range(0, len(requests), config.batch_size)]
    tokens = sum(r.num_generated_tokens for f in futures for r in f.result().values())
    engine_s = time.perf_counter() - t0
    loop.close()
    return {"encoded": encoded, "encode_s": encode_s, "engine_s": engine_s, "tokens": tokens}


def object_store_bytes(encoded: pa.Table, table: pa.Table) -> dict:
    """Per row and per image: `encoded` holds one row per image of a CPU-stage batch (pipeline.groups)."""
    rows, images = table.num_rows, encoded.num_rows
    frames = sum(len(f) for f in encoded.column("frames").to_pylist())
    return {"block_bytes_per_row": encoded.nbytes / rows, "uint8_frame_bytes_per_image": frames / images,
            "float32_pixel_bytes_per_image": 4 * frames / images,
            "png_bytes_per_image": sum(len(b) for b in table.column("image").to_pylist()) / rows}


def run_pipeline(config, source: str, output: str) -> dict:
    import ray

    from pipeline import run_job

    ray.init(num_cpus=max(4, config.cpu_workers + (config.replicas or 1) + 2), include_dashboard=False,
             logging_level="WARNING")
    try:
        summary = run_job(source, output, config)
    finally:
        ray.shutdown()
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--image", default="512x384")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cpu-workers", type=int, default=1)
    ap.add_argument("--batches-in-flight", type=int, help="per replica (default: enough to fill the engine)")
    ap.add_argument("--questions-per-image", type=int, default=1, help="consecutive rows about one image")
    args = ap.parse_args()
    import torch

    from pipeline import PipelineConfig

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline"))
    if not args.model:
        from tests.fixtures.checkpoints import build_checkpoint
        args.model = str(build_checkpoint(tmp / "ckpt", "smolvlm"))
    width, height = map(int, args.image.split("x"))
    table = make_rows(3 * args.rows, width, height, args.questions_per_image)
    pq.write_table(table.slice(0, args.rows), tmp / "small.parquet")
    pq.write_table(table, tmp / "large.parquet")
    config = PipelineConfig(model=args.model, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            cpu_workers=args.cpu_workers, batches_in_flight=args.batches_in_flight)

    bare = bare_engine(config, table)
    small = run_pipeline(config, str(tmp / "small.parquet"), str(tmp / "out_small"))
    large = run_pipeline(config, str(tmp / "large.parquet"), str(tmp / "out_large"))
    engine_s_per_row = bare["engine_s"] / table.num_rows
    marginal_s = large["wall_s"] - small["wall_s"]
    report = {
        "rows": [args.rows, 3 * args.rows], "image": args.image, "questions_per_image": args.questions_per_image,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "cpu_workers": args.cpu_workers, "batches_in_flight": args.batches_in_flight,
        "bare_engine_rows_per_s": round(1 / engine_s_per_row, 2),
        "bare_encode_rows_per_s_one_core": round(table.num_rows / bare["encode_s"], 2),
        "pipeline_rows_per_s_whole_run": large["rows_per_s"], "pipeline_wall_s": [small["wall_s"], large["wall_s"]],
        "pipeline_rows_per_s_steady": round(2 * args.rows / marginal_s, 2),
        "engine_busy_fraction_steady": round(2 * args.rows * engine_s_per_row / marginal_s, 3),
        "pipeline_error_rows": large["error_rows"],
        **{k: round(v, 1) for k, v in object_store_bytes(bare["encoded"], table).items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
