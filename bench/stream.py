"""Streaming batches through one engine (model.engine.loop.EngineLoop) against one batch at a time.

A replica of the pipeline gets blocks of `--batch` rows. One at a time, each block decodes until
its longest answer ends while the slots of its finished rows idle; streamed, the next blocks'
rows take those slots. Answer lengths vary (each row's max_new_tokens drawn from
[--min-new, --max-new], min_new_tokens equal: the length of a row that stops on EOS), greedy.
Prints decode steps, wall time and rows/s of both, same model and requests, in one run.

    python bench/stream.py                                  # CPU, SmolVLM-256M shapes, 128 px tiles
    python bench/stream.py --device cuda --blocks 16 --batch 16 --slots 64
    python bench/stream.py --tp 3                           # a tensor-parallel group (rank 0 streams)
    python bench/stream.py --questions-per-image 4          # + rows naming their image (encoded once),
                                                            # and sharing their prompt's prefix K/V
    python bench/stream.py --device cuda --model idefics3-8b --tile 364 --questions-per-image 4
    python bench/stream.py --system-tokens 200              # + every row behind one 200-token system
                                                            # turn, shared or not
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import (SHAPES, about_shared_images, fewer_layers, make_requests, our_model,  # noqa: E402
                    reference_model, with_fresh_keys)
from model.engine import LLMEngine, SamplingParams  # noqa: E402
from model.engine.loop import EngineLoop  # noqa: E402
from model.engine.runner import ModelRunner  # noqa: E402
from model.parallel import TPEngine  # noqa: E402


def varied_requests(args, device: str) -> list:
    """Rows in runs of --questions-per-image about one image, naming it (bench/engine.py:
    about_shared_images), each with its own answer length."""
    rng = random.Random(0)
    base = make_requests(args.model, args.tile, args.blocks * args.batch, 3, args.max_new, device)
    base = about_shared_images(base, args.questions_per_image, SHAPES[args.model]["top"]["image_token_id"])
    system = torch.randint(100, 20000, (args.system_tokens,), generator=torch.Generator().manual_seed(2)).tolist()
    out = []
    for r in base:
        n = rng.randint(args.min_new, args.max_new)
        out.append(replace(r, prompt_ids=r.prompt_ids[:1] + system + r.prompt_ids[1:],
                           sampling=SamplingParams(max_new_tokens=n, min_new_tokens=n)))
    return out


def without_image_keys(run):
    """The run, its requests not naming their images (each encoded and prefilled whole)."""
    return lambda engine, blocks: run(engine, [[replace(r, image_key=None) for r in block] for block in blocks])


def streamed_with_image_keys():
    """streamed, each request naming its image; fresh names each run, so no run reuses the last's."""
    runs = itertools.count()
    return lambda engine, blocks: streamed(engine, [with_fresh_keys(block, str(next(runs))) for block in blocks])


def one_at_a_time(engine, blocks: list[list]) -> float:
    start = time.perf_counter()
    for block in blocks:
        engine.generate(block)
    return time.perf_counter() - start


def streamed(engine, blocks: list[list]) -> float:
    submit = engine.submit if isinstance(engine, TPEngine) else EngineLoop(engine).submit
    start = time.perf_counter()
    futures = [submit({r.request_id: r for r in block}) for block in blocks]
    for f in futures:
        f.result()
    return time.perf_counter() - start


def make_engine(model, args, folder: str, **options):
    """LLMEngine here, or (--tp > 1) a TPEngine over --tp processes loading the saved checkpoint."""
    if args.tp == 1:
        return LLMEngine(model, max_batch_size=args.slots, **options)
    return TPEngine(folder, args.tp, device_type=args.device, cpu_threads=args.threads, max_batch_size=args.slots,
                    **options)


def stats_of(engine) -> dict:
    return (engine.engine if isinstance(engine, TPEngine) else engine).stats


VISION_S = [0.0]


def time_the_vision_tower(device: str) -> None:
    """Adds each ModelRunner.image_features call's time (of this process: rank 0) to VISION_S, so
    a prefill's time splits into the vision tower's and the decoder's."""
    encode = ModelRunner.image_features

    def timed(self, *args):
        synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        synchronize()
        start = time.perf_counter()
        out = encode(self, *args)
        synchronize()
        VISION_S[0] += time.perf_counter() - start
        return out
    ModelRunner.image_features = timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smolvlm-256m", choices=sorted(SHAPES), help="random weights of these shapes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="rows per block")
    ap.add_argument("--slots", type=int, default=16, help="the engine's max_batch_size")
    ap.add_argument("--min-new", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (processes; --threads each)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (fewer: a quick check)")
    ap.add_argument("--system-tokens", type=int, default=0,
                    help="a system turn of this many tokens before every row's; > 0 adds a streamed run that "
                         "prefills it for every row")
    ap.add_argument("--questions-per-image", type=int, default=1,
                    help="consecutive rows about one image; > 1 adds a streamed run whose rows name their image")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    time_the_vision_tower(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    reference = reference_model(args.model, args.tile, args.device, dtype, args.layers)
    folder = tempfile.mkdtemp(prefix="bench-stream-")
    if args.tp > 1:
        reference.save_pretrained(folder)                     # safetensors, for the ranks to load
    model = our_model(reference)
    requests = varied_requests(args, args.device)
    blocks = [requests[i:i + args.batch] for i in range(0, len(requests), args.batch)]
    report = {"device": args.device, "tp": args.tp, "blocks": args.blocks, "batch": args.batch, "slots": args.slots,
              "new_tokens": sum(r.sampling.max_new_tokens for r in requests), **fewer_layers(args)}
    # Prompts through their image are shared only by requests naming it, so the runs without keys
    # share only a system turn; the keyed runs measure the vision tower skipped, then the prefixes too.
    runs = [("one_at_a_time", without_image_keys(one_at_a_time), {}), ("streamed", without_image_keys(streamed), {})]
    if args.system_tokens:
        runs += [("streamed_unshared_system", without_image_keys(streamed), {"share_prefixes": False})]
    if args.questions_per_image > 1:
        runs += [("streamed_image_keys", streamed_with_image_keys(), {"share_prefixes": False}),
                 ("streamed_shared_prefixes", streamed_with_image_keys(), {})]
    for name, run, options in runs:
        best, stats = float("inf"), {}
        engine = make_engine(model, args, folder, **options)
        for _ in range(args.repeats + 1):                     # the first run warms up (cache, graphs)
            stats_of(engine).update(dict.fromkeys(stats_of(engine), 0))
            VISION_S[0] = 0.0
            seconds = run(engine, blocks)
            if seconds < best:
                best, stats = seconds, dict(stats_of(engine), vision_s=VISION_S[0])
        if isinstance(engine, TPEngine):
            engine.close()
        report[name] = {"decode_steps": stats["decode_steps"], "prefills": stats["prefills"], "seconds": round(best, 3),
                        "prefill_s": round(stats["prefill_s"], 3), "vision_s": round(stats["vision_s"], 3),
                        "decode_s": round(stats["decode_s"], 3),
                        "images_encoded": stats["images_encoded"], "prefix_tokens_reused": stats["prefix_tokens_reused"],
                        "rows_per_s": round(len(requests) / best, 2)}
    report["speedup"] = round(report["one_at_a_time"]["seconds"] / report["streamed"]["seconds"], 2)
    if args.system_tokens:
        report["system_tokens"] = args.system_tokens
        report["shared_system_speedup"] = round(
            report["streamed_unshared_system"]["seconds"] / report["streamed"]["seconds"], 2)
    if "streamed_image_keys" in report:
        report["image_keys_speedup"] = round(report["streamed"]["seconds"] / report["streamed_image_keys"]["seconds"], 2)
        report["shared_prefixes_speedup"] = round(
            report["streamed_image_keys"]["seconds"] / report["streamed_shared_prefixes"]["seconds"], 2)
    print(json.dumps(report))
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
