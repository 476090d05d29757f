"""Benchmark: the engine's own host work a decode step, the model's forward replaced by fixed logits.

With the overlapped loop (the CUDA default) this work runs while the device runs the step before, so
it bounds a step from below only where the device's step is shorter. A tiny random checkpoint,
`--rows` text-only requests of `--new-tokens` each, greedy (or `--sample`), one thread:

    python bench/host.py --rows 32 256
    python bench/host.py --rows 256 --sample --top-k 50
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import Idefics3ForConditionalGeneration  # noqa: E402
from model.engine import LLMEngine, Request, SamplingParams  # noqa: E402
from model.engine.runner import ModelRunner  # noqa: E402
from tests.fixtures.checkpoints import build_checkpoint  # noqa: E402


def host_ms(model, rows: int, new_tokens: int, sampling: SamplingParams, repeats: int) -> float:
    """Best mean decode-step time over `repeats` runs of `rows` requests, the forward a lookup."""
    engine = LLMEngine(model, max_batch_size=rows, overlap=True, compile=False)
    logits = torch.randn(rows, model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(0))
    requests = [Request(f"r{i}", [1] + [100 + (i * 7 + j) % 300 for j in range(5 + i % 9)], None, None,
                        sampling) for i in range(rows)]
    forward = ModelRunner.decode
    ModelRunner.decode = lambda self, batch, kv_len: logits[:batch]
    try:
        best = float("inf")
        for k in range(repeats + 1):                         # the first run sizes the cache
            engine.stats = dict.fromkeys(engine.stats, 0)
            engine.generate([replace(r, request_id=f"{k}/{r.request_id}") for r in requests])
            if k:
                best = min(best, engine.stats["decode_s"] / engine.stats["decode_steps"])
    finally:
        ModelRunner.decode = forward
    return best * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", type=int, default=[32, 256])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sample", action="store_true", help="temperature 0.8, top-p 0.9 instead of greedy")
    p.add_argument("--top-k", type=int, default=0, help="with --sample: every request's top_k")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = Idefics3ForConditionalGeneration.from_pretrained(build_checkpoint(tempfile.mkdtemp(), "smolvlm"))
    sampling = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              **(dict(temperature=0.8, top_p=0.9, top_k=args.top_k) if args.sample else {}))
    for rows in args.rows:
        print(json.dumps(dict(rows=rows, new_tokens=args.new_tokens, sample=args.sample, top_k=args.top_k,
                              host_ms_per_step=round(host_ms(model, rows, args.new_tokens, sampling, args.repeats), 3))),
              flush=True)


if __name__ == "__main__":
    main()
