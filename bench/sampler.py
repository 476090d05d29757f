"""Benchmark: the sampler on its own, per decode step, over random logits of a real vocabulary.

Greedy (with the non-finite check), temperature only, top-p (its nucleus found by bisection, as
where no row sets top_k, or by a sort, as where rows mix), top-k 50 (+ top-p), each eager and
compiled (the engine's choice when its decode step is compiled), and greedy with the repetition
penalty alone or with vLLM's presence and frequency penalties (eager: the engine does not compile
them), milliseconds a step (synchronised):

    python bench/sampler.py --device cuda --rows 32 256 --vocab 128259
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.engine.sampler import SamplingState, flag_non_finite, fused_greedy_tokens, sample  # noqa: E402
from bench.profiling import sync  # noqa: E402

KINDS = {"greedy": dict(temperature=0.0), "temperature": dict(temperature=0.8),
         "top_p": dict(temperature=0.8, top_p=0.9),                       # the nucleus by bisection
         "top_p_sort": dict(temperature=0.8, top_p=0.9, sort=True),       # ... by a sort (batches mixing top_k)
         "top_k": dict(temperature=0.8, top_k=50, top_p=0.9),
         "repetition": dict(temperature=0.0, penalty=1.2),                    # the seen-token mask
         "counted": dict(temperature=0.0, penalty=1.2, presence=0.5, frequency=0.5)}   # ... and the counts


def state_for(rows: int, vocab: int, device: str, temperature: float, top_k: int = 0,
              top_p: float = 1.0, sort: bool = False, penalty: float = 1.0, presence: float = 0.0,
              frequency: float = 0.0) -> SamplingState:
    state = SamplingState.empty(rows, vocab, device)
    for row in range(rows):
        state.assign(row, temperature, top_k, top_p, seed=row, min_new=0, stop_ids=[], penalty=penalty,
                     prompt_ids=list(range(0, 400 * (row + 1), 7)), presence_penalty=presence,
                     frequency_penalty=frequency)
    return state


def drawer(kind: str, fuse: bool, logits: torch.Tensor, state: SamplingState, slots: torch.Tensor):
    """One step's draw as the engine makes it (greedy: with the non-finite check it fuses)."""
    params = KINDS[kind]
    if "penalty" in params:             # a penalised greedy step: the penalties, the draw, the tokens marked seen
        def penalised():
            tokens = sample(logits, state, slots, any_sampling=False, any_filter=False, any_penalty=True)
            state.mark_seen(slots, tokens)
            return tokens
        return penalised
    if kind == "greedy":
        if fuse:
            return lambda: fused_greedy_tokens(logits, state.step, state.min_new, state.stop_mask, slots)
        return lambda: flag_non_finite(sample(logits, state, slots, any_sampling=False, any_filter=False), logits)
    kw = dict(any_sampling=True, any_filter="top_p" in params, top_k_cap=params.get("top_k") or None,
              sort_free_nucleus=not {"top_k", "sort"} & params.keys(), fuse_noise=fuse)
    return lambda: sample(logits, state, slots, **kw)


def step_ms(rows: int, vocab: int, device: str, kind: str, fuse: bool, repeats: int) -> float:
    state, slots = state_for(rows, vocab, device, **KINDS[kind]), torch.arange(rows, device=device)
    logits = torch.randn(rows, vocab, device=device, generator=torch.Generator(device).manual_seed(0)) * 3
    draw = drawer(kind, fuse, logits, state, slots)
    for _ in range(3):                                   # warm-up (and the fused kernel's compile)
        draw()
    sync(device)
    start = time.perf_counter()
    for step in range(repeats):
        state.step += 1
        draw()
    sync(device)
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rows", nargs="+", type=int, default=[32])
    p.add_argument("--vocab", type=int, default=49280, help="SmolVLM's 49 280; Idefics3-8B's 128 259")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--no-fused", action="store_true", help="eager only (no compile: quick on CPU)")
    args = p.parse_args(argv)
    for rows in args.rows:
        for kind in args.kinds:
            row = dict(device=args.device, rows=rows, vocab=args.vocab, kind=kind,
                       eager_ms=round(step_ms(rows, args.vocab, args.device, kind, False, args.repeats), 3))
            if not args.no_fused:
                row["fused_ms"] = round(step_ms(rows, args.vocab, args.device, kind, True, args.repeats), 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
