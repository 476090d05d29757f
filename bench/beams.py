"""Benchmark: beam search (SamplingParams.num_beams) — our engine and our generate() against
transformers' generate(num_beams=k), on the same random-weight checkpoint and prompts, every search
running a fixed number of steps (min_new_tokens = max_new_tokens: no hypothesis ends early).

    python bench/beams.py [--batch 8] [--beams 4] [--new-tokens 32] [--repeats 3] [--threads 2]
    python bench/beams.py --device cuda --dtype bfloat16 --batch 32 --beams 4

Prints one JSON row: seconds of each, prompts/s, ours' speedups, and how many prompts' best
hypotheses are the reference's (the padded reference batch and our unpadded prompts may part on a
near tie; in float32 they should not).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import (SHAPES, add_pair_options, fewer_layers, make_requests, padded_batch,  # noqa: E402
                          smolvlm_pair, sync)
from model.engine import LLMEngine, SamplingParams  # noqa: E402


def searched(requests, beams: int, new_tokens: int) -> list:
    return [replace(r, sampling=SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams))
            for r in requests]


def time_engine(engine: LLMEngine, requests, device: str) -> tuple[float, list[list[int]]]:
    sync(device)
    start = time.perf_counter()
    results = engine.generate(requests)
    sync(device)
    return time.perf_counter() - start, [r.token_ids for r in results]


def time_generate(model, requests, beams: int, new_tokens: int, device: str, dtype: torch.dtype
                  ) -> tuple[float, list[list[int]]]:
    """transformers' generate, or ours (the same call), on the left-padded batch."""
    inputs = padded_batch(requests, SHAPES["smolvlm-256m"]["text"]["pad_token_id"], device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             num_beams=beams)
        sync(device)
    seconds = time.perf_counter() - start
    return seconds, out[:, inputs["input_ids"].shape[1]:].tolist()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8, help="prompts")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    add_pair_options(ap)
    args = ap.parse_args(argv)
    ref, ours, dtype = smolvlm_pair(args)
    name = "smolvlm-256m"
    requests = searched(make_requests(name, args.tile, args.batch, SHAPES[name]["frames"], args.new_tokens,
                                      args.device), args.beams, args.new_tokens)
    engine = LLMEngine(ours, max_batch_size=args.batch * args.beams)
    assert sorted(engine.stop_ids) == sorted(ref.generation_config.eos_token_id)   # as many candidates a step
    time_engine(engine, requests[:1], args.device)                          # warm-up: the cache, compiles
    time_generate(ref, requests[:1], args.beams, 2, args.device, dtype)
    ref_s = engine_s = generate_s = float("inf")
    for _ in range(args.repeats):           # interleaved: a load spike on a shared machine favours none
        seconds, ref_tokens = time_generate(ref, requests, args.beams, args.new_tokens, args.device, dtype)
        ref_s = min(ref_s, seconds)
        seconds, engine_tokens = time_engine(engine, requests, args.device)
        engine_s = min(engine_s, seconds)
        seconds, generate_tokens = time_generate(ours, requests, args.beams, args.new_tokens, args.device, dtype)
        generate_s = min(generate_s, seconds)
    print(json.dumps({
        "device": args.device, "dtype": args.dtype, "threads": args.threads, "prompts": args.batch,
        "beams": args.beams, "new_tokens": args.new_tokens,
        "ref_s": round(ref_s, 3), "engine_s": round(engine_s, 3), "generate_s": round(generate_s, 3),
        "ref_prompts_s": round(args.batch / ref_s, 2), "engine_prompts_s": round(args.batch / engine_s, 2),
        "engine_speedup": round(ref_s / engine_s, 2), "generate_speedup": round(ref_s / generate_s, 2),
        "engine_same_answers": sum(a == b for a, b in zip(ref_tokens, engine_tokens)),
        "generate_same_answers": sum(a == b for a, b in zip(ref_tokens, generate_tokens)),
        **fewer_layers(args)}))


if __name__ == "__main__":
    main()
