"""Benchmark: what merging a LoRA / DoRA adapter costs at load time (model.lora), against loading
the checkpoint alone and against PEFT's own load + merge_and_unload, on a random-weight checkpoint of
SmolVLM-256M's dimensions (saved by transformers) and adapters on every linear layer.

    python bench/adapter.py [--rank 16] [--repeats 3]

Prints one JSON row per adapter kind: best seconds of each load, and whether our merged weights
equal PEFT's (float32).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import reference_model  # noqa: E402
from model import Idefics3ForConditionalGeneration  # noqa: E402


def best_of(repeats: int, load) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = load()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Idefics3ForConditionalGeneration as Reference

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        reference_model("smolvlm-256m", 128, "cpu", torch.float32).save_pretrained(base)
        plain_s, _ = best_of(args.repeats, lambda: Idefics3ForConditionalGeneration.from_pretrained(base))
        for kind in ("lora", "dora"):
            folder = Path(tmp) / kind
            torch.manual_seed(0)
            settings = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                            init_lora_weights=False, use_dora=kind == "dora")
            get_peft_model(Reference.from_pretrained(base), LoraConfig(**settings)).save_pretrained(folder)
            ours_s, ours = best_of(args.repeats, lambda: Idefics3ForConditionalGeneration.from_pretrained(
                base, adapter=folder))
            peft_s, merged = best_of(args.repeats, lambda: PeftModel.from_pretrained(
                Reference.from_pretrained(base), folder).merge_and_unload())
            want = merged.state_dict()
            same = all(torch.equal(p, want[n]) for n, p in ours.named_parameters())
            params = sum(p.numel() for p in ours.parameters())
            print(json.dumps({"adapter": kind, "rank": args.rank, "params": params, "same_weights": same,
                              "load_s": round(plain_s, 2), "load_and_merge_s": round(ours_s, 2),
                              "peft_load_and_merge_s": round(peft_s, 2)}), flush=True)


if __name__ == "__main__":
    main()
