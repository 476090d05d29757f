"""Benchmark: several sampled answers a prompt (SamplingParams.n) — our engine against transformers'
generate(num_return_sequences=n), and against our engine asked n separate requests a prompt (nothing
shared: each encodes its image and prefills its prompt), on the same random-weight checkpoint and
prompts, with a fixed number of new tokens (min_new_tokens = max_new_tokens).

    python bench/samples.py [--batch 8] [--samples 4] [--new-tokens 32] [--repeats 3] [--threads 2]
    python bench/samples.py --device cuda --dtype bfloat16 --batch 32 --samples 8

Prints one JSON row: seconds and generated tokens/s of each, ours' speedups, and what ours shared
(images encoded, prompt tokens whose K/V were copied).
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


def sampled(requests, samples: int, new_tokens: int) -> list:
    return [replace(r, sampling=SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=1.0,
                                               top_k=50, seed=i, n=samples)) for i, r in enumerate(requests)]


def apart(requests) -> list:
    """Each request's samples as requests of their own (n = 1, other seeds, nothing named to share)."""
    return [replace(r, request_id=f"{r.request_id}/{k}", sampling=replace(r.sampling, n=1, seed=r.sampling.seed * 1000 + k))
            for r in requests for k in range(r.sampling.n)]


def time_ours(engine: LLMEngine, requests, new_tokens: int, device: str) -> tuple[float, dict, int]:
    engine.stats = dict.fromkeys(engine.stats, 0)
    sync(device)
    start = time.perf_counter()
    results = engine.generate(requests)
    sync(device)
    seconds = time.perf_counter() - start
    answers = [s for r in results for s in (r.samples or [r])]
    assert all(a.num_generated_tokens == new_tokens for a in answers)
    return seconds, dict(engine.stats), len(answers) * new_tokens


def time_reference(ref, requests, samples: int, new_tokens: int, device: str, dtype: torch.dtype) -> float:
    inputs = padded_batch(requests, ref.generation_config.pad_token_id, device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        out = ref.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                           temperature=1.0, top_k=50, num_return_sequences=samples)
        sync(device)
    assert out.shape == (len(requests) * samples, inputs["input_ids"].shape[1] + new_tokens)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8, help="prompts")
    ap.add_argument("--samples", type=int, default=4, help="answers a prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    add_pair_options(ap)
    args = ap.parse_args(argv)
    ref, ours, dtype = smolvlm_pair(args)
    name = "smolvlm-256m"
    requests = sampled(make_requests(name, args.tile, args.batch, SHAPES[name]["frames"], args.new_tokens, args.device),
                       args.samples, args.new_tokens)
    rows = args.batch * args.samples
    engine = LLMEngine(ours, max_batch_size=rows)
    time_ours(engine, requests[:1], args.new_tokens, args.device)          # warm-up: the cache, compiles
    time_reference(ref, requests[:1], args.samples, 2, args.device, dtype)
    ref_s = shared_s = apart_s = float("inf")
    for _ in range(args.repeats):           # interleaved: a load spike on a shared machine favours none
        ref_s = min(ref_s, time_reference(ref, requests, args.samples, args.new_tokens, args.device, dtype))
        seconds, stats, tokens = time_ours(engine, requests, args.new_tokens, args.device)
        if seconds < shared_s:
            shared_s, shared_stats = seconds, stats
        apart_s = min(apart_s, time_ours(engine, apart(requests), args.new_tokens, args.device)[0])
    print(json.dumps({
        "device": args.device, "dtype": args.dtype, "threads": args.threads, "prompts": args.batch,
        "samples": args.samples, "new_tokens": args.new_tokens, "generated_tokens": tokens,
        "ref_s": round(ref_s, 3), "ours_s": round(shared_s, 3), "ours_apart_s": round(apart_s, 3),
        "ref_tok_s": round(tokens / ref_s, 1), "ours_tok_s": round(tokens / shared_s, 1),
        "speedup": round(ref_s / shared_s, 2), "speedup_over_apart": round(apart_s / shared_s, 2),
        "images_encoded": shared_stats["images_encoded"], "prefix_tokens_reused": shared_stats["prefix_tokens_reused"],
        "prefills": shared_stats["prefills"], **fewer_layers(args)}))


if __name__ == "__main__":
    main()
