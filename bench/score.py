"""Benchmark: scoring given answers (Request.continuation_ids, `--score-column`): each text's log p
given its image and prompt, our engine (one prefill a row, no decode step; rows about one image share
its encoding and prompt) against transformers' forward pass over the left-padded batch of prompt +
text, on the same random-weight SmolVLM-256M-shaped checkpoint, prompts and texts.

    python bench/score.py [--images 8] [--texts 4] [--text-tokens 24] [--repeats 3] [--threads 2]
    python bench/score.py --device cuda --dtype bfloat16 --tile 512 --images 32

Prints one JSON row: seconds of both, the speed-up, and the largest difference of a score.
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


def scored_requests(images: int, texts: int, tokens: int, tile: int, device: str) -> list:
    """`texts` texts (random ids) about each of `images` prompts, keyed by their image."""
    g = torch.Generator().manual_seed(2)
    base = make_requests("smolvlm-256m", tile, images, SHAPES["smolvlm-256m"]["frames"], 1, device)
    return [replace(r, request_id=f"{r.request_id}/{k}", image_key=r.request_id, sampling=SamplingParams(max_new_tokens=0),
                    continuation_ids=torch.randint(100, 20000, (tokens,), generator=g).tolist())
            for r in base for k in range(texts)]


def reference_scores(ref, requests, device: str, dtype: torch.dtype) -> list[list[float]]:
    whole = [replace(r, prompt_ids=r.prompt_ids + r.continuation_ids) for r in requests]
    inputs = padded_batch(whole, ref.generation_config.pad_token_id, device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        logits = ref(**inputs).logits.float()
    m = len(requests[0].continuation_ids)
    log_p = logits[:, -m - 1:-1].log_softmax(-1)
    ids = inputs["input_ids"][:, -m:]
    return log_p.gather(2, ids[..., None])[..., 0].tolist()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--texts", type=int, default=4, help="texts scored a prompt (each a row)")
    ap.add_argument("--text-tokens", type=int, default=24)
    add_pair_options(ap)
    args = ap.parse_args(argv)
    ref, ours, dtype = smolvlm_pair(args)
    requests = scored_requests(args.images, args.texts, args.text_tokens, args.tile, args.device)
    engine = LLMEngine(ours, max_batch_size=len(requests))
    engine.generate(requests[:1])
    ref_s = ours_s = float("inf")
    for run in range(args.repeats):        # interleaved; fresh image keys each run (nothing cached)
        sync(args.device)
        start = time.perf_counter()
        want = reference_scores(ref, requests, args.device, dtype)
        ref_s = min(ref_s, time.perf_counter() - start)
        fresh = [replace(r, image_key=f"{run}/{r.image_key}") for r in requests]
        engine.stats = dict.fromkeys(engine.stats, 0)
        sync(args.device)
        start = time.perf_counter()
        got = [r.continuation_logprobs for r in engine.generate(fresh)]
        sync(args.device)
        ours_s = min(ours_s, time.perf_counter() - start)
    diff = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
    print(json.dumps({"device": args.device, "dtype": args.dtype, "rows": len(requests), "images": args.images, "text_tokens": args.text_tokens, "tile": args.tile,
                      "threads": args.threads, "ref_s": round(ref_s, 3), "ours_s": round(ours_s, 3),
                      "speedup": round(ref_s / ours_s, 2), "rows_per_s": round(len(requests) / ours_s, 1),
                      "max_abs_diff": diff, "images_encoded": engine.stats["images_encoded"],
                      **fewer_layers(args)}))


if __name__ == "__main__":
    main()
